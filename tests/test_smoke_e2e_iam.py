"""Smoke runs of the shipped IAM recipes (jaxmu/configs/iam.py), in process, through the one smoke
override (`jaxmu.smoke`): the recipe's stages, split sizes, break counts, K values, attack and
method lists; tiny models of the same kind, 2 seeds, 1 ScoreUI start model, 2 shadow groups per
K, few epochs.

CIFAR-100 (exact) runs every stage and writes every report on mock data of the real size with the
recipe's pool and split sizes, one step per epoch (`engine.step_cap`). The other datasets,
unlearning types and settings add no stages of their own: they run up to the signals stage on
small files (tfds mock data of `MOCK` records, the fake CINIC-10 folder and Purchase-100 file)
with IAM's absolute sizes scaled to them (`IAM_SCALE`), in the worker process of `smoke_child`.
Writing CINIC-10's 270,000 images or Purchase-100's 197,324 rows takes longer than these runs;
`jaxmu.validate` checks their real sizes against the known metadata (tests/test_validate.py).
"""

import json

import numpy as np
import pytest

from jaxmu.configs import iam as iam_configs
from jaxmu import report, smoke
from jaxmu.pipelines import iam

pytestmark = pytest.mark.e2e

MOCK = 300  # tfds mock records per split of the structure runs


def _stages(workdir):
  return {p.stem for p in (workdir / "stages").glob("*.json")}


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


def test_iam_cifar100_exact_at_the_real_size(tmp_path):
  """jaxmu/configs/iam.py (cifar100, exact, set_random) on mock data of CIFAR-100's real size
  (50,000 + 10,000) with the recipe's pool and split sizes: 20 breaks, K up to 10, every attack
  and approximate method; one step per epoch (`engine.step_cap`) and one epoch per training (the
  best-on-validation pass over each shadow's held-out 4,000 samples takes 30 s per epoch here)."""
  config = smoke.smoke(iam_configs.get_config("dataset=cifar100,forget=set_random"),
                       max_epochs=1)
  smoke.run("iam", config, tmp_path, None, max_steps=1)
  _check_iam(config, tmp_path)
  parts = np.load(tmp_path / "splits.npz")
  assert len(parts["shadow_pool"]) == config.split.shadow_size == 20000
  assert parts["shadow_train"].shape == (config.num_shadows, 16000)
  assert len(set(parts["pool"]) | set(parts["shadow_pool"])) == 50000  # the training part, split
  assert len(parts["val_0"]) == config.split.val_cap
  assert all(parts[f"flags_{r}"].sum() == config.split.forget_size for r in range(2))
  score_ui = report.read_csv(tmp_path / "score_ui.csv")
  assert {r["group"] for r in score_ui} == {0, 1}  # the override's 2 groups of K = 1


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
def iam_cifar10(smoke_child, fake_files, tmp_path_factory):
  """jaxmu/configs/iam.py (cifar10: set_random + class_percentage) up to signals: the run the
  settings below continue or reuse."""
  config = _iam(IAM_DATASETS["cifar10"][0], fake_files, "signals")
  workdir = tmp_path_factory.mktemp("iam_cifar10")
  return config, workdir, smoke_child("iam", config, workdir, MOCK)


@pytest.mark.parametrize("dataset", IAM_DATASETS)
def test_iam_dataset_and_unlearning_types(dataset, iam_cifar10, smoke_child, fake_files,
                                          tmp_path):
  argument, num_classes, pool = IAM_DATASETS[dataset]
  if dataset == "cifar10":
    config, workdir, stages = iam_cifar10
  else:
    config, workdir = _iam(argument, fake_files, "signals"), tmp_path
    stages = smoke_child("iam", config, workdir, MOCK)
  assert stages == sorted(IAM_STAGES[:IAM_STAGES.index(config.stop_after) + 1])
  _check_signals(config, workdir, num_classes, pool)
  types = _types(config)
  runs = [len(config.seeds) if t == "set_random" else len(config.split.forget_classes)
          for t in types]
  parts = np.load(workdir / "splits.npz")
  flags = [parts[f"flags_{r}"] for r in range(sum(runs))]
  assert len(flags) == sum(runs) and f"flags_{sum(runs)}" not in parts.files
  assert all(f.any() for f in flags)  # every run forgets something


