"""Relabelling methods: SRL, SalUn (deepunlearn-spec 4.5, 4.8) and IAM's boundary expanding.

SRL and SalUn train on retain ∪ randomly relabelled forget. Both build, for every model, one
*discernible* index set: its retain indices followed by its forget indices offset by the dataset
size (`combined_sets`), so a batch knows which samples come from the forget set
(`split_combined`). A forget sample's label is replaced by a uniform draw over
all C classes (the true class included, as the reference's ``RandomRelabelDataset``), drawn anew
for every model (its own key), every epoch and every sample (`forget_labels`).

SalUn first computes a saliency mask from forget gradients (`saliency_mask`) and multiplies every
training gradient by it; weight decay and momentum still move masked-out weights, as in PyTorch.

Also home of the helpers the other retain ∪ forget methods share (BT, negative_gradient).

Boundary expanding (iam-spec 8 `boundary_expanding`) relabels every forget sample to an extra
class C of a widened classifier (`widened_forward`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmu import models, train
from jaxmu.models import resnet
from jaxmu.methods import base

LABEL_TAG = 0x5EED  # fold-in tag of the random-label stream within a model's epoch key
MASK_TAG = 0x3A5C  # fold-in tag of the saliency pass


# --------------------------------------------------------------------------------------------
# Discernible retain ∪ forget sets (shared with BT and negative_gradient)
# --------------------------------------------------------------------------------------------


def combined_sets(ctx: base.Context) -> np.ndarray:
  """[N, Lr + Lf] per-model retain ∪ forget; forget entries are offset by the dataset size, -1 pads.

  Padding in the middle is harmless: epoch orders put every -1 at the end.
  """
  n = int(ctx.data.labels.shape[0])
  forget = np.where(ctx.forget >= 0, ctx.forget + n, -1)
  return np.concatenate([ctx.retain, forget], axis=1).astype(np.int32)


def split_combined(idx: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
  """Dataset indices (-1 kept) and the forget flag of a batch of combined indices."""
  is_forget = idx >= num_samples
  return jnp.where(is_forget, idx - num_samples, idx), is_forget


def forget_labels(epoch_key: jax.Array, indices: jax.Array, num_classes: int) -> jax.Array:
  """A uniform label in [0, C) for each dataset index, fixed within a model's epoch.

  Drawn per sample (not per batch position), so a sample's label does not depend on the order.
  """
  base_key = jax.random.fold_in(epoch_key, LABEL_TAG)
  draw = lambda i: jax.random.randint(jax.random.fold_in(base_key, i), (), 0, num_classes)  # noqa: E731
  return jax.vmap(draw)(jnp.maximum(indices, 0).astype(jnp.uint32))


def attention_bias_mask(params):
  """True at TinyViT's ``attention_biases`` leaves (stacked trees work too)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "attention_biases" for k in path), params)


# --------------------------------------------------------------------------------------------
# Random-label training (SRL; SalUn with a gradient mask)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RelabelSpec:
  batch_size: int
  num_classes: int
  masked: bool = False  # multiply gradients by the carry's mask (SalUn)


def relabel_step(model, recipe, spec: RelabelSpec, carry, orders, key, hp, images, labels,
                 step_index, epoch, lr_factor):
  """One CE step on a shuffled batch of retain ∪ relabelled forget, BatchNorm in train mode."""
  del epoch
  state, mask = carry
  idx = base.batch(orders["combined"], step_index, spec.batch_size)
  real, is_forget = split_combined(idx, images.shape[0])
  x, y, valid = base.inputs(recipe, images, labels, real)
  y = jnp.where(is_forget, forget_labels(key, real, spec.num_classes), y)
  new = base.descend_on_logits(
      model, recipe, state, x, valid, jax.random.fold_in(key, step_index),
      lambda logits: base.masked_mean(base.cross_entropy(logits, y), valid), hp, lr_factor,
      grad_scale=mask if spec.masked else None)
  return (new, mask), {}


