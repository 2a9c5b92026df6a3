"""Smoke runs of the shipped recipes (jaxmu/configs/deepunlearn.py, ulira.py, iam.py), in process.

Mock data of the real shape and class count (tfds mock data; generated UTKFace and CINIC-10 image
folders and a Purchase-100 text file, `jaxmu.smoke.fake_*`, read by the real loaders), sized for
one or two batches per epoch; every config goes through the one smoke override (`jaxmu.smoke`):
the recipe's stages, break counts, K values, method and attack lists; tiny models of the same
kind, 2 seeds, 2 trials, 2 x 2 LiRA splits, few epochs.

Two full runs (DeepUnlearn CIFAR-10 ResNet-18 with U-LiRA, and U-LiRA alone on its search; IAM
CIFAR-100 exact) run every stage and method and write every report. The other datasets, models,
unlearning types and settings add no stages of their own: they run up to the stages that read
their data, models and types (``config.stop_after``), in one worker process whose XLA backend
compiles at optimisation level 1 (`CHILD_XLA_FLAGS`), sharing its compiled programs across tests.
"""

import concurrent.futures
import json
import multiprocessing

import numpy as np
import pytest

from jaxmu.configs import deepunlearn as deepunlearn_configs
from jaxmu.configs import iam as iam_configs
from jaxmu.configs import ulira as ulira_configs
from jaxmu import report, smoke
from jaxmu.pipelines import deepunlearn, iam

pytestmark = pytest.mark.e2e

# XLA's CPU backend at optimisation level 1 instead of the default: the tiny models' programs
# compile about twice as fast, and run as fast (measured on 2 cores: an IAM run to its signals
# stage took 29 CPU-seconds instead of 56, the same run compiled 8.5 s either way).
CHILD_XLA_FLAGS = "--xla_backend_optimization_level=1"
MOCK = 300  # tfds mock records per split: 255 training samples, one batch of 256 per epoch


@pytest.fixture(scope="module")
def child():
  """``child(pipeline, config, workdir, mock_examples)``: `smoke.run` in one worker process of
  this module (spawned, `CHILD_XLA_FLAGS`), which keeps its compiled programs between tests."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context,
                                              initializer=smoke.add_xla_flags,
                                              initargs=(CHILD_XLA_FLAGS,)) as pool:
    def run(pipeline, config, workdir, mock_examples=0):
      return pool.submit(smoke.run, pipeline, config.to_dict(), str(workdir),
                         mock_examples).result()
    yield run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Fake UTKFace and CINIC-10 folders and a Purchase-100 file (`jaxmu.smoke.fake_*`)."""
  root = tmp_path_factory.mktemp("datasets")
  return {"utkface": smoke.fake_utkface(root / "utkface"),
          "cinic10": smoke.fake_cinic10(root / "cinic10"),
          "purchase100": smoke.fake_purchase100(root / "purchase100")}


def _stages(workdir):
  return {p.stem for p in (workdir / "stages").glob("*.json")}


# ------------------------------------------------------------------ DeepUnlearn and U-LiRA


@pytest.fixture(scope="module")
def deepunlearn_cifar10(tmp_path_factory):
  """jaxmu/configs/deepunlearn.py (cifar10, resnet18) with its U-LiRA stage, in this process."""
  config = smoke.smoke(deepunlearn_configs.get_config("dataset=cifar10,model=resnet18"),
                       max_epochs=20)
  config.ulira.enabled = True
  workdir = tmp_path_factory.mktemp("deepunlearn_cifar10")
  smoke.run("deepunlearn", config, workdir, MOCK)
  return config, workdir


