"""Unlearning attacks on language models from per-chunk losses and per-token signals (iam-spec
3.6, 4.1, 4.4, 9.5, 10.6), as the IAM code's ``mia_llms_benchmark`` computes them.

Every input is a NumPy array (float64 inside), one entry per text chunk in the order given:

* ``nll`` [N]: the target (unlearned) model's mean token NLL of each chunk; ``fit_nll``: the
  original model's (the IN / fit reference, ``fitRef_nlloss``); ``ref_nll``: the OUT reference's
  (``ref_nlloss``); ``pop_*`` [Z]: the same three models on a population set (RMIA-On).
* ``token_logp`` [N, T]: log-probability of each next token under the target, with ``mask``
  [N, T] (True = a real token; padded positions are ignored and may hold anything);
  ``token_entropy`` [N, T]: entropy of the next-token distribution (SURP); ``vocab_mean`` and
  ``vocab_std`` [N, T]: mean and standard deviation (``torch.std``, ddof = 1) of the
  log-softmax over the vocabulary at each position (Min-K%++). `pad_tokens` pads ragged lists.
* ``texts`` [N]: the chunks' text (Zlib, bag-of-words).

Orientation: like `jaxmu.attacks.audit`, every attack returns an **unlearning** score (high =
looks unlearned / forgotten). ``raw=True`` returns the reference's own score instead, a
membership score (high = member; label 1 = retained chunk): the unlearning score is ``1 - raw``
for the bounded scores (IAM-On, RMIA-On, bag-of-words) and ``-raw`` for the others (`ATTACKS`).
The metrics (`bootstrap_metrics`) take unlearning scores (or, with ``membership=True``, raw
ones) and use positive = retained, so they equal the reference's metrics on its raw scores. `audit_files` runs everything on the text files
the reference writes.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from scipy import stats

# Bad saved inputs raise `jaxmu.errors.InputError`: one line naming the file (or flag), what is
# wrong and the fix. Bad arrays raise ValueError naming the argument.
from jaxmu.errors import InputError

# name -> (paper name, inputs beyond the target's nll, how the unlearning score comes from raw)
ATTACKS = {
    "iam_on": ("IAM-On", ("fit_nll", "ref_nll"), "one_minus"),
    "lira_on": ("LiRA-On", ("fit_nll", "ref_nll"), "neg"),
    "rmia_on": ("RMIA-On", ("fit_nll", "ref_nll", "pop_nll", "pop_fit_nll", "pop_ref_nll"),
                "one_minus"),
    "loss": ("Loss", (), "neg"),
    "zlib": ("Zlib", ("texts",), "neg"),
    "ratio": ("Ratio", ("ref_nll",), "neg"),
    "min_k": ("Min-K% Prob", ("token_logp",), "neg"),
    "min_k_plus_plus": ("Min-K%++", ("token_logp", "vocab_mean", "vocab_std"), "neg"),
    "surp": ("SURP", ("token_logp", "token_entropy"), "neg"),
    "bag_of_words": ("Bag-of-words", ("texts",), "one_minus"),
}
IAM_EPS = (0.1, 1e-5)  # the LLM IAM's (eps1, eps2) (iam-spec 2, 3.6)
IAM_STEPS = 1000
IAM_BATCH = 64  # the reference's ``datasets.map`` batch for ``ip_fit`` (iam-spec 3.6 step 5)
FPR_LEVELS = (0.1, 0.01)
# Table 7's read-out (iam-spec 10.6): forgotten chunks with IAM > 0.4, retained ones with < 0.8.
IAM_THRESHOLDS = (0.4, 0.8)


# ------------------------------------------------------------------------------ input checks


def _vector(x, name, n=None, nonnegative=False):
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array; got shape {a.shape}")
  if n is not None and a.shape[0] != n:
    raise ValueError(f"{name} has {a.shape[0]} entries; expected {n} (one per chunk)")
  if not np.isfinite(a).all():
    raise ValueError(f"{name} contains NaN or infinite values")
  if nonnegative and (a < 0).any():
    raise ValueError(f"{name} must be >= 0 (a mean token NLL); got min {a.min()}")
  return a


def _labels(labels, n=None, name="labels"):
  a = np.asarray(labels)
  if a.ndim != 1 or (n is not None and a.shape[0] != n):
    raise ValueError(f"{name} must have shape ({'N' if n is None else n},); got {a.shape}")
  if not np.isin(a, (0, 1)).all():
    raise ValueError(f"{name} must be 0/1 (1 = retained chunk); got values {np.unique(a)[:10]}")
  a = a.astype(np.int64)
  if a.min() == a.max():
    raise ValueError(f"{name} hold only one class; need retained (1) and forgotten (0) chunks")
  return a


def _tokens(x, name, shape=None):
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 2 or (shape is not None and a.shape != shape):
    want = f"{shape}" if shape is not None else "[N, T]"
    raise ValueError(f"{name} must have shape {want}; got {a.shape}")
  return a


def _mask(mask, shape, values):
  """The token mask (all True by default) after checking that the masked values are finite."""
  m = np.ones(shape, bool) if mask is None else np.asarray(mask)
  if m.shape != shape:
    raise ValueError(f"mask must have shape {shape} like token_logp; got {m.shape}")
  if m.dtype != bool:
    if not np.isin(m, (0, 1)).all():
      raise ValueError("mask must be bool or 0/1")
    m = m.astype(bool)
  for name, v in values.items():
    if not np.isfinite(v[m]).all():
      raise ValueError(f"{name} contains NaN or infinite values at unmasked tokens")
  return m


def _orient(name, raw_scores, raw):
  if raw:
    return raw_scores
  return 1.0 - raw_scores if ATTACKS[name][2] == "one_minus" else -raw_scores


def to_raw(name: str, scores):
  """The reference's raw membership score of attack ``name`` from its unlearning ``scores``."""
  scores = np.asarray(scores, np.float64)
  return 1.0 - scores if ATTACKS[name][2] == "one_minus" else -scores


