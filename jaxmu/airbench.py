"""airbench94's dedicated stack trainer (Keller Jordan, ``legacy/airbench94.py``; arXiv
2404.00498): jaxmu's fast shadow models for IAM and LiRA. The network, its whitening kernel and
its schedules are `jaxmu.models.airbench`; epochs run on `jaxmu.engine`.

Trainer (`fit`, the published ``hyp``): batch 1024 without the last partial batch, 9.9 epochs,
Nesterov SGD with momentum 0.85, lr 11.5 and weight decay 0.0153 "per 1024 examples" on a
*summed* loss (PyTorch lr = 11.5 / kilostep, weight decay 0.0153 * batch / kilostep as a coupled
decay of wd/lr, kilostep = 1024 (1 + 1 / (1 - momentum))), BatchNorm biases at 64x the lr (same
decay), label smoothing 0.2, a triangular schedule per step (0.2 -> 1 at 23% of the steps ->
0.07), the whitening bias trained for the first 3 epochs only, lookahead every 5 steps
(``ema.lerp(net, 1 - 0.95**5 (step / total)**3)``, then net = ema; at the end net = ema),
augmentation: one random flip per image drawn once, all images flipped together every other
epoch ("alternating flip"), random translation by up to 2 pixels of the reflect-padded image.
Evaluation (`predict`): test-time augmentation level 2 (mirror, and translations by one pixel of
the reflect-padded image).

Differences from the reference: compute is float32 unless ``Hyper.dtype`` says bfloat16 (the
reference runs fp16 with fp32 BatchNorm); each model of a stack draws its own order, flips and
translations from its own PRNG stream.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxmu import engine, parallel, train
from jaxmu.data import augment as augment_lib
from jaxmu.models import airbench as net_lib


@dataclasses.dataclass(frozen=True)
class Hyper:
  """airbench94's published ``hyp`` (module docstring); one compiled program per Hyper."""

  batch_size: int = 1024
  epochs: float = 9.9
  lr: float = 11.5  # per 1024 examples of a summed loss
  momentum: float = 0.85
  weight_decay: float = 0.0153  # per 1024 examples
  bias_scaler: float = 64.0
  label_smoothing: float = 0.2
  whiten_bias_epochs: int = 3
  translate: int = 2
  lookahead_every: int = 5
  tta_level: int = 2
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)
  dtype: str = "float32"

  def __post_init__(self):
    if self.tta_level not in (0, 1, 2):
      raise ValueError(f"tta_level must be 0 (none), 1 (mirror) or 2 (mirror + translate), "
                       f"got {self.tta_level}")
    train.Recipe(batch_size=self.batch_size, dtype=self.dtype)  # validates both

  @property
  def recipe(self) -> train.Recipe:
    """The `jaxmu.train.Recipe` for plain evaluation (`train.predict`/`evaluate`, no TTA)."""
    return train.Recipe(batch_size=self.batch_size, augment="none", mean=self.mean, std=self.std,
                        dtype=self.dtype)

  @property
  def torch_lr_wd(self) -> tuple[float, float]:
    """PyTorch's SGD lr and (already multiplied) decay: lr/kilostep, wd * batch / kilostep."""
    kilostep = 1024 * (1 + 1 / (1 - self.momentum))
    return self.lr / kilostep, self.weight_decay * self.batch_size / kilostep


@flax.struct.dataclass
class State:
  """One airbench model's training state (a stack when leaves carry a model axis)."""

  params: Any
  batch_stats: Any
  momentum: Any  # Nesterov buffers, shaped like params
  ema: Any  # lookahead copy of {"params", "batch_stats"}
  step: jax.Array  # int32: real updates done

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


class FitResult(NamedTuple):
  variables: dict[str, Any]  # stacked params and batch_stats
  history: list[dict[str, Any]]  # per epoch: per-model numpy metrics


