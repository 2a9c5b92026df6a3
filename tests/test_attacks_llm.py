"""LLM unlearning attacks and metrics (`jaxmu.attacks.llm`) against float64 NumPy code written
here from the spec (iam-spec 3.6, 4.1, 4.4, 9.5, 10.6), loops and all, plus closed forms and
edge cases."""

import math
import zlib

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_curve

from jaxmu.attacks import llm

N = 150  # 64 + 64 + 22: the IAM pooling batches do not divide N


@pytest.fixture(scope="module")
def chunks():
  rng = np.random.default_rng(3)
  labels = np.tile([1, 1, 0], N // 3)
  fit = rng.gamma(2.0, 0.5, N)
  nll = fit + (1 - labels) * rng.gamma(2.0, 0.3, N) + np.abs(rng.normal(0, 0.05, N))
  ref = fit + rng.gamma(2.0, 0.4, N)
  pop = rng.gamma(2.0, 0.6, 40)
  return {"labels": labels, "nll": nll, "fit": fit, "ref": ref,
          "pop": (pop + rng.gamma(1, 0.1, 40), pop, pop + rng.gamma(1, 0.3, 40))}


@pytest.fixture(scope="module")
def tokens():
  """Per-token signals from real logits [N, T, V] of random chunks of varying length."""
  rng = np.random.default_rng(4)
  n, t, v = 24, 30, 50
  logits = rng.normal(0, 2.0, (n, t, v))
  logits[:, :, 0] += rng.normal(0, 4, (n, t))  # some confident positions (low entropy)
  targets = rng.integers(0, v, (n, t))
  targets[: n // 2, ::2] = 0
  logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  logp = np.take_along_axis(logsm, targets[..., None], -1)[..., 0]
  lengths = rng.integers(3, t + 1, n)
  lengths[0], lengths[1] = t, 4  # a full row; a row too short for Min-K% (int(0.2 * 4) = 0)
  mask = np.arange(t)[None, :] < lengths[:, None]
  entropy = -(np.exp(logsm) * logsm).sum(-1)
  return {"logp": np.where(mask, logp, np.nan), "mask": mask, "entropy": entropy,
          "mu": logsm.mean(-1), "sigma": logsm.std(-1, ddof=1)}


# ------------------------------------------------------------------------ references from the spec


def ref_iam(nll, fit, ref, steps=1000, eps1=0.1, eps2=1e-5, batch=64):
  """iam-spec 3.6, one datasets.map batch at a time, as ``ip_ppl``."""
  out = []
  for start in range(0, len(nll), batch):
    sig = [-np.log(eps1 - np.log(eps2 + 1 - np.exp(-x[start:start + batch])))
           for x in (nll, fit, ref)]
    g, g_fit, g_ref = sig
    alphas = np.linspace(0, 1, steps)
    inter = np.stack([g_fit + (g_ref - g_fit) * a for a in alphas])  # [A, B]
    std = np.array([inter[a].std() for a in range(steps)])[:-1] + 1e-9
    scores = []
    beta = np.sqrt(6) * std / np.pi  # one per step a = 0..A-2
    for j in range(len(g)):  # weights alpha_{a+1} on rows a (the off-by-one)
      cdf = stats.gumbel_r.cdf(g[j], inter[:-1, j] - 0.5772 * beta, beta)
      scores.append(1 - np.sum(alphas[1:] * cdf) / alphas[1:].sum())
    out += scores
  return np.array(out)


def ref_lira(nll, fit, ref):
  phi = lambda x: np.log(np.exp(-x) / (1 - np.exp(-x) + 1e-30))
  p_in = -stats.norm.logpdf(phi(nll), loc=phi(fit), scale=0 + 1e-30)
  p_out = -stats.norm.logpdf(phi(nll), loc=phi(ref), scale=0 + 1e-30)
  return -(p_in - p_out)


def ref_rmia(nll, fit, ref, pop_t, pop_in, pop_out, gamma=2.0):
  out = []
  for i in range(len(nll)):
    pr_x = stats.trim_mean([np.exp(-fit[i]), np.exp(-ref[i])], 0.2)
    hits = 0
    for z in range(len(pop_t)):
      pr_z = stats.trim_mean([np.exp(-pop_in[z]), np.exp(-pop_out[z])], 0.2)
      hits += (np.exp(-nll[i]) / pr_x) * (1 / (np.exp(-pop_t[z]) / pr_z)) > gamma
    out.append(hits / len(pop_t))
  return np.array(out)


def ref_lowest_k(values, mask, k):
  out = []
  for v, m in zip(values, mask):
    v = np.sort(v[m])
    c = int(k / 100 * len(v))
    out.append(np.mean(v[:c]) if c else 0.0)  # NaN -> 0.0 as the metrics read it
  return np.array(out)


def ref_surp(logp, entropy, mask, k=40, max_entropy=2.0):
  out = []
  for lp, en, m in zip(logp, entropy, mask):
    lp, en = lp[m], en[m]
    lowest = np.argsort(lp, kind="stable")[: int(k / 100 * len(lp))]
    both = np.intersect1d(lowest, np.flatnonzero(en < max_entropy))
    out.append(lp[both].mean() if both.size else -100.0)
  return np.array(out)


def ref_round(y, s, levels=(0.1, 0.01)):
  fpr, tpr, _ = roc_curve(y, s)
  return sk_auc(fpr, tpr), [tpr[np.argmin(np.abs(fpr - t))] for t in levels]


# ------------------------------------------------------------------------ attacks


def test_iam_on_equals_the_spec_loop_with_64_chunk_batches(chunks):
  d = chunks
  got = llm.iam_on(d["nll"], d["fit"], d["ref"], raw=True)
  want = ref_iam(d["nll"], d["fit"], d["ref"], steps=1000)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(llm.iam_on(d["nll"], d["fit"], d["ref"]), 1 - want, atol=1e-12)
  assert ((got >= 0) & (got <= 1)).all()


def test_iam_on_pooling_boundary(chunks):
  """sigma is pooled per 64 consecutive chunks: changing the last (22-chunk) batch leaves the
  first two batches' scores alone; a smaller batch or no batching changes them."""
  d = chunks
  base = llm.iam_on(d["nll"], d["fit"], d["ref"], num_interp=50)
  ref2 = d["ref"].copy()
  ref2[128:] += 1.0
  moved = llm.iam_on(d["nll"], d["fit"], ref2, num_interp=50)
  np.testing.assert_array_equal(moved[:128], base[:128])
  assert not np.allclose(moved[128:], base[128:])
  np.testing.assert_allclose(
      base, 1 - ref_iam(d["nll"], d["fit"], d["ref"], steps=50), atol=1e-12)
  pooled = llm.iam_on(d["nll"], d["fit"], d["ref"], num_interp=50, batch_size=None)
  np.testing.assert_allclose(
      pooled, 1 - ref_iam(d["nll"], d["fit"], d["ref"], steps=50, batch=N), atol=1e-12)
  assert not np.allclose(pooled, base)
  small = llm.iam_on(d["nll"][:10], d["fit"][:10], d["ref"][:10], num_interp=50)  # N < 64
  np.testing.assert_allclose(
      small, 1 - ref_iam(d["nll"][:10], d["fit"][:10], d["ref"][:10], steps=50), atol=1e-12)


def test_iam_on_closed_form_when_fit_equals_out():
  """fit == OUT: every step is the same Gumbel, so raw = 1 - F(g) with the batch's std."""
  nll = np.array([0.5, 1.0, 2.0, 3.0])
  fit = np.array([0.8, 1.1, 1.9, 2.5])
  g = llm.gumbel_signal(nll)
  gf = -np.log(0.1 - np.log(1e-5 + 1 - np.exp(-fit)))
  beta = math.sqrt(6) * (gf.std() + 1e-9) / math.pi
  want = 1 - np.exp(-np.exp(-(g - (gf - 0.5772 * beta)) / beta))
  np.testing.assert_allclose(llm.iam_on(nll, fit, fit, raw=True), want, rtol=1e-12)


def test_lira_on_is_the_degenerate_reference_form(chunks):
  d = chunks
  got = llm.lira_on(d["nll"], d["fit"], d["ref"], raw=True)
  np.testing.assert_allclose(got, ref_lira(d["nll"], d["fit"], d["ref"]), rtol=1e-9)
  assert np.isfinite(got).all() and np.abs(got).max() > 1e50  # float64 needed
  np.testing.assert_array_equal(llm.lira_on(d["nll"], d["fit"], d["ref"]), -got)


def test_rmia_on_equals_the_pairwise_loop(chunks):
  d = chunks
  got = llm.rmia_on(d["nll"], d["fit"], d["ref"], *d["pop"], raw=True, block=7)
  np.testing.assert_array_equal(got, ref_rmia(d["nll"], d["fit"], d["ref"], *d["pop"]))
  np.testing.assert_array_equal(llm.rmia_on(d["nll"], d["fit"], d["ref"], *d["pop"]), 1 - got)


def test_loss_zlib_ratio(chunks):
  d = chunks
  texts = [f"chunk {i} " * (1 + i % 7) + "words" * (i % 3) for i in range(N)]
  np.testing.assert_array_equal(llm.loss(d["nll"], raw=True), -d["nll"])
  np.testing.assert_array_equal(llm.loss(d["nll"]), d["nll"])
  ent = [len(zlib.compress(t.encode())) / len(t) for t in texts]
  np.testing.assert_allclose(llm.zlib_score(d["nll"], texts, raw=True), -d["nll"] / ent,
                             rtol=1e-15)
  np.testing.assert_allclose(llm.ratio(d["nll"], d["ref"], raw=True), -d["nll"] / d["ref"],
                             rtol=1e-15)
  # Compressed bytes over characters.
  assert llm.zlib_entropy(["é" * 10])[0] == len(zlib.compress(("é" * 10).encode())) / 10


def test_min_k_and_min_k_plus_plus(tokens):
  t = tokens
  got = llm.min_k(t["logp"], t["mask"], raw=True)
  np.testing.assert_allclose(got, ref_lowest_k(t["logp"], t["mask"], 20), rtol=1e-12)
  assert got[1] == 0.0  # 4 tokens: nothing selected
  score = (t["logp"] - t["mu"]) / t["sigma"]
  got = llm.min_k_plus_plus(t["logp"], t["mu"], t["sigma"], t["mask"], raw=True)
  np.testing.assert_allclose(got, ref_lowest_k(score, t["mask"], 20), rtol=1e-12)
  np.testing.assert_array_equal(llm.min_k_plus_plus(t["logp"], t["mu"], t["sigma"], t["mask"]),
                                -got)
  # All-valid input without a mask; k = 100 is the mean of every token.
  full = np.nan_to_num(t["logp"][:1])
  np.testing.assert_allclose(llm.min_k(full, k=100, raw=True), full.mean(1), rtol=1e-12)


def test_surp(tokens):
  t = tokens
  got = llm.surp(t["logp"], t["entropy"], t["mask"], raw=True)
  np.testing.assert_allclose(got, ref_surp(t["logp"], t["entropy"], t["mask"]), rtol=1e-12)
  assert (got == -100).any() and (got != -100).any()
  # Ties at the k-th lowest value go to the earlier token.
  logp = np.array([[-1.0, -2.0, -2.0, -0.5, -0.1]])
  ent = np.array([[0.1, 5.0, 0.1, 0.1, 0.1]])  # k = 40: 2 lowest = tokens 1 and 2 (tie -> 1)
  assert llm.surp(logp, ent, k=40, raw=True)[0] == -2.0  # token 2 (low entropy)
  assert llm.surp(logp, ent, k=20, raw=True)[0] == -100.0  # token 1 only, high entropy


def test_bag_of_words_is_out_of_fold_and_seeded():
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1], 30)
  words = np.array(["alpha", "beta", "gamma", "delta"])
  texts = [" ".join(rng.choice(words[:2] if y else words[2:], 12)) + " common" for y in labels]
  raw = llm.bag_of_words(texts, labels, raw=True)
  assert raw.shape == (60,) and ((raw >= 0) & (raw <= 1)).all()
  assert raw[labels == 1].min() > raw[labels == 0].max()
  np.testing.assert_array_equal(raw, llm.bag_of_words(texts, labels, raw=True))
  np.testing.assert_array_equal(llm.bag_of_words(texts, labels), 1 - raw)
  with pytest.raises(ValueError, match="5 chunks of each label"):
    llm.bag_of_words(texts[:33], labels[:33])


