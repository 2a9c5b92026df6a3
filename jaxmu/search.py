"""Hyper-parameter search with Optuna (deepunlearn-spec 5): one study per method, every trial
unlearning the whole stack of tuning seeds at once.

Each trial samples one hyper-parameter set from the method's reference search space
(`Method.suggest`, deepunlearn-spec 4.2) with the epoch budget ceil(0.2 x training epochs)
(5.3), runs the method on all tuning seeds as one stack and reports the four "objective10"
values (5.2) averaged over the seeds. The study lives in an Optuna journal file next to the
pipeline's other outputs (or an RDB storage URL, e.g. PostgreSQL), so several processes can work
on it at once and an interrupted search continues where it stopped: a dead worker's trial is
failed (heartbeats on RDB, a pid check on the journal) and retried with the same parameters, and
the sampler continues its random stream (one worker: a killed and resumed search equals the
uninterrupted one; docs/search.md). When the study has ``config.trials`` COMPLETE
trials, the best of the first ``config.trials`` (by trial number; smallest Euclidean norm of the
four objectives, 5.4) is written to ``<directory>/<method>.json`` for the final stage.

Deviations (docs/deviations.md, "Hyper-parameter search"): one study over the mean of the tuning
seeds instead of one study per seed; a trial whose unlearning diverges or raises, or whose
objectives cannot be computed, is FAIL (the reference crashed, or recorded ``inf`` as COMPLETE).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
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

from jaxmu import distributed, parallel, train

from jaxmu import methods as methods_lib
from jaxmu.attacks import metrics, mia

MODES = ("nsga3", "tpe")
OBJECTIVES = ("retain_gap", "forget_gap", "val_gap", "mia_gap")
_SPLITS = ("retain", "forget", "val")
_HOST = socket.gethostname()
_WAIT_SECONDS = 1.0  # polling interval while other workers finish the study's last trials


def default_config() -> ml_collections.ConfigDict:
  """``config.search`` of the DeepUnlearn pipeline (deepunlearn-spec 5)."""
  c = ml_collections.ConfigDict()
  c.mode = "nsga3"  # "nsga3": 4-objective NSGA-III (the reference); "tpe": TPE on their norm
  c.trials = 100  # COMPLETE trials per study; selection uses the first `trials` by number
  c.seeds = (0, 1, 2)  # tuning seeds (a subset of config.seeds), all unlearned in every trial
  c.methods = ()  # names of the methods to tune; the others keep config.unlearn.<method>
  c.population_size = 50  # NSGA-III population (the reference's default)
  c.tpe_startup_trials = 10  # "tpe": trials drawn at random before TPE proposes (Optuna's default)
  c.max_failed = 10  # the study stops with an error after this many FAIL trials in a row
  c.storage = ""  # "" = Optuna journal file <search dir>/<method>.journal; else a storage URL
  c.study_prefix = ""  # prefix of the study names (set one per experiment sharing a database)
  c.epoch_fraction = 0.2  # epoch budget = ceil(epoch_fraction x training epochs), at least 1
  c.sampler_seed = 0  # sampler seed (with the process index) and trial keys (with its number)
  # RDB storages (config.storage a URL): a running trial's heartbeat every heartbeat_interval
  # seconds; one without a heartbeat for grace_period seconds (0: twice the interval) is FAIL
  # and retried by the next trial to start.
  c.heartbeat_interval = 60
  c.grace_period = 0
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


def most_accurate(trials: Sequence[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
  """The trial whose three accuracy objectives (retain, forget, val gaps) have the smallest
  Euclidean norm, the MIA term left out: set beside the best trial, it shows what objective10's
  MIA term cost in accuracy (the report tests whether that MIA difference is noise)."""
  return min(trials, key=lambda t: float(np.linalg.norm(t.user_attrs["objectives"][:3])))


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


# --------------------------------------------------------------------------------------------
# Studies: storage, workers, resuming
# --------------------------------------------------------------------------------------------

# A retried trial keeps its parameters and drops these (they describe the dead worker's run).
_WORKER_ATTRS = ("host", "pid", "pid_start", "heartbeat", "fail_reason")
# Optuna 4.9 renamed RetryFailedTrialCallback (now a deprecated alias).
_RetryCallback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback",
                         optuna.storages.RetryFailedTrialCallback)


@contextlib.contextmanager
def _quiet():
  """Without Optuna's ExperimentalWarnings (heartbeats, retries, metric names)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias, on old Optuna
    yield


