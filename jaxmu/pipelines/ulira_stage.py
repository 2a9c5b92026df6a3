"""U-LiRA (deepunlearn-spec 7, with Hayes et al.'s test) as resumable sub-stages over a workdir:
a stage of the DeepUnlearn pipeline (``<workdir>/ulira``, with that run's searched
hyper-parameters) and, through `jaxmu.pipelines.ulira`, a pipeline alone.

Sub-stages (``config.ulira`` holds the settings; ``stop_after`` names the last one to run):

1. ``splits``: LiRA splits of the training part (``jaxmu.data.splits.lira``, spec 7.1): per
   split s the IN half (the original's training set) and, per forget draw f, the forget set (a
   share of IN) and the retain set (the rest of IN) (``splits.npz``).
2. ``init``: one initialisation (``ulira.init_seed``) shared by every model, as spec 7.2.
3. ``train``: per split an *original* model (IN_s) and per (s, f) a *retrained* model
   (retain_{s,f}), all trained as one stack by ``train.fit`` for ``ulira.epochs``; saves the
   originals (``models/original``) and the retrained models' signals (``signals/retrain.npz``).
4. ``unlearn_<method>``: the method unlearns, per (s, f), split s's original with that draw's
   retain / forget sets and the LiRA val set, with the hyper-parameters it is given; saves the
   unlearned models' signals (``signals/<method>.npz``) and its run (``unlearned/<method>.json``).
5. ``ulira``: per method U-LiRA (``attacks.lira.ulira``): per forgotten sample the probability
   that an unlearned model forgot it rather than a retrained model never saw it, the balanced
   accuracy with its 95% interval, the ROC curve, and DeepUnlearn's population MIA of the same
   models (``ulira.csv``, ``roc/<method>.npz``, ``membership/<method>.npz``).
6. ``report``: ``report.md`` and ``roc.png`` (U-LiRA alone; inside DeepUnlearn its report shows
   the results).

Signals are per model and training-part sample: the scaled logit log p_y - log(1 - p_y) (U-LiRA's
statistic) and 0/1 correctness (the reference's statistic, spec 7.4).

Deviations from the reference (docs/deviations.md, "U-LiRA pipeline"): one original per split
shared by its forget draws (the reference trains one per (s, f) on the same IN_s data); per-model
PRNG streams (the reference reuses seed 123, so its models differ only by data); the retrained
group of the test is the retrained models that never saw the sample (the reference compares
the method's own models that never saw it, on 0/1 correctness; that score is reported as extra
``reference_*`` columns); no per-split hyper-parameter search (spec 7.2 ran 200 trials on each of
32 splits): every split uses the main search's best hyper-parameters.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path
from typing import Mapping

import jax
import ml_collections
import numpy as np
import threadpoolctl
from tqdm.auto import tqdm

from jaxmu import checkpoint, distributed, models, parallel, report, stages, train
from jaxmu import data as data_lib
from jaxmu import methods as methods_lib
from jaxmu.attacks import lira, metrics, mia, signals
from jaxmu.data import splits as splits_lib
from jaxmu.pipelines import common
from jaxmu.report import ulira as ulira_report

CSV_COLUMNS = ("method", "balanced_accuracy", "ci_low", "ci_high", "auc", "num_samples")
# The config sections a U-LiRA workdir's config.json holds (a DeepUnlearn config's other sections
# are not U-LiRA's inputs).
SECTIONS = ("dataset", "model", "data", "train", "unlearn", "unlearn_seed", "parallel",
            "checkpoint_every", "ulira")


def run(config: ml_collections.ConfigDict, wd: stages.Workdir, dataset: data_lib.Dataset,
        strategy: parallel.Strategy, hparams: Mapping[str, tuple[dict, str]],
        stop_after: str = ""):
  """Runs (or resumes) the sub-stages up to ``stop_after``; returns the last output's path.

  ``hparams``: {method: (its hyper-parameters, where they come from: "search" or "defaults")}
  for every method of ``config.ulira.methods``.
  """
  if not hparams:
    raise ValueError("config.ulira.methods is empty; name at least one method, e.g. ('finetune',)")
  wd.write_config({k: config[k] for k in SECTIONS})
  pipe = _ULiRA(config, wd, dataset, strategy, hparams)
  return stages.run_stages([pipe.splits, pipe.init, pipe.train, pipe.unlearn, pipe.ulira,
                            pipe.report], stop_after)


class _ULiRA:
  """The sub-stages; each method opens its stage(s) and returns its main output path."""

  def __init__(self, config, wd, dataset, strategy, hparams):
    self.config, self.wd, self.dataset, self.strategy = config, wd, dataset, strategy
    self.hparams = dict(hparams)
    self.data = train.DeviceData.create(dataset)
    self.recipe = common.recipe(config)
    self.model = models.get(config.model.name, dataset.num_classes,
                            **config.model.options.to_dict())
    self.input_shape = dataset.inputs.shape[1:]

  @functools.cached_property
  def parts(self):
    return splits_lib.load(self.wd.path("splits.npz"), self.dataset)

  def like(self, num: int):
    return common.abstract_variables(self.model, num, self.input_shape)

  def splits(self):
    u = self.config.ulira
    with self.wd.stage("splits", config={"lira": u.lira, "data": self.dataset.fingerprint},
                       outputs=("splits.npz",)) as st:
      if not st.done:
        parts = splits_lib.lira(self.dataset.num_train, **u.lira.to_dict())
        splits_lib.save(st.tmp / "splits.npz", parts, self.dataset)
        st.commit()
    check_coverage(self.parts)
    return self.wd.path("splits.npz")

  def init(self):
    seed = self.config.ulira.init_seed
    with self.wd.stage("init", config={"model": self.config.model, "seed": seed,
                                       "classes": self.dataset.num_classes,
                                       "shape": self.input_shape},
                       outputs=("models/init",)) as st:
      if not st.done:
        keys = jax.random.key(seed)[None]
        checkpoint.save(st.tmp / "models/init",
                        train.init_variables(self.model, keys, self.input_shape))
        st.commit()
    return self.wd.path("models/init")

  def train(self):
    """The originals (IN_s) and retrained models (retain_{s,f}) as one stack from one init.

    Model i of the stack (originals first) has PRNG stream i in any chunking; a model's numbers
    do not depend on the other models of its chunk (train.fit skips all-padding batches).
    """
    c, u = self.config, self.config.ulira
    with self.wd.stage("train", config={"train": c.train, "epochs": u.epochs, "data": c.data,
                                        "parallel": c.parallel,
                                        "chunk": u.max_models_per_program},
                       deps=("splits", "init"),
                       outputs=("models/original", "signals/retrain.npz", "times.json")) as st:
      if not st.done:
        sets = lira_index_sets(self.parts)
        num_splits, num_models = len(sets["original"]), len(sets["retain"])
        total = num_splits + num_models
        init = jax.device_get(checkpoint.restore(self.wd.path("models/init"), self.like(1)))
        # One width for every chunk (that of the whole stack): the chunks share one program.
        index_sets = train.pad_index_sets([s[s >= 0] for s in (*sets["original"],
                                                                *sets["retain"])])
        names = [f"original/{s}" for s in range(num_splits)] + [
            f"retrain/{m}" for m in range(num_models)]
        originals, retrained, seconds = [], [], 0.0
        for i, (start, stop) in enumerate(common.chunks(total, u.max_models_per_program)):
          state = common.create_state(c, _repeat(init, stop - start), self.recipe)

          def log(epoch, record, start=start, stop=stop):
            self.wd.append_metrics({"stage": "train", "epoch": epoch,
                                    "models": names[start:stop], **record})

          begin = time.perf_counter()
          result = distributed.fit(
              self.model, state, self.data, index_sets[start:stop], self.recipe, u.epochs,
              jax.random.key(c.train.data_seed), model_ids=range(start, stop),
              strategy=self.strategy,
              checkpoints=checkpoint.TrainingCheckpoints(
                  self.wd.path("checkpoints", "train", f"chunk{i}")),
              checkpoint_every=c.checkpoint_every, on_epoch=log,
              progress=f"original+retrain {start}-{stop - 1} of {total}")
          variables = jax.device_get(result.state.variables)
          seconds += time.perf_counter() - begin
          cut = min(max(num_splits - start, 0), stop - start)  # models before `cut`: originals
          if cut:
            originals.append(parallel.slice_models(variables, 0, cut))
          if cut < stop - start:
            retrained.append(model_signals(
                self.model, parallel.slice_models(variables, cut, stop - start), self.data,
                self.dataset.num_train, self.recipe, self.strategy, u.signal_batch_models))
        checkpoint.save(st.tmp / "models/original",
                        jax.tree.map(lambda *x: np.concatenate(x), *originals))
        _save_signals(st.tmp / "signals/retrain.npz",
                      {k: np.concatenate([r[k] for r in retrained]) for k in retrained[0]})
        times = {"stack_seconds": seconds, "models": total, "seconds_per_model": seconds / total,
                 "epochs": u.epochs}
        (st.tmp / "times.json").write_text(json.dumps(times, indent=1))
        st.commit()
        shutil.rmtree(self.wd.path("checkpoints", "train"), ignore_errors=True)
    return self.wd.path("models")

  def unlearn(self):
    """Each method on every (s, f) model, chunk by chunk, keeping only the models' signals
    (640 ResNet-18 per method at reference scale). Model i's PRNG stream is fold_in(key, i) in
    any chunking."""
    c, u = self.config, self.config.ulira
    sets = lira_index_sets(self.parts)
    num_models = len(sets["retain"])
    references = {}  # the originals and the initialisation, restored once when a method runs
    bar = tqdm(self.hparams.items(), desc="unlearn", leave=False)
    for method, (hparams, source) in bar:
      bar.set_postfix_str(method)
      with self.wd.stage(f"unlearn_{method}",
                         config={"hparams": hparams, "source": source, "seed": c.unlearn_seed,
                                 "parallel": c.parallel, "chunk": u.max_models_per_program},
                         deps=("train",),
                         outputs=(f"signals/{method}.npz", f"unlearned/{method}.json")) as st:
        if not st.done:
          if not references:
            references["originals"] = jax.device_get(checkpoint.restore(
                self.wd.path("models/original"), self.like(len(sets["original"]))))
            references["init"] = jax.device_get(checkpoint.restore(
                self.wd.path("models/init"), self.like(1)))
          key = common.method_key(c.unlearn_seed, method)
          parts, seconds, compile_seconds = [], 0.0, 0.0
          for start, stop in common.chunks(num_models, u.max_models_per_program):
            ctx = chunk_context(c, self.model, self.data, self.dataset.num_classes, references,
                                sets, self.parts["val"], start, stop, self.strategy)
            result = distributed.unlearn(method, ctx, hparams, key)
            seconds += result.seconds
            compile_seconds += result.compile_seconds
            parts.append(model_signals(ctx.model, jax.device_get(result.states), ctx.data,
                                       self.dataset.num_train, ctx.recipe, self.strategy,
                                       u.signal_batch_models))
          _save_signals(st.tmp / "signals" / f"{method}.npz",
                        {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
          info = {"seconds": seconds, "compile_seconds": compile_seconds, "models": num_models,
                  "hparams": hparams, "source": source}
          (st.tmp / "unlearned").mkdir(exist_ok=True)
          (st.tmp / "unlearned" / f"{method}.json").write_text(stages.to_json(info, indent=1))
          st.commit()
    return self.wd.path("signals")

  def ulira(self):
    u, methods = self.config.ulira, tuple(self.hparams)
    with self.wd.stage("ulira", config={"fix_variance": u.fix_variance, "methods": methods,
                                        "reference_variant": u.reference_variant},
                       deps=("splits", "train") + tuple(f"unlearn_{m}" for m in methods),
                       outputs=("ulira.csv", "roc", "membership")) as st:
      if not st.done:
        masks = membership_masks(self.parts)
        retrained = dict(np.load(self.wd.path("signals/retrain.npz")))
        rows = []
        for method in methods:
          row, curve, per_sample = score_method(
              dict(np.load(self.wd.path("signals", f"{method}.npz"))), retrained, masks,
              self.parts, fix_variance=u.fix_variance, reference_variant=u.reference_variant)
          info = json.loads(self.wd.path("unlearned", f"{method}.json").read_text())
          rows.append({"method": method, **row, "unlearn_seconds": info["seconds"],
                       "hparams": info["source"]})
          for name, arrays in (("roc", curve), ("membership", per_sample)):
            (st.tmp / name).mkdir(exist_ok=True)
            np.savez(st.tmp / name / f"{method}.npz", **arrays)
        report.write_csv(st.tmp / "ulira.csv", rows)
        st.commit()
    return self.wd.path("ulira.csv")

  def report(self):
    with self.wd.stage("report", deps=("ulira",), outputs=("report.md", "roc.png")) as st:
      if not st.done:
        rows, curves = report.read_ulira(self.wd.root)
        times = json.loads(self.wd.path("times.json").read_text())
        report.plot_ulira_roc(curves, st.tmp / "roc.png")
        (st.tmp / "report.md").write_text(
            ulira_report.ulira_report(self.config, list(rows.values()), times))
        st.commit()
    return self.wd.path("report.md")


def lira_index_sets(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The per-model index sets of a LiRA split (rows padded with -1).

  Models are the (s, f) pairs in split-major order. Returns ``original`` [S, L] (IN_s, the
  original's training set), ``retain`` and ``forget`` [S * F, L] and ``split`` [S * F] (the
  split of each (s, f) model, i.e. the row of its original).
  """
  num_splits, num_draws = parts["retain"].shape[:2]
  return {"original": parts["in"], "retain": parts["retain"].reshape(num_splits * num_draws, -1),
          "forget": parts["forget"].reshape(num_splits * num_draws, -1),
          "split": np.repeat(np.arange(num_splits), num_draws)}


