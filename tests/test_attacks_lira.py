"""LiRA (Carlini and IAM-reference families) and U-LiRA against float64 NumPy formulas."""

import jax
import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from jaxmu.attacks import lira, metrics

# float32: 1e-5 absolute, plus float32 rounding (~1 ulp) for log-densities larger than ~10.
PRECISIONS = [(False, dict(rtol=2e-6, atol=1e-5)), (True, dict(rtol=1e-9, atol=1e-15))]
FLOOR = 1e-10


def _dtype(x64):
  return np.float64 if x64 else np.float32


def _shadows(rng, x64, k=32, n=60):
  """Per-sample Gaussians with stds in [0.5, 2]; target within a few stds; random IN mask.

  K = 32 keeps every group's fitted std near its true value, so scores stay O(10) and float32
  can meet 1e-5 absolute."""
  mu, sd = rng.normal(0, 2, n), rng.uniform(0.5, 2, n)
  shadows = (mu + sd * rng.standard_normal((k, n))).astype(_dtype(x64))
  target = (mu + sd * rng.standard_normal(n)).astype(_dtype(x64))
  in_mask = rng.random((k, n)) < 0.5
  in_mask[0, :5] = in_mask[1:, :5] = False  # samples 0..4 have no IN shadow (column-mean rule)
  in_mask[:, 5] = True  # sample 5 has no OUT shadow
  return target, shadows, in_mask


def _fit_np(shadows, keep, average, fix_variance):
  """tensorflow/privacy compute_score_lira statistics, sample by sample, in float64."""
  shadows = shadows.astype(np.float64)
  groups = [shadows[keep[:, j], j] for j in range(shadows.shape[1])]
  avg = np.array([(np.median if average == "median" else np.mean)(g) if len(g) else np.nan
                  for g in groups])
  avg[np.isnan(avg)] = np.nanmean(avg)
  if fix_variance == "global":  # Carlini's np.std(dat_in): all kept values themselves
    std = np.full_like(avg, np.std(np.concatenate(groups)))
  elif fix_variance:
    std = np.full_like(avg, np.std(np.concatenate([g - a for g, a in zip(groups, avg)])))
  else:
    std = np.array([np.std(g) if len(g) else np.nan for g in groups])
    std[np.isnan(std)] = np.nanmean(std)
  return avg, np.maximum(std, FLOOR)


@pytest.mark.parametrize("x64,tol", PRECISIONS)
@pytest.mark.parametrize("fix_variance,average",
                         [(False, "median"), (True, "mean"), ("global", "median")])
def test_carlini_online_matches_numpy(x64, tol, fix_variance, average):
  with jax.enable_x64(x64):
    target, shadows, in_mask = _shadows(np.random.default_rng(0), x64)
    got = lira.carlini_lira_online(target, shadows, in_mask, fix_variance, average)
    assert got.dtype == _dtype(x64)
  t = target.astype(np.float64)
  mu_in, s_in = _fit_np(shadows, in_mask, average, fix_variance)
  mu_out, s_out = _fit_np(shadows, ~in_mask, average, fix_variance)
  want = scipy.stats.norm.logpdf(t, mu_in, s_in) - scipy.stats.norm.logpdf(t, mu_out, s_out)
  np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("x64,tol", PRECISIONS)
@pytest.mark.parametrize("fix_variance,one_sided", [(False, False), (True, True), ("global", True)])
def test_carlini_offline_matches_numpy(x64, tol, fix_variance, one_sided):
  with jax.enable_x64(x64):
    target, shadows, in_mask = _shadows(np.random.default_rng(0), x64)
    in_mask[:, 5] = False
    got = lira.carlini_lira_offline(target, shadows, in_mask, fix_variance, "median", one_sided)
    got_all_out = lira.carlini_lira_offline(target, shadows, None, fix_variance, "mean")
  t = target.astype(np.float64)
  mu, s = _fit_np(shadows, ~in_mask, "median", fix_variance)
  want = -scipy.stats.norm.logsf(t, mu, s) if one_sided else -scipy.stats.norm.logpdf(t, mu, s)
  np.testing.assert_allclose(got, want, **tol)
  mu, s = _fit_np(shadows, np.ones_like(in_mask), "mean", fix_variance)
  np.testing.assert_allclose(got_all_out, -scipy.stats.norm.logpdf(t, mu, s), **tol)


