"""The NeurIPS'23 Kaggle-derived DeepUnlearn methods, part 1: FCS, MSG, CFW, CT.

(PRMQ, KDE and RNI are in `jaxmu.methods.kaggle_reset`.) Every method unlearns the whole stack at
once: per-model decisions (MSG's random probe subset and per-kernel smallest-gradient masks, CFW's
class weights, FCS's per-model schedule length) are made inside the stack with `base.stack_map`
or inside the per-model steps, never by looping over models.

Shared here: the per-step loss engine `loss_step` (one pure step whose static `LossSpec` picks
CFW's rescaled CE or a teacher "distill" mixture whose per-model coefficients give PRMQ's and
KDE's losses, so they share one compiled program), `masked_finetune` (the fine-tuning program CT,
MSG and RNI share) and the structural helpers (conv-kernel transpose, stem confuser, PyTorch
default resets).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmu import engine, train
from jaxmu.methods import base

NO_LIMIT = 2.0 ** 30  # "max_steps" of a phase that runs whole epochs


# --------------------------------------------------------------------------------------------
# Tree helpers (per model, no leading axis)
# --------------------------------------------------------------------------------------------


def leaf_paths(tree: Any) -> list[tuple[str, ...]]:
  return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_conv_kernel(path: tuple[str, ...], leaf) -> bool:
  """A conv kernel of ONE model: a leaf named ``kernel`` with 4 dims [kh, kw, in/groups, out]."""
  return path[-1] == "kernel" and jnp.ndim(leaf) == 4


def map_with_path(fn: Callable, tree: Any, *rest: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, *xs: fn(tuple(k.key for k in p), *xs), tree, *rest)


def torch_default_draw(key: jax.Array, path: tuple[str, ...], shape, fan_in: int) -> jax.Array:
  """PyTorch's ``reset_parameters`` of Conv2d/Linear: kaiming_uniform(a=sqrt5) for the weight and
  U(+-1/sqrt(fan_in)) for the bias, i.e. both U(+-1/sqrt(fan_in))."""
  del path
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def reset_modules(params: Any, modules: tuple[str, ...], key: jax.Array) -> Any:
  """PyTorch-default re-initialisation of the top-level ``modules`` (conv/linear: kernel, bias)
  of one model; fan_in = prod(kernel.shape[:-1]) (in/groups * kh * kw, or in_features)."""
  def reset(path, leaf):
    if path[0] not in modules:
      return leaf
    kernel = params[path[0]]["kernel"]
    fan_in = int(np.prod(kernel.shape[:-1]))
    index = leaf_paths(params).index(path)
    return torch_default_draw(jax.random.fold_in(key, index), path, leaf.shape, fan_in)
  return map_with_path(reset, params)


def transpose_conv_kernels(params: Any) -> Any:
  """CT's structural edit on ONE model: every conv kernel [kh, kw, in, out] -> [kw, kh, in, out]
  (PyTorch ``weight.swapaxes(2, 3)`` on [out, in, kh, kw]); 1x1 kernels are unchanged."""
  return map_with_path(
      lambda p, x: jnp.swapaxes(x, 0, 1) if is_conv_kernel(p, x) else x, params)


def confuse(params: Any, std, key: jax.Array) -> Any:
  """CFW's ``vision_confuser`` on ONE model: w <- N(w, std^2) for every top-level module whose
  name contains "conv" and that has a kernel (ResNet/small CNN: ``stem_conv`` only; TinyViT: none,
  as in the reference, deepunlearn-spec 10.20)."""
  out = dict(params)
  for i, name in enumerate(sorted(params)):
    if "conv" in name and "kernel" in params[name]:
      kernel = params[name]["kernel"]
      noise = jax.random.normal(jax.random.fold_in(key, i), kernel.shape, kernel.dtype)
      out[name] = {**params[name], "kernel": kernel + std * noise}
  return out


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


# --------------------------------------------------------------------------------------------
# FCS (kgltop1)
# --------------------------------------------------------------------------------------------


def fcs_forget_lr(base_lr, eta_min, t, t_max):
  """``CosineAnnealingLR(T_max, eta_min)`` after ``t`` scheduler steps (closed form)."""
  return eta_min + (base_lr - eta_min) * (1 + jnp.cos(jnp.pi * t / t_max)) / 2


def _fcs_uniform_step(model, recipe, batch_size, carry, orders, key, hp, images, labels,
                      step_index, epoch, lr_factor):
  """Stage 1: KL(U || softmax f(x)) (batchmean) on a forget batch with ``optimizer.*``."""
  del epoch
  x, _, valid = base.inputs(recipe, images, labels, base.batch(orders["forget"], step_index,
                                                               batch_size))

  def loss(logits):
    c = logits.shape[-1]
    return base.masked_mean(jnp.sum((jnp.log(1.0 / c) - jax.nn.log_softmax(logits)) / c, -1), valid)

  return base.descend_on_logits(model, recipe, carry, x, valid,
                                jax.random.fold_in(key, step_index), loss, hp, lr_factor), {}


def _fcs_forget_step(model, recipe, batch_size, carry, orders, key, hp, images, labels,
                     step_index, epoch, lr_factor):
  """Forget round: zip(forget, second shuffled retain order); contrastive loss
  mean_ij(-log_softmax_j(f(x_f) stopgrad(f(x_r))^T / T)); ``forget_optimizer.*`` at the per-step
  cosine lr."""
  del lr_factor
  forget, retain = orders["forget"], orders["retain"]
  steps_f = jnp.maximum(-(-(forget >= 0).sum() // batch_size), 1)
  steps_r = -(-(retain >= 0).sum() // batch_size)
  xf, _, vf = base.inputs(recipe, images, labels, base.batch(forget, step_index, batch_size))
  xr, _, vr = base.inputs(recipe, images, labels, base.batch(retain, step_index, batch_size))
  vf = vf & (step_index < steps_r)  # zip stops at the shorter loader
  kf, kr = jax.random.split(jax.random.fold_in(key, step_index))

  def loss_fn(params):
    lf, bs = base.forward(model, recipe, params, carry.batch_stats, xf, vf, training=True, key=kf)
    lr_, bs = base.forward(model, recipe, params, bs, xr, vr, training=True, key=kr)
    s = lf @ jax.lax.stop_gradient(lr_).T / hp["temperature"]
    s = jnp.where(vr[None, :], s, -1e30)
    pair = vf[:, None] & vr[None, :]
    loss = -jnp.sum(jnp.where(pair, jax.nn.log_softmax(s, -1), 0.0)) / jnp.maximum(pair.sum(), 1)
    return loss, bs

  t = epoch * jnp.minimum(steps_f, steps_r) + step_index  # scheduler steps taken so far
  lr = fcs_forget_lr(hp["forget_learning_rate"], hp["eta_min"], t, steps_f * hp["num_epochs"])
  return base.descend(carry, loss_fn, vf, {**base.optimizer_hp(hp, "forget_"), "learning_rate": lr},
                      1.0), {}


def _fcs_retain_step(model, recipe, batch_size, carry, orders, key, hp, images, labels,
                     step_index, epoch, lr_factor):
  """Retain round: CE on a retain batch with ``retain_optimizer.*`` (lr x batch_size / 64)."""
  del epoch, lr_factor
  x, y, valid = base.inputs(recipe, images, labels, base.batch(orders["retain"], step_index,
                                                               batch_size))
  return base.descend_on_logits(
      model, recipe, carry, x, valid, jax.random.fold_in(key, step_index),
      lambda logits: base.masked_mean(base.cross_entropy(logits, y), valid),
      base.optimizer_hp(hp, "retain_"), batch_size / 64), {}


_FCS_FLOATS = ("learning_rate", "momentum", "weight_decay", "retain_learning_rate",
               "retain_momentum", "retain_weight_decay", "forget_learning_rate",
               "forget_momentum", "forget_weight_decay", "temperature", "eta_min", "num_epochs")


def _fcs(ctx: base.Context, hp, key) -> dict:
  """FCS (deepunlearn-spec 4.14, reference ``kgltop1``), BatchNorm in train mode throughout.

  Stage 1: one shuffled pass over the forget set pulling the softmax to uniform (KL(U||p),
  batchmean) with ``optimizer.*``. Stage 2, ``num_epochs`` times: a forget round over
  zip(forget, a second shuffled retain order) with the contrastive loss, stepping the forget
  optimiser at ``CosineAnnealingLR(T_max = len(forget_loader) * num_epochs, eta_min)`` per step
  (each model counts its own forget batches); then a retain round (CE, lr x batch_size/64). The
  three SGD optimisers keep their own momentum buffers over all parameters (deepunlearn-spec
  10.25, kept as the reference). Inputs are not augmented; the forget forward runs before the
  retain forward (both update BN statistics), as in the reference.
  """
  n, bs, epochs = ctx.num_models, hp.batch_size, hp.num_epochs
  floats = base.per_model(hp, _FCS_FLOATS, n)
  state = base.TrainCarry.create(ctx.originals)  # with the stage-1 optimiser
  opt_f, opt_r = base.copy_tree(state.opt_state), base.copy_tree(state.opt_state)
  statics = (ctx.model, ctx.recipe, bs)
  state = base.run_epochs(ctx, _fcs_uniform_step, statics, state,
                          {"forget": (ctx.forget, bs, True)}, floats,
                          jax.random.fold_in(key, 0), 1)
  for ep in range(epochs):
    state = base.run_epochs(ctx, _fcs_forget_step, statics, state.replace(opt_state=opt_f),
                            {"forget": (ctx.forget, bs, True), "retain": (ctx.retain, bs, True)},
                            floats, jax.random.fold_in(key, 1), 1, first_epoch=ep)
    opt_f = state.opt_state
    state = base.run_epochs(ctx, _fcs_retain_step, statics, state.replace(opt_state=opt_r),
                            {"retain": (ctx.retain, bs, True)}, floats,
                            jax.random.fold_in(key, 2), 1, first_epoch=ep)
    opt_r = state.opt_state
  return state.variables


FCS = base.register(base.Method(
    name="fcs", paper_name="FCS", reference="deepunlearn-spec 4.14 (kgltop1)",
    defaults={"num_epochs": 8, "batch_size": 256, "temperature": 1.15, "eta_min": 1e-6,
              "learning_rate": 5e-3, "momentum": 0.9, "weight_decay": 0.0,
              "retain_learning_rate": 1e-3, "retain_momentum": 0.9, "retain_weight_decay": 1e-2,
              "forget_learning_rate": 3e-4, "forget_momentum": 0.9, "forget_weight_decay": 0.0},
    space={"retain_learning_rate": "learning_rate", "retain_momentum": "momentum",
           "retain_weight_decay": "weight_decay", "forget_learning_rate": "learning_rate",
           "forget_momentum": "momentum", "forget_weight_decay": "weight_decay",
           "temperature": "temperature", "eta_min": "eta_min", **base.COMMON5},
    uses=("retain", "forget"), unlearn=_fcs, aliases=("kgltop1",)))


# --------------------------------------------------------------------------------------------
# MSG (kgltop2): Masked Small Gradients
# --------------------------------------------------------------------------------------------


def msg_triangle(epochs: int) -> Callable[[int], float]:
  """``LinearAnnealingLR(A = (E+1)//2, T = E+1)`` stepped per epoch: factor in epoch e (0-based)
  is k/A for k = e+1 <= A, else (T-k)/(T-A)."""
  a, t = (epochs + 1) // 2, epochs + 1
  return lambda e: (e + 1) / a if e + 1 <= a else (t - e - 1) / (t - a)


def _probe_subset(retain, forget, key):
  """A random subset of the model's retain set with |forget| entries (``randperm[:|forget|]``),
  padded with -1 to the forget width."""
  perm = engine.shuffled_order(retain, key, 1)
  width = forget.shape[0]
  perm = jnp.pad(perm, (0, max(width - perm.shape[0], 0)), constant_values=-1)[:width]
  return jnp.where(jnp.arange(width) < (forget >= 0).sum(), perm, -1)


def msg_probe(ctx: base.Context, subset, batch_size: int, key):
  """MSG's gradient probe for the stack: sum_b grad CE over the retain ``subset`` (batches of 64)
  minus sum_b grad CE over the forget set (``batch_size``), train mode; returns (grads, the BN
  statistics after the probe's forward passes). Run through the shared fine-tuning program
  (`masked_finetune`'s) as an SGD pass with lr 0, no decay and momentum 1, whose momentum buffer
  is then exactly the accumulated gradient (gradient scale -1 on the forget pass)."""
  n = ctx.num_models
  params = ctx.originals["params"]
  hp = {"learning_rate": jnp.zeros(n), "weight_decay": jnp.zeros(n), "momentum": jnp.ones(n)}
  state = base.TrainCarry.create(ctx.originals)
  for i, (sets, size, sign) in enumerate(((subset, 64, 1.0), (ctx.forget, batch_size, -1.0))):
    extras = {"trainable": jax.tree.map(lambda _: jnp.ones(n, bool), params),
              "grad_scale": jax.tree.map(lambda x: sign * x, base.stacked(
                  unit_grad_scale(jax.tree.map(lambda x: x[0], params)), n)),
              "anchor": None}
    state, _ = base.run_epochs(ctx, base.finetune_step,
                               (ctx.model, ctx.recipe, base.FinetuneSpec(batch_size=size)),
                               (state, extras), {"retain": (sets, size, True)}, hp,
                               jax.random.fold_in(key, i), 1)
  return optax.tree_utils.tree_get(state.opt_state, "trace"), state.batch_stats


def leaf_sizes(params) -> np.ndarray:
  """Number of entries of each leaf of ONE model (leaf order of `leaf_paths`)."""
  return np.array([int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)], np.float64)


def msg_counts(params, rate) -> np.ndarray:
  """round(rate * numel) per leaf (Python/NumPy round half to even, in float64 as the reference),
  for a scalar rate ([L]) or one rate per model ([N, L]); ``params`` is one model's tree."""
  return np.round(np.asarray(rate, np.float64)[..., None] * leaf_sizes(params)).astype(np.int32)


def flat_draws(key, shapes, kind: str = "normal") -> list[jax.Array]:
  """Standard normal (or U(-1, 1)) arrays of the given shapes from ONE flat draw (one random
  kernel to compile instead of one per leaf)."""
  sizes = [int(np.prod(s)) for s in shapes]
  if kind == "normal":
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  else:
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
  return [x.reshape(s) for x, s in zip(parts, shapes)]


def msg_reinit(params, grads, counts, key):
  """MSG's structural edit on ONE model: for every conv kernel, the ``counts[leaf]`` (=
  round(init_rate * numel), `msg_counts`) entries with the smallest |grad| are redrawn from
  kaiming_normal(fan_out, relu); returns (params, grad_scale) with grad_scale 1.0 on those entries
  and 0.1 on the rest of the kernel (1.0 for every non-conv leaf). Ties: lower flat index first.
  All kernels are ranked by one stable sort on (kernel, |grad|)."""
  paths = leaf_paths(params)
  leaves, treedef = jax.tree.flatten(params)
  g_leaves = jax.tree.leaves(grads)
  conv = [i for i, (p, x) in enumerate(zip(paths, leaves)) if is_conv_kernel(p, x)]
  scale = [jnp.ones((), jnp.float32) for _ in leaves]
  if not conv:
    return params, jax.tree.unflatten(treedef, scale)
  sizes = [leaves[i].size for i in conv]
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  counts = jnp.asarray(counts, jnp.int32)
  # Per entry: its kernel's id and its kernel's [start, start + count) window in sorted order
  # (built from the traced counts, so XLA does not constant-fold millions of entries).
  kernel_id = jnp.concatenate([jnp.broadcast_to(j + 0 * counts[i], (n,))
                               for j, (i, n) in enumerate(zip(conv, sizes))])
  limit = jnp.concatenate([jnp.broadcast_to(starts[j] + counts[i], (n,))
                           for j, (i, n) in enumerate(zip(conv, sizes))])
  absg = jnp.concatenate([jnp.abs(g_leaves[i]).reshape(-1) for i in conv])
  iota = jnp.arange(sum(sizes), dtype=jnp.int32)
  _, _, order = jax.lax.sort((kernel_id, absg, iota), num_keys=2, is_stable=True)
  rank = jnp.zeros(sum(sizes), jnp.int32).at[order].set(iota)  # position in (kernel, |g|) order
  mask = rank < limit
  fresh = flat_draws(key, [leaves[i].shape for i in conv])
  start = 0
  for j, i in enumerate(conv):
    x = leaves[i]
    m = mask[start:start + x.size].reshape(x.shape)
    start += x.size
    std = math.sqrt(2.0 / (x.shape[0] * x.shape[1] * x.shape[3]))  # fan_out = out * kh * kw
    leaves[i] = jnp.where(m, std * fresh[j], x)
    scale[i] = jnp.where(m, 1.0, 0.1).astype(jnp.float32)
  return jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(treedef, scale)


def _msg(ctx: base.Context, hp, key) -> dict:
  """MSG (deepunlearn-spec 4.15, reference ``kgltop2``).

  1. Gradient probe in train mode (BN statistics updated, stochastic depth on): per model a
     random retain subset of |forget| samples (batches of 64, shuffled) accumulates grad CE,
     then the forget set (``batch_size``, shuffled) accumulates grad(-CE).
  2. Every conv kernel: the round(init_rate * numel) smallest-|g| entries are re-drawn from
     kaiming_normal(fan_out, relu); their gradient is kept (x1.0), the rest of the kernel's
     gradient is scaled by 0.1 (weight decay and momentum act normally). Linear/BN/LN untouched.
  3. Fine-tune on the retain set (``batch_size``, shuffled, plain inputs, BN train mode) with the
     triangle ``LinearAnnealingLR`` per epoch.
  The per-kernel counts round(init_rate * numel) are computed on the host in float64 (one row
  per model), the selection and re-draw per model inside the stack.
  """
  n = ctx.num_models
  keys = ctx.keys(jax.random.fold_in(key, 0))
  subset = base.stack_map(ctx, _probe_subset, (), jnp.asarray(ctx.retain),
                          jnp.asarray(ctx.forget), keys)
  grads, batch_stats = msg_probe(ctx, subset, hp.batch_size, jax.random.fold_in(key, 1))
  one = jax.tree.map(lambda x: x[0], ctx.originals["params"])
  counts = msg_counts(one, np.broadcast_to(np.asarray(hp.init_rate, np.float64), (n,)))
  params, scale = base.stack_map(ctx, msg_reinit, (), ctx.originals["params"], grads,
                                 jnp.asarray(counts), ctx.keys(jax.random.fold_in(key, 3)))
  variables = train.as_variables(params, batch_stats)
  return masked_finetune(ctx, variables, hp, jax.random.fold_in(key, 4), hp.batch_size,
                         hp.num_epochs, lr_factor=msg_triangle(hp.num_epochs), grad_scale=scale)


MSG = base.register(base.Method(
    name="msg", paper_name="MSG", reference="deepunlearn-spec 4.15 (kgltop2, Masked Small Gradients)",
    defaults={"num_epochs": 5, "batch_size": 64, "init_rate": 0.3, "learning_rate": 1e-3,
              "momentum": 0.9, "weight_decay": 5e-4},
    space={"init_rate": "float", **base.COMMON5},
    uses=("retain", "forget"), unlearn=_msg, aliases=("kgltop2",)))


# --------------------------------------------------------------------------------------------
# CFW (kgltop3)
# --------------------------------------------------------------------------------------------


def balanced_class_weights(num_classes, index_set, labels):
  """sklearn ``compute_class_weight("balanced")`` over one model's retain labels:
  w_c = n / (C_present * n_c) (absent classes: 0, they never occur in a retain batch)."""
  counts = class_counts(index_set, labels, num_classes)
  present = (counts > 0).sum()
  return jnp.where(counts > 0, counts.sum() / (present * jnp.maximum(counts, 1)), 0.0)


def _confuse_stack(ctx, params, std, key):
  return base.stack_map(ctx, confuse, (), params, jnp.broadcast_to(std, (ctx.num_models,)),
                        ctx.keys(key))


def _cfw(ctx: base.Context, hp, key) -> dict:
  """CFW (deepunlearn-spec 4.16, reference ``kgltop3``).

  Confuser N(w, start_std^2) on the stem conv (the reference's "top-level child whose name
  contains conv": ResNet ``conv1`` = our ``stem_conv``; TinyViT has none, so the confuser is a
  no-op there, as in the reference, deepunlearn-spec 10.20); balanced class weights from each
  model's retain labels; per retain batch loss = CE_mean x mean_batch(w_y) (the reference's
  scalar rescaling, kept); SGD with ``CosineAnnealingLR(T_max = num_epochs)`` per epoch, BN in
  train mode; after the training of epoch index E-2 the confuser again with final_std (never
  for E = 1). ``class_weight`` is unused, as in the reference.
  """
  n, epochs = ctx.num_models, hp.num_epochs
  stds = base.per_model(hp, ("start_confuser_std", "final_confuser_std"), n)
  params = _confuse_stack(ctx, ctx.originals["params"], stds["start_confuser_std"],
                          jax.random.fold_in(key, 0))
  weights = base.stack_map(ctx, balanced_class_weights, (ctx.num_classes,),
                           jnp.asarray(ctx.retain), shared=(ctx.data.labels,))
  floats = {**base.per_model(hp, ("learning_rate", "weight_decay", "momentum"), n),
            "class_weights": weights}
  spec = LossSpec("cfw", hp.batch_size)
  state = base.TrainCarry.create(train.as_variables(params, ctx.originals.get("batch_stats", {})))
  first = epochs - 1 if epochs >= 2 else epochs
  train_key = jax.random.fold_in(key, 1)
  state = run_loss(ctx, None, floats, train_key, spec, first, lr_factor=base.cosine(epochs),
                   state=state)
  if epochs >= 2:
    state = state.replace(params=_confuse_stack(ctx, state.params, stds["final_confuser_std"],
                                                jax.random.fold_in(key, 2)))
    state = run_loss(ctx, None, floats, train_key, spec, 1, lr_factor=base.cosine(epochs),
                     first_epoch=epochs - 1, state=state)
  return state.variables


CFW = base.register(base.Method(
    name="cfw", paper_name="CFW", reference="deepunlearn-spec 4.16 (kgltop3)",
    defaults={"num_epochs": 4, "batch_size": 64, "learning_rate": 7e-4, "momentum": 0.9,
              "weight_decay": 5e-4, "start_confuser_std": 0.6, "final_confuser_std": 0.005,
              "class_weight": 0.05},
    space={"start_confuser_std": "normal_sigma", "final_confuser_std": "normal_sigma",
           **base.COMMON5},
    uses=("retain",), unlearn=_cfw, aliases=("kgltop3",)))


# --------------------------------------------------------------------------------------------
# CT (kgltop5): Convolution Transpose
# --------------------------------------------------------------------------------------------


def _ct(ctx: base.Context, hp, key) -> dict:
  """CT (deepunlearn-spec 4.18, reference ``kgltop5``): every conv kernel's spatial axes swapped
  (JAX [kh, kw, in, out] -> [kw, kh, in, out]; 7x7 stem, 3x3 and depthwise convs; 1x1 unchanged),
  then fine-tuning on the retain set (plain inputs, BN train mode, SGD, per-epoch cosine)."""
  params = base.stack_map(ctx, transpose_conv_kernels, (), ctx.originals["params"])
  variables = train.as_variables(params, base.copy_tree(ctx.originals.get("batch_stats", {})))
  return masked_finetune(ctx, variables, hp, key, hp.batch_size, hp.num_epochs,
                         lr_factor=base.cosine(hp.num_epochs))


CT = base.register(base.Method(
    name="ct", paper_name="CT", reference="deepunlearn-spec 4.18 (kgltop5, Convolution Transpose)",
    defaults={"num_epochs": 3, "batch_size": 64, "learning_rate": 1e-3, "momentum": 0.9,
              "weight_decay": 5e-4},
    space=base.COMMON5, uses=("retain",), unlearn=_ct, aliases=("kgltop5",)))
