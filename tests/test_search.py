"""Hyper-parameter search: objective10, epoch budget, selection, studies (resume, failures,
stale trials and their retries, the sampler's stream over resumes and extensions, several
workers) and stack-vs-seed parity of the trial objective."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import optuna
import pytest

from jaxmu import search

from jaxmu import methods as methods_lib
from jaxmu.attacks import mia

FT = methods_lib.get("finetune")


def _config(**overrides):
  config = search.default_config()
  config.update(dict(mode="tpe", trials=3, max_failed=3) | overrides)
  return config


def _method(name, unlearn_fn, space=None):
  """A one-compile fine-tuning variant (1 epoch, batch 256) or another ``unlearn_fn``."""
  return dataclasses.replace(
      FT, name=name, defaults=dict(FT.defaults) | {"num_epochs": 1},
      space=space or {"learning_rate": "learning_rate", "momentum": "momentum"},
      unlearn=unlearn_fn)


@pytest.fixture(scope="module")
def methods():
  """Test methods in the registry for this module: ``ft`` (cheap fine-tuning), ``nan`` (always
  diverges), ``stop`` (interrupted at its third run, then fine-tuning again)."""
  calls = {"stop": 0}

  def stop_at_third(ctx, hp, key):
    calls["stop"] += 1
    if calls["stop"] == 3:
      raise KeyboardInterrupt
    return FT.unlearn(ctx, hp, key)

  diverge = lambda ctx, hp, key: jax.tree.map(lambda x: x * np.nan, ctx.originals)
  table = {"search_ft": _method("search_ft", FT.unlearn),
           "search_nan": _method("search_nan", diverge),
           "search_stop": _method("search_stop", stop_at_third)}
  with pytest.MonkeyPatch.context() as mp:
    for name, method in table.items():
      mp.setitem(methods_lib.METHODS, name, method)
    yield table


@pytest.fixture(scope="module")
def retrained(tiny_ctx):
  """Stand-ins for the retrained models: the originals fine-tuned one epoch at a low rate."""
  return FT.run(tiny_ctx, {"num_epochs": 1, "learning_rate": 0.01}, jax.random.key(7)).states


@pytest.fixture(scope="module")
def short_study(tiny_ctx, retrained, methods, tmp_path_factory):
  directory = tmp_path_factory.mktemp("search")
  result = search.tune("search_ft", tiny_ctx, retrained, _config(), directory, progress=False)
  return directory, result


def _numpy_objectives(ctx, unlearned, retrained):
  """objective10 from float64 NumPy softmax of each model's own eval-mode logits."""
  images = np.asarray(ctx.data.inputs, np.float32) / 255.0
  inputs = (images - np.asarray(ctx.recipe.mean)) / np.asarray(ctx.recipe.std)
  labels = np.asarray(ctx.data.labels)
  apply = jax.jit(lambda variables: ctx.model.apply(variables, inputs, train=False))
  rows = []
  for m in range(ctx.num_models):
    def split_stats(variables, split):
      idx = ctx.index_sets(split)[m]
      idx = idx[idx >= 0]
      logits = np.asarray(apply(jax.tree.map(lambda x: x[m], variables)), np.float64)[idx]
      shifted = logits - logits.max(1, keepdims=True)
      log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
      return (logits.argmax(1) == labels[idx]).mean(), -log_p[np.arange(len(idx)), labels[idx]]
    u = {s: split_stats(unlearned, s) for s in ("retain", "forget", "val")}
    r = {s: split_stats(retrained, s) for s in ("retain", "forget", "val")}
    gaps = [abs(u[s][0] - r[s][0]) / 3 for s in ("retain", "forget", "val")]
    val_mia = mia.population_mia(u["forget"][1], u["val"][1])
    rows.append(gaps + [abs(val_mia - 0.5) / 0.5])
  return np.array(rows)


