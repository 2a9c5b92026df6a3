"""The DeepUnlearn ``report.md``: the findings, the two ranked tables (tuned methods, reference
defaults), failed runs, figures, U-LiRA, the search's hyper-parameters and objective10, the run's
times and every metric (deepunlearn-spec 6, 6.7, 9); the summaries, tables and figures it
assembles are `jaxmu.report.deepunlearn`'s.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxmu.report import CONFIDENCE, markdown_table, paired_difference, t_interval
from jaxmu.report.deepunlearn import (ACCURATE_SUFFIX, FIGURES, PAPER_METHODS, STACK_COLUMNS,
                                      _interval, _number_cell, _rank_labels, _rte_cell,
                                      benchmark_summary, is_diagnostic, objective10_of_rows,
                                      paper_table, plot_forget_accuracy, plot_retdev_vs_rte, rank,
                                      retdev_cell)
from jaxmu.report.ulira import (HPARAMS_NOTE, ULIRA_FIGURE, plot_ulira_roc, read_ulira,
                                ulira_table)


def _closeness(s: Mapping[str, Any]) -> str:
  """Where a method stands against the original by the paired rule."""
  return ("closer to retraining than the original" if s.get("vs_original_diff_high", 0) < 0
          else "not distinguishable from the original" if s.get("vs_original_tied") == 1.0
          else "further from retraining than the original")


def _delta(s: Mapping[str, Any], name: str) -> str:
  """The paired difference ``vs_<name>_*`` of `benchmark_summary` with its interval."""
  return _interval(s.get(f"vs_{name}_diff", np.nan), s.get(f"vs_{name}_diff_low", np.nan),
                   s.get(f"vs_{name}_diff_high", np.nan), sign="+")


def _sentence_for(s: Mapping[str, Any], labels: Mapping[str, str], tuned: Sequence[str]) -> str:
  m = s["method"]
  closer = _closeness(s)
  delta = functools.partial(_delta, s)
  return (f"{m} ({'tuned' if m in tuned else 'reference defaults'}) rank {labels[m]}, RetDev "
          f"{retdev_cell(s)}, Δ vs #1 {delta('best')}, Δ vs original {delta('original')} "
          f"({closer})")


def _findings(summary, tuned) -> list[str]:
  """The headline: the best method, the ties, the original, the paper's finding."""
  # the headline is the benchmark's: diagnostic rows (`is_diagnostic`) have their own paragraph
  ranked = [s for s in rank(summary) if not is_diagnostic(s["method"])]
  by_name = {s["method"]: s for s in summary}
  labels = _rank_labels(summary)
  if not ranked:
    return []
  best = ranked[0]
  tied = [s["method"] for s in ranked[1:] if s.get("vs_best_tied") == 1.0]
  fastest = max([best] + [by_name[m] for m in tied], key=lambda s: s.get("rte_mean", -np.inf))
  lines = [f"**Closest to retraining:** {best['method']} (RetDev per seed {retdev_cell(best)}, "
           f"RTE {_rte_cell(best)}). "
           + (f"Not distinguishable from it (paired {CONFIDENCE:.0%} t-interval of the per-seed "
              f"RetDev difference contains 0): {', '.join(tied)}; the fastest of these is "
              f"{fastest['method']} (RTE {_rte_cell(fastest)}). " if tied else
              "No other method is tied with it by the paired rule. ")]
  if "original" in by_name:
    closer = [s["method"] for s in ranked if s.get("vs_original_diff_high", 0) < 0]
    lines[-1] += (f"Not unlearning at all (the original) has RetDev {retdev_cell(by_name['original'])}"
                  f"; {len(closer)} of {len(ranked)} ranked methods are closer to retraining by the "
                  "paired rule (interval of the per-seed difference below 0)"
                  + (f": {', '.join(closer)}." if closer else "."))
  lines.append("")
  versus = [s for s in ranked if "vs_defaults_diff" in s]
  if versus:
    word = lambda s: ("better" if s["vs_defaults_diff_high"] < 0 else "worse"
                      if s["vs_defaults_diff_low"] > 0 else "not distinguishable")
    lines += ["**Tuned against reference defaults** (the same method with the reference's "
              "default hyper-parameters, row `<method>@defaults`; paired per-seed RetDev "
              "difference tuned − defaults [95% t-interval]): " + "; ".join(
                  f"{s['method']} {_interval(s['vs_defaults_diff'], s['vs_defaults_diff_low'], s['vs_defaults_diff_high'], sign='+')} ({word(s)})"
                  for s in versus) + ". "
              + ("Every tuned method is at least as good as its defaults."
                 if all(word(s) != "worse" for s in versus) else
                 "Not every tuned method is at least as good as its defaults."), ""]
  present = [m for m in PAPER_METHODS if m in by_name and m in labels]
  if present:
    among = {m: m == best["method"] or by_name[m].get("vs_best_tied") == 1.0 for m in present}
    all_tuned = all(m in tuned for m in present)
    verdict = ("holds on this run" if all(among.values()) and all_tuned else
               "does not hold on this run" if all_tuned else
               "cannot be judged on this run (not every one of them was tuned)")
    lines += ["**The paper's finding** (deepunlearn-spec 9.1: \"with the proper hyperparameters, "
              "MSG and CT consistently perform better\"; here: each tuned and ranked #1 or tied "
              f"with #1 by the paired rule) {verdict}: "
              + "; ".join(_sentence_for(by_name[m], labels, tuned) for m in present) + ".", ""]
  accurate = [(m, by_name[f"{m}{ACCURATE_SUFFIX}"]) for m in tuned
              if f"{m}{ACCURATE_SUFFIX}" in labels]
  if accurate:
    lines += ["**objective10's choice against the most accurate trial** (row "
              f"`<method>{ACCURATE_SUFFIX}`: the same method with the hyper-parameters of its "
              "study's trial with the smallest accuracy terms, MIA term left out; the "
              "hyper-parameters section says why objective10 chose otherwise): " + "; ".join(
                  f"{m}{ACCURATE_SUFFIX} RetDev {retdev_cell(s)}, Δ vs #1 {_delta(s, 'best')}, "
                  f"Δ vs original {_delta(s, 'original')} ({_closeness(s)}), against "
                  f"objective10's {m}: {_delta(s, 'searched')}" for m, s in accurate) + ".", ""]
  return lines


