"""VGG-11/16 in Flax Linen, NHWC: torchvision's ``vgg11`` / ``vgg16`` (``weights=None``, no
BatchNorm) with a new head, as IAM's architecture study (iam-spec 6.1, 7.3: ``classifier[6]`` ->
``Linear(4096, C)``).

``features``: 3x3 convs (padding 1, bias) + ReLU, 2x2/2 max-pools; ``AdaptiveAvgPool2d((7, 7))``;
``classifier``: Linear(512*7*7, 4096)-ReLU-Dropout(0.5)-Linear(4096, 4096)-ReLU-Dropout(0.5)-
Linear(4096, C). On 32x32 inputs the features end on a 1x1 map, which the adaptive pool
replicates 7x7 times, as the reference ran. Flattening follows PyTorch's (C, H, W) order.

Init: torchvision's (conv kaiming-normal fan_out/ReLU, bias 0; Linear N(0, 0.01), bias 0); the new
head PyTorch's ``Linear`` default (weight and bias U(+-1/sqrt(fan_in))). Dropout is active only
with ``train=True`` and draws from the ``"droppath"`` rng collection (the one jaxmu's training
steps pass). There is no BatchNorm: ``mask`` is accepted and unused.

Params: ``layer{i}_{j}`` (conv j of stage i; stages end at the max-pools, so
`jaxmu.models.param_groups` and ``last_blocks`` see five blocks), ``classifier_0``,
``classifier_3`` and the head ``fc`` (torchvision's ``classifier.0``, ``.3``, ``.6``).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmu.models.resnet import torch_dense, torchvision_conv_init

# torchvision's cfgs "A" (VGG-11) and "D" (VGG-16): conv widths per stage, a max-pool after each.
STAGES = {"vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
          "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))}


def adaptive_avg_pool(x, size: int):
  """``nn.AdaptiveAvgPool2d(size)`` on NHWC: output bin i averages input rows (columns)
  floor(i * H / size) to ceil((i + 1) * H / size) - 1, so a smaller map is replicated."""
  for axis in (1, 2):
    n = x.shape[axis]
    bins = [jax.lax.slice_in_dim(x, i * n // size, -(-(i + 1) * n // size), axis=axis)
            for i in range(size)]
    x = jnp.concatenate([b.mean(axis, keepdims=True) for b in bins], axis)
  return x


class VGG(nn.Module):
  """torchvision VGG without BatchNorm and with a ``num_classes`` head ``fc``."""
  stages: Sequence[Sequence[int]]
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    del mask  # no BatchNorm
    for i, widths in enumerate(self.stages):
      for j, width in enumerate(widths):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=torchvision_conv_init,
                    bias_init=nn.initializers.zeros, name=f"layer{i + 1}_{j}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = adaptive_avg_pool(x, 7)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.flatten of [B, C, 7, 7]
    for name in ("classifier_0", "classifier_3"):
      x = nn.Dense(4096, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                   name=name)(x)
      x = nn.Dropout(0.5, deterministic=not train, rng_collection="droppath")(nn.relu(x))
    return torch_dense(self.num_classes, x.shape[-1], "fc")(x)


def vgg11(num_classes: int) -> VGG:
  return VGG(STAGES["vgg11"], num_classes)


def vgg16(num_classes: int) -> VGG:
  return VGG(STAGES["vgg16"], num_classes)
