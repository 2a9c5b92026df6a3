"""IAM's approximate unlearning methods (iam-spec 8; used for Table 8, iam-spec 7.6 / 10.7).

* ``iam_ascent``: gradient ascent on the forget set (the reference's ``ascent``).
* ``boundary_expanding``: Chen et al. (CVPR'23) boundary expanding as IAM runs it.
* ``ssd``: Selective Synaptic Dampening (Foster et al.).
* ``iam_fisher``: IAM's Fisher forgetting (Golatkar et al. 2020, empirical diagonal Fisher).
* ``forsaken``: Forsaken, mask gradients (Ma et al., "Learn to forget", neuron masking).

L-CODEC lives in `jaxmu.methods.iam_lcodec`. IAM ran each method with fixed hyper-parameters and
no search, so every ``space`` is empty. Every method starts from ``ctx.originals`` and returns
stacked variables with the same tree. IAM's loaders are Subsets of the training set with the
training transforms (iam-spec 12.1), hence ``augment=True`` where a method reads retain/forget.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxmu import models, train
from jaxmu.models import resnet
from jaxmu.methods import base


def _union_sets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per model: the valid entries of ``a`` followed by those of ``b`` (ConcatDataset order)."""
  return train.pad_index_sets([np.concatenate([ra[ra >= 0], rb[rb >= 0]]) for ra, rb in zip(a, b)])


def _no_hp(ctx):
  """A placeholder per-model hyper-parameter (the engine needs at least one per-model leaf)."""
  return {"unused": jnp.zeros((ctx.num_models,), jnp.float32)}


# --------------------------------------------------------------------------------------------
# Gradient ascent (iam-spec 8 `ascent`)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LoaderSpec:
  batch_size: int = 128
  augment: bool = True
  bn_train: bool = True
  faithful: bool = False


def _ascent_step(model, recipe, spec: _LoaderSpec, carry, orders, key, hp, images, labels,
                 step_index, epoch, lr_factor):
  del epoch
  x, y, valid, drop_key = base.loader_inputs(recipe, orders["forget"], step_index,
                                             spec.batch_size, key, images, labels, spec.augment)
  net, helper = carry
  source = helper if spec.faithful else net  # faithful: a fresh network trained on the forget set

  def ce(params):
    logits, stats = base.forward(model, recipe, params, source.batch_stats, x, valid,
                                 training=spec.bn_train, key=drop_key)
    return base.masked_mean(base.cross_entropy(logits, y), valid), stats

  grads, stats = jax.grad(ce, has_aux=True)(source.params)
  if spec.faithful:
    helper = base.descend(helper, base.along(grads, stats), valid, hp, lr_factor)
    stats = net.batch_stats  # no forward pass through the model being unlearned
  ascent = base.along(jax.tree.map(jnp.negative, grads), stats)
  net = base.descend(net, ascent, valid, {**hp, "momentum": 0.0}, lr_factor, weight_decay=0.0)
  return (net, helper), {}


def _iam_ascent(ctx: base.Context, hp, key) -> dict:
  spec = _LoaderSpec(hp.batch_size, hp.augment, True, bool(hp.faithful))
  net = base.TrainCarry.create(ctx.originals)
  if spec.faithful:
    fresh = train.init_variables(ctx.model, ctx.keys(jax.random.fold_in(key, 7)), ctx.input_shape)
    helper = base.TrainCarry.create(fresh)
  else:
    helper = None
  sources = {"forget": (ctx.forget, hp.batch_size, True)}
  hpm = base.per_model(hp, ("learning_rate", "weight_decay", "momentum"), ctx.num_models)
  net, _ = base.run_epochs(ctx, _ascent_step, (ctx.model, ctx.recipe, spec), (net, helper),
                           sources, hpm, key, hp.num_epochs, lr_factor=base.cosine(hp.num_epochs))
  return net.variables


IAM_ASCENT = base.register(base.Method(
    name="iam_ascent", paper_name="GA (IAM)", reference="iam-spec 8 (`ascent`), 12.21",
    defaults={"num_epochs": 5, "learning_rate": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
              "batch_size": 128, "augment": True, "faithful": False},
    space={}, uses=("forget",), unlearn=_iam_ascent, aliases=("ascent",)))
