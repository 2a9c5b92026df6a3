"""The architecture matrix of IAM's Fig. 4 from finished IAM runs.

One run per (target, shadow) pair.

    jaxmu iam-matrix --workdirs='runs/arch/*' --out=runs/arch

Reads each run's config.json (target and shadow architecture) and binui.csv (K = 1 AUCs) and
writes <out>/matrix.md (one table per attack) and <out>/matrix.csv; docs/iam.md shows how to fill
the matrix while training each architecture only once (`config.reuse`).
"""

import glob
from pathlib import Path

from absl import app, flags

from jaxmu import cli, report, validate
from jaxmu.pipelines import iam_matrix

_WORKDIRS = flags.DEFINE_list("workdirs", None, "IAM work directories or glob patterns.")
_OUT = flags.DEFINE_string("out", "runs/arch", "Output directory.")
_FORGET = flags.DEFINE_string("forget", None, "Unlearning type (default: each run's first).")
flags.mark_flags_as_required(["workdirs"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = Path(_OUT.value)
  if out.exists() and not out.is_dir():
    raise validate.problem("--out", f"{out} is a file, not a directory", "give a directory")
  workdirs = []
  for pattern in _WORKDIRS.value:
    found = sorted(w for w in glob.glob(pattern) if Path(w).is_dir())
    if not found:
      raise validate.problem("--workdirs", f"no work directory matches {pattern!r}",
                             "give finished IAM runs' directories or a glob of them")
    workdirs += [w for w in found if w not in workdirs]
  rows, text = iam_matrix.arch_matrix(workdirs, _FORGET.value)
  out.mkdir(parents=True, exist_ok=True)
  report.write_csv(out / "matrix.csv", rows)
  (out / "matrix.md").write_text(text)
  print(text)
  print(f"Done: {out}")

