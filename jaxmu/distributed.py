"""Many hosts: every process trains, unlearns or predicts its own contiguous share of a stack;
results are gathered.

Start-up is `jaxmu.cli` (``--distributed`` under SLURM, or ``--coordinator_address``,
``--num_processes``, ``--process_id``). Models of a stack are independent (no gradient traffic),
so the stack is split by process, not sharded across hosts: process p trains models
``process_models(n)[p]`` on its local devices with any strategy, each model keeping its own id
(hence its own PRNG stream), so the gathered stack equals the stack trained by one process. Only
the finished results travel (`multihost_utils.process_allgather`), once per `fit`, `unlearn` or
`predict`. In one process `fit`, `unlearn` and `predict` are `train.fit`, the method's ``run``
and `train.predict`, nothing else.

`agree` and `barrier` are what `jaxmu.stages` needs to run a pipeline's stages on every process
together (process 0 decides and writes, the others wait).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxmu import checkpoint, parallel, train
from jaxmu import methods as methods_lib


def process_models(num_models: int, process_count: int | None = None) -> list[range]:
  """Contiguous, balanced shares of ``num_models`` models, one per process (earlier processes
  take one more when the count does not divide)."""
  count = jax.process_count() if process_count is None else process_count
  base, extra = divmod(num_models, count)
  bounds = np.cumsum([0] + [base + (p < extra) for p in range(count)])
  return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def gather_models(tree: Any, num_models: int) -> Any:
  """Every process's share of a stacked pytree (leading model axis) -> the whole stack of
  ``num_models`` models as NumPy arrays, on every process, bit for bit (64-bit host values such
  as accuracies travel as pairs of 32-bit words). Leaves without a model axis (scalars) are taken
  from process 0."""
  shares = process_models(num_models)
  width = max(len(s) for s in shares)

  def encode(x):
    x = np.asarray(x)
    if x.ndim and x.shape[0] < width:
      x = np.concatenate([x, np.repeat(x[:1], width - x.shape[0], axis=0)])
    return np.ascontiguousarray(x).view(np.uint32).reshape(*x.shape, 2) if x.itemsize == 8 else x

  def decode(gathered, original):
    original = np.asarray(original)
    if original.itemsize == 8:
      gathered = np.ascontiguousarray(gathered).view(original.dtype)[..., 0]
    if original.ndim == 0:
      return gathered[0]
    return np.concatenate([gathered[p, :len(s)] for p, s in enumerate(shares)])

  gathered = multihost_utils.process_allgather(jax.tree.map(encode, tree), tiled=False)
  return jax.tree.map(lambda g, x: decode(np.asarray(g), x), gathered, tree)


def agree(obj: Any) -> Any:
  """Process 0's ``obj`` (JSON-able) on every process; ``obj`` itself in one process."""
  if jax.process_count() == 1:
    return obj
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  buffer = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (nothing in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def own_share(num_models: int) -> range:
  """This process's share of a stack of ``num_models`` (`process_models`), or the whole stack
  when it has fewer models than there are processes: every process then runs all of them (the
  same numbers) and nothing is gathered."""
  if num_models < jax.process_count():
    return range(num_models)
  return process_models(num_models)[jax.process_index()]


def slice_context(ctx: methods_lib.Context, start: int, stop: int) -> methods_lib.Context:
  """The context of models ``start .. stop - 1`` of the stack (same data, program and each
  model's key stream)."""
  part = lambda tree: parallel.slice_models(tree, start, stop)  # noqa: E731
  return dataclasses.replace(ctx, originals=part(ctx.originals), inits=part(ctx.inits),
                             retain=ctx.retain[start:stop], forget=ctx.forget[start:stop],
                             val=ctx.val[start:stop], model_ids=ctx.model_ids[start:stop])


def unlearn(method: str, ctx: methods_lib.Context, hparams: dict,
            key: jax.Array) -> methods_lib.UnlearnResult:
  """``methods.get(method).run(ctx, hparams, key)`` over all processes: this process unlearns
  its share of the stack (`slice_context`) and every process returns the whole unlearned stack
  (NumPy leaves). ``seconds`` and ``compile_seconds`` are the maxima over processes: the wall
  time of the stack."""
  run = methods_lib.get(method).run
  if jax.process_count() == 1:
    return run(ctx, hparams, key)
  share = own_share(ctx.num_models)
  result = run(slice_context(ctx, share.start, share.stop), hparams, key)
  if len(share) == ctx.num_models:
    return result
  return methods_lib.UnlearnResult(gather_models(jax.device_get(result.states), ctx.num_models),
                                   *_slowest(result.seconds, result.compile_seconds))


def predict(model, variables, data: train.DeviceData, indices: np.ndarray, recipe: train.Recipe,
            strategy: parallel.Strategy | str = "auto", batch_size: int = 1024) -> np.ndarray:
  """`jaxmu.train.predict` of a stack over all processes: this process predicts its share
  (`own_share`; all of a stack of fewer models than processes) and every process returns the
  whole stack's [N, len(indices), C] logits, bit for bit."""
  n = parallel.num_models(variables["params"])
  share = own_share(n)
  if len(share) == n:
    return train.predict(model, variables, data, indices, recipe, strategy, batch_size)
  part = parallel.slice_models(variables, share.start, share.stop)
  return gather_models(train.predict(model, part, data, indices, recipe, strategy, batch_size), n)


def _slowest(*seconds: float) -> list[float]:
  """Each time's maximum over processes: the wall time of the whole stack."""
  return [float(t) for t in np.asarray(multihost_utils.process_allgather(
      np.float32(seconds))).max(0)]


def fit(model, state: train.TrainState, data: train.DeviceData, index_sets, recipe: train.Recipe,
        epochs: int, key: jax.Array, *, model_ids: Sequence[int] | None = None, val_sets=None,
        checkpoints: checkpoint.TrainingCheckpoints | None = None, **kw) -> train.FitResult:
  """`jaxmu.train.fit` of a stack over all processes: this process trains its share
  (`process_models`) and every process returns the whole trained stack (NumPy leaves).

  Arguments are those of `train.fit` for the whole stack; every process passes the same ones.
  Each process writes the ``checkpoints`` of its own share alone (``<dir>/models<start>-<stop>``;
  `jaxmu.checkpoint`), so a killed run resumes every share from its last checkpoint, with the same
  numbers. A stack smaller than the process count (each process trains all of it) is
  checkpointed by process 0 alone; the others train it again from the start.
  """
  if jax.process_count() == 1:
    return train.fit(model, state, data, index_sets, recipe, epochs, key, model_ids=model_ids,
                     val_sets=val_sets, checkpoints=checkpoints, **kw)
  index_sets = train.pad_index_sets(index_sets)
  n = parallel.num_models(state.params)
  if index_sets.shape[0] != n:
    raise ValueError(f"{index_sets.shape[0]} index sets for a stack of {n} models")
  model_ids = np.arange(n) if model_ids is None else np.asarray(model_ids)
  share = own_share(n)
  pick = lambda x: x[share.start:share.stop]  # noqa: E731
  local_val = val_sets if val_sets is None or train._is_shared(val_sets) else pick(
      train.pad_index_sets(val_sets))
  result = train.fit(
      model, jax.tree.map(pick, state), data, index_sets[share.start:share.stop], recipe, epochs,
      key, model_ids=model_ids[share.start:share.stop], val_sets=local_val,
      checkpoints=checkpoint.TrainingCheckpoints(
          checkpoints.dir / f"models{share.start}-{share.stop}", checkpoints.keep)
      if checkpoints and (len(share) < n or jax.process_index() == 0) else None, **kw)
  if len(share) == n:
    barrier("jaxmu fit")  # no process goes on (to remove the checkpoints) while 0 still writes
    return result
  # Float64 history: a share resumed from a checkpoint has its history back from JSON.
  history = [{k: np.asarray(v, np.float64) if np.issubdtype(np.asarray(v).dtype, np.floating)
              else v for k, v in record.items()} for record in result.history]
  gathered = gather_models(
      {"state": result.state, "best": result.best, "best_accuracy": result.best_accuracy,
       "history": history}, n)
  return train.FitResult(gathered["state"], gathered["best"], gathered["best_accuracy"],
                         gathered["history"], *_slowest(result.seconds, result.compile_seconds))
