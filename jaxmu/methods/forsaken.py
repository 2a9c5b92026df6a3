"""Forsaken, mask gradients (iam-spec 8 `forsaken`, 12.21; Ma et al., "Learn to forget", neuron
masking): a generator maps the parameters and the forget set's class-confidence profile to a
mask gradient; see `_forsaken`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxmu import train
from jaxmu.methods import base

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
