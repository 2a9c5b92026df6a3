"""Hyper-parameter search with Optuna (deepunlearn-spec 5): one study per method, every trial
unlearning the whole stack of tuning seeds at once.

Each trial samples one hyper-parameter set from the method's reference search space
(`Method.suggest`, deepunlearn-spec 4.2) with the epoch budget ceil(0.2 x training epochs)
(5.3), runs the method on all tuning seeds as one stack and reports the four "objective10"
values (5.2) averaged over the seeds. The study lives in an Optuna journal file next to the
pipeline's other outputs (or any storage URL), so several processes can work on it at once and
an interrupted search continues where it stopped. When the study has ``config.trials`` COMPLETE
trials, the best of the first ``config.trials`` (by trial number; smallest Euclidean norm of the
four objectives, 5.4) is written to ``<directory>/<method>.json`` for the final stage.

Deviations (docs/deviations.md, "Hyper-parameter search"): one study over the mean of the tuning
seeds instead of one study per seed; a trial whose unlearning diverges or raises, or whose
objectives cannot be computed, is FAIL (the reference crashed, or recorded ``inf`` as COMPLETE).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optuna
from tqdm.auto import tqdm

from jaxmu import parallel, train

from jaxmu import methods as methods_lib
from jaxmu.attacks import metrics, mia

MODES = ("nsga3", "tpe")
OBJECTIVES = ("retain_gap", "forget_gap", "val_gap", "mia_gap")
_SPLITS = ("retain", "forget", "val")
_HOST = socket.gethostname()
_WAIT_SECONDS = 2.0  # polling interval while another local worker finishes a trial


def default_config() -> ml_collections.ConfigDict:
  """``config.search`` of the DeepUnlearn pipeline (deepunlearn-spec 5)."""
  c = ml_collections.ConfigDict()
  c.mode = "nsga3"  # "nsga3": 4-objective NSGA-III (the reference); "tpe": TPE on their norm
  c.trials = 100  # COMPLETE trials per study; selection uses the first `trials` by number
  c.seeds = (0, 1, 2)  # tuning seeds (a subset of config.seeds), all unlearned in every trial
  c.methods = ()  # names of the methods to tune; the others keep config.unlearn.<method>
  c.population_size = 50  # NSGA-III population (the reference's default)
  c.max_failed = 10  # the study stops with an error after this many FAIL trials in a row
  c.storage = ""  # "" = Optuna journal file <search dir>/<method>.journal; else a storage URL
  c.study_prefix = ""  # prefix of the study names (set one per experiment sharing a database)
  c.epoch_fraction = 0.2  # epoch budget = ceil(epoch_fraction x training epochs), at least 1
  c.sampler_seed = 0  # sampler seed (with the process index) and trial keys (with its number)
  return c


class SearchResult(NamedTuple):
  method: str
  best_params: dict[str, Any]
  best_values: tuple[float, float, float, float]  # OBJECTIVES, averaged over the tuning seeds
  best_trial: int  # Optuna trial number
  trials_complete: int
  trials_failed: int


class SearchError(RuntimeError):
  """A study cannot go on (too many failed trials in a row, or a mismatching stored study)."""


class TrialFailed(Exception):
  """A trial's unlearning diverged or its objectives cannot be computed; the message says why."""


def epoch_budget(train_epochs: int, fraction: float = 0.2) -> int:
  """E_max = ceil(fraction x training epochs), at least 1 (deepunlearn-spec 5.3: 182 -> 37)."""
  if train_epochs < 1 or not 0 < fraction <= 1:
    raise ValueError(f"need train_epochs >= 1 and 0 < fraction <= 1; got {train_epochs}, "
                     f"{fraction}")
  return max(math.ceil(round(fraction * train_epochs, 9)), 1)


