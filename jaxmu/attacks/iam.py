"""IAM: Interpolated Approximate Measurement of sample-level unlearning (iam-spec 3, 9.2, 9.3).

`iam_score` turns per-sample signals (the vision IAM uses ``signals.normalized_gumbel`` of the
true-class probability) of the audited model, a fitting reference and K shadow OUT models into an
unlearning score per sample (high = unlearned). `bin_ui`, `score_ui` and `class_level_metrics`
evaluate such scores against ground truth; `iam_off_constant` is IAM-Off's fitting reference.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from jax.scipy.special import betainc
from sklearn.metrics import roc_auc_score

from jaxmu.attacks import _checks, metrics

DISTS = ("gumbel", "norm", "ecdf", "kde", "beta")
SCALE_FLOOR = 1e-10  # replaces zero sigma / bandwidth (the reference divides by them)
EULER_GAMMA = 0.5772  # the reference's truncated Euler-Mascheroni constant
_CHUNK_ELEMENTS = 2**20  # per-chunk intermediate size (floats) of the sample loop


def iam_score(target, fit, shadows, num_interp=100, dist="gumbel", fix_variance=True,
              chunk_size=None):
  """IAM unlearning score per sample, exactly iam-spec 3.2/3.3 (``interpolate_appro``).

  Args:
    target: [N] signal of the audited (unlearned) model on the N query samples.
    fit: the fitting reference: [N] signal of the original model (IAM-On) or a scalar
      (IAM-Off, see `iam_off_constant`).
    shadows: [K, N] signals of K >= 1 shadow OUT models on the same samples.
    num_interp: A >= 2 interpolation steps alpha_a = a / (A - 1); the alpha = 1 step is dropped.
    dist: reference distribution fitted at each step: "gumbel" (method of moments with the
      reference's gamma = 0.5772), "norm", "ecdf", "kde" (Gaussian kernel, bandwidth sigma) or
      "beta" (method of moments).
    fix_variance: True pools sigma over all K shadows and all N samples (ddof 0), the reference
      default; this makes the score depend on the query batch (iam-spec 3.3). False uses the
      per-sample std over shadows. K = 1 forces True, as in the reference.
    chunk_size: samples per step of the loop over samples (default: about 2**20 intermediate
      values per step), so memory is O(K N + chunk K A), never O(K A N).

  Returns:
    [N] scores 1 - sum_a alpha_{a+1} F[a] / sum_a alpha_{a+1} (the reference's off-by-one
    weights), clipped to [0, 1] against rounding.

  Inputs are validated eagerly (shapes, K >= 1, no NaN), so call it outside ``jax.jit``; the
  computation itself is one jitted program per dist, A and shape.

  Deviations: a zero sigma or kde bandwidth is floored at 1e-10 (the reference divides by zero for
  gumbel/kde with pooled variance and adds 1e-30 for norm); beta's zero variance is likewise floored
  at 1e-10 rather than replaced only when exactly 0. The pooled sigma is computed from the centred
  second moments of shadows and fit (the interpolation is linear in alpha) instead of materialising
  the [K, A, N] array; equal up to rounding.
  """
  target = _checks.signal(target, "target", 1)
  shadows = _checks.shadows(shadows, target.shape[0])
  fit = _checks.signal(fit, "fit", np.ndim(fit))
  if fit.shape not in ((), target.shape):
    raise ValueError(f"fit must be a scalar (IAM-Off) or shape {target.shape} (IAM-On); got {fit.shape}")
  if dist not in DISTS:
    raise ValueError(f"unknown dist {dist!r}; choose one of {DISTS}")
  if not isinstance(num_interp, int) or num_interp < 2:
    raise ValueError(f"num_interp must be an integer >= 2; got {num_interp!r}")
  k = shadows.shape[0]
  if chunk_size is None:
    per_sample = (num_interp - 1) * (k if dist in ("ecdf", "kde") else 1)
    chunk_size = max(1, _CHUNK_ELEMENTS // per_sample)
  # IAM-Off's constant is broadcast (it adds no spread to sigma); fix_variance is traced: On, Off
  # and both variance modes share one compiled program per dist and shape.
  return _iam_score(target, jnp.broadcast_to(fit, target.shape), shadows,
                    jnp.asarray(bool(fix_variance) or k == 1), num_interp=num_interp, dist=dist,
                    chunk_size=min(chunk_size, target.shape[0]))


def _pooled_sigma(fit, shadows, alphas):
  """std over (k, j) of I[k, a, j] = (1 - alpha_a) shadows[k, j] + alpha_a fit[j], per a."""
  xc, yc = shadows - shadows.mean(), fit - fit.mean()
  s_xx, s_yy, s_xy = jnp.mean(xc**2), jnp.mean(yc**2), jnp.mean(xc.mean(0) * yc)
  b = 1.0 - alphas
  return jnp.sqrt(jnp.maximum(b * b * s_xx + alphas**2 * s_yy + 2 * alphas * b * s_xy, 0.0))


def _phi(x):
  return 0.5 * jax.lax.erfc(-x / math.sqrt(2.0))


@functools.partial(jax.jit, static_argnames=("num_interp", "dist", "chunk_size"))
def _iam_score(target, fit, shadows, fix_variance, *, num_interp, dist, chunk_size):
  dtype = jnp.result_type(float, target, fit, shadows)
  target, fit, shadows = target.astype(dtype), fit.astype(dtype), shadows.astype(dtype)
  all_alphas = jnp.linspace(0.0, 1.0, num_interp, dtype=dtype)
  alphas, weights = all_alphas[:-1], all_alphas[1:]
  pooled = _pooled_sigma(fit, shadows, alphas)

  def one_sample(x):
    s, y, sh = x  # scalars s, y (target and fit), sh: [K]
    mean_sh = sh.mean()
    mu = mean_sh + alphas * (y - mean_sh)  # = mean_k I[k, a]
    sigma = jnp.where(fix_variance, pooled, (1.0 - alphas) * jnp.sqrt(jnp.mean((sh - mean_sh) ** 2)))
    scale = jnp.maximum(sigma, SCALE_FLOOR)
    if dist == "gumbel":
      beta = math.sqrt(6.0) * scale / math.pi
      f = jnp.exp(-jnp.exp(-(s - mu + EULER_GAMMA * beta) / beta))
    elif dist == "norm":
      f = _phi((s - mu) / scale)
    elif dist == "beta":
      m = jnp.clip(mu, 1e-10, 1 - 1e-10)
      t = jnp.maximum(m * (1 - m) / jnp.maximum(sigma**2, 1e-10) - 1, 1e-10)
      f = betainc(jnp.maximum(m * t, 1e-10), jnp.maximum((1 - m) * t, 1e-10), jnp.clip(s, 0.0, 1.0))
    else:
      interp = sh[:, None] + alphas[None, :] * (y - sh[:, None])  # [K, A-1]
      if dist == "ecdf":
        f = jnp.mean(interp <= s, axis=0, dtype=dtype)
      else:  # kde
        f = jnp.mean(_phi((s - interp) / scale), axis=0)
    return jnp.clip(1.0 - jnp.dot(weights, f) / weights.sum(), 0.0, 1.0)

  # Loop over zero-padded chunks of samples, each chunk vectorised.
  n = target.shape[0]
  num_chunks = -(-n // chunk_size)
  xs = (target, fit, shadows.T)
  xs = tuple(jnp.pad(x, [(0, num_chunks * chunk_size - n)] + [(0, 0)] * (x.ndim - 1))
             .reshape(num_chunks, chunk_size, *x.shape[1:]) for x in xs)
  return jax.lax.map(jax.vmap(one_sample), xs).reshape(-1)[:n]


def iam_off_constant(shadow_train_signals: Sequence) -> jax.Array:
  """IAM-Off's fitting constant c (iam-spec 3.1): the mean over shadows of each shadow's mean
  signal on its *own* training samples (one 1-D array per shadow, lengths may differ)."""
  if len(shadow_train_signals) == 0:
    raise ValueError("need the training-set signals of at least one shadow model")
  means = []
  for k, s in enumerate(shadow_train_signals):
    means.append(_checks.signal(s, f"shadow {k}'s training signals", 1).mean())
  return jnp.mean(jnp.stack(means))


def bin_ui(unlearn_scores, forgotten, **roc_kwargs):
  """BinUI (iam-spec 3.4, 9.1): ROC metrics of telling retained from forgotten samples.

  As the reference's ``auc_extended(1 - flags, 1 - score)``: positives are *retained* samples
  (``forgotten == 0``), scored by membership 1 - unlearn_score. ``roc_kwargs`` go to
  `metrics.roc_metrics`. Also returns the mean and std (ddof 0) of the unlearning score over
  forgotten and retained samples, as the reference logs.
  """
  scores, forgotten = np.asarray(unlearn_scores, np.float64), np.asarray(forgotten)
  out = metrics.roc_metrics(1 - forgotten, 1.0 - scores, **roc_kwargs)
  for name, mask in (("forgotten", forgotten == 1), ("retained", forgotten == 0)):
    out[f"score_{name}_mean"] = float(scores[mask].mean())
    out[f"score_{name}_std"] = float(scores[mask].std())
  return out


def score_ui(unlearn_scores, degree):
  """ScoreUI (iam-spec 7.5, 9.2): agreement of membership with a ground-truth degree.

  Membership 1 - unlearn_score is min-max normalised over the whole array (all samples and
  checkpoints of one run), then compared with ``degree`` (broadcast to the scores' shape, e.g.
  b / 20 per checkpoint column), as ``new_records_internal.py`` does.

  Args:
    unlearn_scores: [N] or [N, B + 1] (samples x checkpoints) unlearning scores.
    degree: ground-truth membership degree, broadcastable to the scores' shape.

  Returns:
    dict with, over all flattened pairs, ``spearman`` (the headline), ``pearson``, ``mse`` and
    ``kl``: the reference's ``kl_div_score(degree, member)`` of iam-spec 7.5, sum_i p_i log((p_i +
    1e-10) / (q_i + 1e-10)) of the 20-bin density histograms p of the degree and q of the
    membership on the degree's bins (no bin-width factor, as written there); and
    ``mse_per_column``, a list with the MSE of each checkpoint column (for 1-D scores, [mse]).
  """
  scores = np.asarray(unlearn_scores, np.float64)
  if scores.ndim not in (1, 2):
    raise ValueError(f"unlearn_scores must be [N] or [N, B + 1]; got shape {scores.shape}")
  try:
    degree = np.broadcast_to(np.asarray(degree, np.float64), scores.shape)
  except ValueError:
    raise ValueError(f"degree of shape {np.shape(degree)} does not broadcast to scores "
                     f"{scores.shape}") from None
  if not (np.isfinite(scores).all() and np.isfinite(degree).all()):
    raise ValueError("unlearn_scores or degree contain NaN or infinite values")
  member = 1.0 - scores
  span = member.max() - member.min()
  if span == 0 or np.ptp(degree) == 0:
    raise ValueError("ScoreUI needs non-constant scores and degrees")
  member = (member - member.min()) / span
  mse = float(np.mean((member - degree) ** 2))
  per_column = np.mean((member - degree) ** 2, axis=0).tolist() if scores.ndim == 2 else [mse]
  member, deg = member.ravel(), degree.ravel()
  hist_true, bins = np.histogram(deg, bins=20, density=True)
  hist_pred, _ = np.histogram(member, bins=bins, density=True)
  eps = 1e-10
  return {
      "spearman": float(scipy.stats.spearmanr(member, deg).statistic),
      "pearson": float(scipy.stats.pearsonr(member, deg).statistic),
      "mse": mse,
      "kl": float(np.sum(hist_true * np.log((hist_true + eps) / (hist_pred + eps)))),
      "mse_per_column": per_column,
  }


def _bce(s, b):
  """torch ``F.binary_cross_entropy(s, b, weight=w)``, mean reduction, w = #neg / #pos on b = 1."""
  w = np.where(b == 1, np.sum(b == 0) / np.sum(b == 1), 1.0)
  with np.errstate(divide="ignore"):  # log(0) = -inf, clamped to -100 as torch does
    log_s, log_1ms = np.maximum(np.log(s), -100.0), np.maximum(np.log(1.0 - s), -100.0)
  return float(np.mean(-w * (b * log_s + (1 - b) * log_1ms)))


