"""Training curves in TensorBoard, as an option: with ``JAXMU_TENSORBOARD=1`` in the environment
every row a pipeline appends to ``<workdir>/metrics.jsonl`` is also written as TensorBoard
scalars (tensorboardX, the ``tensorboard`` extra) under ``<workdir>/tensorboard/<stage>/<model>/``,
one run per model, the epoch as the step. View with ``tensorboard --logdir <workdir>/tensorboard``.

A resumed fit logs the epochs after its last checkpoint again; TensorBoard then shows both
points at those steps (metrics.jsonl keeps only the new ones).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

ENV = "JAXMU_TENSORBOARD"
_KEYS = ("stage", "model", "epoch")


def enabled() -> bool:
  """Whether ``JAXMU_TENSORBOARD`` asks for TensorBoard scalars; an InputError (before any work)
  when it does and tensorboardX is missing."""
  if os.environ.get(ENV, "") in ("", "0"):
    return False
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    from jaxmu.errors import InputError
    raise InputError(f"{ENV} is set but tensorboardX is not installed; fix: pip install "
                     "'jaxmu[tensorboard]', or unset it") from None
  return True


class Scalars:
  """One event file per (stage, model) below ``directory``, written synchronously (tensorboardX's
  `EventsWriter`; its `SummaryWriter` queues events on a thread, and a killed run would lose
  them)."""

  def __init__(self, directory: str | os.PathLike):
    self.dir, self._writers = Path(directory), {}

  def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2, summary_pb2
    touched = set()
    for row in rows:
      if "epoch" not in row:
        continue
      run = (str(row.get("stage", "run")), str(row.get("model", "all")))
      if run not in self._writers:
        folder = self.dir.joinpath(*run)
        folder.mkdir(parents=True, exist_ok=True)
        self._writers[run] = EventsWriter(str(folder / "events"))
      values = [summary_pb2.Summary.Value(tag=name, simple_value=float(value))
                for name, value in row.items() if name not in _KEYS
                and isinstance(value, (int, float)) and not isinstance(value, bool)]
      self._writers[run].write_event(event_pb2.Event(
          wall_time=time.time(), step=int(row["epoch"]), summary=summary_pb2.Summary(value=values)))
      touched.add(run)
    for run in touched:
      self._writers[run].flush()
