"""Your own model and data in three calls, no work directory: `unlearn`, `evaluate`, and the
audit (`jaxmu.attacks.audit` with `audit_frame` for a DataFrame view); `fit` trains the stacks
they start from.

Models follow jaxmu's convention: a Flax Linen module called as ``module(x, train=..., mask=...)``
(``mask``: [B] validity of the batch rows; BatchNorm statistics skip padding rows). Two adapters
cover the rest: `linen_model` for a Linen module without ``mask`` (and with another name for the
train flag, or none), `nnx_model` for a Flax NNX module. Arrays come from NumPy: images NHWC
(uint8 pixels are divided by 255; float images are taken as they are) or feature rows [N, D],
integer labels. Variables are stacked over seeds: every leaf has a leading model axis, one model
per seed (`stack`).

Each method runs exactly as in the DeepUnlearn pipeline (`jaxmu.methods`); the metrics are the
pipeline's (`pipelines.deepunlearn.stack_metrics`, deepunlearn-spec 6). Deviation with the
adapters: a module without ``mask`` sees the padding rows of a last partial batch in its
BatchNorm statistics (docs/deviations.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmu import engine, parallel, train

__all__ = ["DEFAULT_RECIPE", "audit_frame", "evaluate", "fit", "linen_model", "nnx_model", "stack",
           "unlearn"]

# Batches of 128, no augmentation, inputs as they are (x / 255 for integer images); pass your
# own `jaxmu.train.Recipe` for the pipeline's crop-and-flip, normalisation or bf16.
DEFAULT_RECIPE = train.Recipe(batch_size=128, augment="none")


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinenModel:
  """A Linen module without jaxmu's ``(x, train, mask)`` call: ``train_arg`` names its train flag
  (``None``: it has none); ``mask`` is dropped."""

  module: Any
  train_arg: str | None = "train"

  def _flag(self, train: bool) -> dict[str, bool]:
    return {self.train_arg: train} if self.train_arg else {}

  def init(self, rngs, x, train: bool = False):
    return self.module.init(rngs, x, **self._flag(train))

  def apply(self, variables, x, *, train: bool = False, mask=None, **kwargs):
    del mask
    return self.module.apply(variables, x, **self._flag(train), **kwargs)


@dataclasses.dataclass(frozen=True)
class NNXModel:
  """A Flax NNX module as a pure function of ``{"params", "batch_stats"}`` (its `nnx.Param` and
  `nnx.BatchStat` state as plain dicts): merged, put in train or eval mode, called on ``x``.

  ``make(rngs) -> module`` builds a fresh module; the methods that re-initialise a model
  (``retrain``, ``iam_ascent``) need it. L-CODEC reads Linen intermediates and is not available.
  """

  graphdef: Any
  make: Callable[[Any], Any] | None = None

  def init(self, rngs, x, train: bool = False):
    from flax import nnx
    del x, train
    if self.make is None:
      raise ValueError("this method re-initialises the model: pass nnx_model(module, "
                       "make=lambda rngs: YourModule(..., rngs=rngs))")
    key = rngs["params"] if isinstance(rngs, Mapping) else rngs
    return _nnx_variables(self.make(nnx.Rngs(key)))[1]

  def apply(self, variables, x, *, train: bool = False, mask=None, rngs=None, mutable=(),
            capture_intermediates=False):
    from flax import nnx
    del mask, rngs
    if capture_intermediates:
      raise ValueError("L-CODEC reads Linen intermediates; it does not run on NNX modules")
    module = nnx.merge(self.graphdef, dict(variables["params"]),
                       dict(variables.get("batch_stats", {})))
    module.train() if train else module.eval()
    logits = module(x)
    if not mutable:
      return logits
    _, _, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    return logits, {"batch_stats": nnx.to_pure_dict(stats)}


def _nnx_variables(module) -> tuple[Any, dict[str, Any]]:
  from flax import nnx
  graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  if jax.tree_util.tree_leaves(nnx.to_pure_dict(rest)):
    raise ValueError("nnx_model supports modules whose state is nnx.Param and nnx.BatchStat "
                     f"only; this one also holds {sorted(nnx.to_pure_dict(rest))}")
  return graphdef, {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}


def linen_model(module, train_arg: str | None = "train") -> LinenModel:
  """A Linen module called as ``module(x, **{train_arg: train})`` (or ``module(x)``) in jaxmu's
  convention. Its variables from ``module.init`` are used as they are."""
  return LinenModel(module, train_arg)


def nnx_model(module, make: Callable[[Any], Any] | None = None) -> tuple[NNXModel, dict]:
  """An NNX module -> (model in jaxmu's convention, its variables ``{"params", "batch_stats"}``
  for one model; `stack` them over seeds)."""
  graphdef, variables = _nnx_variables(module)
  return NNXModel(graphdef, make), variables


# --------------------------------------------------------------------------------------------
# Data, stacks, recipes
# --------------------------------------------------------------------------------------------


def _device_data(data) -> tuple[train.DeviceData, int]:
  """``(x, y)`` NumPy arrays or a `jaxmu.data.Dataset` -> (device data, number of classes)."""
  if hasattr(data, "inputs") and hasattr(data, "labels"):
    x, y, num_classes = data.inputs, data.labels, getattr(data, "num_classes", None)
  else:
    x, y = data
    num_classes = None
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim not in (2, 4):
    raise ValueError(f"data x has shape {x.shape}: expected images [N, H, W, C] or rows [N, D]")
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"data y must be [N] integer labels for the {len(x)} inputs, got "
                     f"{y.dtype} {y.shape}")
  if len(y) and (y.min() < 0 or y.max() >= np.iinfo(np.int32).max):
    raise ValueError("data y: labels must lie in [0, 2**31 - 1)")
  if not np.issubdtype(x.dtype, np.integer):
    x = x.astype(np.float32)
  data = train.DeviceData(jnp.asarray(x), jnp.asarray(y, jnp.int32))
  return data, int(num_classes or (y.max() + 1 if len(y) else 0))


def _indices(name: str, value, n: int, num_models: int) -> list[np.ndarray]:
  """An index array or a boolean mask over the data, or one per model -> one index array per
  model."""
  per_model = isinstance(value, (list, tuple)) and len(value) and np.ndim(value[0]) == 1
  values = list(value) if per_model else [value] * num_models
  if len(values) != num_models:
    raise ValueError(f"{name}: {len(values)} index sets for {num_models} seeds")
  out = []
  for v in values:
    v = np.asarray(v)
    if v.dtype == bool:
      if v.shape != (n,):
        raise ValueError(f"{name}: a boolean mask must have one entry per sample ({n}), got "
                         f"{v.shape}")
      v = np.flatnonzero(v)
    if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer) or (len(v) and (
        v.min() < 0 or v.max() >= n)):
      raise ValueError(f"{name}: expected indices in [0, {n}) or a boolean mask of {n}")
    out.append(v.astype(np.int32))
  return out


def stack(variables: Sequence[Mapping[str, Any]] | Mapping[str, Any], n: int | None = None):
  """One model's variables repeated ``n`` times, or a list of per-seed variables, stacked on a
  leading model axis."""
  if isinstance(variables, Mapping):
    return jax.tree.map(lambda v: jnp.repeat(jnp.asarray(v)[None], n or 1, axis=0),
                        dict(variables))
  return jax.tree.map(lambda *vs: jnp.stack([jnp.asarray(v) for v in vs]),
                      *[dict(v) for v in variables])


def _with_batch_stats(variables: Mapping[str, Any]) -> dict[str, Any]:
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _check_stacked(name: str, variables, num_models: int) -> dict[str, Any]:
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(f"{name}: expected variables {{'params': ..., 'batch_stats': ...}}, "
                     f"stacked over seeds (jaxmu.stack)")
  leading = {np.shape(leaf)[0] if np.ndim(leaf) else None
             for leaf in jax.tree_util.tree_leaves(variables["params"])}
  if leading != {num_models}:
    raise ValueError(f"{name}: every leaf needs a leading model axis of {num_models} (one model "
                     f"per seed; jaxmu.stack(variables, {num_models})), got {sorted(map(str, leading))}")
  return _with_batch_stats(variables)


# --------------------------------------------------------------------------------------------
# The calls
# --------------------------------------------------------------------------------------------


def fit(model, data, indices, *, epochs: int, seeds: Sequence[int] = (0,),
        recipe: train.Recipe | None = None, learning_rate: float = 0.1,
        weight_decay: float = 5e-4, momentum: float = 0.9, strategy: str = "auto",
        progress: bool = False) -> dict[str, Any]:
  """Trains one model per seed from its own initialisation (``model.init`` with key
  ``fold_in(key(0), seed)``) on ``indices`` (shared, or one set per seed) with SGD and a cosine
  schedule (`train.fit`); returns the stacked variables."""
  device, _ = _device_data(data)
  recipe = recipe or DEFAULT_RECIPE
  inits = _with_batch_stats(train.init_variables(
      model, engine.model_keys(jax.random.key(0), tuple(seeds)), device.inputs.shape[1:]))
  state = train.create_state(inits, recipe, learning_rate=learning_rate,
                             weight_decay=weight_decay, momentum=momentum)
  sets = _indices("indices", indices, len(device.labels), len(seeds))
  result = train.fit(model, state, device, sets, recipe, epochs, jax.random.key(0),
                     model_ids=seeds, strategy=strategy, progress=progress)
  return {"params": result.state.params, "batch_stats": result.state.batch_stats}


def unlearn(method: str, model, variables, data, *, forget, retain=None, val=None,
            hparams: Mapping[str, Any] | None = None, seeds: Sequence[int] = (0,),
            recipe: train.Recipe | None = None, train_epochs: int = 0,
            strategy: str = "auto", timed: bool = False):
  """Unlearns ``forget`` from each seed's model with ``method`` (`jaxmu.methods`, e.g.
  ``"finetune"``, ``"msg"``, ``"scrub"``); returns the unlearned variables stacked over seeds
  (and the wall seconds per model without compilation when ``timed``).

  Args:
    variables: the trained models, stacked over ``seeds`` (`fit`, or `stack` of your own).
    data: ``(x, y)`` NumPy arrays (or a `jaxmu.data.Dataset`) that the index sets point into.
    forget, retain, val: index arrays or boolean masks over ``data`` (shared, or one per seed);
      ``retain`` defaults to every sample in neither ``forget`` nor ``val``; ``val`` (held-out
      samples) is needed by SCRUB, L-CODEC, FORSAKEN and KDE only.
    hparams: overrides of the method's reference defaults (`Method.defaults`).
    seeds: one PRNG stream per model (``fold_in(key(0), seed)``), as the pipeline's seeds.
    recipe: batch size, augmentation, normalisation and dtype (default `DEFAULT_RECIPE`).
    train_epochs: the original training's epochs (the ``retrain`` method's default length).
  """
  from jaxmu import methods as methods_lib
  chosen = methods_lib.get(method)
  device, num_classes = _device_data(data)
  n = len(device.labels)
  originals = _check_stacked("variables", variables, len(seeds))
  forget_sets = _indices("forget", forget, n, len(seeds))
  val_sets = (_indices("val", val, n, len(seeds)) if val is not None
              else [np.zeros(0, np.int32)] * len(seeds))
  if "val" in chosen.uses and not any(len(v) for v in val_sets):
    raise ValueError(f"method {chosen.name!r} reads held-out samples: pass val=")
  if retain is None:
    retain_sets = [np.setdiff1d(np.arange(n), np.concatenate([f, v])).astype(np.int32)
                   for f, v in zip(forget_sets, val_sets)]
  else:
    retain_sets = _indices("retain", retain, n, len(seeds))
  recipe = recipe or DEFAULT_RECIPE
  key = jax.random.key(0)
  inits = _with_batch_stats(train.init_variables(
      model, engine.model_keys(key, tuple(seeds)), device.inputs.shape[1:])) \
      if _reinitialises(chosen) else originals
  ctx = methods_lib.Context.create(
      model, recipe, device, originals, inits, retain_sets, forget_sets, val_sets,
      model_ids=tuple(seeds), num_classes=num_classes, strategy=strategy,
      train_epochs=train_epochs)
  result = chosen.run(ctx, hparams, key)
  states = _with_batch_stats(result.states)
  return (states, result.seconds / len(seeds)) if timed else states


def _reinitialises(method) -> bool:
  """Whether ``method`` reads `Context.inits` (only the retrained reference does)."""
  return method.name == "retrain"


def evaluate(model, unlearned: Mapping[str, Mapping[str, Any]], data, *, original, retrained,
             forget, retain, val, test, seconds: Mapping[str, float] | None = None,
             retrain_seconds: float | None = None, recipe: train.Recipe | None = None,
             strategy: str = "auto"):
  """The DeepUnlearn metrics (deepunlearn-spec 6) of each unlearned stack against the retrained
  reference of the same seed, as a `pandas.DataFrame` with one row per (method, seed): the
  accuracies on retain / forget / val / test, Val/Test-MIA, Indisc, RR/FR/TR, RetDev, RTE
  (when ``seconds`` and ``retrain_seconds`` are given) and the model distances; rows
  ``original`` and ``retrain`` first.

  Args:
    unlearned: {method name: stacked variables} (the output of `unlearn`).
    original, retrained: the stacked models before unlearning and retrained without ``forget``.
    forget, retain, val, test: index arrays or masks over ``data``, shared by every seed.
    seconds: {method name: wall seconds per model}; retrain_seconds: the retraining's.
  """
  import pandas as pd

  from jaxmu.pipelines import deepunlearn
  device, _ = _device_data(data)
  n = len(device.labels)
  num_models = parallel.num_models(original["params"])
  parts = {name: _indices(name, value, n, 1)[0] for name, value in
           (("retain", retain), ("forget", forget), ("val", val), ("test", test))}
  references = {"original": _check_stacked("original", original, num_models),
                "retrain": _check_stacked("retrained", retrained, num_models)}
  recipe = recipe or DEFAULT_RECIPE
  strategy = parallel.Strategy.create(strategy)
  measure = lambda variables, reference, secs: deepunlearn.stack_metrics(  # noqa: E731
      model, variables, references, device, parts, recipe, reference, secs,
      retrain_seconds or 0.0, strategy)
  retrain_rows = measure(references["retrain"], None, retrain_seconds)
  reference = {s: np.asarray([r[f"{s}_acc"] for r in retrain_rows]) for s in deepunlearn.SPLITS}
  groups = {"original": (references["original"], None), "retrain": (None, retrain_rows),
            **{name: (_check_stacked(name, v, num_models), (seconds or {}).get(name))
               for name, v in unlearned.items()}}
  rows = []
  for name, (variables, extra) in groups.items():
    found = extra if name == "retrain" else measure(variables, reference, extra)
    rows += [{"method": name, "seed": m, **r} for m, r in enumerate(found)]
  return pd.DataFrame(rows)


def audit_frame(result, per_sample: bool = False):
  """`jaxmu.attacks.audit`'s result as a `pandas.DataFrame`: one row per attack (AUC, balanced
  accuracy, TPR at FPR and TNR at FNR; needs a forget mask), or with ``per_sample`` one column
  per attack and one row per query sample (unlearning scores, high = looks unlearned)."""
  import pandas as pd

  from jaxmu.attacks.audit import summary_rows
  if per_sample:
    return pd.DataFrame({name: np.asarray(s) for name, s in result.scores.items()})
  return pd.DataFrame(summary_rows(result)).set_index("attack")
