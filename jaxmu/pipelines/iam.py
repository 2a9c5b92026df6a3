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
5. ``signals``: eval-mode logits of every model on the query set (the target pool) and each
   run's population set, and of the shadows and shadow origin on the shadow pool (IAM-Off's
   constant, UnLeak); augmented query views with ``config.signals.augmented_queries``.
6. ``binui``: every attack of ``config.audit.attacks`` through `jaxmu.attacks.audit`, per run,
   for K in the sweep and each of min(K_max // K, max_groups) disjoint shadow groups; scores
   pooled over the runs of each unlearning type, one `iam.bin_ui` per (type, group) (iam-spec
   7.1: mean and std over groups).
7. ``scoring``: Table 5, IAM's scoring function against other distributions and shadow-free
   scores (`audit.scoring_functions`, iam-spec 10.4), per type and K = 1 group
   (``config.audit.scoring_ablation``).
8. ``sensitivity``: IAM-On/Off AUC of the retrained targets for every (eps1, eps2) and A of
   ``config.sensitivity`` from the saved signals (iam-spec 10.5; `iam_tables.sensitivity`).
9. ``score_ui``: the first ``score_ui.start_models`` shadows keep training on the target pool
   for E epochs; their best-so-far states after b * (E // B) epochs give degrees b / B (all E
   epochs run, as the reference); every attack's Spearman/Pearson/MSE/KL against them, per K = 1
   shadow group (iam-spec 7.5, 9.2).
10. ``approx_<method>`` and ``approx``: IAM's approximate methods on the original of every run
   (``approx.faithful``: the reference as coded), scored with ``approx.attack`` (K = 1 groups):
   AUC, mean membership on forgotten / retained samples and the KS statistic against the
   retrained models' (over- and under-unlearning, iam-spec 7.6, 9.4; Table 8), and the
   class-level read-out per run and overall (iam-spec 9.3, ``approx_class.csv``).
11. ``report``: ``report.md`` (Table 1 as attacks x unlearning types, each type's operating points
    and K sweep, Tables 5, 2 and 8, the sensitivity table) and figures.

The setting (exact / arch / shifted / incremental) and ``config.reuse`` (another finished run's
shadows or targets, taken instead of trained: Fig. 4's matrix, `jaxmu.pipelines.iam_matrix`) are
resolved once into an `iam_setting.Setting`: where shadows, targets and shadow data come from.

Every table row also lands in ``results.csv`` (columns ``table`` and ``forget``).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxmu import checkpoint, distributed, models, parallel, report, stages, train, validate
from jaxmu.attacks import iam
from jaxmu.data import augment as augment_lib
from jaxmu.data import splits as splits_lib
from jaxmu.pipelines import common, iam_tables
from jaxmu.pipelines.iam_audit import (SignalAudit, bin_ui, mean_metrics, metric_row,
                                       score_ui_or_nan)
from jaxmu.pipelines.iam_setting import (Setting, forget_types, k_sweep, num_originals, runs,
                                         runs_of, score_ui_attacks, score_ui_schedule,
                                         shadow_groups)
from jaxmu.report import iam as iam_report

STAGES = ("splits", "shadows", "ref_in", "targets", "signals", "binui", "scoring", "sensitivity",
          "score_ui", "approx", "report")
FIGURES = ("roc", "auc_vs_k", "iam_hist")  # report figures, each as PNG and PDF
# PRNG namespaces of the model groups (model id = base + index): initialisation and data order.
_IDS = {"shadows": 100_000, "shadow_origin": 200_000, "ref_in": 300_000, "original": 400_000,
        "retrain": 500_000, "score_ui": 600_000}
SIGNAL_FILES = ("query_shadows", "query_original", "query_retrain", "pop_retrain", "pop_shadows",
                "pop_ref_in", "pool_shadows", "pool_origin")


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Runs (or resumes) every stage up to ``config.stop_after``; returns the last output's path.
  A config that `jaxmu.validate` finds wrong raises its `ConfigError` before anything runs."""
  validate.check("iam", config)
  iam_tables.check_approx(config)
  wd = stages.Workdir(workdir)
  wd.write_config(config)
  pipe = _Pipeline(config, wd, common.load_dataset(config.dataset))
  return stages.run_stages([getattr(pipe, name) for name in STAGES], config.stop_after)


class _Pipeline:
  """The stages; each method opens its stage(s) and returns its main output path (or None for
  a stage the config leaves out)."""

  def __init__(self, config, wd, dataset):
    self.config, self.wd, self.dataset = config, wd, dataset
    self.runs = runs(config)
    self.recipe = common.recipe(config)
    self.data = train.DeviceData.create(dataset)
    self.strategy = common.strategy(config)
    self.input_shape = dataset.inputs.shape[1:]
    self.model = models.get(config.model.name, dataset.num_classes,
                            **config.model.options.to_dict())
    self.setting = Setting.create(config, dataset, self.data, self.recipe, self.model)
    self.shadow_model = self.setting.shadow_model
    self.num_originals = num_originals(config)
    self._target_inits, self._audit = None, None

  @functools.cached_property
  def parts(self):
    return splits_lib.load(self.wd.path("splits.npz"), self.dataset)

  def flags(self, r):
    return self.parts[f"flags_{r}"]


  def splits(self):
    c, setting = self.config, self.setting
    with self.wd.stage("splits", config={"split": c.split, "runs": self.runs,
                                         "shadows": c.num_shadows, "data": self.dataset.fingerprint,
                                         "setting": setting.splits_inputs(c)},
                       outputs=("splits.npz",)) as st:
      if not st.done:
        out = {}
        for r, run in enumerate(self.runs):
          s = splits_lib.iam(
              self.dataset.num_train, self.dataset.num_test,
              setting.target_shadow_size(c, self.dataset),
              seed=run.seed, forget=run.forget, forget_size=c.split.forget_size,
              fixed_forget=c.split.fixed_forget, labels=self.dataset.labels, forget_class=run.cls,
              class_ratio=c.split.class_ratio, num_shadows=c.num_shadows if r == 0 else 0,
              shadow_fix=c.split.shadow_fix, shadow_train_frac=c.split.shadow_train_frac,
              holdout_ratio=c.split.holdout_ratio, val_cap=c.split.val_cap,
              split_seed=c.split.split_seed)
          if r == 0:
            out.update({k: s[k] for k in ("pool", "shadow_pool", "shadow_train", "shadow_test")})
          out.update({f"flags_{r}": s["flags"], f"val_{r}": s["val"], f"test_{r}": s["test"]})
        out.update(setting.shadow_splits(c))  # the shadows' own pool and splits, if any
        if len({len(out[f"val_{r}"]) for r in range(len(self.runs))}) != 1:
          raise ValueError("population (val) sets of the runs differ in size; lower split.val_cap")
        splits_lib.save(st.tmp / "splits.npz", out, self.dataset)
        st.commit()
    return self.wd.path("splits.npz")

  def initial(self, model, ids):
    """Fresh initialisations of models ``ids`` (each from ``key(id)``). The target architecture's
    models (ref_in, originals, retrained) are initialised together, in one compiled program."""
    if model is not self.model or min(ids) < _IDS["ref_in"]:  # the shadows: their own stack
      return _init_variables(model, ids, self.input_shape)
    if self._target_inits is None:
      universe = ([_IDS["ref_in"]] + [_IDS["original"] + i for i in range(self.num_originals)]
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
    recipe = dataclasses.replace(self.setting.shadow_recipe if shadow_data else self.recipe,
                                 batch_size=batch_size)
    state = common.create_state(c, variables, recipe)

    def log(epoch, record):
      self.wd.append_metrics({"stage": name, "epoch": epoch, **record})

    result = distributed.fit(
        model, state, self.setting.shadow_data if shadow_data else self.data, index_sets, recipe,
        epochs, jax.random.key(c.train.data_seed), model_ids=ids, strategy=self.strategy,
        val_sets=val_sets if c.train.select_best else None,
        max_models_per_program=c.parallel.max_models_per_program or None,
        checkpoints=checkpoint.TrainingCheckpoints(self.wd.path("checkpoints", name)),
        checkpoint_every=c.checkpoint_every, on_epoch=log, progress=name)
    return jax.device_get(result.best if c.train.select_best else result.state.variables)

  def _train_config(self, **extra):
    c = self.config
    return {"train": c.train, "data": c.data, "parallel": c.parallel, "model": c.model, **extra}

  def _taken(self, st, source, groups):
    """Publishes ``groups`` of a finished run's models as they are and commits ``st``."""
    for group in groups:
      shutil.copytree(source.path("models", group), st.tmp / "models" / group)
    st.commit()

  def shadows(self):
    """K shadow OUT models (each selected on its held-out part) + the shadow origin (iam-spec 6.3)."""
    c, p, source = self.config, self.parts, self.setting.shadows_from
    k = c.num_shadows
    config = ({"source": str(source.root), "source_shadows": source.stage_hash("shadows"), "k": k}
              if source else self._train_config(shadow_model=c.shadow_model, setting=c.setting,
                                                shadow_dataset=c.shadow_dataset))
    with self.wd.stage("shadows", config=config, deps=("splits",),
                       outputs=("models/shadows", "models/shadow_origin")) as st:
      if not st.done and source is not None:  # another run's shadows, as they are
        self.setting.check_reuse("shadows", c, self.dataset, p)
        like = common.abstract_variables(self.shadow_model, source.config.num_shadows,
                                         self.input_shape)
        shadows = checkpoint.restore(source.path("models/shadows"), like)
        checkpoint.save(st.tmp / "models/shadows", parallel.slice_models(shadows, 0, k))
        self._taken(st, source, ("shadow_origin",))
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
    c, p, source = self.config, self.parts, self.setting.targets_from
    config = ({"source": str(source.root), "source_ref_in": source.stage_hash("ref_in")}
              if source else self._train_config(ref_in=c.ref_in))
    with self.wd.stage("ref_in", config=config, deps=("splits",), outputs=("models/ref_in",)) as st:
      if not st.done and source is not None:
        self.setting.check_reuse("targets", c, self.dataset, p)
        self._taken(st, source, ("ref_in",))
      if not st.done:
        best = self._train("ref_in", self.model, [_IDS["ref_in"]], [p["val_0"]],
                           p["test_0"] if self.setting.shifted else p["shadow_pool"],
                           c.ref_in.epochs, c.ref_in.batch_size)
        self._publish(st, "ref_in", {"ref_in": best})
    return self.wd.path("models/ref_in")

  def targets(self):
    """Original(s) on the whole pool and one retrained model per run on its retain set; with
    incremental, the base run's models keep training (iam-spec 7.4)."""
    c, p = self.config, self.parts
    source, base = self.setting.targets_from, self.setting.base
    config = self._train_config(target_epochs=c.train.target_epochs,
                                original_per_seed=c.original_per_seed,
                                base=(str(base.root), base.stage_hash("targets")) if base else None)
    if source is not None:
      config = {"source": str(source.root), "source_targets": source.stage_hash("targets")}
    with self.wd.stage("targets", config=config, deps=("splits",),
                       outputs=("models/original", "models/retrain")) as st:
      if not st.done and source is not None:  # another run's models, as they are
        self.setting.check_reuse("targets", c, self.dataset, p)
        self._taken(st, source, ("original", "retrain"))
      if not st.done:
        o, r = self.num_originals, len(self.runs)
        index_sets = [p["pool"]] * o + [p["pool"][~self.flags(i)] for i in range(r)]
        val_sets = [p[f"val_{i}"] for i in range(o)] + [p[f"val_{i}"] for i in range(r)]
        ids = [_IDS["original"] + i for i in range(o)] + [_IDS["retrain"] + i for i in range(r)]
        best = self._train("targets", self.model, ids, index_sets, val_sets,
                           c.train.target_epochs, c.train.batch_size,
                           start=base and self.setting.base_targets(self.model, self.runs, o))
        self._publish(st, "targets", {"original": parallel.slice_models(best, 0, o),
                                      "retrain": parallel.slice_models(best, o, o + r)})
    return self.wd.path("models/retrain")

  def _publish(self, st, name, groups):
    """Saves each group's stacked variables under models/, commits the stage and drops the
    training checkpoints of ``name``."""
    for group, variables in groups.items():
      checkpoint.save(st.tmp / "models" / group, variables)
    st.commit()
    shutil.rmtree(self.wd.path("checkpoints", name), ignore_errors=True)

  def restore(self, group, n, model=None):
    like = common.abstract_variables(model or self.model, n, self.input_shape)
    return checkpoint.restore(self.wd.path("models", group), like)


  def query_data(self, shadow_data=False):
    """The data training-set queries read: clean, or one augmented view (iam-spec 12.1)."""
    c, setting = self.config, self.setting
    data, recipe = ((setting.shadow_data, setting.shadow_recipe) if shadow_data
                    else (self.data, self.recipe))
    if not c.signals.augmented_queries:
      return data
    view = augment_lib.augment(jax.random.key(c.signals.view_seed), data.inputs, recipe.augment)
    return train.DeviceData(view, data.labels)

  def logits(self, model, variables, indices, data=None, recipe=None, alone=False):
    """[M, len(indices), C] eval-mode logits, the stack split over the processes
    (`distributed.predict`; every process calls it together) or, ``alone``, on this process
    (`train.predict`); the target's data and recipe unless given (shifted shadows read target
    queries with the target's normalisation, as the reference, iam-spec 12.23)."""
    predict = train.predict if alone else distributed.predict
    return predict(model, variables, data or self.data, indices, recipe or self.recipe,
                   self.strategy).astype(np.float32)

  def signals(self):
    c, p = self.config, self.parts
    outputs = tuple(f"signals/{n}.npy" for n in SIGNAL_FILES)
    with self.wd.stage("signals", config={"signals": c.signals},
                       deps=("shadows", "ref_in", "targets"), outputs=outputs) as st:
      if not st.done:
        k, r, o = c.num_shadows, len(self.runs), self.num_originals
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
            "pop_retrain": np.stack([self.logits(self.model,
                                                 parallel.slice_models(retrained, i, i + 1),
                                                 vals[i])[0]
                                     for i in range(r)]),
            "pop_shadows": np.stack([self.logits(self.shadow_model, shadows, v) for v in vals]),
            "pop_ref_in": np.stack([self.logits(self.model, ref_in, v)[0] for v in vals]),
            "pool_shadows": self.logits(self.shadow_model, shadows, p["shadow_pool"],
                                        shadow_queries, self.setting.shadow_recipe),
            "pool_origin": self.logits(self.shadow_model, origin, p["shadow_pool"],
                                       shadow_queries, self.setting.shadow_recipe)[0],
        }
        for name, array in out.items():
          (st.tmp / "signals").mkdir(exist_ok=True)
          np.save(st.tmp / "signals" / f"{name}.npy", array)
        st.commit()
    return self.wd.path("signals")

  def audit(self) -> SignalAudit:
    """The attacks on the signals stage's outputs, read once per pipeline."""
    if self._audit is None:
      signals = {n: np.load(self.wd.path("signals", f"{n}.npy")) for n in SIGNAL_FILES}
      self._audit = SignalAudit(self.config, self.runs, self.parts, self.dataset.labels,
                                self.setting.shadow_dataset.labels, signals)
    return self._audit


  def binui(self):
    c = self.config
    with self.wd.stage("binui", config={"audit": c.audit, "k": k_sweep(c)}, deps=("signals",),
                       outputs=("binui.csv", "binui_scores.npz")) as st:
      if not st.done:
        rows, kept = [], {}  # the figures' scores: the first type, smallest K, every group
        first, k_min = forget_types(c)[0], min(k_sweep(c))
        todo = [(forget, k, g) for forget in forget_types(c) for k in k_sweep(c)
                for g in shadow_groups(c.num_shadows, k, c.audit.max_groups)]
        for forget, k, group in tqdm(todo, desc="binui", leave=False):
          run_ids = runs_of(self.runs, forget)
          scores = self.audit().scores(group, run_ids, c.audit.attacks)
          flags = self.audit().flags(run_ids)
          for attack, s in scores.items():
            rows.append({"forget": forget, **metric_row("binui", attack, k, group[0] // k,
                                                        bin_ui(s, flags))})
          if forget == first and k == k_min:
            for attack, s in scores.items():
              kept.setdefault(attack, []).append(s)
            kept["_flags"] = flags
        report.write_csv(st.tmp / "binui.csv", rows)
        np.savez(st.tmp / "binui_scores.npz", **{a: np.asarray(s) for a, s in kept.items()})
        st.commit()
    return self.wd.path("binui.csv")

  def scoring(self):
    """Table 5 (iam-spec 10.4): IAM's scoring function ablated (`audit.scoring_functions`) on the
    retrained targets, per unlearning type and K = 1 shadow group, pooled over the type's runs."""
    c = self.config
    if not c.audit.scoring_ablation:
      return None
    with self.wd.stage("scoring", config={"audit": c.audit}, deps=("signals",),
                       outputs=("scoring.csv",)) as st:
      if not st.done:
        rows = []
        for forget in forget_types(c):
          run_ids = runs_of(self.runs, forget)
          flags = self.audit().flags(run_ids)
          for g, group in enumerate(shadow_groups(c.num_shadows, 1, c.audit.max_groups)):
            for key, v in self.audit().scoring_functions(group, run_ids).items():
              rows.append({"forget": forget, **metric_row("scoring", key, 1, g, bin_ui(v, flags))})
        report.write_csv(st.tmp / "scoring.csv", rows)
        st.commit()
    return self.wd.path("scoring.csv")


  def score_ui(self):
    """ScoreUI (iam-spec 7.5, 9.2): shadows 0..L-1 keep training on the pool for E epochs; their
    best-so-far states at the B breaks (`score_ui_schedule`: after b * (E // B) epochs), with
    ground-truth membership degree b / B, are audited by every attack of ``score_ui.attacks``
    with each K = 1 shadow group. Per group: Spearman, Pearson, MSE (all and per break) and
    histogram KL of each attack, averaged over the L start models. Under jax.distributed process 0
    alone runs it (its breaks are read back from its training checkpoints)."""
    c, p = self.config, self.parts
    loops, breaks, epochs = c.score_ui.start_models, c.score_ui.breaks, c.score_ui.epochs
    if not loops:
      return None
    attacks = score_ui_attacks(c)
    with self.wd.stage("score_ui", config={"score_ui": c.score_ui, "audit": c.audit,
                                           **self._train_config()},
                       deps=("signals",), outputs=("score_ui.csv",), single=True) as st:
      if not st.done:
        start = jax.tree.map(lambda x: x[:loops], self.restore("shadows", c.num_shadows,
                                                               self.shadow_model))
        state = common.create_state(c, start, self.recipe)
        schedule = score_ui_schedule(c)
        every = schedule[0]
        # fit saves every `every` epochs and after the last: keep them all until the breaks are read
        ckpts = checkpoint.TrainingCheckpoints(self.wd.path("checkpoints", "score_ui"),
                                               keep=epochs // every + 1)
        train.fit(self.shadow_model, state, self.data, [p["pool"]] * loops, self.recipe, epochs,
                  jax.random.key(c.train.data_seed),
                  model_ids=[_IDS["score_ui"] + g for g in range(loops)],
                  strategy=self.strategy, val_sets=p["val_0"], checkpoints=ckpts,
                  checkpoint_every=every, progress="score_ui")
        like = {"state": state, "best": state.variables, "best_acc": np.zeros(loops)}
        # Break 0: the shadow itself (degree 0); break b: best-so-far after b * every epochs.
        states = [start] + [ckpts.restore(e, like)["best"] for e in schedule]
        view = self.query_data()
        queries = [self.logits(self.shadow_model, v, p["pool"], view, alone=True) for v in states]
        pops = [self.logits(self.shadow_model, v, p["val_0"], alone=True) for v in states]
        degree = np.arange(breaks + 1) / breaks
        rows = []
        groups = shadow_groups(c.num_shadows, 1, c.audit.max_groups)
        for g, group in enumerate(tqdm(groups, desc="score_ui", leave=False)):
          per_loop = {a: [] for a in attacks}
          for loop in range(loops):
            scores = [self.audit().scores(group, [0], attacks,
                                          targets={0: q[loop], ("pop", 0): z[loop]})
                      for q, z in zip(queries, pops)]
            for a in attacks:
              per_loop[a].append(score_ui_or_nan(np.stack([s[a] for s in scores], 1), degree))
          for a in attacks:
            rows.append({"table": "score_ui", "attack": a, "k": 1, "group": g,
                         **mean_metrics(per_loop[a])})
        report.write_csv(st.tmp / "score_ui.csv", rows)
        st.commit()
        shutil.rmtree(self.wd.path("checkpoints", "score_ui"), ignore_errors=True)
    return self.wd.path("score_ui.csv")


  def sensitivity(self):
    return iam_tables.sensitivity(self)

  def approx(self):
    return iam_tables.approx(self, _IDS["original"])

  def report(self):
    c = self.config
    parts = [n for n in ("binui.csv", "scoring.csv", "sensitivity.csv", "score_ui.csv",
                         "approx.csv", "approx_class.csv") if self.wd.path(n).exists()]
    deps = ("binui",) + (("scoring",) if c.audit.scoring_ablation else ()) + (
        ("sensitivity",) if iam_tables.sensitivity_grid(c)[0] else ()) + (
        ("score_ui",) if c.score_ui.start_models else ()) + (
        ("approx",) if c.approx.methods else ())
    readout = {k: c.approx.get(k) for k in ("margin", "auc_margin", "ks_threshold")}
    with self.wd.stage("report", config={**readout, "parts": parts}, deps=deps,
                       outputs=("report.md", "results.csv", *(f"{f}.{x}" for f in FIGURES
                                                              for x in ("png", "pdf")))) as st:
      if not st.done:
        rows = [row for n in parts for row in report.read_csv(self.wd.path(n))]
        report.write_csv(st.tmp / "results.csv", rows)
        kept = dict(np.load(self.wd.path("binui_scores.npz")))
        counts = {t: len(runs_of(self.runs, t)) for t in forget_types(c)}
        (st.tmp / "report.md").write_text(iam_report.render_report(c, rows, counts))
        iam_report.write_figures(st.tmp, rows, kept)
        st.commit()
    return self.wd.path("report.md")


def _init_variables(model, ids, input_shape):
  return train.init_variables(model, jax.vmap(jax.random.key)(np.asarray(ids, np.uint32)),
                              input_shape)