def select_best(values: Sequence[Sequence[float]]) -> int:
  """Index of the objective vector with the smallest Euclidean norm (deepunlearn-spec 5.4);
  ties go to the first (the reference's pandas sort breaks them arbitrarily)."""
  table = np.asarray(values, np.float64)
  if table.ndim != 2 or len(table) == 0:
    raise ValueError(f"values must be a non-empty [trials, objectives] table; got {table.shape}")
  if not np.all(np.isfinite(table)):
    raise ValueError("objective values must be finite")
  return int(np.argmin(np.linalg.norm(table, axis=1)))


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def _evaluations(ctx: methods_lib.Context, variables, recipe, strategy) -> dict[str, dict]:
  """`train.evaluate` of every model of the stack on its own retain, forget and val sets."""
  return {split: train.evaluate(ctx.model, variables, ctx.data, ctx.index_sets(split), recipe,
                                strategy) for split in _SPLITS}


def _objectives(unlearned: dict[str, dict],
                retrained_accuracy: dict[str, np.ndarray]) -> np.ndarray:
  """[N, 4] objective10 from evaluations of U and accuracies of R (see `objectives`)."""
  gaps = [np.abs(unlearned[s]["accuracy"] - retrained_accuracy[s]) / 3 for s in _SPLITS]
  losses = {s: unlearned[s]["per_sample_loss"] for s in ("forget", "val")}
  val_mia = np.array([mia.population_mia(f[~np.isnan(f)], v[~np.isnan(v)])
                      for f, v in zip(losses["forget"], losses["val"])])
  return np.stack(gaps + [1 - metrics.indiscernibility(val_mia)], axis=1)


def objectives(ctx: methods_lib.Context, unlearned, retrained, *, recipe: train.Recipe | None = None,
               strategy: parallel.Strategy | str | None = None) -> np.ndarray:
  """DeepUnlearn's "objective10" (deepunlearn-spec 5.2) of every model of the stack: [N, 4].

  For model m, with U = ``unlearned`` and R = ``retrained`` (stacked variables, N models as in
  ``ctx``): |Acc_R(U) - Acc_R(R)| / 3, |Acc_F(U) - Acc_F(R)| / 3, |Acc_V(U) - Acc_V(R)| / 3 and
  1 - Indisc(Val-MIA(U)), where Val-MIA is the population MIA (deepunlearn-spec 6.2) on U's
  per-sample cross-entropy of model m's forget set vs its val set. All minimised. Accuracies and
  losses are eval-mode with the recipe's normalisation (``ctx.recipe`` unless given), as the
  reference's test-transform loaders. Raises when a loss is not finite (no MIA can be fitted).
  """
  recipe = recipe or ctx.recipe
  strategy = strategy or ctx.strategy
  for name, tree in (("unlearned", unlearned), ("retrained", retrained)):
    if parallel.num_models(tree["params"]) != ctx.num_models:
      raise ValueError(f"{name} has {parallel.num_models(tree['params'])} models, the context "
                       f"{ctx.num_models}")
  reference = _evaluations(ctx, retrained, recipe, strategy)
  return _objectives(_evaluations(ctx, unlearned, recipe, strategy),
                     {s: reference[s]["accuracy"] for s in _SPLITS})


def _finite_models(tree) -> np.ndarray:
  """[N] bool: every leaf of model m is finite."""
  flags = [jnp.isfinite(x).reshape(x.shape[0], -1).all(1) for x in jax.tree.leaves(tree)]
  return np.asarray(jnp.stack(flags).all(0))


def _trial_key(sampler_seed: int, number: int) -> jax.Array:
  """The unlearning key of trial ``number``: the same whenever (and wherever) it is run."""
  return jax.random.fold_in(jax.random.key(sampler_seed), number)


def _trial_objectives(method: methods_lib.Method, parts, params: dict, key: jax.Array) -> np.ndarray:
  """Runs ``method`` with ``params`` on each (context, retrained accuracies) part; returns the
  [N, 4] objectives of all their models. Raises `TrialFailed` on non-finite weights or losses."""
  rows = []
  for ctx, retrained_accuracy in parts:
    states = method.run(ctx, params, key).states
    finite = _finite_models(states)
    if not finite.all():
      raise TrialFailed(f"non-finite weights after unlearning (models "
                        f"{[ctx.model_ids[m] for m in np.flatnonzero(~finite)]})")
    try:
      rows.append(_objectives(_evaluations(ctx, states, ctx.recipe, ctx.strategy),
                              retrained_accuracy))
    except ValueError as e:  # a non-finite loss: the MIA cannot be fitted
      raise TrialFailed(f"objectives cannot be computed: {e}") from e
  return np.concatenate(rows)


