"""The DeepUnlearn report's parts: the per-method summary over seeds, the ranking, the paper table
with intervals and ties, and the figures (`jaxmu.report.deepunlearn_markdown` writes them, with
the U-LiRA stage's results when the run has one, into ``report.md``).

Follows deepunlearn-spec 6 (metrics) and 6.7 / 9.2 (the paper tables: RA/FA/TA, RetDev, Indisc,
T-MIA, RTE per method over seeds). Deviations (docs/deviations.md, "DeepUnlearn pipeline and
report"): methods are ranked by the mean of the per-seed RetDev with a 95 % Student t interval
over seeds, not by the RetDev of seed means (kept as its own column, the third-party tables'
convention); ties are decided by paired per-seed differences against the best method; stds are
sample stds (ddof 1); runs whose weights or logits are not finite are listed apart, never ranked.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats

from jaxmu.attacks import metrics
from jaxmu.report import (CONFIDENCE, bracket, mean_std_cell, method_colors, paired_difference,
                          save_figure, summarize, t_interval)
from jaxmu.report.ulira import ULIRA_FIGURE

REFERENCE_ROWS = ("retrain", "original")
FIGURES = ("retdev_vs_rte.png", "forget_accuracy.png")
# Columns measured once per stack of seeds (every seed's row holds the same value): n = 1.
STACK_COLUMNS = ("seconds", "rte")
DEFAULTS_SUFFIX = "@defaults"  # a tuned method's run with its reference defaults (pipeline)
ACCURATE_SUFFIX = "@accurate"  # a tuned method's run with its study's most accurate trial
PAPER_METHODS = ("msg", "ct")  # "MSG and CT ... perform better" (deepunlearn-spec 9.1)
OBJECTIVE_SPLITS = ("retain", "forget", "val")


def _per_seed(rows: Sequence[Mapping[str, Any]], column: str) -> dict[str, dict[float, float]]:
  out: dict[str, dict[float, float]] = {}
  for r in rows:
    out.setdefault(r["method"], {})[r["seed"]] = r.get(column, np.nan)
  return out


def _failures(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """{method: "seed s: reason; ..."} of the methods with a failed (method, seed) row."""
  out: dict[str, list[str]] = {}
  for r in rows:
    reason = r.get("failure", "")
    if isinstance(reason, str) and reason:
      out.setdefault(r["method"], []).append(f"seed {int(r['seed'])}: {reason}")
  return {m: "; ".join(v) for m, v in out.items()}


def benchmark_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per method: `summarize` (mean, sample std with ddof 1; NaN std for the per-stack
  ``seconds``/``rte``), and

  - ``retdev_ci_low``/``high``: the 95 % Student t interval of the mean per-seed RetDev
    (the ranking's key);
  - ``retdev_of_means`` (retention deviation of the seed-mean accuracies against the retrained
    model's seed means; NaN when one of those is 0) and ``indisc_of_means`` (indiscernibility of
    the seed-mean Test-MIA): the paper-table aggregates of the third-party tables
    (deepunlearn-spec 6.4, 6.7, 9.2);
  - ``failure``: why some of the method's runs failed ("" when none; failed methods are not
    ranked);
  - ``vs_best_*``, ``vs_original_*``, ``vs_defaults_*`` and ``vs_searched_*``:
    `paired_difference` of the per-seed RetDev against the best ranked method, the original,
    (a tuned method with a "<method>@defaults" row) its own run with the reference defaults and
    (a "<method>@accurate" row) the tuned run of its method (diff, diff_low, diff_high, tied).
  """
  summary = summarize(rows, single=STACK_COLUMNS)
  reference = next((s for s in summary if s["method"] == "retrain"), None)
  if reference is None:
    raise ValueError("rows have no 'retrain' method: RetDev needs the retrained models' rows")
  splits = ("retain", "forget", "test")
  defined = all(reference[f"{k}_acc_mean"] > 0 for k in splits)  # retention against 0: undefined
  failures = _failures(rows)
  retdev = _per_seed(rows, "retdev")
  for s in summary:
    s["retdev_of_means"] = float(metrics.retention_deviation(
        {k: s[f"{k}_acc_mean"] for k in splits}, {k: reference[f"{k}_acc_mean"] for k in splits})
    ) if defined else np.nan
    mia = s.get("test_mia_mean", np.nan)
    s["indisc_of_means"] = float(metrics.indiscernibility(mia)) if np.isfinite(mia) else np.nan
    values = [v for v in retdev[s["method"]].values() if np.isfinite(v)]
    _, s["retdev_ci_low"], s["retdev_ci_high"] = t_interval(values)
    s["failure"] = failures.get(s["method"], "")
  best = best_run(rank(summary))

  def pair(s, other, name):  # paired per-seed RetDev difference of s's method minus other's
    if other is None or other not in retdev or s["method"] in REFERENCE_ROWS or s["failure"]:
      return
    seeds = sorted(set(retdev[s["method"]]) & set(retdev[other]))
    s.update({f"vs_{name}_{k}": v for k, v in paired_difference(
        [retdev[s["method"]][k] for k in seeds], [retdev[other][k] for k in seeds]).items()})

  for s in summary:
    pair(s, best, "best")
    pair(s, "original", "original")
    pair(s, s["method"] + DEFAULTS_SUFFIX, "defaults")  # a tuned method against its defaults
    if is_diagnostic(s["method"]):  # the most accurate trial against the tuned run
      pair(s, s["method"][:-len(ACCURATE_SUFFIX)], "searched")
  return summary


