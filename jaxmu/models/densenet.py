"""DenseNet-121 in Flax Linen, NHWC: torchvision's ``densenet121`` (``weights=None``) with a new
head, as IAM's architecture study (iam-spec 6.1, 7.3: ``classifier`` -> ``Linear(1024, C)``).

Growth rate 32, blocks (6, 12, 24, 16), bottleneck width 4 x 32, 64 initial features, no dropout
(torchvision's ``drop_rate`` 0). Stem: 7x7/2 conv (padding 3), BN, ReLU, 3x3/2 max-pool (padding
1). Dense layer: BN-ReLU-conv1x1(128)-BN-ReLU-conv3x3(32), its output appended to its input.
Transition: BN-ReLU-conv1x1(half the channels)-2x2/2 average pool. Then BN, ReLU, global average
pool (torchvision's ``adaptive_avg_pool2d(1)``) and the head. On 32x32 inputs the last block
runs on a 1x1 map.

Convs have no bias. BatchNorm as `jaxmu.models.resnet.batch_norm` (PyTorch eps and momentum,
masked batch statistics). Init: torchvision's (conv kaiming-normal fan_in/ReLU, BN 1/0); the new
head PyTorch's ``Linear`` default (weight and bias U(+-1/sqrt(fan_in))).

Params: ``stem_conv``, ``stem_bn`` (``features.conv0``, ``norm0``), ``layer{i}_{j}`` (dense layer
j of block i), ``layer{i}_merge`` (the transition after block i, ordered last in its block by
`jaxmu.models.param_groups`), ``norm5`` and the head ``fc``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxmu.models.resnet import batch_norm, conv, torch_dense

# torchvision DenseNet: kaiming_normal_(weight) with its defaults (fan_in, ReLU gain).
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class DenseLayer(nn.Module):
  """BN-ReLU-conv1x1(bn_size * growth)-BN-ReLU-conv3x3(growth), concatenated to the input."""
  growth: int
  bn_size: int

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    out = nn.relu(batch_norm(train, "norm1")(x, mask))
    out = conv(self.bn_size * self.growth, 1, 1, 0, conv_init, "conv1")(out)
    out = nn.relu(batch_norm(train, "norm2")(out, mask))
    out = conv(self.growth, 3, 1, 1, conv_init, "conv2")(out)
    return jnp.concatenate([x, out], axis=-1)


class Transition(nn.Module):
  """BN-ReLU-conv1x1(features)-2x2/2 average pool."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = nn.relu(batch_norm(train, "norm")(x, mask))
    x = conv(self.features, 1, 1, 0, conv_init, "conv")(x)
    return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNet(nn.Module):
  """torchvision DenseNet with a ``num_classes`` head ``fc``."""
  blocks: Sequence[int]
  num_classes: int
  growth: int = 32
  bn_size: int = 4
  init_features: int = 64

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = conv(self.init_features, 7, 2, 3, conv_init, "stem_conv")(x)
    x = nn.relu(batch_norm(train, "stem_bn")(x, mask))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    for i, layers in enumerate(self.blocks):
      for j in range(layers):
        x = DenseLayer(self.growth, self.bn_size, name=f"layer{i + 1}_{j}")(x, train, mask)
      if i < len(self.blocks) - 1:
        x = Transition(x.shape[-1] // 2, name=f"layer{i + 1}_merge")(x, train, mask)
    x = nn.relu(batch_norm(train, "norm5")(x, mask))
    x = jnp.mean(x, axis=(1, 2))
    return torch_dense(self.num_classes, x.shape[-1], "fc")(x)


def densenet121(num_classes: int) -> DenseNet:
  return DenseNet((6, 12, 24, 16), num_classes)