def _retrained_accuracy(ctx: methods_lib.Context, retrained) -> dict[str, np.ndarray]:
  evaluations = _evaluations(ctx, retrained, ctx.recipe, ctx.strategy)
  return {s: evaluations[s]["accuracy"] for s in _SPLITS}


def seed_context(ctx: methods_lib.Context, m: int) -> methods_lib.Context:
  """The one-model context of model ``m`` of the stack (same data, program and key stream)."""
  one = lambda tree: parallel.slice_models(tree, m, m + 1)
  return dataclasses.replace(ctx, originals=one(ctx.originals), inits=one(ctx.inits),
                             retain=ctx.retain[m:m + 1], forget=ctx.forget[m:m + 1],
                             val=ctx.val[m:m + 1], model_ids=(ctx.model_ids[m],))


# --------------------------------------------------------------------------------------------
# Studies: storage, workers, resuming
# --------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
  """The start time of process ``pid`` (Linux /proc), telling a reused pid from the original."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return start is None or _process_start(pid) in (None, start)


def _fail_stale(study: optuna.Study) -> list[int]:
  """Marks FAIL the RUNNING trials of dead workers of this host (recorded host and pid, and the
  process start time where known); returns their numbers. Other hosts' trials are left."""
  stale = []
  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    attrs = t.user_attrs
    if attrs.get("host") != _HOST or "pid" not in attrs:
      continue
    if attrs["pid"] != os.getpid() and _alive(attrs["pid"], attrs.get("pid_start")):
      continue  # a live worker (this process has no trial running while it checks)
    try:
      study._storage.set_trial_user_attr(  # no public setter for another worker's trial
          t._trial_id, "fail_reason", f"worker {_HOST}:{attrs['pid']} died while running it")
      study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
      stale.append(t.number)
    except optuna.exceptions.UpdateFinishedTrialError:
      pass  # another worker marked it first
  return stale


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
  trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
  return sorted(trials, key=lambda t: t.number)


def _storage(config: ml_collections.ConfigDict, directory: Path, method: str):
  if config.storage:
    return config.storage
  backend = optuna.storages.journal.JournalFileBackend(str(directory / f"{method}.journal"))
  return optuna.storages.JournalStorage(backend)


def _sampler(config: ml_collections.ConfigDict, process: int) -> optuna.samplers.BaseSampler:
  """The mode's sampler, seeded from (sampler_seed, process) so workers propose different points."""
  if config.mode not in MODES:
    raise ValueError(f"unknown search mode {config.mode!r}; one of {MODES}")
  seed = int(np.random.SeedSequence((config.sampler_seed, process)).generate_state(1)[0])
  if config.mode == "nsga3":
    with warnings.catch_warnings():  # "experimental" since optuna 3.2
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      return optuna.samplers.NSGAIIISampler(population_size=config.population_size, seed=seed)
  return optuna.samplers.TPESampler(seed=seed)


def _study(config, directory: Path, method: str, process: int, fingerprint: dict) -> optuna.Study:
  """Creates or loads the method's study; refuses a stored study of another search."""
  optuna.logging.set_verbosity(logging.WARNING)
  study = optuna.create_study(
      storage=_storage(config, directory, method), sampler=_sampler(config, process),
      study_name=f"{config.study_prefix}{method}", load_if_exists=True,
      directions=("minimize",) * (len(OBJECTIVES) if config.mode == "nsga3" else 1))
  stored = study.user_attrs.get("search")
  if stored is None:
    study.set_user_attr("search", fingerprint)
  elif stored != fingerprint:
    raise SearchError(
        f"the stored study {study.study_name!r} ({config.storage or directory}) was made by "
        f"another search: {stored}, this one is {fingerprint}. Use another directory (or "
        f"study_prefix), or delete the study to start again.")
  return study


