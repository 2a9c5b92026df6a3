"""The smoke override keeps every shipped recipe's structure, in seconds (`make test`).

tests/test_validate.py and tests/test_plan.py validate and plan the shipped configs at full
counts; here every combination is also built through `jaxmu.smoke.smoke` (what `make test-e2e`
runs) and must validate and plan to the same stages as the recipe itself, with the same methods,
attacks, K values, breaks and unlearning types, and the fewer seeds, trials and LiRA splits the
override promises. These plans take each architecture's costs as given (`abstract_archs`: the
stages do not depend on them, and tests/test_plan.py lowers the same architectures for each
dataset). Planned here with lowered steps, and nowhere else: DeepUnlearn's third model
(small_cnn) on every dataset, with U-LiRA and alone. The fake dataset files the e2e tests read
load through the real loaders with the datasets' known metadata, and the tiny models keep their
full models' parameter layout (stem, block kinds, head, classes).
"""

import math
import re

import jax
import pytest
from conftest import finished_run, iam_recipe

from jaxmu.configs import deepunlearn as deepunlearn_configs
from jaxmu.configs import iam as iam_configs
from jaxmu.configs import ulira as ulira_configs
from jaxmu import data as data_lib
from jaxmu import models, plan, smoke, validate
from jaxmu.data import sources
from jaxmu.pipelines import iam_setting

DEEPUNLEARN_DATASETS = tuple(deepunlearn_configs.EPOCHS)
DEEPUNLEARN_MODELS = ("resnet18", "tinyvit_11m", "small_cnn")
IAM_DATASETS = (*iam_configs.REFERENCE, "digits")
FORGET = (*validate.FORGET_TYPES, "set_random+class_percentage")
ARCH_SHADOW = {"resnet18": "vgg11", "small_cnn": "resnet18", "purchase_mlp": "purchase_mlp"}


@pytest.fixture
def abstract_archs(monkeypatch):
  """`plan.make` with fixed per-architecture costs instead of lowering each model's step."""
  def costs(name, model, shape, recipe, num_samples):
    del model
    return plan.Arch(name, recipe.batch_size, 1e9, 1e6, 4 << 20, 12 << 20, 1 << 20,
                     num_samples * math.prod(shape))
  monkeypatch.setattr(plan, "_arch", costs)


def _names(p):
  return [(s.name, s.arch) for s in p.stages]


def _same_structure(pipeline, config, **smoke_args):
  """``config`` and its smoked copy validate and plan to the same stages; returns both plans."""
  smoked = smoke.smoke(config, **smoke_args)
  assert [str(p) for p in validate.validate(pipeline, config)] == []
  assert [str(p) for p in validate.validate(pipeline, smoked)] == []
  full, small = plan.make(config), plan.make(smoked)
  assert full.pipeline == small.pipeline == pipeline
  assert _names(small) == _names(full)
  return smoked, full, small


@pytest.mark.parametrize("dataset", DEEPUNLEARN_DATASETS)
def test_deepunlearn_and_ulira_recipes_keep_their_structure(dataset, abstract_archs):
  for model in DEEPUNLEARN_MODELS:
    config = deepunlearn_configs.get_config(f"dataset={dataset},model={model}")
    config.ulira.enabled = True
    smoked, _, small = _same_structure("deepunlearn", config, max_epochs=20)
    assert smoked.methods == config.methods and smoked.ulira.methods == config.ulira.methods
    assert set(smoked.search.methods) == set(config.ulira.methods) & set(config.search.methods)
    assert len(smoked.seeds) == 2 and smoked.search.trials == 2
    assert (smoked.ulira.lira.num_splits, smoked.ulira.lira.num_forget_draws) == (2, 2)
    assert smoked.train.epochs == min(20, config.train.epochs)
    assert smoked.split == config.split and smoked.train.batch_size == config.train.batch_size
    assert next(s for s in small.stages if s.name == "train").models == 4
    alone = ulira_configs.get_config(f"dataset={dataset},model={model}")
    smoked, _, _ = _same_structure("ulira", alone, max_epochs=20)
    assert smoked.ulira.methods == alone.ulira.methods and smoked.search_dir == ""
  cpu = ulira_configs.get_config("cpu")
  _same_structure("ulira", cpu, max_epochs=20)


