"""The IAM audit pipeline end to end on a tiny digits config: every stage's outputs, the report,
reuse on rerun, deterministic recomputation, and clean-view eval-mode signals."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmu.configs import iam as iam_configs
from jaxmu import report, stages, train, validate
from jaxmu.attacks import iam, signals
from jaxmu.attacks.audit import ATTACKS, SCORING_FUNCTIONS
from jaxmu.data import augment
from jaxmu.pipelines import common, iam_matrix
from jaxmu.pipelines import iam as pipeline

ROOT = Path(__file__).resolve().parents[1]


def _tiny_config(npz):
  """The digits quick config on flattened digits (an .npz) with the Purchase MLP: cheap compiles."""
  config = iam_configs.get_config("dataset=digits")
  config.dataset.name = "npz"
  config.dataset.options = {"path": str(npz)}
  config.model.name = "purchase_mlp"
  config.model.options = {"num_features": 64}
  config.seeds = (42,)
  config.split.forget = "set_random+class_percentage"
  config.split.forget_classes = (0, 1)
  config.num_shadows = 2
  config.train.epochs = config.train.target_epochs = config.ref_in.epochs = 2
  config.ref_in.batch_size = config.train.batch_size
  config.checkpoint_every = 2
  config.score_ui.start_models, config.score_ui.breaks, config.score_ui.epochs = 1, 2, 2
  config.approx.methods = ("finetune",)
  config.approx.hparams.finetune.num_epochs = 1
  return config


def _finished(workdir):
  return {p.stem: json.loads(p.read_text())["finished"] for p in (workdir / "stages").glob("*.json")}


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  from jaxmu import data as data_lib
  digits = data_lib.load("digits")
  path = tmp_path_factory.mktemp("data") / "digits_flat.npz"
  np.savez(path, x=digits.inputs.reshape(len(digits.labels), -1), y=digits.labels,
           num_train=digits.num_train)
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, npz):
  path = tmp_path_factory.mktemp("iam")
  assert pipeline.run(_tiny_config(npz), path) == path / "report.md"
  return path


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from jaxmu import stages
    from jaxmu.pipelines import iam as pipeline
    import tests.test_iam_pipeline as t
    config = t._tiny_config(sys.argv[1])
    config.checkpoint_every = 1  # not part of any stage's inputs
    if sys.argv[3] == "kill":  # SIGKILL in the targets' last epoch, before its checkpoint
      append = stages.Workdir.append_metrics
      def append_then_die(self, record):
        append(self, record)
        if record["stage"] == "targets" and record["epoch"] == 2:
          os.kill(os.getpid(), signal.SIGKILL)
      stages.Workdir.append_metrics = append_then_die
    pipeline.run(config, sys.argv[2])
""")


