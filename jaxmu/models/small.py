"""Small models: a fast CNN for the embedded digits default and tests, and IAM's Purchase MLP.

* ``small_cnn`` (jaxmu's own, no reference): conv3x3(32)-BN-ReLU, conv3x3/2(64)-BN-ReLU,
  global average pool, Linear. Works on 8x8 digits and 32x32 images. PyTorch default init,
  PyTorch BatchNorm (eps 1e-5, momentum 0.1), explicit padding.
* ``purchase_mlp``: IAM's ``PurchaseClassifier`` (iam-spec 6.1): Linear(600, 1024)-Tanh-
  Linear(1024, 512)-Tanh-Linear(512, 256)-Tanh-Linear(256, 128)-Tanh-Linear(128, 100 = C),
  PyTorch default Linear init (weight and bias U(+-1/sqrt(fan_in))).

Module names follow the stem / ``layer{i}_{j}`` / ``fc`` convention of the ResNets so the
parameter-group helpers of ``jaxmu.models`` apply unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxmu.models.resnet import batch_norm, conv, torch_default_kernel_init, torch_dense


class SmallCNN(nn.Module):
  """Params: stem_conv, stem_bn, layer1_0 {conv, bn}, fc."""
  num_classes: int
  width: int = 32

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = conv(self.width, 3, 1, 1, torch_default_kernel_init, "stem_conv")(x)
    x = nn.relu(batch_norm(train, "stem_bn")(x, mask))
    x = ConvBNReLU(2 * self.width, stride=2, name="layer1_0")(x, train, mask)
    x = jnp.mean(x, axis=(1, 2))
    return torch_dense(self.num_classes, x.shape[-1], "fc")(x)


class ConvBNReLU(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = conv(self.features, 3, self.stride, 1, torch_default_kernel_init, "conv")(x)
    return nn.relu(batch_norm(train, "bn")(x, mask))


class PurchaseMLP(nn.Module):
  """Params: stem_dense (in->1024), layer1_0 (->512), layer2_0 (->256), layer3_0 (->128), fc."""
  num_classes: int = 100
  num_features: int = 600

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    del train, mask  # no train-mode behaviour
    if x.shape[-1] != self.num_features:
      raise ValueError(f"purchase_mlp expects {self.num_features} features, got {x.shape}")
    names = ("stem_dense", "layer1_0", "layer2_0", "layer3_0")
    for name, width in zip(names, (1024, 512, 256, 128)):
      x = jnp.tanh(torch_dense(width, x.shape[-1], name)(x))
    return torch_dense(self.num_classes, x.shape[-1], "fc")(x)


def small_cnn(num_classes: int, width: int = 32) -> SmallCNN:
  return SmallCNN(num_classes, width)


def purchase_mlp(num_classes: int = 100, num_features: int = 600) -> PurchaseMLP:
  return PurchaseMLP(num_classes, num_features)