class _Retry(_RetryCallback):
  """Optuna's retry of a trial whose worker died: a WAITING copy of it with the same parameters
  (system attribute ``failed_trial``: the first trial of the chain), without the dead worker's
  user attributes. The heartbeat storage calls it for stale trials; the journal's pid check
  (`_fail_stale`) and an interrupt (`_run_one`) call it too."""

  def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    trial = copy.deepcopy(trial)
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in _WORKER_ATTRS}
    super().__call__(study, trial)


def _retried(trial: optuna.trial.FrozenTrial) -> int | None:
  """The number of the trial that ``trial`` retries (the first of a chain), else None."""
  with _quiet():
    return _RetryCallback.retried_trial_number(trial)


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


@dataclasses.dataclass
class _Search:
  """An open study with the storage object it was created with (whose public methods are used
  where `optuna.Study` has none), the search config and this worker's index."""
  study: optuna.Study
  storage: optuna.storages.BaseStorage
  config: ml_collections.ConfigDict
  process: int

  @property
  def heartbeat(self) -> bool:
    """An RDB storage: Optuna's heartbeats find dead workers; else (a journal) their pids."""
    return isinstance(self.storage, optuna.storages.RDBStorage)

  def counted_running(self, trials) -> list[optuna.trial.FrozenTrial]:
    """The RUNNING trials that will finish or be failed: with heartbeats, those run with one
    (user attribute ``heartbeat``; not a trial of an older jaxmu that no heartbeat can fail); on
    a journal those of this host (another host's dead worker cannot be told from a live one)."""
    return [t for t in trials if t.state == optuna.trial.TrialState.RUNNING
            and (t.user_attrs.get("heartbeat") if self.heartbeat
                 else t.user_attrs.get("host") == _HOST)]


def _fail_stale(s: _Search) -> list[int]:
  """Marks FAIL the RUNNING trials of dead workers and queues their retries (`_Retry`); returns
  their numbers where known. RDB storage: Optuna's heartbeats (`fail_stale_trials`). Journal:
  the trials of this host whose recorded pid (and process start time where known) no longer
  match a live process, with the reason in ``fail_reason``; other hosts' trials are left."""
  if s.heartbeat:
    with _quiet():
      optuna.storages.fail_stale_trials(s.study)
    return []
  stale, study_id = [], None
  for t in s.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    attrs = t.user_attrs
    if attrs.get("host") != _HOST or "pid" not in attrs:
      continue
    if attrs["pid"] != os.getpid() and _alive(attrs["pid"], attrs.get("pid_start")):
      continue  # a live worker (this process has no trial running while it checks)
    if study_id is None:
      study_id = s.storage.get_study_id_from_name(s.study.study_name)
    try:
      s.storage.set_trial_user_attr(  # the study has no setter for another worker's trial
          s.storage.get_trial_id_from_study_id_trial_number(study_id, t.number), "fail_reason",
          f"worker {_HOST}:{attrs['pid']} died while running it")
      s.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
      continue  # another worker marked it first (and retries it)
    stale.append(t.number)
    with _quiet():
      _Retry(max_retry=s.config.max_failed)(s.study, t)
  return stale


def _complete(trials) -> list[optuna.trial.FrozenTrial]:
  return sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE),
                key=lambda t: t.number)


def _rdb_url(url: str) -> str:
  """``url`` with the psycopg2 driver named for a bare ``postgresql://`` (SQLAlchemy 2.1 picks
  psycopg 3 for it) when psycopg 3 is not installed; the ``search`` extra has psycopg2."""
  scheme, sep, rest = url.partition("://")
  if sep and scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None:
    return f"postgresql+psycopg2://{rest}"
  return url


