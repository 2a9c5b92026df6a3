"""U-LiRA over a workdir, as resumable stages (deepunlearn-spec 7, with Hayes et al.'s test).

Stages (``config.stop_after`` names the last one to run):

1. ``splits``: LiRA splits of the training part (``jaxmu.data.splits.lira``, spec 7.1): per
   split s the IN half (the original's training set) and, per forget draw f, the forget set (a
   share of IN) and the retain set (the rest of IN) (``splits.npz``).
2. ``init``: one initialisation (``config.init_seed``) shared by every model, as spec 7.2.
3. ``train``: per split an *original* model (IN_s) and per (s, f) a *retrained* model
   (retain_{s,f}), all trained as one stack by ``train.fit``; saves the originals
   (``models/original``) and the retrained models' signals (``signals/retrain.npz``).
4. ``unlearn_<method>``: the method unlearns, per (s, f), split s's original with that draw's
   retain / forget sets and the LiRA val set, with its best hyper-parameters from the main
   search (``config.search_dir``) or ``config.unlearn.<method>``; saves the unlearned models'
   signals (``signals/<method>.npz``) and its run (``unlearned/<method>.json``).
5. ``ulira``: per method U-LiRA (``attacks.lira.ulira``): per forgotten sample the probability
   that an unlearned model forgot it rather than a retrained model never saw it, the balanced
   accuracy with its 95% interval, the ROC curve, and DeepUnlearn's population MIA of the same
   models (``ulira.csv``, ``roc/<method>.npz``, ``membership/<method>.npz``).
6. ``report``: ``report.md`` and ``roc.png``.

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

import json
import shutil
import time
import zlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
import threadpoolctl
from tqdm.auto import tqdm

from jaxmu import checkpoint, models, parallel, report, search, stages, train
from jaxmu import methods as methods_lib
from jaxmu.attacks import lira, metrics, mia, signals
from jaxmu.data import splits as splits_lib
from jaxmu.pipelines.deepunlearn import abstract_variables, load_dataset, recipe_from_config

STAGES = ("splits", "init", "train", "unlearn", "ulira", "report")
CSV_COLUMNS = ("method", "balanced_accuracy", "ci_low", "ci_high", "auc", "num_samples")


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


def best_hparams(config: ml_collections.ConfigDict, method: str) -> tuple[dict, str]:
  """A method's hyper-parameters and where they come from ("search" or "defaults").

  With ``config.search_dir`` set, the best trial of the main search (``jaxmu.search.load_best``)
  overrides ``config.unlearn.<method>``; a method without a search result keeps its defaults,
  and the report says so.
  """
  hparams = config.unlearn[method].to_dict() if method in config.unlearn else {}
  if not config.search_dir:
    return hparams, "defaults"
  directory = Path(config.search_dir)
  if not directory.is_dir():
    raise FileNotFoundError(f"search_dir {directory} does not exist: give the main run's "
                            "<workdir>/search, or --config.search_dir='' for the defaults")
  best = search.load_best(directory, method)
  if best is None:
    return hparams, "defaults"
  return {**hparams, **best.best_params}, "search"


def _repeat(tree, num: int):
  return jax.tree.map(lambda x: np.repeat(np.asarray(x), num, axis=0), tree)


def _check_workdir(workdir: Path) -> None:
  """Refuses another pipeline's workdir, whose splits and models the stages here would replace."""
  path = workdir / "config.json"
  if path.exists() and "lira" not in json.loads(path.read_text()):
    raise ValueError(f"{workdir} holds another pipeline's run ({path} has no 'lira' section); "
                     f"give U-LiRA its own directory, e.g. --workdir={workdir / 'ulira'}")


