"""DeepUnlearn benchmark for one dataset/model pair (deepunlearn-spec 3, the reference recipe).

    python launch/deepunlearn.py --config=configs/deepunlearn.py:dataset=cifar10,model=resnet18 \
        --workdir=runs/cifar10_resnet18

Datasets: digits, mnist, fashion_mnist, cifar10, cifar100, utkface (tfds datasets need
`python launch/prepare_data.py --dataset=NAME` once). Models: resnet18 (torchvision ImageNet stem,
as the reference ran it), tinyvit_11m, small_cnn. The reference recipe: SGD 0.1, momentum 0.9,
coupled weight decay 5e-4, batch 256, cosine per epoch; 182 epochs on CIFAR, 50 on MNIST,
Fashion-MNIST and UTKFace (UTKFace batch 128, deepunlearn-spec 10.11); 10 seeds. This needs a GPU:
on CPU use configs/quickstart.py.
"""

import ml_collections

from jaxmu import data as data_lib
from jaxmu import unlearn

EPOCHS = {"mnist": 50, "fashion_mnist": 50, "cifar10": 182, "cifar100": 182, "utkface": 50,
          "digits": 30}
BATCH = {"utkface": 128}
# Inputs the paper models see: 32x32x3 (MNIST grey replicated), UTKFace 224.
DATA_OPTIONS = {"digits": {"image_size": 32, "channels": 3}}


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

  # Unlearning: every method of the registry with the reference defaults (deepunlearn-spec 4).
  c.methods = tuple(m for m in unlearn.METHODS if m not in ("original", "retrain"))
  c.unlearn = ml_collections.ConfigDict(
      {m: dict(unlearn.METHODS[m].defaults) for m in c.methods})
  c.unlearn_seed = 123

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "auto"  # auto | vmap | loop | sharded
  c.parallel.max_models_per_program = 0  # 0 = the whole stack in one program

  c.checkpoint_every = 10  # epochs
  c.stop_after = ""  # a stage name: splits, init, train, unlearn, evaluate, report
  return c