def pad_tokens(rows: Sequence) -> tuple[np.ndarray, np.ndarray]:
  """Ragged per-chunk token arrays -> (values [N, T] float64 padded with 0, mask [N, T])."""
  rows = [np.asarray(r, np.float64).ravel() for r in rows]
  t = max((r.size for r in rows), default=0)
  values, mask = np.zeros((len(rows), t)), np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    values[i, :r.size], mask[i, :r.size] = r, True
  return values, mask


# ------------------------------------------------------------------------------ attacks


def gumbel_signal(nll, eps=IAM_EPS):
  """The LLM IAM signal (iam-spec 3.6 steps 1-2): g = -log(eps1 - log(eps2 + 1 - exp(-nll))),
  not min-max normalised. 1 - exp(-nll) is 1 - p: mirrored relative to the vision signal."""
  eps1, eps2 = eps
  proby = 1 - np.exp(-np.asarray(nll, np.float64))
  return -np.log(eps1 - np.log(eps2 + proby))


def iam_on(nll, fit_nll, ref_nll, *, num_interp=IAM_STEPS, eps=IAM_EPS, batch_size=IAM_BATCH,
           raw=False):
  """IAM-On for LLMs as ``iam_llm_score.ip_ppl`` (iam-spec 3.6).

  The Gumbel signal of the fit (original) and OUT (reference) models is interpolated from fit
  (alpha = 0) to OUT (alpha = 1) over ``num_interp`` steps, the last (pure OUT) dropped; each
  step's reference is a Gumbel with the interpolated value as its mean and, as its standard
  deviation, the std (ddof = 0) + 1e-9 of the step's values over the chunks of one **batch** of
  ``batch_size`` consecutive chunks (the reference's ``datasets.map`` batch of 64, in the order
  given; the last batch holds the N mod 64 rest; ``None`` pools all chunks). Raw score (a
  membership score, high = retained) = 1 - sum_a alpha_{a+1} F_a / sum_a alpha_a with F_a the
  Gumbel CDF of the target's signal (the off-by-one weights of iam-spec 3.2). The unlearning
  score is 1 - raw.
  """
  nll = _vector(nll, "nll", nonnegative=True)
  n = nll.shape[0]
  fit_nll = _vector(fit_nll, "fit_nll", n, nonnegative=True)
  ref_nll = _vector(ref_nll, "ref_nll", n, nonnegative=True)
  if int(num_interp) != num_interp or num_interp < 2:
    raise ValueError(f"num_interp must be an integer >= 2; got {num_interp}")
  if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
    raise ValueError(f"batch_size must be a positive integer or None; got {batch_size}")
  g, g_fit, g_ref = (gumbel_signal(x, eps) for x in (nll, fit_nll, ref_nll))
  alphas = np.linspace(0, 1, int(num_interp))
  weights = alphas[1:]
  step = n if batch_size is None else int(batch_size)
  membership = np.empty(n)
  for start in range(0, n, step):  # one reference batch at a time (iam-spec 12.3)
    sl = slice(start, start + step)
    inter = g_fit[None, sl] + (g_ref - g_fit)[None, sl] * alphas[:, None]  # [A, B]
    sigma = np.std(inter, axis=1)[:-1, None] + 1e-9
    beta = math.sqrt(6) * sigma / math.pi
    loc = inter[:-1] - beta * 0.5772
    cdf = np.exp(-np.exp(-(g[None, sl] - loc) / beta))
    membership[sl] = 1 - (weights[:, None] * cdf).sum(axis=0) / weights.sum()
  return _orient("iam_on", membership, raw)


def _scaled_logit(nll):
  p = np.exp(-nll)
  return np.log(p / (1 - p + 1e-30))


def lira_on(nll, fit_nll, ref_nll, *, raw=False):
  """LiRA-On for LLMs as ``lira_online.py`` (iam-spec 4.4, 12.6).

  Signal log(p / (1 - p + 1e-30)) with p = exp(-nll); the IN Gaussian is centred at the fit
  model's signal and the OUT one at the reference's, both with the std of a single value (0) plus
  1e-30. Raw = logpdf_IN - logpdf_OUT (high = member), i.e. (0.5e60) ((s - s_out)^2 -
  (s - s_in)^2): the reference's degenerate form, kept for parity (float64 needed). Unlearning
  score = -raw.
  """
  nll = _vector(nll, "nll", nonnegative=True)
  n = nll.shape[0]
  s, s_in, s_out = (_scaled_logit(_vector(x, name, n, nonnegative=True)) for x, name in
                    ((nll, "nll"), (fit_nll, "fit_nll"), (ref_nll, "ref_nll")))
  scale = 0.0 + 1e-30

  def logpdf(x, loc):
    z = (x - loc) / scale
    return -0.5 * z * z - math.log(scale) - 0.5 * math.log(2 * math.pi)

  return _orient("lira_on", logpdf(s, s_in) - logpdf(s, s_out), raw)