def _mask(index_sets: np.ndarray, num: int) -> np.ndarray:
  """[M, L] padded index sets -> [M, num] bool membership."""
  out = np.zeros((len(index_sets), num), bool)
  rows, cols = np.nonzero(index_sets >= 0)
  out[rows, index_sets[rows, cols]] = True
  return out


def membership_masks(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[S * F, num_train] bool masks over the training part, one row per (s, f) model.

  ``forgot``: the sample is in the model's forget set (its unlearned model forgot it);
  ``never``: the retrained model of (s, f) never trained on it (not in retain_{s,f});
  ``out``: the sample is in OUT_s, never in split s's training set (the reference's "never", spec
  7.4; val samples are in neither IN nor OUT).
  """
  sets = lira_index_sets(parts)
  num_train = parts["keep"].shape[1]
  dev = np.ones(num_train, bool)
  dev[parts["val"]] = False
  return {"forgot": _mask(sets["forget"], num_train),
          "never": ~_mask(sets["retain"], num_train),
          "out": ~parts["keep"][sets["split"]] & dev}


def _repeat(tree, num: int):
  return jax.tree.map(lambda x: np.repeat(np.asarray(x), num, axis=0), tree)


def check_coverage(parts: dict[str, np.ndarray]) -> None:
  """Fails before any training when no sample could be scored (U-LiRA needs >= 2 models that
  forgot a sample and >= 2 retrained models that never saw it)."""
  masks = membership_masks(parts)
  scored = int(((masks["forgot"].sum(0) >= 2) & (masks["never"].sum(0) >= 2)).sum())
  if not scored:
    raise ValueError(
        f"no training sample is forgotten by at least 2 of the {len(masks['forgot'])} (split, "
        "draw) models, so U-LiRA cannot score any: raise ulira.lira.num_splits, "
        "ulira.lira.num_forget_draws or ulira.lira.forget_ratio (each sample is forgotten by "
        "about "
        "num_splits x num_forget_draws x forget_ratio / 2 models)")


def model_signals(model, variables, data: train.DeviceData, num_train: int, recipe: train.Recipe,
                  strategy: parallel.Strategy | str = "auto",
                  batch_models: int = 64) -> dict[str, np.ndarray]:
  """Per model, on the training part [0, num_train): the scaled logit (float32) and correctness.

  Predicts ``batch_models`` models at a time (eval-mode BatchNorm, no augmentation; each batch
  split over the jax.distributed processes, `distributed.predict`), so host memory holds at most
  batch_models x num_train x classes logits.
  """
  indices = np.arange(num_train)
  labels = np.asarray(data.labels)[:num_train]
  num = parallel.num_models(variables["params"])
  phi, correct = [], []
  for start in range(0, num, batch_models):
    part = parallel.slice_models(variables, start, min(start + batch_models, num))
    logits = distributed.predict(model, part, data, indices, recipe, strategy)
    phi.append(np.asarray(signals.scaled_logit(logits, labels), np.float32))
    correct.append(logits.argmax(-1) == labels)
  return {"scaled_logit": np.concatenate(phi), "correct": np.concatenate(correct)}


def _save_signals(path: Path, arrays: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)


def chunk_context(config, model, data: train.DeviceData, num_classes: int, references: dict,
                  sets: dict[str, np.ndarray], val: np.ndarray, start: int, stop: int,
                  strategy: parallel.Strategy) -> methods_lib.Context:
  """The unlearning context of (s, f) models ``start .. stop - 1``: split s's original, the
  shared initialisation, that draw's retain and forget sets, the LiRA val set."""
  split = sets["split"][start:stop]
  return common.context(
      config, model, data, jax.tree.map(lambda x: x[split], references["originals"]),
      _repeat(references["init"], stop - start), sets["retain"][start:stop],
      sets["forget"][start:stop], val, range(start, stop), num_classes, strategy,
      config.ulira.epochs)


