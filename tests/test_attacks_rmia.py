"""RMIA and the IAM paper's other baselines against float64 NumPy formulas."""

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats
from sklearn.metrics import roc_auc_score

from jaxmu.attacks import baselines, rmia

PRECISIONS = [(False, dict(rtol=2e-6, atol=1e-5)), (True, dict(rtol=1e-9, atol=1e-15))]  # +1 ulp when |x| > 10


def _dtype(x64):
  return np.float64 if x64 else np.float32


def _rmia_np(tx, tz, pr_x, pr_z, gamma):
  with np.errstate(divide="ignore", invalid="ignore"):
    return ((tx / pr_x)[:, None] / (tz / pr_z)[None, :] > gamma).mean(1)


def _rmia_inputs(rng, x64, k=4, n=50, z=80):
  d = _dtype(x64)
  return (rng.random(n).astype(d), rng.random(z).astype(d), rng.random((k, n)).astype(d),
          rng.random((k, z)).astype(d))


@pytest.mark.parametrize("x64,tol", PRECISIONS)
def test_rmia_offline_and_online_match_numpy(x64, tol):
  rng = np.random.default_rng(0)
  with jax.enable_x64(x64):
    tx, tz, sx, sz = _rmia_inputs(rng, x64)
    in_x, in_z = rng.random(50).astype(_dtype(x64)), rng.random(80).astype(_dtype(x64))
    off = rmia.rmia_offline(tx, tz, sx, sz, a=0.33, gamma=1.5)
    on = rmia.rmia_online(tx, tz, sx, sz, in_x, in_z, gamma=2.0)
    on_models = rmia.rmia_online(tx, tz, sx, sz, sx[:2] ** 0.5, sz[:2] ** 0.5)
  f = lambda v: np.asarray(v, np.float64)
  pr = lambda s: (1 + 0.33) / 2 * scipy.stats.trim_mean(f(s), 0.2, axis=0) + (1 - 0.33) / 2
  np.testing.assert_allclose(off, _rmia_np(f(tx), f(tz), pr(sx), pr(sz), 1.5), **tol)
  ref_x = np.concatenate([f(sx), np.repeat(f(in_x)[None], 4, 0)])
  ref_z = np.concatenate([f(sz), np.repeat(f(in_z)[None], 4, 0)])
  mean = lambda s: scipy.stats.trim_mean(s, 0.2, axis=0)
  np.testing.assert_allclose(on, _rmia_np(f(tx), f(tz), mean(ref_x), mean(ref_z), 2.0), **tol)
  ref_x = np.concatenate([f(sx), f(sx[:2] ** 0.5)])
  ref_z = np.concatenate([f(sz), f(sz[:2] ** 0.5)])
  np.testing.assert_allclose(on_models, _rmia_np(f(tx), f(tz), mean(ref_x), mean(ref_z), 2.0),
                             **tol)


def test_rmia_edge_cases_are_finite():
  """K = 1, ties, signals of exactly 0 and 1 (Pr = 0 at a = 1), negative tsm values."""
  tx = np.array([0.0, 1.0, 0.5, 0.5, -0.2])
  tz = np.array([0.0, 1.0, 0.5, -0.3])
  for k in (1, 3):
    sx, sz = np.zeros((k, 5)), np.ones((k, 4))
    sx[:, 1] = 1.0
    for a in (0.0, 1.0):
      score = rmia.rmia_offline(tx, tz, sx, sz, a)
      assert np.all(np.isfinite(score)) and np.all((0 <= score) & (score <= 1))
      f = lambda v: np.asarray(v, np.float64)
      pr = lambda s: (1 + a) / 2 * scipy.stats.trim_mean(s, 0.2, axis=0) + (1 - a) / 2
      np.testing.assert_allclose(score, _rmia_np(tx, tz, pr(f(sx)), pr(f(sz)), 2.0), atol=1e-7)
    assert np.all(np.isfinite(rmia.rmia_online(tx, tz, sx, sz, tx, tz)))


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_rmia_synthetic_auc(delta):
  """Per-sample signal levels; members' target signal is shifted by delta (Gaussian noise 1).

  With the population drawn like non-members and many z, score(x) is a monotone function of the
  target-over-reference ratio, whose log is ~ N(delta, 1) vs N(0, 1) for members vs non-members:
  the AUC approaches Phi(delta / sqrt(2))."""
  rng = np.random.default_rng(7)  # fixed: the AUC of 3,000 samples has a std of ~0.01
  n, z, k = 3000, 2000, 8
  level_x, level_z = rng.normal(0, 1, n), rng.normal(0, 1, z)
  member = rng.random(n) < 0.5
  tx = np.exp(level_x + delta * member + rng.standard_normal(n))
  tz = np.exp(level_z + rng.standard_normal(z))
  sx, sz = np.exp(np.broadcast_to(level_x, (k, n))), np.exp(np.broadcast_to(level_z, (k, z)))
  score = rmia.rmia_offline(tx, tz, sx, sz, a=1.0, gamma=1.0)
  assert roc_auc_score(member, score) == pytest.approx(
      scipy.stats.norm.cdf(delta / np.sqrt(2)), abs=0.03)


