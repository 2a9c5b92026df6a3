"""The functional training core: a stack of N models trained as one unit.

Every leaf of a `TrainState` carries a leading model axis of size N. Each model of a stack has its
own index set into one dataset that lives on the device (`DeviceData`), its own PRNG stream
(``fold_in(key, model_id)``) for shuffling, augmentation and stochastic depth, and its own
hyper-parameters (learning rate, weight decay, momentum are per-model arrays in the state, so
stacks that differ only in them share one compiled program).

Reference recipes (deepunlearn-spec 3, iam-spec 6.2): cross-entropy; SGD with momentum and
*coupled* weight decay (``add_decayed_weights`` before ``sgd``, PyTorch's ``weight_decay``) or Adam
with coupled L2; cosine schedule ``lr0 * (1 + cos(pi t / T_max)) / 2`` stepped per epoch (PyTorch's
``CosineAnnealingLR`` stepped once an epoch) or per step; on-device random crop + flip.

Batches follow PyTorch's ``drop_last=False``: an index set of n samples gives ceil(n / B) steps
per epoch, the last one partial. A partial batch is padded with index -1; padded samples carry
zero weight in the loss and are masked out of BatchNorm statistics (models take ``mask=``), so a
partial batch behaves as a smaller batch. A model with fewer steps than its stack-mates sees
all-padding steps, which change nothing (no update, no momentum, no BatchNorm statistics, no step
count). Hence a model trained inside a stack equals the same model trained alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxmu import checkpoint, engine, parallel, timing
from jaxmu.data import augment as augment_lib

HPARAMS = ("learning_rate", "weight_decay", "momentum")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The static part of a training recipe: one compiled program per recipe.

  Per-model numbers (learning rate, weight decay, momentum) are not here but in `TrainState`.
  """

  batch_size: int = 256
  optimizer: str = "sgd"  # sgd | adam (both with coupled L2 weight decay)
  schedule: str = "cosine"  # cosine | constant
  schedule_unit: str = "epoch"  # epoch | step
  t_max: int = 0  # cosine period in schedule units; 0 = the length of the fit
  augment: str = "crop_flip"  # crop_flip | flip | none
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)
  bn_train: bool = True  # BatchNorm in train mode (batch statistics, updated) while updating
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 (master params, optimiser state and
  # BatchNorm statistics stay float32; see `compute_variables`)

  def __post_init__(self):
    _check_choice("optimizer", self.optimizer, ("sgd", "adam"))
    _check_choice("schedule", self.schedule, ("cosine", "constant"))
    _check_choice("schedule_unit", self.schedule_unit, ("epoch", "step"))
    _check_choice("augment", self.augment, ("crop_flip", "flip", "none"))
    _check_choice("dtype", self.dtype, DTYPES)
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"{field}={value!r} is not one of {tuple(allowed)}")


@flax.struct.dataclass
class TrainState:
  """Training state of a stack of models; every leaf has a leading model axis."""

  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array  # int32: number of real (non-padding) updates done
  hparams: dict[str, jax.Array]  # float32 learning_rate, weight_decay, momentum

  @property
  def variables(self) -> dict[str, Any]:
    return as_variables(self.params, self.batch_stats)


