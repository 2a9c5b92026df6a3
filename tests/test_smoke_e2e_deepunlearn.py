"""Smoke runs of the shipped DeepUnlearn and U-LiRA recipes (jaxmu/configs/deepunlearn.py,
ulira.py), in process, through the one smoke override (`jaxmu.smoke`): the recipe's stages, split
ratios, method lists and searches; tiny models of the same kind, 2 seeds, 2 trials, 2 x 2 LiRA
splits, few epochs of one step each (`engine.step_cap`).

The full run (CIFAR-10 ResNet-18 with U-LiRA, then U-LiRA alone on its search) reads tfds mock
data of CIFAR-10's real size and runs every stage and method. The other datasets and models add
no stages of their own: they run to the evaluate stage (``config.stop_after``) on mock data of
their real size (UTKFace: the fake folder), in the worker process of `smoke_child`.
"""

import json

import numpy as np
import pytest

from jaxmu.configs import deepunlearn as deepunlearn_configs
from jaxmu.configs import ulira as ulira_configs
from jaxmu import report, smoke
from jaxmu.data import sources
from jaxmu.pipelines import deepunlearn

pytestmark = pytest.mark.e2e


def _stages(workdir):
  return {p.stem for p in (workdir / "stages").glob("*.json")}


@pytest.fixture(scope="module")
def deepunlearn_cifar10(tmp_path_factory):
  """jaxmu/configs/deepunlearn.py (cifar10, resnet18) with its U-LiRA stage, in this process, on
  mock data of CIFAR-10's real size, 20 epochs of one step each."""
  config = smoke.smoke(deepunlearn_configs.get_config("dataset=cifar10,model=resnet18"),
                       max_epochs=20)
  config.ulira.enabled = True
  workdir = tmp_path_factory.mktemp("deepunlearn_cifar10")
  smoke.run("deepunlearn", config, workdir, None, max_steps=1)
  return config, workdir


def test_deepunlearn_cifar10_resnet18_with_ulira(deepunlearn_cifar10):
  """18 methods, NSGA-III search, U-LiRA (20 epochs)."""
  config, workdir = deepunlearn_cifar10
  assert (workdir / "report.md").exists() and (workdir / "results.csv").exists()
  parts = np.load(workdir / "splits.npz")
  assert len(parts["retain"]) + len(parts["forget"]) + len(parts["val"]) == 50000
  assert len(parts["forget"]) == -(-(50000 - len(parts["val"])) // 10)
  rows = (workdir / "results.csv").read_text().splitlines()[1:]
  methods = {r.split(",")[0] for r in rows}
  assert set(config.methods) | {"original", "retrain"} <= methods
  for method in config.search.methods:
    assert json.loads((workdir / "search" / f"{method}.json").read_text())
  assert "U-LiRA" in (workdir / "report.md").read_text()
  unlearned = {f"unlearn_{m}" for m in config.methods}
  assert {"splits", "init", "train", "evaluate", "report", *unlearned} <= _stages(workdir)
  ulira = {f"unlearn_{m}" for m in config.ulira.methods}
  assert {"splits", "init", "train", "ulira", *ulira} <= _stages(workdir / "ulira")
  assert (workdir / "ulira" / "ulira.csv").exists()


def test_ulira_alone_on_the_search_of_a_deepunlearn_run(deepunlearn_cifar10, tmp_path):
  """jaxmu/configs/ulira.py (`jaxmu ulira`, cifar10, resnet18) with ``search_dir`` = the DeepUnlearn
  run's ``search/``: every sub-stage, its own report. Same process, models and epochs as that
  run's U-LiRA stage, so its programs are compiled already."""
  _, main = deepunlearn_cifar10
  config = smoke.smoke(ulira_configs.get_config("dataset=cifar10,model=resnet18"), max_epochs=20)
  config.search_dir = str(main / "search")
  methods = [m for m in config.ulira.methods if m != "original"]
  stages = smoke.run("ulira", config, tmp_path, None, max_steps=1)
  assert set(stages) == {"splits", "init", "train", "ulira", "report",
                         *(f"unlearn_{m}" for m in config.ulira.methods)}
  for name in ("report.md", "roc.png", "ulira.csv", "splits.npz"):
    assert (tmp_path / name).exists(), name
  assert {r["method"] for r in report.read_csv(tmp_path / "ulira.csv")} == set(config.ulira.methods)
  # Each searched method ran with the DeepUnlearn search's best trial.
  for method in methods:
    best = json.loads((main / "search" / f"{method}.json").read_text())["best_params"]
    record = json.loads((tmp_path / "unlearned" / f"{method}.json").read_text())
    assert record["source"] == "search", method
    assert best.items() <= record["hparams"].items(), method


# Each dataset of jaxmu/configs/deepunlearn.py with one of its shipped models, each model at both
# input sizes (TinyViT at 32 and 224 px: img_size follows the dataset); ResNet-18 on CIFAR-10 runs
# above. (UTKFace with ResNet-18, 18 CPU-seconds more, adds no path of its own.)
DEEPUNLEARN_PAIRS = (("mnist", "tinyvit_11m"), ("fashion_mnist", "resnet18"),
                     ("cifar100", "resnet18"), ("utkface", "tinyvit_11m"))


@pytest.mark.parametrize("dataset,model", DEEPUNLEARN_PAIRS)
def test_deepunlearn_dataset_and_model(dataset, model, smoke_child, fake_files, tmp_path):
  """The recipe through its evaluate stage (data of the real size, splits, the model at the
  recipe's input size, one training epoch of one step of originals and retrained models, every
  metric) with one epoch of `finetune` in place of the 18 methods, which run above."""
  config = smoke.smoke(deepunlearn_configs.get_config(f"dataset={dataset},model={model}"),
                       max_epochs=1)
  config.methods, config.search.methods, config.stop_after = ("finetune",), (), "evaluate"
  config.unlearn.finetune.num_epochs = 1
  if dataset in fake_files:
    config.dataset.data_dir = str(fake_files[dataset])
  stages = smoke_child("deepunlearn", config, tmp_path, None, max_steps=1)  # tfds: the real sizes
  assert stages == ["evaluate", "init", "splits", "train", "unlearn_finetune"]
  parts = np.load(tmp_path / "splits.npz")
  n_train = 120 if dataset == "utkface" else sources.KNOWN[dataset].num_train  # fake UTKFace: 80/20
  assert len(parts["retain"]) + len(parts["forget"]) + len(parts["val"]) == n_train
  assert len(parts["forget"]) == -(-(n_train - len(parts["val"])) // 10)
  rows = report.read_csv(tmp_path / "results.csv")
  assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
      (m, s) for m in ("original", "retrain", "finetune") for s in config.seeds)
  assert all(0 <= r[f"{s}_acc"] <= 1 for r in rows for s in deepunlearn.SPLITS)
  assert all(np.isfinite(r["test_mia"]) and not r["failure"] for r in rows)


