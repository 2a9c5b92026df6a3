"""Tests of jaxmu.stages: hashing, skip/rerun reasons, atomic writes, locking across processes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from jaxmu import stages, validate

REPO = Path(__file__).resolve().parents[1]


def _run(wd, name, config, deps=(), log=None, value="x"):
  """Runs a stage writing ``<name>.txt``; returns its reason (None when skipped)."""
  with wd.stage(name, config=config, deps=deps, outputs=(f"{name}.txt",)) as st:
    if not st.done:
      (st.tmp / f"{name}.txt").write_text(value)
      st.commit()
      if log is not None:
        log.append(name)
    return st.reason


def test_config_hash_is_canonical():
  cfg = ml_collections.ConfigDict({"b": (1, 2), "a": {"lr": 0.1, "seeds": (0, 1)}})
  same = {"a": {"seeds": [np.int64(0), 1], "lr": np.float64(0.1)}, "b": [1, 2]}
  assert stages.config_hash(cfg) == stages.config_hash(same)
  assert stages.config_hash(ml_collections.FrozenConfigDict(cfg)) == stages.config_hash(cfg)
  assert stages.config_hash({"a": 1}) != stages.config_hash({"a": 2})
  assert stages.config_hash({"a": 1}) != stages.config_hash({"b": 1})
  with pytest.raises(TypeError, match="cannot convert"):
    stages.config_hash({"a": object()})


def test_rerun_is_skipped_and_manifest_recorded(tmp_path):
  wd, log = stages.Workdir(tmp_path), []
  assert _run(wd, "splits", {"n": 10}, log=log) == "new"
  assert _run(wd, "splits", {"n": 10}, log=log) is None
  assert log == ["splits"]
  assert (tmp_path / "splits.txt").read_text() == "x"
  manifest = json.loads((tmp_path / "stages" / "splits.json").read_text())
  assert manifest["outputs"] == ["splits.txt"] and manifest["reason"] == "new"
  assert manifest["hash"] == wd.stage_hash("splits") and manifest["finished"]
  assert not list((tmp_path / ".tmp").iterdir())  # temp dirs are cleaned up


def test_changed_config_reruns(tmp_path):
  wd, log = stages.Workdir(tmp_path), []
  _run(wd, "splits", {"n": 10})
  assert _run(wd, "splits", {"n": 11}, log=log, value="y") == "config changed"
  assert log == ["splits"] and (tmp_path / "splits.txt").read_text() == "y"


def test_changed_dep_reruns_dependents(tmp_path):
  wd, log = stages.Workdir(tmp_path), []
  _run(wd, "splits", {"n": 10})
  _run(wd, "train", {"lr": 0.1}, deps=("splits",))
  # The dep recomputed with the same hash (its output was lost): dependents stay valid.
  (tmp_path / "splits.txt").unlink()
  assert _run(wd, "splits", {"n": 10}) == "outputs missing"
  assert _run(wd, "train", {"lr": 0.1}, deps=("splits",), log=log) is None
  # The dep recomputed with another hash: dependents rerun and say why.
  _run(wd, "splits", {"n": 12})
  assert _run(wd, "train", {"lr": 0.1}, deps=("splits",), log=log) == "input 'splits' changed"
  assert _run(wd, "train", {"lr": 0.1}, deps=("splits",), log=log) is None
  assert log == ["train"]
  assert _run(wd, "train", {"lr": 0.1}, deps=()) == "inputs changed"  # a dep was dropped


def test_dep_that_never_ran_is_an_error(tmp_path):
  wd = stages.Workdir(tmp_path)
  with pytest.raises(RuntimeError, match="'splits' has not finished"):
    _run(wd, "train", {}, deps=("splits",))


def test_missing_outputs_rerun(tmp_path):
  wd = stages.Workdir(tmp_path)
  _run(wd, "splits", {"n": 10})
  (tmp_path / "splits.txt").unlink()
  assert _run(wd, "splits", {"n": 10}) == "outputs missing"
  assert (tmp_path / "splits.txt").exists()


def test_failing_body_leaves_no_outputs_and_reruns(tmp_path):
  wd = stages.Workdir(tmp_path)
  with pytest.raises(ZeroDivisionError):
    with wd.stage("s", config={}, outputs=("out.txt",)) as st:
      (st.tmp / "out.txt").write_text("partial")
      1 / 0
  assert not (tmp_path / "out.txt").exists() and wd.manifest("s") is None
  assert not list((tmp_path / ".tmp").iterdir())
  assert _run(wd, "s", {}) == "new"


def test_a_killed_stage_s_temp_dir_is_removed_when_the_stage_reopens(tmp_path):
  wd = stages.Workdir(tmp_path)
  with wd.stage("report", config={}, outputs=("report.txt",)) as st:
    killed_tmp = st.tmp
    st._tmp = None  # as if the process died here: its temp dir is never cleaned up
    (killed_tmp / "results.csv").write_text("partial")
    (st.tmp / "report.txt").write_text("x")
    st.commit()
  other = tmp_path / ".tmp" / "report_plots.tmp-abcd1234"  # another stage's name, kept
  other.mkdir()
  assert killed_tmp.exists()
  _run(wd, "report", {"changed": 1})
  assert sorted(p.name for p in (tmp_path / ".tmp").iterdir()) == [other.name]


def test_body_must_commit(tmp_path):
  wd = stages.Workdir(tmp_path)
  with pytest.raises(RuntimeError, match="did not commit"):
    with wd.stage("s", config={}, outputs=("out.txt",)):
      pass
  with pytest.raises(FileNotFoundError, match="without outputs"):
    with wd.stage("s", config={}, outputs=("out.txt",)) as st:
      st.commit()


def test_directory_outputs_are_published_and_replaced(tmp_path):
  wd = stages.Workdir(tmp_path)
  for n, reason in [(1, "new"), (2, "config changed")]:
    with wd.stage("train", config={"n": n}, outputs=("models/original",)) as st:
      assert st.reason == reason
      (st.tmp / "models/original").mkdir(parents=True)
      for i in range(n):
        (st.tmp / "models/original" / f"f{i}").write_text(str(n))
      st.commit()
  assert sorted(os.listdir(tmp_path / "models")) == ["original"]  # old version gone
  assert sorted(os.listdir(tmp_path / "models/original")) == ["f0", "f1"]


def test_atomic_write_leaves_no_partial_file(tmp_path):
  target = tmp_path / "results.csv"
  with stages.atomic_write(target, "w") as f:
    f.write("old\n")
  with pytest.raises(RuntimeError):
    with stages.atomic_write(target, "w") as f:
      f.write("half a new ")
      raise RuntimeError("writer died")
  assert target.read_text() == "old\n"
  assert os.listdir(tmp_path) == ["results.csv"]
  with pytest.raises(RuntimeError):
    with stages.atomic_write(tmp_path / "new.bin") as f:
      f.write(b"partial")
      raise RuntimeError("writer died")
  assert os.listdir(tmp_path) == ["results.csv"]


_WORKER = textwrap.dedent("""
    import sys, time
    from jaxmu import stages
    workdir, counter = sys.argv[1], sys.argv[2]
    wd = stages.Workdir(workdir)
    with wd.stage("slow", config={"n": 1}, outputs=("out.txt",)) as st:
        if not st.done:
            with open(counter, "a") as f:
                f.write("computed\\n")
            time.sleep(1.0)  # long enough that the other process arrives meanwhile
            (st.tmp / "out.txt").write_text("done")
            st.commit()