def test_objectives_equal_an_independent_numpy_computation(tiny_ctx):
  unlearned, retrained = tiny_ctx.originals, tiny_ctx.inits  # trained vs chance accuracy
  got = search.objectives(tiny_ctx, unlearned, retrained)
  want = _numpy_objectives(tiny_ctx, unlearned, retrained)
  assert got.shape == (2, 4) and want[:, 0].min() > 0.05  # the gaps are far from zero
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="retrained has 1 models, the context 2"):
    search.objectives(tiny_ctx, unlearned, jax.tree.map(lambda x: x[:1], retrained))


def test_epoch_budget_and_select_best():
  assert [search.epoch_budget(e) for e in (182, 50, 91, 3, 1)] == [37, 10, 19, 1, 1]
  assert search.epoch_budget(10, 0.5) == 5
  with pytest.raises(ValueError, match="train_epochs >= 1"):
    search.epoch_budget(0)
  # norms: 0.5, sqrt(0.17) ~ 0.412, 0.4 (the winner), 0.4 again (a later tie loses)
  table = [(0.3, 0.4, 0.0, 0.0), (0.1, 0.4, 0.0, 0.0), (0.0, 0.0, 0.4, 0.0), (0.0, 0.4, 0.0, 0.0)]
  assert search.select_best(table) == 2
  with pytest.raises(ValueError, match="finite"):
    search.select_best([(0.1, np.nan, 0.0, 0.0)])


def test_short_study_writes_the_best_and_resumes_without_new_trials(
    tiny_ctx, retrained, short_study, tmp_path):
  directory, result = short_study
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(directory / "search_ft.journal")))
  trials = optuna.load_study(study_name="search_ft", storage=storage).get_trials()
  assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
  norms = [np.linalg.norm(t.user_attrs["objectives"]) for t in trials]
  for t in trials:  # TPE minimises the norm of the mean objectives
    assert t.value == pytest.approx(np.linalg.norm(t.user_attrs["objectives"]))
  best = trials[int(np.argmin(norms))]
  assert result == search.load_best(directory, "search_ft")
  assert (result.best_trial, result.best_params, result.best_values) == (
      best.number, best.params, tuple(best.user_attrs["objectives"]))
  assert (result.trials_complete, result.trials_failed) == (3, 0)
  record = json.loads((directory / "search_ft.json").read_text())
  assert record["mode"] == "tpe"
  assert record["best_per_model"] == best.user_attrs["objectives_per_model"]
  accurate = trials[int(np.argmin([np.linalg.norm(t.user_attrs["objectives"][:3])
                                   for t in trials]))]
  assert record["most_accurate_trial"] == {
      "number": accurate.number, "params": accurate.params,
      "values": accurate.user_attrs["objectives"],
      "per_model": accurate.user_attrs["objectives_per_model"]}

  again = search.tune("search_ft", tiny_ctx, retrained, _config(), directory, progress=False)
  assert again == result
  fresh = search.tune("search_ft", tiny_ctx, retrained, _config(), tmp_path, progress=False)
  assert fresh == result  # same config and seeds, same trials and numbers
  assert len(optuna.load_study(study_name="search_ft", storage=storage).get_trials()) == 3
  with pytest.raises(search.SearchError, match="made by another search"):
    search.tune("search_ft", tiny_ctx, retrained, _config(epoch_fraction=1.0), directory,
                progress=False)
  assert search.load_best(directory, "finetune") is None
  with pytest.raises(ValueError, match="'ssd' has no search space"):
    search.tune("ssd", tiny_ctx, retrained, _config(), directory)


def test_trial_objective_is_the_mean_of_one_seed_contexts(tiny_ctx, retrained, short_study):
  directory, result = short_study
  method = methods_lib.get("search_ft")
  key = jax.random.fold_in(jax.random.key(0), result.best_trial)  # sampler_seed 0
  per_seed = []
  for m in range(2):
    one = lambda tree: jax.tree.map(lambda x: x[m:m + 1], tree)
    alone = dataclasses.replace(tiny_ctx, originals=one(tiny_ctx.originals),
                                retain=tiny_ctx.retain[m:m + 1], forget=tiny_ctx.forget[m:m + 1],
                                val=tiny_ctx.val[m:m + 1], model_ids=(m,))
    states = method.run(alone, result.best_params, key).states
    per_seed.append(search.objectives(alone, states, one(retrained))[0])
  np.testing.assert_allclose(result.best_values, np.mean(per_seed, 0), atol=1e-6)


