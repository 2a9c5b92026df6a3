"""Orbax save/restore of stacked states (pytrees whose leaves carry a leading model axis).

A checkpoint is a directory ``<path>/`` holding ``state/`` (an orbax ``StandardCheckpointer``
checkpoint) and ``metadata.json`` (the caller's metadata plus the shape and dtype of every leaf,
by path). It is built under a temp name beside ``path`` and renamed into place, so a reader
never sees a partial checkpoint and saving over an existing one works. Typed PRNG keys
(``jax.random.key``) are stored as their ``key_data`` and re-wrapped with the impl of ``like``.

Example::

    checkpoint.save(wd.path("models/original"), states, {"epochs": 30})
    states = checkpoint.restore(wd.path("models/original"), like=abstract_states)

    ckpts = TrainingCheckpoints(wd.path("ckpt/original"), keep=2)
    start = 0 if (last := ckpts.latest()) is None else last + 1
    if last is not None:
        states = ckpts.restore(last, like=states)
    for epoch in range(start, epochs):
        states = train_epoch(states)
        ckpts.save(epoch, states)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmu.stages import publish_dir

__all__ = ["save", "restore", "read_metadata", "TrainingCheckpoints"]

_STATE, _META = "state", "metadata.json"


def _local(**multi) -> dict:
  """Orbax keyword arguments for a checkpoint this process reads or writes alone (plus ``multi``)
  under ``jax.distributed``, with no barriers with other processes: process 0 alone writes a
  pipeline's outputs (`save`) and every process reads them; process p writes and reads the
  training checkpoints of its own share (`jaxmu.distributed.fit`). None in one process."""
  if jax.process_count() == 1:
    return {}
  p = jax.process_index()
  return {"multiprocessing_options": ocp.options.MultiprocessingOptions(
      primary_host=p, active_processes={p}), **multi}


def _host(tree: Any) -> Any:
  """``tree`` with its jax arrays as NumPy arrays under ``jax.distributed`` (orbax refuses to
  write process-local jax arrays there); ``tree`` itself in one process."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: x if _is_typed_key(x) else np.asarray(x), tree)


def _is_typed_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(tree: Any) -> Any:
  """``tree`` with its typed PRNG keys as their ``key_data`` (what a checkpoint stores)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _wrap_keys(like: Any, stored: Any) -> Any:
  """``stored`` with the leaves that are typed keys in ``like`` wrapped back (``like``'s impl)."""
  return jax.tree.map(lambda x, r: jax.random.wrap_key_data(r, dtype=x.dtype)
                      if _is_typed_key(x) else r, like, stored)


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _stored(x: Any) -> jax.ShapeDtypeStruct:
  """Shape and dtype stored for leaf ``x`` (the key data of a typed PRNG key)."""
  if _is_typed_key(x):
    return jax.eval_shape(jax.random.key_data, x)
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  return jax.ShapeDtypeStruct(np.shape(x), dtype)


def _signature(tree: Any) -> dict[str, dict]:
  """``{"a/b/0": {"shape": [...], "dtype": "float32"}}`` of the leaves as stored on disk."""
  sig = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = _stored(leaf)
    sig["/".join(_key_str(k) for k in path)] = {"shape": list(leaf.shape),
                                                "dtype": str(leaf.dtype)}
  return sig


def save(path: str | os.PathLike, tree: Any, metadata: dict | None = None) -> None:
  """Saves ``tree`` (and JSON ``metadata``) atomically to directory ``path``, replacing it.

  Under ``jax.distributed`` process 0 alone writes (`_local`); on the others this does nothing.
  """
  if jax.process_index():
    return
  path = Path(path).absolute()  # orbax needs absolute paths
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
  try:
    stored = _key_data(tree)
    with ocp.StandardCheckpointer(**_local()) as ckptr:
      ckptr.save(tmp / _STATE, _host(stored))
      ckptr.wait_until_finished()
    meta = {"metadata": metadata or {}, "leaves": _signature(tree)}
    (tmp / _META).write_text(json.dumps(meta, indent=1))
    publish_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read(path: Path) -> dict:
  try:
    return json.loads((Path(path) / _META).read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"no checkpoint at {path}") from None


def read_metadata(path: str | os.PathLike) -> dict:
  """The metadata dict saved with the checkpoint at ``path``."""
  return _read(Path(path))["metadata"]


def restore(path: str | os.PathLike, like: Any) -> Any:
  """Restores the checkpoint at ``path`` into the structure, shapes and dtypes of ``like``.

  ``like`` may be concrete or abstract (``jax.ShapeDtypeStruct`` leaves). Raises ValueError
  when the checkpoint was written for another model or state (leaf paths or shapes differ);
  dtypes are cast to those of ``like``.
  """
  path = Path(path).absolute()
  _check_leaves(path, _read(path)["leaves"], like)
  with ocp.StandardCheckpointer(**_local()) as ckptr:
    restored = ckptr.restore(path / _STATE, jax.tree.map(_stored_abstract, like))
  return _wrap_keys(like, restored)


def _check_leaves(path: Path, leaves: dict, like: Any) -> None:
  """ValueError when the checkpoint's leaf paths or shapes differ from those of ``like``."""
  saved = {p: tuple(leaf["shape"]) for p, leaf in leaves.items()}
  wanted = {p: tuple(leaf["shape"]) for p, leaf in _signature(like).items()}
  if saved != wanted:
    diffs = [f"{p}: checkpoint {saved.get(p, 'absent')}, expected {wanted.get(p, 'absent')}"
             for p in sorted(set(saved) | set(wanted)) if saved.get(p) != wanted.get(p)]
    raise ValueError(
        f"checkpoint {path} was written for another model/state: {len(diffs)} leaves differ "
        f"in path or shape, first: " + "; ".join(diffs[:5]))


def _sharding(x: Any) -> jax.sharding.Sharding:
  sharding = getattr(x, "sharding", None)
  if _is_typed_key(x) or not isinstance(sharding, jax.sharding.Sharding):
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return sharding


def _stored_abstract(x: Any) -> jax.ShapeDtypeStruct:
  """The abstract leaf `save` wrote for ``x`` (a typed key's data), placed like ``x``."""
  data = _stored(x)
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_sharding(x))


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  """``x`` as orbax restores it (typed PRNG keys stay typed), placed like ``x``."""
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else
                              np.asarray(x).dtype, sharding=_sharding(x))


