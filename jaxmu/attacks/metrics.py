"""ROC metrics of membership scores (iam-spec 9.1) and DeepUnlearn's benchmark metrics
(deepunlearn-spec 6.1, 6.3-6.7)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from sklearn.metrics import auc, roc_curve

LEVELS = (1e-5, 1e-4, 1e-3, 1e-2, 0.1)


def _binary_labels_and_scores(labels, scores):
  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  if labels.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(f"labels and scores must be 1-D of equal length; got {labels.shape} and {scores.shape}")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels must be binary 0/1 (1 = member); got values {np.unique(labels)[:10]}")
  if labels.min() == labels.max():
    raise ValueError("labels hold only one class; ROC metrics need members and non-members")
  if not np.isfinite(scores).all():
    raise ValueError("scores contain NaN or infinite values")
  return labels.astype(np.int64), scores


def _operating_points(fpr, tpr, levels):
  """TPR at FPR and TNR at FNR by linear interpolation along the ROC curve (``np.interp``)."""
  tpr_at = np.interp(levels, fpr, tpr)
  tnr_at = np.interp(levels, (1 - tpr)[::-1], (1 - fpr)[::-1])
  return tpr_at, tnr_at


def roc_metrics(labels, scores, levels=LEVELS, num_bootstrap=200, confidence=0.95, seed=0):
  """ROC metrics of a membership score, as iam-spec 9.1 ``auc_extended`` plus bootstrap CIs.

  Args:
    labels: [n] 1 = member (for BinUI: a retained sample), 0 = non-member; both must occur.
    scores: [n] higher = more likely a member.
    levels: the FPR (and FNR) operating points.
    num_bootstrap: stratified bootstrap resamples (``scipy.stats.bootstrap``, members and
      non-members resampled separately, so class counts stay fixed) for percentile intervals of
      AUC and TPR at FPR; 0 for none.
    confidence: the interval's coverage.
    seed: the bootstrap's numpy seed.

  Returns:
    dict with ``auc`` (``sklearn.metrics.auc`` of ``roc_curve``), ``balanced_accuracy`` (max over
    thresholds of 1 - (FPR + FNR) / 2), ``tpr_at_fpr`` and ``tnr_at_fnr`` ({level: value}, by
    ``np.interp`` on the curve), ``curve`` ({"fpr", "tpr", "thresholds"} arrays, for log-log
    plots) and, with bootstrap, ``auc_ci`` ((low, high)) and ``tpr_at_fpr_ci`` ({level: (low, high)}).

  Deviation: the reference interpolates TNR at FNR after ``np.argsort(fnr)``, whose order among
  equal FNRs (every horizontal step of the curve) is unspecified; here along the curve in order of
  increasing FNR, so TNR at FNR is exactly TPR at FPR of the mirrored task (labels and scores
  negated), as the reference computes TPR at FPR.
  """
  labels, scores = _binary_labels_and_scores(labels, scores)
  levels = np.asarray(levels, np.float64)
  fpr, tpr, thresholds = roc_curve(labels, scores)
  tpr_at, tnr_at = _operating_points(fpr, tpr, levels)
  out = {
      "auc": float(auc(fpr, tpr)),
      "balanced_accuracy": float(np.max(1 - (fpr + (1 - tpr)) / 2)),
      "tpr_at_fpr": dict(zip(levels.tolist(), tpr_at.tolist())),
      "tnr_at_fnr": dict(zip(levels.tolist(), tnr_at.tolist())),
      "curve": {"fpr": fpr, "tpr": tpr, "thresholds": thresholds},
  }
  if num_bootstrap:
    def auc_and_tprs(members, non_members):
      f, t, _ = roc_curve(np.repeat([1, 0], [members.size, non_members.size]),
                          np.concatenate([members, non_members]))
      return np.concatenate([[auc(f, t)], np.interp(levels, f, t)])

    # Two samples resampled independently (paired=False): the class counts stay fixed.
    res = stats.bootstrap((scores[labels == 1], scores[labels == 0]), auc_and_tprs,
                          n_resamples=num_bootstrap, vectorized=False, paired=False,
                          confidence_level=confidence, method="percentile",
                          rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    out["auc_ci"] = (float(low[0]), float(high[0]))
    out["tpr_at_fpr_ci"] = {lv: (float(lo), float(hi))
                            for lv, lo, hi in zip(levels.tolist(), low[1:], high[1:])}
  return out


def mean_interval(values, confidence: float = 0.95, seed: int = 0,
                  n_resamples: int = 9999) -> tuple[float, float]:
  """BCa bootstrap interval of the mean of ``values`` (independent samples, e.g. U-LiRA's
  per-sample accuracies): ``scipy.stats.bootstrap`` with ``n_resamples`` seeded resamples. NaN
  for fewer than two values (no spread to resample); the value itself when all are equal (BCa
  is undefined there, and every resample has that mean)."""
  v = np.asarray(values, np.float64).ravel()
  if v.size < 2:
    return float("nan"), float("nan")
  if np.ptp(v) == 0:
    return float(v[0]), float(v[0])
  res = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, batch=1000, vectorized=True,
                        confidence_level=confidence, method="BCa",
                        rng=np.random.default_rng(seed))
  return float(res.confidence_interval.low), float(res.confidence_interval.high)


# DeepUnlearn (deepunlearn-spec 6).


def accuracy(logits, labels):
  """Top-1 accuracy in [0, 1] (deepunlearn-spec 6.1: argmax of logits, ``accuracy_score``).

  logits [..., n, C] (e.g. a stack of models), labels [n] or [..., n]; returns shape [...].
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if logits.ndim < 2 or labels.shape[-1:] != logits.shape[-2:-1]:
    raise ValueError(f"logits [..., n, C] and labels [..., n] disagree: {logits.shape} vs {labels.shape}")
  return jnp.mean(jnp.argmax(logits, -1) == labels, axis=-1)


