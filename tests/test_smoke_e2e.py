"""Smoke runs of the shipped recipes (jaxmu/configs/deepunlearn.py, iam.py) end to end, in process.

Mock data of the real shape and class count (tfds mock data, a generated Purchase file), sized
for one or two batches per epoch; every config goes through the one smoke override (`jaxmu.smoke`):
the recipe's stages, break counts, K values, method and attack lists; tiny models of the same kind,
2 seeds, 2 trials, 2 x 2 LiRA splits, 20 epochs. Each test asserts that every stage ran and every
report was written.
"""

import json

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_base

from jaxmu.configs import deepunlearn as deepunlearn_configs
from jaxmu.configs import iam as iam_configs
from jaxmu import smoke
from jaxmu.pipelines import deepunlearn, iam

pytestmark = pytest.mark.e2e


@pytest.fixture
def mock_tfds(monkeypatch):
  """`num_examples` random records per split (see tests/test_data.py for the `__getitems__` fix)."""
  monkeypatch.setattr(tfds_base.BaseDataSource, "__getitems__",
                      lambda self, keys: [self[k] for k in keys])

  def mock(num_examples):
    return tfds.testing.mock_data(num_examples=num_examples)
  return mock


@pytest.fixture
def tiny():
  with smoke.tiny_models():
    yield


def _stages(workdir):
  return {p.stem for p in (workdir / "stages").glob("*.json")}


def test_deepunlearn_cifar10_resnet18_with_ulira(mock_tfds, tiny, tmp_path):
  """jaxmu/configs/deepunlearn.py (cifar10, resnet18): 18 methods, NSGA-III search, U-LiRA (20 epochs)."""
  config = smoke.smoke(deepunlearn_configs.get_config("dataset=cifar10,model=resnet18"),
                       max_epochs=20)
  config.ulira.enabled = True
  with mock_tfds(300):
    deepunlearn.run(config, tmp_path)
  assert (tmp_path / "report.md").exists() and (tmp_path / "results.csv").exists()
  rows = (tmp_path / "results.csv").read_text().splitlines()[1:]
  methods = {r.split(",")[0] for r in rows}
  assert set(config.methods) | {"original", "retrain"} <= methods
  for method in config.search.methods:
    assert json.loads((tmp_path / "search" / f"{method}.json").read_text())
  assert "U-LiRA" in (tmp_path / "report.md").read_text()
  unlearned = {f"unlearn_{m}" for m in config.methods}
  assert {"splits", "init", "train", "evaluate", "report", *unlearned} <= _stages(tmp_path)
  ulira = {f"unlearn_{m}" for m in config.ulira.methods}
  assert {"splits", "init", "train", "ulira", *ulira} <= _stages(tmp_path / "ulira")
  assert (tmp_path / "ulira" / "ulira.csv").exists()


IAM_STAGES = ("splits", "shadows", "ref_in", "targets", "signals", "binui", "scoring", "score_ui",
              "approx", "report")
IAM_OUTPUTS = ("binui.csv", "scoring.csv", "score_ui.csv", "approx.csv", "approx_class.csv",
               "report.md", "results.csv")


def _check_iam(config, workdir):
  for name in IAM_OUTPUTS:
    assert (workdir / name).exists(), name
  approx = {f"approx_{m}" for m in config.approx.methods}
  assert {*IAM_STAGES, *approx} <= _stages(workdir)
  binui = (workdir / "binui.csv").read_text()
  assert all(attack in binui for attack in config.audit.attacks)


def test_iam_cifar100_exact(mock_tfds, tiny, tmp_path):
  """jaxmu/configs/iam.py (cifar100, exact, set_random): 20 breaks, K up to 10 (20 epochs)."""
  config = smoke.smoke(iam_configs.get_config("dataset=cifar100,forget=set_random"), scale=0.01,
                       max_epochs=20)
  with mock_tfds(400):
    iam.run(config, tmp_path)
  _check_iam(config, tmp_path)

