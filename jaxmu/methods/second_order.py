"""Second-order edits: FF (Fisher forgetting), IU (influence unlearning) and IAM's Fisher
forgetting (deepunlearn-spec 4.10, 4.11, the Unlearn-Sparse / Unlearn-Saliency code they copy;
iam-spec 8 `fisher`).

FF and IU compute gradients with BatchNorm in eval mode and never train. ``iam_fisher`` (IAM's
variant, see `_iam_fisher`) takes per-sample gradients in train mode and keeps the re-estimated
BatchNorm statistics; it shares FF's variance rule up to its one_class step (`_clamped_variance`).

**FF** (`fisher`): a diagonal "Fisher" over the retain set, computed as the reference does: per
batch (unshuffled, ``batch_size``), one forward pass, then for every class y the gradient g_y of the
batch-mean CE towards label y (all C of them as one batched backward pass of the forward's VJP,
``class_chunk`` classes at a time), accumulated as F += mean_batch(p_y) g_y^2; finally F /= the
number of batches. Variance per parameter tensor: var = min(1 / (F + 1e-8), 1e3); if its output
dimension is C, min(var, 1e2); var *= alpha; for tensors of >= 2 dims, var is averaged over the
input dimension; var *= 10 for tensors whose output dimension is C and for all 1-D tensors;
theta = theta_0 + sqrt(var) N(0, 1) (one key per model). BatchNorm running statistics untouched.

  Layout mapping (PyTorch -> Flax): PyTorch's ``shape[0]`` is a tensor's *output* dimension and
  ``mean(dim=1)`` its *input* dimension. Flax Dense kernels are [in, out] and Conv kernels
  [kh, kw, in, out], so for leaves named ``kernel`` the output axis is the last and the input axis
  the second to last (a conv's variance is averaged over input channels, per (kh, kw, out)).
  Other >= 2-D leaves (TinyViT ``attention_biases`` [heads, offsets]) have PyTorch's layout
  (output axis 0, input axis 1); 1-D leaves (biases, BN / LN scale and bias) axis 0.

  Cost knobs (not in the reference): ``num_samples`` limits the Fisher to the first retain
  samples in split order (0 = all, the reference); ``class_chunk`` bounds the classes
  back-propagated at once (memory ~ class_chunk x |theta|).

**IU** (`influence`): g_f and g_r are the sums of per-sample CE gradients over the forget and
retain sets; v = g_f / (n_f + n_r) - g_r n_f / ((n_f + n_r) n_r); k = H^-1 v with the WoodFisher
inverse empirical Fisher H = I + (1/N) sum_i g_i g_i^T, N = 1000, over the first ``num_samples``
(1,002 in the reference) retain samples in split order (per-sample gradients, batch 1);
theta <- theta + alpha k.

  Deviation (deepunlearn-spec 10.18): the reference's Sherman-Morrison recursion never
  re-projects its vector ``o`` on the new sample's gradient (``o`` stays the first sample's
  gradient, rescaled), so its k is v minus a multiple of g_0. Here the intended recursion
  (o_i = H_{i-1}^-1 g_i, k <- k - o_i (g_i . k) / (N + g_i . o_i), over *all* the samples) is
  computed exactly in its Woodbury form k = v - G^T (N I + G G^T)^-1 G v, which needs only the
  n x n Gram matrix of the per-sample gradients: gradients are computed ``grad_chunk`` at a time
  (vmap of grad), the Gram matrix block by block (a chunk's gradients are recomputed for every
  later chunk: ~ n^2 / (2 grad_chunk) per-sample gradients, n when grad_chunk >= n), and G^T alpha
  as one weighted gradient. ``faithful=True`` runs the reference's recursion instead (a
  ``lax.scan`` over flattened per-sample gradients, batch 1, sample 0 only initialising ``o``).
  ``num_epochs`` is inert, as in the reference.

TinyViT: in eval mode the reference's attention caches its bias under ``no_grad``, so
``attention_biases`` get no gradient and FF and IU crash (deepunlearn-spec 10.8). Here their
gradients are computed normally; with ``faithful=True`` on a model with attention biases both
methods raise an error citing the spec instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxmu import train
from jaxmu.methods import base

WOODFISHER_N = 1000


def _check_faithful_tinyvit(ctx: base.Context, hp, method: str) -> None:
  if not hp.faithful:
    return
  paths = jax.tree_util.tree_flatten_with_path(ctx.originals["params"])[0]
  if any(getattr(k, "key", None) == "attention_biases" for p, _ in paths for k in p):
    raise ValueError(
        f"{method} with faithful=True cannot run on TinyViT: in eval mode the reference's "
        "attention_biases receive no gradient and the reference crashes (deepunlearn-spec 10.8, "
        f"4.10/4.11); run {method} with faithful=False to compute their gradients normally")


def _prefix(index_sets: np.ndarray, num_samples: int) -> np.ndarray:
  """The first ``num_samples`` indices of each model's set in split order (0 = all)."""
  return index_sets if num_samples <= 0 else index_sets[:, :num_samples]


