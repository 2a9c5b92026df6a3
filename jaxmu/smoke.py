"""The smoke override: a shipped recipe at its real structure, at the cost of a CPU test.

`smoke(config, scale, max_epochs)` keeps the recipe's stages, break count, K values, method and
attack lists and split ratios, and shrinks its cost: 2 seeds, 2 search trials (of the methods
U-LiRA uses; the others run with their defaults), 2 x 2 U-LiRA splits, 2 ScoreUI start models,
IAM's absolute pool and split sizes times ``scale`` (to fit mock data of one or two batches per
epoch: the engine has no cap on steps per epoch), and every training length capped to
``max_epochs`` (even at one step per epoch, 182-201 epochs of 30-odd models take most of an hour
on 2 cores). `tiny_models()` swaps the registry's ResNet-18 / TinyViT / small CNN for models of
the same kind (same stem, classes and parameter names) a few channels wide. Used by
tests/test_smoke_e2e.py (`make test-e2e`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxmu import models
from jaxmu.models import resnet, small, tinyvit

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
  width: int = 8

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


TINY = {
    "resnet18": lambda n, stem="imagenet", init=None: TinyResNet(n, stem),
    "tinyvit_11m": lambda n, img_size=224: tinyvit.TinyViT(
        n, img_size, embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), window_sizes=(7, 7)),
    "small_cnn": lambda n, width=32: small.small_cnn(n, 4),
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
  2 search trials of U-LiRA's methods, 2 x 2 U-LiRA splits, 2 ScoreUI start models), IAM's
  absolute pool and split sizes times ``scale``, and every training length capped to
  ``max_epochs`` (ScoreUI keeps its breaks: one every ``max_epochs // breaks`` epochs)."""
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
    c.score_ui.start_models = 2  # each audited 21 times per K = 1 group: 10 take ~10 min
    _apply(c, IAM_SIZES, lambda n: max(1, math.ceil(n * scale)))
  if max_epochs:
    _apply(c, EPOCHS, lambda n: min(n, max_epochs))
  return c
