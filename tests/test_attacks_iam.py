"""IAM score against an explicit float64 NumPy implementation of iam-spec 3.2/3.3; BinUI, ScoreUI
(7.5), class-level metrics (9.3)."""

import math

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats

from jaxmu.attacks import iam

PRECISIONS = [(False, dict(atol=1e-5, rtol=0)), (True, dict(atol=1e-12, rtol=1e-9))]


def reference_iam(s_unl, s_fit, s_sh, A, dist, fix_variance):
  """iam-spec 3.3 pseudocode with the [K, A, N] array materialised, plus the 1e-10 floors."""
  s_unl, s_fit, s_sh = (np.asarray(x, np.float64) for x in (s_unl, s_fit, s_sh))
  alphas = np.linspace(0, 1, A)
  interp = s_sh[:, None, :] + alphas[None, :, None] * (np.broadcast_to(s_fit, s_unl.shape)[None, None, :]
                                                       - s_sh[:, None, :])
  interp = interp[:, : A - 1, :]
  mu = interp.mean(0)
  if fix_variance or s_sh.shape[0] == 1:
    sigma = interp.std(axis=(0, 2))[:, None]
  else:
    sigma = interp.std(0)
  scale = np.maximum(sigma, 1e-10)
  if dist == "gumbel":
    beta = math.sqrt(6) * scale / math.pi
    F = scipy.stats.gumbel_r.cdf(s_unl, loc=mu - 0.5772 * beta, scale=beta)
  elif dist == "norm":
    F = scipy.stats.norm.cdf(s_unl, loc=mu, scale=scale)
  elif dist == "ecdf":
    F = (interp <= s_unl).mean(0)
  elif dist == "kde":
    F = scipy.special.ndtr((s_unl - interp) / scale).mean(0)
  else:
    m = np.clip(mu, 1e-10, 1 - 1e-10)
    t = np.maximum(m * (1 - m) / np.maximum(sigma**2, 1e-10) - 1, 1e-10)
    F = scipy.stats.beta.cdf(s_unl, np.maximum(m * t, 1e-10), np.maximum((1 - m) * t, 1e-10))
  w = alphas[1:]
  return 1 - (w[:, None] * F).sum(0) / w.sum()


def _signals(x64, n=60, k=5, online=True, grid=False):
  """Fresh random signals in [0, 1]: target, fit ([N] or scalar), shadows [K, N]. With ``grid``,
  multiples of 1/64 (exact interpolation, deliberate ties) for the step-function ecdf."""
  rng = np.random.default_rng(0)
  draw = (lambda *s: rng.integers(0, 65, s) / 64) if grid else (lambda *s: rng.beta(2, 2, s))
  dtype = np.float64 if x64 else np.float32
  fit = draw(n) if online else draw()
  return draw(n).astype(dtype), np.asarray(fit, dtype), draw(k, n).astype(dtype)


@pytest.mark.parametrize("x64,tol", PRECISIONS)
@pytest.mark.parametrize("fix_variance", [True, False])
@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("dist", iam.DISTS)
def test_iam_matches_numpy_reference(dist, online, fix_variance, x64, tol):
  A = 9 if dist == "ecdf" else 20  # alphas a / 8 are exact in binary for the ecdf grid
  with jax.enable_x64(x64):
    target, fit, shadows = _signals(x64, online=online, grid=dist == "ecdf")
    got = iam.iam_score(target, fit, shadows, num_interp=A, dist=dist, fix_variance=fix_variance)
    assert got.dtype == target.dtype and got.shape == target.shape
    if dist == "beta" and not x64:  # JAX's float32 betainc errs up to ~2e-4 for a, b in the hundreds
      tol = dict(atol=5e-4, rtol=0)
    np.testing.assert_allclose(got, reference_iam(target, fit, shadows, A, dist, fix_variance), **tol)


