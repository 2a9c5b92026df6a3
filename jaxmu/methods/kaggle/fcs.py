"""FCS (deepunlearn-spec 4.14, reference ``kgltop1``): a forget-set pull to the uniform output, then
per epoch a contrastive forget round and a retain round, each with its own SGD state (`_fcs`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmu.methods import base


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