@pytest.mark.e2e
def test_resume_after_sigkill_gives_the_same_numbers(workdir, npz, tmp_path):
  """Killed inside a training stage, then rerun: every table equals the uninterrupted run's."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  run = lambda mode: subprocess.run(
      [sys.executable, "-c", _KILLED_RUN, str(npz), str(tmp_path / "run"), mode], env=env,
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  killed = run("kill")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  finished = _finished(tmp_path / "run")
  assert "shadows" in finished and "targets" not in finished
  assert (tmp_path / "run" / "checkpoints" / "targets").exists()
  resumed = run("go")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  for name in ("binui.csv", "scoring.csv", "score_ui.csv", "approx.csv", "approx_class.csv",
               "results.csv"):
    assert (tmp_path / "run" / name).read_text() == (workdir / name).read_text(), name


def test_every_stage_output_and_the_report(workdir):
  assert set(_finished(workdir)) == set(pipeline.STAGES) | {"approx_finetune"}
  for name in ("models/shadows", "models/shadow_origin", "models/ref_in", "models/original",
               "models/retrain", "unlearned/finetune", "roc.png", "auc_vs_k.png", "iam_hist.png"):
    assert (workdir / name).exists(), name
  rows = report.read_csv(workdir / "results.csv")
  binui = [r for r in rows if r["table"] == "binui"]
  # K = 1: two single-shadow groups; K = 2: one group; every attack in each.
  # Per unlearning type, K = 1: two single-shadow groups; K = 2: one group; every attack in each.
  types = ("set_random", "class_percentage")
  assert sorted({(r["forget"], int(r["k"]), int(r["group"])) for r in binui}) == sorted(
      (t, k, g) for t in types for k, g in [(1, 0), (1, 1), (2, 0)])
  assert len(binui) == 2 * 3 * len(ATTACKS)
  assert {r["attack"] for r in binui} == set(ATTACKS)
  for r in binui:
    assert 0 <= r["auc"] <= 1 and 0 <= r["tpr@0.01"] <= 1
  # Table 5: every scoring function per type and K = 1 group; Gumbel-On/Off are IAM-On/Off.
  scoring = [r for r in rows if r["table"] == "scoring"]
  assert sorted((r["forget"], r["attack"], int(r["group"])) for r in scoring) == sorted(
      (t, key, g) for t in types for key in SCORING_FUNCTIONS for g in (0, 1))
  k1 = {(r["forget"], r["attack"], r["group"]): r["auc"] for r in binui if int(r["k"]) == 1}
  for r in scoring:
    if r["attack"] in ("gumbel_on", "gumbel_off"):
      assert r["auc"] == k1[(r["forget"], "iam_" + r["attack"].split("_")[1], r["group"])]
  approx = [r for r in rows if r["table"] == "approx"]
  assert [(r["forget"], r["method"]) for r in approx] == [
      (t, m) for t in types for _ in range(2) for m in ("retrain", "finetune")]
  # The class-level read-out: one row per run of the type and one overall, whose means are the
  # approx rows' membership means.
  levels = [r for r in rows if r["table"] == "approx_class"]
  assert [r["run"] for r in levels if r["forget"] == "class_percentage"] == [1, 2, "overall"] * 4
  assert [r["class"] for r in levels if r["forget"] == "class_percentage"] == [0, 1, ""] * 4
  overall = [r for r in levels if r["run"] == "overall"]
  for a, o in zip(approx, overall):
    assert (a["method"], a["group"]) == (o["method"], o["group"])
    assert a["member_retained"] == o["mean_1"] and a["member_forgotten"] == o["mean_0"]
    assert 1 - a["score_forgotten"] == pytest.approx(o["mean_0"])
  score = [r for r in rows if r["table"] == "score_ui"]
  assert sorted((r["attack"], int(r["group"])) for r in score) == sorted(
      (a, g) for a in ATTACKS for g in (0, 1))
  for r in score:
    assert np.isnan(r["spearman"]) or -1 <= r["spearman"] <= 1
    assert (np.isnan(r["kl"]) or r["kl"] >= 0) and {"mse_b0", "mse_b1", "mse_b2"} <= set(r)
  text = (workdir / "report.md").read_text()
  for heading in ("Table 1", "Operating points, K = 1: class_percentage",
                  "Number of shadow models K", "Table 5", "Table 2", "Table 8",
                  "class-level read-out"):
    assert heading in text
  for attack in ATTACKS.values():
    assert f"| {attack[0]} |" in text


def test_splits_match_the_split_function(workdir, npz):
  from jaxmu import data as data_lib
  from jaxmu.data import splits
  parts = splits.load(workdir / "splits.npz", data_lib.load("npz", path=str(npz)))
  want = splits.iam(1437, 360, 600, seed=42, forget_size=60, fixed_forget=12, num_shadows=2,
                    shadow_fix=40)
  np.testing.assert_array_equal(parts["flags_0"], want["flags"])
  np.testing.assert_array_equal(parts["shadow_train"], want["shadow_train"])
  assert not np.isin(parts["shadow_pool"], parts["pool"]).any()


def test_signals_are_eval_mode_clean_logits(workdir, npz):
  config = _tiny_config(npz)
  pipe = pipeline._Pipeline(config, stages.Workdir(workdir), common.load_dataset(config.dataset))
  retrain = pipe.restore("retrain", len(pipe.runs))
  pool = pipe.parts["pool"][:50]
  direct = train.logits(pipe.model, pipe.recipe, jax.tree.map(lambda x: x[0], retrain),
                        pipe.data.inputs, pool)
  stored = np.load(workdir / "signals" / "query_retrain.npy")[0, :50]
  np.testing.assert_allclose(stored, np.asarray(direct), rtol=1e-5, atol=1e-5)
  # The K = 1, group 0 IAM-On scores of the report are IAM on these signals.
  labels = np.asarray(pipe.dataset.labels)[pipe.parts["pool"]]
  g = lambda z: signals.normalized_gumbel(signals.true_class_prob(z, labels))
  want = iam.iam_score(g(np.load(workdir / "signals" / "query_retrain.npy")[0]),
                       g(np.load(workdir / "signals" / "query_original.npy")[0]),
                       g(np.load(workdir / "signals" / "query_shadows.npy")[:1]))
  np.testing.assert_allclose(np.load(workdir / "binui_scores.npz")["iam_on"], want, atol=1e-6)
  assert pipe.query_data() is pipe.data


def test_random_draws_per_k_cell_and_audit_epsilons_reach_the_scores(workdir, npz):
  """Each (K, group, run) cell draws its own Random baseline (K = 1 keeps seed + 1000 g + r), and
  ``audit.off_eps`` / ``audit.norm_eps`` reach IAM-Off (iam-spec 12.5)."""
  config = _tiny_config(npz)
  pipe = pipeline._Pipeline(config, stages.Workdir(workdir), common.load_dataset(config.dataset))
  one, two = (pipe.audit().scores(g, [0], ("random", "iam_off")) for g in ([0], [0, 1]))
  np.testing.assert_array_equal(one["random"], np.random.default_rng(0).random(one["random"].size))
  assert not np.array_equal(one["random"], two["random"])
  auc = {int(r["k"]): r["auc"] for r in report.read_csv(workdir / "binui.csv")
         if r["attack"] == "random" and r["forget"] == "set_random" and int(r["group"]) == 0}
  assert auc[1] != auc[2]
  config.audit.off_eps, config.audit.norm_eps = (0.1, 1e-6), (1e-2, 1e-5)  # Purchase's
  purchase = pipe.audit().scores([0], [0], ("iam_off",))["iam_off"]
  assert np.isfinite(purchase).all() and not np.allclose(purchase, one["iam_off"])


def test_augmented_queries_flag_gives_the_training_view(workdir, npz):
  config = _tiny_config(npz)
  config.dataset.name, config.dataset.options = "digits", {}
  config.data.augment = "flip"
  config.signals.augmented_queries = True
  pipe = pipeline._Pipeline(config, stages.Workdir(workdir), common.load_dataset(config.dataset))
  view = np.asarray(pipe.query_data().inputs)
  want = np.asarray(augment.augment(jax.random.key(config.signals.view_seed), pipe.data.inputs,
                                    "flip"))
  np.testing.assert_array_equal(view, want)
  assert (view != np.asarray(pipe.data.inputs)).any()


def test_rerun_recomputes_nothing_and_recomputation_is_deterministic(workdir, npz):
  before = _finished(workdir)
  binui = (workdir / "binui.csv").read_text()
  pipeline.run(_tiny_config(npz), workdir)
  assert _finished(workdir) == before
  for stage in ("binui", "report"):
    (workdir / "stages" / f"{stage}.json").unlink()
  pipeline.run(_tiny_config(npz), workdir)
  assert (workdir / "binui.csv").read_text() == binui
  after = _finished(workdir)
  assert after["signals"] == before["signals"] and after["binui"] != before["binui"]


def test_bad_config_is_a_clear_error(tmp_path, npz):
  config = _tiny_config(npz)
  config.stop_after = "shadowz"
  with pytest.raises(ValueError, match="not a stage"):
    pipeline.run(config, tmp_path)
  config = _tiny_config(npz)
  config.audit.attacks = ("iam", )
  with pytest.raises(validate.ConfigError, match="audit.attacks: unknown attack 'iam'"):
    pipeline.run(config, tmp_path)
  with pytest.raises(ValueError, match="unknown config arguments"):
    iam_configs.get_config("dataset=cifar10,modle=x")


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "cinic10", "purchase100"])
def test_reference_recipes(dataset):
  config = iam_configs.get_config(f"dataset={dataset}")
  assert config.train.batch_size == 128 and config.train.t_max == 200
  assert config.train.epochs == 201 and config.train.momentum == 0.9
  assert config.train.learning_rate == (0.01 if dataset == "purchase100" else 0.1)
  assert config.model.name == ("purchase_mlp" if dataset == "purchase100" else "resnet18")
  assert pipeline.k_sweep(config) == (1, 2, 4, 8)
  # ScoreUI (iam-spec 7.5): a break every int(E / 20) epochs of E = 170 / 201 / 201 / 71
  every = {"cifar10": 8, "cifar100": 10, "cinic10": 10, "purchase100": 3}[dataset]
  assert config.score_ui.breaks == 20
  assert pipeline.score_ui_schedule(config) == tuple(range(every, 20 * every + 1, every))
  assert config.score_ui.epochs == {"cifar10": 170, "purchase100": 71}.get(dataset, 201)
  assert [r.forget for r in pipeline.runs(config)] == (["set_random"] * 10
                                                        + ["class_percentage"] * 10)


def test_shifted_shadows_split_their_own_dataset(tmp_path, npz):
  config = _tiny_config(npz)
  config.setting = "shifted"
  config.shadow_dataset.name = "synthetic"
  config.shadow_dataset.options = {"num_train": 900, "num_test": 100, "shape": (64,)}
  config.shadow_dataset.shadow_size = 500
  config.stop_after = "splits"
  pipeline.run(config, tmp_path)
  parts = np.load(tmp_path / "splits.npz")
  assert parts["shadow_train"].shape == (2, 400) and parts["shadow_test"].shape == (2, 100)
  assert parts["shadow_pool"].max() < 900 and len(parts["shadow_pool"]) == 500
  assert len(parts["pool"]) == 1437 - 600  # the target's pool is unchanged
  config.shadow_dataset.options = {"num_train": 900, "num_test": 100, "shape": (8, 8, 1)}
  with pytest.raises(ValueError, match="shadow dataset inputs"):
    pipeline.run(config, tmp_path / "other")


def test_incremental_continues_the_base_runs_models(workdir, tmp_path, npz):
  """Zero epochs of continued training: the targets are exactly the base run's models."""
  config = _tiny_config(npz)
  config.setting = "incremental"
  config.incremental.base_workdir = str(workdir)
  config.incremental.pool_size = 300
  config.split.forget_size, config.split.fixed_forget = 30, 6
  config.train.target_epochs, config.ref_in.epochs = 0, 1
  config.stop_after = "targets"
  pipeline.run(config, tmp_path)
  parts = np.load(tmp_path / "splits.npz")
  base = np.load(workdir / "splits.npz")
  assert len(parts["pool"]) == 300 and parts["flags_0"].sum() == 30
  np.testing.assert_array_equal(parts["shadow_train"], base["shadow_train"])
  pipe = pipeline._Pipeline(config, stages.Workdir(tmp_path), common.load_dataset(config.dataset))
  old = pipeline._Pipeline(_tiny_config(npz), stages.Workdir(workdir),
                           common.load_dataset(config.dataset))
  for group, n in (("shadows", 2), ("original", 1), ("retrain", 3)):
    for a, b in zip(jax.tree.leaves(pipe.restore(group, n)), jax.tree.leaves(old.restore(group, n))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.incremental.base_workdir = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="holds no IAM run"):
    pipeline.run(config, tmp_path / "other")


