"""Search studies on their storages: a journal file and a real PostgreSQL server (Optuna's RDB
storage with heartbeats), opened by optuna-dashboard and `study.trials_dataframe()`; several
worker processes on one study (exact trial count, no duplicate numbers, no lost results) and a
worker killed mid-trial (failed by the heartbeat or the journal's pid check, then retried).

PostgreSQL: the URL comes from JAXMU_TEST_POSTGRES_URL, which `.ci/postgres.sh COMMAND` sets
(it starts a throwaway server; `.ci/run` runs the test tiers through it). Without it the
PostgreSQL tests skip, except under CI (the CI variable set), where they fail.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import wsgiref.util
from pathlib import Path

import optuna
import pytest

from jaxmu import search

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ENV = "JAXMU_TEST_POSTGRES_URL"


@pytest.fixture(scope="module")
def postgres_url():
  url = os.environ.get(POSTGRES_ENV)
  if not url:
    message = (f"{POSTGRES_ENV} is not set: no PostgreSQL server to test against. Run the tests "
               f"through .ci/postgres.sh (e.g. `.ci/postgres.sh make test-e2e`), which starts "
               f"a throwaway server and sets it")
    if os.environ.get("CI"):
      pytest.fail(f"CI is set but {message}")
    pytest.skip(message)
  optuna.storages.RDBStorage(url)  # the tables, once, before several workers connect
  return url


def _config(storage="", trials=3, mode="tpe", **overrides):
  """A stub study's config; on a database a study prefix of its own (the server is shared)."""
  config = search.default_config()
  config.update(dict(mode=mode, trials=trials, max_failed=3, population_size=4, storage=storage,
                     study_prefix=f"{uuid.uuid4().hex[:8]}-" if storage else "") | overrides)
  return config


def stub(trial):
  """Four objectives from two parameters; ``STUB_SLEEP`` seconds of "work" (default 0)."""
  x = trial.suggest_float("x", 0.0, 1.0)
  y = trial.suggest_float("y", 0.0, 1.0)
  time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
  return (x, 1 - x, x * y, 0.5)


def _load(config, directory):
  storage = config.storage or optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(Path(directory) / "stub.journal")))
  return optuna.load_study(study_name=f"{config.study_prefix}stub", storage=storage)


def _get(app, path):
  """GET ``path`` from a WSGI app, in process: (status, JSON body)."""
  environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
  wsgiref.util.setup_testing_defaults(environ)
  status = []
  body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
  return status[0], json.loads(body)


def _check_dashboard_and_dataframe(config, directory, trials):
  """optuna-dashboard's app on the storage URL or journal path (as `optuna-dashboard <storage>`
  opens it) lists the study with its trials and objective names; trials_dataframe has them."""
  import optuna_dashboard  # the `search` extra

  target = config.storage or str(Path(directory) / "stub.journal")
  app = optuna_dashboard.wsgi(target)
  status, body = _get(app, "/api/studies")
  assert status.startswith("200")
  [summary] = [s for s in body["study_summaries"]
               if s["study_name"] == f"{config.study_prefix}stub"]
  status, detail = _get(app, f"/api/studies/{summary['study_id']}")
  assert status.startswith("200")
  assert len(detail["trials"]) == trials
  names = list(search.OBJECTIVES) if config.mode == "nsga3" else ["objective_norm"]
  assert detail["objective_names"] == names
  frame = _load(config, directory).trials_dataframe()
  assert len(frame) == trials and list(frame["state"]) == ["COMPLETE"] * trials
  values = [f"values_{n}" for n in names] if len(names) > 1 else ["value_objective_norm"]
  assert set(values) | {"params_x", "params_y", "user_attrs_objectives",
                                           "user_attrs_key_trial"} <= set(frame.columns)


@pytest.mark.parametrize("mode", search.MODES)
def test_dashboard_and_dataframe_load_a_journal_study(mode, tmp_path):
  config = _config(mode=mode)
  search.optimize(stub, config, tmp_path, "stub", progress=False)
  _check_dashboard_and_dataframe(config, tmp_path, 3)


