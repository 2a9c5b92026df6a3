r"""The plan of a pipeline run, without data and without training (`jaxmu.plan`).

Stages in order, models, programs, sample-passes, FLOPs, device time, memory, disk, and which
stages an existing workdir would reuse.

    jaxmu plan --config=deepunlearn:dataset=cifar10,model=resnet18
    jaxmu plan --config=iam:dataset=cifar100 --workdir=runs/iam_cifar100 \
        --rate_tflops=200
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from jaxmu import cli, plan, validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, cli.CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "An existing run's work directory: its stage records say what would be "
    "reused (only read); plan.md and plan.json are written there. Default: runs/plan.")
_RATE = flags.DEFINE_float(
    "rate_tflops", plan.RATE_TFLOPS, "Sustained device rate (TFLOP/s) of the device-time "
    "estimate (default: docs/benchmarks.md, \"Plan's default rate\").")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = Path(_WORKDIR.value or Path("runs", "plan"))
  if workdir.exists() and not workdir.is_dir():
    raise validate.problem("--workdir", f"{workdir} is a file, not a directory",
                           "give a run's work directory, or leave --workdir out")
  cli.exit_on_problems(plan.pipeline_of(_CONFIG.value), _CONFIG.value)
  result = plan.make(_CONFIG.value, _WORKDIR.value, _RATE.value)
  path = result.write(_WORKDIR.value or Path("runs", "plan"))
  print(result.markdown())
  print(f"Done: {path}")

