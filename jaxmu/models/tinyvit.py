"""TinyViT-11M in Flax Linen, NHWC: DeepUnlearn's "vit11m" (deepunlearn-spec 2.2).

Follows ``thirdparty/tiny_vit.py`` (microsoft/Cream TinyViT) with embed dims 64/128/256/448,
depths 2/2/6/2, heads 2/4/8/14, windows 7/7/14/7 (the first is unused), mlp ratio 4, MBConv
expand ratio 4, local conv 3x3, drop rate 0, stochastic depth ``linspace(0, 0.1, 12)`` over the
12 blocks, exact (erf) GELU, LayerNorm eps 1e-5, BatchNorm eps 1e-5 / PyTorch momentum 0.1.

Layout (params): ``patch_embed`` (Conv2d_BN 3->32 k3s2, GELU, Conv2d_BN 32->64 k3s2);
``stage0_block{0,1}`` MBConvs (third BN gamma initialised to 0) and ``stage0_merge``
(PatchMerging 64->128); ``stage{1,2,3}_block{j}`` TinyViT blocks with ``stage{1,2}_merge``
(128->256, 256->448); ``norm_head`` (LayerNorm) and ``head`` (Linear) on the token mean.
A ``Conv2d_BN`` is a module with children ``c`` (conv, no bias) and ``bn``, as in the reference.

TinyViT block: windows of ``w x w`` tokens after zero-padding the token grid bottom/right to a
multiple of ``w`` (the LayerNorm inside attention runs on the padded zeros, as in the reference);
**no attention mask**, so padding tokens act as keys and values (at 32 px stage 2's 2x2 grid is one
14x14 window with 4 real tokens). Attention: ``qkv`` output laid out per head as [q|k|v], relative
position bias ``attention_biases`` of shape (heads, w*w) initialised to 0 and gathered with the
index ``|drow| * w + |dcol|`` (the reference's first-seen enumeration of offsets).

Init: Linear weight N(0, 0.02) (timm's ``trunc_normal_(std=.02)`` cuts at +-2 absolute, i.e. 100
std, so it is a plain normal), bias 0; LayerNorm 1/0; conv PyTorch default (U(+-1/sqrt(fan_in)));
BN gamma ``bn_weight_init``, beta 0.

Stochastic depth is per sample and rescaled by 1/keep, active only with ``train=True``; it draws
from the ``"droppath"`` rng collection (``drop_path_rate=0`` needs no rng).

Difference from the reference not emulated: in ``eval()`` mode the reference caches the gathered
bias under ``no_grad``, so no gradient reaches ``attention_biases`` there. Here the bias always
has a gradient; methods that train in eval mode must freeze it themselves to be faithful.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmu.models.resnet import batch_norm, conv, torch_default_kernel_init


def gelu(x):
  return nn.gelu(x, approximate=False)


def layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


def dense(features: int, name: str) -> nn.Dense:
  """TinyViT's Linear init: weight N(0, 0.02), bias 0."""
  return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.zeros, name=name)


