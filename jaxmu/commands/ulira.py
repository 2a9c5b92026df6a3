r"""Runs U-LiRA alone over a workdir (resumable).

Within a DeepUnlearn run it is that pipeline's `ulira` stage (`--config.ulira.enabled=True`).

    jaxmu ulira --config=ulira:cpu --workdir=runs/ulira_cpu
    jaxmu ulira --config=ulira:dataset=cifar10,model=resnet18 \
        --workdir=runs/ulira_cifar10_resnet18 --config.search_dir=runs/cifar10_resnet18/search
"""

from absl import app, flags
from ml_collections import config_flags

from jaxmu import cli
from jaxmu.pipelines import ulira

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if present).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.run_pipeline("ulira", ulira.run, _CONFIG.value, _WORKDIR.value, argv)