def test_deepunlearn_cifar10_resnet18_with_ulira(deepunlearn_cifar10):
  """18 methods, NSGA-III search, U-LiRA (20 epochs)."""
  config, workdir = deepunlearn_cifar10
  assert (workdir / "report.md").exists() and (workdir / "results.csv").exists()
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
  stages = smoke.run("ulira", config, tmp_path, MOCK)
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
def test_deepunlearn_dataset_and_model(dataset, model, child, files, tmp_path):
  """The recipe through its evaluate stage (data, splits, the model at the recipe's input size,
  one training epoch of originals and retrained models, every metric) with one epoch of
  `finetune` in place of the 18 methods, which run above."""
  config = smoke.smoke(deepunlearn_configs.get_config(f"dataset={dataset},model={model}"),
                       max_epochs=1)
  config.methods, config.search.methods, config.stop_after = ("finetune",), (), "evaluate"
  config.unlearn.finetune.num_epochs = 1
  if dataset in files:
    config.dataset.data_dir = str(files[dataset])
  stages = child("deepunlearn", config, tmp_path, MOCK)
  assert stages == ["evaluate", "init", "splits", "train", "unlearn_finetune"]
  parts = np.load(tmp_path / "splits.npz")
  n_train = 120 if dataset == "utkface" else MOCK  # the UTKFace folder's 80 / 20 split
  assert len(parts["retain"]) + len(parts["forget"]) + len(parts["val"]) == n_train
  assert len(parts["forget"]) == -(-(n_train - len(parts["val"])) // 10)
  rows = report.read_csv(tmp_path / "results.csv")
  assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
      (m, s) for m in ("original", "retrain", "finetune") for s in config.seeds)
  assert all(0 <= r[f"{s}_acc"] <= 1 for r in rows for s in deepunlearn.SPLITS)
  assert all(np.isfinite(r["test_mia"]) and not r["failure"] for r in rows)


# ------------------------------------------------------------------ IAM


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


def test_iam_cifar100_exact(tmp_path):
  """jaxmu/configs/iam.py (cifar100, exact, set_random): 20 breaks, K up to 10 (20 epochs)."""
  config = smoke.smoke(iam_configs.get_config("dataset=cifar100,forget=set_random"), scale=0.01,
                       max_epochs=20)
  smoke.run("iam", config, tmp_path, 400)
  _check_iam(config, tmp_path)


IAM_SCALE = 0.005  # CIFAR / CINIC shadow pool 100, pool 200 (100), Purchase pool 1,800


def _iam(argument, files, stop_after, **sections):
  """jaxmu/configs/iam.py:``argument`` smoked to one epoch, reading the fake files, up to
  ``stop_after``; ``sections``: dotted fields to set (the setting's inputs)."""
  config = smoke.smoke(iam_configs.get_config(argument), scale=IAM_SCALE, max_epochs=1)
  for spec in (config.dataset, config.shadow_dataset):
    if spec.name in files:
      spec.data_dir = str(files[spec.name])
  for field, value in sections.items():
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.stop_after = stop_after
  return config


def _check_signals(config, workdir, num_classes, pool, shadow_pool=None):
  """The signals stage's arrays have the recipe's K shadows, the runs of its unlearning types
  and the dataset's classes."""
  signals = {n: np.load(workdir / "signals" / f"{n}.npy") for n in iam.SIGNAL_FILES}
  parts = np.load(workdir / "splits.npz")
  n_runs = sum(k.startswith("flags_") for k in parts.files)
  k, c = config.num_shadows, num_classes
  assert signals["query_shadows"].shape == (k, pool, c)
  assert signals["query_original"].shape == (1, pool, c)
  assert signals["query_retrain"].shape == (n_runs, pool, c)
  assert signals["pool_shadows"].shape == (k, shadow_pool or len(parts["shadow_pool"]), c)
  assert all(np.isfinite(a).all() for a in signals.values())
  return signals


def _types(config):
  return config.split.forget.split("+")


# The datasets of jaxmu/configs/iam.py (CIFAR-100 runs above), with every unlearning type: their
# data, splits (every run forgets something), the CIFAR-stem ResNet-18 / Purchase MLP shadows,
# ref_in and targets, and the signals the attacks read. The attacks run on CIFAR-100 above (their
# BinUI over the K sweep: 45 CPU-seconds more per dataset). Every run must forget something: a
# class_percentage run of a class with < 10 pool samples forgets none, and its binui then fails
# with "scores contain NaN or infinite values" (seen with a 1,500-row Purchase file).
IAM_DATASETS = {"cifar10": ("dataset=cifar10", 10, 200),  # set_random + class_percentage
                "cinic10": ("dataset=cinic10,forget=one_class", 10, 100),
                "purchase100": ("dataset=purchase100", 100, 1800)}


@pytest.fixture(scope="module")
def iam_cifar10(child, files, tmp_path_factory):
  """jaxmu/configs/iam.py (cifar10: set_random + class_percentage) up to signals: the run the
  settings below continue or reuse."""
  config = _iam(IAM_DATASETS["cifar10"][0], files, "signals")
  workdir = tmp_path_factory.mktemp("iam_cifar10")
  return config, workdir, child("iam", config, workdir, MOCK)


