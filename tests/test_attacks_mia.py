"""Population MIA (DeepUnlearn) and SVC-style MIA features against sklearn calls written here."""

import numpy as np
import pytest
import scipy.stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score
from sklearn.svm import SVC

from jaxmu.attacks import mia


def _reference(first_losses, second_losses, stream=None):
  """deepunlearn-spec 6.2 as the reference writes it: shuffled in place by the global RNG (here
  ``stream``; by default one just seeded with 123)."""
  stream = np.random.RandomState(123) if stream is None else stream
  first_losses, second_losses = first_losses.copy(), second_losses.copy()
  stream.shuffle(first_losses)
  stream.shuffle(second_losses)
  m = min(len(first_losses), len(second_losses))
  x = np.concatenate((second_losses[:m], first_losses[:m])).reshape((-1, 1))
  y = np.concatenate((np.zeros(m, dtype=int), np.ones(m, dtype=int)))
  cv = StratifiedShuffleSplit(n_splits=10, random_state=123)
  return cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean()


def test_population_mia_matches_reference_code():
  rng = np.random.default_rng(3)
  forget = rng.exponential(0.5, 137)
  other = rng.exponential(0.8, 211)  # truncated to 137 after the shuffle
  state = np.random.get_state()
  got = mia.population_mia(forget, other)
  assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG untouched
  np.random.seed(123)  # the reference's own global stream
  assert got == _reference(other, forget, np.random)  # its argument order: (test/val, forget)
  assert mia.population_mia(other, other) == pytest.approx(0.5, abs=0.1)


def test_val_and_test_mia_draw_from_one_stream_as_the_reference_evaluator():
  """``evaluate_model`` after ``setup_seed(123)``: Val-MIA, then Test-MIA on the same stream,
  each on forget losses computed anew (unshuffled)."""
  rng = np.random.default_rng(5)
  forget, val, test = (rng.exponential(0.5, 61), rng.exponential(0.8, 97),
                       rng.exponential(0.7, 83))
  stream = np.random.RandomState(123)  # setup_seed(123), then nothing else draws before the MIAs
  expected = _reference(val, forget, stream), _reference(test, forget, stream)
  assert mia.val_test_mia(forget, val, test) == expected
  assert expected[1] != _reference(test, forget)  # Test-MIA reseeded would differ here


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_population_mia_synthetic(shift):
  """Losses from N(shift, 1) vs N(0, 1): a threshold classifier's accuracy is Phi(shift / 2)."""
  rng = np.random.default_rng(4)
  got = mia.population_mia(rng.normal(shift, 1, 3000), rng.normal(0, 1, 3000))
  assert got == pytest.approx(scipy.stats.norm.cdf(shift / 2), abs=0.04)


def _features_np(p, y):
  """Song & Mittal's modified entropy and friends, sample by sample."""
  rows = []
  for pi, yi in zip(p, y):
    log = lambda v: np.log(max(v, 1e-30))
    m_ent = -(1 - pi[yi]) * log(pi[yi]) - sum(pi[j] * log(1 - pi[j]) for j in range(len(pi))
                                              if j != yi)
    ent = -sum(q * log(q) for q in pi)
    rows.append((-log(pi[yi]), float(np.argmax(pi) == yi), pi[yi], ent, m_ent))
  return dict(zip(mia.FEATURES, np.array(rows).T))


def test_mia_features_match_numpy_including_0_and_1():
  rng = np.random.default_rng(0)
  p = scipy.special.softmax(3 * rng.standard_normal((40, 5)), -1)
  p[0] = [1, 0, 0, 0, 0]
  p[1] = [0, 1, 0, 0, 0]
  y = rng.integers(0, 5, 40)
  y[:2] = 0
  want = _features_np(p, y)
  for kind in mia.FEATURES:
    got = mia.mia_features(p, y, kind)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want[kind], rtol=1e-12, atol=1e-12)
  assert mia.mia_features(p, y, "m_entropy")[0] == 0.0  # certain and right


def test_svc_mia_matches_sklearn():
  rng = np.random.default_rng(0)
  p_in = scipy.special.softmax(4 * rng.standard_normal((120, 4)) + 3 * np.eye(4)[np.r_[:120] % 4], -1)
  p_out = scipy.special.softmax(2 * rng.standard_normal((100, 4)), -1)
  y_in, y_out = np.r_[:120] % 4, rng.integers(0, 4, 100)
  f_in = mia.mia_features(p_in, y_in, "confidence")
  f_out = mia.mia_features(p_out, y_out, "confidence")
  got = mia.svc_mia(f_in, f_out, target_in=f_in[:30], target_out=f_out[:40])
  clf = SVC(C=3, gamma="auto", kernel="rbf").fit(np.r_[f_in, f_out][:, None],
                                                  np.r_[np.ones(120), np.zeros(100)])
  want = np.mean([clf.predict(f_in[:30, None]).mean(), 1 - clf.predict(f_out[:40, None]).mean()])
  assert got == pytest.approx(want, abs=1e-12)


def test_bad_input():
  with pytest.raises(ValueError, match="NaN"):
    mia.population_mia(np.array([0.1, np.nan]), np.ones(5))
  with pytest.raises(ValueError, match="too few"):
    mia.population_mia(np.ones(4), np.ones(5))
  with pytest.raises(ValueError, match="non-empty"):
    mia.population_mia(np.ones(0), np.ones(5))
  with pytest.raises(ValueError, match="kind"):
    mia.mia_features(np.ones((2, 3)) / 3, np.zeros(2, int), "margin")
  with pytest.raises(ValueError, match="labels"):
    mia.mia_features(np.ones((2, 3)) / 3, np.array([0, 3]), "loss")
  with pytest.raises(ValueError, match="target"):
    mia.svc_mia(np.ones(3), np.zeros(3))