@pytest.mark.parametrize("dist", ["gumbel", "ecdf", "kde"])  # the per-sample and [K, A] paths
def test_iam_chunking_does_not_change_scores(dist):
  target, fit, shadows = _signals(False, n=50, k=3, grid=dist == "ecdf")
  whole = iam.iam_score(target, fit, shadows, num_interp=9, dist=dist, chunk_size=50)
  for chunk in (1, 16):  # 16 does not divide 50: a zero-padded last chunk
    np.testing.assert_allclose(iam.iam_score(target, fit, shadows, num_interp=9, dist=dist,
                                             chunk_size=chunk), whole, atol=1e-6)


def test_default_chunking_bounds_memory():
  # N = 300,000, K = 128, A = 100 would be 15 GB as [K, A, N] float32; one loop step holds
  # about 2**20 values (4 MiB).
  per_chunk = iam._CHUNK_ELEMENTS
  assert per_chunk // (99 * 128) * 99 * 128 * 4 <= 4 * 2**20
  target, fit, shadows = _signals(False, n=500, k=128)
  chunk = iam._CHUNK_ELEMENTS // (99 * 128)
  text = iam._iam_score.lower(target, fit, shadows, True, num_interp=100, dist="kde",
                              chunk_size=chunk).as_text()
  assert f"128x99x{chunk}" in text or f"{chunk}x128x99" in text  # one chunk's [K, A] terms
  assert "128x99x500" not in text  # the full [K, A, N] array never appears
  assert "while" in text  # a loop over sample chunks


def test_k1_forces_fixed_variance_and_a2_is_no_interpolation():
  target, fit, shadows = _signals(True, k=1)
  with jax.enable_x64(True):
    target, fit, shadows = (np.asarray(x, np.float64) for x in (target, fit, shadows))
    np.testing.assert_allclose(iam.iam_score(target, fit, shadows, fix_variance=False),
                               iam.iam_score(target, fit, shadows, fix_variance=True), rtol=1e-12)
    # A = 2: only alpha = 0 with weight alpha_1 = 1: 1 - F(target) under the shadow Gumbel.
    got = iam.iam_score(target, fit, shadows, num_interp=2)
    sigma = shadows.std()
    beta = math.sqrt(6) * sigma / math.pi
    np.testing.assert_allclose(got, 1 - scipy.stats.gumbel_r.cdf(target, shadows[0] - 0.5772 * beta, beta),
                               rtol=1e-9)


@pytest.mark.parametrize("dist", iam.DISTS)
@pytest.mark.parametrize("fix_variance", [True, False])
def test_edge_cases_are_finite(dist, fix_variance):
  ones, zeros = np.ones(6, np.float32), np.zeros(6, np.float32)
  cases = {  # signals r_hat in [0, 1]; p = 0 and 1 map to exactly 0 and 1
      "zero variance, ties": (ones * 0.5, ones * 0.5, np.stack([ones, ones]) * 0.5),
      "p = 0 and 1": (np.r_[zeros[:3], ones[:3]], ones, np.stack([zeros, ones])),
      "K = 1": (ones * 0.3, ones, zeros[None]),
      "IAM-Off, constant shadows": (ones * 0.2, np.float32(1.0), np.stack([zeros, zeros])),
  }
  for name, (target, fit, shadows) in cases.items():
    got = np.asarray(iam.iam_score(target, fit, shadows, num_interp=11, dist=dist, fix_variance=fix_variance))
    assert np.isfinite(got).all() and (got >= 0).all() and (got <= 1).all(), (name, got)


def test_iam_semantics_fitting_vs_generalising_target():
  rng = np.random.default_rng(0)
  n, k = 400, 4
  fit = rng.uniform(0.85, 1.0, n)
  shadows = rng.uniform(0.2, 0.6, (k, n))
  still_member = iam.iam_score(fit, fit, shadows)
  unlearned = iam.iam_score(shadows[0], fit, shadows)
  assert np.mean(still_member) < 0.2 < 0.6 < np.mean(unlearned)


