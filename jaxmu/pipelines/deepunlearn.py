"""The DeepUnlearn pipeline over a workdir, as resumable stages (deepunlearn-spec 1.5, 2.3, 3).

Stages (``config.stop_after`` names the last one to run):

1. ``splits``: the fixed retain/forget/val/test split of the dataset (``splits.npz``).
2. ``init``: one initialisation per seed (``models/init``), shared by that seed's original and
   retrained model (deepunlearn-spec 2.3).
3. ``train``: per seed an *original* model (retain + forget) and a *retrained* model (retain
   only), all 2 x len(seeds) of them trained as one stack; periodic checkpoints let a killed run
   resume with the same numbers (``models/original``, ``models/retrain``, ``times.json``).
4. ``unlearn``: every method of ``config.methods`` with its hyper-parameters
   ``config.unlearn.<method>`` on the stack of originals, one resumable stage per method
   (``unlearned/<method>``, with its run time, compilation excluded).
5. ``evaluate``: accuracy of every model on retain / forget / val / test (``results.csv``).
6. ``report``: mean and std over seeds (``report.md``).
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxmu import checkpoint, models, report, stages, train, unlearn
from jaxmu import data as data_lib
from jaxmu.data import splits as splits_lib

STAGES = ("splits", "init", "train", "unlearn", "evaluate", "report")
GROUPS = ("original", "retrain")
SPLITS = ("retain", "forget", "val", "test")


def recipe_from_config(config: ml_collections.ConfigDict) -> train.Recipe:
  return train.Recipe(
      batch_size=config.train.batch_size, optimizer=config.train.optimizer,
      schedule=config.train.schedule, schedule_unit=config.train.schedule_unit,
      augment=config.data.augment, mean=tuple(config.data.mean), std=tuple(config.data.std))


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  return data_lib.load(config.dataset.name, config.dataset.data_dir or None,
                       **config.dataset.options.to_dict())


def _abstract_variables(model, num: int, input_shape) -> dict:
  keys = jax.random.split(jax.random.key(0), num)
  return jax.eval_shape(lambda k: train.init_variables(model, k, input_shape), keys)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Runs (or resumes) every stage up to ``config.stop_after``; returns the report's path."""
  if config.stop_after and config.stop_after not in STAGES:
    raise ValueError(f"stop_after={config.stop_after!r} is not a stage; stages: {STAGES}")
  wd = stages.Workdir(workdir)
  wd.write_config(config)
  dataset = load_dataset(config)
  seeds = tuple(int(s) for s in config.seeds)
  if not seeds:
    raise ValueError("config.seeds is empty; give at least one seed, e.g. (0,)")

  def finished(stage: str) -> bool:
    return config.stop_after == stage

  with wd.stage("splits", config={"split": config.split, "data": dataset.fingerprint},
                outputs=("splits.npz",)) as st:
    if not st.done:
      parts = splits_lib.deepunlearn(dataset.num_train, dataset.num_test,
                                     val_ratio=config.split.val_ratio,
                                     forget_ratio=config.split.forget_ratio, seed=config.split.seed)
      splits_lib.save(st.tmp / "splits.npz", parts, dataset)
      st.commit()
  parts = splits_lib.load(wd.path("splits.npz"), dataset)
  if finished("splits"):
    return wd.path("splits.npz")

  model = models.get(config.model.name, dataset.num_classes, **config.model.options.to_dict())
  input_shape = dataset.inputs.shape[1:]
  like = _abstract_variables(model, len(seeds), input_shape)
  with wd.stage("init", config={"model": config.model, "seeds": seeds,
                                "classes": dataset.num_classes, "shape": input_shape},
                outputs=("models/init",)) as st:
    if not st.done:
      keys = jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))
      checkpoint.save(st.tmp / "models/init", train.init_variables(model, keys, input_shape))
      st.commit()
  if finished("init"):
    return wd.path("models/init")

  train_config = {"train": config.train, "data": config.data, "parallel": config.parallel}
  with wd.stage("train", config=train_config, deps=("splits", "init"),
                outputs=("models/original", "models/retrain", "times.json")) as st:
    if not st.done:
      _train_reference_models(config, wd, st, model, dataset, parts, seeds, like)
      st.commit()
      shutil.rmtree(wd.path("checkpoints", "train"), ignore_errors=True)
  if finished("train"):
    return wd.path("models")

  methods = tuple(unlearn.get(m).name for m in config.methods)
  ctx = None
  bar = tqdm(methods, desc="unlearn", leave=False)
  for method in bar:
    bar.set_postfix_str(method)
    hparams = config.unlearn[method].to_dict() if method in config.unlearn else {}
    with wd.stage(f"unlearn_{method}", config={"hparams": hparams, "seed": config.unlearn_seed,
                                               "parallel": config.parallel},
                  deps=("train",), outputs=(f"unlearned/{method}",)) as st:
      if not st.done:
        ctx = ctx or _context(config, wd, model, dataset, parts, seeds, like)
        key = jax.random.fold_in(jax.random.key(config.unlearn_seed), zlib.crc32(method.encode()))
        result = unlearn.get(method).run(ctx, hparams, key)
        checkpoint.save(st.tmp / "unlearned" / method, jax.device_get(result.states),
                        metadata={"seconds": result.seconds,
                                  "compile_seconds": result.compile_seconds,
                                  "models": len(seeds), "hparams": hparams})
        st.commit()
  if finished("unlearn"):
    return wd.path("unlearned")

  with wd.stage("evaluate", config={"splits": SPLITS},
                deps=("train",) + tuple(f"unlearn_{m}" for m in methods),
                outputs=("results.csv",)) as st:
    if not st.done:
      rows = _evaluate(config, wd, model, dataset, parts, seeds, like, methods)
      report.write_csv(st.tmp / "results.csv", rows)
      st.commit()
  if finished("evaluate"):
    return wd.path("results.csv")

  with wd.stage("report", config={"methods": methods}, deps=("evaluate",),
                outputs=("report.md",)) as st:
    if not st.done:
      rows = report.read_csv(wd.path("results.csv"))
      times = json.loads(wd.path("times.json").read_text())
      title = f"DeepUnlearn: {config.dataset.name} / {config.model.name}"
      (st.tmp / "report.md").write_text(report.benchmark_report(title, rows, times))
      st.commit()
  return wd.path("report.md")


