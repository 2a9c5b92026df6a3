"""On-device augmentation and normalisation of uint8 batches (jnp, jittable).

The reference applies torchvision transforms to PIL images (deepunlearn-spec 1.2, iam-spec 5):
`RandomCrop(32, padding=4)` (zero fill) and `RandomHorizontalFlip(p=0.5)` on uint8 pixels, then
`ToTensor` (/255) and `Normalize`. Here the same happens on a whole batch inside the jitted step:
augment the uint8 batch first (the zero padding is then pixel value 0, as in torchvision), then
`normalize`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("crop_flip", "flip", "none")


def normalize(inputs, mean, std) -> jax.Array:
  """`ToTensor` + `Normalize`: float32 (x / 255 - mean) / std for integer images (rank 4, NHWC).

  Tabular rows (rank 2, e.g. Purchase's binary features) and float images (a user's own
  arrays, `jaxmu.unlearn`) are taken as they are, without the /255 (IAM feeds Purchase as
  floats, iam-spec 5): (x - mean) / std. `mean`/`std` have one entry per channel (feature) or a
  single entry for all.
  """
  x = jnp.asarray(inputs, jnp.float32)
  if x.ndim == 4 and jnp.issubdtype(jnp.asarray(inputs).dtype, jnp.integer):
    x = x / 255.0
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  for name, v in (("mean", mean), ("std", std)):
    if v.ndim != 1 or v.shape[0] not in (1, x.shape[-1]):
      raise ValueError(f"{name} must have 1 or {x.shape[-1]} entries, got shape {v.shape}")
  return (x - mean) / std


def random_crop_flip(key, images, pad: int = 4, crop: bool = True, flip: bool = True) -> jax.Array:
  """Per-sample random crop of the zero-padded image and/or random horizontal flip (p = 0.5).

  Equals torchvision `RandomCrop(H, padding=pad)` (offsets uniform in [0, 2 pad] per axis) and
  `RandomHorizontalFlip()` per sample, for a batch [B, H, W, C] of any dtype. Deterministic in
  `key`. The crop is a `dynamic_slice` of the padded batch under `vmap` (a gather).
  """
  b, h, w, c = images.shape
  key_crop, key_flip = jax.random.split(key)
  if crop:
    offsets = jax.random.randint(key_crop, (b, 2), 0, 2 * pad + 1)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop_one = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    images = jax.vmap(crop_one)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(key_flip, 0.5, (b,))
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


def flip_only(key, images) -> jax.Array:
  """Random horizontal flip per sample (the MNIST / Fashion-MNIST train transform)."""
  return random_crop_flip(key, images, crop=False)


def augment(key, images, kind: str) -> jax.Array:
  """Applies the recipe's augmentation `kind`: "crop_flip", "flip" or "none" (identity)."""
  if kind == "crop_flip":
    return random_crop_flip(key, images)
  if kind == "flip":
    return flip_only(key, images)
  if kind == "none":
    return images
  raise ValueError(f"augment kind must be one of {KINDS}, got {kind!r}")
