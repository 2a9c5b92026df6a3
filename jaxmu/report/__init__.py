"""Results a person reads: CSV tables, Markdown reports (mean and std over seeds), PNG figures.

This package holds the helpers every report shares; each pipeline's rendering lives beside them
(`deepunlearn`, `ulira`, `iam`). The DeepUnlearn and U-LiRA names are re-exported here.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
from jaxmu.stages import atomic_write



def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
  """One row per mapping; columns in first-seen order."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with atomic_write(path, "w") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a CSV written by `write_csv`; numeric cells become floats."""
  with open(path, newline="") as f:
    return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str) -> Any:
  try:
    return float(text)
  except ValueError:
    return text


def summarize(rows: Sequence[Mapping[str, Any]], by: str = "method") -> list[dict[str, Any]]:
  """Mean and (population) std over seeds of every numeric column, per value of ``by``."""
  groups: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
  for row in rows:
    groups[row[by]].append(row)
  metrics = list(dict.fromkeys(k for row in rows for k, v in row.items()
                               if k not in (by, "seed") and isinstance(v, float)))
  out = []
  for name, members in groups.items():
    summary = {by: name, "seeds": len(members)}
    for metric in metrics:
      values = np.asarray([m[metric] for m in members if isinstance(m.get(metric), float)])
      summary[f"{metric}_mean"] = values.mean() if len(values) else np.nan
      summary[f"{metric}_std"] = values.std() if len(values) else np.nan
    out.append(summary)
  return out


def markdown_table(rows: Sequence[Mapping[str, Any]], by: str = "method") -> str:
  """Markdown table with one "mean ± std" cell per metric."""
  summary = summarize(rows, by)
  metrics = [k[:-5] for k in summary[0] if k.endswith("_mean")]
  lines = ["| " + " | ".join([by, "seeds", *metrics]) + " |",
           "|" + "---|" * (len(metrics) + 2)]
  for s in summary:
    cells = [f"{s[m + '_mean']:.4f} ± {s[m + '_std']:.4f}" if np.isfinite(s[m + "_mean"])
             else "—" for m in metrics]
    lines.append("| " + " | ".join([str(s[by]), str(s["seeds"]), *cells]) + " |")
  return "\n".join(lines)


def mean_std(values, scale: float = 100.0, digits: int = 2) -> str:
  """"mean ± std" of ``values`` times ``scale`` (percent by default)."""
  v = scale * np.asarray(values, np.float64)
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


# Each pipeline's rendering, after the shared helpers it imports from here.
from jaxmu.report.deepunlearn import (FIGURES, REFERENCE_ROWS, benchmark_summary,  # noqa: E402
                                      figure_names, paper_table, plot_forget_accuracy,
                                      plot_retdev_vs_rte, rank, write_benchmark_report)
from jaxmu.report.ulira import (ULIRA_FIGURE, plot_ulira_roc, read_ulira,  # noqa: E402
                                ulira_table)