def rmia_on(nll, fit_nll, ref_nll, pop_nll, pop_fit_nll, pop_ref_nll, *, gamma=2.0, raw=False,
            block=1024):
  """RMIA-On for LLMs as ``rmia_online.py`` (iam-spec 4.1).

  Signals p = exp(-nll). Pr(x) = trim_mean(0.2) over the IN (fit) and OUT (reference) models'
  signals, which for two values is their mean; likewise Pr(z) on each population chunk z.
  Raw = the fraction of z with (p(x) / Pr(x)) * (Pr(z) / p(z)) > gamma (high = member);
  unlearning score = 1 - raw. The pairwise test runs in blocks of ``block`` chunks.
  """
  nll = _vector(nll, "nll", nonnegative=True)
  n = nll.shape[0]
  fit_nll, ref_nll = (_vector(x, k, n, True) for x, k in ((fit_nll, "fit_nll"),
                                                            (ref_nll, "ref_nll")))
  pop_nll = _vector(pop_nll, "pop_nll", nonnegative=True)
  z = pop_nll.shape[0]
  pop_fit_nll, pop_ref_nll = (_vector(x, k, z, True) for x, k in ((pop_fit_nll, "pop_fit_nll"),
                                                                    (pop_ref_nll, "pop_ref_nll")))
  p_x, p_z = np.exp(-nll), np.exp(-pop_nll)
  mean_x = np.stack([np.exp(-fit_nll), np.exp(-ref_nll)], 1).mean(1)
  mean_z = np.stack([np.exp(-pop_fit_nll), np.exp(-pop_ref_nll)], 1).mean(1)
  ratio_x = p_x / mean_x
  ratio_z_rev = 1.0 / (p_z / mean_z)
  score = np.empty(n)
  for start in range(0, n, block):
    pairs = np.outer(ratio_x[start:start + block], ratio_z_rev)
    score[start:start + block] = (pairs > float(gamma)).astype(np.float64).mean(axis=1)
  return _orient("rmia_on", score, raw)


def loss(nll, *, raw=False):
  """Loss (iam-spec 4.4): raw = -nll; unlearning score = nll."""
  return _orient("loss", -_vector(nll, "nll"), raw)


def zlib_entropy(texts) -> np.ndarray:
  """len(zlib.compress(text.encode())) / len(text) per chunk: compressed bytes per character."""
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str) or not t:
      raise ValueError(f"texts[{i}] must be a non-empty string; got {t!r:.40}")
  return np.array([len(zlib.compress(t.encode())) / len(t) for t in texts], np.float64)


def zlib_score(nll, texts, *, raw=False):
  """Zlib (iam-spec 4.4): raw = -nll / `zlib_entropy`; unlearning score = -raw."""
  nll = _vector(nll, "nll")
  if len(texts) != nll.shape[0]:
    raise ValueError(f"texts has {len(texts)} entries; expected {nll.shape[0]} (one per chunk)")
  return _orient("zlib", -nll / zlib_entropy(texts), raw)


def ratio(nll, ref_nll, *, raw=False):
  """Ratio (iam-spec 4.4; reference = the OUT model): raw = -nll / ref_nll."""
  nll = _vector(nll, "nll")
  ref_nll = _vector(ref_nll, "ref_nll", nll.shape[0])
  if (ref_nll <= 0).any():
    raise ValueError("ref_nll must be > 0 (Ratio divides by it)")
  return _orient("ratio", -nll / ref_nll, raw)


def _lowest_k_mean(values, mask, k, empty):
  """Per row: the mean of the int(k / 100 * length) lowest unmasked values (``empty`` if none)."""
  lengths = mask.sum(axis=1)
  count = np.floor(k / 100 * lengths).astype(np.int64)
  ordered = np.sort(np.where(mask, values, np.inf), axis=1)
  ordered = np.where(np.arange(values.shape[1])[None, :] < count[:, None], ordered, 0.0)
  total = ordered.sum(axis=1)
  return np.where(count > 0, total / np.maximum(count, 1), empty)


def min_k(token_logp, mask=None, *, k=20, raw=False):
  """Min-K% Prob (iam-spec 4.4, ``minkprob.py``): raw = mean of the int(k/100 * length) lowest
  token log-probabilities of a chunk (length = its unmasked tokens). A chunk with no token
  selected (length < 100/k) gets the reference's NaN as its metrics read it: 0.0."""
  logp = _tokens(token_logp, "token_logp")
  mask = _mask(mask, logp.shape, {"token_logp": logp})
  return _orient("min_k", _lowest_k_mean(logp, mask, k, 0.0), raw)


def min_k_plus_plus(token_logp, vocab_mean, vocab_std, mask=None, *, k=20, raw=False):
  """Min-K%++ (iam-spec 4.4, ``minkplusplus.py``): per token (logp - mu) / sigma with mu and
  sigma the mean and std (ddof = 1) of the log-softmax over the vocabulary at that position
  (plain, not probability-weighted, as that code); raw = mean of the lowest int(k/100 * length)
  token scores (0.0 when none is selected, as `min_k`)."""
  logp = _tokens(token_logp, "token_logp")
  mu = _tokens(vocab_mean, "vocab_mean", logp.shape)
  sigma = _tokens(vocab_std, "vocab_std", logp.shape)
  mask = _mask(mask, logp.shape, {"token_logp": logp, "vocab_mean": mu, "vocab_std": sigma})
  if (sigma[mask] <= 0).any():
    raise ValueError("vocab_std must be > 0 at unmasked tokens")
  score = (logp - np.where(mask, mu, 0.0)) / np.where(mask, sigma, 1.0)
  return _orient("min_k_plus_plus", _lowest_k_mean(score, mask, k, 0.0), raw)


