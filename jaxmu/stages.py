"""Resumable, hashed, atomic, locked pipeline stages over a work directory.

A pipeline is a sequence of named stages. Each stage declares the config sub-tree it reads, the
stages it depends on and the output paths (relative to the workdir) it produces. Its hash is
``config_hash({"config": config, "deps": {dep: dep's recorded hash}})``; a manifest
``<workdir>/stages/<name>.json`` records the hash, dep hashes, outputs, finish time and why it
ran. A stage is skipped when its manifest hash matches and all its outputs exist; a dep recomputed
with another hash therefore reruns its dependents. While a stage is open it holds the file lock
``<workdir>/stages/<name>.lock``: a second process on the same workdir waits, then finds the
stage done and skips it.

Under ``jax.distributed`` (several processes of one run) every process enters every stage
together: process 0 alone takes the lock and decides whether the stage runs (`distributed.agree`
sends its decision), every process runs the body (the stacks of `distributed.fit`,
`distributed.unlearn` and `distributed.predict` split over them; other work is repeated, or
skipped on the others with ``single=True``), process 0 alone publishes the outputs and writes the manifest, workdir files
and ``metrics.jsonl`` (the others' ``st.tmp`` is a private temp dir outside the workdir, their
models' training curves go to ``metrics.process<p>.jsonl``), and all wait at a barrier when the
stage ends, then read what process 0 wrote.

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
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import filelock
import jax

from jaxmu import tensorboard

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
               outputs: Sequence[str], single: bool = False):
    self.workdir, self.name, self.outputs, self.single = workdir, name, tuple(outputs), single
    self.manifest_path = workdir.path("stages", f"{name}.json")
    self.dep_hashes = {d: workdir.stage_hash(d) for d in deps}
    self.config_hash = config_hash(config)
    self.hash = config_hash({"config": self.config_hash, "deps": self.dep_hashes})
    self.reason: str | None = None
    self.committed = False
    self._tmp: Path | None = None

  @property
  def done(self) -> bool:
    """True when the stage was skipped (or has been committed in this run); always on processes
    other than 0 for a ``single`` stage."""
    return self.reason is None or self.committed or (self.single and not _writer())

  @property
  def _tmp_prefix(self) -> str:
    return self.name.replace("/", "_") + ".tmp-"

  @property
  def tmp(self) -> Path:
    """A fresh directory inside the workdir; outputs written here are published by commit (under
    jax.distributed, process 0's; the others' is a private one outside the workdir)."""
    if self._tmp is None:
      self._tmp = Path(tempfile.mkdtemp(dir=self.workdir.path(".tmp") if _writer() else None,
                                        prefix=self._tmp_prefix))
    return self._tmp

  def _remove_stale_tmp(self) -> None:
    """Deletes the temp dirs of this stage left by a killed process (called under the lock, so
    no live process owns them)."""
    stale = re.compile(re.escape(self._tmp_prefix) + r"[a-z0-9_]{8}")
    for path in self.workdir.path(".tmp").iterdir():
      if stale.fullmatch(path.name):
        shutil.rmtree(path, ignore_errors=True)

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
    if not _writer():  # process 0 publishes; the stage's barrier waits for it
      self.committed = True
      return
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
    if self.root.exists() and not self.root.is_dir():
      from jaxmu.errors import WorkdirError
      raise WorkdirError([f"--workdir: {self.root} is a file, not a directory; fix: give a "
                          "directory (created when missing)"])
    self.ran: dict[str, str] = {}  # stage -> why it ran in this process, or "reused"
    self._metrics_keys: set = set()  # (stage, model) whose rows this process has appended
    self._scalars = (tensorboard.Scalars(self.path("tensorboard"))
                     if tensorboard.enabled() and _writer() else None)
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
            outputs: Sequence[str] = (), single: bool = False) -> Iterator[Stage]:
    """Opens stage ``name`` under its file lock; see the module docstring.

    The body must call ``commit()`` when ``done`` is False (else RuntimeError). ``single``: under
    ``jax.distributed`` only process 0 runs the body (its work uses no collective), the others
    wait at the stage's barrier.
    """
    from jaxmu import distributed
    lock_path = self.path("stages", f"{name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(lock_path) if _writer() else contextlib.nullcontext():
      st = Stage(self, name, config, deps, outputs, single)
      if _writer():
        st._remove_stale_tmp()
        st._check()
      st.reason = distributed.agree(st.reason)
      self.ran[name] = st.reason or "reused"
      try:
        yield st
      finally:
        st._cleanup()
      if not st.done:
        raise RuntimeError(f"stage {name!r} ran ({st.reason}) but did not commit()")
    if st.reason is not None:
      distributed.barrier(f"jaxmu stage {name}")

  def owner(self) -> str | None:
    """The pipeline whose run this workdir holds: ``owner.json``, or for a workdir written before
    it existed, read off its ``config.json``; None for a new workdir."""
    try:
      return json.loads(self.path("owner.json").read_text())["pipeline"]
    except FileNotFoundError:
      pass
    try:
      return pipeline_of(json.loads(self.path("config.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
      return None

  def claim(self, pipeline: str) -> None:
    """Records ``pipeline`` as the workdir's owner; a workdir of another pipeline is a
    `WorkdirError` (its splits, models and config would be replaced). A pipeline nested in
    another's workdir (``runs/quickstart/iam``, DeepUnlearn's ``ulira`` stage) has its own
    directory and owner."""
    owner = self.owner()
    if owner not in (None, pipeline):
      from jaxmu.errors import Problem, WorkdirError
      raise WorkdirError([Problem(
          "--workdir", f"{self.root} holds a run of {owner}; {pipeline} would replace its splits, "
          "models and config.json", f"give {pipeline} its own directory, e.g. "
          f"--workdir={self.root / pipeline}")])
    if _writer() and (owner is None or not self.path("owner.json").exists()):
      with atomic_write(self.path("owner.json"), "w") as f:
        f.write(to_json({"pipeline": pipeline}) + "\n")

  def write_config(self, config: Any, owner: str | None = None) -> None:
    """Writes the resolved config to ``<workdir>/config.json`` after `claim`-ing the workdir for
    ``owner`` (default: the pipeline the config is of, `pipeline_of`)."""
    text = to_json(config, indent=2, sort_keys=True) + "\n"
    owner = owner or pipeline_of(json.loads(text))
    if owner:
      self.claim(owner)
    if _writer():
      with atomic_write(self.path("config.json"), "w") as f:
        f.write(text)

  def append_metrics(self, record: Mapping[str, Any]) -> None:
    """Appends ``record`` to ``<workdir>/metrics.jsonl``, one JSON line per model and epoch.

    Per-model arrays (a training epoch's loss, accuracy, ... of a stack) become one row per
    model, named by ``record["models"]`` where it lists one name per model, else by the model
    ids ``record["model"]`` (`train.fit` passes them), else by position. The first row of a
    (stage, model) in this process drops the file's rows of that (stage, model) from its epoch
    on: a resumed fit repeats the epochs after its last checkpoint, and they are logged once.
    Under ``jax.distributed`` process p > 0 appends its models' rows to
    ``metrics.process<p>.jsonl``.
    """
    rows = metric_rows(record)
    keys = {(r.get("stage"), r.get("model")): r["epoch"] for r in rows if "epoch" in r}
    new = {k: e for k, e in keys.items() if k not in self._metrics_keys}
    p = jax.process_index()
    path = self.path(f"metrics.process{p}.jsonl" if p else "metrics.jsonl")
    if new and path.exists():
      kept, dropped = [], False
      for line in path.read_text().splitlines():
        try:
          old = json.loads(line)
          key = (old.get("stage"), old.get("model"))
          stale = key in new and old.get("epoch", -1) >= new[key]
        except (json.JSONDecodeError, AttributeError):
          stale = True  # a line cut short by a kill
        dropped |= stale
        kept += [] if stale else [line]
      if dropped:
        with atomic_write(path, "w") as f:
          f.write("".join(line + "\n" for line in kept))
    self._metrics_keys |= set(keys)
    with open(path, "a") as f:
      f.write("".join(to_json(r) + "\n" for r in rows))
    if self._scalars is not None:
      self._scalars.write(rows)


def _writer() -> bool:
  """Whether this process writes the workdir: the only one, or process 0 of several."""
  return jax.process_index() == 0


def metric_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
  """``record`` as one row per model (see `Workdir.append_metrics`); a record without
  per-model values is one row."""
  plain = _plain(dict(record))
  names, ids = plain.pop("models", None), plain.pop("model", None)
  sizes = {len(v) for v in plain.values() if isinstance(v, list)}
  if len(sizes) != 1:
    if names is not None:
      plain["models"] = names
    if ids is not None:
      plain["model"] = ids
    return [plain]
  (m,) = sizes
  if isinstance(names, list) and len(names) == m:
    labels = names
  elif isinstance(ids, list) and len(ids) == m:
    labels = ids
  else:
    labels = list(range(m))
  scalars = {k: v for k, v in plain.items() if not isinstance(v, list)}
  head = {k: scalars.pop(k) for k in ("stage", "epoch") if k in scalars}
  return [{**head, "model": labels[i], **scalars,
           **{k: v[i] for k, v in plain.items() if isinstance(v, list)}} for i in range(m)]


def pipeline_of(config: Mapping[str, Any]) -> str | None:
  """The pipeline a config (as a dict) belongs to, by its sections: IAM's ``num_shadows``,
  DeepUnlearn's ``search`` and ``methods``, U-LiRA's ``ulira`` alone; None for others."""
  if not isinstance(config, Mapping):
    return None
  if "num_shadows" in config:
    return "iam"
  if "search" in config and "methods" in config:
    return "deepunlearn"
  if "ulira" in config:
    return "ulira"
  return None


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