@pytest.mark.parametrize("x64,tol", PRECISIONS)
def test_iam_reference_lira_matches_numpy(x64, tol):
  rng = np.random.default_rng(0)
  with jax.enable_x64(x64):
    target, shadows, _ = _shadows(rng, x64, k=4)
    original = (target + rng.normal(0, 1e-3, target.shape)).astype(_dtype(x64))
    off = lira.iam_reference_lira_offline(target, shadows)
    off_class = lira.iam_reference_lira_offline(target, shadows, one_sided=True)
    on = lira.iam_reference_lira_online(target, original, shadows)
  t, o, sh = (a.astype(np.float64) for a in (target, original, shadows))
  mu, sd = sh.mean(0), np.maximum(sh.std(0), FLOOR)
  np.testing.assert_allclose(off, scipy.stats.norm.logpdf(t, mu, sd), **tol)
  np.testing.assert_allclose(off_class, -scipy.stats.norm.cdf((t - mu) / sd), **tol)
  # IN term ~ (t - o)^2 / 2e-20 ~ 1e13: float32 carries ~7 significant digits of it.
  want_on = -scipy.stats.norm.logpdf(t, o, FLOOR) + scipy.stats.norm.logpdf(t, mu, sd)
  np.testing.assert_allclose(on, want_on, **(tol if x64 else dict(rtol=1e-5)))
  # K >= 2: the ranking is that of |phi_unl - phi_ori| (iam-spec 12.6).
  assert scipy.stats.spearmanr(np.asarray(on), np.abs(t - o)).statistic > 0.999


def test_carlini_global_variance_is_not_iam_lira_on():
  """One IN observation per sample (the original model) and per-sample OUT stds from 0.2 to 5:
  the pooled IN std is 0, so the pooled variant ranks as the IAM code's LiRA-On (by
  |phi_unl - phi_ori|, iam-spec 12.6); Carlini's global stds keep the OUT Gaussian in play."""
  rng = np.random.default_rng(0)
  n, k = 300, 4
  mu, sd = rng.normal(0, 3, n), rng.uniform(0.2, 5, n)
  shadows = mu + sd * rng.standard_normal((k, n))
  original = mu + 3 + rng.standard_normal(n)
  target = np.where(rng.random(n) < 0.5, original, mu) + 0.5 * rng.standard_normal(n)
  refs = np.concatenate([shadows, original[None]])
  in_mask = np.zeros(refs.shape, bool)
  in_mask[-1] = True
  iam_on = -np.asarray(lira.iam_reference_lira_online(target, original, shadows))
  rho = lambda f: scipy.stats.spearmanr(lira.carlini_lira_online(target, refs, in_mask, f),
                                        iam_on).statistic
  assert rho(True) > 0.999
  assert rho("global") < 0.9
  with pytest.raises(ValueError, match="fix_variance"):
    lira.carlini_lira_online(target, refs, in_mask, "pooled")


def test_degenerate_inputs_give_finite_scores():
  """K = 1, ties (zero variance), a single IN shadow, probabilities' extremes as signals."""
  target = np.array([0.0, 1.0, 1.0, -103.0, 103.0, 2.0], np.float32)
  one = target[None] + np.array([0, 0, 1, 0, 5, -1], np.float32)  # K = 1, ties with the target
  tied = np.repeat(one, 3, axis=0)  # K = 3, zero variance everywhere
  mask = np.array([[True, False, True, False, True, False]])
  for shadows in (one, tied):
    m = np.repeat(mask, len(shadows), 0)
    scores = [lira.carlini_lira_online(target, shadows, m, fix_variance=f) for f in (0, 1, "global")]
    scores += [lira.carlini_lira_offline(target, shadows, one_sided=s) for s in (0, 1)]
    scores += [lira.iam_reference_lira_offline(target, shadows, s) for s in (0, 1)]
    scores += [lira.iam_reference_lira_online(target, target, shadows)]
    for s in scores:
      assert np.all(np.isfinite(s)), s
  # Zero variance: a tie with the OUT centre is the least member-like score.
  off = lira.carlini_lira_offline(target, tied)
  assert np.argmin(off) in np.flatnonzero(tied[0] == target)


