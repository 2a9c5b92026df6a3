"""Config validation (`jaxmu.validate`): every shipped recipe passes at full counts, a broken config
of each class of check names its field, and a launcher stops on one before writing anything."""

import json

import pytest
from conftest import finished_run, iam_recipe

from jaxmu.configs import deepunlearn as deepunlearn_configs
from jaxmu.configs import iam as iam_configs
from jaxmu.configs import quickstart, tune_all
from jaxmu.configs import ulira as ulira_configs
from jaxmu import cli, plan, stages, validate
from jaxmu import data as data_lib
from jaxmu.data import sources
from jaxmu.pipelines import iam as iam_pipeline
from jaxmu.pipelines import iam_setting

DEEPUNLEARN_DATASETS = tuple(deepunlearn_configs.EPOCHS)
IAM_DATASETS = (*iam_configs.REFERENCE, "digits")
FORGET = (*validate.FORGET_TYPES, "set_random+class_percentage")
def _problems(pipeline, config):
  return [str(p) for p in validate.validate(pipeline, config)]


def test_metadata_matches_the_loaded_datasets():
  for options in ({}, {"image_size": 32, "channels": 3}):
    digits = data_lib.load("digits", **options)
    assert sources.metadata("digits", **options) == sources.Metadata(
        digits.num_train, digits.num_test, digits.num_classes, digits.inputs.shape[1:])
  assert sources.metadata("mnist").shape == (32, 32, 3)
  assert sources.metadata("mnist", image_size=None, channels=None).shape == (28, 28, 1)
  assert sources.metadata("synthetic", num_train=9, shape=(4,)) == sources.Metadata(9, 16, 10, (4,))
  assert sources.metadata("npz") is None
  assert set(sources.KNOWN) == {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
                                "cinic10", "utkface", "purchase100"}


@pytest.mark.parametrize("dataset", DEEPUNLEARN_DATASETS)
def test_every_deepunlearn_and_ulira_recipe_is_valid(dataset):
  for model in ("resnet18", "tinyvit_11m"):
    args = f"dataset={dataset},model={model}"
    config = deepunlearn_configs.get_config(args)
    assert _problems("deepunlearn", config) == []
    config.ulira.enabled = True  # its U-LiRA stage
    assert _problems("deepunlearn", config) == []
    assert _problems("ulira", ulira_configs.get_config(args)) == []


def test_fig4_architectures_validate_and_plan():
  """Fig. 4 (iam-spec 6.1, 6.2): torchvision's VGG-11 as the arch shadow of the CIFAR-stem
  ResNet-18 (none of the target's options) and VGG-16 as a target at lr 0.01; the ``shadow=``
  argument gives a ResNet shadow IAM's stem; ResNet-50 trains 150 epochs."""
  config = iam_configs.get_config("dataset=cifar100,setting=arch,forget=set_random")
  config.shadow_model.name = "vgg11"
  assert _problems("iam", config) == []
  assert iam_setting.architecture(config, "shadows") == ("vgg11", ())
  shadows = plan.make(config).archs["shadow"]
  assert shadows.name == "vgg11"
  assert shadows.variable_bytes == 4 * 129_176_036  # torchvision's count with 100 classes
  for shadow, options in (("densenet121", ()), ("resnet34", (("stem", "cifar"),))):
    config = iam_configs.get_config(f"dataset=cifar100,setting=arch,shadow={shadow}")
    assert _problems("iam", config) == []
    assert iam_setting.architecture(config, "shadows") == (shadow, options)
  vgg = iam_configs.get_config("dataset=cifar100,model=vgg16")
  assert vgg.train.learning_rate == 0.01 and not vgg.model.options
  assert _problems("iam", vgg) == []
  resnet50 = iam_configs.get_config("dataset=cifar100,model=resnet50")
  assert resnet50.train.epochs == resnet50.train.target_epochs == 150
  assert resnet50.model.options.to_dict() == {"stem": "cifar"}