def test_throughput_rows_of_the_stack_and_of_one_seed_at_a_time(tiny_ctx, retrained, methods):
  rows = [search.throughput("search_ft", tiny_ctx, retrained, trials=1, stacked=s)
          for s in (True, False)]
  for row, stacked in zip(rows, (True, False)):
    assert (row["stacked"], row["seeds"], row["trials"], row["epoch_budget"]) == (stacked, 2, 1, 1)
    assert row["trial_seeds_per_second"] == pytest.approx(2 / row["seconds"])
    assert row["trial_seeds_per_second_excl_compile"] >= row["trial_seeds_per_second"]
  np.testing.assert_allclose(rows[0]["mean_objectives"], rows[1]["mean_objectives"], atol=1e-6)


def _trials(directory, name):
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(Path(directory) / f"{name}.journal")))
  return optuna.load_study(study_name=name, storage=storage).get_trials()


def _same(trials, others):
  """The same parameters and values, in order (trial numbers may differ)."""
  return [(t.params, t.values) for t in trials] == [(t.params, t.values) for t in others]


def test_interrupted_study_retries_its_trial_and_equals_the_uninterrupted_one(
    tiny_ctx, retrained, methods, short_study, tmp_path):
  with pytest.raises(KeyboardInterrupt):  # the third trial is interrupted
    search.tune("search_stop", tiny_ctx, retrained, _config(), tmp_path, progress=False)
  assert not (tmp_path / "search_stop.json").exists()
  result = search.tune("search_stop", tiny_ctx, retrained, _config(), tmp_path, progress=False)
  trials = _trials(tmp_path, "search_stop")
  assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
  assert trials[2].user_attrs["fail_reason"] == "interrupted"
  # trial 3 retries trial 2: its parameters, its key; no worker attributes inherited
  assert search._retried(trials[3]) == 2 and trials[3].user_attrs["key_trial"] == 2
  assert trials[3].params == trials[2].params and "fail_reason" not in trials[3].user_attrs
  assert (result.trials_complete, result.trials_failed) == (3, 1)
  # search_stop is search_ft with an interrupt: the same points and values as the
  # uninterrupted study
  uninterrupted = _trials(short_study[0], "search_ft")
  assert _same([t for t in trials if t.state.name == "COMPLETE"], uninterrupted)
  assert (result.best_params, result.best_values) == (short_study[1].best_params,
                                                      short_study[1].best_values)


def test_diverging_method_fails_with_reasons_and_stops_after_max_failed(
    tiny_ctx, retrained, methods, tmp_path):
  with pytest.raises(search.SearchError, match="'search_nan': 3 trials failed in a row"):
    search.tune("search_nan", tiny_ctx, retrained, _config(), tmp_path, progress=False)
  trials = _trials(tmp_path, "search_nan")
  assert [t.state.name for t in trials] == ["FAIL"] * 3
  for t in trials:
    assert "non-finite weights after unlearning (models [0, 1])" in t.user_attrs["fail_reason"]
  assert search.load_best(tmp_path, "search_nan") is None


def _stub_config(mode="tpe", trials=3, **overrides):
  return _config(mode=mode, trials=trials, population_size=4, **overrides)


def _journal_study(path, mode="tpe", process=0, trials=3):
  return search._open(_stub_config(mode, trials), Path(path), "stub", process, {"name": "stub"})


def _stub(trial):
  x = trial.suggest_float("x", 0.0, 1.0)
  y = trial.suggest_float("y", 0.0, 1.0)
  return (x, 1 - x, x * y, 0.5)


