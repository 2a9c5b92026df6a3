"""Re-initialise, prune or reset weights, then train: MSG, PRMQ, KDE and RNI (deepunlearn-spec
4.15, 4.17, 4.19, 4.20; references ``kgltop2``, ``kgltop4``, ``kgltop6``, ``kgltop7``).

Per-model decisions (MSG's random probe subset and per-kernel smallest-gradient masks, PRMQ's
global magnitude threshold and step budget, RNI's random parameter subsets and noise) are made per
model inside the stack (`base.stack_map`, per-model carries), never by looping over models. The
training runs on `jaxmu.methods.kaggle.common` (`run_loss`: PRMQ, KDE; `masked_finetune`: MSG,
RNI).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmu import engine, models, train
from jaxmu.methods import base
from jaxmu.methods.kaggle import common


# --------------------------------------------------------------------------------------------
# Tree helpers and draws (per model, no leading axis)
# --------------------------------------------------------------------------------------------


def leaf_paths(tree: Any) -> list[tuple[str, ...]]:
  return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


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
  return common.map_with_path(reset, params)


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
  (`common.masked_finetune`'s) as an SGD pass with lr 0, no decay and momentum 1, whose momentum
  buffer is then exactly the accumulated gradient (gradient scale -1 on the forget pass)."""
  n = ctx.num_models
  params = ctx.originals["params"]
  hp = {"learning_rate": jnp.zeros(n), "weight_decay": jnp.zeros(n), "momentum": jnp.ones(n)}
  state = base.TrainCarry.create(ctx.originals)
  for i, (sets, size, sign) in enumerate(((subset, 64, 1.0), (ctx.forget, batch_size, -1.0))):
    extras = {"trainable": jax.tree.map(lambda _: jnp.ones(n, bool), params),
              "grad_scale": jax.tree.map(lambda x: sign * x, base.stacked(
                  common.unit_grad_scale(jax.tree.map(lambda x: x[0], params)), n)),
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


def msg_reinit(params, grads, counts, key):
  """MSG's structural edit on ONE model: for every conv kernel, the ``counts[leaf]`` (=
  round(init_rate * numel), `msg_counts`) entries with the smallest |grad| are redrawn from
  kaiming_normal(fan_out, relu); returns (params, grad_scale) with grad_scale 1.0 on those entries
  and 0.1 on the rest of the kernel (1.0 for every non-conv leaf). Ties: lower flat index first.
  All kernels are ranked by one stable sort on (kernel, |grad|)."""
  paths = leaf_paths(params)
  leaves, treedef = jax.tree.flatten(params)
  g_leaves = jax.tree.leaves(grads)
  conv = [i for i, (p, x) in enumerate(zip(paths, leaves)) if common.is_conv_kernel(p, x)]
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
  return common.masked_finetune(ctx, variables, hp, jax.random.fold_in(key, 4), hp.batch_size,
                                hp.num_epochs, lr_factor=msg_triangle(hp.num_epochs),
                                grad_scale=scale)


MSG = base.register(base.Method(
    name="msg", paper_name="MSG", reference="deepunlearn-spec 4.15 (kgltop2, Masked Small Gradients)",
    defaults={"num_epochs": 5, "batch_size": 64, "init_rate": 0.3, "learning_rate": 1e-3,
              "momentum": 0.9, "weight_decay": 5e-4},
    space={"init_rate": "float", **base.COMMON5},
    uses=("retain", "forget"), unlearn=_msg, aliases=("kgltop2",)))


# --------------------------------------------------------------------------------------------
# PRMQ (kgltop4)
# --------------------------------------------------------------------------------------------


def prunable_paths(params) -> list[tuple[str, ...]]:
  """Leaves of ONE model that ``global_unstructured`` prunes: the weight and bias of every
  Conv2d / Linear (a module with a ``kernel``); not BN/LN parameters nor TinyViT's
  ``attention_biases``."""
  def module(path):
    node = params
    for k in path[:-1]:
      node = node[k]
    return node

  return [p for p in leaf_paths(params)
          if p[-1] == "kernel" or (p[-1] == "bias" and "kernel" in module(p))]


def prune_count(params, amount) -> np.ndarray:
  """round(amount * total prunable entries) (float64, half to even; scalar or one per model)."""
  total = sum(int(np.prod(np.shape(_get(params, p)))) for p in prunable_paths(params))
  return np.round(np.asarray(amount, np.float64) * total).astype(np.int64)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def prmq_prune(params, count):
  """Global L1 unstructured pruning on ONE model: the ``count`` smallest-|w| entries pooled over
  all prunable leaves (ties: lower position first) are set to 0."""
  paths = prunable_paths(params)
  flat = jnp.concatenate([jnp.abs(_get(params, p)).reshape(-1) for p in paths])
  ranks = jnp.zeros(flat.size, jnp.int32).at[jnp.argsort(flat)].set(
      jnp.arange(flat.size, dtype=jnp.int32))
  keep = ranks >= count
  out, start = {}, 0
  for p in paths:
    x = _get(params, p)
    out[p] = jnp.where(keep[start:start + x.size].reshape(x.shape), x, 0.0)
    start += x.size
  return common.map_with_path(lambda p, x: out.get(p, x), params)


def prmq_reinit(params, key):
  """Every entry equal to 0 in a conv/linear kernel of ONE model <- U(+-sqrt(1/fan_in)),
  fan_in = in/groups * kh * kw or in_features; biases stay as they are (pruned ones stay 0)."""
  paths = leaf_paths(params)
  leaves, treedef = jax.tree.flatten(params)
  kernels = [i for i, p in enumerate(paths) if p[-1] == "kernel"]
  fresh = flat_draws(key, [leaves[i].shape for i in kernels], "uniform")
  for j, i in enumerate(kernels):
    x = leaves[i]
    bound = 1.0 / math.sqrt(int(np.prod(x.shape[:-1])))
    leaves[i] = jnp.where(x == 0, bound * fresh[j], x)
  return jax.tree.unflatten(treedef, leaves)


def _prune_and_reinit(params, count, key):
  return prmq_reinit(prmq_prune(params, count), key)


def prmq_class_weights(num_classes, index_set, labels):
  """count_c^-0.1 over one model's retain labels (absent classes: 0, never used)."""
  counts = common.class_counts(index_set, labels, num_classes)
  return jnp.where(counts > 0, jnp.maximum(counts, 1) ** -0.1, 0.0)


def fp16_round_trip(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float16).astype(x.dtype)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def prmq_steps(ctx: base.Context, batch_size: int, num_epochs: float) -> np.ndarray:
  """Per-model step budget ``int(len(retain_loader) * num_epochs) + 1`` (float epochs)."""
  batches = -(-(ctx.retain >= 0).sum(1) // batch_size)
  return (np.floor(batches * float(num_epochs)) + 1).astype(np.int64)


def _prmq(ctx: base.Context, hp, key) -> dict:
  """PRMQ (deepunlearn-spec 4.17, reference ``kgltop4``).

  Teacher = the unpruned original (eval mode). Class weights count_c^-0.1 from each model's
  retain labels. Global L1 magnitude pruning of round(prune_amount * total) entries pooled over
  the weights and biases of every conv/linear layer (per model), then every zero kernel entry is
  re-drawn from U(+-sqrt(1/fan_in)) (biases stay 0). Training (BN train mode, plain inputs, SGD,
  constant lr) runs ``int(len(retain_loader) * num_epochs) + 1`` steps per model crossing epoch
  boundaries (``num_epochs`` is a float), loss = class-weighted CE (sum w l / sum w) + MSE between
  the per-sample entropies of the student and the teacher. Finally every float parameter and
  BN statistic goes through a float16 round trip. Deviations: class weights are indexed by class
  (the reference's sorted-present-classes vector would misalign, or crash, when a class is absent
  from the retain set).
  """
  n, bs = ctx.num_models, hp.batch_size
  count = prune_count(jax.tree.map(lambda x: x[0], ctx.originals["params"]),
                      np.broadcast_to(np.asarray(hp.prune_amount, np.float64), (n,)))
  params = base.stack_map(ctx, _prune_and_reinit, (), ctx.originals["params"], jnp.asarray(count),
                          ctx.keys(jax.random.fold_in(key, 0)))
  weights = base.stack_map(ctx, prmq_class_weights, (ctx.num_classes,), jnp.asarray(ctx.retain),
                           shared=(ctx.data.labels,))
  steps = prmq_steps(ctx, bs, hp.num_epochs)
  batches = np.maximum(-(-(ctx.retain >= 0).sum(1) // bs), 1)
  epochs = int(np.max(-(-steps // batches)))
  floats = {**base.per_model(hp, ("learning_rate", "weight_decay", "momentum"), n),
            "class_weights": weights, "max_steps": steps.astype(np.float32)}
  variables = train.as_variables(params, base.copy_tree(ctx.originals.get("batch_stats", {})))
  state = common.run_loss(ctx, variables, {**floats, "c_wce": 1.0, "c_entropy": 1.0},
                          jax.random.fold_in(key, 1), common.LossSpec("distill", bs), epochs,
                          extras={"teacher": base.copy_tree(ctx.originals)})
  return fp16_round_trip(state.variables)


PRMQ = base.register(base.Method(
    name="prmq", paper_name="PRMQ", reference="deepunlearn-spec 4.17 (kgltop4)",
    defaults={"num_epochs": 3.2, "batch_size": 64, "learning_rate": 5e-4, "momentum": 0.9,
              "weight_decay": 5e-4, "prune_amount": 0.99},
    space={"prune_amount": "float", "learning_rate": "learning_rate", "momentum": "momentum",
           "weight_decay": "weight_decay", "batch_size": "batch_size",
           "num_epochs": "num_epochs_float"},
    uses=("retain",), unlearn=_prmq, aliases=("kgltop4",)))


# --------------------------------------------------------------------------------------------
# KDE (kgltop6)
# --------------------------------------------------------------------------------------------


def kde_reset_modules(params) -> tuple[str, ...]:
  """The stem conv (``stem_conv``, the reference's ``conv1``; TinyViT has none) and the head."""
  stem = ("stem_conv",) if "stem_conv" in params else ()
  return stem + models.head_path(params)


def _reset(modules, params, key):
  return reset_modules(params, modules, key)


def _kde(ctx: base.Context, hp, key) -> dict:
  """KDE (deepunlearn-spec 4.19, reference ``kgltop6``).

  Teacher = the original (eval mode). The stem conv and the head are reset with PyTorch's
  default init (U(+-1/sqrt(fan_in)) for weight and bias). Warm-up: ``num_epochs`` epochs of
  distillation KL(softmax(t/T) || softmax(s/T)) (batchmean, no T^2), SGD(optimizer.*), constant
  lr, BN train mode. Retain phase: a new SGD(retain_optimizer.*), per-epoch cosine over
  ``retain_num_epochs``; loss = soft CE to softmax(t/T) + CE + KL_T.
  Deviation (deepunlearn-spec 10.23): the warm-up runs on the shuffled *retain* set; the
  reference distils on the (unshuffled) validation set, which the objective then evaluates on:
  ``faithful=True`` does that.
  """
  n, bs = ctx.num_models, hp.batch_size
  params = base.stack_map(ctx, _reset, (kde_reset_modules(ctx.originals["params"]),),
                          ctx.originals["params"], ctx.keys(jax.random.fold_in(key, 0)))
  variables = train.as_variables(params, base.copy_tree(ctx.originals.get("batch_stats", {})))
  temperature = base.per_model(hp, ("temperature",), n)
  warm = {**base.per_model(hp, ("learning_rate", "weight_decay", "momentum"), n), **temperature}
  spec = common.LossSpec("distill", bs)
  state = common.run_loss(ctx, variables, {**warm, "c_kl": 1.0}, jax.random.fold_in(key, 1), spec,
                          hp.num_epochs, source="val" if hp.faithful else "retain",
                          shuffle=not hp.faithful, extras={"teacher": base.copy_tree(ctx.originals)})
  retain = base.optimizer_hp(
      base.per_model(hp, ("retain_learning_rate", "retain_weight_decay", "retain_momentum"), n),
      "retain_")
  state = common.run_loss(ctx, state.variables,
                          {**retain, **temperature, "c_soft": 1.0, "c_ce": 1.0, "c_kl": 1.0},
                          jax.random.fold_in(key, 2), spec, hp.retain_num_epochs,
                          extras={"teacher": base.copy_tree(ctx.originals)},
                          lr_factor=base.cosine(hp.retain_num_epochs))
  return state.variables


KDE = base.register(base.Method(
    name="kde", paper_name="KDE", reference="deepunlearn-spec 4.19 (kgltop6)",
    defaults={"num_epochs": 3, "retain_num_epochs": 3, "batch_size": 64, "temperature": 5.0,
              "learning_rate": 9e-4, "momentum": 0.9, "weight_decay": 5e-4,
              "retain_learning_rate": 1e-3, "retain_momentum": 0.9, "retain_weight_decay": 5e-4,
              "faithful": False},
    space={"temperature": "temperature", "retain_num_epochs": "num_epochs",
           "retain_learning_rate": "learning_rate", "retain_momentum": "momentum",
           "retain_weight_decay": "weight_decay", **base.COMMON5},
    uses=("retain", "val"), unlearn=_kde, aliases=("kgltop6",)))


# --------------------------------------------------------------------------------------------
# RNI (kgltop7)
# --------------------------------------------------------------------------------------------

LAYER_SELECT = 9  # the reference's hard-coded number of non-BN tensors trained per epoch


def rni_bn_flags(variables, faithful: bool) -> tuple[bool, ...]:
  """Per leaf (order of `leaf_paths`) of ONE model: is it a "bn key"?

  ``faithful``: the reference's rule, the substring "bn" in the parameter's name (misses
  torchvision's downsample BN ``downsample.1.*``, here ``downsample_1``). Otherwise every
  BatchNorm parameter (a module that has running statistics)."""
  paths = leaf_paths(variables["params"])
  if faithful:
    return tuple("bn" in "/".join(p) for p in paths)
  bn_modules = {p[:-1] for p in leaf_paths(variables.get("batch_stats", {}))}
  return tuple(p[:-1] in bn_modules for p in paths)


def rni_select(bn, fine, noise_window, params, already, noise_count, origin_noise, key):
  """One RNI epoch's key selection and noise for ONE model.

  ``bn``: static per-leaf flags; ``fine`` / ``noise_window``: static phase of this epoch;
  ``already``: bool [K] keys selected in earlier epochs; ``noise_count``: int(noise_ratio * 9).
  Returns (params with noise, selected [K], already | selected). Outside the fine phase the
  selection is min(9, #non-bn) non-bn keys without replacement plus every bn key; in the noise
  window, ``noise_count`` of those non-bn keys (clamped to their number) get
  theta + origin_noise * N(0, 1) if they were never selected before.
  """
  k = len(bn)
  flags = np.asarray(bn, bool)
  if fine:
    selected = jnp.ones(k, bool)
    return params, selected, already | selected
  cand = jnp.asarray(np.flatnonzero(~flags), jnp.int32)
  pick = min(LAYER_SELECT, int(cand.shape[0]))
  k_sel, k_noise, k_draw = jax.random.split(key, 3)
  picked = jax.random.permutation(k_sel, cand)[:pick]
  selected = jnp.asarray(flags).at[picked].set(True)
  if noise_window and pick:
    shuffled = picked[jax.random.permutation(k_noise, pick)]
    chosen = jnp.arange(pick) < jnp.minimum(noise_count, pick)
    noisy = jnp.zeros(k, bool).at[shuffled].set(chosen) & ~already
    leaves, treedef = jax.tree.flatten(params)
    draws = flat_draws(k_draw, [x.shape for x in leaves])
    leaves = [x + jnp.where(noisy[i], origin_noise, 0.0) * z
              for i, (x, z) in enumerate(zip(leaves, draws))]
    params = jax.tree.unflatten(treedef, leaves)
  return params, selected, already | selected


def rni_fine_lr(value, index: int, n: int) -> np.ndarray:
  """The fine-phase lr of fine epoch ``index`` per model: a scalar; a 1-D list = the reference's
  per-fine-epoch schedule (shared by all models; the default); a 2-D [N, S] array = one schedule
  per model (S = 1: a constant per model, how a stack of trials passes its values)."""
  v = np.asarray(value, np.float64)
  if v.ndim == 0:
    return np.full(n, v)
  if v.ndim == 1:
    if index >= v.shape[0]:
      raise ValueError(f"RNI fine epoch {index} has no entry in the fine_learning_rate schedule "
                       f"{v.tolist()} (deepunlearn-spec 4.20: the list is indexed by "
                       "ep - num_epochs + fine_num_epochs)")
    return np.full(n, v[index])
  if v.ndim == 2 and v.shape[0] == n:
    if v.shape[1] == 1:
      return v[:, 0]
    if index >= v.shape[1]:
      raise ValueError(f"RNI fine epoch {index} beyond the per-model schedules {v.shape}")
    return v[:, index]
  raise ValueError(f"fine_learning_rate must be a scalar, a schedule list or [{n}, S], got {v.shape}")


def _rni(ctx: base.Context, hp, key) -> dict:
  """RNI (deepunlearn-spec 4.20, reference ``kgltop7``), BN in train mode.

  The head (``fc``/``head``) is reset with PyTorch's default init. For ep = 0..E-1 (F =
  fine_num_epochs, R = reset_num_epochs): outside the fine phase (ep < E-F) each model draws its
  own 9 non-bn parameter tensors (+ all bn ones); for R <= ep < E-F, int(noise_ratio * 9) of those
  9 get Gaussian noise (origin_noise) if never selected before; in the fine phase everything is
  selected. Only the selected tensors are updated (no decay for the others; BN statistics of all
  layers update) by a NEW SGD each epoch (momentum reset): ``optimizer.*`` or ``fine_optimizer.*``
  with the fine lr indexed by ep - E + F when it is a list. One pass over the shuffled retain set
  per epoch, CE, no scheduler. The per-model selections live in a stacked [N, K] carry.
  Deviations: "bn keys" are all BatchNorm parameters (``faithful=True``: the reference's "bn"
  substring rule, which misses the downsample BN); the 9 picks and the noise count are clamped to
  the number of non-bn tensors (the reference raises on small models); the per-epoch validation
  accuracy, printed only by the reference, is not computed.
  """
  n, epochs, fine, reset = ctx.num_models, hp.num_epochs, hp.fine_num_epochs, hp.reset_num_epochs
  one = jax.tree.map(lambda x: x[0], ctx.originals)
  bn = rni_bn_flags(one, hp.faithful)
  head = models.head_path(ctx.originals["params"])
  params = base.stack_map(ctx, _reset, (head,), ctx.originals["params"],
                          ctx.keys(jax.random.fold_in(key, 0)))
  batch_stats = base.copy_tree(ctx.originals.get("batch_stats", {}))
  ratio = np.broadcast_to(np.asarray(hp.noise_ratio, np.float64), (n,))
  noise_count = jnp.asarray(np.floor(ratio * LAYER_SELECT), jnp.int32)
  origin_noise = base.per_model(hp, ("origin_noise",), n)["origin_noise"]
  already = jnp.zeros((n, len(bn)), bool)
  sgd = base.per_model(hp, ("learning_rate", "weight_decay", "momentum"), n)
  fine_sgd = base.per_model(hp, ("fine_weight_decay", "fine_momentum"), n)
  for ep in range(epochs):
    is_fine = ep >= epochs - fine
    window = reset <= ep < epochs - fine
    params, selected, already = base.stack_map(
        ctx, rni_select, (bn, is_fine, window), params, already, noise_count, origin_noise,
        ctx.keys(jax.random.fold_in(key, 1000 + ep)))
    treedef = jax.tree.structure(params)
    trainable = jax.tree.unflatten(treedef, [selected[:, i] for i in range(len(bn))])
    if is_fine:
      opt = {"learning_rate": rni_fine_lr(hp.fine_learning_rate, ep - epochs + fine, n),
             "weight_decay": fine_sgd["fine_weight_decay"], "momentum": fine_sgd["fine_momentum"]}
    else:
      opt = sgd
    out = common.masked_finetune(ctx, train.as_variables(params, batch_stats), opt,
                                 jax.random.fold_in(key, 2000 + ep), hp.batch_size, 1,
                                 trainable=trainable)
    params, batch_stats = out["params"], out.get("batch_stats", {})
  return train.as_variables(params, batch_stats)


RNI = base.register(base.Method(
    name="rni", paper_name="RNI", reference="deepunlearn-spec 4.20 (kgltop7)",
    defaults={"num_epochs": 9, "fine_num_epochs": 4, "reset_num_epochs": 1, "batch_size": 64,
              "learning_rate": 2e-4, "momentum": 0.9, "weight_decay": 5e-4,
              "fine_learning_rate": [2e-4, 2e-4, 2e-4, 1e-3, 1e-3, 1e-4], "fine_momentum": 0.9,
              "fine_weight_decay": 5e-4, "noise_ratio": 0.7, "origin_noise": 0.04,
              "faithful": False},
    space={"fine_num_epochs": "num_epochs", "fine_learning_rate": "learning_rate",
           "fine_momentum": "momentum", "fine_weight_decay": "weight_decay",
           "reset_num_epochs": "num_epochs", "noise_ratio": "float", "origin_noise": "normal_sigma",
           **base.COMMON5},
    uses=("retain",), unlearn=_rni, aliases=("kgltop7",)))
