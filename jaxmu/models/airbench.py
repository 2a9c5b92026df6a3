"""airbench94: the fast CIFAR-10 network (Keller Jordan, ``legacy/airbench94.py``; arXiv
2404.00498), its whitening kernel and its schedules; the trainer is `jaxmu.airbench`.

Net (jax-style-and-speed B.1): a frozen 2x2 patch-whitening conv (24 filters: the eigenvectors of
the covariance of 2x2 patches of the first 5,000 training images scaled by
``1/sqrt(eigenvalue + 5e-4)``, and their negatives; trainable bias), GELU, three ConvGroups
(widths 64/256/256: conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU), MaxPool(3), a
bias-free linear head, times 1/9. Convs: PyTorch default init, then Dirac (identity) on the first
``in_channels`` filters. BatchNorm: scale frozen at 1 (no scale parameter), trainable bias,
PyTorch momentum 0.6, eps 1e-12. GELU is exact (erf), as ``torch.nn.GELU``.

Differences from the reference: Flax's BatchNorm keeps the biased batch variance in its running
average (PyTorch the unbiased one); the whitening conv of the generic `jaxmu.train.fit` path
(``models.get("airbench94")`` trained like any model) is an ordinary trainable conv.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmu.models.resnet import BatchNorm, conv, torch_default_kernel_init, uniform_init

WHITEN = "stem_whiten"


def dirac_init(base: Callable = torch_default_kernel_init) -> Callable:
  """``torch.nn.init.dirac_(w[:w.size(1)])`` after ``base``: the first ``in_channels`` filters
  pass their own input channel through (centre tap 1, every other tap 0); HWIO kernels."""
  def init(key, shape, dtype=jnp.float32):
    h, w, cin, cout = shape
    kernel = base(key, shape, dtype)
    k = min(cin, cout)
    identity = jnp.zeros((h, w, cin, k), dtype).at[
        h // 2, w // 2, jnp.arange(k), jnp.arange(k)].set(1)
    return kernel.at[..., :k].set(identity)
  return init


def _batch_norm(train: bool, momentum: float, name: str) -> BatchNorm:
  """BatchNorm with the scale frozen at 1 (no parameter), eps 1e-12, PyTorch ``momentum``."""
  return BatchNorm(use_running_average=not train, momentum=1 - momentum, epsilon=1e-12,
                   use_scale=False, use_fast_variance=False, name=name)


class ConvGroup(nn.Module):
  """conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU. Params: conv1, bn1, conv2, bn2."""
  features: int
  bn_momentum: float

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = conv(self.features, 3, 1, 1, dirac_init(), "conv1")(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.gelu(_batch_norm(train, self.bn_momentum, "bn1")(x, mask), approximate=False)
    x = conv(self.features, 3, 1, 1, dirac_init(), "conv2")(x)
    return nn.gelu(_batch_norm(train, self.bn_momentum, "bn2")(x, mask), approximate=False)


class Airbench(nn.Module):
  """Params: stem_whiten (2x2 conv with bias), layer{1,2,3}_0 (ConvGroups), fc (no bias).

  Needs inputs of at least 32x32 (the spatial size after the three pools must be >= 3).
  """
  num_classes: int
  widths: tuple[int, ...] = (64, 256, 256)
  bn_momentum: float = 0.6
  scale: float = 1 / 9

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    if min(x.shape[1:3]) < 32:
      raise ValueError(f"airbench needs images of at least 32x32, got {x.shape[1:3]}; load the "
                       "dataset with image_size=32")
    patch = 4 * x.shape[-1]
    x = nn.Conv(2 * patch, (2, 2), padding="VALID", kernel_init=torch_default_kernel_init,
                bias_init=uniform_init(patch ** -0.5), name=WHITEN)(x)
    x = nn.gelu(x, approximate=False)
    for i, width in enumerate(self.widths):
      x = ConvGroup(width, self.bn_momentum, name=f"layer{i + 1}_0")(x, train, mask)
    x = nn.max_pool(x, (3, 3), (3, 3)).reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, use_bias=False, kernel_init=torch_default_kernel_init,
                    name="fc")(x) * self.scale


def airbench94(num_classes: int, widths: Sequence[int] = (64, 256, 256)) -> Airbench:
  return Airbench(num_classes, tuple(widths))


# --------------------------------------------------------------------------------------------
# Whitening and schedules
# --------------------------------------------------------------------------------------------


def whitening_kernel(images: jax.Array, eps: float = 5e-4) -> jax.Array:
  """The frozen whitening kernel [2, 2, C, 8 C] from normalised images [B, H, W, C]: eigenvectors
  of the (uncentred) covariance of all 2x2 patches, largest eigenvalue first, each scaled by
  ``1/sqrt(eigenvalue + eps)``, then the same filters negated (``get_whitening_parameters``)."""
  c = images.shape[-1]
  patches = jnp.stack([images[:, dh:images.shape[1] - 1 + dh, dw:images.shape[2] - 1 + dw]
                       for dh in (0, 1) for dw in (0, 1)], axis=-2)  # [B, H-1, W-1, (dh dw), C]
  flat = patches.reshape(-1, 4 * c).astype(jnp.float32)
  eigenvalues, eigenvectors = jnp.linalg.eigh(flat.T @ flat / flat.shape[0])
  scaled = eigenvectors[:, ::-1] / jnp.sqrt(eigenvalues[::-1] + eps)
  kernel = scaled.reshape(2, 2, c, 4 * c)
  return jnp.concatenate([kernel, -kernel], axis=-1)


def lr_factor(step, total_steps):
  """``np.interp(step, [0, int(0.23 T), T], [0.2, 1, 0.07])``: the triangular schedule."""
  peak = jnp.floor(0.23 * total_steps)
  step = jnp.asarray(step, jnp.float32)
  up = 0.2 + 0.8 * step / jnp.maximum(peak, 1)
  down = 1.0 - 0.93 * (step - peak) / jnp.maximum(total_steps - peak, 1)
  return jnp.where(step <= peak, jnp.where(peak > 0, up, 1.0), down)


def lookahead_decay(step, total_steps):
  """The lookahead ``alpha_schedule``: 0.95**5 (step / total)**3."""
  return 0.95 ** 5 * (jnp.asarray(step, jnp.float32) / total_steps) ** 3
