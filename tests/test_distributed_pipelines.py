"""Pipelines over several jax.distributed processes: the stages' process-0-only commit and the
slicing/gathering of stacks (fast, one process, the process index mocked), and tiny IAM and
DeepUnlearn runs on 2 and 3 CPU processes on localhost (also through the ``jaxmu`` command)
giving the CSVs of one process (e2e)."""

import csv
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmu import checkpoint, cli, distributed, models, search, stages, train
from tests import test_iam_pipeline, test_pipeline, test_scale
from tests.test_iam_pipeline import npz  # noqa: F401 (the flattened digits fixture)

ROOT = Path(__file__).resolve().parents[1]
# Timing columns differ between any two runs.
TIMING = ("seconds", "rte")


@pytest.fixture
def process(monkeypatch):
  """Pretends to be process ``p`` of ``count`` (no collectives: `agree` and `barrier` recorded;
  on a process other than 0 `agree` returns process 0's ``decision``)."""
  calls = []

  def become(p, count=2, decision="new"):
    monkeypatch.setattr(jax, "process_index", lambda: p)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(distributed, "agree",
                        lambda obj: calls.append(("agree", obj)) or (decision if p else obj))
    monkeypatch.setattr(distributed, "barrier", lambda name: calls.append(("barrier", name)))
    return calls
  return become


def _run_stage(wd, name="s", single=False):
  with wd.stage(name, config={"a": 1}, outputs=("out.txt",), single=single) as st:
    ran = not st.done
    if ran:
      (st.tmp / "out.txt").write_text("x")
      st.commit()
  return ran, st


def test_only_process_0_publishes_and_every_process_waits_at_the_barrier(tmp_path, process):
  calls = process(1)
  wd = stages.Workdir(tmp_path)
  wd.write_config({"num_shadows": 1})
  ran, st = _run_stage(wd)
  assert ran and st.tmp.parent != wd.path(".tmp")  # a private temp dir, outside the workdir
  assert not wd.path("out.txt").exists() and wd.manifest("s") is None
  assert not wd.path("config.json").exists() and not wd.path("owner.json").exists()
  assert calls == [("agree", None), ("barrier", "jaxmu stage s")]  # process 0 decided
  assert not wd.path("stages", "s.lock").exists()  # process 0 alone takes the lock
  ran, _ = _run_stage(wd, "t", single=True)  # a single stage: process 0 alone runs the body
  assert not ran and calls[-1] == ("barrier", "jaxmu stage t")
  wd.append_metrics({"stage": "train", "epoch": 1, "loss": [0.5], "model": [3]})
  assert wd.path("metrics.process1.jsonl").exists() and not wd.path("metrics.jsonl").exists()
  checkpoint.save(tmp_path / "ckpt", {"w": np.zeros(2)})
  assert not (tmp_path / "ckpt").exists()

  process(0)
  ran, _ = _run_stage(wd)
  assert ran and wd.path("out.txt").read_text() == "x" and wd.manifest("s")["reason"] == "new"
  assert calls[-2:] == [("agree", "new"), ("barrier", "jaxmu stage s")]
  ran, _ = _run_stage(wd)  # done: no barrier
  assert not ran and calls[-1] == ("agree", None)


