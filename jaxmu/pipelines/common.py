"""The kit every pipeline shares: datasets, abstract variables, the recipe and the strategy of a
config, unlearning contexts and stages, model chunks.

Pipelines build on this module and on the layers below it; no pipeline imports another.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from jaxmu import checkpoint, distributed, parallel, stages, train
from jaxmu import data as data_lib
from jaxmu import methods as methods_lib


def load_dataset(spec: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The dataset of a config's ``dataset`` section (name, data_dir, options)."""
  return data_lib.load(spec.name, spec.data_dir or None, **spec.options.to_dict())


def abstract_variables(model, num: int, input_shape) -> dict:
  """Shapes and dtypes of a stack of ``num`` models' variables (the ``like`` of checkpoint.restore)."""
  keys = jax.random.split(jax.random.key(0), num)
  return jax.eval_shape(lambda k: train.init_variables(model, k, input_shape), keys)


def recipe(config: ml_collections.ConfigDict) -> train.Recipe:
  """The training recipe of a config's ``train`` and ``data`` sections (cosine period
  ``train.t_max`` where the config has one)."""
  t, d = config.train, config.data
  return train.Recipe(batch_size=t.batch_size, optimizer=t.optimizer, schedule=t.schedule,
                      schedule_unit=t.schedule_unit, t_max=t.get("t_max", 0), augment=d.augment,
                      mean=tuple(d.mean), std=tuple(d.std), dtype=t.get("dtype", "float32"))


def strategy(config: ml_collections.ConfigDict) -> parallel.Strategy:
  """The one execution strategy of a pipeline run (``parallel.strategy`` and ``parallel.epoch``)."""
  return parallel.Strategy.create(config.parallel.strategy, config.parallel.epoch)


def create_state(config: ml_collections.ConfigDict, variables, recipe: train.Recipe):
  """A training state with the config's learning rate, momentum and weight decay."""
  t = config.train
  return train.create_state(variables, recipe, learning_rate=t.learning_rate, momentum=t.momentum,
                            weight_decay=t.weight_decay)


def context(config: ml_collections.ConfigDict, model, data: train.DeviceData, originals, inits,
            retain, forget, val, model_ids: Sequence[int], num_classes: int,
            strategy: parallel.Strategy, train_epochs: int) -> methods_lib.Context:
  """The unlearning context of a stack of originals, with the config's recipe and training
  hyper-parameters (those methods that retrain from ``inits`` use them)."""
  return methods_lib.Context.create(
      model, recipe(config), data, originals, inits, retain, forget, val,
      model_ids=tuple(model_ids), num_classes=num_classes, strategy=strategy,
      train_epochs=train_epochs,
      train_hparams={k: config.train[k] for k in ("learning_rate", "momentum", "weight_decay")})


def method_hparams(config: ml_collections.ConfigDict, method: str,
                   best_params: Mapping | None = None) -> dict:
  """``config.unlearn.<method>`` (none for a method without defaults) updated by a search's best
  hyper-parameters."""
  hparams = config.unlearn[method].to_dict() if method in config.unlearn else {}
  return {**hparams, **(best_params or {})}


def method_key(seed: int, method: str) -> jax.Array:
  """A method's PRNG key: the same for a method whatever else runs."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(method.encode()))


def unlearn_stage(wd: stages.Workdir, name: str, method: str, hparams: dict, seed: int,
                  config: ml_collections.ConfigDict, deps: Sequence[str],
                  make_context: Callable[[], methods_lib.Context], **metadata) -> Path:
  """Stage ``name``: ``method`` with ``hparams`` on the stack of ``make_context()`` (built only
  when the stage runs); saves the unlearned stack in ``unlearned/<method>`` with its run time
  (compilation excluded), its hyper-parameters and ``metadata``."""
  with wd.stage(name, config={"hparams": hparams, "seed": seed, "parallel": config.parallel},
                deps=deps, outputs=(f"unlearned/{method}",)) as st:
    if not st.done:
      ctx = make_context()
      result = distributed.unlearn(method, ctx, hparams, method_key(seed, method))
      checkpoint.save(st.tmp / "unlearned" / method, jax.device_get(result.states),
                      metadata={"seconds": result.seconds,
                                "compile_seconds": result.compile_seconds,
                                "models": ctx.num_models, "hparams": hparams, **metadata})
      st.commit()
  return wd.path("unlearned", method)


def chunks(total: int, size: int) -> list[tuple[int, int]]:
  """[start, stop) ranges of at most ``size`` models (0 = all at once) covering ``total``."""
  size = size or total
  return [(start, min(start + size, total)) for start in range(0, total, size)]