def test_reused_models_train_nothing_and_give_the_same_numbers(workdir, npz, tmp_path):
  config = _tiny_config(npz)
  config.reuse.shadows = config.reuse.targets = str(workdir)
  config.stop_after = "binui"
  pipeline.run(config, tmp_path)
  log = tmp_path / "metrics.jsonl"  # training curves: none, as nothing was trained
  assert not log.exists() or not log.read_text().strip()
  for group in ("shadows", "shadow_origin", "ref_in", "original", "retrain"):
    assert (tmp_path / "models" / group).exists()
  assert (tmp_path / "binui.csv").read_text() == (workdir / "binui.csv").read_text()
  # The matrix: one cell per run; the same cell twice is an error.
  rows, text = iam_matrix.arch_matrix([workdir])
  want = [r for r in report.read_csv(workdir / "binui.csv")
          if r["forget"] == "set_random" and int(r["k"]) == 1 and r["attack"] == "iam_on"]
  cell = [r for r in rows if r["attack"] == "iam_on"]
  assert len(cell) == 1
  assert cell[0]["target"] == cell[0]["shadow"] == "purchase_mlp[num_features=64]"
  assert cell[0]["auc"] == pytest.approx(np.mean([r["auc"] for r in want]))
  assert "| target \\ shadow | purchase_mlp[num_features=64] |" in text
  with pytest.raises(ValueError, match="two work directories"):
    iam_matrix.arch_matrix([workdir, tmp_path])


