"""The DeepUnlearn benchmark over a workdir, as resumable stages (deepunlearn-spec 1.5, 2.3, 3, 5, 6).

Stages (``config.stop_after`` names the last one to run):

1. ``splits``: the fixed retain/forget/val/test split of the dataset (``splits.npz``).
2. ``init``: one initialisation per seed (``models/init``), shared by that seed's original and
   retrained model (deepunlearn-spec 2.3).
3. ``train``: per seed an *original* model (retain + forget) and a *retrained* model (retain
   only), all 2 x len(seeds) of them trained as one stack; periodic checkpoints let a killed run
   resume with the same numbers (``models/original``, ``models/retrain``, ``times.json``).
4. ``search``: for every method of ``config.search.methods`` (that is also in ``config.methods``)
   an Optuna study on the tuning seeds ``config.search.seeds`` (`jaxmu.search`, deepunlearn-spec
   5) in ``search/<key>/`` (the key: the reference models and the sampler settings), its best
   trial also in ``search/<method>.json``. Not a locked stage: several processes may work on the
   same studies.
5. ``unlearn``: every method of ``config.methods`` on the stack of all originals, one resumable
   stage ``unlearn_<method>`` per method, with ``config.unlearn.<method>`` updated by the search's
   best hyper-parameters when the method was tuned (``unlearned/<method>``, with its run time,
   compilation excluded).
6. ``evaluate``: every metric of every (method, seed), ``original`` and ``retrain`` included
   (`stack_metrics`; ``results.csv`` and ``summary.csv``).
7. ``report``: ``report.md`` with the ranked table and the figures (`jaxmu.report`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import threadpoolctl
from tqdm.auto import tqdm

from jaxmu import checkpoint, models, parallel, report, search, stages, train
from jaxmu import data as data_lib
from jaxmu import methods as methods_lib
from jaxmu.attacks import metrics, mia
from jaxmu.data import splits as splits_lib

STAGES = ("splits", "init", "train", "search", "unlearn", "evaluate", "report")
GROUPS = ("original", "retrain")
SPLITS = ("retain", "forget", "val", "test")
REFERENCES = ("original", "retrain")  # the models distances are measured to
DISTANCES = {"l2": metrics.l2_distance, "normalized_l2": metrics.normalized_l2_distance,
             "golatkar": metrics.model_distance}
# The columns of results.csv after method and seed (the evaluate stage's hash includes them).
COLUMNS = (*(f"{s}_acc" for s in SPLITS), "val_mia", "test_mia", "indisc", "rr", "fr", "tr",
           "retdev", "seconds", "rte",
           *(f"{d}_to_{r}" for r in REFERENCES for d in DISTANCES))


def recipe_from_config(config: ml_collections.ConfigDict) -> train.Recipe:
  return train.Recipe(
      batch_size=config.train.batch_size, optimizer=config.train.optimizer,
      schedule=config.train.schedule, schedule_unit=config.train.schedule_unit,
      augment=config.data.augment, mean=tuple(config.data.mean), std=tuple(config.data.std),
      dtype=config.train.dtype)


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  return data_lib.load(config.dataset.name, config.dataset.data_dir or None,
                       **config.dataset.options.to_dict())


def abstract_variables(model, num: int, input_shape) -> dict:
  """Shapes and dtypes of a stack of ``num`` models' variables (the ``like`` of checkpoint.restore)."""
  keys = jax.random.split(jax.random.key(0), num)
  return jax.eval_shape(lambda k: train.init_variables(model, k, input_shape), keys)


def tuning_positions(seeds: Sequence[int], tuning_seeds: Sequence[int]) -> list[int]:
  """Positions of the tuning seeds in the stack of ``seeds``; ValueError unless a subset."""
  missing = [s for s in tuning_seeds if s not in seeds]
  if missing or not tuning_seeds:
    raise ValueError(f"config.search.seeds={tuple(tuning_seeds)} must be a non-empty subset of "
                     f"config.seeds={tuple(seeds)} (missing {missing}): the search tunes on the "
                     "models of those seeds; add them to config.seeds or change search.seeds")
  return [list(seeds).index(s) for s in tuning_seeds]