def test_orientation_forgotten_chunks_score_higher(chunks):
  d = chunks
  forgotten = d["labels"] == 0
  for name, s in (("iam_on", llm.iam_on(d["nll"], d["fit"], d["ref"])),
                  ("lira_on", llm.lira_on(d["nll"], d["fit"], d["ref"])),
                  ("rmia_on", llm.rmia_on(d["nll"], d["fit"], d["ref"], *d["pop"])),
                  ("loss", llm.loss(d["nll"])), ("ratio", llm.ratio(d["nll"], d["ref"]))):
    assert s[forgotten].mean() > s[~forgotten].mean(), name
    np.testing.assert_allclose(llm.to_raw(name, s), -s if llm.ATTACKS[name][2] == "neg"
                               else 1 - s)


@pytest.mark.parametrize("call, match", [
    (lambda d: llm.iam_on(d["nll"], np.r_[d["fit"][:-1], np.nan], d["ref"]), "fit_nll"),
    (lambda d: llm.iam_on(d["nll"], d["fit"], d["ref"][:-1]), "ref_nll"),
    (lambda d: llm.iam_on(-d["nll"], d["fit"], d["ref"]), "nll must be >= 0"),
    (lambda d: llm.iam_on(d["nll"], d["fit"], d["ref"], batch_size=0), "batch_size"),
    (lambda d: llm.lira_on(d["nll"], d["fit"][:3], d["ref"]), "fit_nll"),
    (lambda d: llm.rmia_on(d["nll"], d["fit"], d["ref"], d["pop"][0], d["pop"][1][:5],
                           d["pop"][2]), "pop_fit_nll"),
    (lambda d: llm.ratio(d["nll"], 0 * d["ref"]), "ref_nll"),
    (lambda d: llm.zlib_score(d["nll"], ["x"] * (N - 1)), "texts"),
    (lambda d: llm.zlib_score(d["nll"][:1], [""]), r"texts\[0\]"),
    (lambda d: llm.min_k(np.zeros(5)), "token_logp"),
    (lambda d: llm.min_k(np.zeros((2, 5)), np.ones((2, 4), bool)), "mask"),
    (lambda d: llm.min_k(np.full((2, 5), np.nan)), "token_logp contains NaN"),
    (lambda d: llm.min_k_plus_plus(np.zeros((2, 5)), np.zeros((2, 5)), np.zeros((2, 5))),
     "vocab_std"),
    (lambda d: llm.surp(np.zeros((2, 5)), np.zeros((2, 4))), "token_entropy"),
    (lambda d: llm.bootstrap_metrics(np.r_[d["labels"][:-1], 2], d["nll"]), "labels"),
    (lambda d: llm.bootstrap_metrics(np.ones(N), d["nll"]), "only one class"),
    (lambda d: llm.bootstrap_metrics(d["labels"], d["nll"][:-1]), "scores"),
    (lambda d: llm.bootstrap_metrics(d["labels"], d["nll"], rounds=0), "rounds"),
    (lambda d: llm.score_ui(np.zeros((1, 5)), [1.0]), "scores must be"),
])
def test_bad_inputs_raise_naming_the_argument(chunks, call, match):
  with pytest.raises(ValueError, match=match):
    call(chunks)


