"""The DeepUnlearn benchmark over a workdir, as resumable stages (deepunlearn-spec 1.5, 2.3, 3, 5, 6).

Stages (``config.stop_after`` names the last one to run):

1. ``splits``: the fixed retain/forget/val/test split of the dataset (``splits.npz``).
2. ``init``: one initialisation per seed (``models/init``), shared by that seed's original and
   retrained model (deepunlearn-spec 2.3).
3. ``train``: per seed an *original* model (retain + forget) and a *retrained* model (retain
   only), all 2 x len(seeds) of them trained as one stack; periodic checkpoints let a killed run
   resume with the same numbers (``models/original``, ``models/retrain``, ``times.json``: the
   stack's training time over all epochs, compilation excluded as for unlearning).
4. ``search``: for every method of ``config.search.methods`` (that is also in ``config.methods``)
   an Optuna study on the tuning seeds ``config.search.seeds`` (`jaxmu.search`, deepunlearn-spec
   5) in ``search/<key>/`` (the key: the reference models and the sampler settings), its best
   trial also in ``search/<method>.json``. Not a locked stage: several processes may work on the
   same studies.
5. ``unlearn``: every method of ``config.methods`` on the stack of all originals, one resumable
   stage ``unlearn_<method>`` per method, with ``config.unlearn.<method>`` updated by the search's
   best hyper-parameters when the method was tuned (``unlearned/<method>``, with its run time,
   compilation excluded); with ``config.tuned_defaults`` every tuned method also with its
   reference defaults (``unlearn_<method>@defaults``, ``unlearned/<method>@defaults``), with
   ``config.tuned_accurate`` also with its study's most accurate trial (`search.most_accurate`;
   ``<method>@accurate``), objective10's choice set beside the trial closest in accuracy.
6. ``evaluate``: every metric of every (method, seed), ``original`` and ``retrain`` included
   (`stack_metrics`; ``results.csv`` and ``summary.csv``); a model with non-finite weights or
   logits is failed (column ``failure``), not measured.
7. ``ulira`` (with ``config.ulira.enabled``): U-LiRA of ``config.ulira.methods`` against
   retraining with this run's searched hyper-parameters, as resumable sub-stages in ``ulira/``
   (`jaxmu.pipelines.ulira_stage`: its own LiRA splits, originals and retrained models).
8. ``report``: ``report.md`` with the ranked table and the figures, U-LiRA's results included
   when it ran (`jaxmu.report.deepunlearn`).

Data flows one way: each stage reads only what the stages before it wrote.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import threadpoolctl
from tqdm.auto import tqdm

from jaxmu import (checkpoint, distributed, models, parallel, report, search, stages, train,
                   validate)
from jaxmu import methods as methods_lib
from jaxmu.attacks import metrics, mia
from jaxmu.data import splits as splits_lib
from jaxmu.pipelines import common, ulira_stage
from jaxmu.report.deepunlearn import ACCURATE_SUFFIX, DEFAULTS_SUFFIX

STAGES = ("splits", "init", "train", "search", "unlearn", "evaluate", "ulira", "report")
GROUPS = ("original", "retrain")
SPLITS = ("retain", "forget", "val", "test")
REFERENCES = ("original", "retrain")  # the models distances are measured to
DISTANCES = {"l2": metrics.l2_distance, "normalized_l2": metrics.normalized_l2_distance,
             "golatkar": metrics.model_distance}
# The columns of results.csv after method and seed (the evaluate stage's hash includes them);
# ``failure``: "" or why the model's metrics are undefined (non-finite weights or logits).
COLUMNS = (*(f"{s}_acc" for s in SPLITS), "val_mia", "test_mia", "indisc", "rr", "fr", "tr",
           "retdev", "seconds", "rte",
           *(f"{d}_to_{r}" for r in REFERENCES for d in DISTANCES), "failure")


def variant_runs(config, tuned: Sequence[str]) -> tuple[tuple[str, str], ...]:
  """(run name, method) of every tuned method's extra run: "<method>@defaults" with its
  reference defaults (``config.tuned_defaults``) and "<method>@accurate" with its study's most
  accurate trial (``config.tuned_accurate``); the report compares each with the tuned run,
  paired by seed."""
  return tuple((f"{m}{suffix}", m) for suffix, wanted in (
      (DEFAULTS_SUFFIX, config.get("tuned_defaults", False)),
      (ACCURATE_SUFFIX, config.get("tuned_accurate", False))) if wanted for m in tuned)


def tuning_positions(seeds: Sequence[int], tuning_seeds: Sequence[int]) -> list[int]:
  """Positions of the tuning seeds (a subset, checked by `jaxmu.validate`) in the stack of
  ``seeds``."""
  return [list(seeds).index(s) for s in tuning_seeds]


def run(config: ml_collections.ConfigDict, workdir: str | Path, process: int = 0) -> Path:
  """Runs (or resumes) every stage up to ``config.stop_after``; returns the last output's path.

  ``process``: this worker's index when several processes share the workdir (it seeds the
  search sampler, so workers propose different points). A config that `jaxmu.validate` finds
  wrong raises its `ConfigError` before anything runs.
  """
  validate.check("deepunlearn", config)
  pipe = _Pipeline(config, stages.Workdir(workdir), process)
  return stages.run_stages([pipe.splits, pipe.init, pipe.train, pipe.search, pipe.unlearn,
                            pipe.evaluate, pipe.ulira, pipe.report], config.stop_after)


class _Pipeline:
  """The stages; each method opens its stage(s) and returns its main output path."""

  def __init__(self, config, wd, process):
    self.config, self.wd, self.process = config, wd, process
    self.seeds = tuple(int(s) for s in config.seeds)
    self.methods = tuple(methods_lib.get(m).name for m in config.methods)
    self.tuned = tuple(m for m in (methods_lib.get(n).name for n in config.search.methods)
                       if m in self.methods)
    self.positions = tuning_positions(self.seeds, config.search.seeds) if self.tuned else []
    self.variant_runs = tuple(name for name, _ in variant_runs(config, self.tuned))
    wd.write_config(config)
    self.dataset = common.load_dataset(config.dataset)
    self.data = train.DeviceData.create(self.dataset)
    self.recipe = common.recipe(config)
    self.strategy = common.strategy(config)
    self.model = models.get(config.model.name, self.dataset.num_classes,
                            **config.model.options.to_dict())
    self.input_shape = self.dataset.inputs.shape[1:]
    self.like = common.abstract_variables(self.model, len(self.seeds), self.input_shape)
    self.tuning: dict[str, dict] = {}  # method -> its search result, for later stages
    self._contexts: dict[str, methods_lib.Context] = {}

  @functools.cached_property
  def parts(self):
    return splits_lib.load(self.wd.path("splits.npz"), self.dataset)

  def splits(self):
    c = self.config
    with self.wd.stage("splits", config={"split": c.split, "data": self.dataset.fingerprint},
                       outputs=("splits.npz",)) as st:
      if not st.done:
        parts = splits_lib.deepunlearn(self.dataset.num_train, self.dataset.num_test,
                                       val_ratio=c.split.val_ratio,
                                       forget_ratio=c.split.forget_ratio, seed=c.split.seed)
        splits_lib.save(st.tmp / "splits.npz", parts, self.dataset)
        st.commit()
    return self.wd.path("splits.npz")

  def init(self):
    with self.wd.stage("init", config={"model": self.config.model, "seeds": self.seeds,
                                       "classes": self.dataset.num_classes,
                                       "shape": self.input_shape},
                       outputs=("models/init",)) as st:
      if not st.done:
        keys = jax.vmap(jax.random.key)(np.asarray(self.seeds, np.uint32))
        checkpoint.save(st.tmp / "models/init",
                        train.init_variables(self.model, keys, self.input_shape))
        st.commit()
    return self.wd.path("models/init")

  def train(self):
    """Originals (retain + forget) and retrained models (retain) of every seed, as one stack."""
    c, parts, n = self.config, self.parts, len(self.seeds)
    with self.wd.stage("train", config={"train": c.train, "data": c.data, "parallel": c.parallel},
                       deps=("splits", "init"),
                       outputs=("models/original", "models/retrain", "times.json")) as st:
      if not st.done:
        init = checkpoint.restore(self.wd.path("models/init"), self.like)
        state = common.create_state(c, jax.tree.map(lambda x: np.concatenate([x, x]), init),
                                    self.recipe)
        train_set = np.concatenate([parts["retain"], parts["forget"]])

        def log(epoch, record):
          self.wd.append_metrics({"stage": "train", "epoch": epoch,
                                  "models": [f"{g}/{s}" for g in GROUPS for s in self.seeds],
                                  **record})

        result = distributed.fit(
            self.model, state, self.data, [train_set] * n + [parts["retain"]] * n, self.recipe,
            c.train.epochs, jax.random.key(c.train.data_seed),
            model_ids=[2 * s + g for g in range(2) for s in self.seeds], strategy=self.strategy,
            max_models_per_program=c.parallel.max_models_per_program or None,
            checkpoints=checkpoint.TrainingCheckpoints(self.wd.path("checkpoints", "train")),
            checkpoint_every=c.checkpoint_every, on_epoch=log, progress="original+retrain")
        variables = jax.device_get(result.state.variables)
        for g, group in enumerate(GROUPS):
          checkpoint.save(st.tmp / "models" / group,
                          parallel.slice_models(variables, g * n, (g + 1) * n))
        # Per model: the stack's time (compiled epochs, also those before a resume; as the
        # unlearning times, compilation excluded) shared equally (the models train together);
        # this is the retrained model's time per model that run-time efficiency divides by
        # (docs/deviations.md).
        seconds = result.seconds
        times = {"stack_seconds": seconds, "compile_seconds": result.compile_seconds,
                 "models": 2 * n, "seconds_per_model": seconds / (2 * n),
                 "epochs": c.train.epochs}
        (st.tmp / "times.json").write_text(json.dumps(times, indent=1))
        st.commit()
        shutil.rmtree(self.wd.path("checkpoints", "train"), ignore_errors=True)
    return self.wd.path("models")

  def context(self, which: str) -> methods_lib.Context:
    """The unlearning context of all seeds ("all") or of the tuning seeds ("tuning")."""
    if which not in self._contexts:
      c, parts, seeds = self.config, self.parts, self.seeds
      originals = checkpoint.restore(self.wd.path("models/original"), self.like)
      inits = checkpoint.restore(self.wd.path("models/init"), self.like)
      if which == "tuning":
        take = lambda tree: jax.tree.map(lambda x: x[np.asarray(self.positions)], tree)
        originals, inits = take(originals), take(inits)
        seeds = tuple(seeds[p] for p in self.positions)
      self._contexts[which] = common.context(
          c, self.model, self.data, originals, inits, parts["retain"], parts["forget"],
          parts["val"], seeds, self.dataset.num_classes, self.strategy, c.train.epochs)
    return self._contexts[which]

  def search(self):
    """An Optuna study per tuned method on the tuning seeds (not a locked stage)."""
    c = self.config
    # The search directory is keyed by the reference models it tunes against and the sampler's
    # settings, so new originals, retrained models or another sampler start new studies instead
    # of continuing stale ones (more trials continue the same studies).
    search_dir = self.wd.path("search", stages.config_hash(
        {"train": self.wd.stage_hash("train"), "seeds": tuple(c.search.seeds),
         **{k: c.search[k] for k in ("mode", "epoch_fraction", "sampler_seed",
                                     "population_size", "tpe_startup_trials", "study_prefix")}}))
    if self.tuned:
      retrained = jax.tree.map(lambda x: x[np.asarray(self.positions)],
                               checkpoint.restore(self.wd.path("models/retrain"), self.like))
    for method in self.tuned:
      previous = search.load_best(search_dir, method)
      # One BLAS thread for the trials' population-MIA fits (10 one-feature logistic
      # regressions per model): the same numbers, ~5x faster on a 2-core CPU than with
      # OpenBLAS threads waiting on each other (XLA's own threads are not affected).
      with threadpoolctl.threadpool_limits(1, user_api="blas"):
        result = search.tune(method, self.context("tuning"), retrained, c.search,
                             directory=search_dir, process=self.process, progress=True)
      self.wd.ran[f"search_{method}"] = ("reused" if result == previous else
                                         f"{result.trials_complete} complete trials")
      # The current result also at <workdir>/search/<method>.json, where U-LiRA alone reads it
      # (its config.search_dir).
      record = (search_dir / f"{method}.json").read_bytes()
      with stages.atomic_write(self.wd.path("search", f"{method}.json"), "wb") as f:
        f.write(record)
      choice = {k: v for k, v in json.loads(record).items()
                if k in ("best_per_model", "most_accurate_trial")}
      self.tuning[method] = {**result._asdict(), "best_values": list(result.best_values),
                             "seeds": tuple(c.search.seeds), "mode": c.search.mode, **choice}
    return search_dir

  def best_params(self, method: str) -> dict | None:
    return self.tuning.get(method, {}).get("best_params")

  def unlearn(self):
    """Every method on the stack of all originals, one stage per method (and per tuned method's
    variant runs, ``config.tuned_defaults`` and ``tuned_accurate``)."""
    c = self.config
    bar = tqdm(self.methods + self.variant_runs, desc="unlearn", leave=False)
    for method in bar:
      bar.set_postfix_str(method)
      if method in self.variant_runs:
        self._unlearn_variant(method)
        continue
      common.unlearn_stage(self.wd, f"unlearn_{method}", method,
                           common.method_hparams(c, method, self.best_params(method)),
                           c.unlearn_seed, c, ("train",), lambda: self.context("all"),
                           tuning=self.tuning.get(method))
    return self.wd.path("unlearned")

  def _unlearn_variant(self, name: str) -> None:
    """The method of ``name`` with the config's hyper-parameters ("<method>@defaults", no
    search) or its study's most accurate trial's ("<method>@accurate"), saved as
    ``unlearned/<name>``; the same key as the tuned run."""
    c = self.config
    method = name.partition("@")[0]
    searched = (self.tuning[method]["most_accurate_trial"]["params"]
                if name.endswith(ACCURATE_SUFFIX) else None)
    hparams = common.method_hparams(c, method, searched)
    with self.wd.stage(f"unlearn_{name}", config={"hparams": hparams, "seed": c.unlearn_seed,
                                                  "parallel": c.parallel},
                       deps=("train",), outputs=(f"unlearned/{name}",)) as st:
      if not st.done:
        ctx = self.context("all")
        result = distributed.unlearn(method, ctx, hparams, common.method_key(c.unlearn_seed,
                                                                             method))
        checkpoint.save(st.tmp / "unlearned" / name, jax.device_get(result.states),
                        metadata={"seconds": result.seconds,
                                  "compile_seconds": result.compile_seconds,
                                  "models": ctx.num_models, "hparams": hparams})
        st.commit()

  def evaluate(self):
    with self.wd.stage("evaluate", config={"splits": SPLITS, "columns": COLUMNS},
                       deps=("train",) + tuple(f"unlearn_{m}"
                                               for m in self.methods + self.variant_runs),
                       outputs=("results.csv", "summary.csv")) as st:
      if not st.done:
        rows = self._evaluate()
        report.write_csv(st.tmp / "results.csv", rows)
        report.write_csv(st.tmp / "summary.csv", report.benchmark_summary(rows))
        st.commit()
    return self.wd.path("results.csv")

  def ulira(self):
    """U-LiRA of ``config.ulira.methods`` with this run's searched hyper-parameters, in
    ``<workdir>/ulira`` (`ulira_stage`), when ``config.ulira.enabled``."""
    c = self.config
    if not c.ulira.enabled:
      return None
    hparams = {m: (common.method_hparams(c, m, self.best_params(m)),
                   "search" if m in self.tuning else "defaults")
               for m in (methods_lib.get(n).name for n in c.ulira.methods)}
    wd = stages.Workdir(self.wd.path("ulira"))
    path = ulira_stage.run(c, wd, self.dataset, self.strategy, hparams, stop_after="ulira")
    self.wd.ran.update({f"ulira/{name}": why for name, why in wd.ran.items()})
    return path

  def report(self):
    c = self.config
    ulira = stages.Workdir(self.wd.path("ulira")).stage_hash("ulira") if c.ulira.enabled else None
    figures = report.figure_names(with_ulira=c.ulira.enabled)
    with self.wd.stage("report", config={"methods": self.methods + self.variant_runs,
                                         "ulira": ulira,
                                         "figures": figures, "tuning": self.tuning},
                       deps=("evaluate",), outputs=("report.md",) + figures) as st:
      if not st.done:
        report.write_benchmark_report(
            st.tmp, title=f"DeepUnlearn: {c.dataset.name} / {c.model.name}",
            rows=report.read_csv(self.wd.path("results.csv")),
            times=json.loads(self.wd.path("times.json").read_text()),
            tuning=self.tuning, stages_run=self.wd.ran,
            ulira_dir=self.wd.path("ulira") if ulira else None)
        st.commit()
    return self.wd.path("report.md")

  def _evaluate(self) -> list[dict]:
    """`stack_metrics` of the originals, the retrained models and every method's stack (a
    diverged model's row has ``failure`` set and no metrics; the report lists it apart)."""
    times = json.loads(self.wd.path("times.json").read_text())
    references = {g: checkpoint.restore(self.wd.path("models", g), self.like) for g in GROUPS}
    retrain_seconds = times["seconds_per_model"]
    rows, retrain_accuracy = [], None
    for group in ("retrain", "original", *self.methods, *self.variant_runs):
      if group in GROUPS:  # the original was not unlearned: no time, no RTE
        variables = references[group]
        seconds = times["seconds_per_model"] if group == "retrain" else None
      else:
        path = self.wd.path("unlearned", group)
        variables = checkpoint.restore(path, self.like)
        seconds = checkpoint.read_metadata(path)["seconds"] / len(self.seeds)  # the stack's
      group_rows = stack_metrics(self.model, variables, references, self.data, self.parts,
                                 self.recipe, retrain_accuracy, seconds, retrain_seconds,
                                 self.strategy)
      if group == "retrain":
        retrain_accuracy = {s: np.asarray([r[f"{s}_acc"] for r in group_rows]) for s in SPLITS}
      rows += [{"method": group, "seed": seed, **r} for seed, r in zip(self.seeds, group_rows)]
    order = {g: i for i, g in enumerate(("original", "retrain", *self.methods,
                                         *self.variant_runs))}
    return sorted(rows, key=lambda r: order[r["method"]])  # stable: seeds stay in order


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
                  retrain_seconds: float,
                  strategy: parallel.Strategy | str = "auto") -> list[dict[str, float]]:
  """Every `COLUMNS` metric of each model of a stack (deepunlearn-spec 6.1-6.6), one dict each.

  Args:
    variables: the stack's variables (N models, one per seed).
    references: ``{"original": ..., "retrain": ...}`` stacked variables of the same seeds.
    parts: the global index arrays of ``SPLITS``.
    retrain_accuracy: {split: [N]} accuracies of the retrained models (None: this stack is the
      retrained one, whose own accuracies are the reference).
    seconds: the method's time per model (None: no time, e.g. nothing ran).
    retrain_seconds: the retrained model's training time per model.

  Accuracies (6.1) from one `distributed.predict` over the stack and all splits (under
  jax.distributed every process calls it together); Val/Test-MIA (6.2) by `mia.val_test_mia` on
  the per-sample cross-entropy of forget vs val / test samples (one NumPy stream per model, as
  the reference's evaluator); Indisc (6.3) from Test-MIA as the paper's tables; RR/FR/TR and
  RetDev (6.4) against the same seed's retrained model (NaN where the retrained model's accuracy
  is 0); RTE (6.5) = retrain seconds / method seconds; l2, normalized l2 and Golatkar distances
  (6.6) of the params to the seed's original and retrained model.

  A model with non-finite weights (any variable) or non-finite logits on any evaluated sample
  diverged: its row has ``failure`` = the reason and NaN metrics (its time and RTE kept), so the
  report never ranks it (the search fails such trials the same way, `jaxmu.search`). The
  reference computed metrics of whatever the run left (deepunlearn-spec 10.28).
  """
  labels = np.asarray(data.labels)
  index = np.concatenate([parts[s] for s in SPLITS])
  logits = np.asarray(distributed.predict(model, variables, data, index, recipe, strategy),
                      np.float64)
  loss = train.numpy_cross_entropy(logits, labels[index])
  correct = logits.argmax(-1) == labels[index]
  bounds = np.cumsum([0] + [len(parts[s]) for s in SPLITS])
  cut = {s: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}
  accuracy = {s: correct[:, cut[s]].mean(1) for s in SPLITS}
  reference = accuracy if retrain_accuracy is None else retrain_accuracy
  distances = jax.device_get(_distances(variables["params"], references["original"]["params"],
                                        references["retrain"]["params"]))
  bad_weights = _non_finite_variables(variables)
  bad_logits = (~np.isfinite(logits)).any(-1).sum(-1)  # [N] samples with a non-finite logit
  rows = []
  for m in range(logits.shape[0]):
    failure = (f"non-finite weights ({', '.join(bad_weights[m][:3])}"
               f"{', ...' if len(bad_weights[m]) > 3 else ''})" if bad_weights[m] else
               f"non-finite logits on {bad_logits[m]} of {logits.shape[1]} samples"
               if bad_logits[m] else "")
    if failure:
      nan = float("nan")
      row = {k: nan for k in COLUMNS}
      row["seconds"] = nan if seconds is None else seconds
      row["rte"] = (float(metrics.run_time_efficiency(retrain_seconds, seconds)) if seconds
                    else nan)
      rows.append({**row, "failure": failure})
      continue
    row = {f"{s}_acc": float(accuracy[s][m]) for s in SPLITS}
    # losses are finite where the logits are; BLAS threads only add waiting on one-feature fits
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
      row["val_mia"], row["test_mia"] = mia.val_test_mia(
          *(loss[m, cut[s]] for s in ("forget", "val", "test")))
    row["indisc"] = float(metrics.indiscernibility(row["test_mia"]))
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
    row["failure"] = ""
    rows.append({k: row[k] for k in COLUMNS})
  return rows


def _non_finite_variables(variables) -> list[list[str]]:
  """Per model of the stack, the paths of its variables holding a NaN or infinity."""
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  flags = [(jax.tree_util.keystr(path, simple=True, separator="/"),
            np.asarray(~jnp.isfinite(x).reshape(x.shape[0], -1).all(1))) for path, x in leaves]
  n = flags[0][1].shape[0] if flags else 0
  return [[name for name, bad in flags if bad[m]] for m in range(n)]