def run(config: ml_collections.ConfigDict, workdir: str | Path, process: int = 0) -> Path:
  """Runs (or resumes) every stage up to ``config.stop_after``; returns the last output's path.

  ``process``: this worker's index when several processes share the workdir (it seeds the
  search sampler, so workers propose different points).
  """
  if config.stop_after and config.stop_after not in STAGES:
    raise ValueError(f"stop_after={config.stop_after!r} is not a stage; stages: {STAGES}")
  wd = stages.Workdir(workdir)
  wd.write_config(config)
  dataset = load_dataset(config)
  seeds = tuple(int(s) for s in config.seeds)
  if not seeds:
    raise ValueError("config.seeds is empty; give at least one seed, e.g. (0,)")
  methods = tuple(methods_lib.get(m).name for m in config.methods)
  tuned_methods = tuple(m for m in (methods_lib.get(n).name for n in config.search.methods)
                        if m in methods)
  positions = tuning_positions(seeds, config.search.seeds) if tuned_methods else []
  ran: dict[str, str] = {}  # stage -> why it ran in this process, or "reused"

  @contextlib.contextmanager
  def stage(name, **kwargs):
    with wd.stage(name, **kwargs) as st:
      ran[name] = st.reason or "reused"
      yield st

  def finished(name: str) -> bool:
    return config.stop_after == name

  with stage("splits", config={"split": config.split, "data": dataset.fingerprint},
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
  like = abstract_variables(model, len(seeds), input_shape)
  with stage("init", config={"model": config.model, "seeds": seeds,
                             "classes": dataset.num_classes, "shape": input_shape},
             outputs=("models/init",)) as st:
    if not st.done:
      keys = jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))
      checkpoint.save(st.tmp / "models/init", train.init_variables(model, keys, input_shape))
      st.commit()
  if finished("init"):
    return wd.path("models/init")

  train_config = {"train": config.train, "data": config.data, "parallel": config.parallel}
  with stage("train", config=train_config, deps=("splits", "init"),
             outputs=("models/original", "models/retrain", "times.json")) as st:
    if not st.done:
      _train_reference_models(config, wd, st, model, dataset, parts, seeds, like)
      st.commit()
      shutil.rmtree(wd.path("checkpoints", "train"), ignore_errors=True)
  if finished("train"):
    return wd.path("models")

  contexts: dict[str, methods_lib.Context] = {}

  def context(which: str) -> methods_lib.Context:
    if which not in contexts:
      contexts[which] = _context(config, wd, model, dataset, parts, seeds, like,
                                 positions if which == "tuning" else None)
    return contexts[which]

  # The search directory is keyed by the reference models it tunes against and the sampler's
  # settings, so new originals, retrained models or another sampler start new studies instead
  # of continuing stale ones (more trials continue the same studies).
  search_dir = wd.path("search", stages.config_hash(
      {"train": wd.stage_hash("train"), "seeds": tuple(config.search.seeds),
       **{k: config.search[k] for k in ("mode", "epoch_fraction", "sampler_seed",
                                        "population_size", "study_prefix")}}))
  tuning: dict[str, dict] = {}  # method -> its search result, for the final stage and the report
  if tuned_methods:
    retrained = jax.tree.map(lambda x: x[np.asarray(positions)],
                             checkpoint.restore(wd.path("models/retrain"), like))
  for method in tuned_methods:
    previous = search.load_best(search_dir, method)
    result = search.tune(method, context("tuning"), retrained, config.search,
                         directory=search_dir, process=process, progress=True)
    ran[f"search_{method}"] = ("reused" if result == previous else
                               f"{result.trials_complete} complete trials")
    # The current result also at <workdir>/search/<method>.json, where other pipelines
    # (U-LiRA's config.search_dir) read it.
    with stages.atomic_write(wd.path("search", f"{method}.json"), "wb") as f:
      f.write((search_dir / f"{method}.json").read_bytes())
    tuning[method] = {**result._asdict(), "best_values": list(result.best_values),
                      "seeds": tuple(config.search.seeds), "mode": config.search.mode}
  if finished("search"):
    return search_dir

  bar = tqdm(methods, desc="unlearn", leave=False)
  for method in bar:
    bar.set_postfix_str(method)
    hparams = config.unlearn[method].to_dict() if method in config.unlearn else {}
    hparams.update(tuning.get(method, {}).get("best_params", {}))
    with stage(f"unlearn_{method}", config={"hparams": hparams, "seed": config.unlearn_seed,
                                            "parallel": config.parallel},
               deps=("train",), outputs=(f"unlearned/{method}",)) as st:
      if not st.done:
        key = jax.random.fold_in(jax.random.key(config.unlearn_seed), zlib.crc32(method.encode()))
        result = methods_lib.get(method).run(context("all"), hparams, key)
        checkpoint.save(st.tmp / "unlearned" / method, jax.device_get(result.states),
                        metadata={"seconds": result.seconds,
                                  "compile_seconds": result.compile_seconds,
                                  "models": len(seeds), "hparams": hparams,
                                  "tuning": tuning.get(method)})
        st.commit()
  if finished("unlearn"):
    return wd.path("unlearned")

  with stage("evaluate", config={"splits": SPLITS, "columns": COLUMNS},
             deps=("train",) + tuple(f"unlearn_{m}" for m in methods),
             outputs=("results.csv", "summary.csv")) as st:
    if not st.done:
      rows = _evaluate(config, wd, model, dataset, parts, seeds, like, methods)
      report.write_csv(st.tmp / "results.csv", rows)
      report.write_csv(st.tmp / "summary.csv", report.benchmark_summary(rows))
      st.commit()
  if finished("evaluate"):
    return wd.path("results.csv")

  ulira = _ulira_fingerprint(wd.path("ulira"))
  figures = report.figure_names(with_ulira=bool(ulira and any(wd.path("ulira").glob("roc/*.npz"))))
  with stage("report", config={"methods": methods, "ulira": ulira, "figures": figures,
                               "tuning": tuning}, deps=("evaluate",),
             outputs=("report.md",) + figures) as st:
    if not st.done:
      report.write_benchmark_report(
          st.tmp, title=f"DeepUnlearn: {config.dataset.name} / {config.model.name}",
          rows=report.read_csv(wd.path("results.csv")),
          times=json.loads(wd.path("times.json").read_text()),
          tuning=tuning, stages_run=ran,
          ulira_dir=wd.path("ulira") if ulira else None)
      st.commit()
  return wd.path("report.md")


