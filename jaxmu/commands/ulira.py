"""Runs U-LiRA alone over a workdir (resumable); within a DeepUnlearn run it is that pipeline's
`ulira` stage (`--config.ulira.enabled=True`).

    python launch/ulira.py --config=configs/ulira.py:cpu --workdir=runs/ulira_cpu
    python launch/ulira.py --config=configs/ulira.py:dataset=cifar10,model=resnet18 \
        --workdir=runs/ulira_cifar10_resnet18 --config.search_dir=runs/cifar10_resnet18/search
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and an uninstalled jaxmu

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxmu import cli  # noqa: E402
from jaxmu.pipelines import ulira  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if present).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.run_pipeline("ulira", ulira.run, _CONFIG.value, _WORKDIR.value, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
