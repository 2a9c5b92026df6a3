"""Per-sample membership signals from logits (iam-spec 2).

Every function takes ``logits`` of shape ``[..., C]`` and integer ``labels`` whose shape
broadcasts to ``logits.shape[:-1]`` (e.g. logits ``[K, N, C]`` of K models with labels ``[N]``),
and returns one value per leading index. All are pure ``jnp`` (jittable, vmappable) and accept
NumPy input; the output dtype follows the logits (float32 unless x64 is enabled).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _true_class(logits, labels):
  """Returns (z as a float array, one-hot mask of the label), validating the shapes."""
  z = jnp.asarray(logits)
  if not jnp.issubdtype(z.dtype, jnp.floating):
    z = z.astype(jnp.float32)
  labels = jnp.asarray(labels)
  if z.ndim < 1:
    raise ValueError(f"logits need a class axis; got shape {z.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
  try:
    labels = jnp.broadcast_to(labels, z.shape[:-1])
  except ValueError:
    raise ValueError(
        f"labels of shape {labels.shape} do not broadcast to logits.shape[:-1] = {z.shape[:-1]}"
    ) from None
  onehot = labels[..., None] == jnp.arange(z.shape[-1])
  return z, onehot


def _log_p_y(z, onehot):
  return jnp.sum(jnp.where(onehot, z, 0.0), axis=-1) - jax.nn.logsumexp(z, axis=-1)


def true_class_prob(logits, labels):
  """p_y = softmax(z)_y ("proby", iam-spec 2; ``model_confidence``)."""
  return jnp.exp(_log_p_y(*_true_class(logits, labels)))


def cross_entropy(logits, labels):
  """Per-sample cross-entropy -log p_y (iam-spec 2 "loss"; torch ``reduction='none'``)."""
  return -_log_p_y(*_true_class(logits, labels))


def scaled_logit(logits, labels):
  """LiRA's scaled logit phi = log p_y - log sum_{j != y} p_j (iam-spec 2 ``carlini_logit``).

  Computed exactly as z_y - logsumexp_{j != y} z_j, so it stays finite where p_y rounds to 0 or 1.
  Deviation: the reference adds 1e-45 inside both logs (after a max-subtracted softmax), which
  clips phi to about +-103.3 in float32; here saturated samples keep their exact, distinct values.
  """
  z, onehot = _true_class(logits, labels)
  z_y = jnp.sum(jnp.where(onehot, z, 0.0), axis=-1)
  return z_y - jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, z), axis=-1)


def gumbel_map(p, eps1=1e-2, eps2=1e-5, normalize=False, norm_eps=None):
  """Bounded Gumbel map r(p) = -log(eps1 - log(eps2 + p)) (iam-spec 2, IAM's "logloss" signal).

  With ``normalize=True`` returns r_hat(p) = (r(p) - r(0)) / (r(1) - r(0)) in [0, 1], the signal
  every vision IAM call uses. ``norm_eps=(eps1', eps2')`` takes r(0) and r(1) from other epsilons,
  reproducing the reference's Purchase/Texas IAM-Off mismatch (iam-spec 12.5); by default the
  same epsilons are used.
  """
  p = jnp.asarray(p)
  if not jnp.issubdtype(p.dtype, jnp.floating):
    p = p.astype(jnp.float32)
  r = -jnp.log(eps1 - jnp.log(eps2 + p))
  if not normalize:
    return r
  e1, e2 = (eps1, eps2) if norm_eps is None else norm_eps
  r_min = -math.log(e1 - math.log(e2))
  r_max = -math.log(e1 - math.log(1.0 + e2))
  return (r - r_min) / (r_max - r_min)


def normalized_gumbel(p, eps1=1e-2, eps2=1e-5):
  """r_hat(p) = ``gumbel_map(p, eps1, eps2, normalize=True)``: the vision IAM signal in [0, 1]."""
  return gumbel_map(p, eps1, eps2, normalize=True)


def taylor_soft_margin(logits, labels, temperature=1.0, margin=0.6, taylor_n=4):
  """RMIA's ``taylor-soft-margin`` signal (iam-spec 2 and 4.1).

  With u = z / temperature and T(v) = sum_{i < taylor_n} v^i / i!:
  tsm = T(u_y - margin) / (sum_{j != y} T(u_j) + T(u_y - margin)). As in the reference there is
  no max-subtraction (T is not shift-invariant) and T may be negative for v below about -1.6
  (iam-spec 12.24). The reference uses margin 0.6, taylor_n 4 and temperature 2 (CIFAR-10,
  CINIC-10, Purchase, Location, Texas) or 1 (CIFAR-100).
  """
  z, onehot = _true_class(logits, labels)
  u = jnp.where(onehot, z / temperature - margin, z / temperature)
  t = sum(u**i / math.factorial(i) for i in range(taylor_n))
  t_y = jnp.sum(jnp.where(onehot, t, 0.0), axis=-1)
  return t_y / jnp.sum(t, axis=-1)