def drop_path(module: nn.Module, x, rate: float, train: bool):
  """timm DropPath: zero whole samples with probability ``rate``, rescale the rest by 1/(1-rate)."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("droppath"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * mask / keep


class Conv2dBN(nn.Module):
  """Conv2d (no bias, PyTorch default init) + BatchNorm2d with gamma = ``bn_weight_init``."""
  features: int
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  groups: int = 1
  bn_weight_init: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = conv(self.features, self.kernel, self.stride, self.padding, torch_default_kernel_init,
             "c", self.groups)(x)
    return batch_norm(train, "bn", nn.initializers.constant(self.bn_weight_init))(x, mask)


class PatchEmbed(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = gelu(Conv2dBN(self.dim // 2, 3, 2, 1, name="conv1")(x, train, mask))
    return Conv2dBN(self.dim, 3, 2, 1, name="conv2")(x, train, mask)


class MBConv(nn.Module):
  dim: int
  drop_path_rate: float
  expand_ratio: int = 4

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    hidden = self.dim * self.expand_ratio
    y = gelu(Conv2dBN(hidden, name="conv1")(x, train, mask))
    y = gelu(Conv2dBN(hidden, 3, 1, 1, groups=hidden, name="conv2")(y, train, mask))
    y = Conv2dBN(self.dim, bn_weight_init=0.0, name="conv3")(y, train, mask)
    return gelu(x + drop_path(self, y, self.drop_path_rate, train))


class PatchMerging(nn.Module):
  out_dim: int

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = gelu(Conv2dBN(self.out_dim, name="conv1")(x, train, mask))
    x = gelu(Conv2dBN(self.out_dim, 3, 2, 1, groups=self.out_dim, name="conv2")(x, train, mask))
    return Conv2dBN(self.out_dim, name="conv3")(x, train, mask)


def relative_bias_index(window: int) -> np.ndarray:
  """(w*w, w*w) index into the bias table: ``|drow| * w + |dcol|`` for every token pair."""
  r, c = np.divmod(np.arange(window * window), window)
  return np.abs(r[:, None] - r[None, :]) * window + np.abs(c[:, None] - c[None, :])


class Attention(nn.Module):
  """Multi-head self-attention over windows (B, w*w, C) with a relative position bias."""
  dim: int
  heads: int
  window: int

  @nn.compact
  def __call__(self, x):
    b, n, _ = x.shape
    head_dim = self.dim // self.heads
    x = layer_norm("norm")(x)
    qkv = dense(3 * self.dim, "qkv")(x).reshape(b, n, self.heads, 3 * head_dim)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    biases = self.param("attention_biases", nn.initializers.zeros, (self.heads, self.window ** 2))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
    attn = nn.softmax(logits + biases[:, relative_bias_index(self.window)], axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, self.dim)
    return dense(self.dim, "proj")(out)


class Mlp(nn.Module):
  dim: int
  ratio: int = 4

  @nn.compact
  def __call__(self, x):
    x = gelu(dense(self.dim * self.ratio, "fc1")(layer_norm("norm")(x)))
    return dense(self.dim, "fc2")(x)


class TinyViTBlock(nn.Module):
  """Zero-padded, unmasked window attention, local depthwise conv, MLP (x: B, H, W, C)."""
  dim: int
  heads: int
  window: int
  drop_path_rate: float

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    b, h, w, c = x.shape
    win = self.window
    pad_h, pad_w = -h % win, -w % win
    y = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    nh, nw = (h + pad_h) // win, (w + pad_w) // win
    y = y.reshape(b, nh, win, nw, win, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, win * win, c)
    y = Attention(self.dim, self.heads, win, name="attn")(y)
    y = y.reshape(b, nh, nw, win, win, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * win, nw * win, c)
    x = x + drop_path(self, y[:, :h, :w], self.drop_path_rate, train)
    x = Conv2dBN(self.dim, 3, 1, 1, groups=self.dim, name="local_conv")(x, train, mask)
    return x + drop_path(self, Mlp(self.dim, name="mlp")(x), self.drop_path_rate, train)


class TinyViT(nn.Module):
  num_classes: int
  img_size: int = 224
  drop_path_rate: float = 0.1
  embed_dims: Sequence[int] = (64, 128, 256, 448)
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (2, 4, 8, 14)
  window_sizes: Sequence[int] = (7, 7, 14, 7)

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    if x.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f"TinyViT built for img_size={self.img_size}, got input {x.shape}")
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    x = PatchEmbed(self.embed_dims[0], name="patch_embed")(x, train, mask)
    for i, (dim, depth) in enumerate(zip(self.embed_dims, self.depths)):
      for j in range(depth):
        rate = rates[sum(self.depths[:i]) + j]
        if i == 0:
          x = MBConv(dim, rate, name=f"stage0_block{j}")(x, train, mask)
        else:
          x = TinyViTBlock(dim, self.num_heads[i], self.window_sizes[i], rate,
                           name=f"stage{i}_block{j}")(x, train, mask)
      if i + 1 < len(self.embed_dims):
        x = PatchMerging(self.embed_dims[i + 1], name=f"stage{i}_merge")(x, train, mask)
    x = layer_norm("norm_head")(jnp.mean(x, axis=(1, 2)))
    return dense(self.num_classes, "head")(x)


def tinyvit_11m(num_classes: int, img_size: int = 224, drop_path_rate: float = 0.1) -> TinyViT:
  """TinyViT-11M for square ``img_size`` inputs (the reference uses 32, 64 and 224)."""
  if img_size <= 0 or img_size % 32:
    raise ValueError(f"img_size must be a positive multiple of 32 (reference: 32, 64, 224), got {img_size}")
  return TinyViT(num_classes, img_size, drop_path_rate)
