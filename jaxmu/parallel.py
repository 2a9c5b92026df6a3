"""How a stack of N models runs: one vmapped program, a loop of per-model programs, or sharded.

Every stacked function in jaxmu is written for *one* model, as a pure function
``fn(model_state, *per_model_args, *shared_args)``. A `Strategy` turns it into a function over
the whole stack:

- ``vmap``: one compiled program over the model axis (the target on accelerators).
- ``loop``: one jitted program per model call, models run in turn (measured faster for conv nets
  on CPU, where vmapped convolutions become slow grouped convolutions).
- ``sharded``: the vmapped program with the model axis split over all local devices
  (``NamedSharding(mesh, P("models"))``); no traffic between devices. A stack whose size does not
  divide the device count is padded with copies of its first model, dropped again on the way out.
- ``sharded:data=D``: a ``("models", "data")`` mesh of (devices / D) x D: each model is
  replicated over D devices and its batch split over them (data parallelism, e.g. one large model
  over all devices with ``D`` = the device count); gradients and BatchNorm statistics are reduced
  over the data axis by the compiler, so the numbers are those of the whole batch. Per-model
  functions mark their batch with `shard_batch`.

Independently of the kind, an epoch runs either as one dispatch per step or as one compiled
program (``scan``: all steps of an epoch in a ``fori_loop``; `jaxmu.engine`). ``"auto"`` picks
the kind by backend (`resolve`) and the epoch mode by backend and model family, per program
(`Strategy.scans`).

States live in a strategy's *internal* form while a loop runs (a list of per-model pytrees for
``loop``, a padded sharded pytree for ``sharded``) so nothing is restacked per step;
`Strategy.enter` and `Strategy.exit` convert from and to the ordinary stacked pytree.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

NAMES = ("auto", "vmap", "loop", "sharded")
EPOCH_MODES = ("auto", "scan", "steps")
_DATA_PARALLEL = re.compile(r"^sharded:data=([1-9]\d*)$")
# The ("models", "data") mesh of the data-parallel program being traced, if any (`shard_batch`).
_DATA_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("data_mesh", default=None)


def resolve(name: str) -> str:
  """Maps ``auto`` to a concrete strategy for this backend; validates the name."""
  if name not in NAMES and not _DATA_PARALLEL.match(name):
    raise ValueError(f"unknown parallel strategy {name!r}; choose one of {NAMES} or "
                     "'sharded:data=D' (D devices per model)")
  if name != "auto":
    return name
  if jax.default_backend() == "cpu":
    return "loop"
  return "sharded" if jax.local_device_count() > 1 else "vmap"


def resolve_epoch(mode: str) -> bool | None:
  """``scan`` -> True (an epoch is one compiled program), ``steps`` -> False (one dispatch per
  step), ``auto`` -> None (decided per program by `Strategy.scans`)."""
  if mode not in EPOCH_MODES:
    raise ValueError(f"unknown epoch mode {mode!r}; choose one of {EPOCH_MODES}")
  return None if mode == "auto" else mode == "scan"


def shard_batch(x: jax.Array) -> jax.Array:
  """Splits the leading (batch) axis of ``x`` over the mesh's "data" axis while a data-parallel
  program (``sharded:data=D``) is traced; the identity everywhere else."""
  mesh = _DATA_MESH.get()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))


def stack_trees(trees: Sequence[Any]) -> Any:
  """Stacks a list of same-structured pytrees along a new leading model axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any, num: int | None = None) -> list[Any]:
  """Splits a stacked pytree into a list of per-model pytrees."""
  num = num_models(tree) if num is None else num
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num)]


def num_models(tree: Any) -> int:
  """Size of the leading model axis of a stacked pytree."""
  return int(jax.tree.leaves(tree)[0].shape[0])


def slice_models(tree: Any, start: int, stop: int) -> Any:
  return jax.tree.map(lambda x: x[start:stop], tree)