@pytest.mark.parametrize("dist", ["gumbel", "kde"])
def test_binui_auc_matches_analytic_value(dist):
  # Shadows constant across samples make the score a decreasing function of the target signal,
  # so BinUI's AUC is that of the signals themselves: Phi(d / sqrt 2) for N(d, s) vs N(0, s).
  rng = np.random.default_rng(0)
  n, d, s = 4000, 1.0, 0.05
  forgotten = np.r_[np.ones(n), np.zeros(n)].astype(int)
  target = np.r_[rng.normal(0.4, s, n), rng.normal(0.4 + d * s, s, n)]
  shadows = np.repeat(rng.normal(0.4, s, (8, 1)), 2 * n, axis=1)
  out = iam.bin_ui(iam.iam_score(target, np.float32(0.95), shadows, dist=dist), forgotten,
                   num_bootstrap=0)
  assert abs(out["auc"] - scipy.stats.norm.cdf(d / math.sqrt(2))) < 0.02
  assert out["score_forgotten_mean"] > out["score_retained_mean"]
  same = iam.bin_ui(iam.iam_score(rng.permutation(target), np.float32(0.95), shadows, dist=dist),
                    forgotten, num_bootstrap=0)
  assert abs(same["auc"] - 0.5) < 0.03


def test_iam_off_constant_is_mean_of_shadow_means():
  rng = np.random.default_rng(0)
  per_shadow = [rng.random(m) for m in (10, 25, 7)]
  expected = np.mean([x.mean() for x in per_shadow])
  np.testing.assert_allclose(iam.iam_off_constant(per_shadow), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="at least one"):
    iam.iam_off_constant([])
  with pytest.raises(ValueError, match="NaN"):
    iam.iam_off_constant([np.array([0.1, np.nan])])


def test_score_ui_against_scipy():
  rng = np.random.default_rng(0)
  degree = np.arange(21) / 20
  scores = np.clip(1 - degree + 0.1 * rng.standard_normal((30, 21)), 0, 1)
  out = iam.score_ui(scores, degree)
  member = 1 - scores.ravel()
  member = (member - member.min()) / (member.max() - member.min())
  deg = np.broadcast_to(degree, scores.shape).ravel()
  np.testing.assert_allclose(out["spearman"], scipy.stats.spearmanr(member, deg)[0], rtol=1e-12)
  np.testing.assert_allclose(out["pearson"], np.corrcoef(member, deg)[0, 1], rtol=1e-12)
  np.testing.assert_allclose(out["mse"], np.mean((member - deg) ** 2), rtol=1e-12)
  assert out["spearman"] > 0.8



def _density_histogram(x, edges):
  """Per-bin count / (n * width) by explicit comparisons; the last bin closed, as np.histogram."""
  hist = []
  for i in range(len(edges) - 1):
    upper = x <= edges[i + 1] if i == len(edges) - 2 else x < edges[i + 1]
    hist.append(np.sum((x >= edges[i]) & upper) / (x.size * (edges[i + 1] - edges[i])))
  return hist


