"""Audits saved model outputs with IAM and the baselines (`jaxmu.attacks.audit`).

    jaxmu audit --logits=x.npz --out=runs/audit
    jaxmu audit --logits=dir_of_npy/ --attacks=iam_on,lira_on,rmia_on

The file's keys (an .npz, or a directory of <key>.npy files) are listed in
`jaxmu.attacks.audit.FILE_KEYS` and in the README ("Auditing saved logits"). Writes
<out>/scores.csv (one column per attack, one row per query sample; unlearning scores) and, when
the file holds `forget`, <out>/metrics.csv and a table on stdout.
"""

from pathlib import Path

from absl import app, flags

from jaxmu import cli, report, validate
from jaxmu.attacks.audit import (RMIA_SETTINGS, SIGNALS, audit_file, load_file,
                                 summary_rows)

_LOGITS = flags.DEFINE_string("logits", None, "An .npz file or a directory of <key>.npy files.")
_OUT = flags.DEFINE_string("out", "runs/audit", "Output directory.")
_ATTACKS = flags.DEFINE_list("attacks", None, "Attacks to run (default: all the file allows).")
_SIGNAL = flags.DEFINE_enum("signal", "prob", SIGNALS, "Per-sample signal files: prob | raw.")
_RMIA = flags.DEFINE_string("rmia_dataset", "cifar10",
                            f"RMIA's a and temperature of: {', '.join(RMIA_SETTINGS)}.")
_ONE_SIDED = flags.DEFINE_bool("one_sided_lira", False, "LiRA-Off one-sided (class unlearning).")
flags.mark_flags_as_required(["logits"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _RMIA.value not in RMIA_SETTINGS:
    raise app.UsageError(f"--rmia_dataset must be one of {', '.join(RMIA_SETTINGS)}")
  a, temperature = RMIA_SETTINGS[_RMIA.value]
  out = Path(_OUT.value)
  if out.exists() and not out.is_dir():
    raise validate.problem("--out", f"{out} is a file, not a directory",
                           f"give a directory, e.g. --out={out.with_suffix('')}_audit")
  # Errors (a bad file, shapes, NaN, labels) reach `jaxmu.cli` as one line each, before any write.
  result = audit_file(load_file(_LOGITS.value), attacks=_ATTACKS.value,
                      signal=_SIGNAL.value, rmia_a=a, temperature=temperature,
                      one_sided_lira=_ONE_SIDED.value)
  out.mkdir(parents=True, exist_ok=True)
  names = list(result.scores)
  report.write_csv(out / "scores.csv", [dict(zip(names, row)) for row in
                                        zip(*(result.scores[n].tolist() for n in names))])
  if result.metrics is not None:
    rows = summary_rows(result)
    report.write_csv(out / "metrics.csv", rows)
    print("| attack | AUC | balanced acc. | TPR@FPR=1e-2 | TNR@FNR=1e-2 |\n|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['name']} | {r['auc']:.4f} | {r['balanced_accuracy']:.4f} | "
            f"{r['tpr@0.01']:.4f} | {r['tnr@0.01']:.4f} |")
  print(f"Done: {out}")

