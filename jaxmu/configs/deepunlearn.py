"""DeepUnlearn benchmark for one dataset/model pair (deepunlearn-spec 3, 5, 6: the reference recipe).

    jaxmu deepunlearn --config=deepunlearn:dataset=cifar10,model=resnet18 \
        --workdir=runs/cifar10_resnet18

Datasets: digits, mnist, fashion_mnist, cifar10, cifar100, utkface (tfds datasets need
`jaxmu prepare-data --dataset=NAME` once). Models: resnet18 (torchvision ImageNet stem,
as the reference ran it), tinyvit_11m, small_cnn. The reference recipe: SGD 0.1, momentum 0.9,
coupled weight decay 5e-4, batch 256, cosine per epoch; 182 epochs on CIFAR, 50 on MNIST,
Fashion-MNIST and UTKFace (UTKFace batch 128, deepunlearn-spec 10.11); 10 seeds; the 18 DeepUnlearn
methods, each tuned by NSGA-III on objective10 with 100 complete trials on seeds 0, 1, 2 (one
study over the three seeds' stack), then run with its best hyper-parameters on all 10 seeds.

Compute per dataset/model pair: 20 reference trainings (original + retrained, 10 seeds),
18 x 100 x 3 = 5,400 search unlearnings, 18 x 10 = 180 final unlearnings. Estimated GPU time (not
measured with jaxmu; from the third-party run of the original PyTorch code, deepunlearn-spec 9.2:
one CIFAR-10 ResNet-18 retraining 1,677 s, a tuned unlearning 260 s on average): for CIFAR-10 or
CIFAR-100 with ResNet-18 about 20 x 0.47 h + 5,580 x 0.07 h = 410 GPU-hours, dominated by the
search (deepunlearn-spec 8.3). It scales with epochs x training-set size x pixels: MNIST and
Fashion-MNIST about a third of that, UTKFace at 224 px several times more. Needs a GPU; on CPU use
jaxmu/configs/quickstart.py. Several processes may share one workdir (`--worker=K` each): the stages
are locked, the search studies are shared (docs/search.md).
"""

import ml_collections

from jaxmu import data as data_lib
from jaxmu import search
from jaxmu import methods as methods_lib

EPOCHS = {"mnist": 50, "fashion_mnist": 50, "cifar10": 182, "cifar100": 182, "utkface": 50,
          "digits": 30}
BATCH = {"utkface": 128}
# Inputs the paper models see: 32x32x3 (MNIST grey replicated), UTKFace 224.
DATA_OPTIONS = {"digits": {"image_size": 32, "channels": 3}}
# The 18 methods of the benchmark (deepunlearn-spec 4.1), in the order of its tables.
# U-LiRA (deepunlearn-spec 7.2): its methods, and its epochs where they differ from the recipe's.
ULIRA_METHODS = ("original", "finetune", "msg", "cfw", "prmq", "ct", "kde")
ULIRA_EPOCHS = {"cifar10": 91}
DEEPUNLEARN_METHODS = ("finetune", "gradient_ascent", "random_labels", "neggrad_plus",
                       "bad_teacher", "salun", "scrub", "fisher", "influence", "cf_k", "eu_k",
                       "fcs", "msg", "cfw", "prmq", "ct", "kde", "rni")


