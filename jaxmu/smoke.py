"""The smoke override: a shipped recipe at its real structure, at the cost of a CPU test.

`smoke(config, scale, max_epochs)` keeps the recipe's stages, split sizes, break count, K values,
method and attack lists and split ratios, and shrinks its cost: 2 seeds, 2 search trials (of the
methods U-LiRA uses; the others run with their defaults), 2 x 2 U-LiRA splits, 1 ScoreUI start
model, 2 shadow groups per K, and every training length capped to ``max_epochs`` (ScoreUI keeps
at least one epoch per break). IAM's absolute pool and split sizes stay real unless ``scale``
shrinks them for a small data file. `tiny_models()` swaps the registry's ResNet-18 / TinyViT /
small CNN / VGG-11/16 for models of the same kind (same stem, classes and parameter names) a few
channels wide.

`run(pipeline, config, workdir, mock_examples, max_steps)` runs a smoked config in this process
with the tiny models, tfds mock data (`mock_tfds`: a given size, or every split at its real size)
and at most ``max_steps`` optimisation steps per epoch (`jaxmu.engine.step_cap`): real data and
real epochs of one step each. Evaluation is not capped, so at real size it is what a smoke run
costs (e.g. IAM's best-on-validation pass over each CIFAR shadow's 4,000 held-out samples, every
epoch). `fake_utkface`, `fake_cinic10` and `fake_purchase100` write tiny files of those
datasets' layouts and class counts, so that their real loaders run. Used by
tests/test_smoke_e2e_deepunlearn.py, tests/test_smoke_e2e_iam.py (`make test-e2e`) and
tests/test_smoke_structure.py (`make test`).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmu import models
from jaxmu.models import resnet, small, tinyvit, vgg

# Every recipe's training lengths in epochs, capped by `smoke`'s ``max_epochs``.
EPOCHS = ("train.epochs", "train.target_epochs", "ref_in.epochs", "score_ui.epochs",
          "ulira.epochs")
# IAM's absolute counts (jaxmu/configs/iam.py) that `smoke` scales with the data.
IAM_SIZES = ("split.shadow_size", "split.forget_size", "split.fixed_forget", "split.shadow_fix",
             "split.val_cap", "shadow_dataset.shadow_size", "incremental.pool_size")


class TinyResNet(nn.Module):
  """`jaxmu.models.resnet.ResNet` with two stages ``width`` and ``2 x width`` channels wide."""
  num_classes: int
  stem: str = "imagenet"
  width: int = 4

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    init = resnet.CONV_INITS[{"imagenet": "torchvision", "cifar": "pytorch_default"}[self.stem]]
    if self.stem == "imagenet":
      x = resnet.conv(self.width, 7, 2, 3, init, "stem_conv")(x)
      x = nn.relu(resnet.batch_norm(train, "stem_bn")(x, mask))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:
      x = resnet.conv(self.width, 3, 1, 1, init, "stem_conv")(x)
      x = nn.relu(resnet.batch_norm(train, "stem_bn")(x, mask))
    for i in range(2):
      x = resnet.BasicBlock(self.width * 2 ** i, 2 if i else 1, init,
                            name=f"layer{i + 1}_0")(x, train, mask)
    x = jnp.mean(x, axis=(1, 2))
    return resnet.torch_dense(self.num_classes, x.shape[-1], "fc")(x)


class TinyVGG(nn.Module):
  """`jaxmu.models.vgg.VGG` (same layers, pools, adaptive 7 x 7 pool, parameter names and inits)
  with ``stages`` of a few channels and a classifier ``width`` wide instead of 4,096."""
  stages: Sequence[Sequence[int]]
  num_classes: int
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    del mask  # no BatchNorm
    for i, widths in enumerate(self.stages):
      for j, width in enumerate(widths):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=vgg.torchvision_conv_init,
                    bias_init=nn.initializers.zeros, name=f"layer{i + 1}_{j}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = vgg.adaptive_avg_pool(x, 7)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    for name in ("classifier_0", "classifier_3"):
      x = nn.Dense(self.width, kernel_init=nn.initializers.normal(0.01),
                   bias_init=nn.initializers.zeros, name=name)(x)
      x = nn.Dropout(0.5, deterministic=not train, rng_collection="droppath")(nn.relu(x))
    return resnet.torch_dense(self.num_classes, x.shape[-1], "fc")(x)


def _tiny_stages(name):
  """The VGG's stage layout (convs per stage) at 4 / 8 channels."""
  return tuple(tuple(min(w // 16, 8) for w in widths) for widths in vgg.STAGES[name])


TINY = {
    "resnet18": lambda n, stem="imagenet", init=None: TinyResNet(n, stem),
    "tinyvit_11m": lambda n, img_size=224: tinyvit.TinyViT(
        n, img_size, embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), window_sizes=(7, 7)),
    "small_cnn": lambda n, width=32: small.small_cnn(n, 4),
    "vgg11": lambda n: TinyVGG(_tiny_stages("vgg11"), n),
    "vgg16": lambda n: TinyVGG(_tiny_stages("vgg16"), n),
}


@contextlib.contextmanager
def tiny_models():
  """Within the block, `jaxmu.models.get` builds `TINY`'s models under the shipped names."""
  saved = {name: models._FACTORIES[name] for name in TINY}
  models._FACTORIES.update(TINY)
  try:
    yield
  finally:
    models._FACTORIES.update(saved)


class _MockSplit:
  """The first ``size`` records of a tfds mock data source, read one by one (the mock's bulk
  ``__getitems__`` is broken in tfds 4.9.10)."""

  def __init__(self, source, size: int):
    self.source, self.size = source, size

  def __len__(self):
    return self.size

  def __getitems__(self, keys):
    return [self.source[k] for k in keys]


@contextlib.contextmanager
def mock_tfds(num_examples: int | None = None):
  """Within the block, every tfds dataset reads random records (`tfds.testing.mock_data`: the real
  shapes and class counts; nothing is downloaded): ``num_examples`` per split, or with None each
  split's real size (`jaxmu.data.sources.KNOWN`: CIFAR's 50,000 + 10,000)."""
  import tensorflow_datasets as tfds
  from jaxmu.data import sources
  real = tfds.data_source

  def data_source(name, split, **kwargs):
    size = num_examples
    if size is None:
      known = sources.KNOWN[name]
      size = known.num_train if split == "train" else known.num_test
    return _MockSplit(real(name, split=split, **kwargs), size)

  with tfds.testing.mock_data(num_examples=num_examples or 1):  # `_MockSplit` sets the sizes
    tfds.data_source = data_source
    try:
      yield
    finally:
      tfds.data_source = real


def run(pipeline: str, config, workdir, mock_examples: int | None = 0,
        max_steps: int | None = None) -> list[str]:
  """Runs ``pipeline`` ("deepunlearn", "ulira" or "iam"; `jaxmu.pipelines`) on ``config`` (a
  ConfigDict or its ``to_dict()``, normally `smoke`'s) in ``workdir`` with `tiny_models`, tfds
  mock data (`mock_tfds`: ``mock_examples`` records per split, None = the real sizes, 0 = no
  mock) and at most ``max_steps`` steps per epoch (`jaxmu.engine.step_cap`); returns the finished
  stages. A plain function, so that a test may run it in a process of its own."""
  import importlib
  from jaxmu import engine
  module = importlib.import_module(f"jaxmu.pipelines.{pipeline}")
  config = ml_collections.ConfigDict(config)
  mock = mock_tfds(mock_examples) if mock_examples != 0 else contextlib.nullcontext()
  cap = engine.step_cap(max_steps) if max_steps else contextlib.nullcontext()
  with tiny_models(), mock, cap:
    module.run(config, workdir)
  return sorted(p.stem for p in (pathlib.Path(workdir) / "stages").glob("*.json"))


def _apply(config, fields: Sequence[str], change) -> None:
  for field in fields:
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      if p not in node:
        break
      node = node[p]
    else:
      if leaf in node:
        node[leaf] = change(node[leaf])


def smoke(config: ml_collections.ConfigDict, scale: float = 1.0,
          max_epochs: int | None = None) -> ml_collections.ConfigDict:
  """A copy of a shipped DeepUnlearn, U-LiRA or IAM ``config`` with fewer repeats (2 seeds,
  2 search trials of U-LiRA's methods, 2 x 2 U-LiRA splits, 1 ScoreUI start model, 2 shadow
  groups per K), IAM's absolute pool and split sizes times ``scale`` (incremental's pool: at
  least one batch), and every training length capped to ``max_epochs`` (ScoreUI keeps its breaks:
  at least one epoch each, a break every ``epochs // breaks`` epochs)."""
  c = ml_collections.ConfigDict(config.to_dict())
  if "seeds" in c:
    c.seeds = tuple(c.seeds)[:2]
  if "search" in c:
    c.search.trials = 2
    c.search.seeds = tuple(s for s in c.search.seeds if s in c.seeds)
    if "ulira" in c:  # ~40 s per searched method on 2 cores: those whose results U-LiRA uses
      c.search.methods = tuple(m for m in c.search.methods if m in c.ulira.methods)
  if "ulira" in c:
    c.ulira.lira.num_splits = 2
    c.ulira.lira.num_forget_draws = 2
  if "score_ui" in c:
    c.score_ui.start_models = 1  # audited at 21 breaks per K = 1 group: 2 took 4.5 min at 30,000
    c.audit.max_groups = min(c.audit.max_groups, 2)  # every K; ScoreUI's groups: 10 took 3 min
    if scale != 1:
      _apply(c, IAM_SIZES, lambda n: max(1, math.ceil(n * scale)))
    if "incremental" in c:  # the new data's pool holds at least one batch (as validation asks)
      c.incremental.pool_size = max(c.incremental.pool_size, c.train.batch_size)
  if max_epochs:
    _apply(c, EPOCHS, lambda n: min(n, max_epochs))
    if "score_ui" in c:  # every break stays: at least one epoch each
      c.score_ui.epochs = min(config.score_ui.epochs, max(max_epochs, c.score_ui.breaks))
  return c


# ---------------------------------------------------------------- fake file-based datasets

# CINIC-10's class folders (CIFAR-10's classes, sorted as `jaxmu.data.sources` reads them).
CINIC10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def fake_utkface(root, num_files: int = 150, seed: int = 0) -> pathlib.Path:
  """``num_files`` random 200 x 200 RGB JPEGs named ``<age>_<gender>_<race>_<datetime>.jpg.chip.jpg``
  in ``root`` (UTKFace's "Aligned&Cropped" layout), ages cycling through all 5 age classes."""
  from PIL import Image
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(num_files):
    age = (i % 5) * 20 + int(rng.integers(1, 20))
    pixels = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    name = f"{age}_{i % 2}_{i % 5}_2017011{i:07d}.jpg.chip.jpg"
    Image.fromarray(pixels).save(root / name, quality=75)
  return root


def fake_cinic10(root, per_class: dict[str, int] | None = None, seed: int = 0) -> pathlib.Path:
  """CINIC-10's layout ``root/{train,valid,test}/<class>/*.png`` of random 32 x 32 RGB images,
  ``per_class[split]`` images of each of the 10 classes (default train 20, valid 10, test 10)."""
  from PIL import Image
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  for split, n in (per_class or {"train": 20, "valid": 10, "test": 10}).items():
    for name in CINIC10_CLASSES:
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"cifar10-{split}-{i}.png")
  return root


def fake_purchase100(root, num_rows: int = 2500, seed: int = 0) -> pathlib.Path:
  """Purchase-100's text file ``root/dataset_purchase``: rows ``label (1..100), 600 binary
  features``, comma separated, every label present (needs ``num_rows >= 100``)."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_rows) % 100) + 1
  rows = np.concatenate([labels[:, None], rng.integers(0, 2, (num_rows, 600))], axis=1)
  np.savetxt(root / "dataset_purchase", rows, fmt="%d", delimiter=",")
  return root
