"""The DeepUnlearn pipeline end to end on a tiny config, its metrics, and its launcher."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

from jaxmu.configs import quickstart
from jaxmu import checkpoint, models, report
from jaxmu.pipelines import common, deepunlearn

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("finetune", "ct")


def _tiny_config():
  config = quickstart.get_config()
  config.seeds = (0, 1)
  config.train.epochs = 2
  config.checkpoint_every = 1
  config.methods = METHODS
  config.unlearn.finetune.num_epochs = 1
  config.search.methods = ("ct",)
  config.search.trials = 2
  config.search.seeds = (0, 1)
  config.search.sampler_seed = 12  # its first TPE trials all draw batch 64: one compiled program
  config.tuned_defaults = False  # no <method>@defaults rows
  config.ulira.enabled = False  # test_ulira_stage enables a tiny one
  return config


def _manifest(workdir, stage):
  return json.loads((workdir / "stages" / f"{stage}.json").read_text())


def _finished(workdir):
  return {s.stem: _manifest(workdir, s.stem)["finished"] for s in (workdir / "stages").glob("*.json")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The tiny benchmark run once: 2 seeds, 2 epochs, finetune and CT (CT tuned, 2 trials)."""
  workdir = tmp_path_factory.mktemp("deepunlearn")
  path = deepunlearn.run(_tiny_config(), workdir)
  return workdir, path


def _copy(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / "w")
  return tmp_path / "w"