def _auc_abs(delta):
  """P(|X + delta| > |Y|) for X, Y ~ N(0, 1): the AUC of a two-sided distance score."""
  x = np.linspace(-12, 12, 200_001)
  integrand = (2 * scipy.stats.norm.cdf(np.abs(x)) - 1) * scipy.stats.norm.pdf(x - delta)
  return np.trapezoid(integrand, x)


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_synthetic_auc_matches_analytic(delta):
  """Members' target signals come from N(mu_n + delta, 1), non-members' from N(mu_n, 1)."""
  rng = np.random.default_rng(7)
  k, n = 64, 3000
  mu = rng.normal(0, 3, n)
  in_mask = rng.random((k, n)) < 0.5
  shadows = mu + delta * in_mask + rng.standard_normal((k, n))
  member = rng.random(n) < 0.5
  target = mu + delta * member + rng.standard_normal(n)
  auc = lambda s: roc_auc_score(member, np.asarray(s))
  optimal = scipy.stats.norm.cdf(delta / np.sqrt(2))
  assert auc(lira.carlini_lira_online(target, shadows, in_mask)) == pytest.approx(optimal, abs=0.03)
  assert auc(lira.carlini_lira_offline(target, shadows, in_mask, one_sided=True)) == pytest.approx(
      optimal, abs=0.03)
  two_sided = _auc_abs(delta) if delta else 0.5
  offline = lira.carlini_lira_offline(target, shadows, in_mask, fix_variance=True, average="mean")
  assert auc(offline) == pytest.approx(two_sided, abs=0.03)
  # IAM reference, offline on the OUT shadows; online against an "original" model's signal.
  out_only = mu + rng.standard_normal((k, n))
  assert 1 - auc(lira.iam_reference_lira_offline(target, out_only)) == pytest.approx(
      two_sided, abs=0.03)
  original = mu + rng.standard_normal(n)
  unlearned = original + delta * ~member + rng.standard_normal(n)  # forgotten samples moved
  assert 1 - auc(lira.iam_reference_lira_online(unlearned, original, out_only)) == pytest.approx(
      _auc_abs(delta) if delta else 0.5, abs=0.03)


def test_bad_input_raises():
  t, s, m = np.zeros(4), np.zeros((3, 4)), np.zeros((3, 4), bool)
  m[0] = True
  with pytest.raises(ValueError, match="K = 0"):
    lira.carlini_lira_offline(t, np.zeros((0, 4)))
  with pytest.raises(ValueError, match="N = 4"):
    lira.carlini_lira_online(t, np.zeros((3, 5)), m)
  with pytest.raises(ValueError, match="in_mask has shape"):
    lira.carlini_lira_online(t, s, m[:, :3])
  with pytest.raises(ValueError, match="binary"):
    lira.carlini_lira_online(t, s, m * 2)
  with pytest.raises(ValueError, match="NaN"):
    lira.carlini_lira_online(np.array([0, np.nan, 0, 0]), s, m)
  with pytest.raises(ValueError, match="no IN shadow"):
    lira.carlini_lira_online(t, s, np.zeros((3, 4)))
  with pytest.raises(ValueError, match="average"):
    lira.carlini_lira_offline(t, s, average="mode")
  with pytest.raises(ValueError, match="original has shape"):
    lira.iam_reference_lira_online(t, t[:3], s)


# U-LiRA -----------------------------------------------------------------------------------------

