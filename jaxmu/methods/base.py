"""What every unlearning method shares: the context, the method record, the stack engine.

A method unlearns a whole *stack* of models at once (each model a seed with its own original
weights and its own retain/forget/val index sets). It is written as pure per-model step functions
(``step(carry, orders, key, hp, inputs, labels, step_index, epoch, lr_factor)``) that `run_epochs`
hands to the one epoch driver, `jaxmu.engine`, under the context's `parallel.Strategy`. A step
brings only what is the method's own: its batches (`batch`, `inputs`), its loss over `forward`
(which applies the recipe's compute dtype), and `descend`, the shared gradient update.
Continuous hyper-parameters are per-model float32 arrays (one compiled program serves many
trials); discrete ones (epochs, batch sizes) are Python ints.

Structural edits (freeze, re-initialise, mask, transpose, prune, add noise) are pytree operations
on params selected by path (`jaxmu.models.param_groups`, `last_blocks`, `conv_kernel_mask`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxmu import engine, parallel, train
from jaxmu.timing import CompileClock
from jaxmu.data import augment as augment_lib

SOURCES = ("retain", "forget", "val")


# --------------------------------------------------------------------------------------------
# Context, result, method record, registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
  """Everything a method may read. Index sets are int32 [N, L] padded with -1 (one row a model).

  ``originals`` and ``inits`` are stacked variables ({"params", "batch_stats"}) of the N original
  models and of their initialisations (the retrained reference starts from ``inits``).
  """

  model: Any
  recipe: train.Recipe  # normalisation, the training augmentation, the original batch size
  data: train.DeviceData
  originals: Mapping[str, Any]
  inits: Mapping[str, Any]
  retain: np.ndarray
  forget: np.ndarray
  val: np.ndarray
  model_ids: tuple[int, ...]  # each model's PRNG stream: fold_in(key, model_id)
  num_classes: int
  input_shape: tuple[int, ...]
  strategy: parallel.Strategy = parallel.Strategy("loop")
  train_epochs: int = 0  # epochs of the original training (retrain, epoch budgets)
  train_hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)

  @staticmethod
  def create(model, recipe, data, originals, inits, retain, forget, val, model_ids, num_classes,
             strategy="auto", train_epochs=0, train_hparams=None) -> "Context":
    """Builds a context; index sets may be one array shared by all models or one per model."""
    n = parallel.num_models(originals["params"])
    sets = {name: _per_model(s, n, name) for name, s in
            (("retain", retain), ("forget", forget), ("val", val))}
    if len(model_ids) != n:
      raise ValueError(f"{len(model_ids)} model ids for a stack of {n} models")
    data = data if isinstance(data, train.DeviceData) else train.DeviceData.create(data)
    return Context(model, recipe, data, originals, inits, **sets, model_ids=tuple(model_ids),
                   num_classes=num_classes, input_shape=tuple(data.inputs.shape[1:]),
                   strategy=parallel.Strategy.create(strategy), train_epochs=train_epochs,
                   train_hparams=dict(train_hparams or {}))

  @property
  def num_models(self) -> int:
    return self.retain.shape[0]

  def keys(self, key: jax.Array) -> jax.Array:
    return engine.model_keys(key, self.model_ids)

  def index_sets(self, source: str) -> np.ndarray:
    if source not in SOURCES:
      raise ValueError(f"unknown data source {source!r}; one of {SOURCES}")
    return getattr(self, source)


def _per_model(sets, n: int, name: str) -> np.ndarray:
  if isinstance(sets, np.ndarray) and sets.ndim == 1:
    sets = [sets] * n
  padded = train.pad_index_sets(sets)
  if padded.shape[0] != n:
    raise ValueError(f"{padded.shape[0]} {name} index sets for a stack of {n} models")
  return padded


class UnlearnResult(NamedTuple):
  states: dict[str, Any]  # stacked variables of the unlearned models
  seconds: float  # wall time of the unlearning, compilation excluded
  compile_seconds: float


# Reference hyper-parameter types and their Optuna suggestions (deepunlearn-spec 4.2, HP_OPTUNA).
def _suggest(trial, name: str, kind: str, e_max: int):
  if kind in ("learning_rate", "weight_decay"):
    return trial.suggest_float(name, 1e-5, 1e-1, log=True)
  if kind == "momentum":
    return trial.suggest_float(name, 0.9, 0.9)
  if kind == "num_epochs":
    return trial.suggest_int(name, 1, e_max)
  if kind == "num_epochs_float":
    return trial.suggest_float(name, 1, e_max)
  if kind == "batch_size":
    return trial.suggest_categorical(name, (64, 128, 256))
  if kind in ("normal_sigma", "float"):
    return trial.suggest_float(name, 0.0, 1.0)
  if kind == "temperature":
    return trial.suggest_float(name, 0.0, 5.0)
  if kind == "eta_min":
    return trial.suggest_float(name, 1e-6, 1e-1, log=True)
  if kind in ("num_layers", "training_epoch_factor"):
    return trial.suggest_int(name, 1, 10)
  raise ValueError(f"unknown hyper-parameter type {kind!r}")


HP_TYPES = ("learning_rate", "weight_decay", "momentum", "num_epochs", "num_epochs_float",
            "batch_size", "normal_sigma", "float", "temperature", "eta_min", "num_layers",
            "training_epoch_factor")
# The reference's COMMON5 (deepunlearn-spec 4.2).
COMMON5 = {"learning_rate": "learning_rate", "momentum": "momentum",
           "weight_decay": "weight_decay", "batch_size": "batch_size", "num_epochs": "num_epochs"}


@dataclasses.dataclass(frozen=True)
class Method:
  """An unlearning method: data (name, defaults, search space) plus a pure stack function.

  ``unlearn(ctx, hp, key) -> stacked variables`` does the work; `run` wraps it with defaults,
  validation and timing. ``space`` maps a hyper-parameter name to its reference type
  (`HP_TYPES`); `suggest` turns it into Optuna calls with exactly the reference ranges.
  """

  name: str
  paper_name: str
  reference: str  # the spec section it follows
  defaults: Mapping[str, Any]
  space: Mapping[str, str]
  uses: tuple[str, ...]  # data sources it reads
  unlearn: Callable[[Context, ml_collections.ConfigDict, jax.Array], dict]
  aliases: tuple[str, ...] = ()

  def hparams(self, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The defaults updated with ``overrides``; an unknown name is an error naming the known."""
    hp = ml_collections.ConfigDict(dict(self.defaults), type_safe=False)  # per-model lists
    for name, value in dict(overrides or {}).items():
      if name not in hp:
        raise ValueError(f"method {self.name!r} has no hyper-parameter {name!r}; "
                         f"known: {sorted(hp.keys())}")
      hp[name] = value
    return hp

  def suggest(self, trial, e_max: int) -> dict[str, Any]:
    """One hyper-parameter set from the reference search space (``e_max``: epoch budget)."""
    return {name: _suggest(trial, name, kind, e_max) for name, kind in self.space.items()}

  def run(self, ctx: Context, hparams: Mapping[str, Any] | None = None,
          key: jax.Array | None = None) -> UnlearnResult:
    hp = self.hparams(hparams)
    key = jax.random.key(0) if key is None else key
    with CompileClock() as clock:
      states = jax.block_until_ready(self.unlearn(ctx, hp, key))
    return UnlearnResult(states, clock.work_seconds, clock.seconds)


METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method) -> Method:
  for name in (method.name, *method.aliases):
    if name in METHODS or name in _ALIASES:
      raise ValueError(f"method name {name!r} registered twice")
  METHODS[method.name] = method
  _ALIASES.update({alias: method.name for alias in method.aliases})
  return method


def get(name: str) -> Method:
  """The method called ``name`` (or a reference alias such as ``kgltop5``)."""
  canonical = _ALIASES.get(name, name)
  if canonical not in METHODS:
    raise ValueError(f"unknown unlearning method {name!r}; known: {', '.join(sorted(METHODS))} "
                     f"(aliases: {', '.join(sorted(_ALIASES))})")
  return METHODS[canonical]


# --------------------------------------------------------------------------------------------
# Hyper-parameters and param-tree helpers
# --------------------------------------------------------------------------------------------


def per_model(hp: Mapping[str, Any], names: Sequence[str], n: int) -> dict[str, jax.Array]:
  """Continuous hyper-parameters as float32 [N] arrays (a scalar is shared by all models)."""
  out = {}
  for name in names:
    value = np.asarray(hp[name], np.float32)
    if value.ndim not in (0, 1) or (value.ndim == 1 and value.shape[0] != n):
      raise ValueError(f"hyper-parameter {name!r} must be a scalar or {n} values, got {value.shape}")
    out[name] = jnp.broadcast_to(jnp.asarray(value), (n,))
  return out


