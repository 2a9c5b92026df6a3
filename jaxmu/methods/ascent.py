"""Gradient-ascent methods: GA, NG+, negative_gradient (deepunlearn-spec 4.4, 4.6, 4.21) and
IAM's iam_ascent (iam-spec 8 `ascent`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmu import train
from jaxmu.methods import base, relabel

HP = ("learning_rate", "weight_decay", "momentum")


# --------------------------------------------------------------------------------------------
# GA
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AscentSpec:
  batch_size: int


def ga_step(model, recipe, spec: AscentSpec, carry, orders, key, hp, images, labels, step_index,
            epoch, lr_factor):
  """One SGD step minimising −CE on a shuffled forget batch, BatchNorm in train mode."""
  del epoch
  idx = base.batch(orders["forget"], step_index, spec.batch_size)
  x, y, valid = base.inputs(recipe, images, labels, idx)

  return base.descend_on_logits(
      model, recipe, carry, x, valid, jax.random.fold_in(key, step_index),
      lambda logits: -base.masked_mean(base.cross_entropy(logits, y), valid), hp, lr_factor), {}


def _gradient_ascent(ctx: base.Context, hp, key) -> dict:
  """GA (deepunlearn-spec 4.4): ``num_epochs`` shuffled passes over the forget set minimising
  −CE (no retain data, no clipping), BatchNorm in train mode, SGD with coupled weight decay, no
  scheduler. No deviation."""
  carry = base.TrainCarry.create(ctx.originals)
  sources = {"forget": (ctx.forget, hp.batch_size, True)}
  carry = base.run_epochs(ctx, ga_step, (ctx.model, ctx.recipe, AscentSpec(hp.batch_size)), carry,
                          sources, base.per_model(hp, HP, ctx.num_models), key, hp.num_epochs)
  return carry.variables


GRADIENT_ASCENT = base.register(base.Method(
    name="gradient_ascent", paper_name="GA", reference="deepunlearn-spec 4.4",
    defaults={"num_epochs": 10, "batch_size": 256, "learning_rate": 0.01, "momentum": 0.9,
              "weight_decay": 5e-4},
    space=base.COMMON5, uses=("forget",), unlearn=_gradient_ascent))


# --------------------------------------------------------------------------------------------
# NG+
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NegGradSpec:
  batch_size: int
  faithful: bool


def neggrad_loss(model, recipe, params, anchor, batch_stats, retain, forget, alpha, prox_weight):
  """α·(CE(retain) + (w/2)·Σ‖θ−θ_0‖²) − (1−α)·CE(forget), BatchNorm in eval mode."""
  (xr, yr, vr), (xf, yf, vf) = retain, forget
  logits_r, _ = base.forward(model, recipe, params, batch_stats, xr, vr, training=False)
  logits_f, _ = base.forward(model, recipe, params, batch_stats, xf, vf, training=False)
  sq = sum(jnp.sum((p - a) ** 2) for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))
  ce_r = base.masked_mean(base.cross_entropy(logits_r, yr), vr)
  ce_f = base.masked_mean(base.cross_entropy(logits_f, yf), vf)
  return alpha * (ce_r + prox_weight / 2 * sq) - (1 - alpha) * ce_f


def neggrad_step(model, recipe, spec: NegGradSpec, carry, orders, key, hp, images, labels,
                 step_index, epoch, lr_factor):
  """Retain batch ``step_index`` with the forget loader cycled (``itertools.cycle``)."""
  del key, epoch
  state, extras = carry
  retain = base.inputs(recipe, images, labels,
                       base.batch(orders["retain"], step_index, spec.batch_size))
  forget = base.inputs(recipe, images, labels,
                       base.batch(orders["forget"], step_index, spec.batch_size, cycle=True))
  # Faithful: the reference's proximal weight is a dead class attribute (0.0) and the optimiser
  # gets the searched weight decay; intended: the searched weight_decay is the proximal weight.
  prox = 0.0 if spec.faithful else hp["weight_decay"]
  decay = hp["weight_decay"] if spec.faithful else 0.0

  def loss_fn(params):
    return neggrad_loss(model, recipe, params, extras["anchor"], state.batch_stats, retain, forget,
                        hp["alpha"], prox), state.batch_stats

  new = base.descend(state, loss_fn, retain[2], hp, lr_factor, weight_decay=decay,
                     trainable=extras["trainable"])
  return (new, extras), {}


def _neggrad_plus(ctx: base.Context, hp, key) -> dict:
  """NG+ (deepunlearn-spec 4.6): ``num_epochs`` passes over the shuffled retain set zipped with
  the cycled shuffled forget set, loss α·(CE_r + (w/2)·‖θ−θ_orig‖²) − (1−α)·CE_f, BatchNorm in
  **eval** mode (running statistics used, never updated; no stochastic depth), SGD, no scheduler.

  Deviation (deepunlearn-spec 10.13): the reference's proximal weight is a non-field class
  attribute fixed at 0.0 (the term is dead) while the optimiser applies the searched
  ``weight_decay`` as coupled L2 towards zero. Here (intended, SCRUB's NegGrad+) the searched
  ``weight_decay`` is the proximal weight w, pulling towards the original weights, and the
  optimiser applies no decay (using it in both places would count it twice). ``faithful=True``
  restores the reference: w = 0, coupled decay = ``weight_decay``, and TinyViT's
  ``attention_biases`` frozen (the reference's cached eval-mode bias gets no gradient). The
  default ``weight_decay`` is 0.0, so both variants agree at the defaults.
  """
  faithful = bool(hp.faithful)
  params = ctx.originals["params"]
  trainable = None
  if faithful:
    trainable = jax.tree.map(lambda frozen, x: jnp.full(x.shape[:1], not frozen),
                             relabel.attention_bias_mask(params), params)  # [N] per leaf
  extras = {"anchor": base.copy_tree(params), "trainable": trainable}
  carry = (base.TrainCarry.create(ctx.originals), extras)
  sources = {"retain": (ctx.retain, hp.batch_size, True),
             "forget": (ctx.forget, hp.batch_size, True)}
  spec = NegGradSpec(hp.batch_size, faithful)
  carry = base.run_epochs(ctx, neggrad_step, (ctx.model, ctx.recipe, spec), carry, sources,
                          base.per_model(hp, HP + ("alpha",), ctx.num_models), key, hp.num_epochs)
  return carry[0].variables


NEGGRAD_PLUS = base.register(base.Method(
    name="neggrad_plus", paper_name="NG+", reference="deepunlearn-spec 4.6",
    defaults={"num_epochs": 10, "batch_size": 256, "alpha": 0.95, "learning_rate": 0.01,
              "momentum": 0.9, "weight_decay": 0.0, "faithful": False},
    space={**base.COMMON5, "alpha": "float"}, uses=("retain", "forget"), unlearn=_neggrad_plus,
    aliases=("neggradplus",)))


# --------------------------------------------------------------------------------------------
# negative_gradient (outside the reference pipeline)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NegativeGradientSpec:
  batch_size: int


def negative_gradient_loss(logits, y, is_forget, valid):
  """Per-sample CE, forget losses negated, each clamped to [0, 1/C], mean over the batch."""
  losses = base.cross_entropy(logits, y)
  losses = jnp.where(is_forget, -losses, losses)
  return base.masked_mean(jnp.clip(losses, 0.0, 1.0 / logits.shape[-1]), valid)


def negative_gradient_step(model, recipe, spec: NegativeGradientSpec, carry, orders, key, hp,
                           images, labels, step_index, epoch, lr_factor):
  del epoch
  idx = base.batch(orders["combined"], step_index, spec.batch_size)
  real, is_forget = relabel.split_combined(idx, images.shape[0])
  x, y, valid = base.inputs(recipe, images, labels, real)

  return base.descend_on_logits(
      model, recipe, carry, x, valid, jax.random.fold_in(key, step_index),
      lambda logits: negative_gradient_loss(logits, y, is_forget, valid), hp, lr_factor), {}


def _negative_gradient(ctx: base.Context, hp, key) -> dict:
  """negative_gradient (deepunlearn-spec 4.21, outside the reference pipeline; its
  `DefaultUnlearnerConfig`): shuffled passes over retain ∪ forget, per-sample CE with forget
  losses negated and every loss clamped to [0, 1/C], batch mean, BatchNorm in train mode, SGD,
  per-epoch cosine schedule. Reproduced as written: a negated forget loss is <= 0 and clamps to
  0 (no gradient), so only retain samples with CE < 1/C train. No deviation."""
  carry = base.TrainCarry.create(ctx.originals)
  sources = {"combined": (relabel.combined_sets(ctx), hp.batch_size, True)}
  spec = NegativeGradientSpec(hp.batch_size)
  carry = base.run_epochs(ctx, negative_gradient_step, (ctx.model, ctx.recipe, spec), carry,
                          sources, base.per_model(hp, HP, ctx.num_models), key, hp.num_epochs,
                          lr_factor=base.cosine(hp.num_epochs))
  return carry.variables


NEGATIVE_GRADIENT = base.register(base.Method(
    name="negative_gradient", paper_name="NG", reference="deepunlearn-spec 4.21",
    defaults={"num_epochs": 5, "batch_size": 256, "learning_rate": 0.1, "momentum": 0.9,
              "weight_decay": 5e-4},
    space=base.COMMON5, uses=("retain", "forget"), unlearn=_negative_gradient))


# --------------------------------------------------------------------------------------------
# IAM's gradient ascent (iam-spec 8 `ascent`)
# --------------------------------------------------------------------------------------------


def _ascent_step(model, recipe, spec: base.LoaderSpec, carry, orders, key, hp, images, labels,
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
  spec = base.LoaderSpec(hp.batch_size, hp.augment, True, bool(hp.faithful))
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
