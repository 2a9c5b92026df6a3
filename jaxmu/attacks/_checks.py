"""Input validation shared by the LiRA, RMIA, baseline and population-MIA modules.

Each check runs eagerly on concrete arrays (outside jit) and raises ValueError naming the
argument, so bad input fails before any score is computed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def signal(x, name, ndim):
  """`x` as a float jnp array with `ndim` dimensions and only finite values."""
  a = jnp.asarray(x)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    a = a.astype(jnp.result_type(float))
  if a.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimension(s); got shape {a.shape}")
  if a.size == 0:
    raise ValueError(f"{name} is empty (shape {a.shape})")
  if not bool(jnp.all(jnp.isfinite(a))):
    raise ValueError(f"{name} contains NaN or infinite values")
  return a


def shadows(x, n, name="shadows"):
  """`x` as a [K, N] signal stack with K >= 1 and N == `n`."""
  a = jnp.asarray(x)
  if a.ndim == 2 and a.shape[0] == 0:
    raise ValueError(f"{name} has K = 0 models; at least one is needed")
  a = signal(a, name, 2)
  if a.shape[1] != n:
    raise ValueError(f"{name} has shape {a.shape} but the target has N = {n} samples")
  return a


def mask(m, shape, name):
  """`m` as a boolean jnp array of exactly `shape`; values must be binary (bool or 0/1)."""
  a = np.asarray(m)
  if a.shape != tuple(shape):
    raise ValueError(f"{name} has shape {a.shape}; expected {tuple(shape)}")
  if a.dtype != bool:
    if not np.all((a == 0) | (a == 1)):
      raise ValueError(f"{name} must be binary (bool or 0/1); got values {np.unique(a)[:5]}")
    a = a.astype(bool)
  return jnp.asarray(a)