def select(mask: Any, new: Any, old: Any) -> Any:
  """Leafwise ``where(mask, new, old)`` over trees (mask leaves broadcast)."""
  return jax.tree.map(lambda m, a, b: jnp.where(m, a, b), mask, new, old)


def no_hp(ctx: Context) -> dict[str, jax.Array]:
  """A placeholder per-model hyper-parameter (the stack engine needs one per-model leaf)."""
  return {"unused": jnp.zeros((ctx.num_models,), jnp.float32)}


def tree_zeros_like(tree: Any) -> Any:
  return jax.tree.map(jnp.zeros_like, tree)


def copy_tree(tree: Any) -> Any:
  """A copy whose buffers can be donated without touching ``tree``."""
  return jax.tree.map(jnp.copy, tree)


# --------------------------------------------------------------------------------------------
# Per-model step primitives (pure; used inside jitted steps)
# --------------------------------------------------------------------------------------------


batch = engine.batch


def inputs(recipe: train.Recipe, images: jax.Array, labels: jax.Array, idx: jax.Array,
           key: jax.Array | None = None):
  """Normalised float32 inputs, labels and validity of a batch of indices (augmented when
  ``key``); `forward` casts the inputs to the recipe's compute dtype."""
  valid = idx >= 0
  safe = jnp.where(valid, idx, 0)
  raw = images[safe]
  if key is not None:
    raw = augment_lib.augment(key, raw, recipe.augment)
  return augment_lib.normalize(raw, recipe.mean, recipe.std), labels[safe], valid