def relabel_train(ctx: base.Context, variables, hp, key, epochs: int, batch_size: int,
                  mask=None) -> dict:
  """``epochs`` passes of random-label training over each model's retain ∪ forget."""
  spec = RelabelSpec(batch_size, ctx.num_classes, masked=mask is not None)
  carry = (base.TrainCarry.create(variables), mask)
  sources = {"combined": (combined_sets(ctx), batch_size, True)}
  hps = base.per_model(hp, ("learning_rate", "weight_decay", "momentum"), ctx.num_models)
  carry = base.run_epochs(ctx, relabel_step, (ctx.model, ctx.recipe, spec), carry, sources, hps,
                          key, epochs)
  return carry[0].variables


def _srl(ctx: base.Context, hp, key) -> dict:
  """SRL (deepunlearn-spec 4.5): each epoch one shuffled pass (batch_size) over retain ∪ forget,
  forget labels uniform over all C classes (true class included), CE, BatchNorm in train mode,
  SGD with coupled weight decay, no scheduler (the reference ignores its configured cosine).

  Deviation: labels come from the run's key, per model, per epoch and per sample, instead of a
  numpy RandomState(123) re-seeded every epoch (same distribution; the reference repeats one
  label sequence every epoch and assigns it by loader position). No dataset deep copy.
  """
  return relabel_train(ctx, ctx.originals, hp, key, hp.num_epochs, hp.batch_size)


SRL = base.register(base.Method(
    name="random_labels", paper_name="SRL", reference="deepunlearn-spec 4.5",
    defaults={"num_epochs": 5, "batch_size": 256, "learning_rate": 0.1, "momentum": 0.9,
              "weight_decay": 5e-4},
    space=base.COMMON5, uses=("retain", "forget"), unlearn=_srl,
    aliases=("successive_random_labels",)))


# --------------------------------------------------------------------------------------------
# SalUn
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SaliencySpec:
  batch_size: int
  faithful: bool  # the reference's accumulated (never zeroed) gradients


def accumulate(saliency, running, grads, faithful: bool):
  """Adds one forget batch's gradient. Intended: G = Σ_j g_j. Faithful: the reference never zeros
  the probe model's gradients, so after batch i the gradient read is Σ_{j≤i} g_j and
  G = Σ_j (n_b − j + 1) g_j."""
  if faithful:
    running = jax.tree.map(jnp.add, running, grads)
    return jax.tree.map(jnp.add, saliency, running), running
  return jax.tree.map(jnp.add, saliency, grads), running


def saliency_step(model, recipe, spec: SaliencySpec, carry, orders, key, hp, images, labels,
                  step_index, epoch, lr_factor):
  """Gradient of −CE on one forget batch, BatchNorm in eval mode; accumulated into G."""
  del key, hp, epoch, lr_factor
  variables, saliency, running = carry
  idx = base.batch(orders["forget"], step_index, spec.batch_size)
  x, y, valid = base.inputs(recipe, images, labels, idx)

  def loss_fn(params):
    logits, _ = base.forward(model, recipe, params, variables.get("batch_stats", {}), x, valid,
                             training=False)
    return -base.masked_mean(base.cross_entropy(logits, y), valid)

  grads = jax.grad(loss_fn)(variables["params"])
  new = accumulate(saliency, running, grads, spec.faithful)
  return (variables, *base.keep_if_empty(valid, new, (saliency, running))), {}


def top_fraction_mask(saliency, count: jax.Array):
  """1.0 at the ``count`` entries of largest |G| over all leaves (global ranking), else 0.0.

  Ties are broken by position in the flattened tree (a stable sort), deterministically.
  """
  leaves, treedef = jax.tree.flatten(saliency)
  flat = jnp.concatenate([jnp.abs(leaf).ravel() for leaf in leaves])
  order = jnp.argsort(-flat, stable=True)
  keep = jnp.zeros(flat.shape, jnp.float32).at[order].set(
      (jnp.arange(flat.size) < count).astype(jnp.float32))
  out, start = [], 0
  for leaf in leaves:
    out.append(keep[start:start + leaf.size].reshape(leaf.shape))
    start += leaf.size
  return jax.tree.unflatten(treedef, out)


