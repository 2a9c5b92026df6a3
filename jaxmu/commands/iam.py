r"""Runs the IAM audit pipeline for one config over a workdir (resumable).

    jaxmu iam --config=iam:dataset=digits --workdir=runs/iam_digits
    jaxmu iam --config=iam:dataset=cifar100 --workdir=runs/iam_cifar100 \
        --config.parallel.strategy=vmap --config.parallel.max_models_per_program=8
"""

from absl import app, flags
from ml_collections import config_flags

from jaxmu import cli
from jaxmu.pipelines import iam

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if present).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.run_pipeline("iam", iam.run, _CONFIG.value, _WORKDIR.value, argv)

