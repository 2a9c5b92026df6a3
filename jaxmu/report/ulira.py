"""The U-LiRA report: the table of methods by their distance from indistinguishability, the ROC
figure (its own report.md when U-LiRA runs alone; a section of the DeepUnlearn report when it
runs as that pipeline's stage)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.figure import Figure

from jaxmu.report import bracket, read_csv

ULIRA_FIGURE = "ulira_roc.png"


def read_ulira(directory: str | os.PathLike) -> tuple[dict[str, dict], dict[str, dict]]:
  """``<directory>/ulira.csv`` rows by method and ``roc/<method>.npz`` curves (fpr, tpr)."""
  directory = Path(directory)
  rows = {r["method"]: r for r in read_csv(directory / "ulira.csv")}
  curves = {}
  for path in sorted(directory.glob("roc/*.npz")):
    with np.load(path) as z:
      curves[path.stem] = {"fpr": z["fpr"], "tpr": z["tpr"]}
  return rows, curves


def plot_ulira_roc(curves: Mapping[str, Mapping[str, np.ndarray]],
                   path: str | os.PathLike,
                   aucs: Mapping[str, float] | None = None) -> None:
  """U-LiRA ROC per method, log-log (low false-positive rates matter for per-sample attacks).

  Each method in its fixed colour (`method_colors`, the same as in the DeepUnlearn figures),
  its AUC in the legend (``aucs``, else the trapezoid area of the curve). Both axes are floored
  at the smallest non-zero FPR of the curves, i.e. one over the number of negatives (retrained
  observations) where the curve keeps its first step, not at an arbitrary 1e-5; the chance
  diagonal from there. Also written as PDF."""
  from jaxmu.report import method_colors, save_figure
  colors = method_colors(list(curves))
  positive = [c["fpr"][c["fpr"] > 0] for c in curves.values()]
  floor = min([float(p.min()) for p in positive if p.size] or [1e-3])
  fig = Figure(figsize=(6, 5), layout="constrained")
  ax = fig.add_subplot()
  for method, c in curves.items():
    area = (aucs or {}).get(method)
    area = float(np.trapezoid(c["tpr"], c["fpr"])) if area is None else float(area)
    ax.plot(np.maximum(c["fpr"], floor), np.maximum(c["tpr"], floor), color=colors[method],
            label=f"{method} (AUC {area:.3f})", drawstyle="steps-post")
  ax.plot([floor, 1], [floor, 1], color="gray", linestyle=":", label="chance (AUC 0.5)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlim(floor, 1)
  ax.set_ylim(floor, 1.05)
  ax.set_xlabel(f"false positive rate (floored at {floor:.1e} = smallest non-zero FPR)")
  ax.set_ylabel("true positive rate")
  ax.set_title("U-LiRA: unlearned vs retrained (chance = indistinguishable)")
  ax.legend(fontsize=7, loc="lower right")
  save_figure(fig, path)


def ulira_table(rows: list[dict]) -> str:
  """Methods (`ulira.csv` rows) ranked by the distance of their balanced accuracy from 0.5."""
  reference = "reference_member_prob" in rows[0]
  header = ["method", "U-LiRA acc.", "95% CI", "AUC", "samples", "mean P(unlearned)",
            "pop. MIA (forget vs val), mean ± std over models (ddof 0, ulira.csv)",
            "hyper-parameters"]
  if reference:
    header.append("reference 0/1 P(member)")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in sorted(rows, key=lambda r: abs(r["balanced_accuracy"] - 0.5)):
    cells = [str(r["method"]), f"{r['balanced_accuracy']:.4f}",
             bracket(r["ci_low"], r["ci_high"]), f"{r['auc']:.4f}",
             f"{int(r['num_samples'])}", f"{r['mean_member_prob']:.4f}",
             f"{r['population_mia']:.4f} ± {r['population_mia_std']:.4f}", str(r["hparams"])]
    if reference:
      cells.append(f"{r['reference_member_prob']:.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def describe(lira, num_models: int) -> str:
  """What the U-LiRA table holds (``lira``: the config's LiRA split settings)."""
  return (
      f"{lira.num_splits} splits x {lira.num_forget_draws} forget draws = {num_models} "
      f"unlearning runs per method ({lira.scheme} splits, forget share {lira.forget_ratio}). "
      "Per forgotten sample, a Gaussian of the scaled logit of the unlearned models that forgot "
      "it against one of the retrained models that never saw it, each fitted without the scored "
      "model (Hayes et al. 2024; `jaxmu.attacks.lira.ulira`). **U-LiRA acc.** is the balanced "
      "accuracy of telling them apart: 0.5 = indistinguishable from retraining (best), 1.0 = "
      "always told apart. Methods ranked by their distance from 0.5; samples = forgotten samples "
      "with at least 2 observations in each group. Population MIA: DeepUnlearn's attack "
      "(0.5 ideal), mean ± std over models.")


def ulira_report(config, rows: list[dict], times: dict) -> str:
  """report.md of U-LiRA alone: the table, the ROC figure (roc.png) and the training run."""
  return "\n".join([
      f"# U-LiRA: {config.dataset.name} / {config.model.name}", "",
      describe(config.ulira.lira, int(rows[0]["models"])), "",
      ulira_table(rows), "",
      "![U-LiRA ROC](roc.png)", "",
      f"Training: {times['models']} models (originals and retrained) as one stack, "
      f"{times['epochs']} epochs, {times['stack_seconds']:.1f} s wall time.",
      HPARAMS_NOTE, ""])


HPARAMS_NOTE = ("Hyper-parameters: `search` = the main search's best trial, `defaults` = the "
                "method's defaults. Not done here: the reference's per-split search (200 trials "
                "on each of 32 splits); every split uses the same hyper-parameters.")