def _bcast(values: jax.Array, leaf: jax.Array) -> jax.Array:
  return values.reshape(values.shape + (1,) * (leaf.ndim - values.ndim))


# --------------------------------------------------------------------------------------------
# FF
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FisherOptions:
  batch_size: int
  num_classes: int
  class_chunk: int


def class_chunks(num_classes: int, class_chunk: int) -> np.ndarray:
  """[num_chunks, chunk] class ids (ids >= num_classes are padding), balanced chunk sizes."""
  chunk = num_classes if class_chunk <= 0 else min(class_chunk, num_classes)
  num = -(-num_classes // chunk)
  chunk = -(-num_classes // num)
  return np.arange(num * chunk, dtype=np.int32).reshape(num, chunk)


def _fisher_step(model, recipe, opts: FisherOptions, carry, orders, key, hp, images, labels,
                 step_index, epoch, lr_factor):
  del key, hp, epoch, lr_factor
  params, batch_stats, fisher, count = carry
  idx = base.batch(orders["retain"], step_index, opts.batch_size)
  x, _, valid = base.inputs(recipe, images, labels, idx)
  logits, pullback = jax.vjp(
      lambda p: base.forward(model, recipe, p, batch_stats, x, valid, training=False)[0], params)
  num = jnp.maximum(valid.sum(), 1)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weight = (probs * valid[:, None]).sum(0) / num  # mean_batch p[:, y]
  c = opts.num_classes

  def chunk_fisher(classes):
    onehot = jax.nn.one_hot(classes, c)  # padding classes (>= C) give zero rows
    # d mean_i CE(z_i, y) / d z_i = (p_i - e_y) / n for the valid samples.
    cot = (probs[None] - onehot[:, None, :]) * valid[None, :, None] / num
    grads = jax.vmap(lambda ct: pullback(ct.astype(logits.dtype))[0])(cot)
    w = jnp.where(classes < c, weight[jnp.minimum(classes, c - 1)], 0.0)
    return jax.tree.map(lambda g: jnp.tensordot(w, jnp.square(g), axes=1), grads)

  chunks = jnp.asarray(class_chunks(c, opts.class_chunk))
  if chunks.shape[0] == 1:
    batch_fisher = chunk_fisher(chunks[0])
  else:
    batch_fisher = jax.lax.scan(
        lambda acc, cl: (jax.tree.map(jnp.add, acc, chunk_fisher(cl)), None),
        base.tree_zeros_like(params), chunks)[0]
  fisher = jax.tree.map(jnp.add, fisher, batch_fisher)
  return (params, batch_stats, fisher, count + valid.any()), {}


def fisher_diagonal(ctx: base.Context, variables, batch_size: int, num_samples: int = 0,
                    class_chunk: int = 0, key: jax.Array | None = None):
  """The reference's "Fisher" (deepunlearn-spec 4.10 step 2) of every model: stacked like params."""
  params = base.copy_tree(variables["params"])
  carry = (params, base.copy_tree(variables.get("batch_stats", {})),
           base.tree_zeros_like(params), jnp.zeros((ctx.num_models,), jnp.int32))
  opts = FisherOptions(batch_size, ctx.num_classes, class_chunk)
  sources = {"retain": (_prefix(ctx.retain, num_samples), batch_size, False)}
  key = jax.random.key(0) if key is None else key
  _, _, fisher, count = base.run_epochs(ctx, _fisher_step, (ctx.model, ctx.recipe, opts), carry,
                                        sources, base.no_hp(ctx), key, 1)
  count = jnp.maximum(count, 1).astype(jnp.float32)
  return jax.tree.map(lambda f: f / _bcast(count, f), fisher)


def _axes(path, leaf) -> tuple[int, int | None]:
  """(output axis, input axis or None) of a leaf, in PyTorch's sense (see module docstring)."""
  if leaf.ndim == 1:
    return 0, None
  if getattr(path[-1], "key", None) == "kernel":
    return leaf.ndim - 1, leaf.ndim - 2
  return 0, 1


def _clamped_variance(path, f, alpha, num_classes: int):
  """One leaf's variance before the x10 rule (FF and iam_fisher): min(1 / (F + 1e-8), 1e3), at
  most 1e2 where the output axis is C-sized, times alpha, averaged over the input axis; with the
  output axis and whether it is C-sized."""
  out_axis, in_axis = _axes(path, f)
  is_class = f.shape[out_axis] == num_classes
  var = jnp.minimum(1.0 / (f + 1e-8), 1e3)
  if is_class:
    var = jnp.minimum(var, 1e2)
  var = alpha * var
  if in_axis is not None:
    var = jnp.broadcast_to(jnp.mean(var, axis=in_axis, keepdims=True), f.shape)
  return var, out_axis, is_class


def fisher_variance(fisher, alpha, num_classes: int):
  """FF's noise variance of one model (deepunlearn-spec 4.10 step 3), in the Flax layout."""

  def one(path, f):
    var, _, is_class = _clamped_variance(path, f, alpha, num_classes)
    if is_class or f.ndim == 1:
      var = var * 10.0
    return var

  return jax.tree_util.tree_map_with_path(one, fisher)


def _add_noise(num_classes, params, fisher, alpha, key):
  var = fisher_variance(fisher, alpha, num_classes)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  noise = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])
  return jax.tree.map(lambda p, v, z: p + jnp.sqrt(v) * z, params, var, noise)