def _check_coverage(parts: dict[str, np.ndarray]) -> None:
  """Fails before any training when no sample could be scored (U-LiRA needs >= 2 models that
  forgot a sample and >= 2 retrained models that never saw it)."""
  masks = membership_masks(parts)
  scored = int(((masks["forgot"].sum(0) >= 2) & (masks["never"].sum(0) >= 2)).sum())
  if not scored:
    raise ValueError(
        f"no training sample is forgotten by at least 2 of the {len(masks['forgot'])} (split, "
        "draw) models, so U-LiRA cannot score any: raise lira.num_splits, "
        "lira.num_forget_draws or lira.forget_ratio (each sample is forgotten by about "
        "num_splits x num_forget_draws x forget_ratio / 2 models)")


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Runs (or resumes) every stage up to ``config.stop_after``; returns the last output's path."""
  if config.stop_after and config.stop_after not in STAGES:
    raise ValueError(f"stop_after={config.stop_after!r} is not a stage; stages: {STAGES}")
  methods = tuple(methods_lib.get(m).name for m in config.methods)
  if not methods:
    raise ValueError("config.methods is empty; name at least one method, e.g. ('finetune',)")
  _check_workdir(Path(workdir))
  wd = stages.Workdir(workdir)
  wd.write_config(config)
  dataset = load_dataset(config)

  with wd.stage("splits", config={"lira": config.lira, "data": dataset.fingerprint},
                outputs=("splits.npz",)) as st:
    if not st.done:
      parts = splits_lib.lira(dataset.num_train, **config.lira.to_dict())
      splits_lib.save(st.tmp / "splits.npz", parts, dataset)
      st.commit()
  parts = splits_lib.load(wd.path("splits.npz"), dataset)
  _check_coverage(parts)
  if config.stop_after == "splits":
    return wd.path("splits.npz")

  model = models.get(config.model.name, dataset.num_classes, **config.model.options.to_dict())
  input_shape = dataset.inputs.shape[1:]
  with wd.stage("init", config={"model": config.model, "seed": config.init_seed,
                                "classes": dataset.num_classes, "shape": input_shape},
                outputs=("models/init",)) as st:
    if not st.done:
      keys = jax.random.key(config.init_seed)[None]
      checkpoint.save(st.tmp / "models/init", train.init_variables(model, keys, input_shape))
      st.commit()
  if config.stop_after == "init":
    return wd.path("models/init")

  sets = lira_index_sets(parts)
  num_splits, num_models = len(sets["original"]), len(sets["retain"])
  data = train.DeviceData.create(dataset)
  recipe = recipe_from_config(config)
  train_config = {"train": config.train, "data": config.data, "parallel": config.parallel}
  with wd.stage("train", config=train_config, deps=("splits", "init"),
                outputs=("models/original", "signals/retrain.npz", "times.json")) as st:
    if not st.done:
      _train(config, wd, st, model, data, recipe, sets, dataset.num_train,
             abstract_variables(model, 1, input_shape))
      st.commit()
      shutil.rmtree(wd.path("checkpoints", "train"), ignore_errors=True)
  if config.stop_after == "train":
    return wd.path("models")

  references = {}  # the originals and the initialisation, restored once when a method runs

  def context(start: int, stop: int) -> methods_lib.Context:
    if not references:
      references["originals"] = jax.device_get(checkpoint.restore(
          wd.path("models/original"), abstract_variables(model, num_splits, input_shape)))
      references["init"] = jax.device_get(checkpoint.restore(
          wd.path("models/init"), abstract_variables(model, 1, input_shape)))
    return chunk_context(config, model, recipe, data, dataset.num_classes, references, sets,
                         parts["val"], start, stop)

  bar = tqdm(methods, desc="unlearn", leave=False)
  for method in bar:
    bar.set_postfix_str(method)
    hparams, source = best_hparams(config, method)
    with wd.stage(f"unlearn_{method}",
                  config={"hparams": hparams, "source": source, "seed": config.unlearn_seed,
                          "parallel": config.parallel},
                  deps=("train",),
                  outputs=(f"signals/{method}.npz", f"unlearned/{method}.json")) as st:
      if not st.done:
        _unlearn(config, st, method, hparams, source, context, num_models, dataset.num_train)
        st.commit()
  if config.stop_after == "unlearn":
    return wd.path("signals")

  with wd.stage("ulira", config={"fix_variance": config.fix_variance, "methods": methods,
                                 "reference_variant": config.reference_variant},
                deps=("splits", "train") + tuple(f"unlearn_{m}" for m in methods),
                outputs=("ulira.csv", "roc", "membership")) as st:
    if not st.done:
      masks = membership_masks(parts)
      retrained = dict(np.load(wd.path("signals/retrain.npz")))
      rows = []
      for method in methods:
        row, curve, per_sample = score_method(
            dict(np.load(wd.path("signals", f"{method}.npz"))), retrained, masks, parts,
            fix_variance=config.fix_variance, reference_variant=config.reference_variant)
        info = json.loads(wd.path("unlearned", f"{method}.json").read_text())
        rows.append({"method": method, **row, "unlearn_seconds": info["seconds"],
                     "hparams": info["source"]})
        (st.tmp / "roc").mkdir(exist_ok=True)
        np.savez(st.tmp / "roc" / f"{method}.npz", **curve)
        (st.tmp / "membership").mkdir(exist_ok=True)
        np.savez(st.tmp / "membership" / f"{method}.npz", **per_sample)
      report.write_csv(st.tmp / "ulira.csv", rows)
      st.commit()
  if config.stop_after == "ulira":
    return wd.path("ulira.csv")

  with wd.stage("report", deps=("ulira",), outputs=("report.md", "roc.png")) as st:
    if not st.done:
      rows = report.read_csv(wd.path("ulira.csv"))
      curves = {r["method"]: dict(np.load(wd.path("roc", f"{r['method']}.npz"))) for r in rows}
      times = json.loads(wd.path("times.json").read_text())
      report.plot_ulira_roc(curves, st.tmp / "roc.png")
      (st.tmp / "report.md").write_text(ulira_report(config, rows, times))
      st.commit()
  return wd.path("report.md")


