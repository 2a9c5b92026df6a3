"""The IAM audit's report: Table 1 with each unlearning type's operating points and K sweep,
Tables 5, 2 and 8 and the class-level read-out, and the figures."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxmu.attacks.audit import ATTACKS, IAM_EPS as _EPS, SCORING_FUNCTIONS
from jaxmu.report import mean_std

LEVELS = (1e-3, 1e-2, 1e-1)  # the operating points: TPR at these FPRs, TNR at these FNRs

# iam-spec 10.5 (logs/new_records/latex_input_para_sens.txt): CIFAR-100, set_random, K = 1,
# shadow [0], 10 seeds; AUC % per (eps1, eps2) at A = 2, 4, ..., 256 (the log's values, without
# the notebook's +0.002 on one curve).
PAPER_SENSITIVITY_A = (2, 4, 8, 16, 32, 64, 128, 256)
_PAPER_SENSITIVITY = {
    "iam_on": """
        0.1 0.1 82.32 90.23 90.99 91.01 90.96 90.92 90.90 90.89
        0.1 0.01 76.78 86.38 88.35 89.13 89.47 89.62 89.69 89.72
        0.1 0.001 76.26 86.13 88.18 88.99 89.35 89.50 89.57 89.61
        0.1 0.0001 76.18 86.10 88.16 88.97 89.33 89.49 89.56 89.60
        0.1 1e-05 76.16 86.09 88.16 88.97 89.33 89.49 89.56 89.60
        0.1 1e-06 76.16 86.09 88.15 88.97 89.33 89.49 89.56 89.60
        0.01 0.01 83.39 88.73 88.36 88.06 87.90 87.82 87.78 87.76
        0.01 0.001 80.97 89.74 90.91 91.11 91.14 91.14 91.14 91.14
        0.01 0.0001 80.78 89.64 90.86 91.09 91.14 91.15 91.15 91.15
        0.01 1e-05 80.76 89.63 90.86 91.09 91.14 91.15 91.15 91.15
        0.01 1e-06 80.76 89.63 90.86 91.09 91.14 91.15 91.15 91.15
        0.001 0.001 83.08 88.07 87.75 87.49 87.35 87.28 87.25 87.23
        0.001 0.0001 83.21 90.30 90.32 90.04 89.87 89.78 89.73 89.71
        0.001 1e-05 83.17 90.34 90.39 90.12 89.95 89.86 89.82 89.79
        0.001 1e-06 83.17 90.34 90.39 90.13 89.96 89.87 89.82 89.80
""",
    "iam_off": """
        0.1 0.1 82.32 89.91 90.40 90.09 89.82 89.65 89.56 89.51
        0.1 0.01 76.78 86.30 88.23 89.03 89.37 89.53 89.61 89.64
        0.1 0.001 76.26 86.05 88.06 88.88 89.25 89.42 89.50 89.54
        0.1 0.0001 76.18 86.02 88.04 88.87 89.24 89.41 89.49 89.53
        0.1 1e-05 76.16 86.02 88.04 88.87 89.24 89.41 89.49 89.53
        0.1 1e-06 76.16 86.02 88.04 88.87 89.24 89.41 89.49 89.53
        0.01 0.01 83.39 87.95 87.07 86.47 86.19 86.05 85.99 85.96
        0.01 0.001 80.97 89.53 90.59 90.59 90.45 90.33 90.26 90.23
        0.01 0.0001 80.78 89.44 90.57 90.62 90.50 90.40 90.34 90.31
        0.01 1e-05 80.76 89.43 90.57 90.62 90.51 90.40 90.34 90.31
        0.01 1e-06 80.76 89.43 90.57 90.62 90.51 90.40 90.35 90.31
        0.001 0.001 83.08 87.40 86.60 86.05 85.80 85.68 85.62 85.59
        0.001 0.0001 83.21 89.71 89.14 88.40 88.02 87.83 87.73 87.69
        0.001 1e-05 83.17 89.77 89.23 88.50 88.12 87.92 87.83 87.78
        0.001 1e-06 83.17 89.77 89.24 88.51 88.13 87.93 87.84 87.79