_iam_ascent.__doc__ = """Gradient ascent on the forget set, IAM's schedule (iam-spec 8 `ascent`).

Each forget batch (128, augmented, shuffled), 5 epochs, per-epoch cosine lr 0.01 (T_max = 5):
theta <- theta + lr_t * grad CE(theta; forget batch), a plain ascent step (no momentum, no weight
decay, as the reference applies it). Intended: the gradient is the model's own, BatchNorm in train
mode (the reference's models are in train mode, so the running statistics move).
``faithful`` (iam-spec 8, 12.21): the gradient comes from a *freshly initialised* network of the
same architecture (drawn per model from the run key; the reference uses manual_seed(1)) that takes
an ordinary SGD step (momentum 0.9, wd 5e-4) on that gradient after each batch; the model being
unlearned gets theta += lr_t * g and no forward pass (its BatchNorm statistics are unchanged)."""


# --------------------------------------------------------------------------------------------
# Boundary expanding (iam-spec 8 `boundary_expanding`)
# --------------------------------------------------------------------------------------------


def drops_stem_relu(model) -> bool:
  """Whether the reference's widened backbone lacks the stem ReLU for this model (IAM's CIFAR
  ResNet: children[:-1] keeps conv1, bn1 and the layers, but its ReLU is functional)."""
  return isinstance(model, resnet.ResNet) and model.stem == "cifar"


def widened_forward(model, recipe, params, batch_stats, extra, x, valid, *, training: bool,
                    key=None, drop_stem_relu: bool = False):
  """Float32 logits [B, C+1] of the widened network, computed in the recipe's dtype: the model's
  logits plus one unit, ``feat @ extra["kernel"] + extra["bias"]`` on the classifier's input
  features (found by intercepting the top-level head module). ``drop_stem_relu`` feeds the stem
  BatchNorm's output to the first block without its ReLU (the reference's ResNet backbone; ResNet
  cifar stem only)."""
  head = models.head_path(params)
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    path = context.module.path
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if drop_stem_relu and path == ("stem_bn",):
      out = next_fun(*args, **kwargs)
      captured["stem"] = out
      return out
    if drop_stem_relu and path == ("layer1_0",):
      args = (captured["stem"],) + tuple(args[1:])
    if path == head:
      out = next_fun(*args, **kwargs)
      unit = args[0] @ extra["kernel"].astype(out.dtype) + extra["bias"].astype(out.dtype)
      return jnp.concatenate([out, unit], axis=-1)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    return base.forward(model, recipe, params, batch_stats, x, valid, training=training, key=key)


def _boundary_step(model, recipe, spec: _LoaderSpec, carry, orders, key, hp, images, labels,
                   step_index, epoch, lr_factor):
  del epoch
  x, _, valid, drop_key = base.loader_inputs(recipe, orders["forget"], step_index,
                                             spec.batch_size, key, images, labels, spec.augment)
  drop = spec.faithful and drops_stem_relu(model)

  def loss_fn(p):
    logits, stats = widened_forward(model, recipe, p["model"], carry.batch_stats, p["extra"], x,
                                    valid, training=spec.bn_train, key=drop_key,
                                    drop_stem_relu=drop)
    target = jnp.full((x.shape[0],), logits.shape[-1] - 1, jnp.int32)  # the extra label C
    return base.masked_mean(base.cross_entropy(logits, target), valid), stats

  return base.descend(carry, loss_fn, valid, hp, lr_factor), {}