def _storage(config: ml_collections.ConfigDict, directory: Path,
             name: str) -> optuna.storages.BaseStorage:
  """A journal file ``<directory>/<name>.journal`` (config.storage ""), else an RDB storage of
  the URL with Optuna's heartbeats, whose stale trials are retried (`_Retry`)."""
  if not config.storage:
    backend = optuna.storages.journal.JournalFileBackend(str(directory / f"{name}.journal"))
    return optuna.storages.JournalStorage(backend)
  interval, grace = config.get("heartbeat_interval", 60), config.get("grace_period", 0)
  if int(interval) != interval or interval < 1 or int(grace) != grace or grace < 0:
    raise ValueError(f"config.search.heartbeat_interval must be an integer >= 1 and grace_period "
                     f"an integer >= 0 (seconds); got {interval}, {grace}")
  for attempt in range(3):  # several workers creating the tables of a new database may collide
    try:
      with _quiet():
        return optuna.storages.RDBStorage(
            _rdb_url(config.storage), heartbeat_interval=int(interval), grace_period=int(grace) or None,
            heartbeat_stale_trial_callback=_Retry(max_retry=config.max_failed))
    except ImportError as e:
      raise ImportError(f"no database driver for {config.storage!r}: install jaxmu's `search` "
                        f"extra (psycopg2 for PostgreSQL) or the driver the URL names") from e
    except Exception:  # noqa: BLE001
      if attempt == 2:
        raise
      time.sleep(1.0 + attempt)
  raise AssertionError("unreachable")


def _sampler(config: ml_collections.ConfigDict, process: int,
             draw: int = 0) -> optuna.samplers.BaseSampler:
  """The mode's sampler for the ``draw``-th sampled trial of the study, seeded from
  (sampler_seed, process, draw): a new one before each trial continues the random stream where
  the study stands (a resumed or extended search goes on with new points instead of replaying
  the first ones), while the sampler reads the history (TPE's trials, NSGA-III's generations)
  from the storage. Workers with different indices propose different points."""
  if config.mode not in MODES:
    raise ValueError(f"unknown search mode {config.mode!r}; one of {MODES}")
  seed = int(np.random.SeedSequence((config.sampler_seed, process, draw)).generate_state(1)[0])
  if config.mode == "nsga3":
    with _quiet():  # "experimental" since optuna 3.2
      return optuna.samplers.NSGAIIISampler(population_size=config.population_size, seed=seed)
  return optuna.samplers.TPESampler(n_startup_trials=config.tpe_startup_trials, seed=seed)


def _draw(trials) -> int:
  """The sampler's position for the next trial: how many trials of the study were sampled (not
  retries, which reuse their original's parameters); for a queued retry, which `ask` takes
  first, its original's position, for any parameter the dead worker had not drawn yet."""
  sampled = [t.number for t in trials if _retried(t) is None]
  waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
  if waiting:
    original = _retried(min(waiting, key=lambda t: t.number))
    if original is not None:
      return sum(1 for n in sampled if n < original)
  return len(sampled)


def _open(config: ml_collections.ConfigDict, directory: Path, name: str, process: int,
          fingerprint: dict) -> _Search:
  """Creates or loads the study ``<study_prefix><name>``; refuses a stored study of another
  search. Its metric names (shown by optuna-dashboard) are OBJECTIVES, or "objective_norm"."""
  optuna.logging.set_verbosity(logging.WARNING)
  multi = config.mode == "nsga3"
  storage = _storage(config, Path(directory), name)
  study = optuna.create_study(
      storage=storage, sampler=_sampler(config, process), study_name=f"{config.study_prefix}{name}",
      load_if_exists=True, directions=("minimize",) * (len(OBJECTIVES) if multi else 1))
  stored = study.user_attrs.get("search")
  if stored is None:
    study.set_user_attr("search", fingerprint)
    with _quiet():
      study.set_metric_names(list(OBJECTIVES) if multi else ["objective_norm"])
  elif stored != fingerprint:
    raise SearchError(
        f"the stored study {study.study_name!r} ({config.storage or directory}) was made by "
        f"another search: {stored}, this one is {fingerprint}. Use another directory (or "
        f"study_prefix), or delete the study to start again.")
  return _Search(study, storage, config, process)


