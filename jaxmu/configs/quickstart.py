"""The embedded default: the DeepUnlearn benchmark on sklearn's digits with a small CNN.

    jaxmu deepunlearn --config=quickstart --workdir=runs/quickstart
    jaxmu iam --config=quickstart:iam --workdir=runs/quickstart/iam
    (or `make demo`, which runs both)

Trains, for each of 4 seeds, an "original" model (retain + forget) and a "retrained" model
(retain only) from the same initialisation, all as one stack (originals reach test accuracy
>= 0.95, retain accuracy near 1.0); tunes MSG, CT (the paper's recommended methods) and NG+ (its
recommended baseline) with one stated budget: 20 complete TPE trials each (Optuna's first 10 are
random, the last 10 TPE proposals) on the stack of all 4 seeds; runs every unlearning method of
the registry on the stack of all originals (the three tuned ones with their best trial, again
as "<method>@defaults" with the reference defaults and as "<method>@accurate" with their
study's most accurate trial; the others with the reference defaults); evaluates every (method,
seed); runs U-LiRA as its stage with jaxmu/configs/ulira.py's `cpu` settings and the searched
hyper-parameters (in runs/quickstart/ulira); and writes runs/quickstart/report.md (tuned and
reference-default tables ranked by per-seed RetDev with 95% t-intervals and paired ties, why
each trial was chosen, U-LiRA, figures as PNG and PDF), results.csv and summary.csv.
`quickstart:seeds=N` is the same on N seeds (docs/methods.md has 16).

Measured on 2026-12-07 (docs/methods.md has the tables), idle 2-core CPU, cold compilation
cache: tuned MSG 0.038 [0.014, 0.061] has a lower mean RetDev than the untouched original
(0.050 [0.043, 0.056]) but is not distinguishable from it on 4 seeds; tuned CT (0.139 [0.111,
0.167]) is further from retraining than the original, while its most accurate trial
(ct@accurate, 0.043 [0.027, 0.059]) is tied with #1; each tuned method is at least as good as
its defaults. 227 s wall for this part, 83 s for the IAM part (`make demo`: 310 s).
"""

from jaxmu.configs import deepunlearn, iam, ulira
from jaxmu import methods as methods_lib


def get_config(arg: str | None = None):
  """`quickstart` (the demo), `quickstart:iam` (its IAM part) or `quickstart:seeds=N` (the demo
  with N seeds, every one of them tuning)."""
  if arg == "iam":
    return iam_config()
  seeds = 4
  if arg:
    name, _, value = arg.partition("=")
    if name != "seeds" or not value.isdigit() or int(value) < 2:
      raise ValueError(f"unknown quickstart argument {arg!r}; use nothing, 'iam' or 'seeds=N' "
                       f"(N >= 2)")
    seeds = int(value)
  config = deepunlearn.get_config("dataset=digits,model=small_cnn")
  config.seeds = tuple(range(seeds))
  config.train.epochs = 30
  config.train.batch_size = 64
  config.train.learning_rate = 0.05
  config.checkpoint_every = 10
  config.methods = tuple(m for m in methods_lib.METHODS if m not in ("original", "retrain"))
  # Changes from the reference defaults, for a demo of a few minutes on a 2-core CPU:
  config.unlearn.forsaken.num_epochs = 10  # 100 generator iterations take ~1 min per model here
  config.unlearn.l_codec.n_perturbations = 100  # 1,000 input perturbations: ~1 min per model
  # The search (deepunlearn-spec 5) with one stated budget for every tuned method: MSG and CT
  # (the paper's recommendation) and NG+ (its recommended baseline), 20 complete TPE trials each
  # on all 4 seeds. Optuna's TPE draws its first 10 trials at random (n_startup_trials), so the
  # last 10 are TPE proposals; 4 tuning seeds average the Val-MIA term of objective10 (123 forget
  # vs 123 validation samples per seed) over 4 models. The other methods keep the reference
  # defaults (their own table); `--config=tune_all` tunes every method with this budget.
  config.search.methods = ("msg", "ct", "neggrad_plus")
  config.search.mode = "tpe"  # single objective: the norm of objective10
  config.search.trials = 20
  config.search.seeds = config.seeds
  config.tuned_defaults = True  # each tuned method also with its defaults: "<method>@defaults"
  config.tuned_accurate = True  # and with its study's most accurate trial: "<method>@accurate"
  config.ulira.enabled = True
  ulira.cpu_settings(config.ulira)
  return config


def iam_config():
  """`--config=quickstart:iam`, the IAM part of `make demo`: jaxmu/configs/iam.py's digits variant
  with 8 shadows, 4 seeds (set_random) and 10 classes (class_percentage), three approximate
  methods (83 s wall on the idle 2-core CPU, cold compilation cache, 2026-12-07; set_random
  K = 1 AUCs: IAM-On 0.652, LiRA-On 0.608, RMIA-On 0.600; class_percentage: 0.689, 0.639,
  0.683; mean ± sample std over the 8 K = 1 shadow groups in its report)."""
  config = iam.get_config("dataset=digits")
  config.num_shadows = 8
  config.seeds = (42, 43, 44, 45)
  config.approx.methods = ("finetune", "iam_ascent", "ssd")
  return config
