"""Many hosts: every process trains its own contiguous share of a stack; results are gathered.

Start-up is `jaxmu.cli` (``--distributed`` under SLURM, or ``--coordinator_address``,
``--num_processes``, ``--process_id``). Models of a stack are independent (no gradient traffic),
so the stack is split by process, not sharded across hosts: process p trains models
``process_models(n)[p]`` on its local devices with any strategy, each model keeping its own id
(hence its own PRNG stream), so the gathered stack equals the stack trained by one process. Only
the finished results travel (`multihost_utils.process_allgather`), once per fit.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxmu import checkpoint, parallel, train


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


def fit(model, state: train.TrainState, data: train.DeviceData, index_sets, recipe: train.Recipe,
        epochs: int, key: jax.Array, *, model_ids: Sequence[int] | None = None, val_sets=None,
        checkpoints: checkpoint.TrainingCheckpoints | None = None, **kw) -> train.FitResult:
  """`jaxmu.train.fit` of a stack over all processes: this process trains its share
  (`process_models`) and every process returns the whole trained stack (NumPy leaves).

  Arguments are those of `train.fit` for the whole stack; every process passes the same ones.
  ``checkpoints`` are kept per process (``<dir>/process<p>``), so a killed run resumes with the
  same process count.
  """
  index_sets = train.pad_index_sets(index_sets)
  n = parallel.num_models(state.params)
  if index_sets.shape[0] != n:
    raise ValueError(f"{index_sets.shape[0]} index sets for a stack of {n} models")
  model_ids = np.arange(n) if model_ids is None else np.asarray(model_ids)
  p = jax.process_index()
  share = process_models(n)[p]
  if not len(share):
    raise ValueError(f"{n} models for {jax.process_count()} processes: every process needs at "
                     "least one model; use fewer processes")
  pick = lambda x: x[share.start:share.stop]  # noqa: E731
  local_val = val_sets if val_sets is None or train._is_shared(val_sets) else pick(
      train.pad_index_sets(val_sets))
  result = train.fit(
      model, jax.tree.map(pick, state), data, index_sets[share.start:share.stop], recipe, epochs,
      key, model_ids=model_ids[share.start:share.stop], val_sets=local_val,
      checkpoints=checkpoints and checkpoint.TrainingCheckpoints(
          checkpoints.dir / f"process{p}", checkpoints.keep), **kw)
  gathered = gather_models(
      {"state": result.state, "best": result.best, "best_accuracy": result.best_accuracy,
       "history": result.history}, n)
  return train.FitResult(gathered["state"], gathered["best"], gathered["best_accuracy"],
                         gathered["history"])