def as_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  """Flax variables dict; models without BatchNorm have no ``batch_stats`` collection."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def compute_variables(recipe: Recipe, params: Any, batch_stats: Any) -> dict[str, Any]:
  """Mixed precision: the variables a forward pass sees, params cast to ``recipe.dtype``.

  The float32 master params stay outside (gradients flow back through the cast in float32);
  BatchNorm statistics are not cast, and Flax's BatchNorm reduces in float32, so running means and
  variances are float32 updates of float32 numbers. Flax layers without an explicit ``dtype``
  compute in the dtype of their inputs and params, hence in bf16 under ``dtype="bfloat16"``.
  """
  if recipe.dtype != "float32":
    params = jax.tree.map(lambda p: p.astype(recipe.dtype), params)
  return as_variables(params, batch_stats)


class DeviceData(NamedTuple):
  """A whole dataset on the device: uint8 inputs (NHWC or [N, D]) and int32 labels."""

  inputs: jax.Array
  labels: jax.Array

  @staticmethod
  def create(dataset) -> "DeviceData":
    return DeviceData(jnp.asarray(dataset.inputs), jnp.asarray(dataset.labels, jnp.int32))


class FitResult(NamedTuple):
  state: TrainState  # after the last epoch
  best: dict[str, Any] | None  # per model, the variables with the best validation accuracy
  best_accuracy: np.ndarray | None  # [N]
  history: list[dict[str, Any]]  # per epoch: per-model numpy metrics
  # The stack's training time over all epochs, also those before a resume: the epochs' compiled
  # work only (`jaxmu.timing`; no validation, checkpoints, callbacks). NaN: not timed.
  seconds: float = float("nan")
  compile_seconds: float = float("nan")  # JAX's tracing and compilation in those epochs


# --------------------------------------------------------------------------------------------
# Optimiser, schedule, inputs
# --------------------------------------------------------------------------------------------


def optimizer(recipe: Recipe, hparams: Mapping[str, jax.Array], learning_rate) -> optax.GradientTransformation:
  """SGD (momentum, dampening 0) or Adam (0.9, 0.999, 1e-8), both with coupled L2 decay."""
  decay = optax.add_decayed_weights(hparams["weight_decay"])
  if recipe.optimizer == "sgd":
    return optax.chain(decay, optax.sgd(learning_rate, momentum=hparams["momentum"]))
  return optax.chain(decay, optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                     optax.scale(-learning_rate))


def schedule_factor(recipe: Recipe, epoch, step, t_max):
  """Multiplier of the base learning rate at (epoch, step): cosine annealing to 0 or 1."""
  if recipe.schedule == "constant":
    return jnp.float32(1.0)
  t = epoch if recipe.schedule_unit == "epoch" else step
  return 0.5 * (1.0 + jnp.cos(jnp.pi * t / t_max))


# --------------------------------------------------------------------------------------------
# State creation
# --------------------------------------------------------------------------------------------


def init_variables(model, keys: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
  """One initialisation per key, stacked: ``keys`` has shape [N] (typed keys)."""
  return _compiled_init(model, tuple(input_shape))(keys)


@functools.lru_cache(maxsize=None)
def _compiled_init(model, input_shape: tuple[int, ...]) -> Callable:
  """One jitted initialiser per (model, input shape), so repeated calls do not recompile."""
  def init(key):  # the dummy input is built inside: a cached closure must not hold a tracer
    return model.init({"params": key}, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  return jax.jit(jax.vmap(init))


def create_state(variables: Mapping[str, Any], recipe: Recipe, **hparams) -> TrainState:
  """A fresh stacked train state (zero momentum) from stacked variables.

  ``hparams``: learning_rate, weight_decay, momentum, each a float (same for every model) or a
  sequence of N floats (one per model).
  """
  unknown = set(hparams) - set(HPARAMS)
  if unknown:
    raise ValueError(f"unknown hyper-parameters {sorted(unknown)}; known: {HPARAMS}")
  params = variables["params"]
  n = parallel.num_models(params)
  values = {"learning_rate": 0.1, "weight_decay": 5e-4, "momentum": 0.9, **hparams}
  per_model = {}
  for name, value in values.items():
    arr = jnp.broadcast_to(jnp.asarray(value, jnp.float32), (n,))
    per_model[name] = arr
  tx = optimizer(recipe, {k: 0.0 for k in HPARAMS}, 0.0)
  return TrainState(
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=jax.vmap(tx.init)(params),
      step=jnp.zeros((n,), jnp.int32),
      hparams=per_model,
  )


def pad_index_sets(index_sets: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
  """A list of N index arrays (any sizes) -> int32 [N, L] padded at the end with -1."""
  if isinstance(index_sets, np.ndarray) and index_sets.ndim == 2:
    return index_sets.astype(np.int32)
  sets = [np.asarray(s).reshape(-1) for s in index_sets]
  if not sets:
    raise ValueError("need at least one index set")
  out = np.full((len(sets), max(len(s) for s in sets)), -1, np.int32)
  for m, s in enumerate(sets):
    if len(s) and (s.min() < 0):
      raise ValueError(f"index set {m} has negative indices")
    out[m, :len(s)] = s
  return out


# --------------------------------------------------------------------------------------------
# Per-model pure functions
# --------------------------------------------------------------------------------------------


def train_step(model, recipe: Recipe, state: TrainState, orders, key: jax.Array, hp, inputs,
               labels, step_index, epoch, lr_factor):
  """One SGD step of one model on batch ``step_index`` of its epoch order ``orders["train"]``
  (an `engine` step; ``hp["t_max"]`` is the cosine period, the learning rate follows from the
  state's step count or ``epoch``, ``lr_factor`` is unused).

  Returns the new state and ``loss_sum``, ``correct``, ``count`` over the real samples.
  """
  del lr_factor
  idx = parallel.shard_batch(engine.batch(orders["train"], step_index, recipe.batch_size))
  valid = idx >= 0
  safe = jnp.where(valid, idx, 0)
  aug_key, drop_key = jax.random.split(jax.random.fold_in(key, step_index))
  x = augment_lib.normalize(augment_lib.augment(aug_key, inputs[safe], recipe.augment),
                              recipe.mean, recipe.std).astype(recipe.dtype)
  x = parallel.shard_batch(x)
  y = labels[safe]
  weight = valid.astype(jnp.float32)
  count = weight.sum()

  def loss_fn(params):
    variables = compute_variables(recipe, params, state.batch_stats)
    if recipe.bn_train and state.batch_stats:
      logits, updates = model.apply(variables, x, train=True, mask=valid,
                                    rngs={"droppath": drop_key}, mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      logits = model.apply(variables, x, train=recipe.bn_train, mask=valid,
                           rngs={"droppath": drop_key})
      batch_stats = state.batch_stats
    logits = logits.astype(jnp.float32)
    per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, y) * weight
    return per_sample.sum() / jnp.maximum(count, 1.0), (logits, batch_stats, per_sample.sum())

  grads, (logits, batch_stats, loss_sum) = jax.grad(loss_fn, has_aux=True)(state.params)
  lr = state.hparams["learning_rate"] * schedule_factor(recipe, epoch, state.step, hp["t_max"])
  updates, opt_state = optimizer(recipe, state.hparams, lr).update(
      grads, state.opt_state, state.params)
  new = state.replace(params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
                      opt_state=opt_state, step=state.step + 1)
  any_valid = count > 0
  new = jax.tree.map(lambda a, b: jnp.where(any_valid, a, b), new, state)
  correct = ((jnp.argmax(logits, -1) == y) * weight).sum()
  return new, {"loss_sum": loss_sum, "correct": correct, "count": count}


def logits(model, recipe: Recipe, variables, inputs: jax.Array, batch: jax.Array) -> jax.Array:
  """Eval-mode float32 logits of one model on ``inputs[batch]`` (no augmentation), computed in
  ``recipe.dtype``."""
  x = augment_lib.normalize(inputs[batch], recipe.mean, recipe.std).astype(recipe.dtype)
  variables = compute_variables(recipe, variables["params"], variables.get("batch_stats", {}))
  return model.apply(variables, x, train=False).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _compiled_logits(model, recipe: Recipe, strategy: parallel.Strategy) -> Callable:
  """Cached per (model, recipe, strategy): predictions that differ only in variables share it."""
  return strategy.map(functools.partial(logits, model, recipe), 1)


# --------------------------------------------------------------------------------------------
# Stack-level drivers
# --------------------------------------------------------------------------------------------


def predict(model, variables: Mapping[str, Any], data: DeviceData, indices: np.ndarray,
            recipe: Recipe, strategy: parallel.Strategy | str = "auto", batch_size: int = 1024) -> np.ndarray:
  """Per-model per-sample logits [N, len(indices), C] (eval-mode BatchNorm, no augmentation)."""
  fn = _compiled_logits(model, recipe, parallel.Strategy.create(strategy))
  return predict_batches(fn, variables, data, indices, batch_size)


def predict_batches(fn: Callable, variables: Mapping[str, Any], data: DeviceData,
                    indices: np.ndarray, batch_size: int) -> np.ndarray:
  """Runs a stacked ``fn(variables, inputs, batch) -> [N, B, ...]`` over ``indices`` in batches of
  ``batch_size`` (the last padded, so one program serves every batch); returns [N, len, ...]."""
  indices = np.asarray(indices, np.int32)
  out = []
  for start in range(0, len(indices), batch_size):
    batch = indices[start:start + batch_size]
    real = len(batch)
    batch = np.pad(batch, (0, batch_size - real)) if len(indices) > batch_size else batch
    out.append(np.asarray(fn(variables, data.inputs, jnp.asarray(batch)))[:, :real])
  return np.concatenate(out, axis=1)


def evaluate(model, variables: Mapping[str, Any], data: DeviceData, index_sets, recipe: Recipe,
             strategy: parallel.Strategy | str = "auto", batch_size: int = 1024) -> dict[str, np.ndarray]:
  """Accuracy and mean loss of each model on its own index set.

  ``index_sets``: one array shared by all models, or one per model (list or padded [N, L]).
  Returns ``accuracy`` [N], ``loss`` [N], and ``per_sample_loss`` [N, L] (NaN at padding).
  """
  n = parallel.num_models(variables["params"])
  sets = pad_index_sets([index_sets] * n if _is_shared(index_sets) else index_sets)
  union, inverse = np.unique(sets[sets >= 0], return_inverse=True)
  logits = predict(model, variables, data, union, recipe, strategy, batch_size)
  labels = np.asarray(data.labels)[union]
  loss = numpy_cross_entropy(logits, labels)
  correct = logits.argmax(-1) == labels
  position = np.full(sets.shape, -1)
  position[sets >= 0] = inverse
  valid = sets >= 0
  rows = np.arange(n)[:, None]
  per_sample = np.where(valid, loss[rows, np.maximum(position, 0)], np.nan)
  hits = np.where(valid, correct[rows, np.maximum(position, 0)], False)
  counts = np.maximum(valid.sum(1), 1)
  return {"accuracy": hits.sum(1) / counts, "loss": np.nansum(per_sample, 1) / counts,
          "per_sample_loss": per_sample}


def _is_shared(index_sets) -> bool:
  """One index array for every model (vs. a list of arrays or a padded [N, L] array)."""
  return isinstance(index_sets, np.ndarray) and index_sets.ndim == 1


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-model per-sample -log p_y of [M, N, C] logits and [N] labels, in NumPy."""
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, labels[None, :, None], -1)[..., 0]