@pytest.mark.parametrize("dataset", IAM_DATASETS)
def test_iam_recipes_keep_their_structure(dataset, tmp_path, abstract_archs):
  for setting in validate.SETTINGS:
    for forget in FORGET:
      config = iam_recipe(dataset, setting, forget, tmp_path)
      if setting == "arch":
        config.shadow_model.name = ARCH_SHADOW[config.model.name]
        config.shadow_model.options = iam_configs.model_options(config.shadow_model.name)
      if setting != "incremental":  # incremental's shadows come from its base run
        if forget == FORGET[-1]:
          config.reuse.shadows = finished_run(tmp_path / "reused", iam_configs.get_config(
              f"dataset={dataset},forget={forget}"))
      smoked, full, small = _same_structure("iam", config, max_epochs=20)
      assert iam_setting.runs(smoked)[:1] == iam_setting.runs(config)[:1]
      assert iam_setting.forget_types(smoked) == iam_setting.forget_types(config)
      assert iam_setting.k_sweep(smoked) == iam_setting.k_sweep(config)
      assert smoked.num_shadows == config.num_shadows
      assert smoked.score_ui.breaks == config.score_ui.breaks
      assert len(iam_setting.score_ui_schedule(smoked)) == config.score_ui.breaks
      assert smoked.approx == config.approx and smoked.split == config.split
      assert smoked.audit.max_groups == min(2, config.audit.max_groups)
      smoked.audit.max_groups = config.audit.max_groups
      assert smoked.audit == config.audit
      assert smoked.split.forget_classes == config.split.forget_classes
      assert smoked.setting == config.setting and smoked.reuse == config.reuse
      assert set(full.archs) == set(small.archs) == {"model", "shadow"}


def test_small_cnn_plans_on_every_deepunlearn_dataset():
  """jaxmu/configs/deepunlearn.py's third model, lowered: with its U-LiRA stage and alone."""
  for dataset in DEEPUNLEARN_DATASETS:
    config = deepunlearn_configs.get_config(f"dataset={dataset},model=small_cnn")
    config.ulira.enabled = True
    p = plan.make(config)
    assert p.archs["model"].name == "small_cnn" and p.totals["flops"] > 0
    assert plan.make(ulira_configs.get_config(f"dataset={dataset},model=small_cnn")).archs[
        "model"].step_flops == p.archs["model"].step_flops


def test_fake_files_load_with_the_known_metadata(tmp_path):
  """`jaxmu.smoke.fake_*` through the real loaders: the datasets' input shapes and class counts
  (`sources.KNOWN`) and their layouts' train / test parts."""
  written = {"utkface": smoke.fake_utkface(tmp_path / "utkface", num_files=20),
             "cinic10": smoke.fake_cinic10(tmp_path / "cinic10",
                                           {"train": 2, "valid": 1, "test": 1}),
             "purchase100": smoke.fake_purchase100(tmp_path / "purchase100", num_rows=200)}
  parts = {"utkface": (16, 4), "cinic10": (20, 20), "purchase100": (200, 0)}
  for name, where in written.items():
    ds = data_lib.load(name, str(where))
    known = sources.metadata(name)
    assert ds.inputs.shape[1:] == known.shape and ds.num_classes == known.num_classes, name
    assert (ds.num_train, ds.num_test) == parts[name], name
    assert set(ds.labels.tolist()) == set(range(known.num_classes)), name


@pytest.mark.parametrize("name,options,shape", [
    ("resnet18", {"stem": "imagenet"}, (32, 32, 3)), ("resnet18", {"stem": "cifar"}, (32, 32, 3)),
    ("tinyvit_11m", {"img_size": 224}, (224, 224, 3)), ("vgg11", {}, (32, 32, 3)),
    ("vgg16", {}, (32, 32, 3))])
def test_tiny_models_keep_the_parameter_layout(name, options, shape):
  """Stem, block kinds and head of `smoke.TINY`'s models are their full models' (what methods
  that pick layers, CF-k / EU-k / SSD / RNI, read), with the same classes."""
  def layout(model):
    params = jax.eval_shape(lambda: models.init(model, jax.random.key(0), shape))["params"]
    groups = [g for g, _ in models.param_groups(params)]
    head = models.head_path(params)
    classes = {leaf.shape[-1] for leaf in jax.tree.leaves(params[head[0]])}
    return groups[0], {re.match("[a-z]*", g)[0] for g in groups[1:-1]}, groups[-1], head, classes
  full = models.get(name, 10, **options)
  with smoke.tiny_models():
    tiny = models.get(name, 10, **options)
  assert type(tiny) is not type(full) or tiny != full
  assert layout(tiny) == layout(full)
