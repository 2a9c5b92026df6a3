"""Model registry and parameter-tree helpers.

``get(name, num_classes, **kw)`` builds a Flax Linen module used as
``model.apply(variables, x, train=bool[, mask=valid][, rngs={"droppath": key}][, mutable=["batch_stats"]])``
on float32 NHWC images (or [B, D] features for the MLP), already normalised.

Every architecture names its top-level modules ``stem*`` / ``patch_embed`` (the stem),
``layer{i}_{j}`` (ResNet block j of layer i) or ``stage{i}_block{j}`` / ``stage{i}_merge``
(TinyViT), and the rest after the blocks (``fc``; TinyViT ``norm_head`` and ``head``), so that
parameter groups are read off the parameter tree. A *path* is a tuple of dict keys; the groups
list leaf paths, and they work unchanged on stacked trees (a leading model axis).

The language model (`jaxmu.models.llama`) is not in this registry: it is built from its own config
(``llama.build(config)``, or ``llama.load_hf_checkpoint(directory)``) and takes token ids, with the
same ``(x, train, mask)`` call (``mask``: the per-token padding mask) and module naming (``stem_embed``,
``layer{i}_0``, ``norm_head``, ``head``), so the parameter-group helpers apply to it too.
"""
from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmu.models import airbench, densenet, resnet, small, tinyvit, vgg

Path = tuple[str, ...]

_FACTORIES = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "tinyvit_11m": tinyvit.tinyvit_11m,
    "small_cnn": small.small_cnn,
    "purchase_mlp": small.purchase_mlp,
    "airbench94": airbench.airbench94,
    "vgg11": vgg.vgg11,
    "vgg16": vgg.vgg16,
    "densenet121": densenet.densenet121,
}
NAMES = tuple(_FACTORIES)
_BLOCK = re.compile(r"^(layer\d+|stage\d+)_(?:block)?(\d+|merge)$")


def get(name: str, num_classes: int, **kw) -> nn.Module:
  """The model ``name`` (one of ``NAMES``) with ``num_classes`` outputs; ``kw`` goes to its factory."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(NAMES)}")
  return _FACTORIES[name](num_classes, **kw)


def init(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
  """Variables (``params``, and ``batch_stats`` where the model has BatchNorm), built in eval mode."""
  x = jnp.zeros((1, *input_shape), jnp.float32)
  return dict(jax.jit(functools.partial(model.init, train=False))({"params": key}, x))


def count_params(params) -> int:
  """Number of scalars in a tree of arrays (or ``jax.ShapeDtypeStruct``s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _leaf_paths(params) -> list[Path]:
  return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _block_order(key: str) -> tuple[int, float]:
  stage, index = _BLOCK.match(key).groups()
  return int(re.sub(r"\D", "", stage)), math.inf if index == "merge" else int(index)


def param_groups(params) -> list[tuple[str, tuple[Path, ...]]]:
  """``[("stem", leaf paths), (block, leaf paths) in forward order..., ("head", leaf paths)]``.

  Blocks are named like ``layer1.0`` (ResNet) or ``stage1.block0`` / ``stage1.merge`` (TinyViT).
  "head" holds everything after the blocks (``fc``; TinyViT ``norm_head`` and ``head``).
  """
  stem, blocks, head = [], {}, []
  for path in _leaf_paths(params):
    if path[0].startswith(("stem", "patch_embed")):
      stem.append(path)
    elif _BLOCK.match(path[0]):
      blocks.setdefault(path[0], []).append(path)
    else:
      head.append(path)
  ordered = [(key.replace("_", ".", 1), tuple(blocks[key])) for key in sorted(blocks, key=_block_order)]
  return [("stem", tuple(stem)), *ordered, ("head", tuple(head))]


def head_path(params) -> Path:
  """Path of the classifier layer: ``("fc",)`` or ``("head",)`` (a module prefix, not a leaf)."""
  for name in ("fc", "head"):
    if name in params:
      return (name,)
  raise ValueError(f"no classifier ('fc' or 'head') among {sorted(params)}")


def last_blocks(params, k: int) -> set[Path]:
  """Leaf paths of the last ``k`` stages plus the classifier: CF-k / EU-k (deepunlearn-spec 4.12).

  The reference's blocks are ResNet ``layer1..layer4`` and TinyViT ``layers[1..3]``, each with
  its PatchMerging (TinyViT's MBConv stage 0 is not one); ``k`` beyond their number selects all.
  The classifier is ``fc`` / ``head`` (not TinyViT's ``norm_head``).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  stages: dict[str, list[Path]] = {}
  for path in _leaf_paths(params):
    match = _BLOCK.match(path[0])
    if match and match[1] != "stage0":
      stages.setdefault(match[1], []).append(path)
  order = sorted(stages, key=lambda s: int(re.sub(r"\D", "", s)))
  chosen = {p for stage in order[-k:] for p in stages[stage]}
  return chosen | {p for p in _leaf_paths(params) if p[:1] == head_path(params)}


def paths_mask(params, paths) -> object:
  """Tree of bools shaped like ``params``: True at the leaves whose path is in ``paths``."""
  paths = set(paths)
  return jax.tree_util.tree_map_with_path(lambda p, _: tuple(k.key for k in p) in paths, params)


def conv_kernel_mask(params) -> object:
  """Tree of bools: True for conv kernels (leaves named ``kernel`` with >= 4 dims, so a stacked
  tree with a leading model axis works too), False elsewhere (dense kernels, biases, norms)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: p[-1].key == "kernel" and x.ndim >= 4, params)