def _fisher(ctx: base.Context, hp, key) -> dict:
  """FF (deepunlearn-spec 4.10); see the module docstring for layouts, knobs and deviations."""
  _check_faithful_tinyvit(ctx, hp, "fisher")
  fisher = fisher_diagonal(ctx, ctx.originals, int(hp.batch_size), int(hp.num_samples),
                           int(hp.class_chunk))
  alpha = base.per_model(hp, ("alpha",), ctx.num_models)["alpha"]
  params = base.stack_map(ctx, _add_noise, (ctx.num_classes,), ctx.originals["params"], fisher,
                          alpha, ctx.keys(key))
  return {**base.copy_tree(ctx.originals), "params": params}


# --------------------------------------------------------------------------------------------
# IU
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GradOptions:
  source: str
  batch_size: int
  weighted: bool = False


def _sample_losses(model, recipe, params, batch_stats, x, y, valid):
  logits, _ = base.forward(model, recipe, params, batch_stats, x, valid, training=False)
  return base.cross_entropy(logits, y) * valid


def _grad_sum_step(model, recipe, opts: GradOptions, carry, orders, key, hp, images, labels,
                   step_index, epoch, lr_factor):
  """Accumulates sum_i w_i grad CE_i (w = 1, or the carry's per-position weights)."""
  del key, hp, epoch, lr_factor
  params, batch_stats, acc, count, weights = carry
  idx = base.batch(orders[opts.source], step_index, opts.batch_size)
  x, y, valid = base.inputs(recipe, images, labels, idx)
  w = (jax.lax.dynamic_slice(weights, (step_index * opts.batch_size,), (opts.batch_size,))
       if opts.weighted else 1.0)
  grads = jax.grad(
      lambda p: jnp.sum(w * _sample_losses(model, recipe, p, batch_stats, x, y, valid)))(params)
  acc = jax.tree.map(jnp.add, acc, grads)
  return (params, batch_stats, acc, count + valid.sum(), weights), {}


def _grad_sum(ctx, variables, index_sets, batch_size, key, weights=None):
  """Per model: (sum of per-sample CE gradients over its index set, its size)."""
  params = base.copy_tree(variables["params"])
  weighted = weights is not None
  weights = jnp.zeros((ctx.num_models, 1), jnp.float32) if weights is None else weights
  carry = (params, base.copy_tree(variables.get("batch_stats", {})), base.tree_zeros_like(params),
           jnp.zeros((ctx.num_models,), jnp.int32), weights)
  opts = GradOptions("data", batch_size, weighted)
  out = base.run_epochs(ctx, _grad_sum_step, (ctx.model, ctx.recipe, opts), carry,
                        {"data": (index_sets, batch_size, False)}, base.no_hp(ctx), key, 1)
  return out[2], out[3]