def surp(token_logp, token_entropy, mask=None, *, k=40, max_entropy=2.0, raw=False):
  """SURP (iam-spec 4.4, ``surp.py``; the paper's k = 40, max_entropy = 2.0): raw = mean
  log-probability over the tokens that are among the int(k/100 * length) lowest of the chunk
  *and* have entropy < max_entropy; -100 when there is none (the reference's ``nan_to_num``).
  Ties at the k-th lowest value go to the earlier token (``torch.topk``'s choice is unspecified).
  """
  logp = _tokens(token_logp, "token_logp")
  ent = _tokens(token_entropy, "token_entropy", logp.shape)
  mask = _mask(mask, logp.shape, {"token_logp": logp, "token_entropy": ent})
  count = np.floor(k / 100 * mask.sum(axis=1)).astype(np.int64)
  order = np.argsort(np.where(mask, logp, np.inf), axis=1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(logp.shape[1])[None, :].repeat(len(logp), 0), axis=1)
  chosen = (rank < count[:, None]) & mask & (ent < max_entropy)
  n_chosen = chosen.sum(axis=1)
  total = np.where(chosen, logp, 0.0).sum(axis=1)
  score = np.where(n_chosen > 0, total / np.maximum(n_chosen, 1), -100.0)
  return _orient("surp", score, raw)


def bag_of_words(texts, labels, *, folds=5, min_df=0.05, n_estimators=100, max_depth=2,
                 min_samples_leaf=5, seed=42, raw=False):
  """Bag-of-words (iam-spec 4.4, ``bag_of_words.py``): a random forest (100 trees, depth 2,
  min_samples_leaf 5) on word counts (``CountVectorizer(min_df=0.05)``) predicts the label; raw =
  its out-of-fold probability of label 1 over a stratified, shuffled 5-fold split (test_size 0.2)
  seeded with ``seed``. It learns from the labels: a distribution-shift baseline, not a
  model-based attack. Deviation: the forest is seeded too (the reference leaves it unseeded)."""
  from sklearn.ensemble import RandomForestClassifier
  from sklearn.feature_extraction.text import CountVectorizer
  from sklearn.model_selection import StratifiedKFold
  texts = np.asarray(list(texts), dtype=object)
  labels = _labels(labels, len(texts))
  zlib_entropy(texts)  # the same non-empty-string check
  least = np.bincount(labels).min()
  if least < folds:
    raise ValueError(f"bag_of_words needs >= {folds} chunks of each label for its {folds}-fold "
                     f"split; the smaller class has {least}")
  probas = np.zeros(len(texts))
  splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
  for train, test in splitter.split(texts, labels):
    vectorizer = CountVectorizer(min_df=min_df)
    x_train = vectorizer.fit_transform(texts[train])
    forest = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                    min_samples_leaf=min_samples_leaf, random_state=seed)
    forest.fit(x_train, labels[train])
    probas[test] = forest.predict_proba(vectorizer.transform(texts[test]))[:, 1]
  return _orient("bag_of_words", probas, raw)


# ------------------------------------------------------------------------------ metrics


def bootstrap_indices(labels, rounds=1000, seed=0) -> np.ndarray:
  """[rounds, 2m] chunk indices: per round m = min(#retained, #forgotten) retained chunks, then
  m forgotten ones, each drawn with replacement (iam-spec 9.5), from ``default_rng(seed)``."""
  labels = _labels(labels)
  if int(rounds) != rounds or rounds < 1:
    raise ValueError(f"rounds must be a positive integer; got {rounds}")
  pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
  m = min(pos.size, neg.size)
  rng = np.random.default_rng(seed)
  return np.concatenate([pos[rng.integers(0, pos.size, (int(rounds), m))],
                         neg[rng.integers(0, neg.size, (int(rounds), m))]], axis=1)