@pytest.mark.parametrize("dataset", IAM_DATASETS)
def test_iam_dataset_and_unlearning_types(dataset, iam_cifar10, child, files, tmp_path):
  argument, num_classes, pool = IAM_DATASETS[dataset]
  if dataset == "cifar10":
    config, workdir, stages = iam_cifar10
  else:
    config, workdir = _iam(argument, files, "signals"), tmp_path
    stages = child("iam", config, workdir, MOCK)
  assert stages == sorted(IAM_STAGES[:IAM_STAGES.index(config.stop_after) + 1])
  _check_signals(config, workdir, num_classes, pool)
  types = _types(config)
  runs = [len(config.seeds) if t == "set_random" else len(config.split.forget_classes)
          for t in types]
  parts = np.load(workdir / "splits.npz")
  flags = [parts[f"flags_{r}"] for r in range(sum(runs))]
  assert len(flags) == sum(runs) and f"flags_{sum(runs)}" not in parts.files
  assert all(f.any() for f in flags)  # every run forgets something


def test_iam_arch_shadows_with_reused_targets(iam_cifar10, child, files, tmp_path):
  """setting=arch (Fig. 4): VGG-11 shadows of the CIFAR-stem ResNet-18 targets, which are taken
  from the finished cifar10 run (``reuse.targets``, as the architecture matrix does)."""
  _, base, _ = iam_cifar10
  config = _iam("dataset=cifar10,setting=arch,shadow=vgg11", files, "signals",
                **{"reuse.targets": str(base)})
  child("iam", config, tmp_path, MOCK)
  signals = _check_signals(config, tmp_path, 10, 200)
  trained = {json.loads(line)["stage"] for line in (tmp_path / "metrics.jsonl").open()}
  assert trained == {"shadows"}  # the targets and ref_in were taken as they are
  original = np.load(base / "signals" / "query_original.npy")
  assert np.array_equal(signals["query_original"], original)  # the reused targets' logits
  assert not np.array_equal(signals["query_shadows"],
                            np.load(base / "signals" / "query_shadows.npy"))


def test_iam_shifted_shadows_on_cinic10(iam_cifar10, child, files, tmp_path):
  """setting=shifted (Table 3): CIFAR-10 targets (reused from the cifar10 run), shadows trained
  on CINIC-10 (the fake folder) with CINIC-10's normalisation."""
  _, base, _ = iam_cifar10
  config = _iam("dataset=cifar10,setting=shifted", files, "signals",
                **{"shadow_dataset.name": "cinic10", "shadow_dataset.data_dir": str(files["cinic10"]),
                   "reuse.targets": str(base)})
  child("iam", config, tmp_path, MOCK)
  shadow_size = config.shadow_dataset.shadow_size
  _check_signals(config, tmp_path, 10, 200, shadow_pool=shadow_size)
  parts = np.load(tmp_path / "splits.npz")
  assert len(parts["shadow_pool"]) == shadow_size
  assert parts["shadow_pool"].max() < 200  # indices of CINIC-10's training part


def test_iam_incremental_cinic10_on_the_cifar10_run(iam_cifar10, child, files, tmp_path):
  """setting=incremental (Table 4): the cifar10 run's original and retrained models keep training
  on a CINIC-10 pool of ``incremental.pool_size``; its shadows are the cifar10 run's."""
  base_config, base, _ = iam_cifar10
  config = _iam("dataset=cinic10,setting=incremental,forget=set_random", files, "signals",
                **{"incremental.base_workdir": str(base)})
  child("iam", config, tmp_path, MOCK)
  pool = config.incremental.pool_size
  _check_signals(config, tmp_path, 10, pool)
  parts = np.load(tmp_path / "splits.npz")
  assert len(parts["pool"]) == pool
  base_parts = np.load(base / "splits.npz")
  assert np.array_equal(parts["shadow_pool"], base_parts["shadow_pool"])
  assert len(base_config.seeds) == len(config.seeds)


def test_iam_reuse_of_shadows_and_targets(iam_cifar10, child, files, tmp_path):
  """``reuse.shadows`` and ``reuse.targets`` of the finished cifar10 run: nothing trains, and the
  signals are the run's own."""
  config, base, _ = iam_cifar10
  config = _iam(IAM_DATASETS["cifar10"][0], files, "signals",
                **{"reuse.shadows": str(base), "reuse.targets": str(base)})
  child("iam", config, tmp_path, MOCK)
  for name in iam.SIGNAL_FILES:
    assert np.array_equal(np.load(tmp_path / "signals" / f"{name}.npy"),
                          np.load(base / "signals" / f"{name}.npy")), name
  metrics = tmp_path / "metrics.jsonl"
  assert not metrics.exists() or not metrics.read_text().strip()  # nothing trained