def _tuning_lines(tuning, rows) -> list[str]:
  if not tuning:
    return []
  lines = ["Tuned by the search (deepunlearn-spec 5; best trial = smallest Euclidean norm of the "
           "four objectives), then run with the best hyper-parameters on every seed. "
           "**objective10 is the search's objective, not RetDev**: the mean over the tuning "
           "seeds of (|ΔAcc| / 3 on retain, forget and *validation* against the retrained model, "
           "1 − Indisc of the Val-MIA), its Euclidean norm shown with the four terms in brackets "
           "(retain, forget, val, MIA; 0 = the retrained model's accuracies and MIA 0.5); RetDev "
           "sums retention-ratio deviations on retain, forget and *test* and ignores the MIA. "
           "\"Original\": the same norm of the untouched original on the tuning seeds; \"final "
           "run\": of the method's final models on those seeds (another unlearning key than the "
           "trial's).", "",
           "| method | mode | tuning seeds | complete trials | failed trials | best trial | "
           "objective10 best trial | objective10 original | objective10 final run | "
           "best hyper-parameters |", "|---|---|---|---|---|---|---|---|---|---|"]
  def cell(values):
    values = np.asarray(values, np.float64)
    return (f"{_number_cell(np.linalg.norm(values))} ("
            + ", ".join(_number_cell(v, 3) for v in values) + ")")

  for m, t in tuning.items():
    seeds = [float(k) for k in t.get("seeds", ())]
    best = t.get("best_values", [np.nan] * 4)
    original = objective10_of_rows(rows, "original", seeds)
    final = objective10_of_rows(rows, m, seeds)
    lines.append(
        f"| {m} | {t.get('mode', '')} | {', '.join(str(int(k)) for k in seeds)} | "
        f"{t['trials_complete']} | {t['trials_failed']} | {t.get('best_trial', '')} | "
        f"{cell(best)} | {cell(original)} | {cell(final)} | "
        + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(t.get("best_params", {}).items())) + " |")
  return lines + [""]