def _group_stats(s, b):
  """iam-spec 9.3 statistics of one run (or all runs flattened); s, b are 1-D."""
  out = {"auc": float(roc_auc_score(b, s)), "bce": _bce(s, b)}
  for flag in (1, 0):
    x = np.sort(s[b == flag])
    k = max(int(0.1 * x.size), 1)
    last = x[:k] if flag == 1 else x[-k:]  # the lowest retained / highest forgotten memberships
    out.update({f"mean_{flag}": float(x.mean()), f"std_{flag}": float(x.std()),
                f"max_{flag}": float(x[-1]), f"min_{flag}": float(x[0]),
                f"last_{flag}": float(last.mean())})
  return out


def class_level_metrics(unlearn_scores, forgotten):
  """Class-level read-out of approximate unlearning (iam-spec 9.3, Table 8).

  As ``new_records_method_class.py``: membership s = 1 - unlearn_score, b = 1 - forgotten
  (b = 1: retained), evaluated per run (e.g. one per forgotten class) and over all runs flattened.

  Args:
    unlearn_scores: [R, N] unlearning scores in [0, 1] of R runs on N query samples each.
    forgotten: [R, N] flags, 1 or True = forgotten; every run needs retained and forgotten samples.

  Returns:
    {"runs": [dict per run], "overall": dict}, all values floats: ``auc`` (ROC AUC of b against
    s); ``bce``, torch's ``binary_cross_entropy(s, b, weight=w)`` with mean reduction, w = #(b = 0)
    / #(b = 1) on b = 1 samples and 1 on b = 0, each log clamped at >= -100 as torch does;
    ``mean_1``, ``std_1`` (ddof 0), ``max_1``, ``min_1`` of s over b = 1 and ``last_1``, the mean
    of its k = int(0.1 count) lowest values; likewise ``*_0`` over b = 0, ``last_0`` the mean of
    the k highest. ``overall`` adds ``b_std``, the std (ddof 0) over runs of the per-run bce, and
    ``c_std1`` / ``c_std0``, those of the per-run mean_1 / mean_0.

  Deviations: float64 throughout (the reference ran float32 torch / numpy); ``last`` takes k = 1
  where int(0.1 count) = 0 (under 10 samples), where the reference would take an empty mean (NaN)
  or the whole set.
  """
  scores, forgotten = np.asarray(unlearn_scores, np.float64), np.asarray(forgotten)
  if scores.ndim != 2 or scores.shape != forgotten.shape:
    raise ValueError(f"unlearn_scores and forgotten must both be [R, N]; got shapes {scores.shape} "
                     f"and {forgotten.shape}")
  if scores.size == 0:
    raise ValueError(f"need at least one run and one sample; got shape {scores.shape}")
  if not np.isin(forgotten, (0, 1)).all():
    raise ValueError(f"forgotten must be binary 0/1 or bool; got values "
                     f"{np.unique(forgotten)[:10]}")
  if not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
    raise ValueError("unlearn_scores must be finite and in [0, 1] (the BCE needs probabilities)")
  s, b = 1.0 - scores, 1 - forgotten.astype(np.int64)
  for r, row in enumerate(b):
    if row.min() == row.max():
      kind = "forgotten" if row[0] == 1 else "retained"
      raise ValueError(f"run {r} has no {kind} sample; every run needs both")
  runs = [_group_stats(s_r, b_r) for s_r, b_r in zip(s, b)]
  overall = _group_stats(s.ravel(), b.ravel())
  overall["b_std"] = float(np.std([run["bce"] for run in runs]))
  overall["c_std1"] = float(np.std([run["mean_1"] for run in runs]))
  overall["c_std0"] = float(np.std([run["mean_0"] for run in runs]))
  return {"runs": runs, "overall": overall}
