"""Shared fixtures: a tiny trained stack to unlearn (2 small CNNs on digits), shipped recipes' smoke
runs in a worker process and the fake dataset files they read."""

import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os

# The suite is dominated by XLA's CPU compile times; LLVM at -O1 compiles these programs about
# twice as fast as the default -O2 and runs them nearly as fast (measured on 2 cores: bf16 method
# tests 177 s -> 78 s, the IAM pipeline 56 s -> 70 s). Set before JAX starts its backend;
# launchers run by tests inherit it. An XLA_FLAGS that already sets the level wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=1").strip()

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from jaxmu.configs import iam as iam_configs
from jaxmu import cli
from jaxmu import data as data_lib
from jaxmu import models, smoke, stages, train
from jaxmu import methods as methods_lib
from jaxmu.data import sources
from jaxmu.models import resnet, tinyvit

# Architecture tests run twice: "mini" in `make test`, "full" (ResNet-18 / TinyViT-11M) in
# `make test-slow`.
ARCH_SIZES = ("mini", pytest.param("full", marks=pytest.mark.slow))


def arch_model(name, num_classes, size="full", **kw):
  """``models.get(name)`` ("full"), or for size "mini" the same module class with one block per
  stage (TinyViT: narrow stages too). A mini model has the full model's parameter names, stems,
  heads, norms and attention biases, so architecture-dependent code runs the same paths, but it
  compiles several times faster on CPU."""
  if size == "full":
    return models.get(name, num_classes, **kw)
  if size != "mini":
    raise ValueError(f"size must be 'mini' or 'full', got {size!r}")
  if name == "resnet18":
    return resnet.ResNet(resnet.BasicBlock, (1, 1, 1, 1), num_classes, kw.get("stem", "imagenet"))
  if name == "tinyvit_11m":
    return tinyvit.TinyViT(num_classes, kw.get("img_size", 32), embed_dims=(16, 32, 32, 64),
                           depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2))
  raise ValueError(f"no mini variant of {name!r}")

os.environ["JAXMU_CACHE"] = ""  # launchers run by tests keep no compilation cache in $HOME


def make_context(model_name="small_cnn", num_models=2, strategy="loop", image_size=None,
                 train_epochs=3, size="full", **model_kw):
  """Digits (8x8x1, or image_size x image_size x 3; 64 features for "purchase_mlp"), `num_models`
  originals trained briefly on retain + forget; retain/forget/val differ per model so per-model
  handling is exercised."""
  options = {"image_size": image_size, "channels": 3} if image_size else {}
  ds = data_lib.load("digits", **options)
  if model_name == "purchase_mlp":
    ds = dataclasses.replace(ds, inputs=ds.inputs.reshape(len(ds.inputs), -1))
    model_kw = {"num_features": ds.inputs.shape[1], **model_kw}
  model = arch_model(model_name, ds.num_classes, size, **({"width": 8} if model_name == "small_cnn"
                                                          else {}) | model_kw)
  recipe = train.Recipe(batch_size=64, augment="none" if model_name == "purchase_mlp" else "flip",
                        mean=(0.3054,), std=(0.3760,))
  data = train.DeviceData.create(ds)
  rng = np.random.default_rng(0)
  perm = rng.permutation(1437)
  retain = [perm[:600], perm[:560]]
  forget = [perm[600:660], perm[560:660]]
  val = [perm[1000:1200], perm[1000:1150]]
  retain, forget, val = retain[:num_models], forget[:num_models], val[:num_models]
  if num_models > 2:
    raise ValueError("make_context builds at most 2 models")
  inits = train.init_variables(model, jax.random.split(jax.random.key(0), num_models),
                               ds.inputs.shape[1:])
  state = train.create_state(inits, recipe, learning_rate=0.05)
  originals = train.fit(model, state, data, [np.concatenate([r, f]) for r, f in zip(retain, forget)],
                        recipe, train_epochs, jax.random.key(1), strategy=strategy,
                        progress=False).state.variables
  return methods_lib.Context.create(model, recipe, data, originals, inits, retain, forget, val,
                                model_ids=tuple(range(num_models)), num_classes=ds.num_classes,
                                strategy=strategy, train_epochs=train_epochs,
                                train_hparams={"learning_rate": 0.05})


@pytest.fixture(scope="session")
def tiny_ctx():
  """Two small CNNs on 8x8 digits, trained 3 epochs; strategy loop."""
  return make_context()


def search_space_table(method, e_max):
  """{name: (low, high, log, choices)} of the Optuna distributions ``method.suggest`` uses."""
  import optuna
  trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
  method.suggest(trial, e_max=e_max)
  table = {}
  for name, dist in trial.distributions.items():
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
      table[name] = (None, None, None, tuple(dist.choices))
    else:
      table[name] = (dist.low, dist.high, dist.log, None)
  return table, trial