def test_unlearn_slices_the_context_and_gathers_the_stack(monkeypatch, process):
  """Process p runs the method on its share with its models' ids; the shares and the slowest
  process's times come back."""
  ctx = _context()
  seen = []

  class Method:
    def run(self, ctx, hparams, key):
      seen.append((ctx.model_ids, ctx.retain.shape, ctx.originals["w"].shape))
      return distributed.methods_lib.UnlearnResult({"w": ctx.originals["w"] + 1}, 2.0, 1.0)

  monkeypatch.setattr(distributed.methods_lib, "get", lambda name: Method())
  process(0, 1)
  alone = distributed.unlearn("m", ctx, {}, jax.random.key(0))
  assert alone.states["w"] is not None and seen == [((5, 6, 7), (3, 4), (3, 2))]
  process(1, 2)
  monkeypatch.setattr(distributed.multihost_utils, "process_allgather",
                      lambda tree, tiled=False: jax.tree.map(lambda x: np.stack([x, x * 3]), tree))
  out = distributed.unlearn("m", ctx, {}, jax.random.key(0))
  assert seen[-1] == ((7,), (1, 4), (1, 2))
  assert (out.seconds, out.compile_seconds) == (6.0, 3.0)
  assert out.states["w"].shape == (3, 2)
  process(1, 4)  # fewer models than processes: every process runs the whole stack
  assert distributed.unlearn("m", ctx, {}, jax.random.key(0)).seconds == 2.0
  assert seen[-1][0] == (5, 6, 7)


def test_fit_trains_its_share_and_returns_the_slowest_process_s_times(monkeypatch, process,
                                                                     tmp_path):
  """RTE's retraining time of a stack split over processes is the slowest share's. Every process
  checkpoints its own share; a stack smaller than the process count, process 0 alone, and every
  process waits for it."""
  seen = []

  def fit(model, state, data, index_sets, recipe, epochs, key, *, model_ids, val_sets,
          checkpoints):
    seen.append((tuple(model_ids), checkpoints and checkpoints.dir))
    return distributed.train.FitResult(state, None, None, [], 2.0, 1.0)

  monkeypatch.setattr(distributed.train, "fit", fit)
  monkeypatch.setattr(distributed.multihost_utils, "process_allgather",
                      lambda tree, tiled=False: jax.tree.map(lambda x: np.stack([x, x * 3]), tree))
  state = distributed.train.TrainState({"w": np.arange(6.0).reshape(3, 2)}, {}, {}, np.zeros(3), {})
  fit_stack = lambda: distributed.fit(  # noqa: E731
      None, state, None, np.arange(12).reshape(3, 4), None, 1, jax.random.key(0),
      model_ids=(5, 6, 7), checkpoints=checkpoint.TrainingCheckpoints(tmp_path))
  calls = process(1, 2)
  out = fit_stack()
  assert seen == [((7,), tmp_path / "models2-3")] and calls == []
  assert (out.seconds, out.compile_seconds) == (6.0, 3.0)
  for p in (0, 1):
    process(p, 4)
    fit_stack()
    assert seen[-1] == ((5, 6, 7), None if p else tmp_path / "models0-3")
  assert calls == [("barrier", "jaxmu fit")] * 2


def test_predict_predicts_its_share_and_gathers_the_logits_of_one_process(monkeypatch, process):
  """Each of 2 processes predicts only its share of a stack of 3; the gathered logits equal
  `train.predict` of the whole stack bit for bit. One process, or a stack smaller than the
  process count: `train.predict` of the whole stack, nothing gathered."""
  model = models.get("small_cnn", 3, width=4)
  variables = train.init_variables(model, jax.random.split(jax.random.key(0), 3), (8, 8, 1))
  rng = np.random.default_rng(0)
  data = train.DeviceData(jnp.asarray(rng.integers(0, 256, (20, 8, 8, 1), np.uint8)),
                          jnp.asarray(rng.integers(0, 3, 20), np.int32))
  recipe = train.Recipe(batch_size=8, augment="none")
  indices = np.arange(3, 20)
  whole = train.predict(model, variables, data, indices, recipe)
  kernel = np.asarray(variables["params"]["fc"]["kernel"])
  predicted, sent, predict = [], [], train.predict

  def spy(model, variables, *args):
    predicted.append(np.asarray(variables["params"]["fc"]["kernel"]))
    return predict(model, variables, *args)

  monkeypatch.setattr(distributed.train, "predict", spy)
  monkeypatch.setattr(distributed.multihost_utils, "process_allgather",
                      lambda tree, tiled=False: sent.append(tree) or np.stack([tree, tree]))
  for p in range(2):  # each process sends its share, padded to 2 models
    process(p, 2)
    distributed.predict(model, variables, data, indices, recipe)
  assert [k.shape[0] for k in predicted] == [2, 1] and [s.shape[0] for s in sent] == [2, 2]
  assert np.array_equal(np.concatenate(predicted), kernel)
  monkeypatch.setattr(distributed.multihost_utils, "process_allgather",
                      lambda tree, tiled=False: np.stack(sent))
  for p in range(2):
    process(p, 2)
    out = distributed.predict(model, variables, data, indices, recipe)
    assert out.dtype == whole.dtype and np.array_equal(out, whole)
  for p, count in ((0, 1), (2, 4)):
    process(p, count)
    out = distributed.predict(model, variables, data, indices, recipe)
    assert np.array_equal(predicted[-1], kernel) and len(sent) == 2
    assert np.array_equal(out, whole)