def init_variables(model: net_lib.Airbench, keys: jax.Array, data: train.DeviceData, index_sets,
                   hyper: Hyper, num_images: int = 5000) -> dict[str, Any]:
  """Stacked variables, one model per key, each whitening kernel from the first ``num_images``
  images of that model's own index set (normalised, no augmentation)."""
  sets = train.pad_index_sets(index_sets)
  if sets.shape[0] != len(keys):
    raise ValueError(f"{sets.shape[0]} index sets for {len(keys)} keys")
  variables = train.init_variables(model, keys, data.inputs.shape[1:])
  kernels = []
  for row in sets:
    first = row[row >= 0][:num_images]
    images = augment_lib.normalize(data.inputs[jnp.asarray(first)], hyper.mean, hyper.std)
    kernels.append(net_lib.whitening_kernel(images))
  params = dict(variables["params"])
  params[net_lib.WHITEN] = dict(params[net_lib.WHITEN], kernel=jnp.stack(kernels))
  return dict(variables, params=params)


def _translate(key, images, pad: int) -> jax.Array:
  """Per-sample random crop of the reflect-padded batch: translation by up to ``pad`` pixels."""
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))  # noqa: E731
  return jax.vmap(crop)(padded, offsets)


def _is_bn_bias(path) -> bool:
  return path[-1].key == "bias" and path[-2].key.startswith("bn")