def _ulira_fingerprint(directory: Path) -> str | None:
  """Hash of the U-LiRA results (``ulira.csv`` and its ROC files) when ``ulira.csv`` exists, so
  the report is redone when they appear or change; None without them."""
  if not (directory / "ulira.csv").is_file():
    return None
  files = [directory / "ulira.csv", *sorted(directory.glob("roc/*.npz"))]
  digest = hashlib.sha256()
  for f in files:
    digest.update(f.name.encode() + f.read_bytes())
  return digest.hexdigest()[:16]


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
    checkpoint.save(st.tmp / "models" / group, parallel.slice_models(variables, g * n, (g + 1) * n))
  # Per model: the stack's wall time shared equally (the models train together); this is the
  # retrained model's time per model that run-time efficiency divides by (docs/deviations.md).
  times = {"stack_seconds": seconds, "models": 2 * n, "seconds_per_model": seconds / (2 * n),
           "epochs": config.train.epochs}
  (st.tmp / "times.json").write_text(json.dumps(times, indent=1))


def _context(config, wd, model, dataset, parts, seeds, like, positions=None) -> methods_lib.Context:
  """The unlearning context of all seeds, or of the seeds at ``positions`` (the tuning seeds)."""
  originals = checkpoint.restore(wd.path("models/original"), like)
  inits = checkpoint.restore(wd.path("models/init"), like)
  if positions is not None:
    take = lambda tree: jax.tree.map(lambda x: x[np.asarray(positions)], tree)
    originals, inits, seeds = take(originals), take(inits), tuple(seeds[p] for p in positions)
  return methods_lib.Context.create(
      model, recipe_from_config(config), train.DeviceData.create(dataset), originals, inits,
      parts["retain"], parts["forget"], parts["val"], model_ids=seeds,
      num_classes=dataset.num_classes, strategy=config.parallel.strategy,
      train_epochs=config.train.epochs,
      train_hparams={k: config.train[k] for k in ("learning_rate", "momentum", "weight_decay")})


@jax.jit
def _distances(params, originals, retrained):
  """Every `DISTANCES` entry of each model to its seed's original and retrained model."""
  def one(p, o, r):
    return {f"{name}_to_{ref}": fn(p, q) for ref, q in (("original", o), ("retrain", r))
            for name, fn in DISTANCES.items()}
  return jax.vmap(one)(params, originals, retrained)


