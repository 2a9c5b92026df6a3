"""Population membership-inference attacks: DeepUnlearn's (deepunlearn-spec 6.2) and the SVC
attack of the SalUn family of papers, with its per-sample features.

Plain NumPy and sklearn: these run once per evaluated model on a few thousand samples.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score
from sklearn.svm import SVC

FEATURES = ("loss", "correctness", "confidence", "entropy", "m_entropy")
_LOG_FLOOR = 1e-30  # the SalUn code replaces log(0) by log(1e-30)


def _features(x, name):
  x = np.asarray(x, np.float64)
  if x.ndim not in (1, 2) or len(x) == 0:
    raise ValueError(f"{name} must be a non-empty [n] or [n, F] array; got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or infinite values")
  return x.reshape(len(x), -1)


def population_mia(forget, other, random_state=123, n_splits=10, test_size=0.1, cv_seed=123):
  """DeepUnlearn's MIA (``evaluate_mia_on_pointwise_losses``): mean held-out accuracy.

  ``forget`` and ``other`` (val or test) are per-sample features, in the reference the
  cross-entropy of the evaluated model ([n] arrays; [n, F] feature arrays also work). As the
  reference: shuffle ``other`` then ``forget`` with the global NumPy RNG (here
  ``random_state``: a seed for a new ``RandomState``, the stream of ``np.random.seed(seed)``, or
  a ``RandomState`` to go on drawing from, as `val_test_mia` does; the global RNG is left
  alone); truncate both to m = min(n_forget, n_other); X = [forget[:m]; other[:m]],
  y = [0] * m + [1] * m; ``cross_val_score(LogisticRegression(), X, y,
  cv=StratifiedShuffleSplit(n_splits, test_size=test_size, random_state=cv_seed),
  scoring="accuracy").mean()``. 0.5 is ideal.
  """
  forget, other = _features(forget, "forget").copy(), _features(other, "other").copy()
  if forget.shape[1] != other.shape[1]:
    raise ValueError(f"forget has {forget.shape[1]} features per sample, other {other.shape[1]}")
  rng = (random_state if isinstance(random_state, np.random.RandomState)
         else np.random.RandomState(random_state))
  rng.shuffle(other)
  rng.shuffle(forget)
  m = min(len(forget), len(other))
  if 2 * m * test_size < 2 or 2 * m * (1 - test_size) < 2:
    raise ValueError(f"{m} samples per group are too few for a {test_size} test split")
  x = np.concatenate([forget[:m], other[:m]])
  y = np.repeat([0, 1], m)
  cv = StratifiedShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=cv_seed)
  return float(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean())


def val_test_mia(forget, val, test, seed=123):
  """DeepUnlearn's Val-MIA and Test-MIA of one model as its evaluator computes them
  (``evaluate_model`` after ``setup_seed(seed)``, deepunlearn-spec 6.1-6.2): one NumPy stream
  seeded once, drawn from by `population_mia` (forget, val) and then (forget, test), i.e. the
  shuffles of val, forget, test and forget again (the reference computes the forget losses anew
  for Test-MIA, so both forget shuffles start from the same order). Nothing else in the
  reference's evaluation draws from that stream (its loaders do not shuffle)."""
  rng = np.random.RandomState(seed)
  return population_mia(forget, val, rng), population_mia(forget, test, rng)


def mia_features(probs, labels, kind):
  """Per-sample MIA features from probabilities [n, C] and integer labels [n].

  ``loss``: -log p_y; ``correctness``: 1[argmax p = y]; ``confidence``: p_y; ``entropy``:
  -sum_j p_j log p_j; ``m_entropy``: Song & Mittal's modified entropy
  -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j). Logs of 0 are log(1e-30) as in SalUn.
  Deviation: the SalUn code's m_entropy takes log(p) where log(1 - p) is meant and indexes
  ``[:, labels]`` (every row's columns of *all* labels) instead of each row's own label; this is
  the published formula.
  """
  p = np.asarray(probs, np.float64)
  y = np.asarray(labels)
  if p.ndim != 2 or y.shape != (len(p),) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"probs must be [n, C] and labels [n] integers; got {p.shape}, {y.shape} "
                     f"{y.dtype}")
  if not np.all(np.isfinite(p)) or np.any(y < 0) or np.any(y >= p.shape[1]):
    raise ValueError("probs must be finite and labels in [0, C)")
  if kind not in FEATURES:
    raise ValueError(f"kind must be one of {FEATURES}; got {kind!r}")
  log = lambda v: np.log(np.maximum(v, _LOG_FLOOR))
  p_y = p[np.arange(len(p)), y]
  if kind == "loss":
    return -log(p_y)
  if kind == "correctness":
    return (p.argmax(1) == y).astype(np.float64)
  if kind == "confidence":
    return p_y
  if kind == "entropy":
    return -(p * log(p)).sum(1)
  own = np.arange(p.shape[1]) == y[:, None]
  return -np.where(own, (1 - p) * log(p), p * log(1 - p)).sum(1)


def svc_mia(shadow_in, shadow_out, target_in=None, target_out=None):
  """SalUn's ``SVC_fit_predict``: an RBF SVC told members from non-members, applied to targets.

  Fits ``SVC(C=3, gamma="auto", kernel="rbf")`` on ``shadow_in`` (label 1, e.g. retain features)
  and ``shadow_out`` (label 0, e.g. test), then returns the mean of the fraction of ``target_in``
  predicted member and the fraction of ``target_out`` predicted non-member (each if given).
  SalUn's MIA-efficacy is 1 - svc_mia(retain, test, target_in=forget). Features: [n] or [n, F]
  arrays, e.g. from `mia_features`.
  """
  if target_in is None and target_out is None:
    raise ValueError("pass target_in and/or target_out")
  x_in, x_out = _features(shadow_in, "shadow_in"), _features(shadow_out, "shadow_out")
  clf = SVC(C=3, gamma="auto", kernel="rbf")
  clf.fit(np.concatenate([x_in, x_out]), np.repeat([1.0, 0.0], [len(x_in), len(x_out)]))
  accs = []
  if target_in is not None:
    accs.append(clf.predict(_features(target_in, "target_in")).mean())
  if target_out is not None:
    accs.append(1 - clf.predict(_features(target_out, "target_out")).mean())
  return float(np.mean(accs))
