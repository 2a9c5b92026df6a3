"""The IAM audit over a workdir, as resumable stages (iam-spec 3-7, 9).

Stages (``config.stop_after`` names the last one to run):

1. ``splits``: the target pool, the shadow pool and every shadow's train/held-out split; per run
   (for each unlearning type of ``config.split.forget``: a seed, or a class for the class types)
   the forget flags and the seed-dependent val (population) / test split (``splits.npz``;
   iam-spec 5, 6.3, 7.1). Every type shares the shadows and the original model(s).
2. ``shadows``: K shadow OUT models, each on its own subset of the shadow pool and selected on its
   held-out part, plus UnLeak's shadow-origin model on the whole pool, as one stack (chunked by
   ``config.parallel.max_models_per_program``; ``models/shadows``, ``models/shadow_origin``).
3. ``ref_in``: RMIA-On's IN model on the population set of the first run (``models/ref_in``).
4. ``targets``: the original model(s) (one shared, or one per run with
   ``config.original_per_seed``) and a retrained model per run, as one stack
   (``models/original``, ``models/retrain``).
5. ``signals``: logits of every model on the query set (the target pool), on each run's
   population set, and of the shadows and the shadow origin on the shadow pool (their own
   training data: the IAM-Off constant and UnLeak). Eval-mode BatchNorm, no augmentation; the
   reference's augmented views of training-set queries with ``config.signals.augmented_queries``.
6. ``binui``: every attack of ``config.audit.attacks`` through `jaxmu.attacks.audit`, per run,
   for K in the sweep and each of min(K_max // K, max_groups) disjoint shadow groups; scores
   pooled over the runs of each unlearning type, one `iam.bin_ui` per (type, group) (iam-spec
   7.1: mean and std over groups).
7. ``scoring``: Table 5, IAM's scoring function against other distributions and shadow-free
   scores (`audit.scoring_functions`, iam-spec 10.4), per type and K = 1 group
   (``config.audit.scoring_ablation``).
8. ``score_ui``: each of the first ``score_ui.start_models`` shadows keeps training on the target
   pool; its best-so-far states at ``breaks`` evenly spaced epochs give ground-truth degrees b / B;
   Spearman/Pearson/MSE/KL of every attack against them, per K = 1 shadow group (iam-spec 7.5,
   9.2).
9. ``approx_<method>`` and ``approx``: IAM's approximate methods on the original of every run,
   scored with IAM-On (K = 1 groups): AUC and mean membership on forgotten / retained samples
   against the retrained models' (over- and under-unlearning, iam-spec 7.6, 9.4; Table 8), and
   the class-level read-out per run and overall (iam-spec 9.3, ``approx_class.csv``).
10. ``report``: ``report.md`` (Table 1 as attacks x unlearning types, each type's operating points
    and K sweep, Tables 5, 2 and 8) and figures.

``config.reuse`` takes the shadows or the targets of another finished run with the same splits
instead of training them (the architecture matrix of Fig. 4, `arch_matrix`).

Every table row also lands in ``results.csv`` (column ``table``: binui, scoring, score_ui, approx,
approx_class; column ``forget``: the unlearning type).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxmu import checkpoint, models, parallel, report, stages, train
from jaxmu import data as data_lib
from jaxmu import methods as methods_lib
from jaxmu.attacks import iam
from jaxmu.attacks.audit import (ATTACKS, SCORING_FUNCTIONS, Population, UnleakData, audit,
                                 scoring_functions, unleak_model)
from jaxmu.data import augment as augment_lib
from jaxmu.data import splits as splits_lib
from jaxmu.pipelines.deepunlearn import abstract_variables, load_dataset

STAGES = ("splits", "shadows", "ref_in", "targets", "signals", "binui", "scoring", "score_ui",
          "approx", "report")
SETTINGS = ("exact", "arch", "shifted", "incremental")
FORGET_TYPES = ("set_random", "class_percentage", "one_class")
LEVELS = (1e-3, 1e-2, 1e-1)
# PRNG namespaces of the model groups (model id = base + index): initialisation and data order.
_IDS = {"shadows": 100_000, "shadow_origin": 200_000, "ref_in": 300_000, "original": 400_000,
        "retrain": 500_000, "score_ui": 600_000}


class Run(NamedTuple):
  """One target: an unlearning type, the seed of its splits and, for class types, the class."""
  forget: str
  seed: int
  cls: int


def forget_types(config) -> tuple[str, ...]:
  """The unlearning types of ``config.split.forget``: a tuple, or one string ("a+b" for several)."""
  value = config.split.forget
  types = tuple(value.split("+")) if isinstance(value, str) else tuple(value)
  bad = [t for t in types if t not in FORGET_TYPES]
  if not types or bad or len(set(types)) != len(types):
    raise ValueError(f"split.forget={value!r}: give distinct types among {', '.join(FORGET_TYPES)} "
                     "(several joined by '+', e.g. set_random+class_percentage)")
  return types


def runs(config) -> list[Run]:
  """Every run, type by type: one per seed (set_random) or one per class with the first seed."""
  seeds = tuple(int(s) for s in config.seeds)
  if not seeds:
    raise ValueError("config.seeds is empty; give at least one seed, e.g. (42,)")
  out = []
  for forget in forget_types(config):
    if forget == "set_random":
      out += [Run(forget, s, 0) for s in seeds]
    else:
      out += [Run(forget, seeds[0], int(c)) for c in config.split.forget_classes]
  return out


def runs_of(all_runs, forget) -> list[int]:
  """Indices of the runs of one unlearning type (their scores are pooled, iam-spec 7.1)."""
  return [r for r, run in enumerate(all_runs) if run.forget == forget]


def k_sweep(config) -> tuple[int, ...]:
  """The K values of the sweep: ``config.audit.k_sweep`` or 1, 2, 4, ... <= num_shadows."""
  sweep = tuple(config.audit.k_sweep) or tuple(2**i for i in range(config.num_shadows.bit_length())
                                               if 2**i <= config.num_shadows)
  if not sweep or min(sweep) < 1 or max(sweep) > config.num_shadows:
    raise ValueError(f"k_sweep {sweep} must lie in 1..num_shadows={config.num_shadows}")
  return sweep


def recipe(config) -> train.Recipe:
  """The training recipe of every model of the audit (iam-spec 6.2; cosine period t_max)."""
  t, d = config.train, config.data
  return train.Recipe(batch_size=t.batch_size, optimizer=t.optimizer, schedule=t.schedule,
                      schedule_unit=t.schedule_unit, t_max=t.t_max, augment=d.augment,
                      mean=tuple(d.mean), std=tuple(d.std), dtype=t.get("dtype", "float32"))


def shadow_groups(num_shadows: int, k: int, max_groups: int) -> list[list[int]]:
  """``create_shadow_lists`` (iam-spec 3.5): [[0..k-1], [k..2k-1], ...], min(K_max // k, max)."""
  return [list(range(g * k, (g + 1) * k)) for g in range(min(num_shadows // k, max_groups))]


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Runs (or resumes) every stage up to ``config.stop_after``; returns the last output's path."""
  if config.stop_after and config.stop_after not in STAGES:
    raise ValueError(f"stop_after={config.stop_after!r} is not a stage; stages: {STAGES}")
  if config.setting not in SETTINGS:
    raise ValueError(f"setting={config.setting!r} is not available; choose one of {SETTINGS}")
  if config.num_shadows < 1:
    raise ValueError(f"num_shadows must be >= 1; got {config.num_shadows}")
  unknown = set(config.audit.attacks) - set(ATTACKS)
  if unknown:
    raise ValueError(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
  wd = stages.Workdir(workdir)
  wd.write_config(config)
  dataset = load_dataset(config)
  pipe = _Pipeline(config, wd, dataset)
  for stage in STAGES:
    path = getattr(pipe, stage)()
    if config.stop_after == stage:
      return path
  return path


class _Pipeline:
  """The stages; each method opens its stage(s) and returns its main output path."""

  def __init__(self, config, wd, dataset):
    self.config, self.wd, self.dataset = config, wd, dataset
    self.runs = runs(config)
    self.recipe = recipe(config)
    self.data = train.DeviceData.create(dataset)
    # Shadows and their own data: the target dataset, or another one (shifted, iam-spec 7.2).
    self.shadow_dataset, self.shadow_data, self.shadow_recipe = dataset, self.data, self.recipe
    if config.setting == "incremental":
      self.base = _base_workdir(config)
      sd = self.base.config.dataset
      self.shadow_dataset = data_lib.load(sd.name, sd.data_dir or None, **sd.options.to_dict())
      self.shadow_data = train.DeviceData.create(self.shadow_dataset)
      self.shadow_recipe = recipe(self.base.config)
    elif config.setting == "shifted":
      sd = config.shadow_dataset
      if not sd.name:
        raise ValueError("setting='shifted' needs --config.shadow_dataset.name (e.g. cinic10)")
      self.shadow_dataset = data_lib.load(sd.name, sd.data_dir or None, **sd.options.to_dict())
      self.shadow_data = train.DeviceData.create(self.shadow_dataset)
      own = data_lib.recipe(sd.name, reference="iam")
      self.shadow_recipe = dataclasses.replace(self.recipe, mean=tuple(own.mean),
                                               std=tuple(own.std), augment=own.augment)
    if self.shadow_dataset.inputs.shape[1:] != dataset.inputs.shape[1:]:
      raise ValueError(f"shadow dataset inputs {self.shadow_dataset.inputs.shape[1:]} differ from "
                       f"the target's {dataset.inputs.shape[1:]}")
    self.input_shape = dataset.inputs.shape[1:]
    self.model = models.get(config.model.name, dataset.num_classes, **config.model.options.to_dict())
    shadow_name = config.shadow_model.name if config.setting == "arch" else ""
    self.shadow_model = (models.get(shadow_name, dataset.num_classes,
                                    **config.shadow_model.options.to_dict())
                         if shadow_name else self.model)
    self._parts, self._target_inits, self._unleak_models, self._signals = None, None, {}, None

  @property
  def parts(self):
    if self._parts is None:
      self._parts = splits_lib.load(self.wd.path("splits.npz"), self.dataset)
    return self._parts

  # ------------------------------------------------------------------------------------ splits

  def splits(self):
    c = self.config
    shadow_source = (c.shadow_dataset.to_dict(), self.shadow_dataset.fingerprint)
    with self.wd.stage("splits", config={"split": c.split, "runs": self.runs,
                                         "shadows": c.num_shadows, "data": self.dataset.fingerprint,
                                         "shadow_data": shadow_source if c.setting == "shifted" else None,
                                         "incremental": c.incremental if self.incremental else None},
                       outputs=("splits.npz",)) as st:
      if not st.done:
        out = {}
        # incremental: the new data's pool is `pool_size` of its training samples (iam-spec 7.4).
        shadow_size = (self.dataset.num_train - c.incremental.pool_size if self.incremental
                       else c.split.shadow_size)
        for r, run in enumerate(self.runs):
          s = splits_lib.iam(
              self.dataset.num_train, self.dataset.num_test, shadow_size, seed=run.seed,
              forget=run.forget, forget_size=c.split.forget_size,
              fixed_forget=c.split.fixed_forget, labels=self.dataset.labels, forget_class=run.cls,
              class_ratio=c.split.class_ratio, num_shadows=c.num_shadows if r == 0 else 0,
              shadow_fix=c.split.shadow_fix, shadow_train_frac=c.split.shadow_train_frac,
              holdout_ratio=c.split.holdout_ratio, val_cap=c.split.val_cap,
              split_seed=c.split.split_seed)
          if r == 0:
            out.update({k: s[k] for k in ("pool", "shadow_pool", "shadow_train", "shadow_test")})
          out.update({f"flags_{r}": s["flags"], f"val_{r}": s["val"], f"test_{r}": s["test"]})
        if c.setting == "shifted":  # the shadows' pool and splits index the shadow dataset
          sd = self.shadow_dataset
          s = splits_lib.iam(sd.num_train, sd.num_test, c.shadow_dataset.shadow_size,
                             forget_size=1, fixed_forget=0,  # its forget set is unused
                             num_shadows=c.num_shadows, shadow_fix=c.split.shadow_fix,
                             shadow_train_frac=c.split.shadow_train_frac,
                             holdout_ratio=c.split.holdout_ratio, split_seed=c.split.split_seed)
          out.update({k: s[k] for k in ("shadow_pool", "shadow_train", "shadow_test")})
        if self.incremental:  # the old data's shadows and their splits
          base = splits_lib.load(self.base.path("splits.npz"), self.shadow_dataset)
          if base["shadow_train"].shape[0] < c.num_shadows:
            raise ValueError(f"the base run has {base['shadow_train'].shape[0]} shadows; "
                             f"num_shadows={c.num_shadows} asks for more")
          out.update({k: base[k][:c.num_shadows] if k != "shadow_pool" else base[k]
                      for k in ("shadow_pool", "shadow_train", "shadow_test")})
        if len({len(out[f"val_{r}"]) for r in range(len(self.runs))}) != 1:
          raise ValueError("population (val) sets of the runs differ in size; lower split.val_cap")
        splits_lib.save(st.tmp / "splits.npz", out, self.dataset)
        st.commit()
    return self.wd.path("splits.npz")

  @property
  def shifted(self):
    """The shadows belong to another dataset (shifted, or the old data of incremental)."""
    return self.config.setting in ("shifted", "incremental")

  @property
  def incremental(self):
    return self.config.setting == "incremental"

  def flags(self, r):
    return self.parts[f"flags_{r}"]

  # ---------------------------------------------------------------------------------- training

  def initial(self, model, ids):
    """Fresh initialisations of models ``ids`` (each from ``key(id)``). The target architecture's
    models (ref_in, originals, retrained) are initialised together, in one compiled program."""
    if model is not self.model or min(ids) < _IDS["ref_in"]:  # the shadows: their own stack
      return _init_variables(model, ids, self.input_shape)
    if self._target_inits is None:
      universe = ([_IDS["ref_in"]] + [_IDS["original"] + i for i in range(self.num_originals())]
                  + [_IDS["retrain"] + i for i in range(len(self.runs))])
      self._target_inits = universe, _init_variables(model, universe, self.input_shape)
    universe, variables = self._target_inits
    rows = np.asarray([universe.index(i) for i in ids])
    return jax.tree.map(lambda x: x[rows], variables)

  def _train(self, name, model, ids, index_sets, val_sets, epochs, batch_size, shadow_data=False,
             start=None):
    """Trains one stack from fresh initialisations or the variables ``start`` (ids: PRNG
    streams); returns the best-on-val states."""
    c = self.config
    variables = self.initial(model, ids) if start is None else start
    recipe = dataclasses.replace(self.shadow_recipe if shadow_data else self.recipe,
                                 batch_size=batch_size)
    state = train.create_state(variables, recipe, learning_rate=c.train.learning_rate,
                               momentum=c.train.momentum, weight_decay=c.train.weight_decay)

    def log(epoch, record):
      self.wd.append_metrics({"stage": name, "epoch": epoch, **record})

    result = train.fit(
        model, state, self.shadow_data if shadow_data else self.data, index_sets, recipe, epochs,
        jax.random.key(c.train.data_seed),
        model_ids=ids, strategy=c.parallel.strategy,
        val_sets=val_sets if c.train.select_best else None,
        max_models_per_program=c.parallel.max_models_per_program or None,
        checkpoints=checkpoint.TrainingCheckpoints(self.wd.path("checkpoints", name)),
        checkpoint_every=c.checkpoint_every, on_epoch=log, progress=name)
    return jax.device_get(result.best if c.train.select_best else result.state.variables)

  def _train_config(self, **extra):
    c = self.config
    return {"train": c.train, "data": c.data, "parallel": c.parallel, "model": c.model, **extra}

  def shadows(self):
    """K shadow OUT models (each selected on its held-out part) + the shadow origin (iam-spec 6.3)."""
    c, p = self.config, self.parts
    k = c.num_shadows
    config = self._train_config(shadow_model=c.shadow_model, setting=c.setting,
                                shadow_dataset=c.shadow_dataset)
    source = self.base if self.incremental else self._reused("shadows")
    if source is not None:
      config = {"source": str(source.root), "source_shadows": _finished_hash(source, "shadows"),
                "k": k}
    with self.wd.stage("shadows", config=config, deps=("splits",),
                       outputs=("models/shadows", "models/shadow_origin")) as st:
      if not st.done and source is not None:  # another run's shadows, as they are
        if not self.incremental:
          self._check_reuse(source, "shadows")
        like = abstract_variables(self.shadow_model, source.config.num_shadows, self.input_shape)
        shadows = checkpoint.restore(source.path("models/shadows"), like)
        checkpoint.save(st.tmp / "models/shadows", parallel.slice_models(shadows, 0, k))
        shutil.copytree(source.path("models/shadow_origin"), st.tmp / "models/shadow_origin")
        st.commit()
      if not st.done:
        # The origin is selected by its training accuracy, as the reference.
        index_sets = list(p["shadow_train"]) + [p["shadow_pool"]]
        val_sets = list(p["shadow_test"]) + [p["shadow_pool"]]
        ids = [_IDS["shadows"] + i for i in range(k)] + [_IDS["shadow_origin"]]
        best = self._train("shadows", self.shadow_model, ids, index_sets, val_sets,
                           c.train.epochs, c.train.batch_size, shadow_data=True)
        self._publish(st, "shadows", {"shadows": parallel.slice_models(best, 0, k),
                                      "shadow_origin": parallel.slice_models(best, k, k + 1)})
    return self.wd.path("models/shadows")

  def ref_in(self):
    """RMIA-On's IN model on the first run's population set, selected on the shadow pool (on the
    first run's test split when the shadow pool belongs to another dataset)."""
    c, p = self.config, self.parts
    source = self._reused("targets")
    config = self._train_config(ref_in=c.ref_in)
    if source is not None:
      config = {"source": str(source.root), "source_ref_in": _finished_hash(source, "ref_in")}
    with self.wd.stage("ref_in", config=config, deps=("splits",), outputs=("models/ref_in",)) as st:
      if not st.done and source is not None:
        self._check_reuse(source, "targets")
        shutil.copytree(source.path("models/ref_in"), st.tmp / "models/ref_in")
        st.commit()
      if not st.done:
        best = self._train("ref_in", self.model, [_IDS["ref_in"]], [p["val_0"]],
                           p["test_0"] if self.shifted else p["shadow_pool"], c.ref_in.epochs,
                           c.ref_in.batch_size)
        self._publish(st, "ref_in", {"ref_in": best})
    return self.wd.path("models/ref_in")

  def num_originals(self):
    return len(self.runs) if self.config.original_per_seed else 1

  def targets(self):
    """Original(s) on the whole pool and one retrained model per run on its retain set."""
    c, p = self.config, self.parts
    config = self._train_config(target_epochs=c.train.target_epochs,
                                original_per_seed=c.original_per_seed)
    if self.incremental:
      config["base"] = (str(self.base.root), self.base.stage_hash("targets"))
    source = self._reused("targets")
    if source is not None:
      config = {"source": str(source.root), "source_targets": _finished_hash(source, "targets")}
    with self.wd.stage("targets", config=config, deps=("splits",),
                       outputs=("models/original", "models/retrain")) as st:
      if not st.done and source is not None:  # another run's models, as they are
        self._check_reuse(source, "targets")
        for group in ("original", "retrain"):
          shutil.copytree(source.path("models", group), st.tmp / "models" / group)
        st.commit()
      if not st.done:
        o, r = self.num_originals(), len(self.runs)
        index_sets = [p["pool"]] * o + [p["pool"][~self.flags(i)] for i in range(r)]
        val_sets = [p[f"val_{i}"] for i in range(o)] + [p[f"val_{i}"] for i in range(r)]
        ids = [_IDS["original"] + i for i in range(o)] + [_IDS["retrain"] + i for i in range(r)]
        start = None
        if self.incremental:  # continue the old original(s) and the same run's retrained model
          base_o, base_runs = self.base.num_originals(), runs(self.base.config)
          if base_runs[:r] != self.runs:
            raise ValueError(f"the base run's runs (type, seed, class) {base_runs} do not start "
                             f"with this run's {self.runs}; use the same types and seeds")
          base_r = len(base_runs)
          like = lambda n: abstract_variables(self.model, n, self.input_shape)
          old_o = checkpoint.restore(self.base.path("models/original"), like(base_o))
          old_r = checkpoint.restore(self.base.path("models/retrain"), like(base_r))
          start = jax.tree.map(lambda a, b: np.concatenate(
              [a[np.arange(o) % base_o], b[:r]]), old_o, old_r)
        best = self._train("targets", self.model, ids, index_sets, val_sets,
                           c.train.target_epochs, c.train.batch_size, start=start)
        self._publish(st, "targets", {"original": parallel.slice_models(best, 0, o),
                                      "retrain": parallel.slice_models(best, o, o + r)})
    return self.wd.path("models/retrain")

  def _reused(self, kind):
    """The finished run whose ``kind`` models ("shadows", or "targets": originals, retrained and
    ref_in) ``config.reuse`` names, or None."""
    path = self.config.reuse[kind]
    if not path:
      return None
    if self.incremental:
      raise ValueError("setting='incremental' takes its models from incremental.base_workdir; "
                       "leave config.reuse empty")
    return _Base(path, f"reuse.{kind}")

  def _check_reuse(self, source, kind):
    """Another run's ``kind`` models fit this run: same architecture and the same index sets."""
    c, mine = self.config, self.parts
    own_arch, their_arch = _architecture(c, kind), _architecture(source.config, kind)
    if own_arch != their_arch:
      raise ValueError(f"reuse.{kind}={str(source.root)!r} holds {their_arch} models; this run "
                       f"needs {own_arch}")
    if kind == "shadows":
      theirs = np.load(source.path("splits.npz"))
      if source.config.num_shadows < c.num_shadows:
        raise ValueError(f"reuse.shadows={str(source.root)!r} has {source.config.num_shadows} "
                         f"shadows; num_shadows={c.num_shadows} asks for more")
      same = all(np.array_equal(theirs[key][:len(mine[key])], mine[key]) for key in
                 ("shadow_train", "shadow_test")) and np.array_equal(theirs["shadow_pool"],
                                                                     mine["shadow_pool"])
    else:
      theirs = splits_lib.load(source.path("splits.npz"), self.dataset)
      same = (runs(source.config) == self.runs
              and source.num_originals() == self.num_originals()
              and all(np.array_equal(theirs[key], mine[key]) for key in mine
                      if key.split("_")[0] in ("pool", "flags", "val")))
    if not same:
      raise ValueError(f"reuse.{kind}={str(source.root)!r} was trained on other index sets "
                       "(splits, runs or shadows differ); use the same split settings and seeds")

  def _publish(self, st, name, groups):
    """Saves each group's stacked variables under models/, commits the stage and drops the
    training checkpoints of ``name``."""
    for group, variables in groups.items():
      checkpoint.save(st.tmp / "models" / group, variables)
    st.commit()
    shutil.rmtree(self.wd.path("checkpoints", name), ignore_errors=True)

  def restore(self, group, n, model=None):
    like = abstract_variables(model or self.model, n, self.input_shape)
    return checkpoint.restore(self.wd.path("models", group), like)

  # ----------------------------------------------------------------------------------- signals

  def query_data(self, shadow_data=False):
    """The data training-set queries read: clean, or one augmented view (iam-spec 12.1)."""
    c = self.config
    data, recipe = (self.shadow_data, self.shadow_recipe) if shadow_data else (self.data, self.recipe)
    if not c.signals.augmented_queries:
      return data
    view = augment_lib.augment(jax.random.key(c.signals.view_seed), data.inputs, recipe.augment)
    return train.DeviceData(view, data.labels)

  def logits(self, model, variables, indices, data=None, recipe=None):
    """[M, len(indices), C] eval-mode logits (`train.predict`); the target's data and recipe
    unless given (shifted shadows read target queries with the target's normalisation, as the
    reference, iam-spec 12.23)."""
    return train.predict(model, variables, data or self.data, indices, recipe or self.recipe,
                         self.config.parallel.strategy).astype(np.float32)

  def signals(self):
    c, p = self.config, self.parts
    outputs = tuple(f"signals/{n}.npy" for n in SIGNAL_FILES)
    with self.wd.stage("signals", config={"signals": c.signals},
                       deps=("shadows", "ref_in", "targets"), outputs=outputs) as st:
      if not st.done:
        k, r, o = c.num_shadows, len(self.runs), self.num_originals()
        shadows = self.restore("shadows", k, self.shadow_model)
        origin = self.restore("shadow_origin", 1, self.shadow_model)
        originals, retrained = self.restore("original", o), self.restore("retrain", r)
        ref_in = self.restore("ref_in", 1)
        queries, shadow_queries = self.query_data(), self.query_data(shadow_data=True)
        vals = np.stack([p[f"val_{i}"] for i in range(r)])
        out = {
            "query_shadows": self.logits(self.shadow_model, shadows, p["pool"], queries),
            "query_original": self.logits(self.model, originals, p["pool"], queries),
            "query_retrain": self.logits(self.model, retrained, p["pool"], queries),
            "pop_retrain": np.stack([self.logits(self.model, _take(retrained, i), vals[i])[0]
                                     for i in range(r)]),
            "pop_shadows": np.stack([self.logits(self.shadow_model, shadows, v) for v in vals]),
            "pop_ref_in": np.stack([self.logits(self.model, ref_in, v)[0] for v in vals]),
            "pool_shadows": self.logits(self.shadow_model, shadows, p["shadow_pool"],
                                        shadow_queries, self.shadow_recipe),
            "pool_origin": self.logits(self.shadow_model, origin, p["shadow_pool"],
                                       shadow_queries, self.shadow_recipe)[0],
        }
        for name, array in out.items():
          (st.tmp / "signals").mkdir(exist_ok=True)
          np.save(st.tmp / "signals" / f"{name}.npy", array)
        st.commit()
    return self.wd.path("signals")

  def signal_arrays(self):
    """{name: array} of the signals stage's outputs, read once per pipeline."""
    if self._signals is None:
      self._signals = {n: np.load(self.wd.path("signals", f"{n}.npy")) for n in SIGNAL_FILES}
    return self._signals

  # ------------------------------------------------------------------------------------- BinUI

  def audit_inputs(self):
    """Arrays shared by every audit call: labels, held-out masks, shadow training positions."""
    p, labels = self.parts, np.asarray(self.dataset.labels)
    shadow_labels = np.asarray(self.shadow_dataset.labels)
    order = np.argsort(p["shadow_pool"])
    train_pos = order[np.searchsorted(p["shadow_pool"][order], p["shadow_train"])]
    held_out = np.ones((self.config.num_shadows, len(p["shadow_pool"])), bool)
    np.put_along_axis(held_out, train_pos, False, axis=1)
    return labels[p["pool"]], shadow_labels[p["shadow_pool"]], train_pos, held_out

  def binui(self):
    c, p = self.config, self.parts
    with self.wd.stage("binui", config={"audit": c.audit, "k": k_sweep(c)}, deps=("signals",),
                       outputs=("binui.csv", "binui_scores.npz")) as st:
      if not st.done:
        rows, kept = [], None
        sig = self.signal_arrays()
        inputs = self.audit_inputs()
        todo = [(forget, k, g) for forget in forget_types(c) for k in k_sweep(c)
                for g in shadow_groups(c.num_shadows, k, c.audit.max_groups)]
        for forget, k, group in tqdm(todo, desc="binui", leave=False):
          run_ids = runs_of(self.runs, forget)
          scores = self._audit_group(sig, group, inputs, run_ids, c.audit.attacks)
          flags = np.concatenate([self.flags(i) for i in run_ids])
          for attack, s in scores.items():
            m = iam.bin_ui(s, flags.astype(np.int64), levels=LEVELS, num_bootstrap=0)
            rows.append({"forget": forget, **_metric_row("binui", attack, k, group[0] // k, m)})
          if kept is None:  # the first type, K = 1, group 0: the figures' scores
            kept = {**scores, "_flags": flags}
        report.write_csv(st.tmp / "binui.csv", rows)
        np.savez(st.tmp / "binui_scores.npz", **kept)
        st.commit()
    return self.wd.path("binui.csv")

  def original_logits(self, sig, r):
    """Run r's original model on the queries: its own, or the shared one."""
    return sig["query_original"][r if self.config.original_per_seed else 0]

  def _audit_group(self, sig, group, inputs, run_ids, attacks, targets=None):
    """`audit` of runs ``run_ids`` with one shadow group; unlearning scores pooled over the runs
    {attack: [len(run_ids) * N]}. ``inputs``: `audit_inputs()`; ``targets``: {run: [N, C]} target
    logits and optionally {("pop", run): [P, C]} population logits instead of the retrained
    models'."""
    c = self.config
    labels, _, _, held_out = inputs
    model = None
    if "unleak" in attacks:  # fitted once per shadow group
      key = tuple(group)
      if key not in self._unleak_models:
        self._unleak_models[key] = unleak_model(UnleakData(
            sig["pool_origin"], sig["pool_shadows"][group], held_out[group]), c.audit.seed)
      model = self._unleak_models[key]
    shadow_train = _shadow_train(sig, group, inputs)
    targets = targets or {}
    pooled = {a: [] for a in attacks}
    for r in run_ids:
      original = self.original_logits(sig, r)
      target = targets.get(r, sig["query_retrain"][r])
      pop_labels = np.asarray(self.dataset.labels)[self.parts[f"val_{r}"]]
      population = Population(targets.get(("pop", r), sig["pop_retrain"][r]),
                              sig["pop_shadows"][r][group], pop_labels, sig["pop_ref_in"][r])
      result = audit(original, target, sig["query_shadows"][group], labels, attacks=attacks,
                     population=population, shadow_train=shadow_train, unleak=model,
                     one_sided_lira=self.runs[r].forget != "set_random", rmia_a=c.audit.rmia_a,
                     temperature=c.audit.temperature, gamma=c.audit.gamma,
                     num_interp=c.audit.num_interp,
                     seed=c.audit.seed + 1000 * group[0] + r)
      for a in attacks:
        pooled[a].append(result.scores[a])
    return {a: np.concatenate(v) for a, v in pooled.items()}

  def scoring(self):
    """Table 5 (iam-spec 10.4): IAM's scoring function ablated (`audit.scoring_functions`) on the
    retrained targets, per unlearning type and K = 1 shadow group, pooled over the type's runs."""
    c = self.config
    if not c.audit.scoring_ablation:
      return None
    with self.wd.stage("scoring", config={"audit": c.audit}, deps=("signals",),
                       outputs=("scoring.csv",)) as st:
      if not st.done:
        sig = self.signal_arrays()
        inputs = self.audit_inputs()
        labels = inputs[0]
        rows = []
        for forget in forget_types(c):
          run_ids = runs_of(self.runs, forget)
          flags = np.concatenate([self.flags(i) for i in run_ids]).astype(np.int64)
          for g, group in enumerate(shadow_groups(c.num_shadows, 1, c.audit.max_groups)):
            pooled = {key: [] for key in SCORING_FUNCTIONS}
            shadow_train = _shadow_train(sig, group, inputs)
            for r in run_ids:
              scores = scoring_functions(
                  self.original_logits(sig, r), sig["query_retrain"][r],
                  sig["query_shadows"][group], labels, shadow_train,
                  temperature=c.audit.temperature, num_interp=c.audit.num_interp)
              for key, v in scores.items():
                pooled[key].append(v)
            for key, v in pooled.items():
              m = iam.bin_ui(np.concatenate(v), flags, levels=LEVELS, num_bootstrap=0)
              rows.append({"forget": forget, **_metric_row("scoring", key, 1, g, m)})
        report.write_csv(st.tmp / "scoring.csv", rows)
        st.commit()
    return self.wd.path("scoring.csv")

  # ----------------------------------------------------------------------------------- ScoreUI

  def score_ui(self):
    """ScoreUI (iam-spec 7.5, 9.2): shadows 0..L-1 keep training on the pool; their best-so-far
    states at B breaks, with ground-truth membership degree b / B, are audited by every attack
    of ``score_ui.attacks`` with each K = 1 shadow group. Per group: Spearman, Pearson, MSE (all
    and per break) and histogram KL of each attack, averaged over the L start models."""
    c, p = self.config, self.parts
    loops, breaks, epochs = c.score_ui.start_models, c.score_ui.breaks, c.score_ui.epochs
    if not loops:
      return None
    if loops > c.num_shadows or breaks < 1 or epochs % breaks:
      raise ValueError(f"score_ui: start_models <= num_shadows, breaks >= 1 and epochs a multiple "
                       f"of breaks; got {loops}, {breaks}, {epochs}")
    attacks = tuple(c.score_ui.attacks) or tuple(c.audit.attacks)
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
      raise ValueError(f"score_ui.attacks: unknown {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    with self.wd.stage("score_ui", config={"score_ui": c.score_ui, "audit": c.audit,
                                           **self._train_config()},
                       deps=("signals",), outputs=("score_ui.csv",)) as st:
      if not st.done:
        start = jax.tree.map(lambda x: x[:loops], self.restore("shadows", c.num_shadows,
                                                               self.shadow_model))
        state = train.create_state(start, self.recipe, learning_rate=c.train.learning_rate,
                                   momentum=c.train.momentum, weight_decay=c.train.weight_decay)
        ckpts = checkpoint.TrainingCheckpoints(self.wd.path("checkpoints", "score_ui"),
                                               keep=breaks)
        every = epochs // breaks
        train.fit(self.shadow_model, state, self.data, [p["pool"]] * loops, self.recipe, epochs,
                  jax.random.key(c.train.data_seed),
                  model_ids=[_IDS["score_ui"] + g for g in range(loops)],
                  strategy=c.parallel.strategy, val_sets=p["val_0"], checkpoints=ckpts,
                  checkpoint_every=every, progress="score_ui")
        like = {"state": state, "best": state.variables, "best_acc": np.zeros(loops)}
        # Break 0: the shadow itself (degree 0); break b: best-so-far after b * every epochs.
        states = [start] + [ckpts.restore(b * every, like)["best"] for b in range(1, breaks + 1)]
        view = self.query_data()
        queries = [self.logits(self.shadow_model, v, p["pool"], view) for v in states]
        pops = [self.logits(self.shadow_model, v, p["val_0"]) for v in states]
        sig = self.signal_arrays()
        inputs = self.audit_inputs()
        degree = np.arange(breaks + 1) / breaks
        rows = []
        groups = shadow_groups(c.num_shadows, 1, c.audit.max_groups)
        for g, group in enumerate(tqdm(groups, desc="score_ui", leave=False)):
          per_loop = {a: [] for a in attacks}
          for loop in range(loops):
            scores = [self._audit_group(sig, group, inputs, [0], attacks,
                                        targets={0: q[loop], ("pop", 0): z[loop]})
                      for q, z in zip(queries, pops)]
            for a in attacks:
              per_loop[a].append(_score_ui_or_nan(np.stack([s[a] for s in scores], 1), degree))
          for a in attacks:
            rows.append({"table": "score_ui", "attack": a, "k": 1, "group": g,
                         **_mean_metrics(per_loop[a])})
        report.write_csv(st.tmp / "score_ui.csv", rows)
        st.commit()
        shutil.rmtree(self.wd.path("checkpoints", "score_ui"), ignore_errors=True)
    return self.wd.path("score_ui.csv")

  # ------------------------------------------------------------------ approximate unlearning

  def approx(self):
    """IAM's approximate methods on every run's original, audited with IAM-On (Table 8)."""
    c, p = self.config, self.parts
    methods = tuple(methods_lib.get(m).name for m in c.approx.methods)
    if not methods:
      return None
    r, o = len(self.runs), self.num_originals()
    ctx = None
    for method in methods:
      hparams = c.approx.hparams[method].to_dict() if method in c.approx.hparams else {}
      with self.wd.stage(f"approx_{method}", config={"hparams": hparams, "seed": c.approx.seed,
                                                     "parallel": c.parallel},
                         deps=("targets",), outputs=(f"unlearned/{method}",)) as st:
        if not st.done:
          if ctx is None:
            originals = self.restore("original", o)
            stack = jax.tree.map(lambda x: x[np.arange(r) % o], originals)
            ids = [_IDS["original"] + i % o for i in range(r)]
            inits = self.initial(self.model, ids)
            ctx = methods_lib.Context.create(
                self.model, self.recipe, self.data, stack, inits,
                [p["pool"][~self.flags(i)] for i in range(r)],
                [p["pool"][self.flags(i)] for i in range(r)],
                [p[f"val_{i}"] for i in range(r)], model_ids=tuple(range(r)),
                num_classes=self.dataset.num_classes, strategy=c.parallel.strategy,
                train_epochs=c.train.target_epochs,
                train_hparams={k: c.train[k] for k in ("learning_rate", "momentum", "weight_decay")})
          key = jax.random.fold_in(jax.random.key(c.approx.seed), zlib.crc32(method.encode()))
          result = methods_lib.get(method).run(ctx, hparams, key)
          checkpoint.save(st.tmp / "unlearned" / method, jax.device_get(result.states),
                          metadata={"seconds": result.seconds, "hparams": hparams})
          st.commit()
    with self.wd.stage("approx", config={"audit": c.audit, "margin": c.approx.margin},
                       deps=("signals",) + tuple(f"approx_{m}" for m in methods),
                       outputs=("approx.csv", "approx_class.csv")) as st:
      if not st.done:
        sig = self.signal_arrays()
        inputs = self.audit_inputs()
        like = abstract_variables(self.model, r, self.input_shape)
        targets = {"retrain": None}
        for m in methods:
          variables = checkpoint.restore(self.wd.path("unlearned", m), like)
          targets[m] = dict(enumerate(self.logits(self.model, variables, p["pool"],
                                                  self.query_data())))
        rows, class_rows = [], []
        for forget in forget_types(c):
          run_ids = runs_of(self.runs, forget)
          flags = np.stack([self.flags(i) for i in run_ids])
          for g, group in enumerate(shadow_groups(c.num_shadows, 1, c.audit.max_groups)):
            for name, logits in targets.items():
              s = self._audit_group(sig, group, inputs, run_ids, ("iam_on",),
                                    targets=logits)["iam_on"]
              m = iam.bin_ui(s, flags.ravel().astype(np.int64), levels=LEVELS, num_bootstrap=0)
              levels = iam.class_level_metrics(s.reshape(flags.shape), flags)
              overall = levels["overall"]
              rows.append({"forget": forget, **_metric_row("approx", "iam_on", 1, g, m),
                           "method": name,
                           "member_forgotten": overall["mean_0"],
                           "member_forgotten_std": overall["std_0"],
                           "member_retained": overall["mean_1"],
                           "member_retained_std": overall["std_1"]})
              for run, values in [*zip(run_ids, levels["runs"]), ("overall", overall)]:
                cls = "" if run == "overall" else self.runs[run].cls
                seed = "" if run == "overall" else self.runs[run].seed
                class_rows.append({"table": "approx_class", "forget": forget, "method": name,
                                   "group": g, "run": run, "seed": seed, "class": cls, **values})
        report.write_csv(st.tmp / "approx.csv", rows)
        report.write_csv(st.tmp / "approx_class.csv", class_rows)
        st.commit()
    return self.wd.path("approx.csv")

  # ------------------------------------------------------------------------------------ report

  def report(self):
    c = self.config
    parts = [n for n in ("binui.csv", "scoring.csv", "score_ui.csv", "approx.csv",
                         "approx_class.csv") if self.wd.path(n).exists()]
    deps = ("binui",) + (("scoring",) if c.audit.scoring_ablation else ()) + (
        ("score_ui",) if c.score_ui.start_models else ()) + (
        ("approx",) if c.approx.methods else ())
    with self.wd.stage("report", config={"margin": c.approx.margin, "parts": parts}, deps=deps,
                       outputs=("report.md", "results.csv", "roc.png", "auc_vs_k.png",
                                "iam_hist.png")) as st:
      if not st.done:
        rows = [row for n in parts for row in report.read_csv(self.wd.path(n))]
        report.write_csv(st.tmp / "results.csv", rows)
        kept = dict(np.load(self.wd.path("binui_scores.npz")))
        (st.tmp / "report.md").write_text(render_report(c, rows))
        _figures(st.tmp, rows, kept)
        st.commit()
    return self.wd.path("report.md")


SIGNAL_FILES = ("query_shadows", "query_original", "query_retrain", "pop_retrain", "pop_shadows",
                "pop_ref_in", "pool_shadows", "pool_origin")


class _Base:
  """A finished run whose models this one continues (incremental) or reuses (its workdir,
  config and stages)."""

  def __init__(self, root, field="incremental.base_workdir"):
    self.root = Path(root)
    if not (self.root / "config.json").exists():
      raise ValueError(f"{field}={str(root)!r} holds no IAM run (config.json missing); run "
                       "launch/iam.py there first")
    self.config = ml_collections.ConfigDict(json.loads((self.root / "config.json").read_text()))
    self.stages = stages.Workdir(self.root)

  def path(self, *parts):
    return self.root.joinpath(*parts)

  def stage_hash(self, name):
    return self.stages.stage_hash(name)

  def num_originals(self):
    return len(runs(self.config)) if self.config.original_per_seed else 1


def _base_workdir(config) -> _Base:
  base = _Base(config.incremental.base_workdir)
  if base.config.model.name != config.model.name:
    raise ValueError(f"the base run's model {base.config.model.name!r} differs from "
                     f"{config.model.name!r}; incremental continues its models")
  return base


def _finished_hash(source, stage):
  try:
    return source.stage_hash(stage)
  except RuntimeError:
    raise ValueError(f"{str(source.root)!r} has not finished its {stage!r} stage; run it "
                     "first") from None


def _architecture(config, kind):
  """(name, options) of a run's shadow ("shadows") or target ("targets") architecture."""
  model = config.model
  if kind == "shadows" and config.setting == "arch" and config.shadow_model.name:
    model = config.shadow_model
  return model.name, tuple(sorted(model.options.to_dict().items()))


def _arch_label(config, kind):
  name, options = _architecture(config, kind)
  return name + (f"[{','.join(f'{k}={v}' for k, v in options)}]" if options else "")


def arch_matrix(workdirs, forget=None):
  """Fig. 4 (iam-spec 7.3, 10.8): the K = 1 BinUI AUC of every attack per (target architecture,
  shadow architecture), one finished run (work directory) per cell, for the unlearning type
  ``forget`` (default: each run's first). Returns (rows, markdown): rows with target, shadow,
  attack, auc (mean over shadow groups), auc_std and groups; markdown, one table per attack.

  The cheap way to fill the matrix: one `exact` run per architecture, then for each other pair a
  `setting="arch"` run with ``config.reuse.targets`` and ``config.reuse.shadows`` pointing at the
  two runs, which trains nothing (docs/iam.md).
  """
  cells = {}
  for workdir in workdirs:
    run = _Base(workdir, "workdir")
    if not run.path("binui.csv").exists():
      raise ValueError(f"{str(workdir)!r} has no binui.csv; run its IAM audit up to binui first")
    kind = forget or forget_types(run.config)[0]
    rows = [r for r in report.read_csv(run.path("binui.csv"))
            if int(r["k"]) == 1 and r["forget"] == kind]
    if not rows:
      raise ValueError(f"{str(workdir)!r} has no K = 1 results for unlearning type {kind!r}")
    cell = (_arch_label(run.config, "targets"), _arch_label(run.config, "shadows"))
    if cell in cells:
      raise ValueError(f"two work directories give the cell target={cell[0]}, shadow={cell[1]}: "
                       f"{cells[cell][0]} and {workdir}")
    cells[cell] = (workdir, rows)
  targets = list(dict.fromkeys(t for t, _ in cells))
  shadows = list(dict.fromkeys(s for _, s in cells))
  attacks = list(dict.fromkeys(r["attack"] for _, rows in cells.values() for r in rows))
  out_rows, text = [], []
  for a in attacks:
    text += [f"## {ATTACKS[a][0]}: AUC % (rows: target, columns: shadow; ± std over groups)", "",
             "| target \\ shadow | " + " | ".join(shadows) + " |",
             "|---" * (len(shadows) + 1) + "|"]
    for t in targets:
      line = []
      for s in shadows:
        auc = [r["auc"] for r in cells.get((t, s), (None, []))[1] if r["attack"] == a]
        if auc:
          out_rows.append({"target": t, "shadow": s, "attack": a, "auc": float(np.mean(auc)),
                           "auc_std": float(np.std(auc)), "groups": len(auc)})
        line.append(_mean_std(auc) if auc else "—")
      text.append(f"| {t} | " + " | ".join(line) + " |")
    text.append("")
  return out_rows, "\n".join(text)


def _init_variables(model, ids, input_shape):
  return train.init_variables(model, jax.vmap(jax.random.key)(np.asarray(ids, np.uint32)),
                              input_shape)


def _take(variables, i):
  return jax.tree.map(lambda x: x[i:i + 1], variables)


def _metric_row(table, attack, k, group, m):
  return {"table": table, "attack": attack, "k": k, "group": group, "auc": m["auc"],
          "balanced_accuracy": m["balanced_accuracy"],
          **{f"tpr@{lv:g}": m["tpr_at_fpr"][lv] for lv in LEVELS},
          **{f"tnr@{lv:g}": m["tnr_at_fnr"][lv] for lv in LEVELS},
          "score_forgotten": m["score_forgotten_mean"], "score_retained": m["score_retained_mean"]}


def _shadow_train(sig, group, inputs):
  """IAM-Off's inputs for a shadow group: each shadow's logits and labels on its own training
  samples (``inputs``: `_Pipeline.audit_inputs()`)."""
  _, pool_labels, train_pos, _ = inputs
  return [(sig["pool_shadows"][k][train_pos[k]], pool_labels[train_pos[k]]) for k in group]


def _score_ui_or_nan(scores, degree):
  """`iam.score_ui`, or NaN metrics for an attack whose scores are constant (nothing to rank)."""
  if np.ptp(scores) == 0:
    nan = float("nan")
    return {"spearman": nan, "pearson": nan, "mse": nan, "kl": nan,
            "mse_per_column": [nan] * scores.shape[1]}
  return iam.score_ui(scores, degree)


def _mean_metrics(per_loop):
  """The mean over start models of `iam.score_ui` results, as flat CSV columns (mse_b<b>)."""
  out = {m: float(np.mean([d[m] for d in per_loop])) for m in ("spearman", "pearson", "mse", "kl")}
  columns = np.mean([d["mse_per_column"] for d in per_loop], axis=0)
  return {**out, **{f"mse_b{b}": float(v) for b, v in enumerate(columns)}}


# ---------------------------------------------------------------------------------------- report

def _mean_std(values, scale=100.0, digits=2):
  """"mean ± std" of ``values`` times ``scale`` (percent by default)."""
  v = scale * np.asarray(values, np.float64)
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def render_report(config, rows) -> str:
  """report.md: Table 1 (attacks x unlearning types, K = 1) with each type's operating points
  and K sweep, Table 2 (ScoreUI), Table 8 (approximate methods) and its class-level read-out."""
  types = forget_types(config)
  binui = [r for r in rows if r["table"] == "binui"]
  attacks = list(dict.fromkeys(r["attack"] for r in binui))
  ks = sorted({int(r["k"]) for r in binui})
  count = {t: len(runs_of(runs(config), t)) for t in types}
  out = [f"# IAM audit: {config.dataset.name} / {config.model.name}, {', '.join(types)}", "",
         f"{config.num_shadows} shadow OUT models; runs pooled per unlearning type ("
         + ", ".join(f"{t}: {count[t]} {'seeds' if t == 'set_random' else 'classes'}"
                     for t in types)
         + "). Numbers in %: mean ± std over disjoint shadow groups (iam-spec 7.1). Positives = "
         "retained samples, scored by 1 − unlearning score (iam-spec 9.1): TPR@FPR is the share of "
         "retained samples recognised while at most that share of forgotten samples is called "
         "retained; TNR@FNR the share of forgotten samples detected.", "",
         "## Table 1: BinUI AUC, K = 1 (exact unlearning: retrained targets)", "",
         "| attack | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
  k1 = lambda a, t: [r for r in binui
                     if r["attack"] == a and int(r["k"]) == 1 and r["forget"] == t]
  for a in attacks:
    out.append(f"| {ATTACKS[a][0]} | "
               + " | ".join(_mean_std([r["auc"] for r in k1(a, t)]) for t in types) + " |")
  for t in types:
    out += ["", f"### Operating points, K = 1: {t}", "",
            "| attack | AUC | balanced acc. | " + " | ".join(f"TPR@FPR={lv:g}" for lv in LEVELS)
            + " | " + " | ".join(f"TNR@FNR={lv:g}" for lv in LEVELS) + " | groups |",
            "|---" * (4 + 2 * len(LEVELS)) + "|"]
    for a in attacks:
      sel = k1(a, t)
      cells = [_mean_std([r[m] for r in sel]) for m in
               ("auc", "balanced_accuracy", *(f"tpr@{lv:g}" for lv in LEVELS),
                *(f"tnr@{lv:g}" for lv in LEVELS))]
      out.append(f"| {ATTACKS[a][0]} | " + " | ".join(cells) + f" | {len(sel)} |")
    iam_rows = k1("iam_on", t)
    if iam_rows:
      out += ["", f"Mean IAM-On unlearning score (K = 1, {t}): forgotten "
              f"{np.mean([r['score_forgotten'] for r in iam_rows]):.3f}, retained "
              f"{np.mean([r['score_retained'] for r in iam_rows]):.3f} (iam-spec 10.1f)."]
    out += ["", f"### Number of shadow models K (AUC %, mean ± std over groups; Fig. 5): {t}", "",
            "| attack | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for a in attacks:
      cells = [_mean_std([r["auc"] for r in binui
                          if r["attack"] == a and int(r["k"]) == k and r["forget"] == t])
               for k in ks]
      out.append(f"| {ATTACKS[a][0]} | " + " | ".join(cells) + " |")
  out += _scoring_tables(rows, types) + _score_ui_table(rows) + _approx_tables(config, rows, types)
  out += ["", "Figures: roc.png (log-log ROC per attack, K = 1, group 0), auc_vs_k.png, "
          "iam_hist.png (IAM-On score of forgotten vs retained samples); all three for "
          f"{types[0]}.",
          ""]
  return "\n".join(out)


def _scoring_tables(rows, types):
  scoring = [r for r in rows if r["table"] == "scoring"]
  if not scoring:
    return []
  out = ["", "## Table 5: scoring functions (K = 1, retrained targets)", "",
         "IAM's Gumbel fit against other reference distributions and shadow-free scores "
         "(iam-spec 10.4): AUC etc. in %, mean ± std over shadow groups; the mean unlearning "
         "score of forgotten and retained samples."]
  for t in types:
    out += ["", f"### {t}", "", "| scoring function | AUC | balanced acc. | TPR@FPR=0.01 | "
            "TNR@FNR=0.01 | score forgotten | score retained |", "|---" * 7 + "|"]
    for key in SCORING_FUNCTIONS:
      sel = [r for r in scoring if r["attack"] == key and r["forget"] == t]
      if sel:
        out.append(f"| {SCORING_FUNCTIONS[key][0]} | " + " | ".join(
            [_mean_std([r[m] for r in sel]) for m in ("auc", "balanced_accuracy", "tpr@0.01",
                                                       "tnr@0.01")]
            + [f"{np.mean([r[m] for r in sel]):.3f}" for m in ("score_forgotten",
                                                               "score_retained")]) + " |")
  return out


def _score_ui_table(rows):
  score = [r for r in rows if r["table"] == "score_ui"]
  if not score:
    return []
  out = ["", "## Table 2: ScoreUI (membership against the ground-truth degree b / B)", "",
         "Min-max normalised membership (1 − unlearning score) of the continued-training "
         "checkpoints against their degree b / B (iam-spec 7.5): mean over start models, mean ± "
         "std over K = 1 shadow groups. KL: 20-bin histogram divergence of degrees from scores.",
         "", "| attack | Spearman | Pearson | MSE | KL | groups |", "|---|---|---|---|---|---|"]
  for a in dict.fromkeys(r["attack"] for r in score):
    sel = [r for r in score if r["attack"] == a]
    out.append(f"| {ATTACKS[a][0]} | " + " | ".join(
        _mean_std([r[m] for r in sel], 1, 3) for m in ("spearman", "pearson", "mse", "kl"))
        + f" | {len(sel)} |")
  return out


def _approx_tables(config, rows, types):
  approx = [r for r in rows if r["table"] == "approx"]
  if not approx:
    return []
  out = ["", "## Table 8: approximate unlearning audited with IAM-On (K = 1)", "",
         "Membership = 1 − IAM unlearning score, mean over samples (± std over samples), "
         "averaged over shadow groups. Under-unlearning: forgotten samples keep more membership "
         f"than after retraining (by > {config.approx.margin}); over-unlearning: retained "
         "samples lose membership (iam-spec 9.4); forgotten below retrain: forgotten samples "
         "look less like members than after retraining, itself a trace of the method."]
  for t in types:
    sel_t = [r for r in approx if r["forget"] == t]
    out += ["", f"### {t}", "",
            "| method | membership retained | membership forgotten | AUC % | read-out |",
            "|---|---|---|---|---|"]
    ref = [r for r in sel_t if r["method"] == "retrain"]
    ref_f = np.mean([r["member_forgotten"] for r in ref])
    ref_r = np.mean([r["member_retained"] for r in ref])
    for method in dict.fromkeys(r["method"] for r in sel_t):
      sel = [r for r in sel_t if r["method"] == method]
      mf = np.mean([r["member_forgotten"] for r in sel])
      mr = np.mean([r["member_retained"] for r in sel])
      sf = np.mean([r["member_forgotten_std"] for r in sel])
      sr = np.mean([r["member_retained_std"] for r in sel])
      margin = config.approx.margin
      verdict = [w for w, bad in (("under-unlearning", mf - ref_f > margin),
                                  ("forgotten below retrain", ref_f - mf > margin),
                                  ("over-unlearning", ref_r - mr > margin)) if bad]
      out.append(f"| {method} | {mr:.3f} ± {sr:.3f} | {mf:.3f} ± {sf:.3f} | "
                 f"{_mean_std([r['auc'] for r in sel])} | "
                 f"{'reference' if method == 'retrain' else ', '.join(verdict) or 'as retrain'} |")
  classes = [r for r in rows if r["table"] == "approx_class" and r["run"] == "overall"]
  if classes:
    metrics = ("auc", "bce", "last_1", "last_0", "b_std", "c_std1", "c_std0")
    out += ["", "## Table 8, class-level read-out (iam-spec 9.3)", "",
            "Over all runs of a type (per run: `approx_class.csv`), mean over shadow groups: AUC, "
            "class-weighted BCE of membership against b (1 = retained), last-1 / last-0 (mean "
            "membership of the 10% least member-like retained / most member-like forgotten "
            "samples), b-std (std of the per-run BCE), c-std1 / c-std0 (std of the per-run mean "
            "membership of retained / forgotten samples)."]
    for t in types:
      sel_t = [r for r in classes if r["forget"] == t]
      out += ["", f"### {t}", "", "| method | " + " | ".join(metrics) + " |",
              "|---" * (len(metrics) + 1) + "|"]
      for method in dict.fromkeys(r["method"] for r in sel_t):
        sel = [r for r in sel_t if r["method"] == method]
        out.append(f"| {method} | "
                   + " | ".join(f"{np.mean([r[m] for r in sel]):.3f}" for m in metrics) + " |")
  return out


def _figures(directory, rows, kept):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from sklearn.metrics import roc_curve

  flags = kept.pop("_flags").astype(bool)
  binui = [r for r in rows if r["table"] == "binui"]
  forget = binui[0]["forget"]  # the first unlearning type (all three figures)
  binui = [r for r in binui if r["forget"] == forget]
  colors = dict(zip(ATTACKS, plt.cm.tab20(np.arange(20))))
  outside = dict(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig, ax = plt.subplots(figsize=(5, 5))
  for a, s in kept.items():
    fpr, tpr, _ = roc_curve(~flags, 1 - s)
    ax.loglog(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=ATTACKS[a][0], color=colors[a])
  ax.plot([1e-5, 1], [1e-5, 1], "k:", lw=0.8)
  ax.set(xlabel="FPR (forgotten called retained)", ylabel="TPR (retained recognised)",
         title=f"BinUI ROC, K = 1, {forget}")
  ax.legend(**outside)
  fig.savefig(directory / "roc.png", dpi=120, bbox_inches="tight")
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for a in dict.fromkeys(r["attack"] for r in binui):
    ks = sorted({int(r["k"]) for r in binui if r["attack"] == a})
    auc = [np.mean([r["auc"] for r in binui if r["attack"] == a and int(r["k"]) == k]) for k in ks]
    ax.plot(ks, auc, marker="o", label=ATTACKS[a][0], color=colors[a])
  all_ks = sorted({int(r["k"]) for r in binui})
  ax.set(xscale="log", xlabel="K shadow models", ylabel="AUC",
         title=f"BinUI AUC against K, {forget}")
  ax.set_xticks(all_ks, [str(k) for k in all_ks])
  ax.minorticks_off()
  ax.legend(**outside)
  fig.savefig(directory / "auc_vs_k.png", dpi=120, bbox_inches="tight")
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 4))
  if "iam_on" in kept:
    bins = np.linspace(0, 1, 41)
    ax.hist(kept["iam_on"][~flags], bins, density=True, alpha=0.6, label="retained")
    ax.hist(kept["iam_on"][flags], bins, density=True, alpha=0.6, label="forgotten")
    ax.legend()
  ax.set(xlabel="IAM-On unlearning score", ylabel="density",
         title=f"IAM-On scores, K = 1, {forget}")
  fig.savefig(directory / "iam_hist.png", dpi=120, bbox_inches="tight")
  plt.close(fig)