def _ulira_np(u, forgot, r, never, fix_variance, loo):
  """P(unlearned) per observation, fitted without the scored model when `loo` (float64 loops)."""
  u, r = u.astype(np.float64), r.astype(np.float64)

  def pooled_var(groups):
    return sum(((g - g.mean()) ** 2).sum() for g in groups if len(g)) / sum(map(len, groups))

  u_groups = [u[forgot[:, j], j] for j in range(u.shape[1])]
  r_groups = [r[never[:, j], j] for j in range(r.shape[1])]

  def prob(x, gu, gr, j, own_u, without):
    gu, gr = list(gu), list(gr)
    own = gu if own_u else gr
    if loo:
      own[j] = np.delete(own[j], without)
    var_u = pooled_var(gu) if fix_variance else gu[j].var()
    var_r = pooled_var(gr) if fix_variance else gr[j].var()
    lu = scipy.stats.norm.logpdf(x, gu[j].mean(), max(np.sqrt(var_u), FLOOR))
    lr = scipy.stats.norm.logpdf(x, gr[j].mean(), max(np.sqrt(var_r), FLOOR))
    return scipy.special.expit(lu - lr)

  p_u, p_r = np.full(u.shape, 0.5), np.full(r.shape, 0.5)
  need = 2 if loo else 1
  scored = (forgot.sum(0) >= need) & (never.sum(0) >= need)
  for j in np.flatnonzero(scored):
    for i, m in enumerate(np.flatnonzero(forgot[:, j])):
      p_u[m, j] = prob(u[m, j], u_groups, r_groups, j, True, i)
    for i, m in enumerate(np.flatnonzero(never[:, j])):
      p_r[m, j] = prob(r[m, j], u_groups, r_groups, j, False, i)
  return p_u, p_r, scored


def _ulira_data(rng, x64, m=20, n=30, delta=0.7):
  u = (rng.normal(delta, 1, (m, n))).astype(_dtype(x64))
  r = (rng.normal(0, 1, (m + 2, n))).astype(_dtype(x64))
  return u, rng.random((m, n)) < 0.5, r, rng.random((m + 2, n)) < 0.5


@pytest.mark.parametrize("x64,tol", PRECISIONS)
@pytest.mark.parametrize("fix_variance", [False, True])
def test_ulira_matches_numpy_leave_one_model_out(x64, tol, fix_variance):
  with jax.enable_x64(x64):
    u, forgot, r, never = _ulira_data(np.random.default_rng(0), x64)
    res = lira.ulira(u, forgot, r, never, fix_variance=fix_variance)
  p_u, p_r, scored = _ulira_np(u, forgot, r, never, fix_variance, loo=True)
  np.testing.assert_allclose(res.prob_unlearned, p_u, **tol)
  np.testing.assert_allclose(res.prob_retrained, p_r, **tol)
  np.testing.assert_array_equal(res.samples, np.flatnonzero(scored))
  fu, nr = forgot[:, scored], never[:, scored]
  pu, pr = (np.asarray(p)[:, scored] for p in (res.prob_unlearned, res.prob_retrained))
  np.testing.assert_allclose(res.member_prob, (pu * fu).sum(0) / fu.sum(0), **tol)
  acc = 0.5 * (((pu > 0.5) & fu).sum(0) / fu.sum(0) + ((pr <= 0.5) & nr).sum(0) / nr.sum(0))
  np.testing.assert_allclose(res.accuracy, acc)
  assert res.balanced_accuracy == pytest.approx(acc.mean())
  # The BCa bootstrap interval of the mean of the per-sample accuracies computed here
  # (metrics.mean_interval is checked against NumPy bootstraps in test_attacks_metrics.py).
  assert res.ci95 == pytest.approx(metrics.mean_interval(acc), abs=1e-12)
  assert res.ci95[0] < acc.mean() < res.ci95[1]


def test_ulira_never_fits_on_the_scored_model():
  """An outlying observation is scored against the fit of the *other* unlearned models only."""
  u, forgot, r, never = _ulira_data(np.random.default_rng(0), True, n=3)
  forgot[:, 0] = never[:, 0] = True
  u[:, 0] += 5
  u[3, 0] = r[:, 0].mean()  # looks retrained; within its own fit it would look unlearned
  with jax.enable_x64(True):
    got = lira.ulira(u, forgot, r, never).prob_unlearned[3, 0]
  others = np.delete(u[:, 0], 3)
  want = scipy.special.expit(scipy.stats.norm.logpdf(u[3, 0], others.mean(), others.std())
                             - scipy.stats.norm.logpdf(u[3, 0], r[:, 0].mean(), r[:, 0].std()))
  assert want < 1e-3
  assert got == pytest.approx(want, rel=1e-9)


