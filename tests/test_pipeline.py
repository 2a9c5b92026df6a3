"""The DeepUnlearn reference-model pipeline end to end on a tiny config, and its launcher."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import quickstart
from jaxmu import report
from jaxmu.pipelines import deepunlearn

ROOT = Path(__file__).resolve().parents[1]


def _tiny_config():
  config = quickstart.get_config()
  config.seeds = (0, 1)
  config.train.epochs = 2
  config.checkpoint_every = 1
  config.methods = ("finetune",)
  config.unlearn.finetune.num_epochs = 1
  return config


def _manifest(workdir, stage):
  return json.loads((workdir / "stages" / f"{stage}.json").read_text())


def test_pipeline_runs_skips_and_reruns_what_changed(tmp_path):
  config = _tiny_config()
  path = deepunlearn.run(config, tmp_path)
  assert path == tmp_path / "report.md"
  rows = report.read_csv(tmp_path / "results.csv")
  assert [(r["method"], r["seed"]) for r in rows] == [
      ("original", 0), ("original", 1), ("retrain", 0), ("retrain", 1), ("finetune", 0),
      ("finetune", 1)]
  assert rows[-1]["seconds"] > 0
  for row in rows:
    for split in deepunlearn.SPLITS:
      assert 0.0 <= row[f"{split}_acc"] <= 1.0
  text = path.read_text()
  assert "| original | 2 |" in text and "| retrain | 2 |" in text and "| finetune | 2 |" in text
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # one line per epoch
  assert not (tmp_path / "checkpoints" / "train").exists()  # removed once the stage is done

  stage_names = [s.stem for s in (tmp_path / "stages").glob("*.json")]
  assert "unlearn_finetune" in stage_names
  before = {s: _manifest(tmp_path, s)["finished"] for s in stage_names}
  deepunlearn.run(config, tmp_path)
  assert {s: _manifest(tmp_path, s)["finished"] for s in stage_names} == before

  config.train.epochs = 3
  deepunlearn.run(config, tmp_path)
  assert _manifest(tmp_path, "splits")["finished"] == before["splits"]
  assert _manifest(tmp_path, "train")["reason"] == "config changed"
  assert _manifest(tmp_path, "unlearn_finetune")["reason"] == "input 'train' changed"
  assert _manifest(tmp_path, "evaluate")["reason"] == "input 'train' changed"

  config.unlearn.finetune.learning_rate = 0.01  # only that method and what reads it rerun
  before = {s: _manifest(tmp_path, s)["finished"] for s in stage_names}
  deepunlearn.run(config, tmp_path)
  assert _manifest(tmp_path, "train")["finished"] == before["train"]
  assert _manifest(tmp_path, "unlearn_finetune")["reason"] == "config changed"


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
  return subprocess.run([sys.executable, "launch/deepunlearn.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_config_typo_exits_nonzero_with_clear_message(tmp_path):
  out = _launch("--config=configs/quickstart.py", f"--workdir={tmp_path}",
                "--config.trian.epochs=3")
  assert out.returncode == 2
  assert 'Did you mean "train"' in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "stages").exists()


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10", "cifar100", "utkface",
                                     "digits"])
def test_every_dataset_model_pair_has_a_reference_config(dataset):
  from configs import deepunlearn as configs
  from jaxmu import models
  for model in ("resnet18", "tinyvit_11m"):
    config = configs.get_config(f"dataset={dataset},model={model}")
    assert config.train.learning_rate == 0.1 and config.train.momentum == 0.9
    assert config.train.weight_decay == 5e-4
    assert config.train.epochs == {"cifar10": 182, "cifar100": 182, "digits": 30}.get(dataset, 50)
    assert config.train.batch_size == (128 if dataset == "utkface" else 256)
    models.get(model, 10, **config.model.options.to_dict())  # builds
  with pytest.raises(ValueError, match="unknown config arguments"):
    configs.get_config(f"dataset={dataset},modle=resnet18")