def test_quickstart_and_ulira_cpu_are_valid():
  assert _problems("deepunlearn", quickstart.get_config()) == []
  sixteen = quickstart.get_config("seeds=16")
  assert sixteen.seeds == sixteen.search.seeds == tuple(range(16))
  assert _problems("deepunlearn", sixteen) == []
  assert _problems("deepunlearn", tune_all.get_config()) == []
  for bad in ("seeds=1", "seeds=x", "seed=4"):
    with pytest.raises(ValueError, match="'seeds=N'"):
      quickstart.get_config(bad)
  assert _problems("iam", quickstart.get_config("iam")) == []
  assert _problems("ulira", ulira_configs.get_config("cpu")) == []
  assert _problems("ulira", ulira_configs.get_config()) == []


@pytest.mark.parametrize("dataset", IAM_DATASETS)
def test_every_iam_recipe_is_valid_with_and_without_reuse(dataset, tmp_path):
  for setting in validate.SETTINGS:
    for forget in FORGET:
      config = iam_recipe(dataset, setting, forget, tmp_path)
      assert _problems("iam", config) == [], (setting, forget)
      if setting != "incremental":  # incremental takes its models from its base run
        config.reuse.shadows = config.reuse.targets = finished_run(
            tmp_path / "reused", iam_configs.get_config(f"dataset={dataset},forget={forget}"))
        assert _problems("iam", config) == [], (setting, forget, "reuse")


def _set(path, value):
  """A mutation setting the dotted config field ``path`` to ``value``."""
  def mutate(config, tmp_path):
    del tmp_path
    *sections, name = path.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return mutate


def _search_dir(content):
  def mutate(config, tmp_path):
    if content is not None:
      (tmp_path / "search").mkdir()
      for name, text in content.items():
        (tmp_path / "search" / name).write_text(text)
    config.search_dir = str(tmp_path / "search")
  return mutate


def _incremental(base_model="resnet18", reuse=False, pool_size=5000):
  def mutate(config, tmp_path):
    config.incremental.pool_size = pool_size
    base = iam_configs.get_config("dataset=cifar10")
    base.model.name = base_model
    config.setting = "incremental"
    config.incremental.base_workdir = finished_run(tmp_path / "base", base)
    if reuse:
      config.reuse.shadows = config.incremental.base_workdir
  return mutate


def _reuse_fewer_shadows(config, tmp_path):
  config.reuse.shadows = finished_run(tmp_path / "r", iam_configs.get_config("dataset=digits"))