""",
}
PAPER_SENSITIVITY = {  # attack -> {(eps1, eps2): {A: AUC %}}
    attack: {(float(r[0]), float(r[1])): dict(zip(PAPER_SENSITIVITY_A, map(float, r[2:])))
             for r in (line.split() for line in text.strip().splitlines())}
    for attack, text in _PAPER_SENSITIVITY.items()}



def render_report(config, rows, runs_per_type: Mapping[str, int]) -> str:
  """report.md: Table 1 (attacks x unlearning types, K = 1) with each type's operating points
  and K sweep, Table 2 (ScoreUI), Table 8 (approximate methods) and its class-level read-out.
  ``runs_per_type``: {unlearning type: its number of runs}, in the config's order."""
  types = tuple(runs_per_type)
  binui = [r for r in rows if r["table"] == "binui"]
  attacks = list(dict.fromkeys(r["attack"] for r in binui))
  ks = sorted({int(r["k"]) for r in binui})
  out = [f"# IAM audit: {config.dataset.name} / {config.model.name}, {', '.join(types)}", "",
         f"{config.num_shadows} shadow OUT models; runs pooled per unlearning type ("
         + ", ".join(f"{t}: {runs_per_type[t]} {'seeds' if t == 'set_random' else 'classes'}"
                     for t in types)
         + "). Numbers in %: mean ± sample std (ddof 1) over disjoint shadow groups (iam-spec 7.1; "
         "\"± —\" where one group). Positives = "
         "retained samples, scored by 1 − unlearning score (iam-spec 9.1): TPR@FPR is the share of "
         "retained samples recognised while at most that share of forgotten samples is called "
         "retained; TNR@FNR the share of forgotten samples detected.", "",
         "## Table 1: BinUI AUC, K = 1 (exact unlearning: retrained targets)", "",
         "| attack | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
  k1 = lambda a, t: [r for r in binui
                     if r["attack"] == a and int(r["k"]) == 1 and r["forget"] == t]
  for a in attacks:
    out.append(f"| {ATTACKS[a][0]} | "
               + " | ".join(mean_std([r["auc"] for r in k1(a, t)]) for t in types) + " |")
  for t in types:
    out += ["", f"### Operating points, K = 1: {t}", "",
            "| attack | AUC | balanced acc. | " + " | ".join(f"TPR@FPR={lv:g}" for lv in LEVELS)
            + " | " + " | ".join(f"TNR@FNR={lv:g}" for lv in LEVELS) + " | groups |",
            "|---" * (4 + 2 * len(LEVELS)) + "|"]
    for a in attacks:
      sel = k1(a, t)
      cells = [mean_std([r[m] for r in sel]) for m in
               ("auc", "balanced_accuracy", *(f"tpr@{lv:g}" for lv in LEVELS),
                *(f"tnr@{lv:g}" for lv in LEVELS))]
      out.append(f"| {ATTACKS[a][0]} | " + " | ".join(cells) + f" | {len(sel)} |")
    iam_rows = k1("iam_on", t)
    if iam_rows:
      out += ["", f"Mean IAM-On unlearning score (K = 1, {t}): forgotten "
              f"{np.mean([r['score_forgotten'] for r in iam_rows]):.3f}, retained "
              f"{np.mean([r['score_retained'] for r in iam_rows]):.3f} (iam-spec 10.1f)."]
    out += ["", f"### Number of shadow models K (AUC %, mean ± sample std over groups, “± —” "
            f"for one group; Fig. 5): {t}", "",
            "| attack | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for a in attacks:
      cells = [mean_std([r["auc"] for r in binui
                          if r["attack"] == a and int(r["k"]) == k and r["forget"] == t])
               for k in ks]
      out.append(f"| {ATTACKS[a][0]} | " + " | ".join(cells) + " |")
  out += (_scoring_tables(rows, types) + _sensitivity_tables(config, rows, types)
          + _score_ui_table(rows) + _approx_tables(config, rows, types))
  out += ["", "Figures (PNG and PDF): roc.png (log-log ROC per attack, K = 1, over the shadow "
          "groups the run kept, floored at 1 / number of forgotten samples), auc_vs_k.png (mean "
          "AUC with its 95% t-interval over groups, chance 0.5), iam_hist.png (IAM-On score of "
          f"forgotten vs retained samples); all three for {types[0]}.",
          ""]
  return "\n".join(out)


def _scoring_tables(rows, types):
  scoring = [r for r in rows if r["table"] == "scoring"]
  if not scoring:
    return []
  out = ["", "## Table 5: scoring functions (K = 1, retrained targets)", "",
         "IAM's Gumbel fit against other reference distributions and shadow-free scores "
         "(iam-spec 10.4): AUC etc. in %, mean ± sample std (ddof 1) over shadow groups; the "
         "mean unlearning "
         "score of forgotten and retained samples."]
  for t in types:
    out += ["", f"### {t}", "", "| scoring function | AUC | balanced acc. | TPR@FPR=0.01 | "
            "TNR@FNR=0.01 | score forgotten | score retained |", "|---" * 7 + "|"]
    for key in SCORING_FUNCTIONS:
      sel = [r for r in scoring if r["attack"] == key and r["forget"] == t]
      if sel:
        out.append(f"| {SCORING_FUNCTIONS[key][0]} | " + " | ".join(
            [mean_std([r[m] for r in sel]) for m in ("auc", "balanced_accuracy", "tpr@0.01",
                                                       "tnr@0.01")]
            + [f"{np.mean([r[m] for r in sel]):.3f}" for m in ("score_forgotten",
                                                               "score_retained")]) + " |")
  return out


def _sensitivity_tables(config, rows, types):
  """iam-spec 10.5: AUC % per (eps1, eps2) row and A column, mean over the swept shadow groups;
  on cifar100 / set_random the paper's value in parentheses where it has one."""
  sens = [r for r in rows if r["table"] == "sensitivity"]
  if not sens:
    return []
  groups = len({r["group"] for r in sens})
  paper = config.dataset.name == "cifar100"
  out = ["", "## IAM's epsilons and interpolation count A (iam-spec 10.5)", "",
         f"AUC % of IAM-On / IAM-Off on the retrained targets, mean over {groups} K = 1 shadow "
         "group(s), for each Gumbel-map (eps1, eps2) (every signal normalised with its own "
         f"epsilons) and A, from the saved signals; Table 1 uses ({', '.join(map(str, _EPS))}), "
         f"A = {config.audit.num_interp}."
         + (" In parentheses: the paper's value (CIFAR-100, set_random, K = 1, shadow [0], "
            "10 seeds)." if paper else "")]
  for t in types:
    for attack in dict.fromkeys(r["attack"] for r in sens):
      sel = [r for r in sens if r["forget"] == t and r["attack"] == attack]
      if not sel:
        continue
      ks = sorted({int(r["num_interp"]) for r in sel})
      out += ["", f"### {ATTACKS[attack][0]}: {t}", "",
              "| eps1 | eps2 | " + " | ".join(f"A={a}" for a in ks) + " |",
              "|---" * (len(ks) + 2) + "|"]
      for e1, e2 in dict.fromkeys((r["eps1"], r["eps2"]) for r in sel):
        published = (PAPER_SENSITIVITY.get(attack, {}).get((e1, e2), {})
                     if paper and t == "set_random" else {})
        cells = []
        for a in ks:
          v = 100 * np.mean([r["auc"] for r in sel
                             if (r["eps1"], r["eps2"], int(r["num_interp"])) == (e1, e2, a)])
          cells.append(f"{v:.2f}" + (f" ({published[a]:.2f})" if a in published else ""))
        out.append(f"| {e1:g} | {e2:g} | " + " | ".join(cells) + " |")
  return out


def _score_ui_table(rows):
  score = [r for r in rows if r["table"] == "score_ui"]
  if not score:
    return []
  out = ["", "## Table 2: ScoreUI (membership against the ground-truth degree b / B)", "",
         "Min-max normalised membership (1 − unlearning score) of the continued-training "
         "checkpoints against their degree b / B (iam-spec 7.5): mean over start models, mean ± "
         "std over K = 1 shadow groups. KL: 20-bin histogram divergence of degrees from scores.",
         "", "| attack | Spearman | Pearson | MSE | KL | groups |", "|---|---|---|---|---|---|"]
  for a in dict.fromkeys(r["attack"] for r in score):
    sel = [r for r in score if r["attack"] == a]
    out.append(f"| {ATTACKS[a][0]} | " + " | ".join(
        mean_std([r[m] for r in sel], 1, 3) for m in ("spearman", "pearson", "mse", "kl"))
        + f" | {len(sel)} |")
  return out


def approx_readout(method, reference, config) -> list[str]:
  """Table 8's read-out of one method against retrain (each a mapping of group-averaged
  ``member_forgotten``, ``member_retained``, ``auc`` and, optionally, ``ks_forgotten`` /
  ``ks_retained``): the problems found, [] = "as retrain". Means (iam-spec 9.4, ``approx.margin``):
  under-unlearning, forgotten below retrain, over-unlearning. Distributions: the BinUI AUC (how far
  forgotten samples separate from retained ones) more than ``approx.auc_margin`` from retrain's,
  or a KS statistic (method against retrain, on forgotten or on retained samples) above
  ``approx.ks_threshold``: equal means with different spreads are not "as retrain"."""
  a = config.approx
  margin, auc_margin = a.margin, a.get("auc_margin", 0.05)
  ks_threshold = a.get("ks_threshold", 0.1)
  mf, mr, auc = method["member_forgotten"], method["member_retained"], method["auc"]
  rf, rr, ref_auc = reference["member_forgotten"], reference["member_retained"], reference["auc"]
  out = [w for w, bad in (("under-unlearning", mf - rf > margin),
                          ("forgotten below retrain", rf - mf > margin),
                          ("over-unlearning", rr - mr > margin),
                          (f"separates less than retrain (AUC {100 * auc:.1f} vs "
                           f"{100 * ref_auc:.1f})", ref_auc - auc > auc_margin),
                          (f"separates more than retrain (AUC {100 * auc:.1f} vs "
                           f"{100 * ref_auc:.1f})", auc - ref_auc > auc_margin)) if bad]
  for kind in ("forgotten", "retained"):
    ks = method.get(f"ks_{kind}", float("nan"))
    if np.isfinite(ks) and ks > ks_threshold:
      out.append(f"{kind} distributed unlike retrain (KS {ks:.2f})")
  return out


def _approx_tables(config, rows, types):
  approx = [r for r in rows if r["table"] == "approx"]
  if not approx:
    return []
  attack = approx[0]["attack"]
  a = config.approx
  out = ["", f"## Table 8: approximate unlearning audited with {ATTACKS[attack][0]} (K = 1)", "",
         "Membership = 1 − IAM unlearning score, mean over samples (± std over samples), "
         "averaged over shadow groups; `@faithful`: the reference as coded (iam-spec 8, 12.21). "
         f"Score: `{attack}`" + (" (the reference's Table 8 key, iam-spec 9.3 and 12.19: IAM-On "
                                 "on the un-normalised signal at audit.off_eps)"
                                 if attack == "iam_on_wo_norm" else "") + ". "
         f"Under-unlearning: forgotten samples keep more mean membership than after retraining "
         f"(by > {a.margin}); over-unlearning: retained samples lose membership (iam-spec 9.4); "
         "forgotten below retrain: forgotten samples look less like members than after "
         "retraining, itself a trace of the method. \"As retrain\" needs the distributions to "
         f"agree as well: the AUC within {100 * a.get('auc_margin', 0.05):g} points of "
         "retrain's (forgotten samples separate from retained ones as after retraining) and the "
         "two-sample Kolmogorov-Smirnov statistic between the method's and retrain's membership "
         f"at most {a.get('ks_threshold', 0.1):g}, on forgotten and on retained samples (KS "
         "columns, mean over groups)."]
  keys = ("member_forgotten", "member_retained", "auc", "ks_forgotten", "ks_retained")
  mean_of = lambda sel: {k: float(np.mean([r.get(k, np.nan) for r in sel])) for k in keys}
  for t in types:
    sel_t = [r for r in approx if r["forget"] == t]
    out += ["", f"### {t}", "",
            "| method | membership retained | membership forgotten | AUC % | KS forgotten | "
            "KS retained | read-out |", "|---|---|---|---|---|---|---|"]
    ref = mean_of([r for r in sel_t if r["method"] == "retrain"])
    for method in dict.fromkeys(r["method"] for r in sel_t):
      sel = [r for r in sel_t if r["method"] == method]
      m = mean_of(sel)
      sf = np.mean([r["member_forgotten_std"] for r in sel])
      sr = np.mean([r["member_retained_std"] for r in sel])
      ks = " | ".join("—" if not np.isfinite(m[k]) else f"{m[k]:.3f}"
                      for k in ("ks_forgotten", "ks_retained"))
      verdict = ("reference" if method == "retrain"
                 else ", ".join(approx_readout(m, ref, config)) or "as retrain")
      out.append(f"| {method} | {m['member_retained']:.3f} ± {sr:.3f} | "
                 f"{m['member_forgotten']:.3f} ± {sf:.3f} | "
                 f"{mean_std([r['auc'] for r in sel])} | {ks} | {verdict} |")
  classes = [r for r in rows if r["table"] == "approx_class" and r["run"] == "overall"]
  if classes:
    metrics = ("auc", "bce", "last_1", "last_0", "b_std", "c_std1", "c_std0")
    out += ["", "## Table 8, class-level read-out (iam-spec 9.3)", "",
            "Over all runs of a type (per run: `approx_class.csv`), mean over shadow groups: AUC, "
            "class-weighted BCE of membership against b (1 = retained), last-1 / last-0 (mean "
            "membership of the 10% least member-like retained / most member-like forgotten "
            "samples), b-std (std of the per-run BCE), c-std1 / c-std0 (std of the per-run mean "
            "membership of retained / forgotten samples)."]
    for t in types:
      sel_t = [r for r in classes if r["forget"] == t]
      out += ["", f"### {t}", "", "| method | " + " | ".join(metrics) + " |",
              "|---" * (len(metrics) + 1) + "|"]
      for method in dict.fromkeys(r["method"] for r in sel_t):
        sel = [r for r in sel_t if r["method"] == method]
        out.append(f"| {method} | "
                   + " | ".join(f"{np.mean([r[m] for r in sel]):.3f}" for m in metrics) + " |")
  return out


def _roc_on_grid(labels, scores, grid):
  """TPR of the ROC of ``scores`` at the FPRs of ``grid`` (the curve's step function: the highest
  TPR reached at an FPR at most the grid value)."""
  from sklearn.metrics import roc_curve
  fpr, tpr, _ = roc_curve(labels, scores)
  return tpr[np.searchsorted(fpr, grid, side="right") - 1]


def write_figures(directory, rows, kept):
  """roc.png, auc_vs_k.png and iam_hist.png (each also as PDF) of the first unlearning type.

  ``kept``: that type's K = 1 scores per attack, ``[groups, n]`` (every shadow group) or ``[n]``
  (group 0 only, older runs), and its forget flags (``_flags``). ROC: log-log, both axes floored
  at 1 / (number of negatives = forgotten samples), the smallest non-zero FPR; with several groups
  the mean TPR over groups at each FPR (no bands: 19 curves); AUC (mean ± sample std over the
  K = 1 groups, from ``rows``) in the legend; attacks whose curves equal an earlier attack's in
  every group, within one retained sample (the same ranking of samples up to float rounding,
  e.g. IAM-On and IAM-On without its [0, 1] normalisation) are drawn once, labelled "A ≈ B".
  AUC against K: mean over groups with the 95 % Student t interval over groups as error bars
  (none where a K has one group), attacks whose AUCs agree within 1e-4 in every group as one
  line ("A ≈ B"), and the 0.5 chance line. Colours: one per attack, fixed by its position in
  `ATTACKS`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from scipy import stats

  from jaxmu.report import CONFIDENCE, save_figure

  kept = dict(kept)
  flags = np.asarray(kept.pop("_flags")).astype(bool)
  binui = [r for r in rows if r["table"] == "binui"]
  forget = binui[0]["forget"]  # the first unlearning type (all three figures)
  binui = [r for r in binui if r["forget"] == forget]
  colors = dict(zip(ATTACKS, plt.cm.tab20(np.arange(20))))
  outside = dict(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  scores = {a: np.atleast_2d(np.asarray(v, np.float64)) for a, v in kept.items()}
  groups = min(v.shape[0] for v in scores.values()) if scores else 0
  negatives = int(flags.sum())
  floor = 1.0 / max(negatives, 1)
  grid = np.unique(np.r_[0.0, np.geomspace(floor, 1.0, 400), np.arange(1, negatives + 1) /
                         max(negatives, 1)][: 2000])
  curves = {a: np.stack([_roc_on_grid(~flags, 1 - v[g], grid) for g in range(groups)])
            for a, v in scores.items()}
  # attack drawn -> the attacks with the same curve: equal within one retained sample at every
  # FPR of every group (float rounding reorders a few near-tied samples of IAM-On without its
  # normalisation)
  step = 1.0 / max(int((~flags).sum()), 1)
  drawn: dict[str, list[str]] = {}
  for a, tprs in curves.items():
    same = next((d for d in drawn if np.abs(curves[d] - tprs).max() <= step * (1 + 1e-9)), None)
    if same is None:
      drawn[a] = [a]
    else:
      drawn[same].append(a)

  def auc_text(attack):
    aucs = [r["auc"] for r in binui if r["attack"] == attack and int(r["k"]) == 1]
    if not aucs:
      return ""
    std = np.std(aucs, ddof=1) if len(aucs) > 1 else np.nan
    return f"AUC {np.mean(aucs):.3f}" + (f" ± {std:.3f}" if np.isfinite(std) else "")

  fig, ax = plt.subplots(figsize=(5.5, 5))
  for a, names in drawn.items():
    tprs = curves[a]
    mean = tprs.mean(0)
    label = " ≈ ".join(ATTACKS[n][0] for n in names) + f" ({auc_text(a)})"
    ax.plot(np.maximum(grid, floor), np.maximum(mean, floor), label=label, color=colors[a],
            drawstyle="steps-post")
  ax.plot([floor, 1], [floor, 1], "k:", lw=0.8, label="chance")
  ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05),
         xlabel=f"FPR (forgotten called retained; floor 1/{negatives})",
         ylabel="TPR (retained recognised)",
         title=f"BinUI ROC, K = 1, {forget}, " + (
             f"mean TPR over {groups} shadow groups" if groups > 1 else "shadow group 0"))
  ax.legend(**outside)
  save_figure(fig, directory / "roc.png")
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  all_ks = sorted({int(r["k"]) for r in binui})
  series: dict[str, tuple] = {}  # attack -> (ks, AUCs per K, names of identical attacks)
  for a in dict.fromkeys(r["attack"] for r in binui):
    ks = sorted({int(r["k"]) for r in binui if r["attack"] == a})
    per_k = [[r["auc"] for r in binui if r["attack"] == a and int(r["k"]) == k] for k in ks]
    same = next((d for d, (k2, p2, _) in series.items() if k2 == ks and all(
        len(u) == len(v) and np.allclose(u, v, rtol=0, atol=1e-4) for u, v in zip(p2, per_k))),
        None)
    if same is None:
      series[a] = (ks, per_k, [a])
    else:  # AUCs within 1e-4 in every group (IAM-On without its normalisation): one line
      series[same][2].append(a)
  for a, (ks, per_k, names) in series.items():
    mean = np.array([np.mean(v) for v in per_k])
    half = np.array([stats.t.ppf((1 + CONFIDENCE) / 2, len(v) - 1) * np.std(v, ddof=1)
                     / np.sqrt(len(v)) if len(v) > 1 else 0.0 for v in per_k])
    ax.errorbar(ks, mean, yerr=np.where(half > 0, half, np.nan), marker="o", capsize=3,
                label=" ≈ ".join(ATTACKS[n][0] for n in names), color=colors[a], markersize=4)
  ax.axhline(0.5, color="gray", linestyle="--", lw=1, label="chance (0.5)")
  ax.set(xscale="log", xlabel="K shadow models",
         ylabel=f"AUC (mean over groups, {CONFIDENCE:.0%} t-interval)",
         title=f"BinUI AUC against K, {forget}")
  ax.set_xticks(all_ks, [str(k) for k in all_ks])
  ax.minorticks_off()
  ax.legend(**outside)
  save_figure(fig, directory / "auc_vs_k.png")
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 4))
  if "iam_on" in scores:
    bins = np.linspace(0, 1, 41)
    pooled = scores["iam_on"][:groups]
    ax.hist(pooled[:, ~flags].ravel(), bins, density=True, alpha=0.6, label="retained")
    ax.hist(pooled[:, flags].ravel(), bins, density=True, alpha=0.6, label="forgotten")
    ax.legend()
  ax.set(xlabel="IAM-On unlearning score", ylabel="density",
         title=f"IAM-On scores, K = 1, {forget}" + (f", {groups} groups" if groups > 1 else ""))
  save_figure(fig, directory / "iam_hist.png")
  plt.close(fig)
