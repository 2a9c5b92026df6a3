"""Fine-tuning methods: FT, CF-k and EU-k (deepunlearn-spec 4.3, 4.12, 4.13; IAM's `finetune`).

FT (iam-spec 8): each epoch is one shuffled pass over the retain set with cross-entropy, BatchNorm
in train mode, SGD with coupled weight decay and a per-epoch cosine schedule (T_max = epochs).
DeepUnlearn feeds plain (not augmented) inputs; IAM's variant (`IAM_HPARAMS`) augments and uses lr
0.01, batch 128.

CF-k and EU-k fine-tune (CF-k) or re-initialise and retrain (EU-k) only the last k blocks and the
classifier (the SCRUB notebook's baselines).

Selection (`jaxmu.models.last_blocks`): the last ``num_blocks`` stages (ResNet ``layer1..4``;
TinyViT stages 1..3, each with its PatchMerging) plus the classifier (``fc`` / ``head``; not
TinyViT's ``norm_head``); ``num_blocks`` beyond the number of stages selects them all. Every
other parameter is frozen: no update and no weight decay (PyTorch skips parameters without grad).

EU-k first re-initialises the selected parameters with the reference's ``init_weights``: conv
kernels ``kaiming_uniform_(mode="fan_out", nonlinearity="relu")`` (U(+-sqrt(6 / fan_out)), fan_out
= out x kh x kw, the same number in the Flax [kh, kw, in, out] layout), conv biases 0, BatchNorm
gamma 1 / beta 0, Linear kernels ``xavier_uniform_``, Linear biases 0. TinyViT's LayerNorms and
attention biases are left as they are (the reference's ``init_weights`` does not know them).
BatchNorm running statistics are **not** reset (as the reference; they are never updated either,
training runs with BN in eval mode, so the re-initialised blocks run on the original model's
statistics: deepunlearn-spec 10.19 — kept, since it is what the reference's numbers come from).

Fine-tuning (``fk_finetune``): SGD *without* momentum and without weight decay (the searched
``momentum``, ``sgda_learning_rate`` and EU-k's ``training_epoch_factor`` are inert, as in the
reference), BatchNorm in eval mode, loss CE + (sgda_weight_decay / 2) ||theta - theta_init||^2 over
the trainable parameters (theta_init taken after freezing / re-initialisation), a step-decay
schedule lr x sgda_decay_rate^#{d in (int(.5E), int(.8E), int(.9E)) : e > d} per epoch e. CF-k
reads plain retain inputs, EU-k the augmented retain set (the training augmentation).

Deviation: ``faithful`` only matters on TinyViT, where the reference (training in eval mode, whose
attention caches its bias under ``no_grad``) never updates ``attention_biases``; with
``faithful=True`` they are frozen, otherwise they train like the other selected parameters.
``sgda_decay_rate`` is a per-model number (the schedule is applied per epoch and per model).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxmu import models
from jaxmu.methods import base

# --------------------------------------------------------------------------------------------
# FT
# --------------------------------------------------------------------------------------------

IAM_HPARAMS = {"num_epochs": 5, "batch_size": 128, "learning_rate": 0.01, "momentum": 0.9,
               "weight_decay": 5e-4, "augment": True}


def _finetune(ctx: base.Context, hp, key) -> dict:
  spec = base.FinetuneSpec(batch_size=hp.batch_size, augment=hp.augment)
  return base.finetune(ctx, ctx.originals, hp, key, spec, hp.num_epochs,
                       lr_factor=base.cosine(hp.num_epochs))


FINETUNE = base.register(base.Method(
    name="finetune", paper_name="FT", reference="deepunlearn-spec 4.3; iam-spec 8 (IAM_HPARAMS)",
    defaults={"num_epochs": 5, "batch_size": 256, "learning_rate": 0.1, "momentum": 0.9,
              "weight_decay": 5e-4, "augment": False},
    space=base.COMMON5, uses=("retain",), unlearn=_finetune))


# --------------------------------------------------------------------------------------------
# CF-k and EU-k: the last k blocks
# --------------------------------------------------------------------------------------------

ATTENTION_BIASES = "attention_biases"


def decay_points(epochs: int) -> tuple[int, int, int]:
  return (int(0.5 * epochs), int(0.8 * epochs), int(0.9 * epochs))


def step_decay_exponent(epoch: int, epochs: int) -> int:
  """The reference's ``fk_finetune`` schedule: r ** exponent multiplies the lr in ``epoch``."""
  return sum(epoch > d for d in decay_points(epochs))


def step_decay_factors(epochs: int, rate: float) -> list[float]:
  return [rate ** step_decay_exponent(e, epochs) for e in range(epochs)]


def _leaf_paths(tree) -> list[tuple[str, ...]]:
  return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def selected_paths(params, num_blocks: int, faithful: bool = False) -> set[tuple[str, ...]]:
  """Trainable leaf paths: the last ``num_blocks`` blocks and the classifier; with
  ``faithful``, minus TinyViT's attention biases (no gradient in eval mode in the reference)."""
  chosen = models.last_blocks(params, num_blocks)
  if faithful:
    chosen = {p for p in chosen if p[-1] != ATTENTION_BIASES}
  return chosen


