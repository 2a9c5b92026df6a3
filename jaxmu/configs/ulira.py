"""U-LiRA alone: unlearning methods against retraining (deepunlearn-spec 7, Hayes et al. 2024).

    jaxmu ulira --config=ulira:dataset=cifar10,model=resnet18 \
        --workdir=runs/ulira_cifar10_resnet18 --config.search_dir=runs/cifar10_resnet18/search
    jaxmu ulira --config=ulira:cpu --workdir=runs/ulira_cpu

The settings are a DeepUnlearn config's ``ulira`` section (jaxmu/configs/deepunlearn.py); within a
DeepUnlearn run, `--config.ulira.enabled=True` runs U-LiRA as its stage with that run's search
(jaxmu/configs/quickstart.py does). Alone, the hyper-parameters come from a finished search
(``search_dir``) or the methods' defaults.

Reference scale (the default, spec 7.1-7.2): 64 splits x 10 forget draws = 640 unlearning runs per
method, ResNet-18 trained 91 epochs from one shared initialisation; methods FT, MSG, CFW, PRMQ, CT,
KDE and `original` (the unlearning-free upper bound). Compute: 64 originals (one per split, shared
by its draws) and 640 retrained models, about 1.4e9 training sample-passes, plus 640 runs of every
method (~0.5e9 more for the six) and predictions of 8 x 640 models on 50,000 images: estimated
10-20 hours on one H100 (not measured), in chunks of 64 models. Expected: balanced accuracies
above 0.5 (0.5 = indistinguishable from retraining).

`cpu` (digits, small CNN, 8 splits x 2 draws with a 30% forget share so that each sample is
forgotten in about 2.4 models, 20 epochs, `original`, `finetune`, `msg`, `ct`, pooled variance):
about a minute on a 2-core CPU, compilation included (measured 65 s on a shared one);
expect balanced accuracies of 0.85-0.97, i.e. every method told apart from retraining.
Arguments: `dataset=..,model=..` or `cpu`.
"""

from jaxmu.configs import deepunlearn


def cpu_settings(ulira):
  """The `cpu` variant of a config's ``ulira`` section (also jaxmu/configs/quickstart.py's stage)."""
  ulira.lira.num_splits = 8
  ulira.lira.num_forget_draws = 2
  ulira.lira.forget_ratio = 0.3
  ulira.epochs = 20
  ulira.methods = ("original", "finetune", "msg", "ct")
  ulira.max_models_per_program = 0  # the whole stack at once
  ulira.fix_variance = True  # ~2.4 forgotten models per sample: per-sample variances are noise


def get_config(arg: str | None = None):
  args = [a for a in (arg or "dataset=cifar10,model=resnet18").split(",") if a]
  cpu = "cpu" in args
  pairs = dict(a.split("=", 1) for a in args if a != "cpu" and "=" in a)
  unknown = set(pairs) - {"dataset", "model"} | {a for a in args if a != "cpu" and "=" not in a}
  if unknown:
    raise ValueError(f"unknown config arguments {sorted(unknown)}; use dataset=..,model=.. or cpu")
  dataset = pairs.get("dataset", "digits" if cpu else "cifar10")
  model = pairs.get("model", "small_cnn" if cpu else "resnet18")
  c = deepunlearn.get_config(f"dataset={dataset},model={model}")
  del c.split, c.seeds, c.methods, c.search  # the benchmark's; U-LiRA has its own
  c.ulira.enabled = True
  c.search_dir = ""  # the main run's <workdir>/search: each method's best hyper-parameters
  if cpu:
    c.train.batch_size = 64
    c.train.learning_rate = 0.05
    c.checkpoint_every = 10
    cpu_settings(c.ulira)
  return c