def fit(model, state: TrainState, data: DeviceData, index_sets, recipe: Recipe, epochs: int,
        key: jax.Array, *, model_ids: Sequence[int] | None = None,
        strategy: parallel.Strategy | str = "auto",
        val_sets=None, checkpoints=None, checkpoint_every: int = 1,
        on_epoch: Callable[[int, dict[str, np.ndarray]], None] | None = None,
        max_models_per_program: int | None = None, progress: bool | str = True) -> FitResult:
  """Trains every model of a stack for ``epochs`` epochs on its own index set.

  Args:
    state: stacked `TrainState` of N models (fresh from `create_state`, or trained: continued).
    index_sets: N index arrays into ``data`` (list of arrays of any sizes, or padded [N, L]).
    key: the run's key; model m uses ``fold_in(key, model_ids[m])`` (default ids 0..N-1).
    val_sets: if given (shared array or one per model), each epoch evaluates validation accuracy
      and `FitResult.best` keeps, per model, the variables of its best epoch (first best wins).
    checkpoints: a `jaxmu.checkpoint.TrainingCheckpoints`; every ``checkpoint_every`` epochs the
      whole fit state is saved, and a fit started again resumes from the latest one and ends
      with the same numbers as an uninterrupted run (and the time of the epochs it restored).
    on_epoch: called with (epoch, metrics) after each epoch; metrics are per-model arrays, with
      the models' ids under "model" (`stages.Workdir.append_metrics` writes one row per model).
    max_models_per_program: train the stack in chunks of at most this many models.
  """
  index_sets = pad_index_sets(index_sets)
  n = parallel.num_models(state.params)
  if index_sets.shape[0] != n:
    raise ValueError(f"{index_sets.shape[0]} index sets for a stack of {n} models")
  model_ids = np.arange(n) if model_ids is None else np.asarray(model_ids)
  chunk = max_models_per_program or n
  if chunk < n:
    parts = []
    for c, start in enumerate(range(0, n, chunk)):
      stop = min(start + chunk, n)
      sub_val = val_sets if val_sets is None or _is_shared(val_sets) else val_sets[start:stop]
      parts.append(fit(
          model, jax.tree.map(lambda x: x[start:stop], state), data, index_sets[start:stop],
          recipe, epochs, key, model_ids=model_ids[start:stop], strategy=strategy,
          val_sets=sub_val, checkpoints=checkpoints and checkpoint.TrainingCheckpoints(
              checkpoints.dir / f"chunk{c}", checkpoints.keep),
          checkpoint_every=checkpoint_every, on_epoch=on_epoch, progress=progress))
    return _merge_results(parts)
  return _fit_stack(model, state, data, index_sets, recipe, epochs, key, model_ids, strategy,
                    val_sets, checkpoints, checkpoint_every, on_epoch, progress)