# Every method (but "original") shrunk to a step or two; its structure is unchanged: every phase
# still runs.
CHEAP_HPARAMS = {
    "random_labels": {"num_epochs": 1}, "salun": {"num_epochs": 1},
    "gradient_ascent": {"num_epochs": 1}, "neggrad_plus": {"num_epochs": 1},
    "negative_gradient": {"num_epochs": 1}, "cf_k": {"num_epochs": 1},
    "eu_k": {"num_epochs": 1, "training_epoch_factor": 1}, "bad_teacher": {"num_epochs": 1},
    "scrub": {"sgda_num_epochs": 2, "msteps": 1}, "finetune": {"num_epochs": 1},
    "l_codec": {"n_perturbations": 4, "perturb_chunk": 4, "hessian_samples": 8, "cg_iters": 2},
    "iam_ascent": {"num_epochs": 1}, "boundary_expanding": {"num_epochs": 1}, "ssd": {},
    "iam_fisher": {}, "forsaken": {"num_epochs": 1, "batches": 1},
    "fcs": {"num_epochs": 2}, "msg": {"num_epochs": 1}, "cfw": {"num_epochs": 1},
    "ct": {"num_epochs": 1}, "prmq": {"num_epochs": 1.0}, "kde": {"num_epochs": 1,
                                                                   "retain_num_epochs": 1},
    "rni": {"num_epochs": 2, "fine_num_epochs": 1, "reset_num_epochs": 1},
    "retrain": {"num_epochs": 1}, "fisher": {}, "influence": {"num_epochs": 1, "num_samples": 64},
}


# One method of each family file of jaxmu/methods: its sweeps run in `make test`, the others in
# `make test-e2e`.
FAMILY_REPRESENTATIVES = ("retrain", "finetune", "gradient_ascent", "random_labels", "scrub",
                          "fisher", "ssd", "l_codec", "forsaken", "fcs", "ct", "msg")


def method_sweep(names, fast=FAMILY_REPRESENTATIVES):
  """``names`` as pytest parameters, all but those in ``fast`` marked e2e."""
  return [pytest.param(n, marks=() if n in fast else pytest.mark.e2e) for n in sorted(names)]


# setting=shifted: the shadows' dataset (Table 3 pairs CIFAR-10 and CINIC-10); a synthetic one of
# the same shape where the paper has no partner
SHIFTED_SHADOWS = {"cifar10": "cinic10", "cinic10": "cifar10", "cifar100": "cifar10"}


def finished_run(path, config):
  """A directory that holds a finished IAM run's config (all validation reads of it)."""
  stages.Workdir(path).write_config(config)
  return str(path)


def iam_recipe(dataset, setting, forget, tmp_path):
  """jaxmu/configs/iam.py with what its setting needs from the user: the shifted shadows' dataset, the
  incremental base run."""
  config = iam_configs.get_config(f"dataset={dataset},setting={setting},forget={forget}")
  if setting == "shifted":
    if dataset in SHIFTED_SHADOWS:
      config.shadow_dataset.name = SHIFTED_SHADOWS[dataset]
    else:
      shape = sources.metadata(dataset).shape
      config.shadow_dataset.name = "synthetic"
      config.shadow_dataset.options = {"num_train": 50000, "shape": shape}
  if setting == "incremental":
    base = iam_configs.get_config(f"dataset={dataset},forget={forget}")
    config.incremental.base_workdir = finished_run(tmp_path / "base", base)
  return config


def run_command(command, **values):
  """``jaxmu <command>``'s ``main`` in this process with just these flags parsed from strings,
  restored afterwards. The module is (re)imported as `jaxmu.cli.main` does: another command run
  earlier in this process may have unregistered its flags."""
  name = f"jaxmu.commands.{command.replace('-', '_')}"
  cli._forget_other_commands(name)
  module = importlib.import_module(name)
  with flagsaver.as_parsed(**{k: str(v) for k, v in values.items()}):
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    module.main([command])


@pytest.fixture(scope="module")
def smoke_child():
  """``smoke_child(pipeline, config, workdir, mock_examples, max_steps)``: `jaxmu.smoke.run` in
  one spawned worker process of the test module (it inherits this process's XLA flags), which
  keeps its compiled programs between the module's tests."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    def run(pipeline, config, workdir, mock_examples=0, max_steps=None):
      return pool.submit(smoke.run, pipeline, config.to_dict(), str(workdir), mock_examples,
                         max_steps).result()
    yield run


@pytest.fixture(scope="module")
def fake_files(tmp_path_factory):
  """Fake UTKFace and CINIC-10 folders and a Purchase-100 file (`jaxmu.smoke.fake_*`)."""
  root = tmp_path_factory.mktemp("datasets")
  return {"utkface": smoke.fake_utkface(root / "utkface"),
          "cinic10": smoke.fake_cinic10(root / "cinic10"),
          "purchase100": smoke.fake_purchase100(root / "purchase100")}
