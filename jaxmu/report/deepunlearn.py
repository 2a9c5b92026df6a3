"""The DeepUnlearn report: the ranked paper table, its figures and, when the run has one, the
U-LiRA stage's results."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from jaxmu.attacks import metrics
from jaxmu.report import markdown_table, summarize
from jaxmu.report.ulira import (HPARAMS_NOTE, ULIRA_FIGURE, plot_ulira_roc, read_ulira,
                                ulira_table)

REFERENCE_ROWS = ("retrain", "original")
FIGURES = ("retdev_vs_rte.png", "forget_accuracy.png")


def benchmark_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """`summarize` per method, plus the paper-table aggregates of seed means (deepunlearn-spec 6.4,
  6.7, 9.2): ``retdev_of_means`` (retention deviation of the seed-mean accuracies against the
  retrained model's seed means; NaN when one of those is 0) and ``indisc_of_means``
  (indiscernibility of the seed-mean Test-MIA; NaN when the MIA is undefined)."""
  summary = summarize(rows)
  reference = next((s for s in summary if s["method"] == "retrain"), None)
  if reference is None:
    raise ValueError("rows have no 'retrain' method: RetDev needs the retrained models' rows")
  splits = ("retain", "forget", "test")
  defined = all(reference[f"{k}_acc_mean"] > 0 for k in splits)  # retention against 0: undefined
  for s in summary:
    s["retdev_of_means"] = float(metrics.retention_deviation(
        {k: s[f"{k}_acc_mean"] for k in splits}, {k: reference[f"{k}_acc_mean"] for k in splits})
    ) if defined else np.nan
    mia = s.get("test_mia_mean", np.nan)
    s["indisc_of_means"] = float(metrics.indiscernibility(mia)) if np.isfinite(mia) else np.nan
  return summary


def rank(summary: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """Methods (not the original/retrain references) closest to retraining first: by RetDev of
  seed means (the order of the third-party tables, deepunlearn-spec 9.2), ties by higher
  indiscernibility; undefined values last."""
  def key(s):
    retdev, indisc = s["retdev_of_means"], s["indisc_of_means"]
    return (not np.isfinite(retdev), retdev if np.isfinite(retdev) else 0.0,
            -indisc if np.isfinite(indisc) else math.inf)
  return sorted((s for s in summary if s["method"] not in REFERENCE_ROWS), key=key)


def _cell(s: Mapping[str, Any], metric: str, digits: int = 4) -> str:
  mean, std = s.get(f"{metric}_mean", np.nan), s.get(f"{metric}_std", np.nan)
  if not np.isfinite(mean):
    return "—"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _number_cell(value: float, digits: int = 4) -> str:
  return f"{value:.{digits}f}" if np.isfinite(value) else "—"


def _rte_cell(s: Mapping[str, Any]) -> str:
  mean = s.get("rte_mean", np.nan)
  return f"{mean:.3g}" if np.isfinite(mean) else "—"


def paper_table(summary: Sequence[Mapping[str, Any]],
                ulira: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """The paper-style Markdown table: the references, then the methods in `rank` order.

  RA/FA/TA and T-MIA are mean ± std over seeds; RetDev and Indisc are of the seed means (as the
  third-party tables, deepunlearn-spec 9.2); RTE is retraining time / unlearning time per model;
  U-LiRA (balanced accuracy with its interval) when ``ulira`` ({method: row}) is given.
  """
  header = ["rank", "method", "RA", "FA", "TA", "RetDev", "Indisc", "T-MIA", "RTE"]
  if ulira:
    header.append("U-LiRA")
  by_name = {s["method"]: s for s in summary}
  ordered = [(ref, by_name[ref]) for ref in REFERENCE_ROWS if ref in by_name]
  ordered += [(str(i), s) for i, s in enumerate(rank(summary), 1)]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, s in ordered:
    name = f"*{s['method']}*" if label in REFERENCE_ROWS else s["method"]
    cells = [label if label not in REFERENCE_ROWS else "ref", name,
             _cell(s, "retain_acc"), _cell(s, "forget_acc"), _cell(s, "test_acc"),
             _number_cell(s["retdev_of_means"]), _number_cell(s["indisc_of_means"]),
             _cell(s, "test_mia"), _rte_cell(s)]
    if ulira:
      u = ulira.get(s["method"])
      cells.append(f"{u['balanced_accuracy']:.3f} [{u['ci_low']:.3f}, {u['ci_high']:.3f}]"
                   if u else "—")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_retdev_vs_rte(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
  """One point per method: mean RTE (log x) against per-seed RetDev, bars = std over seeds."""
  fig = Figure(figsize=(7, 5), layout="constrained")
  ax = fig.add_subplot()
  shown = [s for s in summary
           if s["method"] != "original" and np.isfinite(s.get("rte_mean", np.nan))]
  for i, s in enumerate(sorted(shown, key=lambda s: s["rte_mean"])):
    reference = s["method"] == "retrain"
    ax.errorbar(s["rte_mean"], s["retdev_mean"], yerr=s["retdev_std"], xerr=s["rte_std"],
                fmt="*" if reference else "o", color="black" if reference else None, capsize=3)
    ax.annotate(s["method"], (s["rte_mean"], s["retdev_mean"]), fontsize=7,
                xytext=(3, 3 + 8 * (i % 3)), textcoords="offset points")  # staggered labels
  ax.set_xscale("log")
  original = next((s for s in summary if s["method"] == "original"), None)
  if original is not None:
    ax.axhline(original["retdev_mean"], color="gray", linestyle="--",
               label="original (no unlearning)")
    ax.legend(loc="lower right", fontsize=8)
  ax.set_yscale("symlog", linthresh=0.01)  # linear near 0 (the retrained model), log above
  ax.set_ylim(bottom=0, top=2 * max([s["retdev_mean"] + s["retdev_std"] for s in shown] + [0.01]))
  ax.set_xlabel("run-time efficiency (retraining time / unlearning time; right = faster)")
  ax.set_ylabel("RetDev per seed, mean ± std (lower = closer to retraining)")
  ax.set_title("Closeness to retraining against cost")
  ax.grid(True, which="both", alpha=0.3)
  fig.savefig(path, dpi=120)


def plot_forget_accuracy(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
  """Forget accuracy of each method (mean ± std over seeds) against the retrained model's."""
  by_name = {s["method"]: s for s in summary}
  order = [s["method"] for s in rank(summary)]
  fig = Figure(figsize=(max(6, 0.35 * len(order) + 2), 4.5), layout="constrained")
  ax = fig.add_subplot()
  x = np.arange(len(order))
  ax.bar(x, [by_name[m]["forget_acc_mean"] for m in order],
         yerr=[by_name[m]["forget_acc_std"] for m in order], capsize=2, color="tab:blue")
  for ref, style in (("retrain", "-"), ("original", "--")):
    if ref in by_name:
      mean, std = by_name[ref]["forget_acc_mean"], by_name[ref]["forget_acc_std"]
      ax.axhline(mean, color="black", linestyle=style, label=f"{ref} ({mean:.3f})")
      ax.axhspan(mean - std, mean + std, color="gray", alpha=0.2)
  ax.set_xticks(x, order, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("forget accuracy")
  ax.set_title("Forget accuracy against the retrained model (methods in rank order)")
  ax.legend(loc="lower left")
  fig.savefig(path, dpi=120)


def figure_names(with_ulira: bool) -> tuple[str, ...]:
  return FIGURES + ((ULIRA_FIGURE,) if with_ulira else ())


def write_benchmark_report(directory: str | os.PathLike, title: str,
                           rows: Sequence[Mapping[str, Any]], times: Mapping[str, Any],
                           tuning: Mapping[str, Mapping[str, Any]],
                           stages_run: Mapping[str, str],
                           ulira_dir: str | os.PathLike | None = None) -> Path:
  """Writes ``report.md`` and its figures into ``directory``; returns the report's path.

  ``tuning``: {method: {"trials_complete", "trials_failed", "seeds", "mode", ...}} of the tuned
  methods; ``stages_run``: {stage: why it ran in this run, or "reused"}; ``ulira_dir``: the
  U-LiRA stage's directory (``ulira.csv``, ``roc/<method>.npz``) or None.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  summary = benchmark_summary(rows)
  ulira, curves = read_ulira(ulira_dir) if ulira_dir else ({}, {})
  plot_retdev_vs_rte(summary, directory / FIGURES[0])
  plot_forget_accuracy(summary, directory / FIGURES[1])
  if curves:
    plot_ulira_roc(curves, directory / ULIRA_FIGURE)
  ranked = rank(summary)
  by_name = {s["method"]: s for s in summary}
  lines = [f"# {title}", ""]
  if ranked:
    best = ranked[0]
    fastest = max(ranked[:3], key=lambda s: s.get("rte_mean", -np.inf))
    lines += [
        f"**Closest to retraining:** {best['method']} (RetDev {best['retdev_of_means']:.4f}, "
        f"Indisc {_number_cell(best['indisc_of_means'])}, RTE {_rte_cell(best)}). "
        f"Fastest of the top three: {fastest['method']} (RTE {_rte_cell(fastest)}, "
        f"{_number_cell(fastest.get('seconds_mean', np.nan), 2)} s per model)."]
    if "original" in by_name:
      doing_nothing = by_name["original"]["retdev_of_means"]
      closer = sum(s["retdev_of_means"] < doing_nothing for s in ranked)
      lines[-1] += (f" Not unlearning at all (the original) has RetDev {doing_nothing:.4f}; "
                    f"{closer} of {len(ranked)} methods come closer to retraining than that.")
    lines.append("")
  seeds = int(by_name["retrain"]["seeds"])
  lines += [
      f"## Methods ranked by closeness to the retrained model ({seeds} seeds)", "",
      "Ranked by RetDev = |RR − 1| + |FR − 1| + |TR − 1| (retain, forget and test accuracy "
      "retention against the retrained model, from seed means; lower is better), ties by higher "
      "Indisc = 1 − |2·T-MIA − 1| (1 = the forget set is indistinguishable from unseen data). "
      "RA/FA/TA: retain/forget/test accuracy; T-MIA: the population MIA, forget vs test "
      "(0.5 ideal); RTE: retraining time / unlearning time per model (> 1 = faster than "
      "retraining, compilation excluded)" + (
          "; U-LiRA: per-sample attack's balanced accuracy with its interval (0.5 = "
          "indistinguishable from retraining)" if ulira else "") + ".", "",
      paper_table(summary, ulira), "",
      f"![RetDev against RTE]({FIGURES[0]})", "",
      f"![Forget accuracy]({FIGURES[1]})", ""]
  if ulira:
    lines += ["## U-LiRA", "",
              "Per-sample unlearning inference against retraining (the `ulira` stage, files in "
              "`ulira/`): 0.5 = indistinguishable from retraining, 1.0 = always told apart.", "",
              ulira_table(list(ulira.values())), "", HPARAMS_NOTE, ""]
  if curves:
    lines += [f"![U-LiRA ROC]({ULIRA_FIGURE})", ""]
  lines += ["## Hyper-parameters", ""]
  if tuning:
    lines += ["Tuned by the search (deepunlearn-spec 5; best trial = smallest Euclidean norm of "
              "the objectives), then run with the best hyper-parameters on every seed:", "",
              "| method | mode | tuning seeds | complete trials | failed trials | best trial | "
              "best hyper-parameters |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {t.get('mode', '')} | {', '.join(map(str, t.get('seeds', ())))} | "
              f"{t['trials_complete']} | {t['trials_failed']} | {t.get('best_trial', '')} | "
              + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in sorted(t.get("best_params", {}).items())) + " |"
              for m, t in tuning.items()]
    lines.append("")
  untuned = [s["method"] for s in ranked if s["method"] not in tuning]
  if untuned:
    lines += [f"Not tuned (the config's hyper-parameters): {', '.join(untuned)}.", ""]
  lines += [
      "## This run", "",
      f"Reference models: {times['models']} models (original and retrained per seed) trained as "
      f"one stack, {times['epochs']} epochs, {times['stack_seconds']:.1f} s wall time "
      f"({times['seconds_per_model']:.2f} s per model, the retraining time of RTE).", "",
      "Stages recomputed in this run: " + (", ".join(
          f"{name} ({why})" for name, why in stages_run.items() if why != "reused") or "none")
      + ".", "",
      "Stages reused from earlier runs: " + (", ".join(
          name for name, why in stages_run.items() if why == "reused") or "none") + ".", "",
      "## All metrics", "",
      "Mean ± std over seeds per method (`summary.csv`; per seed in `results.csv`). "
      "Distances are between parameter vectors: l2, normalized l2 (of unit-norm vectors) and "
      "Golatkar's ‖θ − θ_ref‖/‖θ‖, to the seed's original and retrained model.", "",
      markdown_table(rows), ""]
  path = directory / "report.md"
  path.write_text("\n".join(lines))
  return path
