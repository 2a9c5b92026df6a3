"""Resumable, hashed, atomic, locked pipeline stages over a work directory.

A pipeline is a sequence of named stages. Each stage declares the config sub-tree it reads, the
stages it depends on and the output paths (relative to the workdir) it produces. Its hash is
``config_hash({"config": config, "deps": {dep: dep's recorded hash}})``; a manifest
``<workdir>/stages/<name>.json`` records the hash, dep hashes, outputs, finish time and why it
ran. A stage is skipped when its manifest hash matches and all its outputs exist; a dep recomputed
with another hash therefore reruns its dependents. While a stage is open it holds the file lock
``<workdir>/stages/<name>.lock``: a second process on the same workdir waits, then finds the
stage done and skips it.

Example::

    wd = Workdir("runs/quickstart")
    wd.write_config(cfg)
    with wd.stage("splits", config=cfg.data, outputs=("splits.npz",)) as st:
        if not st.done:
            np.savez(st.tmp / "splits.npz", **make_splits(cfg.data))
            st.commit()                  # moves st.tmp/splits.npz to <workdir>/splits.npz
    with wd.stage("train_original", config=cfg.train, deps=("splits",),
                  outputs=("models/original",)) as st:
        if not st.done:                  # st.reason: "new", "config changed",
            ...                          # "input 'splits' changed" or "outputs missing"
            checkpoint.save(st.tmp / "models/original", states)
            st.commit()

Outputs are written under ``st.tmp`` (a fresh directory inside the workdir) with the same
relative paths and published atomically by ``commit()``; an output may also be written in
place by an already atomic writer (``atomic_write``, ``checkpoint.save``) before ``commit()``.
A body that raises leaves no manifest and no partial outputs, so the stage reruns next time.

A pipeline lists its stage functions, each opening its stage(s) and returning its main output;
`run_stages` calls them in order up to ``stop_after``::

    run_stages([pipe.splits, pipe.train, pipe.report], config.stop_after)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import filelock

__all__ = ["Workdir", "Stage", "config_hash", "to_json", "atomic_write", "publish_dir",
           "run_stages"]


def _plain(obj: Any) -> Any:
  """Converts a config / dict / sequence / numpy or jax scalar tree into plain JSON types."""
  if hasattr(obj, "to_dict"):  # ml_collections ConfigDict and FrozenConfigDict
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if hasattr(obj, "__array__"):  # numpy / jax arrays and scalars
    import numpy as np

    return _plain(np.asarray(obj).tolist())
  raise TypeError(f"cannot convert {type(obj).__name__} to JSON: {obj!r}")


def to_json(obj: Any, **kwargs: Any) -> str:
  """JSON text of a config / dict / array-scalar tree (tuples as lists)."""
  return json.dumps(_plain(obj), **kwargs)


def config_hash(obj: Any) -> str:
  """Stable hex hash of a config tree: canonical JSON (sorted keys, tuples == lists)."""
  text = to_json(obj, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
  """Opens a temp file beside ``path``; on success fsyncs it and renames it onto ``path``.

  If the body raises, the temp file is removed and ``path`` is left untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
  try:
    with open(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def publish_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Renames directory ``src`` to ``dst`` (same filesystem), replacing an existing ``dst``.

  An existing ``dst`` is first renamed aside and deleted after ``src`` is in place, so ``dst``
  is never a mix of old and new files. A crash between the two renames leaves the old
  version under ``.<name>.old-*`` beside ``dst``.
  """
  src, dst = Path(src), Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  old = None
  if dst.exists():
    old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
    os.replace(dst, old)  # replaces the empty placeholder directory
  os.replace(src, dst)
  if old is not None:
    shutil.rmtree(old)


class Stage:
  """One open stage; created by :meth:`Workdir.stage`. See the module docstring."""

  def __init__(self, workdir: Workdir, name: str, config: Any, deps: Sequence[str],
               outputs: Sequence[str]):
    self.workdir, self.name, self.outputs = workdir, name, tuple(outputs)
    self.manifest_path = workdir.path("stages", f"{name}.json")
    self.dep_hashes = {d: workdir.stage_hash(d) for d in deps}
    self.config_hash = config_hash(config)
    self.hash = config_hash({"config": self.config_hash, "deps": self.dep_hashes})
    self.reason: str | None = None
    self.committed = False
    self._tmp: Path | None = None

  @property
  def done(self) -> bool:
    """True when the stage was skipped (or has been committed in this run)."""
    return self.reason is None or self.committed

  @property
  def tmp(self) -> Path:
    """A fresh directory inside the workdir; outputs written here are published by commit."""
    if self._tmp is None:
      self._tmp = Path(tempfile.mkdtemp(dir=self.workdir.path(".tmp"),
                                        prefix=self.name.replace("/", "_") + "-"))
    return self._tmp

  def _check(self) -> None:
    """Sets ``reason`` to why the stage must run, or None when it can be skipped."""
    manifest = self.workdir.manifest(self.name)
    if manifest is None:
      self.reason = "new"
    elif manifest["config_hash"] != self.config_hash:
      self.reason = "config changed"
    elif changed := [d for d, h in self.dep_hashes.items() if manifest["deps"].get(d) != h]:
      self.reason = f"input '{changed[0]}' changed"
    elif manifest["hash"] != self.hash:  # a dep was removed
      self.reason = "inputs changed"
    elif not all(self.workdir.path(o).exists() for o in self.outputs):
      self.reason = "outputs missing"
    else:
      self.reason = None

  def commit(self) -> None:
    """Publishes the outputs written under ``tmp`` and records the stage as done."""
    if self.done:
      raise RuntimeError(f"stage {self.name!r} is already done; commit only when not done")
    self.manifest_path.unlink(missing_ok=True)  # a crash below must not look finished
    for out in self.outputs:
      src, dst = (self._tmp / out if self._tmp else None), self.workdir.path(out)
      if src is not None and src.exists():
        if src.is_dir():
          publish_dir(src, dst)
        else:
          dst.parent.mkdir(parents=True, exist_ok=True)
          os.replace(src, dst)
    missing = [o for o in self.outputs if not self.workdir.path(o).exists()]
    if missing:
      raise FileNotFoundError(f"stage {self.name!r} committed without outputs {missing}")
    record = {"hash": self.hash, "config_hash": self.config_hash, "deps": self.dep_hashes,
              "outputs": list(self.outputs), "reason": self.reason,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_write(self.manifest_path, "w") as f:
      json.dump(record, f, indent=1)
    self.committed = True

  def _cleanup(self) -> None:
    if self._tmp is not None:
      shutil.rmtree(self._tmp, ignore_errors=True)


class Workdir:
  """The work directory of a pipeline run (layout: DESIGN.md, "Work directory")."""

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)
    self.ran: dict[str, str] = {}  # stage -> why it ran in this process, or "reused"
    self.path("stages").mkdir(parents=True, exist_ok=True)
    self.path(".tmp").mkdir(exist_ok=True)

  def path(self, *parts: str | os.PathLike) -> Path:
    """``<workdir>/<parts...>``."""
    return self.root.joinpath(*parts)

  def manifest(self, name: str) -> dict | None:
    """The manifest of a finished stage, or None."""
    try:
      return json.loads(self.path("stages", f"{name}.json").read_text())
    except FileNotFoundError:
      return None

  def stage_hash(self, name: str) -> str:
    """The recorded hash of a finished stage (raises if it has not finished)."""
    manifest = self.manifest(name)
    if manifest is None:
      raise RuntimeError(f"stage {name!r} has not finished; run it before its dependents")
    return manifest["hash"]

  @contextlib.contextmanager
  def stage(self, name: str, config: Any = None, deps: Sequence[str] = (),
            outputs: Sequence[str] = ()) -> Iterator[Stage]:
    """Opens stage ``name`` under its file lock; see the module docstring.

    The body must call ``commit()`` when ``done`` is False (else RuntimeError).
    """
    lock_path = self.path("stages", f"{name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(lock_path):
      st = Stage(self, name, config, deps, outputs)
      st._check()
      self.ran[name] = st.reason or "reused"
      try:
        yield st
      finally:
        st._cleanup()
      if not st.done:
        raise RuntimeError(f"stage {name!r} ran ({st.reason}) but did not commit()")

  def write_config(self, config: Any) -> None:
    """Writes the resolved config to ``<workdir>/config.json``."""
    with atomic_write(self.path("config.json"), "w") as f:
      f.write(to_json(config, indent=2, sort_keys=True) + "\n")

  def append_metrics(self, record: Mapping[str, Any]) -> None:
    """Appends ``record`` as one JSON line to ``<workdir>/metrics.jsonl``."""
    line = to_json(record) + "\n"
    with open(self.path("metrics.jsonl"), "a") as f:
      f.write(line)


def run_stages(stage_functions: Sequence[Callable[[], Any]], stop_after: str = "") -> Any:
  """Calls ``stage_functions`` in order up to the one whose ``__name__`` is ``stop_after`` ("" =
  all); returns what the last one called returned. A ``stop_after`` that names none of them is a
  ValueError before any runs."""
  names = tuple(fn.__name__ for fn in stage_functions)
  if stop_after and stop_after not in names:
    raise ValueError(f"stop_after={stop_after!r} is not a stage; stages: {names}")
  result = None
  for fn in stage_functions:
    result = fn()
    if fn.__name__ == stop_after:
      break
  return result