def test_postgres_study_runs_resumes_and_loads_in_the_dashboard(postgres_url, tmp_path):
  config = _config(postgres_url, mode="nsga3", heartbeat_interval=1)
  first = search.optimize(stub, config, tmp_path, "stub", progress=False)
  config.trials = 5  # extended: the sampler's stream goes on
  extended = search.optimize(stub, config, tmp_path, "stub", progress=False)
  assert [t.params for t in extended[:3]] == [t.params for t in first]
  assert not list(tmp_path.iterdir())  # no journal file: the study is in the database
  # the same search on a journal file at once: the same points and values
  journal = search.optimize(stub, _config(mode="nsga3", trials=5), tmp_path / "j", "stub",
                            progress=False)
  assert [(t.params, t.values) for t in extended] == [(t.params, t.values) for t in journal]
  _check_dashboard_and_dataframe(config, tmp_path, 5)


def test_rdb_storage_has_heartbeats_and_retries_stale_trials(tmp_path):
  config = _config(f"sqlite:///{tmp_path}/db.sqlite3", heartbeat_interval=7, grace_period=30)
  storage = search._storage(config, tmp_path, "stub")
  assert isinstance(storage, optuna.storages.RDBStorage)
  assert storage.get_heartbeat_interval() == 7 and storage.grace_period == 30
  assert isinstance(storage.get_heartbeat_stale_trial_callback(), search._Retry)
  assert isinstance(search._storage(_config(), tmp_path, "stub"), optuna.storages.JournalStorage)
  for bad in ({"heartbeat_interval": 0}, {"grace_period": -1}):
    with pytest.raises(ValueError, match="heartbeat_interval must be an integer >= 1"):
      search._storage(_config(f"sqlite:///{tmp_path}/db.sqlite3", **bad), tmp_path, "stub")


def test_rdb_trial_without_heartbeat_is_failed_and_retried(tmp_path):
  """One process on SQLite: a trial whose heartbeat stopped (recorded once, then silence past
  the grace period) is FAIL and retried by Optuna's callback; a RUNNING trial that never had a
  heartbeat (an older jaxmu's) neither blocks the study nor is failed."""
  config = _config(f"sqlite:///{tmp_path}/db.sqlite3", heartbeat_interval=1, grace_period=1)
  s = search._open(config, tmp_path, "stub", 0, {"name": "stub"})
  with pytest.warns(UserWarning, match="Heartbeat"):  # asked outside Study.optimize
    old, dead = s.study.ask(), s.study.ask()
  for trial in (old, dead):
    stub(trial)
  dead.set_user_attr("heartbeat", True)
  study_id = s.storage.get_study_id_from_name(s.study.study_name)
  s.storage.record_heartbeat(s.storage.get_trial_id_from_study_id_trial_number(study_id, 1))
  assert [t.number for t in s.counted_running(s.study.get_trials())] == [1]
  time.sleep(2.5)
  search._fail_stale(s)
  trials = s.study.get_trials()
  assert [t.state.name for t in trials] == ["RUNNING", "FAIL", "WAITING"]
  assert search._retried(trials[2]) == 1 and trials[2].params == trials[1].params
  assert "heartbeat" not in trials[2].user_attrs
  chosen = search._optimize(s, stub, "stub", progress=False) or search._selection(s)
  assert [t.number for t in chosen] == [2, 3, 4]
  assert chosen[0].params == trials[1].params and chosen[0].user_attrs["key_trial"] == 1
  assert s.study.get_trials()[0].state.name == "RUNNING"


def test_postgresql_urls_get_the_psycopg2_driver_of_the_search_extra():
  assert search._rdb_url("postgresql://u:p@h:5/db") == "postgresql+psycopg2://u:p@h:5/db"
  assert search._rdb_url("postgres://h/db") == "postgresql+psycopg2://h/db"
  for url in ("postgresql+psycopg2://h/db", "mysql+pymysql://h/db", "sqlite:///x.db"):
    assert search._rdb_url(url) == url


def test_search_uses_no_private_optuna_attribute():
  source = Path(search.__file__).read_text()
  assert not re.findall(r"\b(?:study|trial|storage|t|s\.study|s\.storage)\._[a-z]", source)
  assert not re.findall(r"optuna(?:\.\w+)*\._", source)


# --------------------------------------------------------------------------------------------
# Several worker processes (make test-e2e)
# --------------------------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    sys.path[:0] = [{root!r}, {tests!r}]
    import test_search_storage as t
    from jaxmu import search
    config = t._config(**json.loads(sys.argv[1]))
    directory, process, workers = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def objective(trial):
      if os.environ.get("VICTIM"):  # hang in its first trial (parameters drawn) until killed
        params = (trial.suggest_float("x", 0.0, 1.0), trial.suggest_float("y", 0.0, 1.0))
        (directory / f"victim-{{trial.number}}").touch()
        time.sleep(600)
      return t.stub(trial)

    # all workers start together (imports take seconds on a loaded machine)
    (directory / f"ready-{{process}}").touch()
    deadline = time.monotonic() + 180
    while len(list(directory.glob("ready-*"))) < workers and time.monotonic() < deadline:
      time.sleep(0.02)
    chosen = search.optimize(objective, config, directory, "stub", process=process,
                             progress=False)
    (directory / f"chosen-{{process}}.json").write_text(json.dumps([c.number for c in chosen]))
