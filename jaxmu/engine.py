"""The one epoch driver: every stack of models that takes optimisation steps runs through here.

Training (`jaxmu.train.fit`), every unlearning method (`jaxmu.methods`) and airbench
(`jaxmu.airbench`) supply a pure per-model step and call `epochs`; the driver owns the
rest:

- **epoch orders** per data source (`Source`): each model's index set shuffled from its own PRNG
  stream (or kept in order), padded with -1 to whole batches;
- **PRNG streams**: model m's epoch key is ``fold_in(fold_in(key, model_id), epoch)``; source i's
  order key and the step key derive from it as `Streams` says;
- the **strategy** (`jaxmu.parallel.Strategy`: vmap, loop or sharded) and, per strategy,
  **per-step dispatch** or **a whole epoch as one compiled program** (``lax.fori_loop`` over the
  steps, state donated; `parallel.Strategy.scans`);
- **metrics**: a step returns a dict of per-model scalars; the driver sums them over the epoch.

A step is a module-level pure function of one model::

    step(*statics, carry, orders, key, hp, images, labels, step_index, epoch, lr_factor)
        -> (carry, metrics)

``statics`` are hashable (model, recipe, static options): compiled programs are cached per
(step, statics, strategy, steps per epoch), so runs that differ only in per-model numbers (``hp``,
data, keys) share them. ``orders`` maps each source name to the model's epoch order (slice it with
`batch`); ``key`` is the model's step key for this epoch (fold in the step index); ``hp`` is a
pytree of per-model arrays; ``epoch`` is an int32 and ``lr_factor`` a float32 computed on the host.
A step must change nothing on an all-padding batch: a model with fewer steps than its
stack-mates then equals the same model run alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmu import parallel


class Source(NamedTuple):
  """One data source of a phase: index sets [N, L] (-1 padded), its batch size, shuffled or not."""

  index_sets: Any
  batch_size: int
  shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class Streams:
  """How a model's epoch key yields its order keys and its step key: source i orders with
  ``fold_in(epoch_key, order_salt + i)``; steps use ``fold_in(epoch_key, step_salt)``, or the epoch
  key itself when ``step_salt`` is None. Two conventions exist so that the numbers of earlier
  versions stay as they were: training and airbench use `TRAINING`, unlearning `METHODS`."""

  order_salt: int
  step_salt: int | None


TRAINING = Streams(order_salt=0, step_salt=1)
METHODS = Streams(order_salt=1000, step_salt=None)


def batch(order: jax.Array, step_index, batch_size: int, cycle: bool = False) -> jax.Array:
  """Batch ``step_index`` of an epoch order (-1 = padding). ``cycle`` wraps around the model's
  own number of batches (``itertools.cycle`` over a shorter loader)."""
  if cycle:
    steps = jnp.maximum(-(-(order >= 0).sum() // batch_size), 1)
    step_index = step_index % steps
  return jax.lax.dynamic_slice(order, (step_index * batch_size,), (batch_size,))


def shuffled_order(index_set: jax.Array, key: jax.Array, batch_size: int) -> jax.Array:
  """A random permutation of the valid (>= 0) entries, padded with -1 to whole batches.

  Random keys are drawn for every slot, so the permutation of a model's n valid indices does not
  depend on how long its padded row is (threefry draws are prefix-stable).
  """
  valid = index_set >= 0
  u = jnp.where(valid, jax.random.uniform(key, index_set.shape), 2.0)
  return _pad_to_batches(index_set[jnp.argsort(u)], batch_size)


def _pad_to_batches(order: jax.Array, batch_size: int) -> jax.Array:
  steps = -(-order.shape[0] // batch_size)
  return jnp.pad(order, (0, steps * batch_size - order.shape[0]), constant_values=-1)


@functools.lru_cache(maxsize=None)
def compiled_orders(batch_size: int, shuffle: bool = True) -> Callable:
  """Stacked ``(index_sets [N, L], keys [N]) -> orders [N, ceil(L / B) * B]``."""
  if shuffle:
    return jax.jit(jax.vmap(lambda s, k: shuffled_order(s, k, batch_size)))
  return jax.jit(jax.vmap(lambda s, k: _pad_to_batches(s, batch_size)))


def steps_per_epoch(index_sets, batch_size: int) -> int:
  """Batches in an epoch over the longest index set of the stack (ceil, drop_last=False)."""
  return max(math.ceil(int(np.shape(index_sets)[1]) / batch_size), 1)


def model_keys(key: jax.Array, model_ids) -> jax.Array:
  """Each model's own PRNG stream: ``fold_in(key, model_id)``."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(model_ids, jnp.uint32))


def _fold(keys: jax.Array, salt: int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)


_step_cap: int | None = None