def concat_models(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A concrete execution strategy (see module docstring): how the model axis runs (``name``)
  and whether an epoch is one compiled program (``scan``; None = by backend and model family,
  `scans`). Hashable: part of program caches."""

  name: str
  scan: bool | None = False

  def __post_init__(self):
    if self.name == "auto" or resolve(self.name) != self.name:
      raise ValueError("Strategy needs a concrete name; use Strategy.create('auto')")

  @staticmethod
  def create(spec: "Strategy | str" = "auto", epoch: str = "auto") -> "Strategy":
    """A strategy from a name (``auto`` resolved for this backend) and an epoch mode; a
    `Strategy` is returned as it is."""
    if isinstance(spec, Strategy):
      return spec
    return Strategy(resolve(spec), resolve_epoch(epoch))

  def scans(self, carry: Any) -> bool:
    """Whether the epochs of a stack with this ``carry`` run as one compiled program.

    ``auto`` (``scan=None``): on accelerators always (per-step dispatch is the known cost of
    small models there; not yet measured here, issue [9/9]); on CPU only for models without
    convolutions (no stacked leaf of rank >= 5): measured on this 2-core CPU, a scanned epoch
    was 1.1-1.3x faster than dispatched steps for the Purchase MLP and 11-20x slower for the
    small CNN (docs/benchmarks.md, "Dispatch").
    """
    if self.scan is not None:
      return self.scan
    if jax.default_backend() != "cpu":
      return True
    return all(jnp.ndim(leaf) < 5 for leaf in jax.tree.leaves(carry))

  @property
  def kind(self) -> str:
    """``vmap``, ``loop`` or ``sharded`` (with or without a data axis)."""
    return self.name.split(":")[0]

  @property
  def data_axis(self) -> int:
    """Devices per model: D of ``sharded:data=D``, else 1."""
    match = _DATA_PARALLEL.match(self.name)
    return int(match[1]) if match else 1

  # -- state conversion -------------------------------------------------------------------
  def enter(self, stacked: Any) -> Any:
    """Stacked pytree -> this strategy's internal form."""
    if self.name == "loop":
      return unstack_tree(stacked)
    if self.kind == "sharded":
      return self._shard(stacked)
    return stacked

  def exit(self, internal: Any, num: int) -> Any:
    """Internal form -> stacked pytree of ``num`` models."""
    if self.name == "loop":
      return stack_trees(internal)
    if self.kind == "sharded":
      return slice_models(internal, 0, num)
    return internal

  def enter_args(self, stacked: Any) -> Any:
    """Per-model arguments (stacked arrays) -> internal form (same rules as states)."""
    return self.enter(stacked)

  # -- compiling --------------------------------------------------------------------------
  def compile(self, fn: Callable, num_per_model: int, donate_state: bool = True) -> Callable:
    """Stacked version of ``fn(state, *per_model_args, *shared_args) -> (state, out)``.

    ``num_per_model`` is the number of per-model positional arguments *after* the state. The
    returned callable takes the state and per-model arguments in internal form and the shared
    arguments as they are; it returns the new internal state and the stacked outputs.
    """
    donate = (0,) if donate_state else ()
    if self.name == "loop":
      jitted = jax.jit(fn, donate_argnums=donate)

      def run_loop(state, *args):
        per_model, shared = args[:num_per_model], args[num_per_model:]
        results = [jitted(s, *(a[m] for a in per_model), *shared) for m, s in enumerate(state)]
        states = [r[0] for r in results]
        return states, stack_trees([r[1] for r in results])

      return run_loop
    in_axes = (0,) + (0,) * num_per_model

    def vmapped(state, *args):
      with self._tracing():
        return jax.vmap(fn, in_axes=in_axes + (None,) * (len(args) - num_per_model),
                        **self._vmap_kw)(state, *args)

    return jax.jit(vmapped, donate_argnums=donate)

  def map(self, fn: Callable, num_per_model: int) -> Callable:
    """Stacked version of a stateless ``fn(*per_model_args, *shared_args) -> out``.

    Per-model arguments are ordinary stacked pytrees here (no internal form); returns stacked out.
    """
    if self.name == "loop":
      jitted = jax.jit(fn)

      def run_loop(*args):
        per_model, shared = args[:num_per_model], args[num_per_model:]
        n = num_models(per_model[0])
        return stack_trees([
            jitted(*(jax.tree.map(lambda x, m=m: x[m], a) for a in per_model), *shared)
            for m in range(n)])

      return run_loop

    @jax.jit
    def run_vmap(*args):
      axes = (0,) * num_per_model + (None,) * (len(args) - num_per_model)
      with self._tracing():
        return jax.vmap(fn, in_axes=axes, **self._vmap_kw)(*args)

    if self.kind == "sharded":
      def run_sharded(*args):
        per_model, shared = args[:num_per_model], args[num_per_model:]
        n = num_models(per_model[0])
        out = run_vmap(*(self._shard(a) for a in per_model), *shared)
        return slice_models(out, 0, n)
      return run_sharded
    return run_vmap

  # -- sharding helpers -------------------------------------------------------------------
  @functools.cached_property
  def _mesh(self) -> Mesh:
    devices = np.array(jax.local_devices())
    if self.data_axis == 1:
      return Mesh(devices, ("models",))
    if len(devices) % self.data_axis:
      raise ValueError(f"{self.name}: {len(devices)} local devices do not split into groups of "
                       f"{self.data_axis}; choose D dividing {len(devices)}")
    return Mesh(devices.reshape(-1, self.data_axis), ("models", "data"))

  @property
  def _vmap_kw(self) -> dict:
    return {"spmd_axis_name": "models"} if self.data_axis > 1 else {}

  def _tracing(self):
    """Makes `shard_batch` constrain batches to this strategy's data axis while tracing."""
    if self.data_axis == 1:
      return contextlib.nullcontext()
    return _set_data_mesh(self._mesh)

  def _shard(self, stacked: Any) -> Any:
    """Pads the model axis to a multiple of the mesh's model axis and shards it."""
    devices = self._mesh.shape["models"]
    n = num_models(stacked)
    pad = (-n) % devices
    if pad:
      stacked = jax.tree.map(
          lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]), stacked)
    sharding = NamedSharding(self._mesh, P("models"))
    return jax.device_put(stacked, sharding)


@contextlib.contextmanager
def _set_data_mesh(mesh: Mesh):
  token = _DATA_MESH.set(mesh)
  try:
    yield
  finally:
    _DATA_MESH.reset(token)
