"""airbench94: the fast CIFAR-10 recipe (Keller Jordan, ``legacy/airbench94.py``; arXiv 2404.00498)
as a model and a dedicated stack trainer, jaxmu's fast shadow models for IAM and LiRA.

Net (jax-style-and-speed B.1): a frozen 2x2 patch-whitening conv (24 filters: the eigenvectors of
the covariance of 2x2 patches of the first 5,000 training images scaled by
``1/sqrt(eigenvalue + 5e-4)``, and their negatives; trainable bias), GELU, three ConvGroups
(widths 64/256/256: conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU), MaxPool(3), a
bias-free linear head, times 1/9. Convs: PyTorch default init, then Dirac (identity) on the first
``in_channels`` filters. BatchNorm: scale frozen at 1 (no scale parameter), trainable bias,
PyTorch momentum 0.6, eps 1e-12. GELU is exact (erf), as ``torch.nn.GELU``.

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

Differences from the reference: Flax's BatchNorm keeps the biased batch variance in its running
average (PyTorch the unbiased one); compute is float32 unless the recipe says bfloat16 (the
reference runs fp16 with fp32 BatchNorm); each model of a stack draws its own order, flips and
translations from its own PRNG stream; the whitening conv of the generic `jaxmu.train.fit` path
(``models.get("airbench94")`` trained like any model) is an ordinary trainable conv.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxmu import parallel, train
from jaxmu.data import augment as augment_lib
from jaxmu.models.resnet import BatchNorm, conv, torch_default_kernel_init, uniform_init

WHITEN = "stem_whiten"


def dirac_init(base: Callable = torch_default_kernel_init) -> Callable:
  """``torch.nn.init.dirac_(w[:w.size(1)])`` after ``base``: the first ``in_channels`` filters
  pass their own input channel through (centre tap 1, every other tap 0); HWIO kernels."""
  def init(key, shape, dtype=jnp.float32):
    h, w, cin, cout = shape
    kernel = base(key, shape, dtype)
    k = min(cin, cout)
    identity = jnp.zeros((h, w, cin, k), dtype).at[
        h // 2, w // 2, jnp.arange(k), jnp.arange(k)].set(1)
    return kernel.at[..., :k].set(identity)
  return init


def _batch_norm(train: bool, momentum: float, name: str) -> BatchNorm:
  """BatchNorm with the scale frozen at 1 (no parameter), eps 1e-12, PyTorch ``momentum``."""
  return BatchNorm(use_running_average=not train, momentum=1 - momentum, epsilon=1e-12,
                   use_scale=False, use_fast_variance=False, name=name)


class ConvGroup(nn.Module):
  """conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU. Params: conv1, bn1, conv2, bn2."""
  features: int
  bn_momentum: float

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = conv(self.features, 3, 1, 1, dirac_init(), "conv1")(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.gelu(_batch_norm(train, self.bn_momentum, "bn1")(x, mask), approximate=False)
    x = conv(self.features, 3, 1, 1, dirac_init(), "conv2")(x)
    return nn.gelu(_batch_norm(train, self.bn_momentum, "bn2")(x, mask), approximate=False)


class Airbench(nn.Module):
  """Params: stem_whiten (2x2 conv with bias), layer{1,2,3}_0 (ConvGroups), fc (no bias).

  Needs inputs of at least 32x32 (the spatial size after the three pools must be >= 3).
  """
  num_classes: int
  widths: tuple[int, ...] = (64, 256, 256)
  bn_momentum: float = 0.6
  scale: float = 1 / 9

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    if min(x.shape[1:3]) < 32:
      raise ValueError(f"airbench needs images of at least 32x32, got {x.shape[1:3]}; load the "
                       "dataset with image_size=32")
    patch = 4 * x.shape[-1]
    x = nn.Conv(2 * patch, (2, 2), padding="VALID", kernel_init=torch_default_kernel_init,
                bias_init=uniform_init(patch ** -0.5), name=WHITEN)(x)
    x = nn.gelu(x, approximate=False)
    for i, width in enumerate(self.widths):
      x = ConvGroup(width, self.bn_momentum, name=f"layer{i + 1}_0")(x, train, mask)
    x = nn.max_pool(x, (3, 3), (3, 3)).reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, use_bias=False, kernel_init=torch_default_kernel_init,
                    name="fc")(x) * self.scale


def airbench94(num_classes: int, widths: Sequence[int] = (64, 256, 256)) -> Airbench:
  return Airbench(num_classes, tuple(widths))


# --------------------------------------------------------------------------------------------
# Whitening
# --------------------------------------------------------------------------------------------


def whitening_kernel(images: jax.Array, eps: float = 5e-4) -> jax.Array:
  """The frozen whitening kernel [2, 2, C, 8 C] from normalised images [B, H, W, C]: eigenvectors
  of the (uncentred) covariance of all 2x2 patches, largest eigenvalue first, each scaled by
  ``1/sqrt(eigenvalue + eps)``, then the same filters negated (``get_whitening_parameters``)."""
  c = images.shape[-1]
  patches = jnp.stack([images[:, dh:images.shape[1] - 1 + dh, dw:images.shape[2] - 1 + dw]
                       for dh in (0, 1) for dw in (0, 1)], axis=-2)  # [B, H-1, W-1, (dh dw), C]
  flat = patches.reshape(-1, 4 * c).astype(jnp.float32)
  eigenvalues, eigenvectors = jnp.linalg.eigh(flat.T @ flat / flat.shape[0])
  scaled = eigenvectors[:, ::-1] / jnp.sqrt(eigenvalues[::-1] + eps)
  kernel = scaled.reshape(2, 2, c, 4 * c)
  return jnp.concatenate([kernel, -kernel], axis=-1)


# --------------------------------------------------------------------------------------------
# The dedicated trainer
# --------------------------------------------------------------------------------------------


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


def lr_factor(step, total_steps):
  """``np.interp(step, [0, int(0.23 T), T], [0.2, 1, 0.07])``: the triangular schedule."""
  peak = jnp.floor(0.23 * total_steps)
  step = jnp.asarray(step, jnp.float32)
  up = 0.2 + 0.8 * step / jnp.maximum(peak, 1)
  down = 1.0 - 0.93 * (step - peak) / jnp.maximum(total_steps - peak, 1)
  return jnp.where(step <= peak, jnp.where(peak > 0, up, 1.0), down)


def lookahead_decay(step, total_steps):
  """The lookahead ``alpha_schedule``: 0.95**5 (step / total)**3."""
  return 0.95 ** 5 * (jnp.asarray(step, jnp.float32) / total_steps) ** 3


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


def init_variables(model: Airbench, keys: jax.Array, data: train.DeviceData, index_sets,
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
    kernels.append(whitening_kernel(images))
  params = dict(variables["params"])
  params[WHITEN] = dict(params[WHITEN], kernel=jnp.stack(kernels))
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


def train_step(model, hyper: Hyper, state: State, order, key, flip_key, total_steps, epoch_steps,
               inputs, labels, step_index, epoch):
  """One airbench step of one model (module docstring): batch ``step_index`` of its epoch
  ``order``; a no-op once the model has done ``total_steps`` or past its ``epoch_steps``."""
  b = hyper.batch_size
  idx = parallel.shard_batch(jax.lax.dynamic_slice(order, (step_index * b,), (b,)))
  active = (step_index < epoch_steps) & (state.step < total_steps)
  safe = jnp.maximum(idx, 0)
  flips = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(flip_key, i)))(safe)
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
  factor = lr_factor(state.step, total_steps)
  whiten_bias_on = epoch < hyper.whiten_bias_epochs

  def update(path, p, g, buf):
    whiten = path[0].key == WHITEN
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
  decay = jnp.where(step % hyper.lookahead_every == 0, lookahead_decay(step, total_steps), 1.0)
  sync = (step % hyper.lookahead_every == 0) | (step >= total_steps)
  ema = jax.tree.map(lambda e, n: jnp.where(sync, e + (1 - decay) * (n - e), e), state.ema, net)
  net = jax.tree.map(lambda e, n: jnp.where(sync, e, n), ema, net)
  new = State(net["params"], net["batch_stats"], momentum, ema, step)
  new = jax.tree.map(lambda a, o: jnp.where(active, a, o), new, state)
  weight = active.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() * weight
  correct = (jnp.argmax(logits, -1) == y).sum() * weight
  return new, {"loss_sum": loss, "correct": correct, "count": b * weight}


@functools.lru_cache(maxsize=None)
def _compiled_step(model, hyper: Hyper, strategy: str) -> Callable:
  return parallel.Strategy(strategy).compile(functools.partial(train_step, model, hyper),
                                             num_per_model=5)


def fit(model: Airbench, variables: dict[str, Any], data: train.DeviceData, index_sets,
        hyper: Hyper, key: jax.Array, *, model_ids: Sequence[int] | None = None,
        strategy: str = "auto", progress: bool | str = True) -> FitResult:
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
  total_steps = np.ceil(epoch_steps * hyper.epochs).astype(np.int32)
  model_ids = np.arange(n) if model_ids is None else np.asarray(model_ids)
  split = jax.vmap(jax.random.split)(train.model_keys(key, model_ids))
  flip_keys, run_keys = split[:, 0], split[:, 1]
  strat = parallel.Strategy.create(strategy)
  step_fn = _compiled_step(model, hyper, strat.name)
  orders_fn = train._compiled_orders(hyper.batch_size)
  variables = jax.tree.map(jnp.copy, variables)
  state = State(variables["params"], variables["batch_stats"],
                jax.tree.map(jnp.zeros_like, variables["params"]),
                jax.tree.map(jnp.copy, variables), jnp.zeros((n,), jnp.int32))
  internal = strat.enter(state)
  per_model = [strat.enter_args(a) for a in (flip_keys, jnp.asarray(total_steps),
                                             jnp.asarray(epoch_steps, jnp.int32))]
  index_dev, history = jnp.asarray(sets), []
  bar = tqdm(range(math.ceil(hyper.epochs)), disable=not progress, leave=False,
             desc=progress if isinstance(progress, str) else "airbench")
  for epoch in bar:
    epoch_keys = jax.vmap(lambda k: jax.random.fold_in(k, epoch))(run_keys)
    order_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(epoch_keys)
    orders = strat.enter_args(orders_fn(index_dev, order_keys))
    step_keys = strat.enter_args(jax.vmap(lambda k: jax.random.fold_in(k, 1))(epoch_keys))
    totals = []
    for s in range(int(epoch_steps.max())):
      internal, metrics = step_fn(internal, orders, step_keys, *per_model, data.inputs,
                                  data.labels, jnp.int32(s), jnp.int32(epoch))
      totals.append(metrics)
    summed = jax.device_get(jax.tree.map(lambda *m: sum(m), *totals))
    count = np.maximum(summed["count"][:n], 1)
    history.append({"epoch": epoch + 1, "loss": summed["loss_sum"][:n] / count,
                    "accuracy": summed["correct"][:n] / count})
  bar.close()
  return FitResult(strat.exit(internal, n).variables, history)


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
def _compiled_tta(model, hyper: Hyper, strategy: str) -> Callable:
  return parallel.Strategy(strategy).map(functools.partial(tta_logits, model, hyper), 1)


def predict(model, variables, data: train.DeviceData, indices, hyper: Hyper,
            strategy: str = "auto", batch_size: int = 1024) -> np.ndarray:
  """Per-model logits [N, len(indices), C] with ``hyper.tta_level`` test-time augmentation."""
  fn = _compiled_tta(model, hyper, parallel.resolve(strategy))
  return train.predict_batches(fn, variables, data, indices, batch_size)
