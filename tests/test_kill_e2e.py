"""Faults survived: each pipeline (tiny DeepUnlearn, IAM, U-LiRA) SIGKILLed at a point drawn at
random, then rerun, ends with the CSVs of an uninterrupted run (timing columns aside) and a
metrics.jsonl with every (stage, model, epoch) row once.

The points are the events of the uninterrupted run, counted in a subprocess: a training epoch
logged, a checkpoint written but not yet published, a stage's outputs before and after its
commit, an unlearning method returned. The draw is seeded: ``JAXMU_KILL_SEED`` (default: the
time) is printed and named in every failure, so a failing draw reruns with the same point. The
DeepUnlearn run tunes nothing and search stages are left out of the draw: resuming a killed
study is the search's own property (issue [5/9] item 1, tests/test_search.py).
test_iam_pipeline.py and test_train.py hold fixed kill points of training.
"""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("JAXMU_KILL_SEED", int(time.time()) % 100_000))
TIMING = ("seconds", "rte", "time")  # columns measured, not computed: they differ run to run

_SCRIPT = r"""
import contextlib, json, os, signal, sys
sys.path.insert(0, sys.argv[5])
import test_kill_e2e as t
from jaxmu import checkpoint, stages
from jaxmu.methods import base
pipeline, workdir, kill_at, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
events, current = [], []

def event(name):
  if any(s.startswith("search") for s in current):
    return  # the search's own resume property (item 1) is not drawn here
  events.append(f"{name}@{current[-1] if current else '-'}")
  if len(events) == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)

real_stage = stages.Workdir.stage
@contextlib.contextmanager
def stage(self, name, *args, **kwargs):
  with real_stage(self, name, *args, **kwargs) as st:
    current.append(name)
    try:
      yield st
    finally:
      current.pop()
stages.Workdir.stage = stage

def around(owner, attr, name, before=False, after=True):
  real = getattr(owner, attr)
  def wrapped(*args, **kwargs):
    if before:
      event(f"{name}:before")
    out = real(*args, **kwargs)
    if after:
      event(f"{name}:after")
    return out
  setattr(owner, attr, wrapped)

around(stages.Workdir, "append_metrics", "epoch")
around(stages.Stage, "commit", "commit", before=True)
around(checkpoint, "publish_dir", "checkpoint_written", before=True, after=False)
around(checkpoint.TrainingCheckpoints, "save", "training_checkpoint")
around(base.Method, "run", "unlearned")
t.run(pipeline, workdir)
with open(log, "w") as f:
  json.dump(events, f)
"""


def _deepunlearn_config():
  from test_pipeline import _tiny_config
  config = _tiny_config()  # tests/test_pipeline.py's tiny run, without its search
  config.search.methods = ()  # a killed study's resume is item 1's test (tests/test_search.py)
  return config


def _iam_config(workdir):
  from test_iam_pipeline import _tiny_config
  from jaxmu import data as data_lib
  from jaxmu.configs import iam as iam_configs
  npz = Path(workdir).parent / "digits_flat.npz"  # as tests/test_iam_pipeline.py's npz fixture
  if not npz.exists():
    digits = data_lib.load("digits")
    np.savez(npz, x=digits.inputs.reshape(len(digits.labels), -1), y=digits.labels,
             num_train=digits.num_train)
  config = _tiny_config(npz)  # tests/test_iam_pipeline.py's tiny run
  config.split.forget = "set_random"  # one unlearning type: half the audits
  config.checkpoint_every = 1
  config.sensitivity = iam_configs.get_config("dataset=digits").sensitivity  # the whole grid
  return config


def _ulira_config():
  from test_ulira import _tiny_config
  return _tiny_config()  # tests/test_ulira.py's tiny run


def run(pipeline, workdir):
  """One run of ``pipeline``'s tiny config over ``workdir`` (in the subprocess)."""
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  if pipeline == "deepunlearn":
    from jaxmu.pipelines import deepunlearn
    deepunlearn.run(_deepunlearn_config(), workdir)
  elif pipeline == "iam":
    from jaxmu.pipelines import iam
    iam.run(_iam_config(workdir), workdir)
  else:
    from jaxmu.pipelines import ulira
    ulira.run(_ulira_config(), workdir)


def _launch(pipeline, workdir, kill_at, log, cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run([sys.executable, "-c", _SCRIPT, pipeline, str(workdir), str(kill_at),
                         str(log), str(ROOT / "tests")], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)


def _tables(workdir):
  """Every CSV under ``workdir`` without its timing columns: {relative path: rows}."""
  out = {}
  for path in sorted(Path(workdir).rglob("*.csv")):
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    out[str(path.relative_to(workdir))] = [
        {k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]
  return out


def _metric_rows(workdir):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  return sorted(json.dumps(r, sort_keys=True) for r in rows)


@pytest.mark.e2e
@pytest.mark.parametrize("pipeline", ["deepunlearn", "iam", "ulira"])
def test_a_pipeline_killed_at_a_random_point_resumes_to_the_same_csvs(pipeline, tmp_path):
  cache = tmp_path / "jax_cache"
  straight = _launch(pipeline, tmp_path / "straight", 0, tmp_path / "events.json", cache)
  assert straight.returncode == 0, straight.stderr[-3000:]
  events = json.loads((tmp_path / "events.json").read_text())
  rng = random.Random(f"{SEED}/{pipeline}")
  kill_at = rng.randint(1, len(events))
  point = f"seed {SEED}: kill at event {kill_at} of {len(events)}, {events[kill_at - 1]}"
  print(f"JAXMU_KILL_SEED={SEED} {pipeline}: {point}")
  killed = _launch(pipeline, tmp_path / "run", kill_at, tmp_path / "unused.json", cache)
  assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
  resumed = _launch(pipeline, tmp_path / "run", 0, tmp_path / "resumed.json", cache)
  assert resumed.returncode == 0, (point, resumed.stderr[-3000:])
  want, got = _tables(tmp_path / "straight"), _tables(tmp_path / "run")
  assert want and list(got) == list(want), point
  for name in want:
    assert got[name] == want[name], (point, name)
  # metrics.jsonl: every (stage, model, epoch) once, with the uninterrupted run's numbers
  assert _metric_rows(tmp_path / "run") == _metric_rows(tmp_path / "straight"), point