class _Failed(Exception):
  """One trial's failure, its reason already in the trial's ``fail_reason``."""


def _run_one(s: _Search, objective_fn: Callable[[optuna.Trial], Sequence[float]]) -> dict:
  """Runs one trial through `optuna.Study.optimize` (which keeps an RDB trial's heartbeat and
  fails stale trials first) and says how it went: {"number", "failed": reason or None,
  "surplus": bool}. A trial asked while the study already has ``trials`` COMPLETE or counted
  RUNNING trials of lower numbers (another worker asked at the same time) is a surplus FAIL
  and runs nothing. An interrupt fails the trial ("interrupted"), queues its retry and
  propagates."""
  multi = len(s.study.directions) > 1
  record: dict[str, Any] = {"number": None, "failed": None, "surplus": False}

  def run(trial: optuna.Trial):
    record["number"] = trial.number
    trial.set_user_attr("host", _HOST)
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("pid_start", _process_start(os.getpid()))
    if s.heartbeat:  # Study.optimize keeps its heartbeat while this runs
      trial.set_user_attr("heartbeat", True)
    trials = s.study.get_trials(deepcopy=False)
    before = [t for t in _complete(trials) + s.counted_running(trials) if t.number < trial.number]
    if len(before) >= s.config.trials:
      record["surplus"] = True
      record["failed"] = (f"surplus: {len(before)} trials of lower numbers were complete or "
                          f"running when it started")
    else:
      this = next(t for t in trials if t.number == trial.number)
      original = _retried(this)
      trial.set_user_attr("key_trial", trial.number if original is None else original)
      try:
        values = [float(v) for v in objective_fn(trial)]
        if not np.all(np.isfinite(values)):
          raise TrialFailed(f"non-finite objectives {values}")
      except Exception as e:  # noqa: BLE001  (any failure of one trial is that trial's)
        record["failed"] = f"{type(e).__name__}: {e}"
      except BaseException:
        record["failed"] = "interrupted"
        trial.set_user_attr("fail_reason", "interrupted")
        raise
    if record["failed"] is not None:
      trial.set_user_attr("fail_reason", record["failed"])
      raise _Failed(record["failed"])
    trial.set_user_attr("objectives", values)
    return values if multi else float(np.linalg.norm(values))

  verbosity = optuna.logging.get_verbosity()
  optuna.logging.set_verbosity(logging.ERROR)  # a failed trial's reason is in its user attrs
  try:
    s.study.optimize(run, n_trials=1, catch=(_Failed,))
  except BaseException:
    if record["number"] is not None and record["failed"] in (None, "interrupted"):
      try:
        s.study.tell(record["number"], state=optuna.trial.TrialState.FAIL)
      except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        pass  # Optuna failed it already
      trial = next(t for t in s.study.get_trials(deepcopy=False) if t.number == record["number"])
      with _quiet():
        _Retry(max_retry=s.config.max_failed)(s.study, trial)
    raise
  finally:
    optuna.logging.set_verbosity(verbosity)
  return record