@pytest.mark.parametrize("mode", search.MODES)
def test_extended_study_continues_the_sampler_stream(mode, tmp_path):
  """2 trials, then 14 on the same study: the new ones are new points (before the fix, trials
  2 and 3 replayed 0 and 1), and the study equals one run to 14 at once (TPE past its 10 random
  startup trials, NSGA-III past generation 0 of 4)."""
  at_once = search.optimize(_stub, _stub_config(mode, 14), tmp_path / "a", "stub", progress=False)
  first = search.optimize(_stub, _stub_config(mode, 2), tmp_path / "b", "stub", progress=False)
  extended = search.optimize(_stub, _stub_config(mode, 14), tmp_path / "b", "stub",
                             progress=False)
  assert _same(extended[:2], first) and _same(extended, at_once)
  points = [tuple(t.params.values()) for t in extended]
  assert len(set(points[:4])) == 4  # random: TPE's startup, NSGA-III's first generation
  assert mode == "nsga3" or len(set(points)) == 14  # (NSGA-III children may copy a parent)
  generations = {t.system_attrs.get("NSGAIIISampler:generation") for t in extended}
  assert mode == "tpe" or generations == {0, 1, 2, 3}


_KILLED_WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import test_search
    from jaxmu import search
    def objective(trial):
      if trial.number == {kill_at}:
        test_search._stub(trial)  # mid-trial: parameters drawn, no result
        os.kill(os.getpid(), signal.SIGKILL)
      return test_search._stub(trial)
    search.optimize(objective, test_search._stub_config({mode!r}, {trials}), {path!r}, "stub",
                    progress=False)
""")


def _killed_worker(path, mode, kill_at, trials):
  """A worker process that SIGKILLs itself inside trial ``kill_at``."""
  script = _KILLED_WORKER.format(root=str(Path(__file__).resolve().parents[1]),
                                 tests=str(Path(__file__).parent), path=str(path), mode=mode,
                                 kill_at=kill_at, trials=trials)
  return subprocess.Popen([sys.executable, "-c", script])


@pytest.mark.e2e
@pytest.mark.parametrize("mode", search.MODES)
def test_killed_and_resumed_study_equals_the_uninterrupted_one(mode, tmp_path):
  """One worker killed (SIGKILL) inside trial 6, resumed to 12: the dead worker's trial is FAIL
  (pid check) and retried with its parameters; the COMPLETE trials equal an uninterrupted run."""
  killed = _killed_worker(tmp_path / "killed", mode, kill_at=6, trials=12)
  uninterrupted = search.optimize(_stub, _stub_config(mode, 12), tmp_path / "a", "stub",
                                  progress=False)
  assert killed.wait(timeout=120) == -signal.SIGKILL
  trials = _trials(tmp_path / "killed", "stub")
  assert [t.state.name for t in trials] == ["COMPLETE"] * 6 + ["RUNNING"]
  resumed = search.optimize(_stub, _stub_config(mode, 12), tmp_path / "killed", "stub",
                            progress=False)
  trials = _trials(tmp_path / "killed", "stub")
  assert trials[6].state.name == "FAIL"
  assert trials[6].user_attrs["fail_reason"] == (
      f"worker {search._HOST}:{killed.pid} died while running it")
  assert search._retried(trials[7]) == 6 and trials[7].params == trials[6].params
  assert [t.number for t in resumed] == [0, 1, 2, 3, 4, 5] + list(range(7, 13))
  assert _same(resumed, uninterrupted)


def test_stale_running_trial_of_a_dead_worker_becomes_fail_and_is_retried(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  s = _journal_study(tmp_path)
  for host, pid in ((search._HOST, dead.pid), (search._HOST, os.getppid()),
                    ("elsewhere", dead.pid)):
    trial = s.study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("host", host)
    trial.set_user_attr("pid", pid)
  assert search._fail_stale(s) == [0] and search._fail_stale(s) == []
  trials = s.study.get_trials()
  assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "RUNNING", "WAITING"]
  reason = f"worker {search._HOST}:{dead.pid} died while running it"
  assert trials[0].user_attrs["fail_reason"] == reason
  assert trials[3].params == trials[0].params and trials[3].user_attrs == {}
  # the live worker's trial counts (the study waits for it); the other host's cannot be checked
  assert [t.number for t in s.counted_running(trials)] == [1]
  s.study.tell(1, 0.5)  # the live worker finishes
  search._optimize(s, _stub, name="stub", progress=False)
  trials = s.study.get_trials()
  assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "RUNNING", "COMPLETE", "COMPLETE"]
  assert trials[3].params["x"] == trials[0].params["x"]
  assert trials[3].user_attrs["key_trial"] == 0


def test_a_trial_asked_when_the_study_is_full_is_a_surplus_fail(tmp_path):
  s = _journal_study(tmp_path, trials=2)
  s.study.enqueue_trial({"x": 0.5, "y": 0.5})
  search._run_one(s, _stub)  # trial 0 COMPLETE
  trial = s.study.ask()  # trial 1: a live worker of this host runs it
  trial.set_user_attr("host", search._HOST)
  trial.set_user_attr("pid", os.getppid())
  record = search._run_one(s, lambda trial: pytest.fail("a surplus trial runs nothing"))
  assert record == {"number": 2, "surplus": True, "failed": (
      "surplus: 2 trials of lower numbers were complete or running when it started")}
  assert s.study.get_trials()[2].state.name == "FAIL"


def test_nsga3_study_tells_the_four_objectives_and_fails_non_finite_ones(tmp_path):
  s = _journal_study(tmp_path, mode="nsga3")
  search._optimize(s, _stub, name="stub", progress=False)
  for t in s.study.get_trials():
    assert t.values == list(_stub(optuna.trial.FixedTrial(t.params)))
  assert s.study.metric_names == list(search.OBJECTIVES)
  s.config.update(trials=4, max_failed=2)
  with pytest.raises(search.SearchError, match="'stub': 2 trials failed in a row"):
    search._optimize(s, lambda trial: (0.0, np.inf, 0.0, 0.0), name="stub", progress=False)
  assert s.study.get_trials()[-1].user_attrs["fail_reason"] == (
      "TrialFailed: non-finite objectives [0.0, inf, 0.0, 0.0]")


_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path[:0] = [{root!r}, {tests!r}]
    import test_search
    from jaxmu import search
    s = test_search._journal_study({path!r}, process=1, trials=8)
    Path({path!r}, "ready").touch()
    search._optimize(s, test_search._slow_stub, name="stub", progress=False)
""")