def _optimize(study: optuna.Study, objective_fn: Callable[[optuna.Trial], Sequence[float]],
              trials: int, max_failed: int, name: str, progress: bool = True) -> None:
  """Asks and tells trials until the study has at least ``trials`` COMPLETE ones (counting every
  worker's). ``objective_fn(trial)`` returns the four objectives or raises; an exception or a
  non-finite value makes the trial FAIL with its reason in the user attribute ``fail_reason``
  (an interrupt too, which then propagates); ``max_failed`` failures in a row raise
  `SearchError` naming ``name``."""
  _fail_stale(study)
  multi = len(study.directions) > 1
  failed_in_row = 0
  bar = tqdm(total=trials, desc=f"search {name}", disable=not progress, leave=False)
  try:
    while len(complete := _complete(study)) < trials:
      norms = [np.linalg.norm(t.user_attrs["objectives"]) for t in complete]
      bar.n = len(complete)
      bar.set_postfix(best=f"{min(norms):.4f}" if norms else "-", refresh=True)
      trial = study.ask()
      trial.set_user_attr("host", _HOST)
      trial.set_user_attr("pid", os.getpid())
      trial.set_user_attr("pid_start", _process_start(os.getpid()))
      try:
        values = [float(v) for v in objective_fn(trial)]
        if not np.all(np.isfinite(values)):
          raise TrialFailed(f"non-finite objectives {values}")
      except Exception as e:  # noqa: BLE001  (any failure of one trial is that trial's)
        reason = f"{type(e).__name__}: {e}"
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        failed_in_row += 1
        if failed_in_row >= max_failed:
          raise SearchError(
              f"search of {name!r}: {failed_in_row} trials failed in a row (last: {reason}). "
              f"Check the method's search space and inputs, or raise config.search.max_failed"
          ) from e
        continue
      except BaseException:
        trial.set_user_attr("fail_reason", "interrupted")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
      failed_in_row = 0
      trial.set_user_attr("objectives", values)
      study.tell(trial, values if multi else float(np.linalg.norm(values)))
    bar.n = min(len(_complete(study)), trials)
    bar.refresh()
  finally:
    bar.close()


def _selection(study: optuna.Study, trials: int) -> list[optuna.trial.FrozenTrial]:
  """The first ``trials`` COMPLETE trials by number, once no live worker of this host is still
  running a trial that could enter them (so every local worker selects from the same set)."""
  while True:
    _fail_stale(study)
    chosen = _complete(study)[:trials]
    cutoff = chosen[-1].number if chosen else -1
    running = [t for t in study.get_trials(deepcopy=False,
                                           states=(optuna.trial.TrialState.RUNNING,))
               if t.number < cutoff and t.user_attrs.get("host") == _HOST]
    if not running:
      return chosen
    time.sleep(_WAIT_SECONDS)


def _write_best(path: Path, result: SearchResult, extra: dict) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps({**result._asdict(), **extra}, indent=2, sort_keys=True))
  os.replace(tmp, path)


