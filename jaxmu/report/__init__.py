"""Results a person reads: CSV tables, Markdown reports (mean, sample std and Student t intervals
over seeds or groups), PNG and PDF figures.

This package holds the helpers every report shares; each pipeline's rendering lives beside them
(`deepunlearn`, `ulira`, `iam`). The DeepUnlearn and U-LiRA names are re-exported here.
"""

from __future__ import annotations

import csv
import os
import zlib
from pathlib import Path
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

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


CONFIDENCE = 0.95  # every interval of the reports: two-sided 95 %


def sample_std(values) -> float:
  """Sample standard deviation (ddof 1) of ``values``; NaN when fewer than two (no spread can be
  estimated from one measurement)."""
  v = np.asarray(values, np.float64)
  return float(v.std(ddof=1)) if v.size > 1 else float("nan")


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
  """(mean, low, high): the two-sided Student t interval of the mean of ``values`` (n - 1 degrees
  of freedom, sample std): mean ± t_{(1+confidence)/2, n-1} · s / √n. Low and high are NaN for
  fewer than two values; equal to the mean when the values are all equal."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), float("nan")
  mean = float(v.mean())
  if v.size < 2:
    return mean, float("nan"), float("nan")
  half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
  return mean, mean - half, mean + half


def bracket(low: float, high: float, digits: int = 4) -> str:
  """"[low, high]" of an interval, "—" where it is undefined (NaN: one value, nothing to
  resample)."""
  if not (np.isfinite(low) and np.isfinite(high)):
    return "—"
  return f"[{low:.{digits}f}, {high:.{digits}f}]"


def paired_difference(a, b, confidence: float = CONFIDENCE) -> dict[str, float]:
  """The paired comparison of ``a`` and ``b`` (the same seeds, in the same order): the mean of the
  per-seed differences a - b with its Student t interval (`t_interval`), and ``tied`` = 1.0 when
  that interval contains 0 (equivalently: a two-sided paired t-test at level 1 - confidence does
  not reject equal means), 0.0 when it does not, NaN when undecidable (fewer than two pairs).
  Identical values (every difference 0) are tied; a constant non-zero difference is not."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  mean, low, high = t_interval(d, confidence)
  tied = float("nan") if not np.isfinite(low) else float(low <= 0.0 <= high)
  return {"diff": mean, "diff_low": low, "diff_high": high, "tied": tied}


def summarize(rows: Sequence[Mapping[str, Any]], by: str = "method",
              single: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Mean and sample std (ddof 1; NaN for one value) of every numeric column, per value of
  ``by``. Columns in ``single`` hold one measurement copied to every row of a group (e.g. a time
  measured once per stack of seeds): their std is NaN (n = 1), not 0."""
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
      summary[f"{metric}_std"] = np.nan if metric in single else sample_std(values)
    out.append(summary)
  return out


def mean_std_cell(mean: float, std: float, digits: int = 4) -> str:
  """"mean ± std", "mean ± —" when the std is undefined (n = 1), "—" when the mean is."""
  if not np.isfinite(mean):
    return "—"
  return f"{mean:.{digits}f} ± " + (f"{std:.{digits}f}" if np.isfinite(std) else "—")


def markdown_table(rows: Sequence[Mapping[str, Any]], by: str = "method",
                   single: Sequence[str] = ()) -> str:
  """Markdown table with one "mean ± sample std (ddof 1)" cell per metric ("± —" where n = 1)."""
  summary = summarize(rows, by, single)
  metrics = [k[:-5] for k in summary[0] if k.endswith("_mean")]
  lines = ["| " + " | ".join([by, "seeds", *metrics]) + " |",
           "|" + "---|" * (len(metrics) + 2)]
  for s in summary:
    cells = [mean_std_cell(s[m + "_mean"], s[m + "_std"]) for m in metrics]
    lines.append("| " + " | ".join([str(s[by]), str(s["seeds"]), *cells]) + " |")
  return "\n".join(lines)


def mean_std(values, scale: float = 100.0, digits: int = 2) -> str:
  """"mean ± sample std (ddof 1)" of ``values`` times ``scale`` (percent by default); "mean ± —"
  for one value (e.g. one shadow group), "—" for none."""
  v = scale * np.asarray(values, np.float64)
  if v.size == 0:
    return "—"
  return mean_std_cell(float(v.mean()), sample_std(v), digits)


REFERENCE_COLORS = {"original": "dimgray", "retrain": "black"}


def method_colors(names: Sequence[str] = ()) -> dict[str, Any]:
  """One fixed colour per method, the same in every figure of every run: the method's position in
  the registry (`jaxmu.methods.METHODS`) picks from the strong colours first (tab20's dark
  half, Dark2, Set1, without their greys and Set1's yellow), then tab20's light half (32
  colours); ``original`` is
  dim grey and ``retrain`` black. "<method>@<variant>" takes the method's colour; names outside
  the registry (in ``names``) a colour picked by a checksum of the name, so they too keep it in
  every figure."""
  from matplotlib import colormaps
  from jaxmu import methods as methods_lib
  tab20 = colormaps["tab20"].colors
  strong = [*tab20[0::2], *colormaps["Dark2"].colors, *colormaps["Set1"].colors]
  palette = [c for c in strong if not (np.ptp(c) < 0.05 or c == colormaps["Set1"].colors[5])]
  palette += [c for c in tab20[1::2] if np.ptp(c) >= 0.05]  # greys are the references'
  palette = list(dict.fromkeys(palette))
  known = [m for m in methods_lib.METHODS if m not in REFERENCE_COLORS]
  colors = {m: palette[i % len(palette)] for i, m in enumerate(known)}
  for m in names:
    base = m.split("@")[0]  # "msg@defaults": msg's run with its defaults, msg's colour
    if m not in colors:
      colors[m] = colors.get(base, palette[zlib.crc32(base.encode()) % len(palette)])
  return {**colors, **REFERENCE_COLORS}


def save_figure(fig, path: str | os.PathLike) -> None:
  """``path`` (PNG, 150 dpi) and the same figure as vector PDF beside it (``.pdf``)."""
  path = Path(path)
  fig.savefig(path, dpi=150, bbox_inches="tight")
  fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")


# Each pipeline's rendering, after the shared helpers it imports from here.
from jaxmu.report.deepunlearn import (FIGURES, REFERENCE_ROWS, benchmark_summary,  # noqa: E402
                                      figure_names, paper_table, plot_forget_accuracy,
                                      plot_retdev_vs_rte, rank)
from jaxmu.report.deepunlearn_markdown import write_benchmark_report  # noqa: E402
from jaxmu.report.ulira import (ULIRA_FIGURE, plot_ulira_roc, read_ulira,  # noqa: E402
                                ulira_table)