DU, IAM = "dataset=cifar10,model=resnet18", "dataset=cifar10"
BROKEN = {  # check: (pipeline, config argument, mutation, field named)
    # the ScoreUI schedule
    "score_ui_epochs": ("iam", IAM, _set("score_ui.epochs", 10), "score_ui.epochs"),
    "score_ui_breaks": ("iam", IAM, _set("score_ui.breaks", 0), "score_ui.breaks"),
    # K values against num_shadows
    "k_sweep": ("iam", IAM, _set("audit.k_sweep", (1, 16)), "audit.k_sweep"),
    # the Gumbel map's epsilons
    "off_eps": ("iam", IAM, _set("audit.off_eps", (0.1,)), "audit.off_eps"),
    "norm_eps": ("iam", IAM, _set("audit.norm_eps", (1e-2, 0.0)), "audit.norm_eps"),
    "start_models": ("iam", IAM, _set("score_ui.start_models", 11), "score_ui.start_models"),
    "num_shadows": ("iam", IAM, _set("num_shadows", 0), "num_shadows"),
    "reuse_fewer_shadows": ("iam", "dataset=cifar10", _reuse_fewer_shadows, "reuse.shadows"),
    # pool and split sizes against the dataset's size
    "shadow_size": ("iam", IAM, _set("split.shadow_size", 50000), "split.shadow_size"),
    "forget_size": ("iam", IAM, _set("split.forget_size", 30001), "split.forget_size"),
    "fixed_forget": ("iam", IAM, _set("split.fixed_forget", 501), "split.fixed_forget"),
    "shadow_fix": ("iam", IAM, _set("split.shadow_fix", 16001), "split.shadow_fix"),
    "pool_size": ("iam", "dataset=cinic10", _incremental(pool_size=90000),
                  "incremental.pool_size"),
    "lira_val": ("ulira", "cpu", _set("ulira.lira.val_ratio", 1e-4), "ulira.lira.val_ratio"),
    "deepunlearn_split": ("deepunlearn", "dataset=digits,model=resnet18",
                          _set("split.forget_ratio", 0.9999), "split"),
    # ratios and class lists
    "val_ratio": ("deepunlearn", DU, _set("split.val_ratio", 1.5), "split.val_ratio"),
    "class_ratio": ("iam", IAM, _set("split.class_ratio", 0.0), "split.class_ratio"),
    "lira_forget": ("ulira", DU, _set("ulira.lira.forget_ratio", 1.0), "ulira.lira.forget_ratio"),
    "lira_forget_none": ("ulira", "cpu", _set("ulira.lira.forget_ratio", 1e-4),
                         "ulira.lira.forget_ratio"),
    "forget_classes": ("iam", IAM, _set("split.forget_classes", (0, 10)), "split.forget_classes"),
    "forget_types": ("iam", IAM, _set("split.forget", "set_random+set_random"), "split.forget"),
    "seeds": ("deepunlearn", DU, _set("seeds", ()), "seeds"),
    "search_seeds": ("deepunlearn", DU, _set("search.seeds", (0, 11)), "search.seeds"),
    "tpe_startup": ("deepunlearn", DU, _set("search.tpe_startup_trials", -1),
                    "search.tpe_startup_trials"),
    # batch sizes
    "batch_size": ("deepunlearn", DU, _set("train.batch_size", 0), "train.batch_size"),
    "batch_over_retain": ("deepunlearn", "dataset=digits,model=small_cnn",
                          _set("train.batch_size", 2000), "train.batch_size"),
    "ref_in_batch": ("iam", IAM, _set("ref_in.batch_size", 0), "ref_in.batch_size"),
    # epochs >= 1
    "epochs": ("deepunlearn", DU, _set("train.epochs", 0), "train.epochs"),
    "target_epochs": ("iam", IAM, _set("train.target_epochs", 0), "train.target_epochs"),
    "ulira_epochs": ("ulira", DU, _set("ulira.epochs", 0), "ulira.epochs"),
    # method names and their hyper-parameter keys
    "method_name": ("deepunlearn", DU, _set("methods", ("finetun",)), "methods"),
    "method_original": ("deepunlearn", DU, _set("methods", ("original", "ct")), "methods"),
    "method_retrain": ("deepunlearn", DU, _set("methods", ("naive",)), "methods"),
    "ulira_method": ("ulira", DU, _set("ulira.methods", ("msgg",)), "ulira.methods"),
    "search_method": ("deepunlearn", DU, _set("search.methods", ("ssdd",)), "search.methods"),
    "hparam_key": ("deepunlearn", DU, _set("unlearn.finetune.lr", 0.1), "unlearn.finetune"),
    "approx_hparam_key": ("iam", IAM, _set("approx.hparams.ssd.alpha", 1.0), "approx.hparams.ssd"),
    # duplicates in method lists
    "duplicate_method": ("deepunlearn", DU, _set("methods", ("ct", "ct")), "methods"),
    "duplicate_alias": ("ulira", DU, _set("ulira.methods", ("original", "original")),
                        "ulira.methods"),
    "duplicate_approx": ("iam", IAM, _set("approx.methods", ("ssd", "ssd")), "approx.methods"),
    "approx_retrain": ("iam", IAM, _set("approx.methods", ("ssd", "retrain")), "approx.methods"),
    # attack names
    "attack": ("iam", IAM, _set("audit.attacks", ("iam",)), "audit.attacks"),
    "score_ui_attack": ("iam", IAM, _set("score_ui.attacks", ("lira",)), "score_ui.attacks"),
    # search_dir existence and content
    "search_dir_missing": ("ulira", DU, _search_dir(None), "search_dir"),
    "search_dir_empty": ("ulira", DU, _search_dir({}), "search_dir"),
    "search_dir_bad": ("ulira", DU, _search_dir({"finetune.json": json.dumps({"x": 1})}),
                       "search_dir"),
    # approx.methods
    "approx_method": ("iam", IAM, _set("approx.methods", ("ssdd",)), "approx.methods"),
    # arch / shifted / incremental / reuse combinations
    "setting": ("iam", IAM, _set("setting", "exactly"), "setting"),
    "shifted_without_dataset": ("iam", "dataset=cifar10,setting=shifted", _set("seeds", (42,)),
                                "shadow_dataset.name"),
    "shadow_model_unused": ("iam", IAM, _set("shadow_model.name", "vgg11"), "shadow_model.name"),
    "arch_model": ("iam", "dataset=cifar10,setting=arch", _set("shadow_model.name", "vgg12"),
                   "shadow_model.name"),
    "incremental_without_base": ("iam", "dataset=cifar10,setting=incremental",
                                 _set("seeds", (42,)), "incremental.base_workdir"),
    "incremental_other_model": ("iam", "dataset=cinic10", _incremental("vgg11"),
                                "incremental.base_workdir"),
    "incremental_with_reuse": ("iam", "dataset=cinic10", _incremental(reuse=True), "reuse"),
    "reuse_not_a_run": ("iam", IAM, lambda c, t: setattr(c.reuse, "targets", str(t)),
                        "reuse.targets"),
    "model": ("iam", IAM, _set("model.name", "resnet19"), "model.name"),
    "dataset": ("deepunlearn", DU, _set("dataset.name", "cifar11"), "dataset.name"),
}
_CONFIGS = {"deepunlearn": deepunlearn_configs, "ulira": ulira_configs, "iam": iam_configs}