def test_ulira_reference_variant_on_01_data_is_finite_and_matches_scipy_where_defined():
  rng = np.random.default_rng(0)
  m, n = 12, 30
  correct = (rng.random((m, n)) < np.linspace(0.2, 1.0, n)).astype(np.float64)
  correct[:, -3:] = 1.0  # always right: sigma = 0 in both groups
  correct[:6, -6:-3] = 1.0  # right on the forgotten models only ...
  forgot = np.zeros((m, n), bool)
  forgot[:6] = rng.random((6, n)) < 0.6
  forgot[0] = True
  never = ~forgot
  never[:6] = False  # ... and the never-seen models come from the other six
  res = lira.ulira(correct, forgot, correct, never, reference=True)
  for p in (res.prob_unlearned, res.prob_retrained, res.member_prob, res.accuracy):
    assert np.all(np.isfinite(p))
  assert len(res.samples) == n
  with np.errstate(divide="ignore", invalid="ignore"):
    for j in range(n):
      f, nv = correct[forgot[:, j], j], correct[never[:, j], j]
      for mm in np.flatnonzero(forgot[:, j]):
        z = correct[mm, j]
        pf = scipy.stats.norm.pdf(z, f.mean(), f.std())
        pn = scipy.stats.norm.pdf(z, nv.mean(), nv.std())
        ref = pf / (pf + pn)  # the reference's formula: NaN whenever a sigma is 0
        got = float(res.prob_unlearned[mm, j])
        if np.isfinite(ref):
          assert got == pytest.approx(ref, abs=1e-6)
        elif f.std() == 0 and nv.std() == 0:
          assert got == (0.5 if f.mean() == nv.mean() else 1.0)
        elif f.std() == 0:  # z sits on U's point mass
          assert got == pytest.approx(1.0, abs=1e-9)
        else:  # R is a point mass: at z (0) or elsewhere (1)
          assert got == pytest.approx(0.0 if nv.mean() == z else 1.0, abs=1e-9)
  assert res.prob_unlearned[0, -1] == 0.5  # both point masses at 1
  with pytest.raises(ValueError, match="0/1"):
    lira.ulira(correct + 0.5, forgot, correct, never, reference=True)


@pytest.mark.parametrize("delta", [0.0, 2.0])
def test_ulira_synthetic_balanced_accuracy(delta):
  """Unlearned ~ N(delta, 1), retrained ~ N(0, 1): the Bayes accuracy is Phi(delta / 2)."""
  rng = np.random.default_rng(0)
  m, n = 40, 400
  u, r = rng.normal(delta, 1, (m, n)), rng.normal(0, 1, (m, n))
  res = lira.ulira(u, np.ones((m, n), bool), r, np.ones((m, n), bool))
  assert res.balanced_accuracy == pytest.approx(scipy.stats.norm.cdf(delta / 2), abs=0.03)
  assert res.ci95[0] < res.balanced_accuracy < res.ci95[1]
  pooled = np.concatenate([np.asarray(res.prob_unlearned).ravel(),
                           np.asarray(res.prob_retrained).ravel()])
  labels = np.r_[np.ones(m * n), np.zeros(m * n)]
  assert roc_auc_score(labels, pooled) == pytest.approx(scipy.stats.norm.cdf(delta / np.sqrt(2)),
                                                        abs=0.03)


def test_ulira_bad_input():
  u, f = np.zeros((3, 4)), np.ones((3, 4), bool)
  with pytest.raises(ValueError, match="differ in N"):
    lira.ulira(u, f, np.zeros((3, 5)), np.ones((3, 5), bool))
  with pytest.raises(ValueError, match="never has shape"):
    lira.ulira(u, f, u, f[:2])
  with pytest.raises(ValueError, match="no sample"):
    lira.ulira(u, f & False, u, f)
  with pytest.raises(ValueError, match="NaN"):
    lira.ulira(u + np.nan, f, u, f)