def _train_reference_models(config, wd, st, model, dataset, parts, seeds, like) -> None:
  """Originals (retain + forget) and retrained models (retain) of every seed, as one stack."""
  n = len(seeds)
  init = checkpoint.restore(wd.path("models/init"), like)
  stacked = jax.tree.map(lambda x: np.concatenate([x, x]), init)
  recipe = recipe_from_config(config)
  state = train.create_state(stacked, recipe, learning_rate=config.train.learning_rate,
                             momentum=config.train.momentum,
                             weight_decay=config.train.weight_decay)
  train_set = np.concatenate([parts["retain"], parts["forget"]])
  index_sets = [train_set] * n + [parts["retain"]] * n
  model_ids = [2 * s + g for g in range(2) for s in seeds]

  def log(epoch, record):
    wd.append_metrics({"stage": "train", "epoch": epoch,
                       "models": [f"{g}/{s}" for g in GROUPS for s in seeds], **record})

  start = time.perf_counter()
  result = train.fit(
      model, state, train.DeviceData.create(dataset), index_sets, recipe, config.train.epochs,
      jax.random.key(config.train.data_seed), model_ids=model_ids,
      strategy=config.parallel.strategy,
      max_models_per_program=config.parallel.max_models_per_program or None,
      checkpoints=checkpoint.TrainingCheckpoints(wd.path("checkpoints", "train")),
      checkpoint_every=config.checkpoint_every, on_epoch=log, progress="original+retrain")
  seconds = time.perf_counter() - start
  variables = jax.device_get(result.state.variables)
  for g, group in enumerate(GROUPS):
    checkpoint.save(st.tmp / "models" / group,
                    jax.tree.map(lambda x, g=g: x[g * n:(g + 1) * n], variables))
  # Per model: the stack's wall time shared equally (the models train together).
  times = {"stack_seconds": seconds, "models": 2 * n, "seconds_per_model": seconds / (2 * n),
           "epochs": config.train.epochs}
  (st.tmp / "times.json").write_text(json.dumps(times, indent=1))


def _context(config, wd, model, dataset, parts, seeds, like) -> unlearn.Context:
  return unlearn.Context.create(
      model, recipe_from_config(config), train.DeviceData.create(dataset),
      checkpoint.restore(wd.path("models/original"), like),
      checkpoint.restore(wd.path("models/init"), like),
      parts["retain"], parts["forget"], parts["val"], model_ids=seeds,
      num_classes=dataset.num_classes, strategy=config.parallel.strategy,
      train_epochs=config.train.epochs,
      train_hparams={k: config.train[k] for k in ("learning_rate", "momentum", "weight_decay")})


def _evaluate(config, wd, model, dataset, parts, seeds, like, methods) -> list[dict]:
  recipe = recipe_from_config(config)
  data = train.DeviceData.create(dataset)
  groups = [(g, wd.path("models", g)) for g in GROUPS]
  groups += [(m, wd.path("unlearned", m)) for m in methods]
  rows = []
  for group, path in groups:
    variables = checkpoint.restore(path, like)
    seconds = checkpoint.read_metadata(path).get("seconds") if group in methods else None
    acc = {name: train.evaluate(model, variables, data, parts[name], recipe,
                                config.parallel.strategy)["accuracy"] for name in SPLITS}
    for m, seed in enumerate(seeds):
      row = {"method": group, "seed": seed, **{f"{name}_acc": float(acc[name][m]) for name in SPLITS}}
      if seconds is not None:
        row["seconds"] = seconds / len(seeds)  # the stack's time, shared equally
      rows.append(row)
  return rows