""")


def test_two_processes_do_a_stage_once(tmp_path):
  counter = tmp_path / "counter.txt"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "wd"), str(counter)],
                            env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
  assert counter.read_text() == "computed\n"
  assert (tmp_path / "wd" / "out.txt").read_text() == "done"


def test_write_config_and_append_metrics(tmp_path):
  wd = stages.Workdir(tmp_path / "run")
  cfg = ml_collections.ConfigDict({"train": {"epochs": 3, "lr": 0.1}, "seeds": (0, 1)})
  wd.write_config(cfg)
  assert json.loads(wd.path("config.json").read_text()) == {
      "seeds": [0, 1], "train": {"epochs": 3, "lr": 0.1}}
  wd.append_metrics({"epoch": np.int32(1), "loss": np.float32(0.5), "acc": np.array(0.25)})
  wd.append_metrics({"stage": "t", "epoch": 2, "model": np.array([4, 5]), "loss": np.arange(2)})
  wd.append_metrics({"stage": "t", "epoch": 3, "models": ["a", "b"], "loss": np.arange(2)})
  lines = wd.path("metrics.jsonl").read_text().splitlines()
  assert [json.loads(x) for x in lines] == [  # one row per model and epoch
      {"epoch": 1, "loss": 0.5, "acc": 0.25},
      {"stage": "t", "epoch": 2, "model": 4, "loss": 0}, {"stage": "t", "epoch": 2, "model": 5, "loss": 1},
      {"stage": "t", "epoch": 3, "model": "a", "loss": 0}, {"stage": "t", "epoch": 3, "model": "b", "loss": 1}]


def test_metrics_of_a_resumed_fit_are_logged_once(tmp_path):
  """A fit killed after epoch 3 with its last checkpoint at epoch 2 resumes at epoch 3: the
  rows of epoch 3 (and a line cut short by the kill) are replaced, not repeated."""
  first = stages.Workdir(tmp_path)
  for epoch in (1, 2, 3):
    first.append_metrics({"stage": "train", "epoch": epoch, "model": np.array([0, 1]),
                          "loss": np.full(2, epoch * 10.0)})
  first.append_metrics({"stage": "other", "epoch": 1, "loss": 1.0})
  with open(first.path("metrics.jsonl"), "a") as f:
    f.write('{"stage": "train", "ep')  # killed mid-line
  resumed = stages.Workdir(tmp_path)
  for epoch in (3, 4):
    resumed.append_metrics({"stage": "train", "epoch": epoch, "model": np.array([0, 1]),
                            "loss": np.full(2, epoch * 1.0)})
  rows = [json.loads(x) for x in resumed.path("metrics.jsonl").read_text().splitlines()]
  train = [(r["epoch"], r["model"], r["loss"]) for r in rows if r.get("stage") == "train"]
  assert train == [(1, 0, 10.0), (1, 1, 10.0), (2, 0, 20.0), (2, 1, 20.0), (3, 0, 3.0),
                   (3, 1, 3.0), (4, 0, 4.0), (4, 1, 4.0)]
  assert [r for r in rows if r.get("stage") == "other"] == [{"stage": "other", "epoch": 1,
                                                             "loss": 1.0}]


def test_a_workdir_refuses_another_pipeline_and_allows_nesting(tmp_path):
  wd = stages.Workdir(tmp_path / "run")
  wd.write_config({"search": {}, "methods": ["finetune"], "ulira": {}})
  assert wd.owner() == "deepunlearn"
  before = wd.path("config.json").read_text()
  with pytest.raises(validate.WorkdirError, match="holds a run of deepunlearn") as error:
    stages.Workdir(tmp_path / "run").write_config({"num_shadows": 2})
  assert "--workdir=" in str(error.value) and wd.path("config.json").read_text() == before
  stages.Workdir(tmp_path / "run").write_config({"search": {}, "methods": ["ct"]})  # same: fine
  stages.Workdir(tmp_path / "run" / "iam").write_config({"num_shadows": 2})  # nested: fine
  stages.Workdir(tmp_path / "run" / "ulira").write_config({"ulira": {}})  # its U-LiRA stage
  legacy = tmp_path / "old"  # written before owner.json: the owner is read off config.json
  legacy.mkdir()
  (legacy / "config.json").write_text(json.dumps({"num_shadows": 4}))
  with pytest.raises(validate.WorkdirError, match="holds a run of iam"):
    stages.Workdir(legacy).write_config({"ulira": {}})


def test_run_stages_stops_after_the_named_stage_and_records_why_each_ran(tmp_path):
  wd = stages.Workdir(tmp_path)
  called = []

  def make(name):
    def stage():
      called.append(name)
      with wd.stage(name, outputs=(f"{name}.txt",)) as st:
        if not st.done:
          (st.tmp / f"{name}.txt").write_text(name)
          st.commit()
      return wd.path(f"{name}.txt")
    stage.__name__ = name
    return stage

  pipeline = [make("first"), make("second"), make("third")]
  assert stages.run_stages(pipeline, "second") == tmp_path / "second.txt"
  assert called == ["first", "second"] and not (tmp_path / "third.txt").exists()
  assert wd.ran == {"first": "new", "second": "new"}
  assert stages.run_stages(pipeline) == tmp_path / "third.txt"
  assert called == ["first", "second", "first", "second", "third"]
  assert wd.ran == {"first": "reused", "second": "reused", "third": "new"}
  with pytest.raises(ValueError, match=r"stop_after='fourth' is not a stage; stages: \('first'"):
    stages.run_stages(pipeline, "fourth")
  assert len(called) == 5  # nothing ran