@pytest.mark.parametrize("check", BROKEN)
def test_a_broken_config_names_its_field(check, tmp_path):
  pipeline, argument, mutate, field = BROKEN[check]
  config = _CONFIGS[pipeline].get_config(argument)
  mutate(config, tmp_path)
  problems = validate.validate(pipeline, config)
  assert problems and field in {p.field for p in problems}, [str(p) for p in problems]
  line = str(next(p for p in problems if p.field == field))
  assert line.startswith(f"{field}: ") and "; fix: " in line and "\n" not in line


def test_config_error_is_one_line_per_problem():
  config = iam_configs.get_config("dataset=cifar10")
  config.score_ui.epochs, config.audit.attacks = 10, ("iam",)
  with pytest.raises(validate.ConfigError) as error:
    iam_pipeline.run(config, "never/written")
  assert len(error.value.problems) == 2
  assert str(error.value).splitlines() == [str(p) for p in error.value.problems]


def test_launcher_stops_on_a_broken_config_before_writing(tmp_path, capsys):
  config = iam_configs.get_config("dataset=cifar100")
  config.score_ui.epochs, config.audit.k_sweep, config.approx.methods = 19, (1, 32), ("ssdd",)
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit) as exit_:
    cli.run_pipeline("iam", iam_pipeline.run, config, str(workdir), ["iam.py"])
  assert exit_.value.code == 2
  lines = capsys.readouterr().err.splitlines()
  assert [line.split(":")[1].strip() for line in lines] == [
      "audit.k_sweep", "score_ui.epochs", "approx.methods"]
  assert all(line.startswith("error: ") and "; fix: " in line for line in lines)
  assert not workdir.exists()