def _slow_stub(trial):
  """The stub once both workers have a trial (up to 60 s), so that both take part."""
  deadline = time.monotonic() + 60
  while (len({t.user_attrs.get("pid") for t in trial.study.get_trials(deepcopy=False)} - {None})
         < 2 and time.monotonic() < deadline):
    time.sleep(0.02)
  time.sleep(0.02)
  return _stub(trial)


def test_two_workers_share_one_journal(tmp_path):
  """This process and a second one (started first; it signals when its imports are done)."""
  root = str(Path(__file__).resolve().parents[1])
  script = _WORKER.format(root=root, tests=str(Path(__file__).parent), path=str(tmp_path))
  other = subprocess.Popen([sys.executable, "-c", script])
  deadline = time.monotonic() + 120
  while not (tmp_path / "ready").exists() and other.poll() is None:
    assert time.monotonic() < deadline, "the second worker did not start"
    time.sleep(0.05)
  s = _journal_study(tmp_path, process=0, trials=8)
  search._optimize(s, _slow_stub, name="stub", progress=False)
  assert other.wait(timeout=120) == 0
  trials = s.study.get_trials()
  complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  assert len(complete) == 8  # exactly: a worker starts no trial the others' would make surplus
  assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in trials
             if t.state != optuna.trial.TrialState.COMPLETE)
  assert sorted(t.number for t in trials) == list(range(len(trials)))
  assert {t.user_attrs["pid"] for t in trials} == {os.getpid(), other.pid}


def test_tpe_startup_trials_reach_the_sampler():
  """config.search.tpe_startup_trials: the random trials before TPE proposes (default: Optuna's
  10)."""
  assert search.default_config().tpe_startup_trials == 10
  for n in (0, 4):
    sampler = search._sampler(_stub_config("tpe", tpe_startup_trials=n), process=0)
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == n