def _module_kinds(params, batch_stats) -> dict[tuple[str, ...], str]:
  """Module path -> "bn" (has running statistics), "conv" (4-D kernel), "dense" (2-D kernel)."""
  kinds = {}
  bn_modules = {p[:-1] for p in _leaf_paths(batch_stats or {})}
  flat = flax.traverse_util.flatten_dict(params)
  for path, leaf in flat.items():
    module = path[:-1]
    if module in bn_modules:
      kinds[module] = "bn"
    elif path[-1] == "kernel":
      kinds[module] = "conv" if np.ndim(leaf) == 4 else "dense"
  return kinds


def reinit(params, batch_stats, paths, key):
  """EU-k's ``init_weights`` on the leaves in ``paths`` of one model's (unstacked) params;
  other leaves (and TinyViT LayerNorms / attention biases) are returned unchanged."""
  kinds = _module_kinds(params, batch_stats)
  conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "uniform")
  dense_init = jax.nn.initializers.xavier_uniform()
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for i, (path, leaf) in enumerate(sorted(flat.items())):
    kind = kinds.get(path[:-1])
    new = leaf
    if path in paths and kind is not None:
      leaf_key = jax.random.fold_in(key, i)
      if kind == "bn":
        new = jnp.ones_like(leaf) if path[-1] == "scale" else jnp.zeros_like(leaf)
      elif path[-1] == "kernel":
        new = (conv_init if kind == "conv" else dense_init)(leaf_key, leaf.shape, leaf.dtype)
      elif path[-1] == "bias":
        new = jnp.zeros_like(leaf)
    out[path] = new
  return flax.traverse_util.unflatten_dict(out)


def _reinit_one(paths, params, batch_stats, key):
  return reinit(params, batch_stats, paths, key)


def _blocks(ctx: base.Context, hp, key, *, exact: bool) -> dict:
  params = ctx.originals["params"]
  paths = frozenset(selected_paths(params, int(hp.num_blocks), bool(hp.faithful)))
  trainable = base.stacked(models.paths_mask(jax.tree.map(lambda x: x[0], params), paths),
                           ctx.num_models)
  variables = base.copy_tree(ctx.originals)
  if exact:
    reinit_key, key = jax.random.split(key)
    new = base.stack_map(ctx, _reinit_one, (paths,), variables["params"],
                         variables.get("batch_stats", {}), ctx.keys(reinit_key))
    variables = {**variables, "params": new}
  anchor = base.copy_tree(variables["params"])
  spec = base.FinetuneSpec(batch_size=int(hp.batch_size), bn_train=False, augment=exact,
                           proximal=True)
  n = ctx.num_models
  fixed = base.per_model({"weight_decay": 0.0, "momentum": 0.0}, ("weight_decay", "momentum"), n)
  rates = base.per_model(hp, ("learning_rate", "sgda_decay_rate", "sgda_weight_decay"), n)
  carry = (base.TrainCarry.create(variables, spec.optimizer),
           {"trainable": trainable, "grad_scale": None, "anchor": anchor})
  sources = {"retain": (ctx.retain, spec.batch_size, True)}
  epochs = int(hp.num_epochs)
  for epoch in range(epochs):
    factor = rates["sgda_decay_rate"] ** step_decay_exponent(epoch, epochs)
    epoch_hp = {**fixed, "learning_rate": rates["learning_rate"] * factor,
                "prox_weight": rates["sgda_weight_decay"]}
    carry = base.run_epochs(ctx, base.finetune_step, (ctx.model, ctx.recipe, spec), carry, sources,
                            epoch_hp, key, 1, first_epoch=epoch)
  return carry[0].variables


def _cf_k(ctx: base.Context, hp, key) -> dict:
  """CF-k (deepunlearn-spec 4.12); see the module docstring for the deviations."""
  return _blocks(ctx, hp, key, exact=False)


def _eu_k(ctx: base.Context, hp, key) -> dict:
  """EU-k (deepunlearn-spec 4.13); see the module docstring for the deviations."""
  return _blocks(ctx, hp, key, exact=True)


_DEFAULTS = {"num_epochs": 10, "batch_size": 256, "num_blocks": 1, "learning_rate": 0.01,
             "sgda_learning_rate": 5e-4, "sgda_decay_rate": 0.1, "sgda_weight_decay": 0.1,
             "momentum": 0.9, "faithful": False}
_SPACE = {"num_epochs": "num_epochs", "batch_size": "batch_size", "sgda_decay_rate": "float",
          "sgda_learning_rate": "learning_rate", "sgda_weight_decay": "weight_decay",
          "learning_rate": "learning_rate", "momentum": "momentum", "num_blocks": "num_layers"}

CF_K = base.register(base.Method(
    name="cf_k", paper_name="CF-k", reference="deepunlearn-spec 4.12 (cfk)",
    defaults=_DEFAULTS, space=_SPACE, uses=("retain",), unlearn=_cf_k, aliases=("cfk",)))

EU_K = base.register(base.Method(
    name="eu_k", paper_name="EU-k", reference="deepunlearn-spec 4.13 (euk)",
    defaults={**_DEFAULTS, "training_epoch_factor": 10},
    space={**_SPACE, "training_epoch_factor": "training_epoch_factor"}, uses=("retain",),
    unlearn=_eu_k, aliases=("euk",)))