def get_config(arg: str | None = None):
  args = dict(kv.split("=", 1) for kv in (arg or "dataset=cifar10,model=resnet18").split(","))
  unknown = set(args) - {"dataset", "model"}
  if unknown:
    raise ValueError(f"unknown config arguments {sorted(unknown)}; use dataset=..,model=..")
  dataset, model = args.get("dataset", "cifar10"), args.get("model", "resnet18")
  recipe = data_lib.recipe(dataset)

  c = ml_collections.ConfigDict()
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = dataset
  c.dataset.data_dir = ""  # "" = the source's default (tfds: ~/tensorflow_datasets)
  data_options = DATA_OPTIONS.get(dataset, {}) if model != "small_cnn" else {}
  c.dataset.options = ml_collections.ConfigDict(data_options)

  c.model = ml_collections.ConfigDict()
  c.model.name = model
  c.model.options = ml_collections.ConfigDict(
      {"img_size": data_options.get("image_size", recipe.image_size or 32)}
      if model == "tinyvit_11m" else {})

  c.data = ml_collections.ConfigDict()  # normalisation and augmentation of the recipe
  c.data.mean = tuple(recipe.mean)
  c.data.std = tuple(recipe.std)
  c.data.augment = recipe.augment

  c.split = ml_collections.ConfigDict()  # deepunlearn-spec 1.5
  c.split.val_ratio = 0.15
  c.split.forget_ratio = 0.10
  c.split.seed = 123

  c.seeds = tuple(range(10))
  c.train = ml_collections.ConfigDict()  # deepunlearn-spec 3
  c.train.epochs = EPOCHS.get(dataset, 182)
  c.train.batch_size = BATCH.get(dataset, 256)
  c.train.learning_rate = 0.1
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.optimizer = "sgd"
  c.train.schedule = "cosine"
  c.train.schedule_unit = "epoch"
  c.train.data_seed = 123  # the shuffling/augmentation stream (the reference: setup_seed(123))
  c.train.dtype = "float32"  # the reference; "bfloat16" = mixed precision (fp32 master weights)

  # Unlearning: the benchmark's methods; c.unlearn holds every registered method's defaults
  # (deepunlearn-spec 4), so `--config.methods` may name any of them.
  c.methods = DEEPUNLEARN_METHODS
  c.unlearn = ml_collections.ConfigDict(
      {m: dict(method.defaults) for m, method in methods_lib.METHODS.items()
       if m not in ("original", "retrain")})
  c.unlearn_seed = 123

  # Search (deepunlearn-spec 5): NSGA-III, 100 complete trials on the stack of seeds 0, 1, 2.
  c.search = search.default_config()
  c.search.methods = DEEPUNLEARN_METHODS

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "auto"  # auto | vmap | loop | sharded
  c.parallel.epoch = "auto"  # auto | scan (an epoch as one program) | steps (one call per step)
  c.parallel.max_models_per_program = 0  # 0 = the whole stack in one program

  # U-LiRA (deepunlearn-spec 7; jaxmu.pipelines.ulira_stage): the optional stage after evaluate,
  # with the search's best hyper-parameters, in <workdir>/ulira. Reference scale (spec 7.1-7.2):
  # 64 splits of the training part (half of it IN per split) x 10 forget draws (10% of IN) = 640
  # unlearning runs per method, 64 originals and 640 retrained models from one initialisation.
  c.ulira = ml_collections.ConfigDict()
  c.ulira.enabled = False
  c.ulira.lira = ml_collections.ConfigDict()  # jaxmu.data.splits.lira
  c.ulira.lira.num_splits = 64
  c.ulira.lira.num_forget_draws = 10
  c.ulira.lira.scheme = "deepunlearn"  # or "balanced": every sample IN in exactly half the splits
  c.ulira.lira.val_ratio = 0.05
  c.ulira.lira.forget_ratio = 0.1
  c.ulira.lira.seed = 123
  c.ulira.init_seed = 0  # every model starts from this one initialisation (spec 7.2)
  c.ulira.epochs = ULIRA_EPOCHS.get(dataset, c.train.epochs)
  c.ulira.methods = ULIRA_METHODS  # with c.unlearn.<method>, updated by the search's result
  c.ulira.fix_variance = False  # U-LiRA's Gaussians: per-sample variances (True: pooled)
  c.ulira.reference_variant = True  # also the reference's 0/1-correctness score (spec 7.4)
  c.ulira.signal_batch_models = 64  # models per prediction (host memory: models x samples x classes)
  # Models per training / unlearning program; only one chunk's states are in memory at a time
  # (64 ResNet-18 on one 80 GB GPU is an estimate, not measured: lower it if memory runs out).
  c.ulira.max_models_per_program = 64

  c.checkpoint_every = 10  # epochs
  # a stage name: splits, init, train, search, unlearn, evaluate, ulira, report
  c.stop_after = ""
  return c
