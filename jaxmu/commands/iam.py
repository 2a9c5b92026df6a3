"""Runs the IAM audit pipeline for one config over a workdir (resumable).

    python launch/iam.py --config=configs/iam.py:dataset=digits --workdir=runs/iam_digits
    python launch/iam.py --config=configs/iam.py:dataset=cifar100 --workdir=runs/iam_cifar100 \
        --config.parallel.strategy=vmap --config.parallel.max_models_per_program=8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and an uninstalled jaxmu

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxmu import cli  # noqa: E402
from jaxmu.pipelines import iam  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if present).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.run_pipeline("iam", iam.run, _CONFIG.value, _WORKDIR.value, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