def test_rmia_bad_input():
  tx, tz, sx, sz = np.ones(3), np.ones(4), np.ones((2, 3)), np.ones((2, 4))
  with pytest.raises(ValueError, match="K = 0"):
    rmia.rmia_offline(tx, tz, np.ones((0, 3)), sz, 0.3)
  with pytest.raises(ValueError, match="K = 2 models"):
    rmia.rmia_offline(tx, tz, sx, np.ones((3, 4)), 0.3)
  with pytest.raises(ValueError, match="N = 3"):
    rmia.rmia_offline(tx, tz, np.ones((2, 4)), sz, 0.3)
  with pytest.raises(ValueError, match="NaN"):
    rmia.rmia_online(tx, tz, sx, sz, np.array([1, np.nan, 1]), tz)
  with pytest.raises(ValueError, match="offline scaling"):
    rmia.rmia_offline(tx, tz, sx, sz, 1.5)
  with pytest.raises(ValueError, match="IN models"):
    rmia.rmia_online(tx, tz, sx, sz, np.ones((2, 3)), np.ones((3, 4)))


# EMIA, UpdateAtk, simple scores -----------------------------------------------------------------

@pytest.mark.parametrize("x64,tol", PRECISIONS)
def test_emia_and_update_attack_match_numpy(x64, tol):
  rng = np.random.default_rng(0)
  k, n, z = 5, 40, 60
  with jax.enable_x64(x64):
    d = _dtype(x64)
    t, o = rng.normal(0, 3, n).astype(d), rng.normal(0, 3, n).astype(d)
    sh, pop = rng.normal(0, 3, (k, n)).astype(d), rng.normal(0, 3, z).astype(d)
    sh[:, 0] = t[0]  # ties with the target
    t[1] = -2000.0  # loss above the dummy 1000
    emia_r, emia_p = baselines.emia_reference(t, sh), baselines.emia_population(t, pop)
    upd = baselines.update_attack(t, o, sh)
  t, o, sh, pop = (np.asarray(v, np.float64) for v in (t, o, sh, pop))
  loss = lambda v: np.logaddexp(0, -v)
  want = [np.interp(loss(t[j]), np.sort(np.r_[0.0, loss(sh[:, j]), 1000.0]), np.linspace(0, 1, k + 2))
          for j in range(n)]
  np.testing.assert_allclose(emia_r, want, **tol)
  np.testing.assert_allclose(emia_p, (loss(pop)[None] < loss(t)[:, None]).mean(1), **tol)
  mu, sd = sh.mean(0), np.maximum(sh.std(0), 1e-10)
  cdf = scipy.stats.norm.cdf
  want = (1 - cdf((t - mu) / sd)) - (1 - cdf((o - mu) / sd))
  # Sample 0 (all shadows tied) hinges on the last bit of the mean over the floored std.
  np.testing.assert_allclose(upd[1:], want[1:], **tol)


def test_update_attack_with_one_shadow_is_a_step():
  t, o, sh = np.array([0.0, 1.0, 2.0, 1.0]), np.array([2.0, 1.0, 0.0, 1.0]), np.ones((1, 4))
  np.testing.assert_array_equal(baselines.update_attack(t, o, sh), [1.0, 0.0, -1.0, 0.0])


@pytest.mark.parametrize("x64,tol", PRECISIONS)
def test_simple_scores_match_numpy(x64, tol):
  rng = np.random.default_rng(0)
  with jax.enable_x64(x64):
    logits = (1.5 * rng.standard_normal((2, 30, 6))).astype(_dtype(x64))  # taylor sum away from 0
    labels = rng.integers(0, 6, 30)
    simple = baselines.simple_scores(logits[1], labels, temperature=2.0)
    diff = baselines.simple_diff_scores(logits[0], logits[1], labels)
  z = logits.astype(np.float64)
  p = scipy.special.softmax(z, -1)
  p_y = p[:, np.arange(30), labels]
  phi = np.log(p_y) - np.log(1 - p_y)
  r = lambda q: -np.log(1e-2 - np.log(1e-5 + q))
  r_hat = (r(p_y) - r(0.0)) / (r(1.0) - r(0.0))
  u = z[1] / 2.0
  u[np.arange(30), labels] -= 0.6
  taylor = 1 + u + u**2 / 2 + u**3 / 6
  tsm = taylor[np.arange(30), labels] / taylor.sum(1)
  np.testing.assert_allclose(simple["proby"], -p_y[1], **tol)
  np.testing.assert_allclose(simple["loss"], -np.log(p_y[1]), **tol)
  np.testing.assert_allclose(simple["tsm"], -tsm, **tol)
  np.testing.assert_allclose(diff["conf"], p_y[0] - p_y[1], **tol)
  np.testing.assert_allclose(diff["loss"], np.log(p_y[0]) - np.log(p_y[1]), **tol)
  np.testing.assert_allclose(diff["carlogit"], phi[0] - phi[1], **dict(tol, atol=tol["atol"] * 4))
  np.testing.assert_allclose(diff["gumbel"], r_hat[0] - r_hat[1], **tol)