def _merge_results(parts: Sequence[FitResult]) -> FitResult:
  state = parallel.concat_models([p.state for p in parts])
  has_best = parts[0].best is not None
  history = [
      {k: np.concatenate([p.history[e][k] for p in parts]) if np.ndim(v) else v
       for k, v in parts[0].history[e].items()}
      for e in range(len(parts[0].history))]
  return FitResult(
      state=state,
      best=parallel.concat_models([p.best for p in parts]) if has_best else None,
      best_accuracy=np.concatenate([p.best_accuracy for p in parts]) if has_best else None,
      history=history, seconds=sum(p.seconds for p in parts),
      compile_seconds=sum(p.compile_seconds for p in parts))


def _fit_stack(model, state, data, index_sets, recipe, epochs, key, model_ids, strategy, val_sets,
               checkpoints, checkpoint_every, on_epoch, progress) -> FitResult:
  strategy = parallel.Strategy.create(strategy)
  n = index_sets.shape[0]
  steps = engine.steps_per_epoch(index_sets, recipe.batch_size)
  t_max = recipe.t_max or (epochs if recipe.schedule_unit == "epoch" else epochs * steps)
  best, best_acc, history, start, seconds, compile_seconds = None, None, [], 0, 0.0, 0.0
  if val_sets is not None:
    best, best_acc = jax.tree.map(jnp.copy, state.variables), np.full((n,), -np.inf)
  if checkpoints is not None and checkpoints.latest() is not None:
    start = checkpoints.latest()
    saved = checkpoints.restore(start, {"state": state, "best": best, "best_acc": best_acc})
    state, best, best_acc = saved["state"], saved["best"], saved["best_acc"]
    meta = checkpoints.metadata(start)
    history = [{k: np.asarray(v) for k, v in record.items()} for record in meta["history"]]
    # A checkpoint written before times were stored: the total is unknown (NaN, so no RTE).
    seconds, compile_seconds = (meta.get(k, float("nan")) for k in ("seconds", "compile_seconds"))

  runs = engine.epochs(
      train_step, (model, recipe), state, {"train": engine.Source(index_sets, recipe.batch_size)},
      {"t_max": jnp.full((n,), t_max, jnp.float32)}, data.inputs, data.labels,
      engine.model_keys(key, model_ids), strategy, range(start, epochs), streams=engine.TRAINING)
  bar = tqdm(timing.timed(runs), desc=progress if isinstance(progress, str) else "train",
             disable=not progress, initial=start, total=epochs, leave=False)
  for (epoch, state, summed), clock in bar:
    seconds += clock.work_seconds
    compile_seconds += clock.seconds
    count = np.maximum(summed["count"], 1)
    record = {"epoch": epoch + 1, "loss": summed["loss_sum"] / count,
              "accuracy": summed["correct"] / count,
              "learning_rate": np.asarray(state.hparams["learning_rate"]) * float(
                  schedule_factor(recipe, epoch, 0, t_max))}
    if val_sets is not None:
      val = evaluate(model, state.variables, data, val_sets, recipe, strategy)["accuracy"]
      improved = val > best_acc
      best = _select_models(improved, state.variables, best)
      best_acc = np.where(improved, val, best_acc)
      record["val_accuracy"] = val
    history.append(record)
    if on_epoch is not None:
      on_epoch(epoch + 1, {**record, "model": np.asarray(model_ids)})  # ids: metrics.jsonl rows
    bar.set_postfix(loss=f"{record['loss'].mean():.3f}", acc=f"{record['accuracy'].mean():.3f}")
    done = epoch + 1
    if checkpoints is not None and (done % checkpoint_every == 0 or done == epochs):
      checkpoints.save(done, {"state": state, "best": best, "best_acc": best_acc},
                       metadata={"history": _jsonable(history), "seconds": seconds,
                                 "compile_seconds": compile_seconds})
  bar.close()
  return FitResult(state, best, best_acc, history, seconds, compile_seconds)


def _select_models(take_new: np.ndarray, new: Any, old: Any) -> Any:
  """Per model, the new tree where ``take_new[m]`` else the old one."""
  mask = jnp.asarray(take_new)
  return jax.tree.map(
      lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _jsonable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [{k: np.asarray(v).tolist() for k, v in r.items()} for r in history]