def _choice_lines(tuning) -> list[str]:
  """Per tuned method: objective10's best trial against the study's most accurate trial (smallest
  norm of the three accuracy terms); where they differ, the paired per-seed difference of their
  MIA terms over the tuning seeds says whether the MIA term chose by a measured difference or
  by noise (a t-interval containing 0)."""
  lines = []
  for m, t in tuning.items():
    accurate, best_rows = t.get("most_accurate_trial"), t.get("best_per_model")
    if not accurate or best_rows is None or accurate.get("per_model") is None:
      continue
    best, other = np.asarray(best_rows, np.float64), np.asarray(accurate["per_model"], np.float64)
    accuracy_norm = lambda rows: _number_cell(np.linalg.norm(rows.mean(0)[:3]), 3)
    mia = lambda rows: _interval(*t_interval(rows[:, 3]), digits=3)
    head = (f"- **{m}**: objective10 chose trial {t.get('best_trial')} (accuracy terms' norm "
            f"{accuracy_norm(best)}, MIA term {mia(best)})")
    if accurate["number"] == t.get("best_trial"):
      lines.append(head + ", also the study's most accurate trial.")
      continue
    d = paired_difference(other[:, 3], best[:, 3])
    verdict = ("a difference measured on these seeds, not noise: objective10 prefers the less "
               "accurate trial for its lower MIA term" if d["tied"] == 0.0 and d["diff"] > 0
               else "within the noise of the MIA term on these seeds (the paired interval "
               "contains 0): more tuning seeds could change the choice" if d["tied"] == 1.0
               else "undecidable with one tuning seed")
    lines.append(
        head + f"; the most accurate trial, {accurate['number']} (accuracy terms' norm "
        f"{accuracy_norm(other)}, MIA term {mia(other)}), lost on the MIA term: paired "
        f"difference {_interval(d['diff'], d['diff_low'], d['diff_high'], digits=3, sign='+')} "
        f"over the {len(best)} tuning seeds, {verdict}.")
  if not lines:
    return []
  return [f"Why each trial was chosen (MIA term: mean [{CONFIDENCE:.0%} t-interval] over the "
          "tuning seeds; accuracy terms' norm: of the retain, forget and val gaps, the part of "
          "objective10 that tracks RetDev):", ""] + lines + [""]