def score_method(unlearned: dict[str, np.ndarray], retrained: dict[str, np.ndarray],
                 masks: dict[str, np.ndarray], parts: dict[str, np.ndarray],
                 fix_variance: bool = False, reference_variant: bool = True):
  """U-LiRA and population MIA of one method's models (deepunlearn-spec 6.2, 7.4; Hayes et al.).

  ``unlearned`` / ``retrained``: signals [M, num_train] of the (s, f) models (`model_signals`);
  ``masks``: `membership_masks`. U-LiRA (``attacks.lira.ulira`` on scaled logits, Gaussians
  fitted leave-one-model-out): per sample, the unlearned models that forgot it against the
  retrained models that never saw it. The ROC pools every scored observation: label 1 for an
  unlearned model's, 0 for a retrained model's, score its P(unlearned). Population MIA: per
  model, forget vs LiRA-val cross-entropy (softplus(-scaled logit) = -log p_y), mean and std
  over models. With ``reference_variant``: the reference's score (spec 7.4: 0/1 correctness,
  forgotten vs OUT models of the same method, no leave-one-out), mean P(member) and accuracy.

  Returns (row: metrics, curve: {"fpr", "tpr"}, per_sample: {"samples", "member_prob",
  "accuracy"}).
  """
  res = lira.ulira(unlearned["scaled_logit"], masks["forgot"], retrained["scaled_logit"],
                   masks["never"], fix_variance=fix_variance)
  s = res.samples
  forgot, never = masks["forgot"][:, s], masks["never"][:, s]
  scores = np.concatenate([np.asarray(res.prob_unlearned)[:, s][forgot],
                           np.asarray(res.prob_retrained)[:, s][never]])
  labels = np.r_[np.ones(forgot.sum()), np.zeros(never.sum())]
  roc = metrics.roc_metrics(labels, scores, num_bootstrap=0)
  ce = np.logaddexp(0.0, -unlearned["scaled_logit"].astype(np.float64))
  forget_sets = lira_index_sets(parts)["forget"]
  with threadpoolctl.threadpool_limits(1, user_api="blas"):  # 5x faster on 1-feature fits
    mias = np.array([mia.population_mia(ce[m, f[f >= 0]], ce[m, parts["val"]])
                     for m, f in enumerate(forget_sets)])
  row = {"balanced_accuracy": res.balanced_accuracy, "ci_low": res.ci95[0],
         "ci_high": res.ci95[1], "auc": roc["auc"], "num_samples": len(s),
         "mean_member_prob": float(res.member_prob.mean()),
         "population_mia": float(mias.mean()), "population_mia_std": float(mias.std()),
         "models": len(forget_sets)}
  if reference_variant:
    correct = unlearned["correct"].astype(np.float32)
    ref = lira.ulira(correct, masks["forgot"], correct, masks["out"], reference=True)
    row["reference_member_prob"] = float(ref.member_prob.mean())
    row["reference_balanced_accuracy"] = ref.balanced_accuracy
  curve = {"fpr": roc["curve"]["fpr"], "tpr": roc["curve"]["tpr"]}
  return row, curve, {"samples": s, "member_prob": res.member_prob, "accuracy": res.accuracy}
