r"""Runs the DeepUnlearn pipeline for one config over a workdir (resumable).

    jaxmu deepunlearn --config=quickstart --workdir=runs/quickstart
    jaxmu deepunlearn --config=deepunlearn:dataset=cifar10,model=resnet18 \
        --workdir=runs/cifar10_resnet18 --config.parallel.strategy=vmap
    # more workers on the same workdir (another shell or machine with the same filesystem):
    jaxmu deepunlearn --config=... --workdir=runs/cifar10_resnet18 --worker=1
"""

from absl import app, flags
from ml_collections import config_flags

from jaxmu import cli
from jaxmu.pipelines import deepunlearn

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if present).")
_WORKER = flags.DEFINE_integer(
    "worker", 0, "Index of this process when several run on the same workdir: the stages are "
    "locked, the search studies are shared and each worker seeds its sampler with its index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.run_pipeline("deepunlearn", deepunlearn.run, _CONFIG.value, _WORKDIR.value, argv,
                   process=_WORKER.value)