def test_iam_arch_shadows_with_reused_targets(iam_cifar10, smoke_child, fake_files, tmp_path):
  """setting=arch (Fig. 4): VGG-11 shadows of the CIFAR-stem ResNet-18 targets, which are taken
  from the finished cifar10 run (``reuse.targets``, as the architecture matrix does)."""
  _, base, _ = iam_cifar10
  config = _iam("dataset=cifar10,setting=arch,shadow=vgg11", fake_files, "signals",
                **{"reuse.targets": str(base)})
  smoke_child("iam", config, tmp_path, MOCK)
  signals = _check_signals(config, tmp_path, 10, 200)
  trained = {json.loads(line)["stage"] for line in (tmp_path / "metrics.jsonl").open()}
  assert trained == {"shadows"}  # the targets and ref_in were taken as they are
  original = np.load(base / "signals" / "query_original.npy")
  assert np.array_equal(signals["query_original"], original)  # the reused targets' logits
  assert not np.array_equal(signals["query_shadows"],
                            np.load(base / "signals" / "query_shadows.npy"))


def test_iam_shifted_shadows_on_cinic10(iam_cifar10, smoke_child, fake_files, tmp_path):
  """setting=shifted (Table 3): CIFAR-10 targets (reused from the cifar10 run), shadows trained
  on CINIC-10 (the fake folder) with CINIC-10's normalisation."""
  _, base, _ = iam_cifar10
  config = _iam("dataset=cifar10,setting=shifted", fake_files, "signals",
                **{"shadow_dataset.name": "cinic10",
                   "shadow_dataset.data_dir": str(fake_files["cinic10"]),
                   "reuse.targets": str(base)})
  smoke_child("iam", config, tmp_path, MOCK)
  shadow_size = config.shadow_dataset.shadow_size
  _check_signals(config, tmp_path, 10, 200, shadow_pool=shadow_size)
  parts = np.load(tmp_path / "splits.npz")
  assert len(parts["shadow_pool"]) == shadow_size
  assert parts["shadow_pool"].max() < 200  # indices of CINIC-10's training part


def test_iam_incremental_cinic10_on_the_cifar10_run(iam_cifar10, smoke_child, fake_files,
                                                    tmp_path):
  """setting=incremental (Table 4): the cifar10 run's original and retrained models keep training
  on a CINIC-10 pool of ``incremental.pool_size``; its shadows are the cifar10 run's."""
  base_config, base, _ = iam_cifar10
  config = _iam("dataset=cinic10,setting=incremental,forget=set_random", fake_files, "signals",
                **{"incremental.base_workdir": str(base)})
  smoke_child("iam", config, tmp_path, MOCK)
  pool = config.incremental.pool_size
  _check_signals(config, tmp_path, 10, pool)
  parts = np.load(tmp_path / "splits.npz")
  assert len(parts["pool"]) == pool
  base_parts = np.load(base / "splits.npz")
  assert np.array_equal(parts["shadow_pool"], base_parts["shadow_pool"])
  assert len(base_config.seeds) == len(config.seeds)


def test_iam_reuse_of_shadows_and_targets(iam_cifar10, smoke_child, fake_files, tmp_path):
  """``reuse.shadows`` and ``reuse.targets`` of the finished cifar10 run: nothing trains, and the
  signals are the run's own."""
  config, base, _ = iam_cifar10
  config = _iam(IAM_DATASETS["cifar10"][0], fake_files, "signals",
                **{"reuse.shadows": str(base), "reuse.targets": str(base)})
  smoke_child("iam", config, tmp_path, MOCK)
  for name in iam.SIGNAL_FILES:
    assert np.array_equal(np.load(tmp_path / "signals" / f"{name}.npy"),
                          np.load(base / "signals" / f"{name}.npy")), name
  metrics = tmp_path / "metrics.jsonl"
  assert not metrics.exists() or not metrics.read_text().strip()  # nothing trained