def split_accuracies(logits: Mapping, labels: Mapping):
  """Accuracy per split (deepunlearn-spec 6.1: Retain, Forget, Val, Test): {split: accuracy}."""
  if set(logits) != set(labels):
    raise ValueError(f"splits differ: logits {sorted(logits)} vs labels {sorted(labels)}")
  return {split: accuracy(logits[split], labels[split]) for split in logits}


def indiscernibility(mia):
  """Indisc = 1 - |2 MIA - 1| in [0, 1] (deepunlearn-spec 6.3); 1 when the MIA is at chance."""
  mia = np.asarray(mia, np.float64)
  if np.any((mia < 0) | (mia > 1)) or not np.all(np.isfinite(mia)):
    raise ValueError(f"MIA accuracy must lie in [0, 1]; got {mia}")
  return 1 - np.abs(2 * mia - 1)


def retention(new, reference):
  """Accuracy retention new / reference (deepunlearn-spec 6.4), reference = the retrained
  model's accuracy on the same split; the reference asserts 0 <= new <= 1 and 0 < reference <= 1."""
  new, reference = np.asarray(new, np.float64), np.asarray(reference, np.float64)
  if np.any((new < 0) | (new > 1)) or np.any((reference <= 0) | (reference > 1)):
    raise ValueError(f"need 0 <= new <= 1 and 0 < reference <= 1; got {new} and {reference}")
  return new / reference


def retention_deviation(accuracies: Mapping, reference: Mapping, splits=("retain", "forget", "test")):
  """RetDev = sum over splits of |retention - 1| (deepunlearn-spec 6.4; RR, FR, TR), 0 for the
  retrained model. Pass seed-mean accuracies to match the third-party tables (spec 6.4, 9.2)."""
  return sum(np.abs(retention(accuracies[s], reference[s]) - 1) for s in splits)


def run_time_efficiency(t_reference, t_method):
  """RTE = t_reference / t_method (deepunlearn-spec 6.5): retrain time over unlearning time."""
  if np.any(np.asarray(t_method) <= 0):
    raise ValueError(f"t_method must be positive; got {t_method}")
  return np.asarray(t_reference, np.float64) / np.asarray(t_method, np.float64)


def _sq_norm(tree):
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def _diff(a, b):
  if jax.tree.structure(a) != jax.tree.structure(b):
    raise ValueError("the two parameter pytrees have different structures")
  return jax.tree.map(jnp.subtract, a, b)


def model_distance(params, params0):
  """sqrt(sum ||theta - theta0||^2 / sum ||theta||^2) (deepunlearn-spec 6.6
  ``compute_model_distance``, Golatkar-style). One model per call; ``jax.vmap`` over stacks."""
  return jnp.sqrt(_sq_norm(_diff(params, params0)) / _sq_norm(params))


def l2_distance(params1, params2):
  """sqrt(sum ||theta1 - theta2||^2) over all leaves (deepunlearn-spec 6.6 ``models_l2_distance``)."""
  return jnp.sqrt(_sq_norm(_diff(params1, params2)))


def normalized_l2_distance(params1, params2):
  """|| theta1 / ||theta1|| - theta2 / ||theta2|| || over the flattened parameters
  (deepunlearn-spec 6.6 ``models_normalized_l2_distance``)."""
  n1, n2 = jnp.sqrt(_sq_norm(params1)), jnp.sqrt(_sq_norm(params2))
  return l2_distance(jax.tree.map(lambda x: x / n1, params1), jax.tree.map(lambda x: x / n2, params2))
