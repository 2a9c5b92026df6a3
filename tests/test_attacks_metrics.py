"""ROC metrics against a hand-built ROC curve; DeepUnlearn metrics against formulas and the
third-party CIFAR-10 table (deepunlearn-spec 9.2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxmu.attacks import metrics


def _hand_roc(labels, scores):
  """Every threshold (descending distinct scores), predicting member when score >= threshold."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  thresholds = np.unique(scores)[::-1]
  tpr = np.r_[0.0, [(pos >= t).mean() for t in thresholds]]
  fpr = np.r_[0.0, [(neg >= t).mean() for t in thresholds]]
  return fpr, tpr


def _draw(n_pos=150, n_neg=250, shift=0.7, ties=False):
  rng = np.random.default_rng(0)
  scores = np.r_[rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)]
  if ties:
    scores = np.round(scores, 1)
  return np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)], scores


@pytest.mark.parametrize("ties", [False, True])
def test_roc_metrics_match_hand_computation(ties):
  labels, scores = _draw(ties=ties)
  out = metrics.roc_metrics(labels, scores, num_bootstrap=0)
  pos, neg = scores[labels == 1], scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  mann_whitney = np.mean((diff > 0) + 0.5 * (diff == 0))
  fpr, tpr = _hand_roc(labels, scores)
  levels = np.array(metrics.LEVELS)
  np.testing.assert_allclose(out["auc"], mann_whitney, rtol=1e-12)
  np.testing.assert_allclose(out["balanced_accuracy"], np.max((tpr + 1 - fpr) / 2), rtol=1e-12)
  np.testing.assert_allclose(list(out["tpr_at_fpr"].values()), np.interp(levels, fpr, tpr), rtol=1e-12)
  fnr, tnr = (1 - tpr)[::-1], (1 - fpr)[::-1]  # the curve in order of increasing FNR
  np.testing.assert_allclose(list(out["tnr_at_fnr"].values()), np.interp(levels, fnr, tnr), rtol=1e-12)
  assert list(out["tpr_at_fpr"]) == list(metrics.LEVELS)
  assert out["curve"]["fpr"][0] == 0 and out["curve"]["tpr"][-1] == 1


def test_tnr_at_fnr_is_the_mirror_of_tpr_at_fpr():
  # Detecting non-members with the negated score: TNR at FNR = TPR at FPR of the mirrored task.
  labels, scores = _draw(ties=True)
  out = metrics.roc_metrics(labels, scores, num_bootstrap=0)
  mirror = metrics.roc_metrics(1 - labels, -scores, num_bootstrap=0)
  np.testing.assert_allclose(list(out["tnr_at_fnr"].values()), list(mirror["tpr_at_fpr"].values()))
  np.testing.assert_allclose(out["auc"], mirror["auc"])


@pytest.mark.parametrize("d", [0.0, 1.0])
def test_separated_gaussians_give_analytic_auc_and_seeded_ci(d):
  labels, scores = _draw(4000, 4000, shift=d)
  out = metrics.roc_metrics(labels, scores, num_bootstrap=50, seed=3)
  analytic = scipy.stats.norm.cdf(d / math.sqrt(2))  # 0.5 for identical distributions
  assert abs(out["auc"] - analytic) < 0.02
  low, high = out["auc_ci"]
  assert low < out["auc"] < high and high - low < 0.05
  for level, (lo, hi) in out["tpr_at_fpr_ci"].items():
    assert 0 <= lo <= hi <= 1, level
  again = metrics.roc_metrics(labels, scores, num_bootstrap=50, seed=3)
  other = metrics.roc_metrics(labels, scores, num_bootstrap=50, seed=4)
  assert again["auc_ci"] == out["auc_ci"] != other["auc_ci"]


def test_roc_bad_input_raises():
  labels, scores = _draw()
  with pytest.raises(ValueError, match="equal length"):
    metrics.roc_metrics(labels, scores[:-1])
  with pytest.raises(ValueError, match="binary"):
    metrics.roc_metrics(labels * 2, scores)
  with pytest.raises(ValueError, match="one class"):
    metrics.roc_metrics(np.ones_like(labels), scores)
  scores[5] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    metrics.roc_metrics(labels, scores)


def test_accuracy_per_split_over_a_stack_of_models():
  rng = np.random.default_rng(0)
  logits = {s: rng.standard_normal((3, n, 5)) for s, n in (("retain", 40), ("forget", 10))}
  labels = {s: rng.integers(0, 5, x.shape[1]) for s, x in logits.items()}
  out = metrics.split_accuracies(logits, labels)
  for s in logits:
    np.testing.assert_allclose(out[s], (logits[s].argmax(-1) == labels[s]).mean(-1), rtol=1e-6)
  with pytest.raises(ValueError, match="disagree"):
    metrics.accuracy(logits["retain"], labels["forget"])
  with pytest.raises(ValueError, match="splits differ"):
    metrics.split_accuracies(logits, {"retain": labels["retain"]})