def _per_sample_grads(model, recipe, params, batch_stats, images, labels, idx):
  """Flattened per-sample CE gradients [len(idx), |theta|] (zero rows for padding)."""
  x, y, valid = base.inputs(recipe, images, labels, idx)

  def one(xi, yi):
    loss = lambda p: _sample_losses(model, recipe, p, batch_stats, xi[None],  # noqa: E731
                                    yi[None], jnp.ones((1,), bool))[0]
    return ravel_pytree(jax.grad(loss)(params))[0]

  return jax.vmap(one)(x, y) * valid[:, None], valid


@dataclasses.dataclass(frozen=True)
class GramOptions:
  chunk: int
  num_chunks: int


def _pairs(num_chunks: int) -> tuple[np.ndarray, np.ndarray]:
  """Chunk pairs (a, b), b <= a, a-major: each row of blocks starts with b = 0."""
  a, b = zip(*[(i, j) for i in range(num_chunks) for j in range(i + 1)])
  return np.asarray(a, np.int32), np.asarray(b, np.int32)


def _gram_step(model, recipe, opts: GramOptions, carry, orders, key, hp, images, labels,
               step_index, epoch, lr_factor):
  """One block (a, b) of K = G G^T (and, for b = 0, the rows G_a v)."""
  del key, hp, epoch, lr_factor
  params, batch_stats, v, gram, gv, ga = carry
  table_a, table_b = (jnp.asarray(t) for t in _pairs(opts.num_chunks))
  a, b = table_a[step_index], table_b[step_index]
  order, c = orders["prefix"], opts.chunk
  grads = lambda i: _per_sample_grads(model, recipe, params, batch_stats, images, labels,  # noqa
                                      base.batch(order, i, c))[0]
  ga = jax.lax.cond(b == 0, lambda: grads(a), lambda: ga)
  gb = jax.lax.cond(b == a, lambda: ga, lambda: grads(b))
  block = ga @ gb.T
  gram = jax.lax.dynamic_update_slice(gram, block, (a * c, b * c))
  gram = jax.lax.dynamic_update_slice(gram, block.T, (b * c, a * c))
  gv = jnp.where(b == 0, jax.lax.dynamic_update_slice(gv, ga @ v, (a * c,)), gv)
  return (params, batch_stats, v, gram, gv, ga), {}


@dataclasses.dataclass(frozen=True)
class ScanOptions:
  chunk: int


def _faithful_step(model, recipe, opts: ScanOptions, carry, orders, key, hp, images, labels,
                   step_index, epoch, lr_factor):
  """The reference's recursion over one chunk of per-sample gradients (never re-projects o)."""
  del key, hp, epoch, lr_factor
  params, batch_stats, k, o, started = carry
  grads, valid = _per_sample_grads(model, recipe, params, batch_stats, images, labels,
                                   base.batch(orders["prefix"], step_index, opts.chunk))

  def row(state, inp):
    k, o, started = state
    g, ok = inp
    t = o @ g
    k_new = k - (k @ g) / (WOODFISHER_N + t) * o
    o_new = o - t / (WOODFISHER_N + t) * o
    update = ok & started
    k = jnp.where(update, k_new, k)
    o = jnp.where(update, o_new, jnp.where(ok, g, o))
    return (k, o, started | ok), None

  (k, o, started), _ = jax.lax.scan(row, (k, o, started), (grads, valid))
  return (params, batch_stats, k, o, started), {}