def rank(summary: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """Methods (not the original/retrain references, not failed) closest to retraining first: by the
  mean of the per-seed RetDev, equal means by higher mean per-seed Indisc; undefined values last.
  Whether neighbours differ is the paired tie rule's business (`benchmark_summary`)."""
  def key(s):
    retdev, indisc = s["retdev_mean"], s.get("indisc_mean", np.nan)
    return (not np.isfinite(retdev), retdev if np.isfinite(retdev) else 0.0,
            -indisc if np.isfinite(indisc) else math.inf)
  return sorted((s for s in summary
                 if s["method"] not in REFERENCE_ROWS and not s.get("failure")), key=key)


def _cell(s: Mapping[str, Any], metric: str, digits: int = 4) -> str:
  return mean_std_cell(s.get(f"{metric}_mean", np.nan), s.get(f"{metric}_std", np.nan), digits)


def _number_cell(value: float, digits: int = 4) -> str:
  return f"{value:.{digits}f}" if np.isfinite(value) else "—"


def _rte_cell(s: Mapping[str, Any]) -> str:
  mean = s.get("rte_mean", np.nan)
  return f"{mean:.3g}" if np.isfinite(mean) else "—"


def _interval(mean: float, low: float, high: float, digits: int = 4, sign: str = "") -> str:
  if not np.isfinite(mean):
    return "—"
  text = f"{mean:{sign}.{digits}f}"
  return text + (f" [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]" if np.isfinite(low)
                 else " [—]")


def retdev_cell(s: Mapping[str, Any]) -> str:
  """Mean per-seed RetDev [95 % t interval]."""
  return _interval(s["retdev_mean"], s.get("retdev_ci_low", np.nan),
                   s.get("retdev_ci_high", np.nan))


def _vs_best_cell(s: Mapping[str, Any], best: str) -> str:
  if s["method"] == best:
    return "best"
  if "vs_best_diff" not in s:
    return "—"
  cell = _interval(s["vs_best_diff"], s["vs_best_diff_low"], s["vs_best_diff_high"], sign="+")
  tied = s["vs_best_tied"]
  return cell + (" ≈" if tied == 1.0 else "" if tied == 0.0 else " (n = 1)")


def is_diagnostic(method: str) -> bool:
  """A "<method>@accurate" row (a tuned method with its study's most accurate trial): ranked by
  its RetDev among the others, but without a rank number and never #1, so that the benchmark's
  ranks, ties and "Δ vs #1" are those of the runs that follow the reference's procedure."""
  return method.endswith(ACCURATE_SUFFIX)


def best_run(ranked: Sequence[Mapping[str, Any]]) -> str | None:
  """#1 of a `rank` order: its first run that is not a diagnostic row (`is_diagnostic`)."""
  return next((s["method"] for s in ranked if not is_diagnostic(s["method"])), None)


def _rank_numbers(ranked: Sequence[Mapping[str, Any]]) -> dict[str, int | None]:
  """{method: its rank among the non-diagnostic runs, None for a diagnostic row}."""
  numbers, n = {}, 0
  for s in ranked:
    n += not is_diagnostic(s["method"])
    numbers[s["method"]] = None if is_diagnostic(s["method"]) else n
  return numbers


def _rank_labels(summary: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """{method: its rank label}: "3" or, tied with #1 by the paired rule, "3 (≈1)"; a diagnostic
  row "—" or "— (≈1)"."""
  ranked = rank(summary)
  numbers = _rank_numbers(ranked)
  labels = {}
  for s in ranked:
    n, tied = numbers[s["method"]], s.get("vs_best_tied") == 1.0
    labels[s["method"]] = (("—" if n is None else str(n))
                           + (" (≈1)" if tied and n != 1 else ""))
  return labels


def paper_table(summary: Sequence[Mapping[str, Any]],
                ulira: Mapping[str, Mapping[str, Any]] | None = None,
                methods: Sequence[str] | None = None) -> str:
  """The paper-style Markdown table: the references, then the methods (``methods``, default all
  ranked ones) in `rank` order with their rank among all ranked methods.

  RA/FA/TA and T-MIA: mean ± sample std (ddof 1) over seeds. RetDev: mean of the per-seed RetDev
  [95 % Student t interval over seeds]; Δ vs #1: mean paired per-seed difference to the best
  method [95 % t interval], "≈" when the interval contains 0 (tied, also "(≈1)" after the rank).
  RetDev of means and Indisc: of the seed means (the third-party tables, deepunlearn-spec 9.2).
  RTE: retraining / unlearning time per model, one timing per stack, both compiled work only. U-LiRA
  (balanced accuracy with its interval) when ``ulira`` ({method: row}) is given.
  """
  header = ["rank", "method", "RA", "FA", "TA", "RetDev", "Δ vs #1",
            "RetDev of means", "Indisc", "T-MIA", "RTE"]
  if ulira:
    header.append("U-LiRA")
  by_name = {s["method"]: s for s in summary}
  ranked = rank(summary)
  best = best_run(ranked) or ""
  labels = _rank_labels(summary)
  chosen = [s for s in ranked if methods is None or s["method"] in methods]
  ordered = [("ref", by_name[ref]) for ref in REFERENCE_ROWS if ref in by_name]
  ordered += [(labels[s["method"]], s) for s in chosen]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, s in ordered:
    reference = label == "ref"
    cells = [label, f"*{s['method']}*" if reference else s["method"],
             _cell(s, "retain_acc"), _cell(s, "forget_acc"), _cell(s, "test_acc"),
             retdev_cell(s), "" if reference else _vs_best_cell(s, best),
             _number_cell(s["retdev_of_means"]), _number_cell(s["indisc_of_means"]),
             _cell(s, "test_mia"), _rte_cell(s)]
    if ulira:
      u = ulira.get(s["method"])
      cells.append(f"{u['balanced_accuracy']:.3f} {bracket(u['ci_low'], u['ci_high'], 3)}"
                   if u else "—")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def objective10_of_rows(rows: Sequence[Mapping[str, Any]], method: str,
                        seeds: Sequence[float]) -> np.ndarray:
  """objective10 (deepunlearn-spec 5.2) of ``method``'s final models on ``seeds``, averaged over
  the seeds as the search does, from ``results.csv`` rows: |ΔAcc| / 3 on retain, forget and val
  against the same seed's retrained model, and 1 − Indisc(Val-MIA). [4]; NaN when missing."""
  by = {(r["method"], float(r["seed"])): r for r in rows}
  per_seed = []
  for seed in seeds:
    m, n = by.get((method, float(seed))), by.get(("retrain", float(seed)))
    if m is None or n is None:
      return np.full(4, np.nan)
    gaps = [abs(m.get(f"{k}_acc", np.nan) - n.get(f"{k}_acc", np.nan)) / 3
            for k in OBJECTIVE_SPLITS]
    per_seed.append(gaps + [abs(2 * m.get("val_mia", np.nan) - 1)])
  return np.mean(per_seed, axis=0)


def _figure_methods(summary):
  """(ranked methods, {method: "<rank>. " or "" for a diagnostic row}) of the figures: what
  the table ranks."""
  ranked = rank(summary)
  return ranked, {m: "" if n is None else f"{n}. " for m, n in _rank_numbers(ranked).items()}


def plot_retdev_vs_rte(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                       tuned: Sequence[str] = ()) -> None:
  """What the table ranks: per method the mean per-seed RetDev (log y, error bar = its 95 %
  Student t interval over seeds, drawn only where it has a width; a lower end at or below 0 is
  cut at the axis) against RTE (log x; one timing per stack, so no x bar). One fixed colour per
  method (`method_colors`), circles for tuned methods, squares for reference defaults; the
  legend lists "rank. method" (no labels on the points, so none overlap). The original's mean
  per-seed RetDev and its interval as a dashed line and band; retraining itself (RetDev 0,
  RTE 1) as the dotted vertical line. Also written as PDF."""
  ranked, ranks = _figure_methods(summary)
  colors = method_colors([s["method"] for s in summary])
  by_name = {s["method"]: s for s in summary}
  shown = [s for s in ranked if np.isfinite(s.get("rte_mean", np.nan))
           and np.isfinite(s["retdev_mean"]) and s["retdev_mean"] > 0]
  ncol = 1 if len(shown) <= 28 else 2  # legend entries: the methods and two reference lines
  fig = Figure(figsize=(9 + 3 * (ncol - 1), max(5.5, 0.19 * math.ceil((len(shown) + 2) / ncol)
                                                 + 1.0)), layout="constrained")
  ax = fig.add_subplot()
  handles = []
  values = [v for s in shown for v in (s["retdev_mean"], s.get("retdev_ci_low", np.nan))
            if np.isfinite(v) and v > 0]
  original = by_name.get("original")
  if original is not None and np.isfinite(original["retdev_mean"]):
    values += [original["retdev_mean"]]
  bottom = 0.5 * min(values + [1.0])
  for s in shown:
    m = s["method"]
    y, low, high = s["retdev_mean"], s.get("retdev_ci_low", np.nan), s.get("retdev_ci_high", np.nan)
    has_bar = np.isfinite(low) and high > low
    marker = "o" if m in tuned else "s"
    ax.errorbar(s["rte_mean"], y, yerr=[[y - max(low, bottom)], [high - y]] if has_bar else None,
                fmt=marker, color=colors[m], markeredgecolor="black", markeredgewidth=0.6,
                markersize=8 if m in tuned else 6, capsize=3 if has_bar else 0, elinewidth=1.2,
                zorder=3)
    handles.append(Line2D([], [], marker=marker, color=colors[m], markeredgecolor="black",
                          markeredgewidth=0.6, linestyle="",
                          label=f"{ranks[m]}{m}" + (" (tuned)" if m in tuned else "")))
  if original is not None and np.isfinite(original["retdev_mean"]):
    ax.axhline(original["retdev_mean"], color=colors["original"], linestyle="--", zorder=1)
    if np.isfinite(original.get("retdev_ci_low", np.nan)):
      ax.axhspan(max(original["retdev_ci_low"], bottom), original["retdev_ci_high"], color="gray",
                 alpha=0.15, zorder=0)
    handles.append(Line2D([], [], color=colors["original"], linestyle="--",
                          label="original (no unlearning),\nband: its 95% t-interval"))
  ax.axvline(1.0, color=colors["retrain"], linestyle=":", zorder=1)
  handles.append(Line2D([], [], color=colors["retrain"], linestyle=":",
                        label="retraining (RetDev 0, RTE 1)"))
  ax.set_xscale("log")
  ax.set_yscale("log")
  tops = [s.get("retdev_ci_high", np.nan) for s in shown] + values
  ax.set_ylim(bottom=bottom, top=2 * max([t for t in tops if np.isfinite(t)] + [bottom]))
  ax.set_xlabel("run-time efficiency RTE (retraining time / unlearning time, one timing per "
                "stack; right = faster)")
  ax.set_ylabel(f"RetDev per seed: mean and {CONFIDENCE:.0%} t-interval\n(lower = closer to "
                "retraining)")
  ax.set_title("Closeness to retraining against cost (ranked as the table)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
            frameon=False, title="rank. method (● tuned, ■ reference defaults)",
            title_fontsize=7, ncol=ncol)
  save_figure(fig, path)


def plot_forget_accuracy(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                         tuned: Sequence[str] = ()) -> None:
  """Forget accuracy per ranked method (mean over seeds, bar = 95 % Student t interval; in rank
  order, the method's fixed colour, hatched = reference defaults) against the retrained model's
  (solid line, its interval as a band) and the original's (dashed). The y-range shows the gap
  between the original and the retrained model, the gap that drives FR in RetDev; bars below it
  are cut and carry their value. Also written as PDF."""
  ranked, ranks = _figure_methods(summary)
  by_name = {s["method"]: s for s in summary}
  colors = method_colors([s["method"] for s in summary])
  order = [s["method"] for s in ranked]
  fig = Figure(figsize=(max(6.5, 0.38 * len(order) + 2), 4.8), layout="constrained")
  ax = fig.add_subplot()
  x = np.arange(len(order))

  def half(s):
    n, std = s["seeds"], s.get("forget_acc_std", np.nan)
    return float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * std / np.sqrt(n)) if (
        n > 1 and np.isfinite(std)) else 0.0

  means = np.array([by_name[m]["forget_acc_mean"] for m in order], np.float64)
  halves = np.array([half(by_name[m]) for m in order])
  refs = {r: by_name[r]["forget_acc_mean"] for r in REFERENCE_ROWS if r in by_name}
  anchor = list(refs.values()) or ([float(np.nanmean(means))] if len(means) else [1.0])
  gap = max(abs(refs["original"] - refs["retrain"]) if len(refs) == 2 else 0.0, 0.02)
  bottom = max(0.0, min(anchor) - 4 * gap)
  top = min(1.0, max(anchor + [float(np.nanmax(means + halves))] if len(means) else anchor))
  top = top + 0.15 * (top - bottom)
  bars = ax.bar(x, means, color=[colors[m] for m in order], edgecolor="black", linewidth=0.5)
  for bar, m in zip(bars, order):
    if m not in tuned:
      bar.set_hatch("//")
  has = halves > 0
  ax.errorbar(x[has], means[has], yerr=halves[has], fmt="none", ecolor="black", capsize=2)
  for i, value in enumerate(means):
    if np.isfinite(value) and value < bottom:
      ax.annotate(f"{value:.2f}↓", (x[i], bottom), xytext=(0, 2), textcoords="offset points",
                  ha="center", va="bottom", fontsize=6, rotation=90)
  for ref, style in (("retrain", "-"), ("original", "--")):
    if ref in by_name:
      s = by_name[ref]
      ax.axhline(s["forget_acc_mean"], color=colors[ref], linestyle=style,
                 label=f"{ref} ({s['forget_acc_mean']:.3f})")
      if ref == "retrain" and half(s) > 0:
        ax.axhspan(s["forget_acc_mean"] - half(s), s["forget_acc_mean"] + half(s), color="gray",
                   alpha=0.2, label=f"retrain {CONFIDENCE:.0%} t-interval")
  ax.set_ylim(bottom, top)
  ax.set_xticks(x, [f"{ranks[m]}{m}" for m in order], rotation=60, ha="right", fontsize=8)
  ax.set_xlabel("method (rank order; hatched: reference defaults, plain: tuned)")
  ax.set_ylabel(f"forget accuracy (mean over seeds, bars: {CONFIDENCE:.0%} t-interval)")
  ax.set_title("Forget accuracy against the retrained model")
  ax.legend(loc="lower left", fontsize=8)
  save_figure(fig, path)


def figure_names(with_ulira: bool) -> tuple[str, ...]:
  """The report's figure files: each PNG and its PDF."""
  pngs = FIGURES + ((ULIRA_FIGURE,) if with_ulira else ())
  return pngs + tuple(str(Path(p).with_suffix(".pdf")) for p in pngs)