def _optimize(s: _Search, objective_fn: Callable[[optuna.Trial], Sequence[float]], name: str,
              progress: bool = True) -> None:
  """Runs trials until the study has ``config.trials`` COMPLETE ones (counting every worker's):
  a worker starts a trial only while COMPLETE plus counted RUNNING trials are fewer, and
  otherwise waits for them. Before each trial the sampler is renewed (`_sampler`, seeded from
  the number of sampled trials so far) and dead workers' trials are failed and retried
  (`_fail_stale`). ``objective_fn(trial)`` returns the four objectives or raises; it finds the
  number its unlearning key comes from in ``trial.user_attrs["key_trial"]`` (a retry's is its
  original's). An exception or a non-finite value makes the trial FAIL with its reason in the
  user attribute ``fail_reason``; ``max_failed`` failures in a row raise `SearchError` naming
  ``name``."""
  config = s.config
  failed_in_row = 0
  bar = tqdm(total=config.trials, desc=f"search {name}", disable=not progress, leave=False)
  try:
    while True:
      _fail_stale(s)
      trials = s.study.get_trials(deepcopy=False)
      complete = _complete(trials)
      norms = [np.linalg.norm(t.user_attrs["objectives"]) for t in complete
               if "objectives" in t.user_attrs]
      bar.n = min(len(complete), config.trials)
      bar.set_postfix(best=f"{min(norms):.4f}" if norms else "-", refresh=True)
      if len(complete) >= config.trials:
        break
      if len(complete) + len(s.counted_running(trials)) >= config.trials:
        time.sleep(_WAIT_SECONDS)  # the other workers' trials finish the study (or die)
        continue
      s.study.sampler = _sampler(config, s.process, _draw(trials))
      record = _run_one(s, objective_fn)
      if record["surplus"]:
        continue
      if record["failed"] is None:
        failed_in_row = 0
        continue
      failed_in_row += 1
      if failed_in_row >= config.max_failed:
        raise SearchError(
            f"search of {name!r}: {failed_in_row} trials failed in a row (last: "
            f"{record['failed']}). Check the method's search space and inputs, or raise "
            f"config.search.max_failed")
  finally:
    bar.close()


def _selection(s: _Search) -> list[optuna.trial.FrozenTrial]:
  """The first ``config.trials`` COMPLETE trials by number, once no counted RUNNING trial could
  still enter them (so every worker selects from the same set)."""
  while True:
    _fail_stale(s)
    trials = s.study.get_trials(deepcopy=False)
    chosen = _complete(trials)[:s.config.trials]
    cutoff = chosen[-1].number if chosen else -1
    if not [t for t in s.counted_running(trials) if t.number < cutoff]:
      return chosen
    time.sleep(_WAIT_SECONDS)