def _extra_row(key, fan_in: int) -> dict:
  """Row C of PyTorch's Linear(fan_in, C+1) default init: U(+-1/sqrt(fan_in))."""
  bound = fan_in ** -0.5
  kw, kb = jax.random.split(key)
  return {"kernel": jax.random.uniform(kw, (fan_in, 1), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(kb, (1,), jnp.float32, -bound, bound)}


def _boundary_expanding(ctx: base.Context, hp, key) -> dict:
  head = models.head_path(ctx.originals["params"])
  kernel = ctx.originals["params"][head[0]]["kernel"]  # [N, F, C]
  extra = jax.vmap(lambda k: _extra_row(k, kernel.shape[1]))(
      ctx.keys(jax.random.fold_in(key, 11)))
  widened = {"params": {"model": ctx.originals["params"], "extra": extra},
             "batch_stats": ctx.originals.get("batch_stats", {})}
  spec = _LoaderSpec(hp.batch_size, hp.augment, True, bool(hp.faithful))
  sources = {"forget": (ctx.forget, hp.batch_size, True)}
  carry = base.run_epochs(ctx, _boundary_step, (ctx.model, ctx.recipe, spec),
                          base.TrainCarry.create(widened), sources,
                          base.per_model(hp, ("learning_rate", "weight_decay", "momentum"),
                                         ctx.num_models), key, hp.num_epochs)
  params = dict(base.copy_tree(ctx.originals["params"]))
  params[head[0]] = carry.params["model"][head[0]]  # rows 0..C-1 of the widened classifier
  return train.as_variables(params, base.copy_tree(ctx.originals.get("batch_stats", {})))


BOUNDARY_EXPANDING = base.register(base.Method(
    name="boundary_expanding", paper_name="BE", reference="iam-spec 8 (`boundary_expanding`), 12.21",
    defaults={"num_epochs": 10, "learning_rate": 1e-5, "momentum": 0.9, "weight_decay": 5e-4,
              "batch_size": 128, "augment": True, "faithful": False},
    space={}, uses=("forget",), unlearn=_boundary_expanding))
_boundary_expanding.__doc__ = """Boundary expanding as IAM runs it (iam-spec 8; Chen et al. CVPR'23).

The network is widened by one output unit (row C, PyTorch Linear default init, per model from the
run key) as a pytree operation: `widened_forward` applies the model and appends
``features @ w_C + b_C`` on the head's input. The whole widened network is trained with
cross-entropy towards the extra label C on forget batches (10 epochs over the forget loader =
the reference's 10 x len(forget_loader) iterations; SGD lr 1e-5, momentum 0.9, wd 5e-4, BatchNorm
in train mode, constant lr). Then rows 0..C-1 of the widened classifier are copied into a copy of
the original; the updated feature extractor (and its BatchNorm statistics) is discarded, as the
reference does (unlike the paper, which keeps the fine-tuned network: iam-spec 12.21).
``faithful``: the reference's widened ResNet backbone lacks the stem ReLU (`drops_stem_relu`); for
other architectures (and the ImageNet-stem ResNet, whose torchvision children keep the ReLU) the
flag changes nothing."""


# --------------------------------------------------------------------------------------------
# Importance passes (SSD) and the empirical Fisher (iam_fisher)
# --------------------------------------------------------------------------------------------


def _importance_step(model, recipe, spec: _LoaderSpec, source: str, carry, orders, key, hp,
                     images, labels, step_index, epoch, lr_factor):
  """SSD's ``calc_importance`` for one batch: grads of the batch-mean CE, clipped to global norm 1
  (``clip_grad_norm_``: factor min(1, 1 / (norm + 1e-6))), squared and summed; counts batches."""
  del hp, epoch, lr_factor
  params, stats, total, count = carry
  x, y, valid, drop_key = base.loader_inputs(recipe, orders[source], step_index,
                                             spec.batch_size, key, images, labels, spec.augment)

  def ce(p):
    logits, new_stats = base.forward(model, recipe, p, stats, x, valid, training=spec.bn_train,
                                     key=drop_key)
    return base.masked_mean(base.cross_entropy(logits, y), valid), new_stats

  grads, stats = jax.grad(ce, has_aux=True)(params)
  factor = jnp.minimum(1.0, 1.0 / (optax.tree.norm(grads) + 1e-6))
  total = jax.tree.map(lambda t, g: t + (g * factor) ** 2, total, grads)
  return base.keep_if_empty(valid, (params, stats, total, count + 1), carry), {}


def _importances(ctx, params, stats, sets, spec, key):
  """Mean squared clipped gradient over the batches of ``sets`` (per model), and the BN stats."""
  carry = (params, stats, base.tree_zeros_like(params), jnp.zeros((ctx.num_models,), jnp.int32))
  params, stats, total, count = base.run_epochs(
      ctx, _importance_step, (ctx.model, ctx.recipe, spec, "data"), carry,
      {"data": (sets, spec.batch_size, False)}, _no_hp(ctx), key, 1)
  def mean(t):
    return t / jnp.maximum(count, 1).reshape((-1,) + (1,) * (t.ndim - 1))
  return jax.tree.map(mean, total), stats


def ssd_dampen(params, imp_forget, imp_full, alpha, dampening, exponent=1.0, lower_bound=1.0):
  """Foster et al.'s ``modify_weight``: where I_f > alpha * I_D, theta *= min((lambda I_D /
  I_f)^exponent, lower_bound). Works on stacked trees with per-model [N] alpha / dampening."""
  def damp(p, i_f, i_d):
    shape = (-1,) + (1,) * (p.ndim - 1)
    a, lam = jnp.reshape(alpha, shape), jnp.reshape(dampening, shape)
    where = i_f > a * i_d
    weight = (lam * i_d / jnp.where(where, i_f, 1.0)) ** exponent
    return jnp.where(where, p * jnp.minimum(weight, lower_bound), p)
  return jax.tree.map(damp, params, imp_forget, imp_full)


def _ssd(ctx: base.Context, hp, key) -> dict:
  spec = _LoaderSpec(hp.batch_size, hp.augment, True)
  params = base.copy_tree(ctx.originals["params"])
  stats = base.copy_tree(ctx.originals.get("batch_stats", {}))
  imp_f, stats = _importances(ctx, params, stats, ctx.forget, spec, jax.random.fold_in(key, 1))
  imp_d, stats = _importances(ctx, params, stats, _union_sets(ctx.retain, ctx.forget), spec,
                              jax.random.fold_in(key, 2))
  hpm = base.per_model(hp, ("selection_weighting", "dampening_constant"), ctx.num_models)
  params = ssd_dampen(params, imp_f, imp_d, hpm["selection_weighting"],
                      hpm["dampening_constant"], float(hp.exponent), float(hp.lower_bound))
  return train.as_variables(params, stats)


SSD = base.register(base.Method(
    name="ssd", paper_name="SSD", reference="iam-spec 8 (`ssd`), 12.21",
    defaults={"selection_weighting": 10.0, "dampening_constant": 1.0, "exponent": 1.0,
              "lower_bound": 1.0, "batch_size": 128, "augment": True},
    space={}, uses=("retain", "forget"), unlearn=_ssd))
_ssd.__doc__ = """Selective Synaptic Dampening (iam-spec 8 `ssd`; Foster et al.).

Importances I = mean over batches of the squared gradient of the batch-mean CE, each batch's
gradient clipped to global norm 1. I_f on the forget set, then I_D on retain followed by forget
(ConcatDataset order), batch 128, not shuffled, forward passes in train mode as the reference (so
the BatchNorm running statistics move through both passes and the returned model keeps them).
Every parameter entry with I_f > alpha I_D becomes theta * min((lambda I_D / I_f)^exponent, 1).
alpha (``selection_weighting``) is 60 for cifar10 / cifar100 and 10 otherwise in IAM: the default
here is 10 and the IAM config sets 60 for those datasets. The reference's unused lr is dropped."""


@dataclasses.dataclass(frozen=True)
class _FisherSpec:
  batch_size: int = 32
  augment: bool = True
  bn_train: bool = True


def _fisher_step(model, recipe, spec: _FisherSpec, carry, orders, key, hp, images, labels,
                 step_index, epoch, lr_factor):
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


def _torch_axes(path, leaf) -> tuple[int, int | None]:
  """(axis of PyTorch's dim 0, axis of its dim 1) of one model's leaf: Flax kernels are
  [..., in, out] (PyTorch [out, in, ...]); other leaves share PyTorch's layout."""
  if path[-1] == "kernel" and leaf.ndim >= 2:
    return leaf.ndim - 1, leaf.ndim - 2
  return 0, (1 if leaf.ndim > 1 else None)


def fisher_mean_var(params, fisher, absent, alpha, num_classes: int):
  """One model's (mu, var) of Golatkar's ``get_mean_var`` as IAM runs it (iam-spec 8).

  var = clamp(1 / (F + 1e-8), max=1e3), clamped at 1e2 when PyTorch's shape[0] == C; times alpha;
  for ndim > 1 averaged over PyTorch's dim 1; at classes absent from the retain set (``absent``
  [C] bool; one_class) of a C-sized shape[0]: mu = 0 and var = 1e-4; then var x 10 where
  shape[0] == C or ndim == 1. mu = theta.
  """
  def one(path, p, f):
    path = tuple(k.key for k in path)
    out_axis, in_axis = _torch_axes(path, p)
    is_c = p.shape[out_axis] == num_classes
    var = jnp.minimum(1.0 / (f + 1e-8), 1e3)
    if is_c:
      var = jnp.minimum(var, 1e2)
    var = alpha * var
    if in_axis is not None:
      var = jnp.broadcast_to(jnp.mean(var, axis=in_axis, keepdims=True), p.shape)
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
  spec = _FisherSpec(hp.batch_size, hp.augment, True)
  params = base.copy_tree(ctx.originals["params"])
  stats = base.copy_tree(ctx.originals.get("batch_stats", {}))
  carry = (params, stats, base.tree_zeros_like(params), jnp.zeros((ctx.num_models,), jnp.int32))
  params, stats, total, count = base.run_epochs(
      ctx, _fisher_step, (ctx.model, ctx.recipe, spec), carry,
      {"retain": (ctx.retain, hp.batch_size, False)}, _no_hp(ctx), jax.random.fold_in(key, 1), 1)
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


# --------------------------------------------------------------------------------------------
# Forsaken (iam-spec 8 `forsaken`)
# --------------------------------------------------------------------------------------------

HIDDEN = 64


def _uniform_chunk(key, index, shape, bound):
  return jax.random.uniform(jax.random.fold_in(key, index), shape, jnp.float32, -bound, bound)


def generator_keys(key):
  """(W1, b1, W2, b2) keys of the generator Linear(P + C, 64)-ReLU-Linear(64, P)."""
  return tuple(jax.random.split(key, 4))


def generator_apply(key, theta, out, chunk: int, gen=None):
  """v = W2 (g * ReLU(W1 [theta; out] + b1 + Wo out)) + s * b2, with W1 [64, P+C], W2 [P, 64], b1,
  b2 drawn with PyTorch's Linear default init (U(+-1/sqrt(fan_in))) *chunk-wise* from ``key``:
  rows k*chunk..(k+1)*chunk of W1^T (over [theta; out]) and of W2 / b2 come from
  fold_in(key_i, k), so no |theta| x 64 matrix is ever held. ``gen`` (trainable, optional): Wo
  [C, 64] added to W1's output part, g [64], s [] (zeros / ones give the random generator)."""
  k1, kb1, k2, kb2 = generator_keys(key)
  p = theta.shape[0]
  x = jnp.concatenate([theta, out])
  n1 = -(-x.shape[0] // chunk)
  xs = jnp.pad(x, (0, n1 * chunk - x.shape[0])).reshape(n1, chunk)
  bound1 = x.shape[0] ** -0.5

  @jax.checkpoint
  def first(acc, args):
    k, xk = args
    return acc + xk @ _uniform_chunk(k1, k, (chunk, HIDDEN), bound1), None

  pre, _ = jax.lax.scan(first, jnp.zeros((HIDDEN,)), (jnp.arange(n1), xs))
  pre = pre + jax.random.uniform(kb1, (HIDDEN,), jnp.float32, -bound1, bound1)
  if gen is not None:
    pre = pre + out @ gen["out_weights"]
  h = jax.nn.relu(pre) * (gen["gains"] if gen is not None else 1.0)
  n2 = -(-p // chunk)
  bound2 = HIDDEN ** -0.5

  @jax.checkpoint
  def second(_, k):
    w = _uniform_chunk(k2, k, (chunk, HIDDEN), bound2)
    b = _uniform_chunk(kb2, k, (chunk,), bound2)
    return None, w @ h + b * (gen["bias_scale"] if gen is not None else 1.0)

  _, v = jax.lax.scan(second, None, jnp.arange(n2))
  return v.reshape(-1)[:p]


def class_confidence(logits, labels, valid, num_classes):
  """Per class: mean over the valid samples of that class of the max softmax probability, and
  whether the class occurs."""
  conf = jnp.max(jax.nn.softmax(logits), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes) * valid[:, None]
  counts = onehot.sum(0)
  return (onehot * conf[:, None]).sum(0) / jnp.maximum(counts, 1), counts > 0


def _bernoulli_kl(p, q, mask):
  p, q = jnp.clip(p, 1e-6, 1 - 1e-6), jnp.clip(q, 1e-6, 1 - 1e-6)
  kl = p * jnp.log(p / q) + (1 - p) * jnp.log((1 - p) / (1 - q))
  return (kl * mask).sum() / jnp.maximum(mask.sum(), 1)


@dataclasses.dataclass(frozen=True)
class _ForsakenSpec:
  num_classes: int
  batches: int = 10
  batch_size: int = 128
  chunk: int = 65536
  faithful: bool = False


def _profile(model, recipe, spec, params, stats, images, labels, idx, training):
  """Class confidences over ``idx`` [batches * batch_size] (-1 padding), batch by batch (train
  mode moves the BatchNorm statistics batch after batch as PyTorch's loader would)."""
  logits, ys, valids = [], [], []
  for b in range(idx.shape[0] // spec.batch_size):
    x, y, valid = base.inputs(recipe, images, labels,
                              idx[b * spec.batch_size:(b + 1) * spec.batch_size])
    out, new = base.forward(model, recipe, params, stats, x, valid, training=training)
    stats = jax.tree.map(lambda a, o: jnp.where(valid.any(), a, o), new, stats)
    logits.append(out), ys.append(y), valids.append(valid)
  conf, present = class_confidence(jnp.concatenate(logits), jnp.concatenate(ys),
                                   jnp.concatenate(valids), spec.num_classes)
  return conf, present, stats


def _forsaken_step(model, recipe, spec: _ForsakenSpec, carry, orders, key, hp, images, labels,
                   step_index, epoch, lr_factor):
  """One generator iteration: v = G(theta, forget confidences); theta' = theta - step v; loss =
  KL(D0 || forget at theta') + penalty * mean|v|; theta' is kept when its loss is the best so far;
  then an Adam step on the generator's trainable part (intended only)."""
  del key, step_index, epoch, lr_factor
  forget = orders["forget"]
  theta, stats, gen, best, best_loss, q0, present0, gen_key = carry
  flat, unravel = ravel_pytree(theta)
  q_f, present, stats = _profile(model, recipe, spec, theta, stats, images, labels, forget,
                                 spec.faithful)

  def loss_fn(g):
    v = generator_apply(gen_key, flat, q_f, spec.chunk, g)
    new = unravel(flat - hp["step"] * v)
    q_new, _, _ = _profile(model, recipe, spec, new, stats, images, labels, forget, False)
    loss = _bernoulli_kl(q0, q_new, present & present0) + hp["penalty"] * jnp.mean(jnp.abs(v))
    return loss, new

  (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen.params)
  better = loss < best_loss
  best = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, best)
  best_loss = jnp.where(better, loss, best_loss)
  if not spec.faithful:
    gen = base.descend(gen, base.along(grads, {}), jnp.ones((1,), bool),
                       {**hp, "momentum": 0.0}, 1.0, optimizer_kind="adam", weight_decay=0.0)
  return (new, stats, gen, best, best_loss, q0, present0, gen_key), {}


def _forsaken_init(model, recipe, spec, params, stats, val_order, retain_order, images, labels):
  """D0 confidences on the first batches of the held-out set; ``faithful`` then also runs the
  reference's train-mode passes over retain batches (BatchNorm drift only)."""
  q0, present0, stats = _profile(model, recipe, spec, params, stats, images, labels, val_order,
                                 spec.faithful)
  if spec.faithful:
    _, _, stats = _profile(model, recipe, spec, params, stats, images, labels, retain_order, True)
  return stats, q0, present0


def _padded_prefix(sets, n):
  out = np.full((sets.shape[0], n), -1, np.int32)
  m = min(n, sets.shape[1])
  out[:, :m] = sets[:, :m]
  return out


def _forsaken(ctx: base.Context, hp, key) -> dict:
  spec = _ForsakenSpec(ctx.num_classes, hp.batches, hp.batch_size, hp.chunk, bool(hp.faithful))
  n = spec.batches * spec.batch_size
  params = base.copy_tree(ctx.originals["params"])
  stats = base.copy_tree(ctx.originals.get("batch_stats", {}))
  stats, q0, present0 = base.stack_map(
      ctx, _forsaken_init, (ctx.model, ctx.recipe, spec), params, stats,
      jnp.asarray(_padded_prefix(ctx.val, n)), jnp.asarray(_padded_prefix(ctx.retain, n)),
      shared=(ctx.data.inputs, ctx.data.labels))
  gen = base.stacked({"out_weights": jnp.zeros((ctx.num_classes, HIDDEN)),
                      "gains": jnp.ones((HIDDEN,)), "bias_scale": jnp.ones(())}, ctx.num_models)
  carry = (params, stats, base.TrainCarry.create({"params": gen}, "adam"), base.copy_tree(params),
           jnp.full((ctx.num_models,), 1e5, jnp.float32), q0, present0,
           generator_key(ctx, key))
  epochs = 1 if spec.faithful else hp.num_epochs
  hpm = base.per_model(hp, ("step", "penalty", "learning_rate"), ctx.num_models)
  carry = base.run_epochs(ctx, _forsaken_step, (ctx.model, ctx.recipe, spec), carry,
                          {"forget": (_padded_prefix(ctx.forget, n), n, False)},
                          hpm, jax.random.fold_in(key, 4), epochs, num_steps=1)
  return train.as_variables(carry[3], carry[1])


def generator_key(ctx: base.Context, key) -> jax.Array:
  """Each model's generator key (the random part of the generator, fixed over iterations)."""
  return ctx.keys(jax.random.fold_in(key, 3))


FORSAKEN = base.register(base.Method(
    name="forsaken", paper_name="Forsaken", reference="iam-spec 8 (`forsaken`), 12.21",
    defaults={"num_epochs": 100, "batches": 10, "batch_size": 128, "step": 0.01,
              "penalty": 0.01, "learning_rate": 1e-4, "chunk": 65536, "faithful": False},
    space={}, uses=("retain", "forget", "val"), unlearn=_forsaken))
_forsaken.__doc__ = """Forsaken, mask gradients (iam-spec 8 `forsaken`; Ma et al., neuron masking).

D0 = the first ``batches`` x 128 samples of the held-out (val) set stands for the reference's test
loader. A sample set's profile is, per class, the mean max-softmax probability of its samples
(`class_confidence`). The generator Linear(P + C, 64)-ReLU-Linear(64, P) maps [theta; forget
profile] to a mask gradient v; theta <- theta - 0.01 v; loss = mean over classes present in both
sets of the Bernoulli KL(D0 profile || forget profile at the new theta) + 0.01 mean|v|. The
generator's weights are never held: `generator_apply` draws them chunk-wise from a per-model key.
Intended: ``num_epochs`` iterations, eval-mode BatchNorm, the generator's trainable part (the
output-profile weights of its first layer, per-hidden-unit gains, the scale of its output bias;
its |theta| x 64 random matrices stay fixed) takes an Adam(1e-4) step each iteration, and the
theta with the lowest loss is returned.
``faithful``: the reference's effective behaviour: its best loss starts at 1e5, so the first
iteration returns: one step theta - 0.01 v of a randomly initialised generator, after train-mode
passes over the D0 batches, the retain batches and the forget batches (BatchNorm drift).
Interpretations: the profile ("class-averaged max-logit probabilities"), the KL between profiles
and the penalty's weight (the spec's omega, taken as 1 / |theta|, i.e. mean|v|) are not fully
specified; the forget profile uses at most ``batches`` x 128 forget samples; the reference's Adam
updates parameters it never uses."""
