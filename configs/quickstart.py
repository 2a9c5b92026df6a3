"""The embedded default: DeepUnlearn reference models on sklearn's digits with a small CNN.

    python launch/deepunlearn.py --config=configs/quickstart.py --workdir=runs/quickstart
    (or `make demo`)

Trains, for each of 4 seeds, an "original" model (retain + forget) and a "retrained" model
(retain only) from the same initialisation, all as stacks. Expect about a minute on a 2-core CPU,
compilation included; originals reach test accuracy >= 0.95 and retain accuracy near 1.0.
Report: runs/quickstart/report.md.
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
  return config