class _ProcessArrays(ocp.CheckpointHandler):
  """The state of a training checkpoint under ``jax.distributed``: its leaves in one ``.npz``,
  written by this process alone (orbax's writers of NumPy arrays write on process 0 only, and
  refuse process-local jax arrays). Typed PRNG keys are stored as their ``key_data``."""

  def save(self, directory, args: _ProcessArraysSave) -> None:
    leaves = [np.asarray(x) for x in jax.tree.leaves(_key_data(args.item))]
    # The dtype in the name: NumPy reads bfloat16 back as raw bytes.
    np.savez(Path(directory) / "state.npz",
             **{f"{i}:{x.dtype.name}": x for i, x in enumerate(leaves)})

  def restore(self, directory, args: _ProcessArraysRestore) -> Any:
    with np.load(Path(directory) / "state.npz") as f:
      arrays = [f[k].view(np.dtype(k.partition(":")[2]))
                for k in sorted(f.files, key=lambda k: int(k.partition(":")[0]))]
    like, treedef = jax.tree.flatten(args.item)
    return _wrap_keys(args.item, treedef.unflatten([
        x if _is_typed_key(y) else jax.device_put(x.astype(_stored(y).dtype), _sharding(y))
        for x, y in zip(arrays, like)]))

  def metadata(self, directory) -> None:
    return None

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(_ProcessArrays, for_save=True)
@dataclasses.dataclass
class _ProcessArraysSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_ProcessArrays, for_restore=True)
@dataclasses.dataclass
class _ProcessArraysRestore(ocp.args.CheckpointArgs):
  item: Any  # the tree to restore into (structure, dtypes, placement)


class TrainingCheckpoints:
  """Periodic checkpoints of a training loop, kept by orbax's `CheckpointManager`:
  ``<dir>/<epoch>/`` (8 digits) holding the state and ``metadata`` (JSON), the last ``keep``
  kept (``max_to_keep``). Under ``jax.distributed`` each process writes its own alone (the state
  as one ``.npz``: `_ProcessArrays`).

  Orbax writes each step under a temp name and renames it when complete, so an epoch listed by
  :meth:`latest` is always whole; a crash mid-save leaves only that temp directory, which is never
  listed and is removed by the next manager. Restores check leaf paths and shapes as `restore`.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.dir, self.keep = Path(directory).absolute(), keep
    self._manager: ocp.CheckpointManager | None = None

  def _open(self) -> ocp.CheckpointManager:
    if self._manager is None:  # lazily: opening creates the directory
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self.keep, step_format_fixed_length=8, enable_async_checkpointing=False,
          **_local(create=False))
      self.dir.mkdir(parents=True, exist_ok=True)  # orbax's create=True is one process's only
      # The items' handlers given: those orbax would make write on process 0 only.
      self._manager = ocp.CheckpointManager(self.dir, options=options, item_handlers={
          "state": _ProcessArrays() if _local() else ocp.StandardCheckpointHandler(),
          "metadata": ocp.JsonCheckpointHandler(**_local())})
    return self._manager

  def path(self, epoch: int) -> Path:
    return self.dir / f"{epoch:08d}"

  def epochs(self) -> list[int]:
    """Epochs with a complete checkpoint, ascending."""
    if not self.dir.exists():
      return []
    manager = self._open()
    manager.reload()  # another process (a resumed run) may have written since
    return sorted(manager.all_steps())

  def latest(self) -> int | None:
    epochs = self.epochs()
    return epochs[-1] if epochs else None

  def save(self, epoch: int, tree: Any, metadata: dict | None = None) -> None:
    meta = {"metadata": metadata or {}, "leaves": _signature(tree)}
    state = _ProcessArraysSave(tree) if _local() else ocp.args.StandardSave(tree)
    self._open().save(epoch, args=ocp.args.Composite(
        state=state, metadata=ocp.args.JsonSave(meta)), force=True)
    self._open().wait_until_finished()

  def _meta(self, epoch: int) -> dict:
    return self._open().restore(epoch, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore()))["metadata"]

  def restore(self, epoch: int, like: Any) -> Any:
    _check_leaves(self.path(epoch), self._meta(epoch)["leaves"], like)
    state = (_ProcessArraysRestore(like) if _local()
             else ocp.args.StandardRestore(jax.tree.map(_abstract, like)))
    return self._open().restore(epoch, args=ocp.args.Composite(state=state))["state"]

  def metadata(self, epoch: int) -> dict:
    return self._meta(epoch)["metadata"]