def _context():
  """A stand-in context of 3 models: what `slice_context` cuts."""
  from jaxmu import methods
  return methods.Context(
      model=None, recipe=None, data=None, originals={"w": np.arange(6.0).reshape(3, 2)},
      inits={"w": np.zeros((3, 2))}, retain=np.arange(12).reshape(3, 4),
      forget=np.arange(6).reshape(3, 2), val=np.arange(3).reshape(3, 1), model_ids=(5, 6, 7),
      num_classes=2, input_shape=(2,))


def test_search_followers_run_each_trial_process_0_sends(monkeypatch, process):
  """A process other than 0 runs its share of every trial sent and returns process 0's result;
  a share that fails on it is left for process 0 to fail."""
  process(1)
  result = search.SearchResult("ct", {"lr": 0.1}, (0.1, 0.2, 0.3, 0.4), 3, 2, 0)
  messages = iter([{"params": {"lr": 0.5}, "key_trial": 1}, {"params": {"lr": 0.2},
                   "key_trial": 4}, {"result": result._asdict()}])
  monkeypatch.setattr(distributed, "agree", lambda obj: next(messages))
  seen = []

  def run_trial(params, key_trial):
    seen.append((params, key_trial))
    raise search.TrialFailed("diverged")

  assert search._follow(run_trial) == result and seen == [({"lr": 0.5}, 1), ({"lr": 0.2}, 4)]
  monkeypatch.setattr(distributed, "agree", lambda obj: {"error": "process 0: SearchError: x"})
  with pytest.raises(search.SearchError, match="process 0: SearchError: x"):
    search._follow(run_trial)