def _chunks(config, total: int) -> list[tuple[int, int]]:
  """[start, stop) model ranges of at most ``config.parallel.max_models_per_program`` (0 = all):
  only one chunk's states are ever in memory (704 ResNet-18 at reference scale would not fit)."""
  size = config.parallel.max_models_per_program or total
  return [(start, min(start + size, total)) for start in range(0, total, size)]


def _train(config, wd, st, model, data, recipe, sets, num_train, like_one) -> None:
  """The originals (IN_s) and retrained models (retain_{s,f}) as one stack from one init.

  Model i of the stack (originals first) has PRNG stream i in any chunking; a model's numbers do
  not depend on the other models of its chunk (train.fit skips all-padding batches).
  """
  num_splits, num_models = len(sets["original"]), len(sets["retain"])
  total = num_splits + num_models
  init = jax.device_get(checkpoint.restore(wd.path("models/init"), like_one))
  # One width for every chunk (that of the whole stack): the chunks share one compiled step.
  index_sets = train.pad_index_sets([s[s >= 0] for s in (*sets["original"], *sets["retain"])])
  names = [f"original/{s}" for s in range(num_splits)] + [
      f"retrain/{m}" for m in range(num_models)]
  originals, retrained, seconds = [], [], 0.0
  for c, (start, stop) in enumerate(_chunks(config, total)):
    state = train.create_state(_repeat(init, stop - start), recipe,
                               learning_rate=config.train.learning_rate,
                               momentum=config.train.momentum,
                               weight_decay=config.train.weight_decay)

    def log(epoch, record, start=start, stop=stop):
      wd.append_metrics({"stage": "train", "epoch": epoch, "models": names[start:stop], **record})

    begin = time.perf_counter()
    result = train.fit(
        model, state, data, index_sets[start:stop], recipe, config.train.epochs,
        jax.random.key(config.train.data_seed), model_ids=range(start, stop),
        strategy=config.parallel.strategy,
        checkpoints=checkpoint.TrainingCheckpoints(wd.path("checkpoints", "train", f"chunk{c}")),
        checkpoint_every=config.checkpoint_every, on_epoch=log,
        progress=f"original+retrain {start}-{stop - 1} of {total}")
    variables = jax.device_get(result.state.variables)
    seconds += time.perf_counter() - begin
    cut = min(max(num_splits - start, 0), stop - start)  # models before `cut` are originals
    if cut:
      originals.append(parallel.slice_models(variables, 0, cut))
    if cut < stop - start:
      retrained.append(model_signals(
          model, parallel.slice_models(variables, cut, stop - start), data, num_train, recipe,
          config.parallel.strategy, config.signal_batch_models))
  checkpoint.save(st.tmp / "models/original",
                  jax.tree.map(lambda *x: np.concatenate(x), *originals))
  _save_signals(st.tmp / "signals/retrain.npz",
                {k: np.concatenate([r[k] for r in retrained]) for k in retrained[0]})
  times = {"stack_seconds": seconds, "models": total, "seconds_per_model": seconds / total,
           "epochs": config.train.epochs}
  (st.tmp / "times.json").write_text(json.dumps(times, indent=1))


def model_signals(model, variables, data: train.DeviceData, num_train: int, recipe: train.Recipe,
                  strategy: str = "auto", batch_models: int = 64) -> dict[str, np.ndarray]:
  """Per model, on the training part [0, num_train): the scaled logit (float32) and correctness.

  Predicts ``batch_models`` models at a time (eval-mode BatchNorm, no augmentation), so host
  memory holds at most batch_models x num_train x classes logits.
  """
  indices = np.arange(num_train)
  labels = np.asarray(data.labels)[:num_train]
  num = parallel.num_models(variables["params"])
  phi, correct = [], []
  for start in range(0, num, batch_models):
    part = parallel.slice_models(variables, start, min(start + batch_models, num))
    logits = train.predict(model, part, data, indices, recipe, strategy)
    phi.append(np.asarray(signals.scaled_logit(logits, labels), np.float32))
    correct.append(logits.argmax(-1) == labels)
  return {"scaled_logit": np.concatenate(phi), "correct": np.concatenate(correct)}


def _save_signals(path: Path, arrays: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)


