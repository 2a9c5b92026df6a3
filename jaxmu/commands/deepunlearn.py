"""Runs the DeepUnlearn pipeline for one config over a workdir (resumable).

    python launch/deepunlearn.py --config=configs/quickstart.py --workdir=runs/quickstart
    python launch/deepunlearn.py --config=configs/deepunlearn.py:dataset=cifar10,model=resnet18 \
        --workdir=runs/cifar10_resnet18 --config.parallel.strategy=vmap
    # more workers on the same workdir (another shell or machine with the same filesystem):
    python launch/deepunlearn.py --config=... --workdir=runs/cifar10_resnet18 --worker=1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and an uninstalled jaxmu

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxmu import cli  # noqa: E402
from jaxmu.pipelines import deepunlearn  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if present).")
_WORKER = flags.DEFINE_integer(
    "worker", 0, "Index of this process when several run on the same workdir: the stages are "
    "locked, the search studies are shared and each worker seeds its sampler with its index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.run_pipeline("deepunlearn", deepunlearn.run, _CONFIG.value, _WORKDIR.value, argv,
                   process=_WORKER.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
