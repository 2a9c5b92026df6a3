r"""Runs IAM's language-model audit (Tables 6 and 7) over a workdir (resumable).

    jaxmu iam-llm --config=iam_llm --workdir=runs/iam_llm                    # CPU, minutes
    jaxmu iam-llm --config=iam_llm:hf --workdir=runs/iam_llm_muse \
        --config.models.target_dir=ckpt/MUSE-news_retrain \
        --config.models.fit_dir=ckpt/MUSE-news_target --config.models.ref_dir=ckpt/base_190k \
        --config.corpus.forget_file=forget.txt --config.corpus.retain_file=retain2.txt

The per-chunk loss files land in <workdir>/losses/<setting>/ (`jaxmu audit-llm` re-reads them);
the tables in <workdir>/report.md and <workdir>/results.csv.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxmu import cli
from jaxmu.pipelines import iam_llm

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if present).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.run_pipeline("iam_llm", iam_llm.run, _CONFIG.value, _WORKDIR.value, argv)
