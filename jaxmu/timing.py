"""Run time as jaxmu reports it: the compiled work, JAX's tracing and compilation excluded.

Both sides of DeepUnlearn's run-time efficiency (deepunlearn-spec 6.5: retraining time /
unlearning time) are timed this way, training epochs by `train.fit` and unlearning runs by
`jaxmu.methods.Method.run` (docs/deviations.md: the reference times wall clock, compilation
being no part of PyTorch's eager loop).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

import jax


class CompileClock:
  """Context manager summing the seconds JAX spends tracing, lowering and compiling inside it
  (``seconds``), and the wall seconds inside it less those (``work_seconds``, never negative)."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.seconds = 0.0
    self.work_seconds = 0.0

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in self.EVENTS:
      self.seconds += duration

  def __enter__(self) -> "CompileClock":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    self._start = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    wall = time.perf_counter() - self._start
    jax.monitoring.unregister_event_duration_listener(self._listen)
    self.work_seconds = max(wall - self.seconds, 0.0)


def timed(items: Iterable[Any]) -> Iterator[tuple[Any, CompileClock]]:
  """Each item of ``items`` with the `CompileClock` that timed producing it until its arrays
  were ready; the consumer's own work between items is not timed."""
  items, end = iter(items), object()
  while True:
    with CompileClock() as clock:
      item = jax.block_until_ready(next(items, end))
    if item is end:
      return
    yield item, clock