def test_reuse_checks_architecture_and_splits(workdir, npz, tmp_path):
  config = _tiny_config(npz)
  config.setting = "arch"
  config.shadow_model.name, config.shadow_model.options = "small_cnn", {}
  config.reuse.shadows = str(workdir)
  with pytest.raises(ValueError, match="holds .*purchase_mlp.* models; this run needs .*small_cnn"):
    pipeline.run(config, tmp_path / "arch")
  config = _tiny_config(npz)
  config.seeds = (43,)
  config.reuse.targets = str(workdir)
  with pytest.raises(ValueError, match="other index sets"):
    pipeline.run(config, tmp_path / "seeds")


def test_arch_matrix_launcher(workdir, tmp_path):
  """Three cells of a 2 x 2 matrix (one missing), from hand-made work directories."""
  for target, shadow, auc in (("a", "a", 0.6), ("b", "a", 0.7), ("a", "b", 0.8)):
    run = tmp_path / f"{target}-{shadow}"
    run.mkdir()
    config = json.loads((workdir / "config.json").read_text())
    config["model"] = {"name": target, "options": {}}
    if target != shadow:
      config["setting"], config["shadow_model"] = "arch", {"name": shadow, "options": {}}
    (run / "config.json").write_text(json.dumps(config))
    report.write_csv(run / "binui.csv", [
        {"forget": "set_random", "table": "binui", "attack": "iam_on", "k": 1, "group": g,
         "auc": auc + 0.01 * g} for g in (0, 1)])
  out = subprocess.run([sys.executable, "-m", "jaxmu", "iam-matrix", f"--workdirs={tmp_path}/*-?",
                        f"--out={tmp_path}/m"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| target \\ shadow | a | b |" in out.stdout
  assert "| a | 60.50 ± 0.50 | 80.50 ± 0.50 |" in out.stdout
  assert "| b | 70.50 ± 0.50 | — |" in out.stdout
  rows = report.read_csv(tmp_path / "m" / "matrix.csv")
  assert [(r["target"], r["shadow"], r["groups"]) for r in rows] == [
      ("a", "a", 2), ("a", "b", 2), ("b", "a", 2)]
  bad = subprocess.run([sys.executable, "-m", "jaxmu", "iam-matrix", f"--workdirs={tmp_path}/none*"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "no work directory matches" in bad.stderr