""")


def _workers(config, directory, n, victim=None, sleep=0.25):
  """``n`` worker processes on the stub study (process indices 0..n-1), started together once
  all have imported; ``victim``'s hangs in its first trial."""
  script = _WORKER.format(root=str(ROOT), tests=str(Path(__file__).parent))
  settings = json.dumps({k: config[k] for k in ("storage", "trials", "mode", "study_prefix",
                                                "heartbeat_interval", "grace_period")})
  return [subprocess.Popen(
      [sys.executable, "-c", script, settings, str(directory), str(i), str(n)],
      env=dict(os.environ, STUB_SLEEP=str(sleep), **({"VICTIM": "1"} if i == victim else {})))
      for i in range(n)]


@pytest.fixture(params=["journal", "postgres"])
def worker_config(request):
  """12 trials on a journal file, or on PostgreSQL with a 1 s heartbeat and 2 s grace."""
  if request.param == "postgres":
    return _config(request.getfixturevalue("postgres_url"), trials=12, heartbeat_interval=1,
                   grace_period=2)
  return _config(trials=12)


def _check_study(config, directory, trials, chosen_by):
  """Exactly ``trials`` COMPLETE trials with their own stub values, numbers 0..n-1 once each,
  every other trial a FAIL; the workers ``chosen_by`` chose the same first ``trials``."""
  study_trials = _load(config, directory).get_trials()
  complete = [t for t in study_trials if t.state.name == "COMPLETE"]
  assert len(complete) == trials
  assert [t.number for t in study_trials] == list(range(len(study_trials)))
  for t in complete:  # no lost or mixed-up results
    assert t.user_attrs["objectives"] == list(stub(optuna.trial.FixedTrial(t.params)))
  assert {t.state.name for t in study_trials} <= {"COMPLETE", "FAIL"}
  numbers = [t.number for t in complete]
  for i in chosen_by:
    assert json.loads((directory / f"chosen-{i}.json").read_text()) == numbers
  return study_trials


@pytest.mark.e2e
def test_three_workers_share_one_study(worker_config, tmp_path):
  workers = _workers(worker_config, tmp_path, 3)
  assert [w.wait(timeout=240) for w in workers] == [0, 0, 0]
  trials = _check_study(worker_config, tmp_path, 12, range(3))
  surplus = [t for t in trials if t.state.name == "FAIL"]
  assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in surplus)
  assert {t.user_attrs["pid"] for t in trials} == {w.pid for w in workers}


@pytest.mark.e2e
def test_worker_killed_mid_trial_is_failed_and_retried(worker_config, tmp_path):
  workers = _workers(worker_config, tmp_path, 3, victim=2)
  victim = workers[2]
  deadline = time.monotonic() + 120
  while not (marks := list(tmp_path.glob("victim-*"))):
    assert time.monotonic() < deadline and victim.poll() is None, "the victim did not start"
    time.sleep(0.05)
  time.sleep(0.5)  # the others at work meanwhile
  victim.send_signal(signal.SIGKILL)
  assert victim.wait(timeout=30) == -signal.SIGKILL  # reaped: its pid is gone
  killed = int(marks[0].name.split("-")[1])
  assert [w.wait(timeout=240) for w in workers[:2]] == [0, 0]
  trials = _check_study(worker_config, tmp_path, 12, range(2))
  assert trials[killed].state.name == "FAIL"
  if not worker_config.storage:  # the journal's pid check records why
    assert trials[killed].user_attrs["fail_reason"] == (
        f"worker {search._HOST}:{victim.pid} died while running it")
  [retry] = [t for t in trials if search._retried(t) == killed]
  assert retry.state.name == "COMPLETE" and retry.params == trials[killed].params
  assert retry.user_attrs["key_trial"] == killed
  assert retry.user_attrs["pid"] in {w.pid for w in workers[:2]}
  others = [t for t in trials if t.state.name == "FAIL" and t.number != killed]
  assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in others)