@contextlib.contextmanager
def step_cap(max_steps: int):
  """Within the block every epoch stops after its first ``max_steps`` steps: the smoke runs' cost
  cap (`jaxmu.smoke`), which keeps the real data, split sizes and epochs. Not a training option:
  a capped epoch sees only part of its data."""
  global _step_cap
  if max_steps < 1:
    raise ValueError(f"step_cap: max_steps must be >= 1, got {max_steps}")
  saved, _step_cap = _step_cap, max_steps
  try:
    yield
  finally:
    _step_cap = saved


@functools.lru_cache(maxsize=None)
def _compiled_step(step: Callable, statics: tuple, strategy: parallel.Strategy) -> Callable:
  return strategy.compile(functools.partial(step, *statics), num_per_model=3)


@functools.lru_cache(maxsize=None)
def _compiled_epoch(step: Callable, statics: tuple, strategy: parallel.Strategy,
                    num_steps: int) -> Callable:
  """All ``num_steps`` steps of an epoch as one program per model (``fori_loop``)."""
  one_step = functools.partial(step, *statics)

  def epoch_program(carry, orders, key, hp, images, labels, epoch, lr_factor):
    def body(s, acc):
      carry, total = acc
      carry, metrics = one_step(carry, orders, key, hp, images, labels, s, epoch, lr_factor)
      return carry, jax.tree.map(jnp.add, total, metrics)

    shapes = jax.eval_shape(one_step, carry, orders, key, hp, images, labels, jnp.int32(0),
                            epoch, lr_factor)[1]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.fori_loop(0, num_steps, body, (carry, zeros))

  return strategy.compile(epoch_program, num_per_model=3)


def epochs(step: Callable, statics: tuple, carry: Any, sources: Mapping[str, Source], hp: Any,
           images: jax.Array, labels: jax.Array, keys: jax.Array,
           strategy: parallel.Strategy | str, epoch_range: range, *,
           lr_factor: Callable[[int], float] = lambda epoch: 1.0, num_steps: int | None = None,
           streams: Streams = METHODS) -> Iterator[tuple[int, Any, dict[str, np.ndarray]]]:
  """Runs ``step`` over the whole stack, one epoch per item of ``epoch_range``.

  Yields ``(epoch, carry, metrics)`` after each epoch: the stacked carry and the per-model step
  metrics summed over the epoch (numpy). The caller's ``carry`` is not modified (its buffers are
  copied before the donating steps).

  Args:
    carry: stacked per-model state (leading model axis N).
    sources: name -> `Source`. Steps per epoch follow the first source unless ``num_steps``
      (at most `step_cap`'s, within one).
    hp: pytree of per-model [N] arrays (hyper-parameters and other per-model numbers).
    keys: [N] per-model keys (`model_keys`); epoch e uses ``fold_in(keys[m], e)``.
    lr_factor: host-side learning-rate multiplier per (0-based) epoch.
  """
  strat = parallel.Strategy.create(strategy)
  n = parallel.num_models(keys)
  first = next(iter(sources.values()))
  steps = num_steps or steps_per_epoch(first.index_sets, first.batch_size)
  if _step_cap is not None:
    steps = min(steps, _step_cap)
  scan = strat.scans(carry)
  if scan:
    program = _compiled_epoch(step, statics, strat, steps)
  else:
    program = _compiled_step(step, statics, strat)
  sets = {name: jnp.asarray(s.index_sets) for name, s in sources.items()}
  carry = jax.tree.map(jnp.copy, carry)
  for epoch in epoch_range:
    epoch_keys = _fold(keys, epoch)
    orders = {name: compiled_orders(s.batch_size, s.shuffle)(
        sets[name], _fold(epoch_keys, streams.order_salt + i))
              for i, (name, s) in enumerate(sources.items())}
    step_keys = epoch_keys if streams.step_salt is None else _fold(epoch_keys, streams.step_salt)
    internal = strat.enter(carry)
    args = [strat.enter_args(a) for a in (orders, step_keys, hp)]
    shared = (images, labels)
    factor = jnp.float32(lr_factor(epoch))
    if scan:
      internal, total = program(internal, *args, *shared, jnp.int32(epoch), factor)
    else:
      total = None
      for s in range(steps):
        internal, metrics = program(internal, *args, *shared, jnp.int32(s), jnp.int32(epoch),
                                    factor)
        total = metrics if total is None else jax.tree.map(jnp.add, total, metrics)
    carry = strat.exit(internal, n)
    yield epoch, carry, jax.tree.map(lambda m: np.asarray(m)[:n], jax.device_get(total))


def run(step: Callable, statics: tuple, carry: Any, sources: Mapping[str, Source], hp: Any,
        images: jax.Array, labels: jax.Array, keys: jax.Array,
        strategy: parallel.Strategy | str, num_epochs: int, *, first_epoch: int = 0,
        **kwargs) -> Any:
  """`epochs` run to the end; returns the final stacked carry."""
  for _, carry, _ in epochs(step, statics, carry, sources, hp, images, labels, keys, strategy,
                            range(first_epoch, first_epoch + num_epochs), **kwargs):
    pass
  return carry