def _round_metrics(labels, membership, idx, levels):
  """Per round (row of ``idx``): ROC AUC (``sklearn.metrics.auc``, the trapezoid area) and, per
  FPR level, the TPR of the ROC point whose FPR is closest to it (the first such point), on the
  curve of ``sklearn.metrics.roc_curve`` (default ``drop_intermediate``). Vectorised over rounds.
  """
  y = labels[idx].astype(np.float64)  # [R, L]
  s = membership[idx]
  r, length = s.shape
  # The ROC points at each distinct score, in decreasing order (sklearn's _binary_clf_curve).
  order = np.argsort(-s, axis=1, kind="stable")
  s_sorted, y_sorted = np.take_along_axis(s, order, 1), np.take_along_axis(y, order, 1)
  last = np.ones((r, length), bool)
  last[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
  tps_all = np.cumsum(y_sorted, axis=1)
  fps_all = 1 + np.arange(length)[None, :] - tps_all
  compact = np.argsort(~last, axis=1, kind="stable")  # the distinct points first, in order
  count = last.sum(axis=1)
  valid = np.arange(length)[None, :] < count[:, None]
  tps, fps = np.take_along_axis(tps_all, compact, 1), np.take_along_axis(fps_all, compact, 1)
  # drop_intermediate: keep the ends and the points where either increment changes.
  keep = valid.copy()
  if length > 2:
    inner = (np.diff(fps, 2, axis=1) != 0) | (np.diff(tps, 2, axis=1) != 0)
    inner &= valid[:, 2:]  # second differences that reach a padded column do not count
    keep[:, 1:-1] = valid[:, 1:-1] & (inner | ~valid[:, 2:])
    keep[:, 0] = valid[:, 0]
    keep[count <= 2] = valid[count <= 2]
  fpr = np.concatenate([np.zeros((r, 1)), fps / fps[np.arange(r), count - 1][:, None]], 1)
  tpr = np.concatenate([np.zeros((r, 1)), tps / tps[np.arange(r), count - 1][:, None]], 1)
  keep = np.concatenate([np.ones((r, 1), bool), keep], 1)
  # AUC: the trapezoid area under all distinct points (dropped points are collinear: same area).
  step = valid * np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2
  aucs = step.sum(axis=1)
  tprs = {}
  for t in levels:
    dist = np.where(keep, np.abs(fpr - t), np.inf)
    tprs[t] = tpr[np.arange(r), np.argmin(dist, axis=1)]
  return aucs, tprs


def bootstrap_metrics(labels, scores, *, rounds=1000, seed=0, levels=FPR_LEVELS, block=None,
                      membership=False):
  """LLM BinUI metrics as ``results_with_bootstrapping`` (iam-spec 9.5).

  Args:
    labels: [N] 1 = retained chunk (the positive class), 0 = forgotten.
    scores: [N] unlearning scores (high = unlearned); the membership score is -scores, so the
      ROC equals the reference's on its raw scores.
    rounds: balanced bootstrap rounds (`bootstrap_indices`).
    seed: the resampling seed (the reference uses numpy's global RNG after ``set_seed(42)``).
    levels: FPR targets; each round reads the TPR of the ROC point whose FPR is closest.
    block: rounds per vectorised step (default: about 4M resampled scores per step).
    membership: ``scores`` are membership scores (high = retained, e.g. an attack's ``raw``).

  Returns:
    {"auc", "auc_std", "tpr_at_fpr_<t>", "tpr_at_fpr_<t>_std" per level}: mean and std
    (ddof = 0) over rounds.
  """
  labels = _labels(labels)
  scores = _vector(scores, "scores", labels.shape[0])
  idx = bootstrap_indices(labels, rounds, seed)
  block = block or max(1, 4_000_000 // idx.shape[1])
  aucs, tprs = [], {t: [] for t in levels}
  for start in range(0, idx.shape[0], block):
    a, t = _round_metrics(labels, scores if membership else -scores, idx[start:start + block],
                          levels)
    aucs.append(a)
    for level in levels:
      tprs[level].append(t[level])
  aucs = np.concatenate(aucs)
  out = {"auc": float(aucs.mean()), "auc_std": float(aucs.std())}
  for level in levels:
    v = np.concatenate(tprs[level])
    out[f"tpr_at_fpr_{level}"], out[f"tpr_at_fpr_{level}_std"] = float(v.mean()), float(v.std())
  return out


def score_ui(scores, levels, *, rounds=100, fraction=0.8, seed=0):
  """The LLM ScoreUI read-out (iam-spec 7.5, 10.6 Spearman column; notebook cell 12): Spearman's
  rho between the membership score (-scores; the notebook's min-max normalisation does not change
  ranks) and the known membership level of each model, over all (chunk, model) pairs.

  Args:
    scores: [M, N] unlearning scores of M models (e.g. fine-tuning checkpoints) on N chunks.
    levels: [M] each model's ground-truth membership level (the notebook: step / 695).
    rounds, fraction, seed: ``rounds`` resamples of int(fraction * M * N) pairs drawn with
      replacement (the notebook's 100 of 80%), from ``default_rng(seed)``.

  Returns:
    {"spearman": rho on all pairs, "spearman_mean", "spearman_std" (ddof = 0) over resamples}.
  """
  scores = np.asarray(scores, np.float64)
  levels = np.asarray(levels, np.float64)
  if scores.ndim != 2 or levels.shape != (scores.shape[0],) or scores.shape[0] < 2:
    raise ValueError(f"scores must be [M >= 2, N] and levels [M]; got {scores.shape} and "
                     f"{levels.shape}")
  if not (np.isfinite(scores).all() and np.isfinite(levels).all()):
    raise ValueError("scores and levels must be finite")
  if not 0 < fraction <= 1 or int(rounds) != rounds or rounds < 1:
    raise ValueError(f"need 0 < fraction <= 1 and rounds >= 1; got {fraction} and {rounds}")
  x = -scores.ravel()
  y = np.repeat(levels, scores.shape[1])
  size = max(2, int(fraction * x.size))
  rng = np.random.default_rng(seed)
  rhos = []
  for start in range(0, int(rounds), max(1, 2_000_000 // size)):  # vectorised, in blocks
    picks = rng.integers(0, x.size, (min(int(rounds) - start, max(1, 2_000_000 // size)), size))
    rx, ry = stats.rankdata(x[picks], axis=1), stats.rankdata(y[picks], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    rhos.append((rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1)))
  rho = np.concatenate(rhos)
  return {"spearman": float(stats.spearmanr(x, y)[0]), "spearman_mean": float(rho.mean()),
          "spearman_std": float(rho.std())}


def minmax(raw_scores) -> np.ndarray:
  """(s - min) / (max - min) over all chunks, the notebook's scaling before Table 7 (0 where
  every score is equal, where the notebook divides by zero)."""
  s = np.asarray(raw_scores, np.float64)
  span = s.max() - s.min()
  return (s - s.min()) / span if span > 0 else np.zeros_like(s)


def membership_summary(raw_scores, labels, normalize=True):
  """Table 7's cells (iam-spec 10.6; notebook cells 13-14): mean and std (ddof = 0) per label of
  a raw (membership) score, min-max normalised over all chunks first (`minmax`; off with
  ``normalize=False``): {"mean_0", "std_0" (forgotten), "mean_1", "std_1" (retained)}."""
  labels = _labels(labels)
  raw_scores = _vector(raw_scores, "raw_scores", labels.shape[0])
  s = minmax(raw_scores) if normalize else raw_scores
  out = {}
  for b in (0, 1):
    v = s[labels == b]
    out[f"mean_{b}"], out[f"std_{b}"] = float(v.mean()), float(v.std())
  return out


def iam_threshold_shares(raw_iam, labels, thresholds=IAM_THRESHOLDS, normalize=True):
  """Table 7's IAM read-outs (iam-spec 9.4, 10.6), on the raw IAM-On membership score min-max
  normalised over all chunks as the notebook (`minmax`): {"forget_above": share of forgotten
  chunks (label 0) with IAM > 0.4, "retain_below": share of retained chunks (label 1) < 0.8}."""
  labels = _labels(labels)
  raw_iam = _vector(raw_iam, "raw_iam", labels.shape[0])
  s = minmax(raw_iam) if normalize else raw_iam
  above, below = thresholds
  return {"forget_above": float((s[labels == 0] > above).mean()),
          "retain_below": float((s[labels == 1] < below).mean())}


# ------------------------------------------------------------------------------ saved losses

# Per-chunk text files as the reference's ``main_data_parallel.py`` writes them into its log
# folder: ``<prefix>-<key>.txt``, an optional "<key> :" header line, then one number per chunk.
CHUNK_FILES = {"labels": "label", "nll": "nlloss", "fit_nll": "fitRef_nlloss",
               "ref_nll": "ref_nlloss"}
# Population losses for RMIA-On: ``<prefix>-<key>.txt``, or the names ``rmia_online.py`` caches
# (in the same folder when the reference ran as ``bash``).
POPULATION_FILES = {"pop_nll": ("pop_nlloss", "population_target_nlloss.txt"),
                    "pop_fit_nll": ("pop_fitRef_nlloss", "population_in_fitRef_nlloss.txt"),
                    "pop_ref_nll": ("pop_ref_nlloss", "population_out_ref_nlloss.txt")}
# ``<prefix>-tokens.npz``: key -> (argument of the attacks, shape).
TOKEN_KEYS = {"text": ("texts", "[N] str"), "token_logp": ("token_logp", "[N, T] float"),
              "token_mask": ("mask", "[N, T] bool"), "token_entropy": ("token_entropy", "[N, T]"),
              "vocab_mean": ("vocab_mean", "[N, T]"), "vocab_std": ("vocab_std", "[N, T]")}
CSV_COLUMNS = ("attack", "auc", "auc_std", "tpr_at_fpr_0.1", "tpr_at_fpr_0.01")
_FILE_OF = {"fit_nll": "{p}-fitRef_nlloss.txt", "ref_nll": "{p}-ref_nlloss.txt",
            "pop_nll": "{p}-pop_nlloss.txt", "pop_fit_nll": "{p}-pop_fitRef_nlloss.txt",
            "pop_ref_nll": "{p}-pop_ref_nlloss.txt", "texts": "{p}-tokens.npz (key text)",
            "token_logp": "{p}-tokens.npz (key token_logp)",
            "token_entropy": "{p}-tokens.npz (key token_entropy)",
            "vocab_mean": "{p}-tokens.npz (key vocab_mean)",
            "vocab_std": "{p}-tokens.npz (key vocab_std)"}


class LLMAudit(NamedTuple):
  """`audit_files`' result. ``scores``: {attack: [N] unlearning scores}; ``rows``: one dict per
  attack (`CSV_COLUMNS`, the TPR stds, the paper name and Table 7's per-label raw mean/std);
  ``skipped``: {attack: the missing input}; ``iam_shares``: `iam_threshold_shares` or None."""
  prefix: str
  labels: np.ndarray
  scores: dict[str, np.ndarray]
  rows: list[dict[str, Any]]
  skipped: dict[str, str]
  iam_shares: dict[str, float] | None


def find_prefix(directory) -> str:
  """The one ``<prefix>`` with a ``<prefix>-label.txt`` in ``directory``."""
  directory = Path(directory)
  if not directory.is_dir():
    what = "is a file, not a directory" if directory.exists() else "no such directory"
    raise InputError(f"{directory}: {what}; fix: pass --nll_dir=DIR, the folder with "
                     "the reference's <prefix>-label.txt and <prefix>-nlloss.txt")
  found = sorted(p.name[:-len("-label.txt")] for p in directory.glob("*-label.txt"))
  if not found:
    raise InputError(f"{directory}: no <prefix>-label.txt; fix: point --nll_dir at the folder "
                     "holding the reference's per-chunk files")
  if len(found) > 1:
    raise InputError(f"{directory}: several prefixes ({', '.join(found)}); fix: pass --prefix")
  return found[0]


def read_column(path, labels=False, nonnegative=False) -> np.ndarray:
  """One number per line (an optional "key :" header first; blank lines at the end ignored)."""
  path = Path(path)
  if not path.is_file():
    what = "is a directory" if path.is_dir() else "missing"
    raise InputError(f"{path}: {what}; fix: write one number per chunk, in chunk order")
  try:
    lines = path.read_text().splitlines()
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: not a text file ({e.reason} at byte {e.start}); fix: write one "
                     "number per line, in chunk order") from None
  while lines and not lines[-1].strip():
    lines.pop()
  first = 1 if lines and lines[0].rstrip().endswith(":") else 0
  values = []
  for i, line in enumerate(lines[first:], first + 1):
    try:
      v = float(line.strip())
    except ValueError:
      raise InputError(f"{path}: line {i} ({line.strip()[:20]!r}) is not a number; fix: one "
                       "number per line, after an optional 'key :' header") from None
    if not math.isfinite(v):
      raise InputError(f"{path}: line {i} is {line.strip()}; fix: recompute that chunk (every "
                       "value must be finite)")
    if nonnegative and v < 0:
      raise InputError(f"{path}: negative value on line {i}; fix: these are mean token NLLs "
                       "(>= 0)")
    if labels and v not in (0.0, 1.0):
      raise InputError(f"{path}: line {i} is {line.strip()}; fix: labels are 1 (retained chunk) "
                       "or 0 (forgotten chunk)")
    values.append(v)
  if not values:
    raise InputError(f"{path}: no values; fix: write one number per chunk, in chunk order")
  return np.array(values, np.int64 if labels else np.float64)


def _same_length(path, values, n, label_path):
  if values.shape[0] != n:
    raise InputError(f"{path}: {values.shape[0]} values but {label_path.name} has {n}; fix: "
                     "write one value per chunk, in the label file's chunk order")


def _load_tokens(path, n) -> dict[str, Any]:
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError) as e:
    raise InputError(f"{path}: not a readable .npz ({e}); fix: save it with numpy.savez "
                     "(text as a str array)") from None
  unknown = sorted(set(data) - set(TOKEN_KEYS))
  if unknown:
    raise InputError(f"{path}: unknown keys {unknown}; fix: use only {', '.join(TOKEN_KEYS)}")
  out = {}
  if "text" in data:
    text = data["text"]
    if text.shape != (n,) or text.dtype.kind != "U":
      raise InputError(f"{path}: text is {text.dtype} {text.shape}; fix: a str array [N = {n}]")
    if (np.char.str_len(text) == 0).any():
      raise InputError(f"{path}: text of chunk {int(np.argmin(np.char.str_len(text)))} is empty; "
                       "fix: give every chunk its text")
    out["texts"] = text.tolist()
  token_keys = [k for k in data if k != "text"]
  if token_keys and "token_logp" not in data:
    raise InputError(f"{path}: {token_keys} without token_logp; fix: add token_logp [N, T]")
  if "token_logp" in data:
    shape = data["token_logp"].shape
    if len(shape) != 2 or shape[0] != n:
      raise InputError(f"{path}: token_logp has shape {shape}; fix: [N = {n}, T], padded, with "
                       "token_mask")
    for k in token_keys:
      if data[k].shape != shape:
        raise InputError(f"{path}: {k} has shape {data[k].shape}, token_logp {shape}; fix: give "
                         "every per-token array the same [N, T] shape")
    mask = data.get("token_mask")
    if mask is not None and (mask.dtype != bool and not np.isin(mask, (0, 1)).all()):
      raise InputError(f"{path}: token_mask is not 0/1; fix: True = a real token")
    mask = np.ones(shape, bool) if mask is None else mask.astype(bool)
    for k in token_keys:
      if k != "token_mask":
        try:
          v = np.asarray(data[k], np.float64)
        except ValueError:
          raise InputError(f"{path}: {k} holds {data[k].dtype} values, not numbers; fix: save "
                           f"{k} as a float array") from None
        if not np.isfinite(v[mask]).all():
          raise InputError(f"{path}: {k} has NaN or infinite values at real tokens; fix: "
                           "recompute them, or mask the padding with token_mask")
        out[TOKEN_KEYS[k][0]] = v
    out["mask"] = mask
  return out


def load_files(directory, prefix=None) -> tuple[str, dict[str, Any]]:
  """(prefix, inputs) of the saved files in ``directory`` (see the module's file constants):
  labels and nll always, the others when present. Raises `InputError` naming the file."""
  directory = Path(directory)
  prefix = prefix or find_prefix(directory)
  label_path = directory / f"{prefix}-label.txt"
  if not label_path.is_file():
    raise InputError(f"{label_path}: missing; fix: check --prefix (or --nll_dir) against the "
                     "files' names")
  labels = read_column(label_path, labels=True)
  if labels.min() == labels.max():
    raise InputError(f"{label_path}: every chunk has label {labels[0]}; fix: audit retained (1) "
                     "and forgotten (0) chunks together")
  n = labels.shape[0]
  inputs = {"labels": labels}
  for key, stem in CHUNK_FILES.items():
    path = directory / f"{prefix}-{stem}.txt"
    if key == "labels" or (key != "nll" and not path.exists()):
      continue
    inputs[key] = read_column(path, nonnegative=True)
    _same_length(path, inputs[key], n, label_path)
  pops = {}
  for key, (stem, ref_name) in POPULATION_FILES.items():
    for path in (directory / f"{prefix}-{stem}.txt", directory / ref_name):
      if path.is_file():
        pops[key] = path
        break
  if pops:
    missing = [f"{prefix}-{POPULATION_FILES[k][0]}.txt" for k in POPULATION_FILES if k not in pops]
    if missing:
      raise InputError(f"{directory}: population losses {sorted(p.name for p in pops.values())} "
                       f"without {', '.join(missing)}; fix: give the target, fit and OUT models' "
                       "population losses together (RMIA-On)")
    z = None
    for key, path in pops.items():
      inputs[key] = read_column(path, nonnegative=True)
      if z is not None and inputs[key].shape[0] != z:
        raise InputError(f"{path}: {inputs[key].shape[0]} values but {pops['pop_nll'].name} has "
                         f"{z}; fix: one value per population chunk, the same chunks in each")
      z = inputs[key].shape[0]
  tokens = directory / f"{prefix}-tokens.npz"
  if tokens.exists():
    inputs.update(_load_tokens(tokens, n))
  return prefix, inputs


def run_attack(name, inputs, *, batch_size=IAM_BATCH, seed=42, raw=False):
  """The unlearning scores (or with ``raw`` the reference's) of attack ``name`` on `load_files`'
  inputs."""
  d = inputs
  if name == "iam_on":
    return iam_on(d["nll"], d["fit_nll"], d["ref_nll"], batch_size=batch_size, raw=raw)
  if name == "lira_on":
    return lira_on(d["nll"], d["fit_nll"], d["ref_nll"], raw=raw)
  if name == "rmia_on":
    return rmia_on(d["nll"], d["fit_nll"], d["ref_nll"], d["pop_nll"], d["pop_fit_nll"],
                   d["pop_ref_nll"], raw=raw)
  if name == "loss":
    return loss(d["nll"], raw=raw)
  if name == "zlib":
    return zlib_score(d["nll"], d["texts"], raw=raw)
  if name == "ratio":
    return ratio(d["nll"], d["ref_nll"], raw=raw)
  if name == "min_k":
    return min_k(d["token_logp"], d.get("mask"), raw=raw)
  if name == "min_k_plus_plus":
    return min_k_plus_plus(d["token_logp"], d["vocab_mean"], d["vocab_std"], d.get("mask"),
                           raw=raw)
  if name == "surp":
    return surp(d["token_logp"], d["token_entropy"], d.get("mask"), raw=raw)
  if name == "bag_of_words":
    return bag_of_words(d["texts"], d["labels"], seed=seed, raw=raw)
  raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")


def audit_files(directory, prefix=None, *, attacks=None, rounds=1000, seed=42,
                batch_size=IAM_BATCH) -> LLMAudit:
  """Every attack the saved files of ``directory`` allow (or ``attacks``), with the bootstrap
  metrics of iam-spec 9.5 (``rounds``, ``seed``) and Table 7's read-outs. Writes nothing."""
  directory = Path(directory)
  prefix, inputs = load_files(directory, prefix)
  labels = inputs["labels"]
  unknown = [a for a in attacks or () if a not in ATTACKS]
  if unknown:
    raise InputError(f"--attacks: unknown {unknown}; fix: choose from {', '.join(ATTACKS)}")
  if attacks and len(set(attacks)) < len(attacks):
    raise InputError(f"--attacks: {list(attacks)} names an attack twice; fix: list each once")
  scores, rows, skipped, shares = {}, [], {}, None
  for name in attacks or ATTACKS:
    missing = [k for k in ATTACKS[name][1] if k not in inputs]
    if missing:
      what = _FILE_OF[missing[0]].format(p=prefix)
      if attacks:
        raise InputError(f"{directory / what.split(' ')[0]}: missing, needed by {name}; fix: "
                         f"add {what}, or leave {name} out of --attacks")
      skipped[name] = what
      continue
    try:
      raw = run_attack(name, inputs, batch_size=batch_size, seed=seed, raw=True)
    except ValueError as e:
      raise InputError(f"{directory / prefix}-*: {name}: {e}; fix: correct that input, or leave "
                       f"{name} out of --attacks") from None
    scores[name] = _orient(name, raw, False)
    if name == "iam_on":
      shares = iam_threshold_shares(raw, labels)
    row = {"attack": name, **bootstrap_metrics(labels, raw, rounds=rounds, seed=seed,
                                               membership=True), "name": ATTACKS[name][0]}
    row.update(membership_summary(raw, labels))
    rows.append(row)
  return LLMAudit(prefix, labels, scores, rows, skipped, shares)


def report_markdown(result: LLMAudit, rounds: int) -> str:
  """The markdown report of `audit_files`' result."""
  n1 = int(result.labels.sum())
  lines = [f"# LLM unlearning audit: {result.prefix}", "",
           f"{len(result.labels)} chunks: {n1} retained (label 1), "
           f"{len(result.labels) - n1} forgotten (label 0). Positive class = retained; "
           f"mean ± std over {rounds} balanced bootstrap rounds (the std is over rounds; "
           "iam-spec 9.5). TPR at the ROC point whose FPR is closest to the level.", "",
           "| attack | AUC | TPR@FPR≈0.1 | TPR@FPR≈0.01 |", "|---|---|---|---|"]
  for r in result.rows:
    lines.append(f"| {r['name']} | {r['auc']:.4f} ± {r['auc_std']:.4f} | "
                 f"{r['tpr_at_fpr_0.1']:.4f} ± {r['tpr_at_fpr_0.1_std']:.4f} | "
                 f"{r['tpr_at_fpr_0.01']:.4f} ± {r['tpr_at_fpr_0.01_std']:.4f} |")
  lines += ["", "Membership score per label (Table 7): the reference's raw score (high = member), "
            "min-max normalised over all chunks as the paper's notebook, mean ± std over chunks.",
            "", "| attack | forgotten (0) | retained (1) |", "|---|---|---|"]
  for r in result.rows:
    lines.append(f"| {r['name']} | {r['mean_0']:.4f} ± {r['std_0']:.4f} | "
                 f"{r['mean_1']:.4f} ± {r['std_1']:.4f} |")
  if result.iam_shares is not None:
    share = result.iam_shares
    lines += ["", f"IAM-On (normalised as above): {100 * share['forget_above']:.1f}% of "
              f"forgotten chunks score > {IAM_THRESHOLDS[0]}, "
              f"{100 * share['retain_below']:.1f}% of retained chunks < {IAM_THRESHOLDS[1]}."]
  if result.skipped:
    lines += ["", "Not run (missing input): " + "; ".join(
        f"{ATTACKS[a][0]} ({what})" for a, what in result.skipped.items()) + "."]
  return "\n".join(lines) + "\n"


def write_results(result: LLMAudit, out, rounds: int) -> None:
  """``out/results.csv`` (`CSV_COLUMNS`, one row per attack) and ``out/report.md``."""
  from jaxmu import report
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  report.write_csv(out / "results.csv", [{c: r[c] for c in CSV_COLUMNS} for r in result.rows])
  with report.atomic_write(out / "report.md", "w") as f:
    f.write(report_markdown(result, rounds))