def forward(model, recipe: train.Recipe, params, batch_stats, x, valid, *, training: bool,
            key: jax.Array | None = None):
  """Float32 logits and the BatchNorm statistics, updated in train mode (``training``; also
  enables stochastic depth with ``key``), unchanged in eval mode.

  Mixed precision as in training (`train.compute_variables`): inputs and params are cast to
  ``recipe.dtype`` for the pass, master params and BatchNorm statistics stay float32."""
  variables = train.compute_variables(recipe, params, batch_stats)
  x = x.astype(recipe.dtype)
  rngs = {"droppath": key} if key is not None else {}
  if training and batch_stats:
    logits, updates = model.apply(variables, x, train=True, mask=valid, rngs=rngs,
                                  mutable=["batch_stats"])
    return logits.astype(jnp.float32), updates["batch_stats"]
  logits = model.apply(variables, x, train=training, mask=valid, rngs=rngs)
  return logits.astype(jnp.float32), batch_stats


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  return (values * valid).sum() / jnp.maximum(valid.sum(), 1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def optimizer(kind: str, learning_rate, weight_decay, momentum) -> optax.GradientTransformation:
  """PyTorch SGD / Adam with coupled L2 (deepunlearn-spec 4.2), as the training core's."""
  return train.optimizer(train.Recipe(optimizer=kind),
                         {"weight_decay": weight_decay, "momentum": momentum}, learning_rate)


def init_opt(kind: str, params: Any) -> Any:
  return optimizer(kind, 0.0, 0.0, 0.0).init(params)


def sgd_update(kind: str, params, opt_state, grads, learning_rate, weight_decay, momentum,
               trainable: Any = None, grad_scale: Any = None):
  """One optimiser step. ``trainable`` (bool tree): other params get no update at all, as
  PyTorch skips parameters without gradients. ``grad_scale``: multiplies the gradients first."""
  if grad_scale is not None:
    grads = jax.tree.map(jnp.multiply, grads, grad_scale)
  updates, new_opt = optimizer(kind, learning_rate, weight_decay, momentum).update(
      grads, opt_state, params)
  if trainable is not None:
    updates = jax.tree.map(lambda u, t: jnp.where(t, u, 0.0), updates, trainable)
  return optax.apply_updates(params, updates), new_opt


def keep_if_empty(valid: jax.Array, new: Any, old: Any) -> Any:
  """An all-padding batch changes nothing."""
  return jax.tree.map(lambda a, b: jnp.where(valid.any(), a, b), new, old)


def descend(state: "TrainCarry", loss_fn: Callable, valid: jax.Array, hp: Mapping[str, jax.Array],
            lr_factor, *, optimizer_kind: str = "sgd", weight_decay=None, trainable: Any = None,
            grad_scale: Any = None) -> "TrainCarry":
  """The update every gradient method shares: ``loss_fn(params) -> (loss, batch_stats)`` is
  differentiated and one optimiser step taken with ``hp``'s learning_rate (times ``lr_factor``),
  weight_decay (unless ``weight_decay`` is given) and momentum; ``trainable``/``grad_scale`` as in
  `sgd_update`. A batch without any valid sample (``valid``) changes nothing."""
  grads, batch_stats = jax.grad(loss_fn, has_aux=True)(state.params)
  decay = hp["weight_decay"] if weight_decay is None else weight_decay
  params, opt_state = sgd_update(optimizer_kind, state.params, state.opt_state, grads,
                                 hp["learning_rate"] * lr_factor, decay, hp["momentum"],
                                 trainable, grad_scale)
  return keep_if_empty(valid, TrainCarry(params, batch_stats, opt_state), state)


# --------------------------------------------------------------------------------------------
# The stack engine
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainCarry:
  """The usual per-model carry: weights, BatchNorm statistics, optimiser state."""

  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return train.as_variables(self.params, self.batch_stats)

  @staticmethod
  def create(variables: Mapping[str, Any], optimizer_kind: str = "sgd") -> "TrainCarry":
    params = copy_tree(variables["params"])
    return TrainCarry(params, copy_tree(variables.get("batch_stats", {})),
                      jax.vmap(functools.partial(init_opt, optimizer_kind))(params))


def run_epochs(ctx: Context, step: Callable, statics: tuple, carry: Any,
               sources: Mapping[str, tuple[np.ndarray, int, bool]], hp: Mapping[str, jax.Array],
               key: jax.Array, epochs: int, *, first_epoch: int = 0,
               lr_factor: Callable[[int], float] = lambda epoch: 1.0,
               num_steps: int | None = None) -> Any:
  """Runs a method's ``step`` over the context's stack with `jaxmu.engine` (its docstring gives
  the step's signature); returns the stacked carry.

  ``sources``: name -> (index sets [N, L], batch size, shuffle) (`engine.Source`); ``hp``:
  per-model float32 [N] hyper-parameters (`per_model`); model m draws from
  ``fold_in(key, model_id)``, then the epoch number.
  """
  return engine.run(step, statics, carry, {k: engine.Source(*s) for k, s in sources.items()},
                    dict(hp), ctx.data.inputs, ctx.data.labels, ctx.keys(key), ctx.strategy,
                    epochs, first_epoch=first_epoch, lr_factor=lr_factor, num_steps=num_steps)


def stack_map(ctx: Context, fn: Callable, statics: tuple, *per_model_args, shared=()) -> Any:
  """``fn(*statics, *per_model, *shared)`` for every model of the stack (no carry)."""
  return _compiled_map(fn, statics, ctx.strategy, len(per_model_args))(
      *per_model_args, *shared)


@functools.lru_cache(maxsize=None)
def _compiled_map(fn: Callable, statics: tuple, strategy: parallel.Strategy,
                  num_per_model: int) -> Callable:
  return strategy.map(functools.partial(fn, *statics), num_per_model)


# --------------------------------------------------------------------------------------------
# Fine-tuning, the phase most methods share
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
  """Static options of a cross-entropy fine-tuning phase (hashable: part of the program key)."""

  batch_size: int = 256
  optimizer: str = "sgd"
  bn_train: bool = True  # BatchNorm in train mode while updating
  augment: bool = False  # the training augmentation (EU-k) or plain inputs
  proximal: bool = False  # + (prox_weight / 2) ||theta - anchor||^2 over trainable params
  source: str = "retain"


def finetune_step(model, recipe, spec: FinetuneSpec, carry, orders, key, hp, images, labels,
                  step_index, epoch, lr_factor):
  """One cross-entropy step; ``carry`` = (TrainCarry, extras) with extras holding ``trainable``
  (bool tree or None), ``grad_scale`` (tree or None) and ``anchor`` (params or None)."""
  del epoch
  state, extras = carry
  x, y, valid, drop_key = loader_inputs(recipe, orders[spec.source], step_index, spec.batch_size,
                                        key, images, labels, spec.augment)

  def loss_fn(params):
    logits, batch_stats = forward(model, recipe, params, state.batch_stats, x, valid,
                                  training=spec.bn_train, key=drop_key)
    loss = masked_mean(cross_entropy(logits, y), valid)
    if spec.proximal:
      sq = jax.tree.map(lambda p, a, t: jnp.sum(jnp.where(t, (p - a) ** 2, 0.0)),
                        params, extras["anchor"], extras["trainable"])
      loss = loss + hp["prox_weight"] / 2 * sum(jax.tree.leaves(sq))
    return loss, batch_stats

  new = descend(state, loss_fn, valid, hp, lr_factor, optimizer_kind=spec.optimizer,
                trainable=extras.get("trainable"), grad_scale=extras.get("grad_scale"))
  return (new, extras), {}


def finetune(ctx: Context, variables: Mapping[str, Any], hp: Mapping[str, Any], key: jax.Array,
             spec: FinetuneSpec, epochs: int, *, lr_factor: Callable[[int], float] = lambda e: 1.0,
             trainable: Any = None, grad_scale: Any = None, anchor: Any = None) -> dict[str, Any]:
  """Cross-entropy training of every model on its ``spec.source`` set; returns variables.

  ``hp`` holds learning_rate, weight_decay, momentum (and prox_weight when ``spec.proximal``),
  each a scalar or one value per model. ``trainable``, ``grad_scale`` and ``anchor`` are stacked
  trees like the params (see `finetune_step`).
  """
  names = ("learning_rate", "weight_decay", "momentum") + (("prox_weight",) if spec.proximal else ())
  extras = {"trainable": trainable, "grad_scale": grad_scale, "anchor": anchor}
  carry = (TrainCarry.create(variables, spec.optimizer), extras)
  sources = {spec.source: (ctx.index_sets(spec.source), spec.batch_size, True)}
  carry = run_epochs(ctx, finetune_step, (ctx.model, ctx.recipe, spec), carry, sources,
                     per_model(hp, names, ctx.num_models), key, epochs, lr_factor=lr_factor)
  return carry[0].variables


def cosine(epochs: int) -> Callable[[int], float]:
  """PyTorch ``CosineAnnealingLR(T_max=epochs)`` stepped once an epoch: factor in epoch e."""
  return lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))