def _influence(ctx: base.Context, hp, key) -> dict:
  """IU (deepunlearn-spec 4.11); see the module docstring for the deviations."""
  _check_faithful_tinyvit(ctx, hp, "influence")
  n = ctx.num_models
  variables = ctx.originals
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  bs = int(hp.batch_size)
  g_f, n_f = _grad_sum(ctx, variables, ctx.forget, bs, key)
  g_r, n_r = _grad_sum(ctx, variables, ctx.retain, bs, key)
  n_f, n_r = n_f.astype(jnp.float32), n_r.astype(jnp.float32)
  total = jnp.maximum(n_f + n_r, 1.0)
  v = jax.tree.map(lambda f, r: f / _bcast(total, f) - r * _bcast(n_f / (total * jnp.maximum(
      n_r, 1.0)), r), g_f, g_r)
  _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], params))
  ravel = jax.vmap(lambda t: ravel_pytree(t)[0])
  v_flat = ravel(v)
  num_samples = int(hp.num_samples)  # 0 = the whole retain set
  num_samples = ctx.retain.shape[1] if num_samples <= 0 else min(num_samples, ctx.retain.shape[1])
  chunk = max(1, min(int(hp.grad_chunk), num_samples))
  num_chunks = -(-num_samples // chunk)
  prefix = _prefix(ctx.retain, num_samples)
  prefix = np.pad(prefix, ((0, 0), (0, num_chunks * chunk - prefix.shape[1])), constant_values=-1)
  source = {"prefix": (prefix, chunk, False)}
  if hp.faithful:
    carry = (base.copy_tree(params), base.copy_tree(batch_stats), v_flat,
             jnp.zeros_like(v_flat), jnp.zeros((n,), bool))
    out = base.run_epochs(ctx, _faithful_step, (ctx.model, ctx.recipe, ScanOptions(chunk)),
                          carry, source, base.no_hp(ctx), key, 1, num_steps=num_chunks)
    k_flat = out[2]
  else:
    size = num_chunks * chunk
    carry = (base.copy_tree(params), base.copy_tree(batch_stats), v_flat,
             jnp.zeros((n, size, size), jnp.float32), jnp.zeros((n, size), jnp.float32),
             jnp.zeros((n, chunk, v_flat.shape[1]), jnp.float32))
    opts = GramOptions(chunk, num_chunks)
    out = base.run_epochs(ctx, _gram_step, (ctx.model, ctx.recipe, opts), carry, source,
                          base.no_hp(ctx), key, 1, num_steps=len(_pairs(num_chunks)[0]))
    gram, gv = out[3], out[4]
    weights = jnp.linalg.solve(WOODFISHER_N * jnp.eye(size) + gram, gv[..., None])[..., 0]
    gt_alpha, _ = _grad_sum(ctx, variables, prefix, chunk, key, weights)
    k_flat = v_flat - ravel(gt_alpha)
  alpha = base.per_model(hp, ("alpha",), n)["alpha"]
  new_params = jax.vmap(unravel)(ravel(params) + alpha[:, None] * k_flat)
  return {**base.copy_tree(variables), "params": new_params}


FISHER = base.register(base.Method(
    name="fisher", paper_name="FF", reference="deepunlearn-spec 4.10",
    defaults={"batch_size": 64, "alpha": 0.2, "num_samples": 0, "class_chunk": 16,
              "faithful": False},
    space={"batch_size": "batch_size", "alpha": "normal_sigma"}, uses=("retain",),
    unlearn=_fisher))

INFLUENCE = base.register(base.Method(
    name="influence", paper_name="IU", reference="deepunlearn-spec 4.11",
    defaults={"num_epochs": 10, "batch_size": 256, "alpha": 0.2, "num_samples": 1002,
              "grad_chunk": 64, "faithful": False},
    space={"num_epochs": "num_epochs", "batch_size": "batch_size", "alpha": "normal_sigma"},
    uses=("retain", "forget"), unlearn=_influence))


# --------------------------------------------------------------------------------------------
# IAM's Fisher forgetting (iam-spec 8 `fisher`)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _IamFisherSpec:
  batch_size: int = 32
  augment: bool = True
  bn_train: bool = True


def _iam_fisher_step(model, recipe, spec: _IamFisherSpec, carry, orders, key, hp, images,
                     labels, step_index, epoch, lr_factor):
  """Adds the squared per-sample gradients of -log p(y_i | x_i) over one batch (train-mode
  forward of the whole batch; sample i's gradient flows through the batch statistics)."""
  del hp, epoch, lr_factor
  params, stats, total, count = carry
  x, y, valid, drop_key = base.loader_inputs(recipe, orders["retain"], step_index,
                                             spec.batch_size, key, images, labels, spec.augment)

  def losses(p):
    logits, new_stats = base.forward(model, recipe, p, stats, x, valid, training=spec.bn_train,
                                     key=drop_key)
    return base.cross_entropy(logits, y) * valid, new_stats

  _, vjp, new_stats = jax.vjp(losses, params, has_aux=True)
  per_sample = jax.vmap(lambda e: vjp(e)[0])(jnp.eye(x.shape[0], dtype=jnp.float32))
  total = jax.tree.map(lambda t, g: t + jnp.sum(g ** 2, axis=0), total, per_sample)
  new = (params, new_stats, total, count + valid.sum())
  return base.keep_if_empty(valid, new, carry), {}



def fisher_mean_var(params, fisher, absent, alpha, num_classes: int):
  """One model's (mu, var) of Golatkar's ``get_mean_var`` as IAM runs it (iam-spec 8).

  var = clamp(1 / (F + 1e-8), max=1e3), clamped at 1e2 when PyTorch's shape[0] == C; times alpha;
  for ndim > 1 averaged over PyTorch's dim 1; at classes absent from the retain set (``absent``
  [C] bool; one_class) of a C-sized shape[0]: mu = 0 and var = 1e-4; then var x 10 where
  shape[0] == C or ndim == 1. mu = theta.
  """
  def one(path, p, f):
    var, out_axis, is_c = _clamped_variance(path, f, alpha, num_classes)
    mu = p
    if is_c:
      shape = [1] * p.ndim
      shape[out_axis] = num_classes
      gone = jnp.reshape(absent, shape)
      mu = jnp.where(gone, 0.0, mu)
      var = jnp.where(gone, 1e-4, var)
    if is_c or p.ndim == 1:
      var = var * 10
    return mu, var
  pairs = jax.tree_util.tree_map_with_path(one, params, fisher)
  is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
  return (jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair),
          jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair))