def saliency_mask(ctx: base.Context, hp, key) -> tuple[dict, dict]:
  """(mask, G) per model: G from one pass over the forget set (shuffled, batch_size, eval mode),
  mask = top ``int(threshold * n_params)`` entries by |G| (deepunlearn-spec 4.8 step 1)."""
  spec = SaliencySpec(hp.batch_size, bool(hp.faithful))
  params = ctx.originals["params"]
  carry = (base.copy_tree(ctx.originals), base.tree_zeros_like(params),
           base.tree_zeros_like(params))
  sources = {"forget": (ctx.forget, hp.batch_size, True)}
  hps = base.per_model(hp, ("threshold",), ctx.num_models)  # unused by the step
  carry = base.run_epochs(ctx, saliency_step, (ctx.model, ctx.recipe, spec), carry, sources, hps,
                          jax.random.fold_in(key, MASK_TAG), 1)
  saliency = carry[1]
  if spec.faithful:  # TinyViT's cached eval-mode bias gets no gradient in the reference
    saliency = base.select(attention_bias_mask(saliency), base.tree_zeros_like(saliency), saliency)
  n_params = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(params))
  threshold = np.broadcast_to(np.asarray(hp.threshold, np.float64), (ctx.num_models,))
  counts = jnp.asarray(np.floor(n_params * threshold), jnp.int32)  # the reference's int(n * t)
  mask = base.stack_map(ctx, top_fraction_mask, (), saliency, counts)
  return mask, saliency


def _salun(ctx: base.Context, hp, key) -> dict:
  """SalUn (deepunlearn-spec 4.8): saliency mask from forget gradients of −CE (eval mode), the top
  ``threshold`` fraction of all parameters by |G| kept (global ranking), then SRL's random-label
  training with every gradient multiplied by the mask (decay and momentum still apply to
  masked-out weights, as PyTorch's SGD does with a zeroed gradient).

  Deviations: G = Σ_j g_j over forget batches (the intended saliency); ``faithful=True`` gives
  the reference's accumulated G = Σ_j (n_b − j + 1) g_j (deepunlearn-spec 10.14: zero_grad on the
  wrong optimiser) and zero saliency for TinyViT's ``attention_biases`` (no gradient through the
  reference's cached eval-mode bias). ``mask_*`` are inert, kept in the search space as the
  reference searched them. Ties in |G| are broken by tree position (torch: unspecified).
  """
  mask, _ = saliency_mask(ctx, hp, key)
  return relabel_train(ctx, ctx.originals, hp, key, hp.num_epochs, hp.batch_size, mask=mask)


SALUN = base.register(base.Method(
    name="salun", paper_name="SalUn", reference="deepunlearn-spec 4.8",
    defaults={"num_epochs": 10, "batch_size": 256, "threshold": 0.5, "learning_rate": 0.01,
              "momentum": 0.0, "weight_decay": 0.0, "mask_learning_rate": 0.01,
              "mask_momentum": 0.9, "mask_weight_decay": 5e-4, "faithful": False},
    space={**base.COMMON5, "threshold": "float", "mask_learning_rate": "learning_rate",
           "mask_momentum": "momentum", "mask_weight_decay": "weight_decay"},
    uses=("retain", "forget"), unlearn=_salun))


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


def _boundary_step(model, recipe, spec: base.LoaderSpec, carry, orders, key, hp, images, labels,
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
  spec = base.LoaderSpec(hp.batch_size, hp.augment, True, bool(hp.faithful))
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