# ------------------------------------------------------------------------ metrics


def test_bootstrap_indices_are_balanced_and_seeded(chunks):
  labels = chunks["labels"]
  idx = llm.bootstrap_indices(labels, rounds=20, seed=5)
  m = (labels == 0).sum()
  assert idx.shape == (20, 2 * m)
  assert (labels[idx[:, :m]] == 1).all() and (labels[idx[:, m:]] == 0).all()
  np.testing.assert_array_equal(idx, llm.bootstrap_indices(labels, rounds=20, seed=5))
  assert not np.array_equal(idx, llm.bootstrap_indices(labels, rounds=20, seed=6))


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_bootstrap_metrics_equal_sklearn_per_round(chunks, decimals):
  """Each round's AUC and TPR@closest-FPR as sklearn's roc_curve (drop_intermediate) and auc,
  with many ties when the scores are rounded."""
  labels, scores = chunks["labels"], chunks["nll"] * 3
  if decimals is not None:
    scores = np.round(scores, decimals)
  rounds = 60
  got = llm.bootstrap_metrics(labels, scores, rounds=rounds, seed=1, block=7)
  idx = llm.bootstrap_indices(labels, rounds, seed=1)
  per = [ref_round(labels[i], -scores[i]) for i in idx]
  aucs = np.array([p[0] for p in per])
  tprs = np.array([p[1] for p in per])
  np.testing.assert_allclose(got["auc"], aucs.mean(), rtol=1e-12)
  np.testing.assert_allclose(got["auc_std"], aucs.std(), rtol=1e-9, atol=1e-15)
  for j, level in enumerate((0.1, 0.01)):
    np.testing.assert_allclose(got[f"tpr_at_fpr_{level}"], tprs[:, j].mean(), rtol=1e-12)
    np.testing.assert_allclose(got[f"tpr_at_fpr_{level}_std"], tprs[:, j].std(), rtol=1e-9,
                               atol=1e-15)


