"""Prints and writes the plan of a pipeline run, without data and without training (`jaxmu.plan`):
stages in order, models, programs, sample-passes, FLOPs, device time, memory, disk, and which
stages an existing workdir would reuse.

    python launch/plan.py --config=configs/deepunlearn.py:dataset=cifar10,model=resnet18
    python launch/plan.py --config=configs/iam.py:dataset=cifar100 --workdir=runs/iam_cifar100 \
        --rate_tflops=200
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and an uninstalled jaxmu

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxmu import cli, plan  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file of any pipeline (deepunlearn, ulira, iam).", lock_config=True)
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
  cli.exit_on_problems(plan.pipeline_of(_CONFIG.value), _CONFIG.value)
  result = plan.make(_CONFIG.value, _WORKDIR.value, _RATE.value)
  path = result.write(_WORKDIR.value or Path("runs", "plan"))
  print(result.markdown())
  print(f"Done: {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