def _unlearn(config, st, method: str, hparams: dict, source: str, context, num_models: int,
             num_train: int) -> None:
  """Runs ``method`` on the stack chunk by chunk (`_chunks`) and keeps its models' signals.

  ``context(start, stop)`` builds the chunk's `methods_lib.Context`. The unlearned weights are not
  kept (640 ResNet-18 per method at reference scale). Model i's PRNG stream is fold_in(key, i)
  in any chunking.
  """
  key = jax.random.fold_in(jax.random.key(config.unlearn_seed), zlib.crc32(method.encode()))
  parts, seconds, compile_seconds = [], 0.0, 0.0
  for start, stop in _chunks(config, num_models):
    ctx = context(start, stop)
    result = methods_lib.get(method).run(ctx, hparams, key)
    seconds += result.seconds
    compile_seconds += result.compile_seconds
    parts.append(model_signals(ctx.model, jax.device_get(result.states), ctx.data, num_train,
                               ctx.recipe, ctx.strategy, config.signal_batch_models))
  _save_signals(st.tmp / "signals" / f"{method}.npz",
                {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  info = {"seconds": seconds, "compile_seconds": compile_seconds, "models": num_models,
          "hparams": hparams, "source": source}
  (st.tmp / "unlearned").mkdir(exist_ok=True)
  (st.tmp / "unlearned" / f"{method}.json").write_text(stages.to_json(info, indent=1))


def chunk_context(config, model, recipe: train.Recipe, data: train.DeviceData, num_classes: int,
                  references: dict, sets: dict[str, np.ndarray], val: np.ndarray, start: int,
                  stop: int) -> methods_lib.Context:
  """The unlearning context of (s, f) models ``start .. stop - 1``: split s's original, the
  shared initialisation, that draw's retain and forget sets, the LiRA val set."""
  split = sets["split"][start:stop]
  return methods_lib.Context.create(
      model, recipe, data, jax.tree.map(lambda x: x[split], references["originals"]),
      _repeat(references["init"], stop - start), sets["retain"][start:stop],
      sets["forget"][start:stop], val, model_ids=tuple(range(start, stop)),
      num_classes=num_classes, strategy=config.parallel.strategy,
      train_epochs=config.train.epochs,
      train_hparams={k: config.train[k] for k in ("learning_rate", "momentum", "weight_decay")})


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


def ulira_report(config: ml_collections.ConfigDict, rows: list[dict], times: dict) -> str:
  """report.md: methods ranked by distance of the balanced accuracy from 0.5, ROC figure."""
  num_models = int(rows[0]["models"])
  reference = "reference_member_prob" in rows[0]
  header = ["method", "U-LiRA acc.", "95% CI", "AUC", "samples", "mean P(unlearned)",
            "pop. MIA (forget vs val)", "hyper-parameters"]
  if reference:
    header.append("reference 0/1 P(member)")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in sorted(rows, key=lambda r: abs(r["balanced_accuracy"] - 0.5)):
    cells = [str(r["method"]), f"{r['balanced_accuracy']:.4f}",
             f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]", f"{r['auc']:.4f}",
             f"{int(r['num_samples'])}", f"{r['mean_member_prob']:.4f}",
             f"{r['population_mia']:.4f} ± {r['population_mia_std']:.4f}", str(r["hparams"])]
    if reference:
      cells.append(f"{r['reference_member_prob']:.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  lira_c = config.lira
  return "\n".join([
      f"# U-LiRA: {config.dataset.name} / {config.model.name}", "",
      f"{lira_c.num_splits} splits x {lira_c.num_forget_draws} forget draws = {num_models} "
      f"unlearning runs per method ({lira_c.scheme} splits, forget share {lira_c.forget_ratio}). "
      "Per forgotten sample, a Gaussian of the scaled logit of the unlearned models that forgot "
      "it against one of the retrained models that never saw it, each fitted without the scored "
      "model (Hayes et al. 2024; `jaxmu.attacks.lira.ulira`). **U-LiRA acc.** is the balanced "
      "accuracy of telling them apart: 0.5 = indistinguishable from retraining (best), 1.0 = "
      "always told apart. Methods ranked by their distance from 0.5; samples = forgotten samples "
      "with at least 2 observations in each group. Population MIA: DeepUnlearn's attack "
      "(0.5 ideal), mean ± std over models.", "",
      "\n".join(lines), "",
      "![U-LiRA ROC](roc.png)", "",
      f"Training: {times['models']} models (originals and retrained) as one stack, "
      f"{times['epochs']} epochs, {times['stack_seconds']:.1f} s wall time.",
      "Hyper-parameters: `search` = the main search's best trial, `defaults` = the method's "
      "defaults. Not done here: the reference's per-split search (200 trials on each of 32 "
      "splits); every split uses the same hyper-parameters.", ""])