def test_iam_llm_refuses_several_processes_before_anything_runs(tmp_path, process, capsys):
  process(0, 2)
  with pytest.raises(SystemExit) as exit_:
    cli.main(["jaxmu", "iam-llm", "--config=iam_llm", f"--workdir={tmp_path / 'w'}"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err.startswith(
      "error: --distributed: jaxmu iam-llm runs in one process")
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------
# Several processes on localhost (e2e)
# ------------------------------------------------------------------------------------------

_PROCESS = textwrap.dedent("""
    import sys, jax
    port, count, p, kind, workdir, data = sys.argv[1:]
    if int(count) > 1:
      jax.distributed.initialize("localhost:" + port, int(count), int(p),
                                 heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
    import tests.test_distributed_pipelines as t
    t.run_pipeline(kind, workdir, data)
""")


def deepunlearn_config():
  """The tiny DeepUnlearn config of these runs, with a U-LiRA stage (CT searched); also the
  ``get_config`` of the config file given to the ``jaxmu`` command."""
  config = test_pipeline._tiny_config()
  config.seeds = (0, 1, 2)
  config.search.seeds = (0, 1, 2)  # split over the processes as the other stacks
  config.ulira.enabled = True
  config.ulira.lira.num_splits, config.ulira.lira.num_forget_draws = 4, 2
  config.ulira.lira.forget_ratio = 0.5
  config.ulira.epochs = 1
  config.ulira.methods = ("original", "finetune")
  return config


def run_pipeline(kind, workdir, data):
  """One tiny run of ``kind``: "iam", or "deepunlearn" (`deepunlearn_config`)."""
  if kind == "iam":
    from jaxmu.pipelines import iam
    return iam.run(test_iam_pipeline._tiny_config(data), workdir)
  from jaxmu.pipelines import deepunlearn
  return deepunlearn.run(deepunlearn_config(), workdir)


def _port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _spawn(args):
  return subprocess.Popen([sys.executable, *map(str, args)], env=test_scale.ENV, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _start(kind, workdir, data, count):
  port = _port()
  return [_spawn(["-c", _PROCESS, port, count, p, kind, workdir, data]) for p in range(count)]


def _wait(procs):
  errors = [proc.communicate(timeout=900)[1] for proc in procs]
  for p, (proc, err) in enumerate(zip(procs, errors)):
    assert proc.returncode == 0, f"process {p}: {err[-3000:]}"


def _run(kind, workdir, data, count):
  _wait(_start(kind, workdir, data, count))
  return _csvs(workdir)


def _csvs(workdir):
  """Every CSV of the run, timing columns dropped, and the search results."""
  tables = {str(p.relative_to(workdir)): json.loads(p.read_text())
            for p in Path(workdir).glob("search/*.json")}
  for path in sorted(Path(workdir).rglob("*.csv")):
    with open(path) as f:
      rows = list(csv.DictReader(f))
    tables[str(path.relative_to(workdir))] = [
        {k: v for k, v in row.items() if not any(t in k.lower() for t in TIMING)} for row in rows]
  return tables


@pytest.fixture(scope="module")
def one_process(npz, tmp_path_factory):
  """The CSVs of one process's run of each pipeline."""
  return {kind: _run(kind, tmp_path_factory.mktemp(kind), npz, 1)
          for kind in ("iam", "deepunlearn")}


@pytest.mark.e2e
@pytest.mark.parametrize("kind,count", [("iam", 2), ("deepunlearn", 3)])
def test_several_processes_write_the_csvs_of_one(kind, count, one_process, npz, tmp_path):
  """Stacks split over the processes (IAM's shadows, targets and approximate methods;
  DeepUnlearn's references, search trials, unlearning, U-LiRA's splits and unlearning) give the
  same CSVs and search results."""
  expected = one_process[kind]
  assert len(expected) >= 2
  assert _run(kind, tmp_path, npz, count) == expected


@pytest.mark.e2e
def test_killed_process_group_resumes_with_the_same_csvs(one_process, npz, tmp_path):
  """SIGKILL of every process once each has checkpointed its share of the training (2 epochs),
  then a rerun on the same workdir: every share resumes from its checkpoint; the CSVs of one
  process."""
  procs = _start("deepunlearn", tmp_path, npz, 2)
  shares = [tmp_path / "checkpoints" / "train" / f"models{s.start}-{s.stop}" / "00000001"
            for s in distributed.process_models(6, 2)]  # 3 seeds' originals and retrained
  deadline = time.time() + 600
  while not all(s.exists() for s in shares):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  for proc in procs:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
  assert not (tmp_path / "stages" / "train.json").exists()
  assert _run("deepunlearn", tmp_path, npz, 2) == one_process["deepunlearn"]


@pytest.mark.e2e
def test_jaxmu_command_on_two_processes_writes_the_csvs_of_one(one_process, tmp_path):
  """``python -m jaxmu deepunlearn --coordinator_address=... --num_processes=2 --process_id=p``
  (the CLI's start-up of jax.distributed) on a config file: the CSVs of one process."""
  config = tmp_path / "tiny.py"
  config.write_text("from tests.test_distributed_pipelines import deepunlearn_config as "
                    "get_config\n")
  port = _port()
  _wait([_spawn(["-m", "jaxmu", "deepunlearn", f"--config={config}", f"--workdir={tmp_path / 'w'}",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={p}"]) for p in range(2)])
  assert _csvs(tmp_path / "w") == one_process["deepunlearn"]
