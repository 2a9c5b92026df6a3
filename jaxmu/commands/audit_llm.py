"""Audits a language model's unlearning from saved per-chunk losses (`jaxmu.attacks.llm`).

    jaxmu audit-llm --nll_dir=logs/bash-00000000-muse-bench --out=runs/audit_llm
    jaxmu audit-llm --nll_dir=DIR --prefix=MUSE-News --attacks=iam_on,lira_on,loss

DIR holds the reference's text files, one number per chunk in chunk order (an optional
"key :" header line first): <prefix>-label.txt (1 = retained chunk, 0 = forgotten),
<prefix>-nlloss.txt (target), <prefix>-fitRef_nlloss.txt (original), <prefix>-ref_nlloss.txt
(OUT reference); optionally the population losses for RMIA-On and <prefix>-tokens.npz (text and
per-token arrays). docs/iam.md ("Auditing language models") lists every file and key. Runs every
attack the files allow; writes <out>/results.csv (attack, auc, auc_std, tpr_at_fpr_0.1,
tpr_at_fpr_0.01) and <out>/report.md. Bad input: one line on stderr, exit status 2, nothing
written.
"""

import sys
from pathlib import Path

from absl import app, flags

from jaxmu.attacks import llm
from jaxmu.errors import InputError, Problem

# "out" and "attacks" are also flags of `jaxmu audit`; allow_override lets both modules load in
# one process (tests); the CLI loads one command module per process.
_NLL_DIR = flags.DEFINE_string("nll_dir", None, "Folder with the reference's <prefix>-*.txt files.")
_OUT = flags.DEFINE_string("out", "runs/audit_llm", "Output directory.", allow_override=True)
_PREFIX = flags.DEFINE_string("prefix", None, "File prefix (default: the one <prefix>-label.txt).")
_ATTACKS = flags.DEFINE_list("attacks", None, f"Attacks to run (default: all the files allow): "
                             f"{', '.join(llm.ATTACKS)}.", allow_override=True)
_ROUNDS = flags.DEFINE_integer("bootstrap_rounds", 1000,
                               "Balanced bootstrap rounds (iam-spec 9.5).")
_SEED = flags.DEFINE_integer("seed", 42, "Seed of the bootstrap and of bag-of-words' folds.")
_BATCH = flags.DEFINE_integer("iam_batch", llm.IAM_BATCH,
                              "Chunks per IAM-On sigma pool (the reference's 64; 0 = all chunks).")


def _check_flags(out: Path) -> None:
  """An `InputError` with one line per bad flag value."""
  problems = []
  if not _NLL_DIR.value:
    problems.append(Problem("--nll_dir", "missing", "pass --nll_dir=DIR, the folder with the "
                            "reference's <prefix>-label.txt and <prefix>-nlloss.txt"))
  for flag, value, low, example in (("bootstrap_rounds", _ROUNDS.value, 1, 1000),
                                    ("iam_batch", _BATCH.value, 0, 64),
                                    ("seed", _SEED.value, 0, 42)):
    if value < low:
      problems.append(Problem(f"--{flag}", f"{value} is below {low}", f"e.g. --{flag}={example}"))
  blocker = next((p for p in (out, *out.parents) if p.exists()), out)  # out or its parent
  if blocker.exists() and not blocker.is_dir():
    problems.append(Problem("--out", f"{blocker} is a file, not a directory",
                            f"give a directory, e.g. --out={blocker.with_suffix('')}_audit_llm"))
  if problems:
    raise InputError(problems)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = Path(_OUT.value)
  try:
    _check_flags(out)
    # Every input error is raised here, before anything is written.
    result = llm.audit_files(_NLL_DIR.value, _PREFIX.value, attacks=_ATTACKS.value,
                             rounds=_ROUNDS.value, seed=_SEED.value,
                             batch_size=_BATCH.value or None)
  except ValueError as e:  # jaxmu.errors.InputError and bad values: one line each, exit 2
    lines = getattr(e, "problems", None) or [e]
    for line in lines:
      print("error: " + "; ".join(p.strip() for p in str(line).splitlines() if p.strip()),
            file=sys.stderr)
    sys.exit(2)
  llm.write_results(result, out, _ROUNDS.value)
  print(llm.report_markdown(result, _ROUNDS.value))
  print(f"Done: {out}")
