"""What the NeurIPS'23 Kaggle-derived DeepUnlearn methods share (all of them but FCS).

The per-step loss engine `loss_step` (one pure step whose static `LossSpec` picks CFW's rescaled
CE or a teacher "distill" mixture whose per-model coefficients give PRMQ's and KDE's losses, so
they share one compiled program), `masked_finetune` (the fine-tuning program CT, MSG and RNI
share), `class_counts` (the basis of CFW's and PRMQ's class weights) and the per-model tree
helpers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmu.methods import base

NO_LIMIT = 2.0 ** 30  # "max_steps" of a phase that runs whole epochs


# --------------------------------------------------------------------------------------------
# Tree helpers (per model, no leading axis)
# --------------------------------------------------------------------------------------------


def is_conv_kernel(path: tuple[str, ...], leaf) -> bool:
  """A conv kernel of ONE model: a leaf named ``kernel`` with 4 dims [kh, kw, in/groups, out]."""
  return path[-1] == "kernel" and jnp.ndim(leaf) == 4


def map_with_path(fn: Callable, tree: Any, *rest: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, *xs: fn(tuple(k.key for k in p), *xs), tree, *rest)


def class_counts(index_set: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Per-class counts (float32 [C]) of the valid (>= 0) entries of one model's index set."""
  valid = index_set >= 0
  y = labels[jnp.where(valid, index_set, 0)]
  return jnp.zeros(num_classes, jnp.float32).at[y].add(valid.astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# The loss engine: one step, the loss picked by a static spec and per-model coefficients
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Static options of a `loss_step` phase (hashable: part of the compiled program's key).

  ``loss``: "cfw" (CFW's rescaled CE, no teacher) or "distill" (a mixture with an eval-mode
  teacher, `DISTILL_TERMS`; PRMQ and both KDE phases share its one compiled program).
  """

  loss: str
  batch_size: int


# Coefficients of the "distill" mixture (per-model hp, 0 = term off):
#   c_ce      CE_mean x mean_batch(class_weights[y])
#   c_wce     sum_i w_yi CE_i / sum_i w_yi (PyTorch's CE with ``weight=``)
#   c_entropy mean_i (H(softmax s_i) - H(softmax t_i))^2
#   c_kl      KL(softmax(t/T) || softmax(s/T)), batchmean, no T^2
#   c_soft    mean_i sum_c -softmax(t_i/T)_c log_softmax(s_i/T)_c
DISTILL_TERMS = ("c_ce", "c_wce", "c_entropy", "c_kl", "c_soft")


def _kl_t(student, teacher, temperature):
  """PyTorch ``kl_div(log_softmax(s/T), softmax(t/T))`` per sample (sum over classes)."""
  p = jax.nn.softmax(teacher / temperature)
  return jnp.sum(jax.scipy.special.xlogy(p, p) - p * jax.nn.log_softmax(student / temperature), -1)


def _entropy(logits):
  return -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), -1)


def _loss(kind: str, logits, y, valid, teacher, hp):
  ce = base.cross_entropy(logits, y)
  w = hp["class_weights"][y]
  rescaled = base.masked_mean(ce, valid) * base.masked_mean(w, valid)
  if kind == "cfw":  # the batch-mean CE rescaled by the batch-mean class weight (reference)
    return rescaled
  if kind != "distill":
    raise ValueError(f"unknown loss {kind!r}")
  t = hp["temperature"]
  wv = jnp.where(valid, w, 0.0)
  terms = {
      "c_ce": rescaled,
      "c_wce": jnp.sum(wv * ce) / jnp.maximum(jnp.sum(wv), 1e-30),
      "c_entropy": base.masked_mean((_entropy(logits) - _entropy(teacher)) ** 2, valid),
      "c_kl": base.masked_mean(_kl_t(logits, teacher, t), valid),
      "c_soft": base.masked_mean(-jnp.sum(jax.nn.softmax(teacher / t)
                                          * jax.nn.log_softmax(logits / t), -1), valid),
  }
  return sum(jnp.where(hp[c] != 0, hp[c] * terms[c], 0.0) for c in DISTILL_TERMS)


def loss_step(model, recipe, spec: LossSpec, carry, orders, key, hp, images, labels, step_index,
              epoch, lr_factor):
  """One SGD step of one model on batch ``step_index`` of its ``"data"`` order, BatchNorm in
  train mode, plain inputs. ``carry`` = (TrainCarry, extras); extras may hold ``teacher``
  variables (run in eval mode). ``hp``: learning_rate, weight_decay, momentum, max_steps (the
  model's step budget counted across epochs: PRMQ), class_weights [C] and what the loss reads."""
  state, extras = carry
  order = orders["data"]
  idx = base.batch(order, step_index, spec.batch_size)
  x, y, valid = base.inputs(recipe, images, labels, idx)
  per_epoch = jnp.maximum(-(-(order >= 0).sum() // spec.batch_size), 1)
  valid = valid & (epoch * per_epoch + step_index < hp["max_steps"])  # beyond: an empty batch
  teacher = None
  if "teacher" in extras:
    t_vars = extras["teacher"]
    teacher, _ = base.forward(model, recipe, t_vars["params"], t_vars.get("batch_stats", {}), x,
                              valid, training=False)
    teacher = jax.lax.stop_gradient(teacher)
  new = base.descend_on_logits(model, recipe, state, x, valid, jax.random.fold_in(key, step_index),
                               lambda logits: _loss(spec.loss, logits, y, valid, teacher, hp), hp,
                               lr_factor)
  return (new, extras), {}


def run_loss(ctx: base.Context, variables, hp: dict, key, spec: LossSpec, epochs: int, *,
             source: str = "retain", extras: dict | None = None, shuffle: bool = True,
             lr_factor=lambda e: 1.0, first_epoch: int = 0,
             state: base.TrainCarry | None = None) -> base.TrainCarry:
  """`loss_step` over ``epochs`` epochs of ``source`` for the stack; a fresh SGD state unless
  ``state``. ``hp`` values: scalars, [N] per-model numbers or [N, C] class weights; missing
  distill coefficients are 0, missing class weights 1, temperature 1, max_steps unlimited."""
  n = ctx.num_models
  hp = {"max_steps": NO_LIMIT, "temperature": 1.0, "class_weights": np.ones((n, ctx.num_classes)),
        **({c: 0.0 for c in DISTILL_TERMS} if spec.loss == "distill" else {}), **hp}
  hp = {k: (jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,)) if np.ndim(v) <= 1 else
            jnp.asarray(v, jnp.float32)) for k, v in hp.items()}
  state = state if state is not None else base.TrainCarry.create(variables)
  sources = {"data": (ctx.index_sets(source), spec.batch_size, shuffle)}
  carry = base.run_epochs(ctx, loss_step, (ctx.model, ctx.recipe, spec), (state, extras or {}),
                          sources, hp, key, epochs, first_epoch=first_epoch, lr_factor=lr_factor)
  return carry[0]


def unit_grad_scale(params: Any) -> Any:
  """Ones shaped like MSG's gradient mask (per conv kernel a full array, elsewhere a scalar)."""
  return map_with_path(lambda p, x: jnp.ones(x.shape if is_conv_kernel(p, x) else (), jnp.float32),
                       params)


def masked_finetune(ctx: base.Context, variables, hp, key, batch_size: int, epochs: int, *,
                    lr_factor=lambda e: 1.0, trainable=None, grad_scale=None) -> dict:
  """`base.finetune` (retain, plain inputs, BN train mode) with an always-present ``trainable``
  (per-leaf per-model bools; default all True) and ``grad_scale`` (default `unit_grad_scale`),
  so CT, MSG and RNI run one compiled fine-tuning program per (model, batch size)."""
  n = ctx.num_models
  if trainable is None:
    trainable = jax.tree.map(lambda _: jnp.ones(n, bool), variables["params"])
  if grad_scale is None:
    grad_scale = base.stacked(unit_grad_scale(jax.tree.map(lambda x: x[0], variables["params"])), n)
  return base.finetune(ctx, variables, hp, key, base.FinetuneSpec(batch_size=batch_size), epochs,
                       lr_factor=lr_factor, trainable=trainable, grad_scale=grad_scale)