def stack_metrics(model, variables, references: Mapping[str, Any], data: train.DeviceData,
                  parts: Mapping[str, np.ndarray], recipe: train.Recipe,
                  retrain_accuracy: Mapping[str, np.ndarray] | None, seconds: float | None,
                  retrain_seconds: float, strategy: str = "auto") -> list[dict[str, float]]:
  """Every `COLUMNS` metric of each model of a stack (deepunlearn-spec 6.1-6.6), one dict each.

  Args:
    variables: the stack's variables (N models, one per seed).
    references: ``{"original": ..., "retrain": ...}`` stacked variables of the same seeds.
    parts: the global index arrays of ``SPLITS``.
    retrain_accuracy: {split: [N]} accuracies of the retrained models (None: this stack is the
      retrained one, whose own accuracies are the reference).
    seconds: the method's time per model (None: no time, e.g. nothing ran).
    retrain_seconds: the retrained model's training time per model.

  Accuracies (6.1) from one `train.predict` over the stack and all splits; Val/Test-MIA (6.2)
  by `mia.population_mia` on the per-sample cross-entropy of forget vs val / test samples (NaN
  when a loss is not finite, as the reference's undefined MIA of a destroyed model); Indisc
  (6.3) from Test-MIA as the paper's tables; RR/FR/TR and RetDev (6.4) against the same seed's
  retrained model (NaN where the retrained model's accuracy is 0); RTE (6.5) = retrain seconds /
  method seconds; l2, normalized l2 and
  Golatkar distances (6.6) of the params to the seed's original and retrained model.
  """
  labels = np.asarray(data.labels)
  index = np.concatenate([parts[s] for s in SPLITS])
  logits = np.asarray(train.predict(model, variables, data, index, recipe, strategy), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  loss = -np.take_along_axis(log_probs, labels[index][None, :, None], -1)[..., 0]
  correct = logits.argmax(-1) == labels[index]
  bounds = np.cumsum([0] + [len(parts[s]) for s in SPLITS])
  cut = {s: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}
  accuracy = {s: correct[:, cut[s]].mean(1) for s in SPLITS}
  reference = accuracy if retrain_accuracy is None else retrain_accuracy
  distances = jax.device_get(_distances(variables["params"], references["original"]["params"],
                                        references["retrain"]["params"]))
  rows = []
  for m in range(logits.shape[0]):
    row = {f"{s}_acc": float(accuracy[s][m]) for s in SPLITS}
    for other in ("val", "test"):
      pair = loss[m, cut["forget"]], loss[m, cut[other]]
      if all(np.isfinite(p).all() for p in pair):
        with threadpoolctl.threadpool_limits(1, user_api="blas"):  # threads only add waiting
          row[f"{other}_mia"] = mia.population_mia(*pair)  # on one-feature fits
      else:
        row[f"{other}_mia"] = float("nan")
    row["indisc"] = (float(metrics.indiscernibility(row["test_mia"]))
                     if np.isfinite(row["test_mia"]) else float("nan"))
    for short, split in (("rr", "retain"), ("fr", "forget"), ("tr", "test")):
      row[short] = (float(metrics.retention(accuracy[split][m], reference[split][m]))
                    if reference[split][m] > 0 else float("nan"))  # undefined against 0
    row["retdev"] = (float(metrics.retention_deviation(
        {s: accuracy[s][m] for s in SPLITS}, {s: reference[s][m] for s in SPLITS}))
        if np.isfinite([row["rr"], row["fr"], row["tr"]]).all() else float("nan"))
    row["seconds"] = float("nan") if seconds is None else seconds
    row["rte"] = (float(metrics.run_time_efficiency(retrain_seconds, seconds))
                  if seconds else float("nan"))
    row.update({k: float(v[m]) for k, v in distances.items()})
    rows.append({k: row[k] for k in COLUMNS})
  return rows


def _evaluate(config, wd, model, dataset, parts, seeds, like, methods) -> list[dict]:
  """`stack_metrics` of the originals, the retrained models and every method's stack."""
  recipe = recipe_from_config(config)
  data = train.DeviceData.create(dataset)
  times = json.loads(wd.path("times.json").read_text())
  references = {g: checkpoint.restore(wd.path("models", g), like) for g in GROUPS}
  retrain_seconds = times["seconds_per_model"]
  rows, retrain_accuracy = [], None
  for group in ("retrain", "original", *methods):
    if group in GROUPS:  # the original was not unlearned: no time, no RTE
      variables = references[group]
      seconds = times["seconds_per_model"] if group == "retrain" else None
    else:
      path = wd.path("unlearned", group)
      variables = checkpoint.restore(path, like)
      seconds = checkpoint.read_metadata(path)["seconds"] / len(seeds)  # the stack's, shared
    group_rows = stack_metrics(model, variables, references, data, parts, recipe,
                               retrain_accuracy, seconds, retrain_seconds,
                               config.parallel.strategy)
    if group == "retrain":
      retrain_accuracy = {s: np.asarray([r[f"{s}_acc"] for r in group_rows]) for s in SPLITS}
    rows += [{"method": group, "seed": seed, **r} for seed, r in zip(seeds, group_rows)]
  order = {g: i for i, g in enumerate(("original", "retrain", *methods))}
  return sorted(rows, key=lambda r: order[r["method"]])  # stable: seeds stay in order