def tune(method: str, ctx: methods_lib.Context, retrained, config: ml_collections.ConfigDict,
         directory: Path, *, process: int = 0, progress: bool = True) -> SearchResult:
  """Searches ``method``'s hyper-parameters on the stack ``ctx`` (deepunlearn-spec 5).

  Args:
    ctx: the tuning seeds' originals as one stack; ``retrained``: their retrained models
      (stacked variables, same order).
    config: ``config.search`` (see `default_config`).
    directory: where the journal (default storage) and ``<method>.json`` go.
    process: this worker's index (seeds its sampler); several workers may share the study.

  Each trial suggests hyper-parameters (epoch budget `epoch_budget`), unlearns every tuning seed
  at once with the key of its trial number, and reports the four objectives averaged over the
  seeds (NSGA-III) or their Euclidean norm (TPE). Works until the study has ``config.trials``
  COMPLETE trials, then writes the best of the first ``config.trials`` and returns it.
  """
  spec = methods_lib.get(method)
  if not spec.space:
    raise ValueError(f"method {spec.name!r} has no search space (the reference ran it with fixed "
                     f"hyper-parameters); remove it from config.search.methods")
  if config.trials < 1 or config.max_failed < 1:
    raise ValueError(f"config.search.trials and max_failed must be >= 1; got {config.trials}, "
                     f"{config.max_failed}")
  if ctx.train_epochs < 1:
    raise ValueError("ctx.train_epochs is 0: the context must say how many epochs the originals "
                     "were trained (the epoch budget is a fraction of them)")
  e_max = epoch_budget(ctx.train_epochs, config.epoch_fraction)
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  models = [int(m) for m in ctx.model_ids]
  fingerprint = {"method": spec.name, "mode": config.mode, "models": models,
                 "epoch_budget": e_max, "sampler_seed": config.sampler_seed}
  study = _study(config, directory, spec.name, process, fingerprint)
  parts = [(ctx, _retrained_accuracy(ctx, retrained))]

  def objective_fn(trial: optuna.Trial) -> np.ndarray:
    params = spec.suggest(trial, e_max)
    key = _trial_key(config.sampler_seed, trial.number)
    per_model = _trial_objectives(spec, parts, params, key)
    trial.set_user_attr("objectives_per_model", per_model.tolist())
    return per_model.mean(0)

  _optimize(study, objective_fn, config.trials, config.max_failed, spec.name, progress)
  chosen = _selection(study, config.trials)
  best = chosen[select_best([t.user_attrs["objectives"] for t in chosen])]
  failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
  result = SearchResult(spec.name, dict(best.params), tuple(best.user_attrs["objectives"]),
                        best.number, len(_complete(study)), failed)
  _write_best(directory / f"{spec.name}.json", result,
              {"mode": config.mode, "trials": config.trials, "epoch_budget": e_max,
               "models": models, "objectives": list(OBJECTIVES)})
  return result


def load_best(directory: Path, method: str) -> SearchResult | None:
  """The search result `tune` wrote for ``method`` in ``directory``; None when there is none."""
  path = Path(directory) / f"{methods_lib.get(method).name}.json"
  if not path.exists():
    return None
  record = json.loads(path.read_text())
  missing = [name for name in SearchResult._fields if name not in record]
  if missing:
    raise ValueError(f"{path} is not a search result (missing {missing}); delete it and run "
                     f"the search again")
  fields = {name: record[name] for name in SearchResult._fields}
  return SearchResult(**fields | {"best_values": tuple(record["best_values"])})


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def throughput(method: str, ctx: methods_lib.Context, retrained, trials: int, stacked: bool, *,
               sampler_seed: int = 0, fraction: float = 0.2) -> dict[str, Any]:
  """Trials x seeds per second of the search: the tuning seeds as one stack (``stacked``) or
  one seed at a time, on the same ``trials`` hyper-parameter sets (random sampler, seeded).

  Returns a JSON row: seconds (all trials, compilation included), compile_seconds (tracing
  and compilation inside them), the two rates, with and without compilation, and the mean
  objectives over trials and seeds (the same in both modes: a check).
  """
  spec = methods_lib.get(method)
  if trials < 1:
    raise ValueError(f"trials must be >= 1; got {trials}")
  e_max = epoch_budget(ctx.train_epochs, fraction)
  contexts = [ctx] if stacked else [seed_context(ctx, m) for m in range(ctx.num_models)]
  retrained_parts = [retrained] if stacked else [parallel.slice_models(retrained, m, m + 1)
                                                 for m in range(ctx.num_models)]
  parts = [(c, _retrained_accuracy(c, r)) for c, r in zip(contexts, retrained_parts)]
  optuna.logging.set_verbosity(logging.WARNING)
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sampler_seed))
  values = []
  with methods_lib.base.CompileClock() as clock:
    start = time.perf_counter()
    for number in range(trials):
      params = spec.suggest(study.ask(), e_max)
      values.append(_trial_objectives(spec, parts, params, _trial_key(sampler_seed, number)))
    seconds = time.perf_counter() - start
  work = trials * ctx.num_models
  return {"method": spec.name, "stacked": stacked, "seeds": ctx.num_models, "trials": trials,
          "epoch_budget": e_max, "seconds": seconds, "compile_seconds": clock.seconds,
          "trial_seeds_per_second": work / seconds,
          "trial_seeds_per_second_excl_compile": work / max(seconds - clock.seconds, 1e-9),
          "mean_objectives": np.mean(values, (0, 1)).tolist(), "backend": jax.default_backend()}