def absent_classes(ctx: base.Context) -> np.ndarray:
  """[N, C] bool: classes with no sample in each model's retain set."""
  labels = np.asarray(ctx.data.labels)
  return np.stack([np.bincount(labels[r[r >= 0]], minlength=ctx.num_classes)[:ctx.num_classes] == 0
                   for r in ctx.retain])


def _iam_fisher(ctx: base.Context, hp, key) -> dict:
  spec = _IamFisherSpec(hp.batch_size, hp.augment, True)
  params = base.copy_tree(ctx.originals["params"])
  stats = base.copy_tree(ctx.originals.get("batch_stats", {}))
  carry = (params, stats, base.tree_zeros_like(params), jnp.zeros((ctx.num_models,), jnp.int32))
  params, stats, total, count = base.run_epochs(
      ctx, _iam_fisher_step, (ctx.model, ctx.recipe, spec), carry,
      {"retain": (ctx.retain, hp.batch_size, False)}, base.no_hp(ctx),
      jax.random.fold_in(key, 1), 1)
  fisher = jax.tree.map(
      lambda t: t / jnp.maximum(count, 1).reshape((-1,) + (1,) * (t.ndim - 1)), total)
  alpha = base.per_model(hp, ("alpha",), ctx.num_models)["alpha"]
  absent = jnp.asarray(absent_classes(ctx))

  def noisy(p, f, gone, a, k):
    mu, var = fisher_mean_var(p, f, gone, a, ctx.num_classes)
    leaves, treedef = jax.tree.flatten(mu)
    keys = jax.random.split(k, len(leaves))
    noise = [jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)]
    return jax.tree.map(lambda m, v, e: m + jnp.sqrt(v) * e, mu, var,
                        jax.tree.unflatten(treedef, noise))

  params = jax.jit(jax.vmap(noisy))(params, fisher, absent, alpha,
                                    ctx.keys(jax.random.fold_in(key, 2)))
  return train.as_variables(params, stats)


IAM_FISHER = base.register(base.Method(
    name="iam_fisher", paper_name="FF (IAM)", reference="iam-spec 8 (`fisher`), 12.21",
    defaults={"alpha": 1e-9, "batch_size": 32, "augment": True},
    space={}, uses=("retain",), unlearn=_iam_fisher))
_iam_fisher.__doc__ = """IAM's Fisher forgetting (iam-spec 8 `fisher`; Golatkar et al. 2020).

Empirical diagonal Fisher on the retain set, F = (1/N) sum_i (grad log p(y_i | x_i))^2, one pass in
batches of 32 (augmented, in order), per-sample gradients of a train-mode batch forward (so the
BatchNorm running statistics are re-estimated on augmented retain data and kept, as the
reference). Then `fisher_mean_var` (alpha 1e-9, the one_class rule for classes absent from the
retain set) and theta = mu + sqrt(var) N(0, 1), per model from the run key. Interpretation: how the
reference obtains per-sample gradients of a batch of 32 in train mode is not specified; here each
sample's gradient flows through the batch's BatchNorm statistics. A BatchNorm layer with exactly C
channels is treated as a C-sized layer, as PyTorch's shape[0] == C test does."""