def test_score_ui_kl_and_mse_per_column():
  rng = np.random.default_rng(0)
  degree = np.arange(21) / 20
  scores = np.clip(1 - degree + 0.2 * rng.standard_normal((40, 21)), 0, 1)
  out = iam.score_ui(scores, degree)
  member = 1 - scores
  member = (member - member.min()) / (member.max() - member.min())
  deg = np.broadcast_to(degree, scores.shape)
  edges = np.linspace(0.0, 1.0, 21)  # np.histogram's 20 equal bins over the degree's range
  p, q = _density_histogram(deg.ravel(), edges), _density_histogram(member.ravel(), edges)
  kl = sum(pi * math.log((pi + 1e-10) / (qi + 1e-10)) for pi, qi in zip(p, q))
  np.testing.assert_allclose(out["kl"], kl, rtol=1e-10)
  assert out["kl"] > 0
  expected = [np.mean([(member[i, b] - degree[b]) ** 2 for i in range(40)]) for b in range(21)]
  assert isinstance(out["mse_per_column"], list) and len(out["mse_per_column"]) == 21
  np.testing.assert_allclose(out["mse_per_column"], expected, rtol=1e-12)
  np.testing.assert_allclose(np.mean(out["mse_per_column"]), out["mse"], rtol=1e-12)
  # 1-D scores: a single column; a membership equal to the degree (random values spanning [0, 1],
  # none within rounding of a bin edge) has equal histograms, so KL 0.
  deg = np.r_[0.0, 1.0, rng.random(300)]
  flat = iam.score_ui(1 - deg, deg)
  assert flat["mse_per_column"] == [flat["mse"]] and flat["mse"] < 1e-30
  assert flat["kl"] == 0.0
  with pytest.raises(ValueError, match=r"\[N\] or \[N, B \+ 1\]"):
    iam.score_ui(scores[None], degree)


def _class_inputs(seed=0, r=3, n=200):
  """[R, N] unlearning scores in (0, 1), forgotten flags (a different fraction per run)."""
  rng = np.random.default_rng(seed)
  forgotten = (rng.random((r, n)) < np.linspace(0.2, 0.5, r)[:, None]).astype(np.int64)
  scores = np.clip(0.3 + 0.4 * forgotten + 0.2 * rng.standard_normal((r, n)), 1e-3, 1 - 1e-3)
  return scores, forgotten


def _clamped_bce(s, b):
  """torch's weighted binary_cross_entropy, element by element, each log clamped at -100."""
  pos_weight = np.sum(b == 0) / np.sum(b == 1)
  total = 0.0
  for si, bi in zip(s.tolist(), b.tolist()):
    log_s = max(math.log(si), -100.0) if si > 0 else -100.0
    log_1ms = max(math.log(1 - si), -100.0) if si < 1 else -100.0
    total += -(pos_weight if bi == 1 else 1.0) * (bi * log_s + (1 - bi) * log_1ms)
  return total / s.size


def _expected_class_stats(s, b):
  pos, neg = s[b == 1], s[b == 0]
  # AUC as the Mann-Whitney statistic: P(s_pos > s_neg) + P(tie) / 2.
  auc = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
  k1, k0 = max(int(0.1 * pos.size), 1), max(int(0.1 * neg.size), 1)
  out = {"auc": auc, "bce": _clamped_bce(s, b),
         "last_1": np.sort(pos)[:k1].mean(), "last_0": np.sort(neg)[::-1][:k0].mean()}
  for flag, x in ((1, pos), (0, neg)):
    out.update({f"mean_{flag}": x.mean(), f"std_{flag}": np.sqrt(np.mean((x - x.mean()) ** 2)),
                f"max_{flag}": x.max(), f"min_{flag}": x.min()})
  return out


