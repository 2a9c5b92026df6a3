"""RMIA (Zarifzadeh et al. 2024) as the IAM code runs it (iam-spec 4.1).

Signals are per-sample probabilities of the true class, in the IAM code RMIA's
``signals.taylor_soft_margin``. x indexes the N audited samples, z the Z population samples.
Scores are **membership** scores in [0, 1] (the fraction of population samples that x dominates);
IAM's unlearning key is ``p_RMIA = 1 - score`` (feed that to ``iam.bin_ui``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmu.attacks import _checks


def trim_mean(x, proportiontocut=0.2):
  """``scipy.stats.trim_mean(x, proportiontocut, axis=0)``: cut int(p * K) values at each end."""
  if not 0 <= proportiontocut < 0.5:
    raise ValueError(f"proportiontocut must be in [0, 0.5); got {proportiontocut}")
  k = x.shape[0]
  cut = int(proportiontocut * k)
  return jnp.sort(x, axis=0)[cut:k - cut].mean(0)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _dominance(ratio_x, ratio_z, gamma, chunk=256):
  """Fraction over z of [ratio_x / ratio_z > gamma], pairwise as the reference (chunked over x)."""
  beats = lambda r: jnp.mean(r / ratio_z > gamma, dtype=ratio_x.dtype)
  return jax.lax.map(beats, ratio_x, batch_size=chunk)


def _inputs(target_x, target_z, shadow_x, shadow_z):
  target_x = _checks.signal(target_x, "target_x", 1)
  target_z = _checks.signal(target_z, "target_z", 1)
  shadow_x = _checks.shadows(shadow_x, target_x.shape[0], "shadow_x")
  shadow_z = _checks.shadows(shadow_z, target_z.shape[0], "shadow_z")
  if shadow_x.shape[0] != shadow_z.shape[0]:
    raise ValueError(f"shadow_x has K = {shadow_x.shape[0]} models, shadow_z {shadow_z.shape[0]}")
  return target_x, target_z, shadow_x, shadow_z


def rmia_offline(target_x, target_z, shadow_x, shadow_z, a, gamma=2.0, proportiontocut=0.2):
  """RMIA-Off (iam-spec 4.1 offline; Zarifzadeh et al. eq. with the offline scaling ``a``).

  Pr(x) = ((1 + a) / 2) * trim_mean_k(shadow_x) + (1 - a) / 2, likewise Pr(z);
  score(x) = mean over z of [(target_x / Pr(x)) / (target_z / Pr(z)) > gamma].
  The reference's a: 0.33 (CIFAR-10, CINIC-10), 0.6 (CIFAR-100), 0.2 (Purchase, Texas,
  Location); gamma 2; proportiontocut 0.2.

  Args:
    target_x [N], target_z [Z]: the audited model's signal on the samples and the population.
    shadow_x [K, N], shadow_z [K, Z]: the K OUT shadow models' signals on the same.
  Returns: [N] membership scores in [0, 1]; IAM's p_RMIA = 1 - score.
  As the reference, divisions by zero follow IEEE rules (x/0 = +-inf, 0/0 = NaN compares False).
  """
  target_x, target_z, shadow_x, shadow_z = _inputs(target_x, target_z, shadow_x, shadow_z)
  if not 0 <= a <= 1:
    raise ValueError(f"offline scaling a must be in [0, 1]; got {a}")
  pr = lambda s: (1 + a) / 2 * trim_mean(s, proportiontocut) + (1 - a) / 2
  return _dominance(target_x / pr(shadow_x), target_z / pr(shadow_z), gamma)


def rmia_online(target_x, target_z, shadow_x, shadow_z, in_x, in_z, gamma=2.0,
                proportiontocut=0.2):
  """RMIA-On (iam-spec 4.1 online): reference models = K OUT shadows plus IN models.

  Pr(x) = trim_mean over the reference rows [shadow_x; in_x], likewise Pr(z) (no ``a``);
  score as in `rmia_offline`. The IAM code's IN row for x is the *original* model's signal and
  for z a "ref_in" model trained on the population; it repeats that single row K times. Pass
  ``in_x`` [N] and ``in_z`` [Z] for exactly that, or [K_in, N] and [K_in, Z] for real IN models.

  Returns: [N] membership scores in [0, 1]; IAM's p_RMIA_online = 1 - score.
  """
  target_x, target_z, shadow_x, shadow_z = _inputs(target_x, target_z, shadow_x, shadow_z)
  k = shadow_x.shape[0]
  in_x, in_z = jnp.asarray(in_x), jnp.asarray(in_z)
  if in_x.ndim == 1 and in_z.ndim == 1:  # the reference: one IN row repeated K times
    in_x, in_z = (jnp.broadcast_to(r, (k,) + r.shape) for r in (in_x, in_z))
  in_x = _checks.shadows(in_x, target_x.shape[0], "in_x")
  in_z = _checks.shadows(in_z, target_z.shape[0], "in_z")
  if in_x.shape[0] != in_z.shape[0]:
    raise ValueError(f"in_x has {in_x.shape[0]} IN models, in_z {in_z.shape[0]}")
  ref_x, ref_z = jnp.concatenate([shadow_x, in_x]), jnp.concatenate([shadow_z, in_z])
  return _dominance(target_x / trim_mean(ref_x, proportiontocut),
                    target_z / trim_mean(ref_z, proportiontocut), gamma)