def stacked(tree: Any, n: int) -> Any:
  """A per-model tree (e.g. a mask) repeated along a new leading model axis."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


# --------------------------------------------------------------------------------------------
# Steps whose loss reads one train-mode forward pass
# --------------------------------------------------------------------------------------------


def optimizer_hp(hp: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """The learning_rate, weight_decay and momentum `descend` reads, from ``prefix + name``."""
  return {name: hp[prefix + name] for name in ("learning_rate", "weight_decay", "momentum")}


def descend_on_logits(model, recipe: train.Recipe, state: TrainCarry, x, valid, key,
                      logits_loss: Callable, hp: Mapping[str, jax.Array], lr_factor,
                      **options) -> TrainCarry:
  """`descend` on ``logits_loss(logits)`` of one `forward` of ``x`` in train mode (BatchNorm
  statistics updated, stochastic depth from ``key``); ``options`` as `descend`'s."""
  def loss_fn(params):
    logits, batch_stats = forward(model, recipe, params, state.batch_stats, x, valid,
                                  training=True, key=key)
    return logits_loss(logits), batch_stats

  return descend(state, loss_fn, valid, hp, lr_factor, **options)


# --------------------------------------------------------------------------------------------
# A step's loader batch; a gradient the step needs itself
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
  """A step that reads IAM's loaders: Subsets of the training set with the training transforms
  (iam-spec 12.1), hence ``augment=True`` by default."""

  batch_size: int = 128
  augment: bool = True
  bn_train: bool = True
  faithful: bool = False


def loader_inputs(recipe: train.Recipe, order: jax.Array, step_index, batch_size: int,
                  key: jax.Array, images: jax.Array, labels: jax.Array, augment: bool):
  """Step ``step_index``'s batch of ``order`` as a training loader yields it: (x, y, valid,
  dropout key), augmented when ``augment``; both keys come from fold_in(key, step_index)."""
  idx = batch(order, step_index, batch_size)
  aug_key, drop_key = jax.random.split(jax.random.fold_in(key, step_index))
  x, y, valid = inputs(recipe, images, labels, idx, aug_key if augment else None)
  return x, y, valid, drop_key


def along(grads: Any, batch_stats: Any) -> Callable:
  """A ``loss_fn`` for `descend` whose gradient is exactly ``grads`` (for a step that needs the
  gradient itself: to accumulate it, or to apply it to another network)."""
  def loss_fn(params):
    dots = jax.tree.map(lambda p, g: jnp.vdot(p, jax.lax.stop_gradient(g)), params, grads)
    return sum(jax.tree.leaves(dots)), batch_stats
  return loss_fn