@pytest.mark.parametrize("delta", [0.0, 1.5])
def test_baselines_synthetic_auc(delta):
  """Forgotten samples' unlearned loss is shifted up by delta relative to the references."""
  rng = np.random.default_rng(0)
  n, k = 3000, 64
  forgotten = rng.random(n) < 0.5
  level = rng.normal(3, 1, n)  # true-class logits
  shadows = level + rng.standard_normal((k, n))  # EMIA is on log(1 + e^-z): monotone in -z
  target = level - delta * forgotten + rng.standard_normal(n)
  want = scipy.stats.norm.cdf(delta / np.sqrt(2))
  assert roc_auc_score(forgotten, baselines.emia_reference(target, shadows)) == pytest.approx(
      want, abs=0.03)
  # UpdateAtk: Phi(original) - Phi(target) under N(level, 1), i.e. U1 - Phi(E - delta * forgotten)
  # with U1 uniform, E ~ N(0, 1); its AUC by a large float64 Monte Carlo.
  original = level + rng.standard_normal(n)
  u, e = rng.random((2, 10**6)), rng.standard_normal((2, 10**6))
  a = u[0] - scipy.stats.norm.cdf(e[0] - delta)
  b = u[1] - scipy.stats.norm.cdf(e[1])
  assert roc_auc_score(forgotten, baselines.update_attack(target, original, shadows)) == (
      pytest.approx(np.mean(a > b), abs=0.03))
  pop_level = rng.normal(3, 1, 4000) + rng.standard_normal(4000)
  pop_want = scipy.stats.norm.cdf(delta / np.sqrt(4))  # level noise counts here too
  assert roc_auc_score(forgotten, baselines.emia_population(target, pop_level)) == pytest.approx(
      pop_want, abs=0.03)


# UnLeak -----------------------------------------------------------------------------------------

def _top3_np(p):
  out = np.empty_like(p)
  for i, row in enumerate(p):
    top = sorted(range(len(row)), key=lambda c: (-row[c], c))[:3]
    out[i] = (1 - row[top].sum()) / (len(row) - 3)
    out[i, top] = row[top]
  return out


def test_unleak_feature_matches_numpy():
  rng = np.random.default_rng(0)
  p_old = scipy.special.softmax(2 * rng.standard_normal((20, 7)), -1)
  p_new = scipy.special.softmax(2 * rng.standard_normal((20, 7)), -1)
  p_new[0] = [1, 0, 0, 0, 0, 0, 0]  # probabilities exactly 0 and 1
  got = baselines.unleak_feature(p_old, p_new)
  old, new = _top3_np(p_old), _top3_np(p_new)
  for i in range(20):
    order = sorted(range(7), key=lambda c: (old[i, c], c))
    np.testing.assert_allclose(got[i], old[i, order] - new[i, order], atol=1e-15)
  assert np.all(np.isfinite(got))
  with pytest.raises(ValueError, match="must be equal"):
    baselines.unleak_feature(p_old, p_new[:, :6])


def test_unleak_learns_and_is_deterministic_given_seed():
  """Held-out samples' probabilities differ between origin and shadow; training ones do not."""
  rng = np.random.default_rng(0)
  k, n, c = 3, 300, 10
  p_origin = scipy.special.softmax(4 * rng.standard_normal((n, c)), -1)
  held_out = rng.random((k, n)) < 0.3
  p_shadows = np.where(held_out[..., None],
                       scipy.special.softmax(4 * rng.standard_normal((k, n, c)), -1), p_origin)
  models = [baselines.unleak_attack_model(p_origin, p_shadows, held_out, seed=3) for _ in range(2)]
  forgotten = rng.random(n) < 0.5
  p_target = np.where(forgotten[:, None], scipy.special.softmax(4 * rng.standard_normal((n, c)), -1),
                      p_origin)
  scores = [baselines.unleak_score(m, p_origin, p_target) for m in models]
  np.testing.assert_array_equal(scores[0], scores[1])
  assert roc_auc_score(forgotten, scores[0]) > 0.9
  with pytest.raises(ValueError, match="held_out"):
    baselines.unleak_attack_model(p_origin, p_shadows, held_out[:, :10])
  with pytest.raises(ValueError, match="K >= 1"):
    baselines.unleak_attack_model(p_origin, p_shadows[:0], held_out[:0])


def test_baselines_bad_input():
  with pytest.raises(ValueError, match="K = 0"):
    baselines.emia_reference(np.zeros(3), np.zeros((0, 3)))
  with pytest.raises(ValueError, match="NaN"):
    baselines.emia_population(np.zeros(3), np.array([0.0, np.nan]))
  with pytest.raises(ValueError, match="original has shape"):
    baselines.update_attack(np.zeros(3), np.zeros(2), np.zeros((2, 3)))
