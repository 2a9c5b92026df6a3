"""ResNet-18/34/50 in Flax Linen, NHWC, with PyTorch semantics.

Two stems:

* ``stem="imagenet"``: ``torchvision.models.resnet18/34/50`` (deepunlearn-spec 2.1): 7x7/2 conv
  with explicit padding 3, BN, ReLU, 3x3/2 max-pool with padding 1, global average pool, ``fc``.
  On 32x32 inputs layer4 runs on a 1x1 map: that is what DeepUnlearn ran.
* ``stem="cifar"``: IAM's ``unlearning_lib/models/resnet.py`` (iam-spec 6.1): 3x3/1 conv with
  padding 1, BN, ReLU, no max-pool. IAM pools with ``F.avg_pool2d(out, 4)``, which on the 4x4 map
  of a 32x32 input is the global average pool used here for every input size.

Blocks are torchvision's BasicBlock (ResNet-18/34) and Bottleneck v1.5 (ResNet-50, stride on the
3x3 conv, expansion 4); both references share them. The projection shortcut is a 1x1 conv + BN
named ``downsample_0``/``downsample_1`` like torchvision's ``downsample.0``/``.1`` (RNI's
"bn"-substring rule, deepunlearn-spec 4.20, depends on those names).

Every convolution uses explicit PyTorch-style padding (never Flax ``"SAME"``, which pads
asymmetrically for stride 2) and ``use_bias=False``. BatchNorm: eps 1e-5, Flax momentum 0.9 (=
PyTorch 0.1), batch statistics in train mode, running statistics otherwise.

Initialisations (``init=``): ``"torchvision"`` (conv kaiming-normal fan_out/ReLU, std
sqrt(2/fan_out)) or ``"pytorch_default"`` (conv kaiming-uniform a=sqrt(5), U(+-1/sqrt(fan_in))).
Both: BN gamma 1, beta 0; ``fc`` PyTorch ``Linear`` default (weight and bias U(+-1/sqrt(fan_in))).
Default per stem: imagenet -> torchvision, cifar -> pytorch_default.

Deviation: Flax updates the running variance with the biased batch variance; PyTorch uses the
unbiased one (factor n/(n-1)).
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# PyTorch's kaiming_uniform_(a=sqrt(5)): gain sqrt(2/(1+5)), bound gain*sqrt(3/fan_in) = 1/sqrt(fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# torchvision ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu"), std sqrt(2/fan_out).
torchvision_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
CONV_INITS = {"torchvision": torchvision_conv_init, "pytorch_default": torch_default_kernel_init}


def uniform_init(bound: float) -> Initializer:
  """U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
  """A ``torch.nn.Linear`` with PyTorch's default init (weight and bias U(+-1/sqrt(fan_in)))."""
  return nn.Dense(features, kernel_init=torch_default_kernel_init,
                  bias_init=uniform_init(fan_in ** -0.5), name=name)


def conv(features: int, kernel: int, stride: int, padding: int, kernel_init: Initializer,
         name: str | None = None, groups: int = 1) -> nn.Conv:
  """``torch.nn.Conv2d(..., bias=False)``: explicit symmetric padding, NHWC."""
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 feature_group_count=groups, use_bias=False, kernel_init=kernel_init, name=name)


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` whose ``mask`` is per sample ([B] bool): masked-out samples (the padding of
  a partial batch) take no part in the batch statistics, so a padded batch behaves exactly as
  the smaller real batch (PyTorch's ``drop_last=False`` last batch)."""

  def __call__(self, x, mask=None):
    if mask is not None:
      mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
    return super().__call__(x, mask=mask)


def batch_norm(train: bool, name: str | None = None, scale_init: Initializer = nn.initializers.ones) -> BatchNorm:
  """``torch.nn.BatchNorm2d`` defaults: eps 1e-5, momentum 0.1 (Flax 0.9)."""
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   use_fast_variance=False, scale_init=scale_init, name=name)


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU (expansion 1)."""
  planes: int
  stride: int
  kernel_init: Initializer
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    out = conv(self.planes, 3, self.stride, 1, self.kernel_init, "conv1")(x)
    out = nn.relu(batch_norm(train, "bn1")(out, mask))
    out = conv(self.planes, 3, 1, 1, self.kernel_init, "conv2")(out)
    out = batch_norm(train, "bn2")(out, mask)
    return nn.relu(out + shortcut(self, x, train, mask))


class Bottleneck(nn.Module):
  """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN, + shortcut, ReLU (v1.5)."""
  planes: int
  stride: int
  kernel_init: Initializer
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    out = conv(self.planes, 1, 1, 0, self.kernel_init, "conv1")(x)
    out = nn.relu(batch_norm(train, "bn1")(out, mask))
    out = conv(self.planes, 3, self.stride, 1, self.kernel_init, "conv2")(out)
    out = nn.relu(batch_norm(train, "bn2")(out, mask))
    out = conv(self.planes * 4, 1, 1, 0, self.kernel_init, "conv3")(out)
    out = batch_norm(train, "bn3")(out, mask)
    return nn.relu(out + shortcut(self, x, train, mask))


def shortcut(block: BasicBlock | Bottleneck, x, train: bool, mask=None):
  """Identity, or 1x1 conv(stride) + BN when the stride or the width changes (inside ``block``)."""
  out_ch = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out_ch:
    return x
  x = conv(out_ch, 1, block.stride, 0, block.kernel_init, "downsample_0")(x)
  return batch_norm(train, "downsample_1")(x, mask)


class ResNet(nn.Module):
  """Torchvision/IAM ResNet. Params: stem_conv, stem_bn, layer{i}_{j} (i = 1..4), fc."""
  block: type
  stage_sizes: Sequence[int]
  num_classes: int
  stem: str = "imagenet"
  conv_init: str | None = None  # None: torchvision for the imagenet stem, pytorch_default for cifar

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    kernel_init = CONV_INITS[self.conv_init or {"imagenet": "torchvision", "cifar": "pytorch_default"}[self.stem]]
    if self.stem == "imagenet":
      x = conv(64, 7, 2, 3, kernel_init, "stem_conv")(x)
      x = nn.relu(batch_norm(train, "stem_bn")(x, mask))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    else:
      x = conv(64, 3, 1, 1, kernel_init, "stem_conv")(x)
      x = nn.relu(batch_norm(train, "stem_bn")(x, mask))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(64 * 2 ** i, stride, kernel_init, name=f"layer{i + 1}_{j}")(x, train, mask)
    x = jnp.mean(x, axis=(1, 2))
    return torch_dense(self.num_classes, x.shape[-1], "fc")(x)


def _check(stem: str, init: str | None) -> None:
  if stem not in ("imagenet", "cifar"):
    raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
  if init is not None and init not in CONV_INITS:
    raise ValueError(f"init must be one of {sorted(CONV_INITS)} or None, got {init!r}")


def _resnet(block: type, stage_sizes: Sequence[int]) -> Callable[..., ResNet]:
  def make(num_classes: int, stem: str = "imagenet", init: str | None = None) -> ResNet:
    _check(stem, init)
    return ResNet(block, tuple(stage_sizes), num_classes, stem, init)
  return make


resnet18 = _resnet(BasicBlock, (2, 2, 2, 2))
resnet34 = _resnet(BasicBlock, (3, 4, 6, 3))
resnet50 = _resnet(Bottleneck, (3, 4, 6, 3))