def test_deepunlearn_metrics_reproduce_third_party_cifar10_table():
  # deepunlearn-spec 9.2: seed-mean accuracies, Test MIA, runtime; naive (retrained) reference.
  naive = {"retain": 0.9993, "forget": 0.8734, "test": 0.8687}
  rows = {  # method: (retain, forget, test, test MIA, runtime s, RetDev, Indisc, RTE)
      "FCS": (0.9954, 0.8623, 0.8288, 0.5054, 194.0, 0.0626, 0.9891, 8.6),
      "SalUN": (0.9712, 0.8792, 0.8365, 0.4971, 37.9, 0.0719, 0.9941, 44.2),
      "GA": (0.8656, 0.8519, 0.7805, 0.5399, 4.3, 0.2600, 0.9203, 390.1),
  }
  for name, (ra, fa, ta, mia, seconds, retdev, indisc, rte) in rows.items():
    acc = {"retain": ra, "forget": fa, "test": ta}
    assert abs(metrics.retention_deviation(acc, naive) - retdev) < 2e-4, name
    assert abs(metrics.indiscernibility(mia) - indisc) < 2e-3, name  # the table averages per seed
    assert abs(metrics.run_time_efficiency(1677.0, seconds) / rte - 1) < 0.01, name  # rounded runtimes
  assert metrics.retention_deviation(naive, naive) == 0


def test_indiscernibility_retention_rte_formulas_and_errors():
  rng = np.random.default_rng(0)
  mia, new, ref = rng.random(10), rng.random(10), rng.uniform(0.1, 1, 10)
  np.testing.assert_allclose(metrics.indiscernibility(mia), 1 - np.abs(mia - 0.5) / 0.5)
  np.testing.assert_allclose(metrics.retention(new, ref), new / ref)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    metrics.indiscernibility(1.2)
  with pytest.raises(ValueError, match="reference"):
    metrics.retention(0.5, 0.0)
  with pytest.raises(ValueError, match="positive"):
    metrics.run_time_efficiency(10.0, 0.0)


def test_model_distances_match_numpy_and_vmap_over_stacks():
  rng = np.random.default_rng(0)
  shapes = {"dense": {"kernel": (4, 3), "bias": (3,)}, "out": {"kernel": (3, 2)}}
  draw = lambda: jax.tree.map(lambda s: rng.standard_normal(s), shapes, is_leaf=lambda x: isinstance(x, tuple))
  a, b = draw(), draw()
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  fa, fb = flat(a), flat(b)
  with jax.enable_x64(True):
    np.testing.assert_allclose(metrics.model_distance(a, b), np.sqrt(np.sum((fa - fb) ** 2) / np.sum(fa**2)), rtol=1e-9)
    np.testing.assert_allclose(metrics.l2_distance(a, b), np.linalg.norm(fa - fb), rtol=1e-9)
    np.testing.assert_allclose(metrics.normalized_l2_distance(a, b),
                               np.linalg.norm(fa / np.linalg.norm(fa) - fb / np.linalg.norm(fb)), rtol=1e-9)
  stack = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
  per_model = jax.vmap(metrics.model_distance, in_axes=(0, None))(stack, a)
  np.testing.assert_allclose(per_model, [0.0, metrics.model_distance(b, a)], atol=1e-6)
  with pytest.raises(ValueError, match="structures"):
    metrics.l2_distance(a, {"dense": a["dense"]})


def test_mean_interval_is_a_bca_bootstrap_interval_of_the_mean():
  """Against independently computed intervals: a float64 NumPy percentile bootstrap of a skewed
  sample (BCa shifts towards the long tail, so its upper end is the larger), the normal interval
  for a symmetric one; NaN for one value, the value itself for constant values."""
  rng = np.random.default_rng(0)
  skewed = rng.exponential(1.0, 400)
  low, high = metrics.mean_interval(skewed)
  means = skewed[rng.integers(0, skewed.size, (20000, skewed.size))].mean(1)
  p_low, p_high = np.quantile(means, [0.025, 0.975])
  assert low < skewed.mean() < high
  np.testing.assert_allclose((low, high), (p_low, p_high), atol=0.02)
  assert high - skewed.mean() > skewed.mean() - low
  symmetric = rng.uniform(0, 1, 2000)
  half = 1.96 * symmetric.std(ddof=1) / np.sqrt(symmetric.size)
  np.testing.assert_allclose(metrics.mean_interval(symmetric),
                             (symmetric.mean() - half, symmetric.mean() + half), atol=0.1 * half)
  assert metrics.mean_interval(skewed, seed=1) != (low, high)
  assert np.isnan(metrics.mean_interval([0.7])).all()
  assert metrics.mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
