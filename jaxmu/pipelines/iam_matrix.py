"""Fig. 4 of the IAM paper (iam-spec 7.3, 10.8): the K = 1 BinUI AUC of every attack per (target
architecture, shadow architecture), read from finished IAM runs (jaxmu iam-matrix)."""

from __future__ import annotations

import numpy as np

from jaxmu.attacks.audit import ATTACKS
from jaxmu.pipelines.iam_setting import FinishedRun, architecture, forget_types
from jaxmu.report import mean_std, read_csv, sample_std


def _arch_label(config, kind):
  name, options = architecture(config, kind)
  return name + (f"[{','.join(f'{k}={v}' for k, v in options)}]" if options else "")


def arch_matrix(workdirs, forget=None):
  """Fig. 4 (iam-spec 7.3, 10.8): the K = 1 BinUI AUC of every attack per (target architecture,
  shadow architecture), one finished run (work directory) per cell, for the unlearning type
  ``forget`` (default: each run's first). Returns (rows, markdown): rows with target, shadow,
  attack, auc (mean over shadow groups), auc_std (sample std, ddof 1; NaN for one group) and
  groups; markdown, one table per attack.

  The cheap way to fill the matrix: one `exact` run per architecture, then for each other pair a
  `setting="arch"` run with ``config.reuse.targets`` and ``config.reuse.shadows`` pointing at the
  two runs, which trains nothing (docs/iam.md).
  """
  cells = {}
  for workdir in workdirs:
    run = FinishedRun(workdir, "workdir")
    if not run.path("binui.csv").exists():
      raise ValueError(f"{str(workdir)!r} has no binui.csv; run its IAM audit up to binui first")
    kind = forget or forget_types(run.config)[0]
    rows = [r for r in read_csv(run.path("binui.csv"))
            if int(r["k"]) == 1 and r["forget"] == kind]
    if not rows:
      raise ValueError(f"{str(workdir)!r} has no K = 1 results for unlearning type {kind!r}")
    cell = (_arch_label(run.config, "targets"), _arch_label(run.config, "shadows"))
    if cell in cells:
      raise ValueError(f"two work directories give the cell target={cell[0]}, shadow={cell[1]}: "
                       f"{cells[cell][0]} and {workdir}")
    cells[cell] = (workdir, rows)
  targets = list(dict.fromkeys(t for t, _ in cells))
  shadows = list(dict.fromkeys(s for _, s in cells))
  attacks = list(dict.fromkeys(r["attack"] for _, rows in cells.values() for r in rows))
  out_rows, text = [], []
  for a in attacks:
    text += [f"## {ATTACKS[a][0]}: AUC % (rows: target, columns: shadow; ± std over groups)", "",
             "| target \\ shadow | " + " | ".join(shadows) + " |",
             "|---" * (len(shadows) + 1) + "|"]
    for t in targets:
      line = []
      for s in shadows:
        auc = [r["auc"] for r in cells.get((t, s), (None, []))[1] if r["attack"] == a]
        if auc:
          out_rows.append({"target": t, "shadow": s, "attack": a, "auc": float(np.mean(auc)),
                           "auc_std": sample_std(auc), "groups": len(auc)})
        line.append(mean_std(auc) if auc else "—")
      text.append(f"| {t} | " + " | ".join(line) + " |")
    text.append("")
  return out_rows, "\n".join(text)