def optimize(objective_fn: Callable[[optuna.Trial], Sequence[float]],
             config: ml_collections.ConfigDict, directory: Path, name: str, *, process: int = 0,
             fingerprint: dict | None = None,
             progress: bool = True) -> list[optuna.trial.FrozenTrial]:
  """The search machinery of `tune` for any objective: works on the study ``<study_prefix>
  <name>`` (journal ``<directory>/<name>.journal`` or ``config.storage``) until it has
  ``config.trials`` COMPLETE trials and returns the first ``config.trials`` of them by number.

  ``objective_fn(trial)`` suggests its parameters on ``trial`` and returns the four OBJECTIVES
  (told as they are with mode "nsga3", as their Euclidean norm with "tpe"), or raises (the
  trial FAILs with the reason in its user attribute ``fail_reason``). A reproducible objective
  takes its randomness from ``trial.user_attrs["key_trial"]`` (the trial's number, or for a
  retry of a dead worker's trial the original's), not from ``trial.number``. ``fingerprint``
  (JSON) is stored with the study; a stored study with another one is refused.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  s = _open(config, directory, name, process, fingerprint or {"name": name})
  _optimize(s, objective_fn, name, progress)
  return _selection(s)


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
  at once with the key of its trial number (a retried trial: its original's), and reports the four objectives averaged over the
  seeds (NSGA-III) or their Euclidean norm (TPE). Works until the study has ``config.trials``
  COMPLETE trials, then writes the best of the first ``config.trials`` and returns it. Under
  jax.distributed every process calls it: process 0 works on the study, each trial's stack is
  split over the processes (`_shared_objectives`), every process returns the result.
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
                 "epoch_budget": e_max, "sampler_seed": config.sampler_seed,
                 "tpe_startup_trials": config.tpe_startup_trials}
  retrained_accuracy = _retrained_accuracy(ctx, retrained)

  def run_trial(params: dict, key_trial: int) -> np.ndarray:
    key = _trial_key(config.sampler_seed, key_trial)
    if jax.process_count() == 1:
      return _trial_objectives(spec, [(ctx, retrained_accuracy)], params, key)
    return _shared_objectives(spec, ctx, retrained_accuracy, params, key)

  if jax.process_index():
    return _follow(run_trial)

  def objective_fn(trial: optuna.Trial) -> np.ndarray:
    params = spec.suggest(trial, e_max)
    distributed.agree({"params": params, "key_trial": trial.user_attrs["key_trial"]})
    per_model = run_trial(params, trial.user_attrs["key_trial"])
    trial.set_user_attr("objectives_per_model", per_model.tolist())
    return per_model.mean(0)

  try:
    s = _open(config, directory, spec.name, process, fingerprint)
    _optimize(s, objective_fn, spec.name, progress)
    chosen = _selection(s)
  except BaseException as e:
    distributed.agree({"error": f"process 0: {type(e).__name__}: {e}"})
    raise
  best = chosen[select_best([t.user_attrs["objectives"] for t in chosen])]
  accurate = most_accurate(chosen)
  trials = s.study.get_trials(deepcopy=False)
  failed = sum(t.state == optuna.trial.TrialState.FAIL for t in trials)
  result = SearchResult(spec.name, dict(best.params), tuple(best.user_attrs["objectives"]),
                        best.number, len(_complete(trials)), failed)
  _write_best(directory / f"{spec.name}.json", result,
              {"mode": config.mode, "trials": config.trials, "epoch_budget": e_max,
               "models": models, "objectives": list(OBJECTIVES),
               "best_per_model": best.user_attrs.get("objectives_per_model"),
               "most_accurate_trial": {
                   "number": accurate.number, "params": dict(accurate.params),
                   "values": list(accurate.user_attrs["objectives"]),
                   "per_model": accurate.user_attrs.get("objectives_per_model")}})
  distributed.agree({"result": result._asdict()})
  return result


# Over jax.distributed processes, process 0 alone works on the study; for each trial it sends
# the parameters, every process unlearns its share of the tuning stack, the objectives are
# gathered; at the end process 0 sends the result (or its error).

def _shared_objectives(spec: methods_lib.Method, ctx: methods_lib.Context,
                       retrained_accuracy: dict[str, np.ndarray], params: dict,
                       key: jax.Array) -> np.ndarray:
  """`_trial_objectives` of the stack split over the processes: [N, 4] on every process. A
  share that fails gives NaN rows (every process takes part in the gather); process 0 then
  raises `TrialFailed`."""
  share = distributed.own_share(ctx.num_models)
  accuracy = {k: v[share.start:share.stop] for k, v in retrained_accuracy.items()}
  error = None
  try:
    rows = _trial_objectives(spec, [(distributed.slice_context(ctx, share.start, share.stop),
                                     accuracy)], params, key)
  except Exception as e:  # noqa: BLE001  (this process's share fails the trial)
    error, rows = e, np.full((len(share), len(OBJECTIVES)), np.nan)
  if len(share) < ctx.num_models:
    rows = distributed.gather_models(rows, ctx.num_models)
  if error is not None:
    raise TrialFailed(f"{type(error).__name__}: {error}")
  if np.isnan(rows).any():
    raise TrialFailed("non-finite objectives, or a share failed on another jax.distributed "
                      "process")
  return rows


def _follow(run_trial: Callable[[dict, int], np.ndarray]) -> SearchResult:
  """A process other than 0: runs its share of every trial process 0 sends until process 0
  sends the result (returned) or its error (raised as `SearchError`)."""
  while True:
    message = distributed.agree(None)
    if "result" in message:
      result = message["result"]
      return SearchResult(**result | {"best_values": tuple(result["best_values"])})
    if "error" in message:
      raise SearchError(message["error"])
    try:
      run_trial(message["params"], message["key_trial"])
    except TrialFailed:
      pass  # process 0 fails the trial


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
  contexts = [ctx] if stacked else [distributed.slice_context(ctx, m, m + 1)
                                     for m in range(ctx.num_models)]
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
