"""Likelihood-ratio attacks: Carlini's LiRA, the IAM code's LiRA, and U-LiRA.

Shapes: a target model's per-sample signal is ``[N]``; K shadow models give ``[K, N]``; an
``in_mask`` ``[K, N]`` is True where shadow k trained on sample n. Signals are usually the scaled
logit ``signals.scaled_logit``.

Orientation: ``carlini_*`` and ``ulira`` return **membership** scores (higher = more likely a
member), as ``metrics.roc_metrics`` expects. ``iam_reference_*`` return the IAM code's own
**unlearning** scores (higher = unlearned), like ``iam.iam_score``, for ``iam.bin_ui``.

Zero standard deviations (K = 1, ties, a single IN shadow) are floored at
``iam.SCALE_FLOOR`` = 1e-10 where the references add 1e-30 to the scale: in float32 a 1e-30 scale
overflows the Gaussian exponent to inf and the log-ratio to NaN, while 1e-10 keeps every score
finite for signals below ~1e9 in magnitude and equals the reference wherever the std is not 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr
from jax.scipy.stats import norm

from jaxmu.attacks import _checks, metrics
from jaxmu.attacks.iam import SCALE_FLOOR


def _scale(std):
  return jnp.maximum(std, SCALE_FLOOR)


def _inputs(target, shadows, in_mask=None):
  target = _checks.signal(target, "target", 1)
  shadows = _checks.shadows(shadows, target.shape[0])
  if in_mask is None:
    return target, shadows, jnp.zeros(shadows.shape, bool)
  return target, shadows, _checks.mask(in_mask, shadows.shape, "in_mask")


@functools.partial(jax.jit, static_argnames=("average", "fix_variance"))
def _fit(shadows, keep, average, fix_variance):
  """Per-sample centre and std of ``shadows[keep]`` as tensorflow/privacy ``compute_score_lira``.

  Centre: nanmedian or nanmean over the kept models; std: nanstd (ddof 0) over them, or with
  ``fix_variance`` the std of all kept deviations from their centres pooled over models and
  samples, or with ``fix_variance="global"`` the std of all kept values themselves (Carlini's
  ``np.std(dat_in)``). A sample with no kept model takes the mean centre (and std) of the others.
  """
  x = jnp.where(keep, shadows, jnp.nan)
  centre = (jnp.nanmedian if average == "median" else jnp.nanmean)(x, axis=0)
  centre = jnp.where(jnp.isnan(centre), jnp.nanmean(centre), centre)
  if fix_variance == "global":
    return centre, jnp.full_like(centre, jnp.nanstd(x))
  if fix_variance:
    return centre, jnp.full_like(centre, jnp.nanstd(x - centre))
  std = jnp.nanstd(x, axis=0)
  return centre, jnp.where(jnp.isnan(std), jnp.nanmean(std), std)


def _check_options(average, fix_variance, groups):
  if average not in ("median", "mean"):
    raise ValueError(f"average must be 'median' or 'mean'; got {average!r}")
  if fix_variance not in (False, True, "global"):
    raise ValueError(f"fix_variance must be False, True or 'global'; got {fix_variance!r}")
  for name, keep in groups.items():
    if not bool(jnp.any(keep)):
      raise ValueError(f"no {name} shadow observation at all: check in_mask")


def carlini_lira_online(target, shadows, in_mask, fix_variance=False, average="median"):
  """Online LiRA (Carlini et al. 2022): log N(t; mu_in, s_in) - log N(t; mu_out, s_out) per sample.

  Follows tensorflow/privacy ``advanced_mia.compute_score_lira(option='both')`` with one query per
  sample: IN statistics from the shadows with ``in_mask`` True, OUT from the others; ``average``
  is its ``median_or_mean``; ``fix_variance=True`` its pooled std. tensorflow/privacy returns
  log p_out - log p_in (members small); this is its negation (members large).

  ``fix_variance="global"`` is Carlini's own ``generate_ours(fix_variance=True)``
  (``mi_lira_2021/plot.py``): one std of all IN values over models and samples, and one of all
  OUT values. It stays informative with a single IN observation per sample, where the per-sample
  and the pooled IN stds are 0. Deviation: Carlini's code reuses the IN std for the OUT Gaussian
  (``std_out = np.std(dat_in)``), which with equal scales ranks like the zero-variance IAM LiRA-On
  at K = 1; here each group has its own.

  Args:
    target: [N] signal of the model under attack.
    shadows: [K, N] signals of the shadow models.
    in_mask: [K, N] bool, True where shadow k trained on sample n.
  Returns: [N] membership scores.
  Deviation: zero stds are floored at 1e-10 instead of adding 1e-30 (module docstring).
  """
  target, shadows, in_mask = _inputs(target, shadows, in_mask)
  _check_options(average, fix_variance, {"IN": in_mask, "OUT": ~in_mask})
  mu_in, s_in = _fit(shadows, in_mask, average, fix_variance)
  mu_out, s_out = _fit(shadows, ~in_mask, average, fix_variance)
  return norm.logpdf(target, mu_in, _scale(s_in)) - norm.logpdf(target, mu_out, _scale(s_out))


def carlini_lira_offline(target, shadows, in_mask=None, fix_variance=False, average="median",
                         one_sided=False):
  """Offline LiRA (Carlini et al. 2022): the OUT Gaussian only.

  Two-sided (default, tensorflow/privacy ``compute_score_lira(option='out')``): -log N(t; mu_out,
  s_out), the negation of tensorflow/privacy's log p_out. One-sided (the paper's Algorithm 1,
  Lambda = 1 - Pr[Z > t], Z ~ N(mu_out, s_out^2)): returned as -log Pr[Z > t], a monotone
  transform of Lambda that keeps its resolution where Lambda rounds to 1 (members).

  ``fix_variance``: as `carlini_lira_online` ("global": the std of all OUT values).

  Args:
    target: [N]; shadows: [K, N]; in_mask: [K, N] or None (every shadow is OUT for every sample).
  Returns: [N] membership scores.
  Deviation: zero stds floored at 1e-10; one-sided returned as -log(1 - Lambda).
  """
  target, shadows, in_mask = _inputs(target, shadows, in_mask)
  _check_options(average, fix_variance, {"OUT": ~in_mask})
  mu, s = _fit(shadows, ~in_mask, average, fix_variance)
  if one_sided:
    z = (target - mu) / _scale(s)  # -log Pr[Z > t], accurate in both tails
    return jnp.where(z < 0, -jnp.log1p(-ndtr(z)), -log_ndtr(-z))
  return -norm.logpdf(target, mu, _scale(s))


def _out_gaussian(target, shadows):
  """Mean and scale of the OUT Gaussian as the IAM code fits it: numpy mean/std (ddof 0) over K."""
  target, shadows, _ = _inputs(target, shadows)
  return target, shadows.mean(0), _scale(shadows.std(0))


def iam_reference_lira_offline(target, shadows, one_sided=False):
  """LiRA-Off exactly as the IAM code computes it (iam-spec 4 ``p_LiRA``): an unlearning score.

  set_random (default): log N(phi_unl; mu_out, sigma_out + 1e-30), the OUT log-likelihood.
  Class unlearning types (``one_sided=True``): -Phi((phi_unl - mu_out) / (sigma_out + 1e-30)).
  mu_out, sigma_out: mean and population std over the K shadows (all OUT). With K = 1,
  sigma_out = 0 (reference quirk, iam-spec 12.6). High = unlearned, like ``iam.iam_score``: feed
  it to ``iam.bin_ui``.

  Args: target [N] (the unlearned model's signal), shadows [K, N] (OUT shadow models).
  Deviation: the zero std is floored at 1e-10 instead of adding 1e-30 (module docstring).
  """
  target, mu, s = _out_gaussian(target, shadows)
  if one_sided:
    return -norm.cdf((target - mu) / s)
  return norm.logpdf(target, mu, s)


def iam_reference_lira_online(target, original, shadows):
  """LiRA-On exactly as the IAM code computes it (iam-spec 4 ``p_LiRA_Online``): unlearning score.

  [-log N(phi_unl; phi_ori, 0 + 1e-30)] - [-log N(phi_unl; mu_out, sigma_out + 1e-30)]: the IN
  Gaussian sits at the original model's signal with zero variance, so for K >= 2 the IN term
  dominates and the ranking is essentially by |phi_unl - phi_ori|, independent of the shadows
  (iam-spec 12.6). High = unlearned.

  Args: target [N] (unlearned model), original [N] (original model), shadows [K, N] (OUT).
  Deviation: the IN scale is 1e-10 instead of 1e-30, and a zero sigma_out is floored likewise;
  rankings agree unless |phi_unl - phi_ori| < ~1e-8.
  """
  target, mu, s = _out_gaussian(target, shadows)
  original = _checks.signal(original, "original", 1)
  if original.shape != target.shape:
    raise ValueError(f"original has shape {original.shape}; target has {target.shape}")
  return norm.logpdf(target, mu, s) - norm.logpdf(target, original, SCALE_FLOOR)


class ULiraResult(NamedTuple):
  """U-LiRA output. P = probability that an observation comes from an unlearned model.

  prob_unlearned: [M, N] P for each observation (m, n) with ``forgot[m, n]``; 0.5 elsewhere or
    where sample n is not scored.
  prob_retrained: [R, N] P for each observation with ``never[r, n]``; 0.5 elsewhere likewise.
  samples: [S] indices of the scored samples (enough observations in both groups).
  member_prob: [S] mean P over the sample's unlearned observations (0.5 = as good as retraining).
  accuracy: [S] per-sample balanced accuracy: mean of the hit rates on its unlearned (P > 0.5)
    and its retrained (P <= 0.5) observations, i.e. each sample weighs its two halves equally.
  balanced_accuracy: mean of ``accuracy`` over the scored samples.
  ci95: 95% BCa bootstrap interval of ``balanced_accuracy`` over samples
    (`metrics.mean_interval`: scipy.stats.bootstrap, seeded); NaN for one scored sample.
  """
  prob_unlearned: jax.Array
  prob_retrained: jax.Array
  samples: np.ndarray
  member_prob: np.ndarray
  accuracy: np.ndarray
  balanced_accuracy: float
  ci95: tuple[float, float]


def _group_stats(x, keep, leave_one_out, fix_variance):
  """Gaussian fit of one group: (mean [N], var [N]) and, per observation, the fit without it.

  Returns (mean, var, mean_loo, var_loo) with the *_loo arrays of shape [K, N]: the mean and
  (population) variance of sample n's kept observations after removing observation (k, n), by
  exact downdating of the centred sum of squares. With ``fix_variance`` the variance is pooled:
  the sum of squared deviations from each sample's own mean over all samples, divided by the
  total count (again downdated per observation).
  """
  w = keep.astype(x.dtype)
  count = w.sum(0)
  mean = (w * x).sum(0) / jnp.maximum(count, 1)
  dev = w * (x - mean)
  ss = (dev**2).sum(0)
  if fix_variance:
    var = jnp.full_like(mean, ss.sum() / count.sum())
  else:
    var = ss / jnp.maximum(count, 1)
  if not leave_one_out:
    return mean, var, mean, var
  c1 = jnp.maximum(count - 1, 1)
  drop = dev**2 * count / c1
  if fix_variance:
    var_loo = jnp.maximum(ss.sum() - drop, 0) / (count.sum() - 1)
  else:
    var_loo = jnp.maximum(ss - drop, 0) / c1
  return mean, var, mean - dev / c1, var_loo


@functools.partial(jax.jit, static_argnames=("leave_one_out", "fix_variance"))
def _ulira_probs(unlearned, forgot, retrained, never, leave_one_out, fix_variance):
  mu_u, var_u, mu_u_loo, var_u_loo = _group_stats(unlearned, forgot, leave_one_out, fix_variance)
  mu_r, var_r, mu_r_loo, var_r_loo = _group_stats(retrained, never, leave_one_out, fix_variance)

  def prob(x, mu_u, var_u, mu_r, var_r):
    lp_u = norm.logpdf(x, mu_u, _scale(jnp.sqrt(var_u)))
    lp_r = norm.logpdf(x, mu_r, _scale(jnp.sqrt(var_r)))
    return jax.nn.sigmoid(lp_u - lp_r)

  p_u = prob(unlearned, mu_u_loo, var_u_loo, mu_r, var_r)
  p_r = prob(retrained, mu_u, var_u, mu_r_loo, var_r_loo)
  return p_u, p_r


def ulira(unlearned, forgot, retrained, never, fix_variance=False, reference=False):
  """U-LiRA (Hayes et al. 2024): does an unlearned model look like one retrained without x?

  For each sample n, two Gaussians of the signal (use ``signals.scaled_logit``): U from the
  unlearned models that forgot n and R from the retrained models that never saw n. Each
  observation o is scored P(unlearned | o) = N(o; U) / (N(o; U) + N(o; R)), computed as
  sigmoid(log N(o; U) - log N(o; R)) so it never divides 0 by 0; the Gaussians are fitted
  **leave-one-model-out** (the model that produced o is never in its own fit). Scoring both groups
  and weighing each sample's two halves equally gives the balanced-pairs accuracy.

  ``reference=True`` is DeepUnlearn's variant (deepunlearn-spec 7.4, item 33): pass 0/1
  correctness ``argmax(logits) == y`` as the signal, and the *same* method's models for both
  groups (``retrained`` = ``unlearned`` with ``never`` = the OUT mask); the Gaussians are fitted
  on all observations including the scored one (no leave-one-out), mean and ``np.std`` (ddof 0).
  On 0/1 data sigma is often exactly 0 and the reference's ``scipy.stats.norm.pdf(z, mu, 0)``
  returns NaN. Here a zero sigma is floored at 1e-10, which realises the limit of a point
  mass: P = 1 if o sits on U's point mass only (or R is a point mass elsewhere), 0 if on R's only
  (or U is a point mass elsewhere), 0.5 if U and R are point masses at the same value, and the
  ordinary density ratio otherwise. NaN never appears.

  Args:
    unlearned: [M, N] signals of M unlearned models.
    forgot: [M, N] bool, True where unlearned model m forgot sample n.
    retrained: [R, N] signals of R retrained models.
    never: [R, N] bool, True where retrained model r never trained on sample n.
    fix_variance: pool each group's variance over samples instead of per sample.
  A sample is scored when each group has at least 2 observations (1 with ``reference``).
  """
  unlearned = _checks.signal(unlearned, "unlearned", 2)
  retrained = _checks.signal(retrained, "retrained", 2)
  if unlearned.shape[1] != retrained.shape[1]:
    raise ValueError(f"unlearned {unlearned.shape} and retrained {retrained.shape} differ in N")
  forgot = _checks.mask(forgot, unlearned.shape, "forgot")
  never = _checks.mask(never, retrained.shape, "never")
  if reference and not bool(jnp.all((unlearned == 0) | (unlearned == 1))
                            & jnp.all((retrained == 0) | (retrained == 1))):
    raise ValueError("reference=True expects 0/1 correctness signals")
  p_u, p_r = _ulira_probs(unlearned, forgot, retrained, never, not reference, fix_variance)
  need = 1 if reference else 2
  scored = (forgot.sum(0) >= need) & (never.sum(0) >= need)
  if not bool(scored.any()):
    raise ValueError(f"no sample has >= {need} unlearned and >= {need} retrained observations")
  p_u = jnp.where(forgot & scored, p_u, 0.5)
  p_r = jnp.where(never & scored, p_r, 0.5)
  samples = np.flatnonzero(np.asarray(scored))
  pu, pr = np.asarray(p_u)[:, samples], np.asarray(p_r)[:, samples]
  fu, nr = np.asarray(forgot)[:, samples], np.asarray(never)[:, samples]
  member_prob = (pu * fu).sum(0) / fu.sum(0)
  accuracy = 0.5 * (((pu > 0.5) & fu).sum(0) / fu.sum(0) + ((pr <= 0.5) & nr).sum(0) / nr.sum(0))
  return ULiraResult(p_u, p_r, samples, member_prob, accuracy, float(accuracy.mean()),
                     metrics.mean_interval(accuracy))