def test_end_to_end_writes_every_file_method_and_column(tiny_run):
  workdir, path = tiny_run
  assert path == workdir / "report.md"
  rows = report.read_csv(workdir / "results.csv")
  expected_methods = ("original", "retrain", *METHODS, "ct@accurate")
  assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in expected_methods
                                                      for s in (0.0, 1.0)]
  assert list(rows[0]) == ["method", "seed", *deepunlearn.COLUMNS]
  for row in rows:
    for split in deepunlearn.SPLITS:
      assert 0.0 <= row[f"{split}_acc"] <= 1.0
    assert 0.0 <= row["test_mia"] <= 1.0 and 0.0 <= row["val_mia"] <= 1.0
  by = {(r["method"], r["seed"]): r for r in rows}
  for seed in (0.0, 1.0):
    assert by[("retrain", seed)]["retdev"] == 0.0 and by[("retrain", seed)]["rte"] == 1.0
    assert by[("retrain", seed)]["l2_to_retrain"] == 0.0
    assert by[("original", seed)]["l2_to_original"] == 0.0
    assert by[("ct", seed)]["seconds"] > 0 and by[("ct", seed)]["rte"] > 0
  summary = report.read_csv(workdir / "summary.csv")
  assert [s["method"] for s in summary] == list(expected_methods)
  assert {"retdev_of_means", "indisc_of_means", "retdev_mean", "retdev_std"} <= set(summary[0])
  text = path.read_text()
  for method in expected_methods:
    assert f"| {method} |" in text or f"| *{method}* |" in text
  for header in ("RA", "FA", "TA", "RetDev", "Indisc", "T-MIA", "RTE"):
    assert f" {header} |" in text
  assert "| ct | tpe | 0, 1 | 2 | 0 |" in text  # tuned, with its trial count
  assert "Not tuned (the config's hyper-parameters): finetune." in text
  for figure in report.FIGURES:
    assert (workdir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({figure})" in text
  hparams = checkpoint.read_metadata(workdir / "unlearned" / "ct")["hparams"]
  best = json.loads(next((workdir / "search").glob("*/ct.json")).read_text())
  assert json.loads((workdir / "search" / "ct.json").read_text()) == best  # for U-LiRA
  assert {k: hparams[k] for k in best["best_params"]} == best["best_params"]
  # ct@accurate: CT with its study's most accurate trial, in the tuned table
  accurate = checkpoint.read_metadata(workdir / "unlearned" / "ct@accurate")["hparams"]
  trial = best["most_accurate_trial"]["params"]
  assert {k: accurate[k] for k in trial} == trial
  assert "**objective10's choice against the most accurate trial**" in text
  assert "| ct@accurate |" in text.split("## Tuned methods")[1].split("## Reference defaults")[0]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # one row per model (original and retrained of each seed) and epoch
  assert sorted((r["model"], r["epoch"]) for r in rows) == sorted(
      (f"{g}/{s}", e) for g in ("original", "retrain") for s in (0, 1) for e in (1, 2))
  assert not (workdir / "checkpoints" / "train").exists()  # removed once the stage is done


def _population_mia(forget, other, rng):
  """The reference's evaluate_mia_on_pointwise_losses, written out (deepunlearn-spec 6.2), on the
  NumPy stream ``rng``."""
  other, forget = other.copy(), forget.copy()
  rng.shuffle(other)
  rng.shuffle(forget)
  m = min(len(forget), len(other))
  x = np.concatenate([forget[:m], other[:m]])[:, None]
  y = np.r_[np.zeros(m), np.ones(m)]
  cv = StratifiedShuffleSplit(n_splits=10, test_size=0.1, random_state=123)
  return cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean()


def test_row_metrics_match_an_independent_computation(tiny_run):
  workdir, _ = tiny_run
  config = _tiny_config()
  dataset = common.load_dataset(config.dataset)
  model = models.get(config.model.name, dataset.num_classes)
  like = common.abstract_variables(model, 2, dataset.inputs.shape[1:])
  parts = dict(np.load(workdir / "splits.npz"))
  seed = 1
  x = (dataset.inputs.astype(np.float64) / 255 - config.data.mean[0]) / config.data.std[0]

  def one(path):  # model `seed` of the stack: logits per split, flat float64 params
    variables = jax.tree.map(lambda v: np.asarray(v[seed]), checkpoint.restore(path, like))
    out = {s: np.asarray(model.apply(variables, x[parts[s]].astype(np.float32), train=False),
                         np.float64) for s in deepunlearn.SPLITS}
    flat = np.concatenate([np.ravel(v).astype(np.float64)
                           for v in jax.tree.leaves(variables["params"])])
    return out, flat

  ct, ct_params = one(workdir / "unlearned" / "ct")
  retrain, retrain_params = one(workdir / "models" / "retrain")
  original, original_params = one(workdir / "models" / "original")
  acc = lambda logits: {s: np.mean(logits[s].argmax(1) == dataset.labels[parts[s]])
                        for s in deepunlearn.SPLITS}
  a, r = acc(ct), acc(retrain)
  loss = {s: -log_softmax(ct[s], 1)[np.arange(len(parts[s])), dataset.labels[parts[s]]]
          for s in deepunlearn.SPLITS}
  stream = np.random.RandomState(123)  # the reference's evaluator seeds once: Val-, then Test-MIA
  val_mia = _population_mia(loss["forget"], loss["val"], stream)
  test_mia = _population_mia(loss["forget"], loss["test"], stream)
  times = json.loads((workdir / "times.json").read_text())
  seconds = checkpoint.read_metadata(workdir / "unlearned" / "ct")["seconds"] / 2
  unit = lambda v: v / np.linalg.norm(v)
  expected = {
      **{f"{s}_acc": a[s] for s in deepunlearn.SPLITS},
      "val_mia": val_mia, "test_mia": test_mia,
      "indisc": 1 - abs(2 * test_mia - 1),
      "rr": a["retain"] / r["retain"], "fr": a["forget"] / r["forget"],
      "tr": a["test"] / r["test"],
      "retdev": sum(abs(a[s] / r[s] - 1) for s in ("retain", "forget", "test")),
      "seconds": seconds, "rte": times["seconds_per_model"] / seconds,
      "l2_to_original": np.linalg.norm(ct_params - original_params),
      "l2_to_retrain": np.linalg.norm(ct_params - retrain_params),
      "normalized_l2_to_retrain": np.linalg.norm(unit(ct_params) - unit(retrain_params)),
      "golatkar_to_original": np.linalg.norm(ct_params - original_params)
                              / np.linalg.norm(ct_params),
  }
  row = next(r for r in report.read_csv(workdir / "results.csv")
             if r["method"] == "ct" and r["seed"] == seed)
  for name, value in expected.items():
    tolerance = 0.01 if name.endswith("mia") or name == "indisc" else 1e-5
    np.testing.assert_allclose(row[name], value, rtol=tolerance, atol=tolerance, err_msg=name)
  assert a["forget"] != r["forget"] or a["retain"] != r["retain"]  # a non-trivial RetDev


def test_changed_hparams_rerun_only_that_method_and_the_report_says_so(tiny_run, tmp_path):
  workdir = _copy(tiny_run[0], tmp_path)
  before = _finished(workdir)
  deepunlearn.run(_tiny_config(), workdir)  # nothing changed: everything reused
  assert _finished(workdir) == before

  config = _tiny_config()
  config.unlearn.finetune.learning_rate = 0.01
  deepunlearn.run(config, workdir)
  after = _finished(workdir)
  rerun = {s for s in after if after[s] != before[s]}
  assert rerun == {"unlearn_finetune", "evaluate", "report"}
  assert _manifest(workdir, "unlearn_finetune")["reason"] == "config changed"
  text = (workdir / "report.md").read_text()
  assert ("Stages recomputed in this run: unlearn_finetune (config changed), evaluate "
          "(input 'unlearn_finetune' changed), report (input 'evaluate' changed).") in text
  assert ("Stages reused from earlier runs: splits, init, train, search_ct, unlearn_ct, "
          "unlearn_ct@accurate.") in text


def test_ulira_stage_uses_the_search_of_the_run_and_the_report_shows_it(tiny_run, tmp_path):
  """U-LiRA enabled on a finished run: only its sub-stages and the report run; CT unlearns with
  the searched hyper-parameters; the report has its column, section and ROC figure."""
  workdir = _copy(tiny_run[0], tmp_path)
  before = _finished(workdir)
  config = _tiny_config()
  config.ulira.enabled = True
  config.ulira.lira.num_splits, config.ulira.lira.num_forget_draws = 4, 2
  config.ulira.lira.forget_ratio = 0.5
  config.ulira.epochs = 1
  config.ulira.methods = ("original", "ct")
  assert deepunlearn.run(config, workdir) == workdir / "report.md"
  after = _finished(workdir)
  assert {s for s in after if after[s] != before[s]} == {"report"}
  assert _manifest(workdir, "report")["reason"] == "config changed"
  ulira_dir = workdir / "ulira"
  assert set(_finished(ulira_dir)) == {"splits", "init", "train", "unlearn_original",
                                       "unlearn_ct", "ulira"}  # no report of its own
  rows = {r["method"]: r for r in report.read_csv(ulira_dir / "ulira.csv")}
  assert (rows["ct"]["hparams"], rows["original"]["hparams"]) == ("search", "defaults")
  best = json.loads((workdir / "search" / "ct.json").read_text())["best_params"]
  used = json.loads((ulira_dir / "unlearned" / "ct.json").read_text())["hparams"]
  assert {k: used[k] for k in best} == best
  text = (workdir / "report.md").read_text()
  assert "| U-LiRA |" in text and "## U-LiRA" in text
  ct = rows["ct"]
  assert f"{ct['balanced_accuracy']:.3f} [{ct['ci_low']:.3f}, {ct['ci_high']:.3f}]" in text
  assert (workdir / report.ULIRA_FIGURE).exists() and f"]({report.ULIRA_FIGURE})" in text
  assert "ulira/train (new)" in text
  deepunlearn.run(config, workdir)  # everything reused, U-LiRA's sub-stages included
  assert _finished(workdir) == after and set(_finished(ulira_dir)) == {
      "splits", "init", "train", "unlearn_original", "unlearn_ct", "ulira"}


def test_stop_after_search_continues_the_study_and_stops(tiny_run, tmp_path):
  workdir = _copy(tiny_run[0], tmp_path)
  before = _finished(workdir)
  config = _tiny_config()
  config.search.trials = 3
  config.stop_after = "search"
  path = deepunlearn.run(config, workdir)
  assert path.parent == workdir / "search"
  assert json.loads((path / "ct.json").read_text())["trials_complete"] == 3
  assert deepunlearn.search.load_best(path, "ct").trials_complete == 3
  assert deepunlearn.search.load_best(workdir / "search", "ct").trials_complete == 3
  assert _finished(workdir) == before  # no stage after the search ran


def test_changed_training_reruns_its_dependents_and_new_studies(tiny_run, tmp_path):
  workdir = _copy(tiny_run[0], tmp_path)
  before = _finished(workdir)
  config = _tiny_config()
  config.train.epochs = 3
  config.methods = ("finetune",)
  deepunlearn.run(config, workdir)
  assert _manifest(workdir, "splits")["finished"] == before["splits"]
  assert _manifest(workdir, "train")["reason"] == "config changed"
  assert _manifest(workdir, "unlearn_finetune")["reason"] == "input 'train' changed"
  assert _manifest(workdir, "evaluate")["reason"] == "input 'train' changed"
  assert {r["method"] for r in report.read_csv(workdir / "results.csv")} == {
      "original", "retrain", "finetune"}


def test_tuning_seeds_must_be_a_subset_of_the_seeds(tmp_path):
  config = _tiny_config()
  config.search.seeds = (0, 7)
  with pytest.raises(ValueError, match=r"search.seeds: \(0, 7\) must be a non-empty subset"):
    deepunlearn.run(config, tmp_path)


def test_stop_after_and_bad_stage(tmp_path):
  config = _tiny_config()
  config.stop_after = "init"
  deepunlearn.run(config, tmp_path)
  assert (tmp_path / "models" / "init").exists()
  assert not (tmp_path / "models" / "original").exists()
  config.stop_after = "trainn"
  with pytest.raises(ValueError, match="not a stage"):
    deepunlearn.run(config, tmp_path)


def test_splits_are_the_reference_calls_on_digits(tmp_path):
  from sklearn.model_selection import train_test_split
  config = _tiny_config()
  config.stop_after = "splits"
  deepunlearn.run(config, tmp_path)
  saved = np.load(tmp_path / "splits.npz")
  train, val = train_test_split(np.arange(1437), test_size=0.15, random_state=123)
  retain, forget = train_test_split(train, test_size=0.10, random_state=123)
  np.testing.assert_array_equal(saved["retain"], retain)
  np.testing.assert_array_equal(saved["forget"], forget)
  np.testing.assert_array_equal(saved["val"], val)


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "jaxmu", "deepunlearn", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_config_typo_exits_nonzero_with_clear_message(tmp_path):
  out = _launch("--config=quickstart", f"--workdir={tmp_path}",
                "--config.trian.epochs=3")
  assert out.returncode == 2
  assert 'Did you mean "train"' in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "stages").exists()


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10", "cifar100", "utkface",
                                     "digits"])
def test_every_dataset_model_pair_has_a_reference_config(dataset):
  from jaxmu.configs import deepunlearn as configs
  for model in ("resnet18", "tinyvit_11m"):
    config = configs.get_config(f"dataset={dataset},model={model}")
    assert config.train.learning_rate == 0.1 and config.train.momentum == 0.9
    assert config.train.weight_decay == 5e-4
    assert config.train.epochs == {"cifar10": 182, "cifar100": 182, "digits": 30}.get(dataset, 50)
    assert config.train.batch_size == (128 if dataset == "utkface" else 256)
    assert config.seeds == tuple(range(10)) and len(config.methods) == 18
    assert (config.search.mode, config.search.trials, config.search.seeds) == ("nsga3", 100,
                                                                               (0, 1, 2))
    assert config.search.methods == config.methods
    models.get(model, 10, **config.model.options.to_dict())  # builds
  with pytest.raises(ValueError, match="unknown config arguments"):
    configs.get_config(f"dataset={dataset},modle=resnet18")
