"""The embedded default: DeepUnlearn reference models on sklearn's digits with a small CNN.

    python launch/deepunlearn.py --config=configs/quickstart.py --workdir=runs/quickstart
    (or `make demo`)

Trains, for each of 4 seeds, an "original" model (retain + forget) and a "retrained" model
(retain only) from the same initialisation, all as one stack (about a minute on a 2-core CPU,
compilation included; originals reach test accuracy >= 0.95, retain accuracy near 1.0), then runs
every unlearning method of the registry with the reference defaults on the stack of originals
(about 4 minutes in all on a 2-core CPU). Report: runs/quickstart/report.md.
"""

from configs import deepunlearn


def get_config(arg: str | None = None):
  del arg
  config = deepunlearn.get_config("dataset=digits,model=small_cnn")
  config.seeds = (0, 1, 2, 3)
  config.train.epochs = 30
  config.train.batch_size = 64
  config.train.learning_rate = 0.05
  config.checkpoint_every = 10
  # Changes from the reference defaults, for a demo of a few minutes on a 2-core CPU:
  config.unlearn.forsaken.num_epochs = 10  # 100 generator iterations take ~1 min per model here
  config.unlearn.l_codec.n_perturbations = 100  # 1,000 input perturbations: ~1 min per model
  return config
