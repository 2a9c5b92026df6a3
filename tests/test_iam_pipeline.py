"""The IAM audit pipeline end to end on a tiny digits config: every stage's outputs, the report,
reuse on rerun, deterministic recomputation, and clean-view eval-mode signals."""

import json

import jax
import numpy as np
import pytest

from configs import iam as iam_configs
from jaxmu import report, stages, train
from jaxmu.attacks import iam, signals
from jaxmu.attacks.audit import ATTACKS
from jaxmu.data import augment
from jaxmu.pipelines import iam as pipeline


def _tiny_config(npz):
  """The digits quick config on flattened digits (an .npz) with the Purchase MLP: cheap compiles."""
  config = iam_configs.get_config("dataset=digits")
  config.dataset.name = "npz"
  config.dataset.options = {"path": str(npz)}
  config.model.name = "purchase_mlp"
  config.model.options = {"num_features": 64}
  config.seeds = (42,)
  config.num_shadows = 2
  config.train.epochs = config.train.target_epochs = config.ref_in.epochs = 2
  config.ref_in.batch_size = config.train.batch_size
  config.checkpoint_every = 2
  config.score_ui.groups, config.score_ui.breaks, config.score_ui.epochs = 1, 2, 2
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


def test_every_stage_output_and_the_report(workdir):
  assert set(_finished(workdir)) == set(pipeline.STAGES) | {"approx_finetune"}
  for name in ("models/shadows", "models/shadow_origin", "models/ref_in", "models/original",
               "models/retrain", "unlearned/finetune", "roc.png", "auc_vs_k.png", "iam_hist.png"):
    assert (workdir / name).exists(), name
  rows = report.read_csv(workdir / "results.csv")
  binui = [r for r in rows if r["table"] == "binui"]
  # K = 1: two single-shadow groups; K = 2: one group; every attack in each.
  assert sorted({(int(r["k"]), int(r["group"])) for r in binui}) == [(1, 0), (1, 1), (2, 0)]
  assert {r["attack"] for r in binui} == set(ATTACKS)
  for r in binui:
    assert 0 <= r["auc"] <= 1 and 0 <= r["tpr@0.01"] <= 1
  assert [r["method"] for r in rows if r["table"] == "approx"] == ["retrain", "finetune"] * 2
  score = [r for r in rows if r["table"] == "score_ui"]
  assert len(score) == 1 and -1 <= score[0]["spearman"] <= 1
  text = (workdir / "report.md").read_text()
  for heading in ("Table 1", "Number of shadow models K", "Table 2", "Table 8"):
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
  pipe = pipeline._Pipeline(config, stages.Workdir(workdir), pipeline.load_dataset(config))
  retrain = pipe.restore("retrain", 1)
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


def test_augmented_queries_flag_gives_the_training_view(workdir, npz):
  config = _tiny_config(npz)
  config.dataset.name, config.dataset.options = "digits", {}
  config.data.augment = "flip"
  config.signals.augmented_queries = True
  pipe = pipeline._Pipeline(config, stages.Workdir(workdir), pipeline.load_dataset(config))
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
  with pytest.raises(ValueError, match="unknown attacks"):
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
  assert len(pipeline.runs(config)) == 10


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
  config.train.target_epochs = config.ref_in.epochs = 0
  config.stop_after = "targets"
  pipeline.run(config, tmp_path)
  parts = np.load(tmp_path / "splits.npz")
  base = np.load(workdir / "splits.npz")
  assert len(parts["pool"]) == 300 and parts["flags_0"].sum() == 30
  np.testing.assert_array_equal(parts["shadow_train"], base["shadow_train"])
  pipe = pipeline._Pipeline(config, stages.Workdir(tmp_path), pipeline.load_dataset(config))
  old = pipeline._Pipeline(_tiny_config(npz), stages.Workdir(workdir), pipeline.load_dataset(config))
  for group, n in (("shadows", 2), ("original", 1), ("retrain", 1)):
    for a, b in zip(jax.tree.leaves(pipe.restore(group, n)), jax.tree.leaves(old.restore(group, n))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.incremental.base_workdir = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="holds no finished IAM run"):
    pipeline.run(config, tmp_path / "other")