def test_class_level_metrics_against_numpy():
  scores, forgotten = _class_inputs()
  # Scores of exactly 1 (retained) and 0 (forgotten) make log(s) and log(1 - s) = -inf: clamped.
  scores[0, np.flatnonzero(forgotten[0] == 0)[0]] = 1.0
  scores[1, np.flatnonzero(forgotten[1] == 1)[0]] = 0.0
  scores[2, np.flatnonzero(forgotten[2] == 1)[0]] = 1.0  # log(1) = 0 terms, no clamp
  out = iam.class_level_metrics(scores, forgotten.astype(bool))
  s, b = 1 - scores, 1 - forgotten
  keys = {"auc", "bce", "mean_1", "std_1", "max_1", "min_1", "last_1",
          "mean_0", "std_0", "max_0", "min_0", "last_0"}
  expected_runs = [_expected_class_stats(s[r], b[r]) for r in range(3)]
  assert len(out["runs"]) == 3
  for got, want in zip(out["runs"], expected_runs):
    assert set(got) == keys and all(type(v) is float for v in got.values())
    for key in keys:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)
  pos_weight = np.sum(b[0] == 0) / np.sum(b[0] == 1)
  assert out["runs"][0]["bce"] > 100 * pos_weight / 200 and out["runs"][1]["bce"] > 100 / 200
  overall = _expected_class_stats(s.ravel(), b.ravel())
  overall["b_std"] = np.std([w["bce"] for w in expected_runs])
  overall["c_std1"] = np.std([w["mean_1"] for w in expected_runs])
  overall["c_std0"] = np.std([w["mean_0"] for w in expected_runs])
  assert set(out["overall"]) == keys | {"b_std", "c_std1", "c_std0"}
  for key, want in overall.items():
    assert type(out["overall"][key]) is float
    np.testing.assert_allclose(out["overall"][key], want, rtol=1e-12, err_msg=key)
  assert out["overall"]["b_std"] > 0 and out["overall"]["auc"] > 0.8


def test_class_level_metrics_last_uses_at_least_one_sample():
  scores, forgotten = _class_inputs(seed=1, r=2, n=200)
  forgotten[0] = 0
  forgotten[0, :5] = 1  # 5 forgotten samples: int(0.1 * 5) = 0, so k = 1
  out = iam.class_level_metrics(scores, forgotten)["runs"][0]
  assert out["last_0"] == out["max_0"]
  assert out["last_1"] == np.mean(np.sort(1 - scores[0, 5:])[:19])  # int(0.1 * 195) = 19


def test_class_level_metrics_bad_input_raises():
  scores, forgotten = _class_inputs(seed=2, r=2, n=50)
  with pytest.raises(ValueError, match=r"\[R, N\]"):
    iam.class_level_metrics(scores, forgotten[:, :-1])
  with pytest.raises(ValueError, match=r"\[R, N\]"):
    iam.class_level_metrics(scores[0], forgotten[0])
  with pytest.raises(ValueError, match="at least one run"):
    iam.class_level_metrics(scores[:0], forgotten[:0])
  with pytest.raises(ValueError, match="binary"):
    iam.class_level_metrics(scores, forgotten * 2)
  bad = scores.copy()
  bad[0, 0] = 1.5
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    iam.class_level_metrics(bad, forgotten)
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="finite"):
    iam.class_level_metrics(bad, forgotten)
  flags = forgotten.copy()
  flags[1] = 0
  with pytest.raises(ValueError, match="run 1 has no forgotten sample"):
    iam.class_level_metrics(scores, flags)
  flags[1] = 1
  with pytest.raises(ValueError, match="run 1 has no retained sample"):
    iam.class_level_metrics(scores, flags)

def test_bad_input_raises():
  target, fit, shadows = _signals(False)
  with pytest.raises(ValueError, match="N = 60"):
    iam.iam_score(target, fit, shadows[:, :-1])
  with pytest.raises(ValueError, match="K = 0"):
    iam.iam_score(target, fit, shadows[:0])
  with pytest.raises(ValueError, match="fit must be"):
    iam.iam_score(target, fit[:-1], shadows)
  with pytest.raises(ValueError, match="unknown dist"):
    iam.iam_score(target, fit, shadows, dist="laplace")
  with pytest.raises(ValueError, match="num_interp"):
    iam.iam_score(target, fit, shadows, num_interp=1)
  bad = target.copy()
  bad[3] = np.nan
  with pytest.raises(ValueError, match="target contains NaN"):
    iam.iam_score(bad, fit, shadows)
  with pytest.raises(ValueError, match="binary"):
    iam.bin_ui(target, np.full(target.shape, 2))
  with pytest.raises(ValueError, match="broadcast"):
    iam.score_ui(np.zeros((4, 21)), np.arange(20) / 20)