def train_step(model, hyper: Hyper, state: State, orders, key, hp, inputs, labels, step_index,
               epoch, lr_factor):
  """One airbench step of one model (module docstring; an `engine` step): batch ``step_index``
  of its epoch order ``orders["train"]``; a no-op once the model has done ``hp["total_steps"]``
  or past its ``hp["epoch_steps"]``. ``hp["flip_key"]`` draws each image's flip; the schedule
  follows the state's step count, so ``lr_factor`` is unused."""
  del lr_factor
  b = hyper.batch_size
  idx = parallel.shard_batch(engine.batch(orders["train"], step_index, b))
  total_steps = hp["total_steps"]
  active = (step_index < hp["epoch_steps"]) & (state.step < total_steps)
  safe = jnp.maximum(idx, 0)
  flips = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(hp["flip_key"], i)))(safe)
  flips = flips ^ (epoch % 2 == 1)
  images = inputs[safe]
  images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
  images = _translate(jax.random.fold_in(key, step_index), images, hyper.translate)
  x = parallel.shard_batch(augment_lib.normalize(images, hyper.mean, hyper.std).astype(hyper.dtype))
  y = labels[safe]

  def loss_fn(params):
    variables = train.compute_variables(hyper.recipe, params, state.batch_stats)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), hyper.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).sum(), (logits, updates["batch_stats"])

  grads, (logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  lr, wd = hyper.torch_lr_wd
  factor = net_lib.lr_factor(state.step, total_steps)
  whiten_bias_on = epoch < hyper.whiten_bias_epochs

  def update(path, p, g, buf):
    whiten = path[0].key == net_lib.WHITEN
    frozen = (whiten and path[-1].key == "kernel") or (whiten & ~whiten_bias_on)
    group_lr = lr * hyper.bias_scaler if _is_bn_bias(path) else lr
    d = g + (wd / group_lr) * p
    new_buf = hyper.momentum * buf + d
    new_p = p - group_lr * factor * (d + hyper.momentum * new_buf)
    return (jnp.where(frozen, p, new_p), jnp.where(frozen, buf, new_buf))

  pairs = jax.tree_util.tree_map_with_path(update, state.params, grads, state.momentum)
  is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
  params = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
  momentum = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
  step = state.step + 1
  net = {"params": params, "batch_stats": batch_stats}
  lookahead = step % hyper.lookahead_every == 0
  decay = jnp.where(lookahead, net_lib.lookahead_decay(step, total_steps), 1.0)
  sync = lookahead | (step >= total_steps)
  ema = jax.tree.map(lambda e, n: jnp.where(sync, e + (1 - decay) * (n - e), e), state.ema, net)
  net = jax.tree.map(lambda e, n: jnp.where(sync, e, n), ema, net)
  new = State(net["params"], net["batch_stats"], momentum, ema, step)
  new = jax.tree.map(lambda a, o: jnp.where(active, a, o), new, state)
  weight = active.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() * weight
  correct = (jnp.argmax(logits, -1) == y).sum() * weight
  return new, {"loss_sum": loss, "correct": correct, "count": b * weight}


def fit(model: net_lib.Airbench, variables: dict[str, Any], data: train.DeviceData, index_sets,
        hyper: Hyper, key: jax.Array, *, model_ids: Sequence[int] | None = None,
        strategy: parallel.Strategy | str = "auto", progress: bool | str = True) -> FitResult:
  """Trains a stack of airbench models, each on its own index set (module docstring).

  ``variables``: stacked, from `init_variables` (whitening from data). Model m draws from
  ``fold_in(key, model_ids[m])``. Each model takes ``len(set) // batch_size`` steps per epoch
  (PyTorch ``drop_last=True``) and ``ceil(steps_per_epoch * epochs)`` steps in all.
  """
  sets = train.pad_index_sets(index_sets)
  n = parallel.num_models(variables["params"])
  if sets.shape[0] != n:
    raise ValueError(f"{sets.shape[0]} index sets for a stack of {n} models")
  epoch_steps = (sets >= 0).sum(1) // hyper.batch_size
  if epoch_steps.min() < 1:
    raise ValueError(f"every index set needs at least batch_size={hyper.batch_size} samples "
                     f"(drop_last); the smallest has {(sets >= 0).sum(1).min()}")
  model_ids = np.arange(n) if model_ids is None else np.asarray(model_ids)
  split = jax.vmap(jax.random.split)(engine.model_keys(key, model_ids))
  hp = {"flip_key": split[:, 0],
        "total_steps": jnp.asarray(np.ceil(epoch_steps * hyper.epochs), jnp.int32),
        "epoch_steps": jnp.asarray(epoch_steps, jnp.int32)}
  state = State(variables["params"], variables["batch_stats"],
                jax.tree.map(jnp.zeros_like, variables["params"]), variables,
                jnp.zeros((n,), jnp.int32))
  runs = engine.epochs(
      train_step, (model, hyper), state, {"train": engine.Source(sets, hyper.batch_size)}, hp,
      data.inputs, data.labels, split[:, 1], strategy, range(math.ceil(hyper.epochs)),
      num_steps=int(epoch_steps.max()), streams=engine.TRAINING)
  history = []
  for epoch, state, summed in tqdm(runs, disable=not progress, leave=False,
                                   total=math.ceil(hyper.epochs),
                                   desc=progress if isinstance(progress, str) else "airbench"):
    count = np.maximum(summed["count"], 1)
    history.append({"epoch": epoch + 1, "loss": summed["loss_sum"] / count,
                    "accuracy": summed["correct"] / count})
  return FitResult(state.variables, history)


def tta_logits(model, hyper: Hyper, variables, inputs, batch) -> jax.Array:
  """Eval-mode float32 logits of one model on ``inputs[batch]`` with test-time augmentation:
  level 0 none, 1 the mean over the image and its mirror, 2 the mean of that and of the mirror
  means of the reflect-padded image shifted by one pixel up-left and down-right
  (``infer_mirror_translate``)."""
  x = augment_lib.normalize(inputs[batch], hyper.mean, hyper.std).astype(hyper.dtype)
  variables = train.compute_variables(hyper.recipe, variables["params"], variables["batch_stats"])
  net = lambda z: model.apply(variables, z, train=False).astype(jnp.float32)  # noqa: E731
  if hyper.tta_level == 0:
    return net(x)
  mirror = lambda z: 0.5 * net(z) + 0.5 * net(z[:, :, ::-1])  # noqa: E731
  if hyper.tta_level == 1:
    return mirror(x)
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  shifted = 0.5 * mirror(padded[:, :h, :w]) + 0.5 * mirror(padded[:, 2:h + 2, 2:w + 2])
  return 0.5 * mirror(x) + 0.5 * shifted


@functools.lru_cache(maxsize=None)
def _compiled_tta(model, hyper: Hyper, strategy: parallel.Strategy) -> Callable:
  return strategy.map(functools.partial(tta_logits, model, hyper), 1)


def predict(model, variables, data: train.DeviceData, indices, hyper: Hyper,
            strategy: parallel.Strategy | str = "auto", batch_size: int = 1024) -> np.ndarray:
  """Per-model logits [N, len(indices), C] with ``hyper.tta_level`` test-time augmentation."""
  fn = _compiled_tta(model, hyper, parallel.Strategy.create(strategy))
  return train.predict_batches(fn, variables, data, indices, batch_size)