def write_benchmark_report(directory: str | os.PathLike, title: str,
                           rows: Sequence[Mapping[str, Any]], times: Mapping[str, Any],
                           tuning: Mapping[str, Mapping[str, Any]],
                           stages_run: Mapping[str, str],
                           ulira_dir: str | os.PathLike | None = None) -> Path:
  """Writes ``report.md`` and its figures (PNG and PDF) into ``directory``; returns its path.

  ``tuning``: {method: {"trials_complete", "trials_failed", "seeds", "mode", "best_values",
  ...}} of the tuned methods; ``stages_run``: {stage: why it ran in this run, or "reused"};
  ``ulira_dir``: the U-LiRA stage's directory (``ulira.csv``, ``roc/<method>.npz``) or None.
  Tuned methods and methods run with the reference defaults are in separate tables (one
  ranking); failed runs (``failure`` in the rows) in a list of their own.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  summary = benchmark_summary(rows)
  tuned = tuple(tuning)
  # The tuned table also holds each tuned method's run with its most accurate trial.
  searched = tuned + tuple(f"{m}{ACCURATE_SUFFIX}" for m in tuned)
  ulira, curves = read_ulira(ulira_dir) if ulira_dir else ({}, {})
  plot_retdev_vs_rte(summary, directory / FIGURES[0], searched)
  plot_forget_accuracy(summary, directory / FIGURES[1], searched)
  if curves:
    plot_ulira_roc(curves, directory / ULIRA_FIGURE,
                   aucs={m: r["auc"] for m, r in ulira.items()})
  ranked = rank(summary)
  by_name = {s["method"]: s for s in summary}
  seeds = int(by_name["retrain"]["seeds"])
  lines = [f"# {title}", ""] + _findings(summary, tuned)
  legend = (
      f"Ranked by RetDev = |RR − 1| + |FR − 1| + |TR − 1| (retain, forget and test accuracy "
      f"retention against the same seed's retrained model; lower is better), **per seed, then "
      f"the mean over the {seeds} seeds with its {CONFIDENCE:.0%} Student t interval** (n − 1 "
      f"degrees of freedom); equal means by higher mean Indisc. **Ties:** Δ vs #1 is the mean "
      f"per-seed difference to the best method (all methods unlearn the same originals) with its "
      f"paired {CONFIDENCE:.0%} t-interval; where it contains 0 (a two-sided paired t-test at "
      f"5 % does not reject equality) the method is marked ≈ and \"(≈1)\". RetDev of means: of "
      f"the seed-mean accuracies, the third-party tables' convention (deepunlearn-spec 9.2). "
      f"RA/FA/TA: retain/forget/test accuracy; T-MIA: the population MIA, forget vs test (0.5 "
      f"ideal); both mean ± sample std (ddof 1) over seeds. Indisc = 1 − |2·T-MIA − 1| of the "
      f"seed-mean T-MIA. RTE: retraining time / unlearning time per model, one timing per stack "
      f"of seeds (no spread), both timed as compiled work, compilation excluded" + (
          "; U-LiRA: per-sample attack's balanced accuracy with its interval (0.5 = "
          "indistinguishable from retraining)" if ulira else "") + ".")
  tuned_ranked = [s["method"] for s in ranked if s["method"] in searched]
  default_ranked = [s["method"] for s in ranked if s["method"] not in searched]
  if tuned_ranked:
    variant = ([f"Rows `<method>{ACCURATE_SUFFIX}`: the tuned method run with its study's most "
                "accurate trial (smallest accuracy terms, MIA term left out) instead of "
                "objective10's choice; a diagnostic, not the reference's selection.", ""]
               if any(map(is_diagnostic, tuned_ranked)) else [])
    lines += [f"## Tuned methods, ranked by closeness to the retrained model ({seeds} seeds)", "",
              legend, ""] + variant + [paper_table(summary, ulira, tuned_ranked), ""]
  if default_ranked:
    lines += [f"## Reference defaults (not tuned), ranked by closeness to the retrained model "
              f"({seeds} seeds)", "",
              ("Ranks are over all methods (tuned ones included); columns as above. These "
               "methods ran with the reference's default hyper-parameters (sized for ResNet-18 "
               "on ~40,000 CIFAR samples), not tuned for this model and dataset."
               if tuned_ranked else legend), "",
              paper_table(summary, ulira, default_ranked), ""]
  failed = [s for s in summary if s.get("failure")]
  if failed:
    lines += ["## Failed runs (not ranked)", "",
              "Final runs whose weights or logits are not finite (a diverged unlearning): "
              "their metrics are undefined, so they are listed here and in `results.csv` "
              "(column `failure`) but not ranked.", ""]
    lines += [f"- **{s['method']}**: {s['failure']}" for s in failed] + [""]
  lines += [f"![RetDev against RTE]({FIGURES[0]})", "", f"![Forget accuracy]({FIGURES[1]})", ""]
  if ulira:
    lines += ["## U-LiRA", "",
              "Per-sample unlearning inference against retraining (the `ulira` stage, files in "
              "`ulira/`): 0.5 = indistinguishable from retraining, 1.0 = always told apart.", "",
              ulira_table(list(ulira.values())), "", HPARAMS_NOTE, ""]
  if curves:
    lines += [f"![U-LiRA ROC]({ULIRA_FIGURE})", ""]
  lines += ["## Hyper-parameters", ""] + _tuning_lines(tuning, rows) + _choice_lines(tuning)
  untuned = default_ranked + [s["method"] for s in failed if s["method"] not in searched]
  if untuned:
    lines += [f"Not tuned (the config's hyper-parameters): {', '.join(untuned)}.", ""]
  lines += [
      "## This run", "",
      f"Reference models: {times['models']} models (original and retrained per seed) trained as "
      f"one stack, {times['epochs']} epochs, {times['stack_seconds']:.1f} s of compiled epochs "
      f"({times['seconds_per_model']:.2f} s per model, the retraining time of RTE).", "",
      "Stages recomputed in this run: " + (", ".join(
          f"{name} ({why})" for name, why in stages_run.items() if why != "reused") or "none")
      + ".", "",
      "Stages reused from earlier runs: " + (", ".join(
          name for name, why in stages_run.items() if why == "reused") or "none") + ".", "",
      "## All metrics", "",
      "Mean ± sample std (ddof 1) over seeds per method (`summary.csv`; per seed in "
      "`results.csv`); seconds and RTE are one timing per stack (\"± —\"). Distances are "
      "between parameter vectors: l2, normalized l2 (of unit-norm vectors) and Golatkar's "
      "‖θ − θ_ref‖/‖θ‖, to the seed's original and retrained model.", "",
      markdown_table(rows, single=STACK_COLUMNS), ""]
  path = directory / "report.md"
  path.write_text("\n".join(lines))
  return path