def test_pad_tokens_and_membership_orientation(tokens, chunks):
  rows = [np.array([-1.0, -2.0]), np.array([-0.5]), np.array([-3.0, -0.1, -0.2])]
  values, mask = llm.pad_tokens(rows)
  assert values.shape == mask.shape == (3, 3) and mask.sum() == 6
  np.testing.assert_array_equal(values[1], [-0.5, 0, 0])
  np.testing.assert_array_equal(llm.min_k(values, mask, k=50, raw=True), [-2.0, 0.0, -3.0])
  labels, raw = chunks["labels"], llm.iam_on(chunks["nll"], chunks["fit"], chunks["ref"], raw=True)
  a = llm.bootstrap_metrics(labels, raw, rounds=30, membership=True)
  b = llm.bootstrap_metrics(labels, 1 - raw, rounds=30)
  assert a == pytest.approx(b, rel=1e-12)


def test_bootstrap_metrics_closed_forms():
  labels = np.repeat([1, 0], [30, 20])
  unlearn = np.r_[np.linspace(0, 1, 30), np.linspace(2, 3, 20)]  # perfect: forgotten higher
  m = llm.bootstrap_metrics(labels, unlearn, rounds=50)
  assert m["auc"] == 1.0 and m["auc_std"] == pytest.approx(0, abs=1e-12)
  # Without resampling, the closest-FPR point of a perfect ROC (0,0)-(0,1)-(1,1) (distinct
  # scores: the collinear points are dropped) is the origin, the first point with FPR 0.
  aucs, tprs = llm._round_metrics(labels, -unlearn, np.arange(50)[None], (0.1, 0.01))
  assert aucs[0] == pytest.approx(1, abs=1e-12) and tprs[0.1][0] == 0.0 and tprs[0.01][0] == 0.0
  fpr, tpr, _ = roc_curve(labels, -unlearn)
  assert fpr.tolist() == [0, 0, 0, 1] and tpr[np.argmin(np.abs(fpr - 0.1))] == 0.0
  assert llm.bootstrap_metrics(labels, -unlearn, rounds=50)["auc"] == 0.0
  ties = llm.bootstrap_metrics(labels, np.zeros(50), rounds=50)
  assert ties["auc"] == 0.5 and ties["tpr_at_fpr_0.1"] == 0.0
  # One chunk per class: m = 1, every round is either ordered or tied.
  m1 = llm.bootstrap_metrics(np.array([1, 0]), np.array([0.0, 1.0]), rounds=5)
  assert m1["auc"] == 1.0


def test_score_ui_spearman(chunks):
  rng = np.random.default_rng(0)
  levels = np.linspace(0, 1, 5)
  scores = -(levels[:, None] + rng.normal(0, 0.3, (5, 40)))  # unlearning = -membership
  got = llm.score_ui(scores, levels, rounds=10, fraction=0.8, seed=2)
  x, y = -scores.ravel(), np.repeat(levels, 40)
  assert got["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], rel=1e-12)
  r = np.random.default_rng(2)
  picks = r.integers(0, 200, (10, 160))  # the notebook: 80% of the pairs, with replacement
  rhos = [stats.spearmanr(x[p], y[p])[0] for p in picks]
  assert got["spearman_mean"] == pytest.approx(np.mean(rhos), rel=1e-12)
  assert got["spearman_std"] == pytest.approx(np.std(rhos), rel=1e-9)
  perfect = llm.score_ui(-levels[:, None], levels, rounds=3)
  assert perfect["spearman"] == pytest.approx(1, abs=1e-12)


def test_table7_readouts_are_min_max_normalised():
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  raw = np.array([0.1, 0.5, 0.41, 0.4, 0.9, 0.79, 0.8, 0.3])
  shares = llm.iam_threshold_shares(raw, labels, normalize=False)
  assert shares == {"forget_above": 0.5, "retain_below": 0.5}
  norm = (raw - 0.1) / 0.8  # [0, .5, .3875, .375, 1, .8625, .875, .25]
  assert llm.iam_threshold_shares(raw, labels) == {"forget_above": 0.25, "retain_below": 0.25}
  s = llm.membership_summary(raw, labels)
  assert s["mean_0"] == pytest.approx(norm[:4].mean()) and s["std_1"] == pytest.approx(
      norm[4:].std())
  s = llm.membership_summary(-raw * 1e60, labels)  # LiRA-sized scores become readable
  assert s["mean_1"] == pytest.approx(1 - norm[4:].mean())
  assert llm.minmax(np.ones(3)).tolist() == [0, 0, 0]
