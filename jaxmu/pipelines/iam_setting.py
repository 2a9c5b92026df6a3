"""What an IAM audit runs on: its runs (unlearning type, seed, class), its shadow groups and K
sweep, and its setting (iam-spec 7.1-7.4) resolved once into where the shadows, the targets and
the shadows' data come from. The stages of `jaxmu.pipelines.iam` read a `Setting` instead of
branching on ``config.setting`` and ``config.reuse``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from jaxmu import checkpoint, models, stages, train
from jaxmu import data as data_lib
from jaxmu.data import splits as splits_lib
from jaxmu.pipelines import common


class Run(NamedTuple):
  """One target: an unlearning type, the seed of its splits and, for class types, the class."""
  forget: str
  seed: int
  cls: int


def forget_types(config) -> tuple[str, ...]:
  """The unlearning types of ``config.split.forget``: a tuple, or one string ("a+b" for several)."""
  value = config.split.forget
  return tuple(value.split("+")) if isinstance(value, str) else tuple(value)


def runs(config) -> list[Run]:
  """Every run, type by type: one per seed (set_random) or one per class with the first seed."""
  seeds = tuple(int(s) for s in config.seeds)
  out = []
  for forget in forget_types(config):
    if forget == "set_random":
      out += [Run(forget, s, 0) for s in seeds]
    else:
      out += [Run(forget, seeds[0], int(c)) for c in config.split.forget_classes]
  return out


def runs_of(all_runs, forget) -> list[int]:
  """Indices of the runs of one unlearning type (their scores are pooled, iam-spec 7.1)."""
  return [r for r, run in enumerate(all_runs) if run.forget == forget]


def num_originals(config) -> int:
  """One original per run with ``config.original_per_seed``, else one shared."""
  return len(runs(config)) if config.original_per_seed else 1


def k_sweep(config) -> tuple[int, ...]:
  """The K values of the sweep: ``config.audit.k_sweep`` or 1, 2, 4, ... <= num_shadows."""
  return tuple(config.audit.k_sweep) or tuple(2**i for i in range(config.num_shadows.bit_length())
                                               if 2**i <= config.num_shadows)


def shadow_groups(num_shadows: int, k: int, max_groups: int) -> list[list[int]]:
  """``create_shadow_lists`` (iam-spec 3.5): [[0..k-1], [k..2k-1], ...], min(K_max // k, max)."""
  return [list(range(g * k, (g + 1) * k)) for g in range(min(num_shadows // k, max_groups))]


def architecture(config, kind):
  """(name, options) of a run's shadow ("shadows") or target ("targets") architecture: an arch
  shadow has its own options (`shadow_model`, none of the target's)."""
  model = config.model
  if kind == "shadows" and config.setting == "arch" and config.shadow_model.name:
    model = config.shadow_model
  return model.name, tuple(sorted(model.options.to_dict().items()))


def score_ui_attacks(config) -> tuple[str, ...]:
  """The attacks ScoreUI audits: ``score_ui.attacks``, or the audit's."""
  return tuple(config.score_ui.attacks) or tuple(config.audit.attacks)


def score_ui_schedule(config) -> tuple[int, ...]:
  """The epochs of ScoreUI's breaks 1..B (iam-spec 7.5): b * (E // B) for E = ``score_ui.epochs``
  and B = ``score_ui.breaks``; training runs all E epochs (CIFAR-10: 8, 16, .., 160 of 170)."""
  every = config.score_ui.epochs // config.score_ui.breaks
  return tuple(b * every for b in range(1, config.score_ui.breaks + 1))


class FinishedRun:
  """A finished IAM run whose models this one continues (incremental) or reuses: its workdir,
  config and stages."""

  def __init__(self, root, field="incremental.base_workdir"):
    self.root = Path(root)
    if not (self.root / "config.json").exists():
      raise ValueError(f"{field}={str(root)!r} holds no IAM run (config.json missing); run "
                       "jaxmu iam there first")
    self.config = ml_collections.ConfigDict(json.loads((self.root / "config.json").read_text()))
    self.stages = stages.Workdir(self.root)

  def path(self, *parts):
    return self.root.joinpath(*parts)

  def stage_hash(self, name):
    """The hash of a finished stage; ValueError when it has not finished."""
    try:
      return self.stages.stage_hash(name)
    except RuntimeError:
      raise ValueError(f"{str(self.root)!r} has not finished its {name!r} stage; run it "
                       "first") from None


@dataclasses.dataclass
class Setting:
  """Where the models and the shadows' data of an audit come from (iam-spec 7.1-7.4).

  ``shadow_*``: the shadows' architecture, dataset, device data and recipe (the target's, or
  another dataset's: shifted, or the old data of incremental); ``shifted``: the shadow pool
  belongs to that other dataset; ``shadows_from`` / ``targets_from``: a finished run whose shadows
  / targets (originals, retrained, ref_in) are taken as they are (``config.reuse``, or the base of
  incremental for the shadows); ``base``: incremental's run whose targets keep training.
  """

  name: str
  shadow_model: object
  shadow_dataset: data_lib.Dataset
  shadow_data: train.DeviceData
  shadow_recipe: train.Recipe
  shifted: bool
  shadows_from: FinishedRun | None
  targets_from: FinishedRun | None
  base: FinishedRun | None

  @staticmethod
  def create(config, dataset, data, recipe, model) -> "Setting":
    """The setting of ``config`` (checked by `jaxmu.validate`) for the target's dataset, device
    data, recipe and model."""
    reused = {k: FinishedRun(config.reuse[k], f"reuse.{k}") if config.reuse[k] else None
              for k in ("shadows", "targets")}
    base = None
    shadow_dataset, shadow_data, shadow_recipe = dataset, data, recipe
    if config.setting == "incremental":
      base = FinishedRun(config.incremental.base_workdir)
      shadow_dataset = common.load_dataset(base.config.dataset)
      shadow_recipe = common.recipe(base.config)
    elif config.setting == "shifted":
      shadow_dataset = common.load_dataset(config.shadow_dataset)
      own = data_lib.recipe(config.shadow_dataset.name, reference="iam")
      shadow_recipe = dataclasses.replace(recipe, mean=tuple(own.mean), std=tuple(own.std),
                                          augment=own.augment)
    if shadow_dataset is not dataset:
      shadow_data = train.DeviceData.create(shadow_dataset)
      if shadow_dataset.inputs.shape[1:] != dataset.inputs.shape[1:]:
        raise ValueError(f"shadow dataset inputs {shadow_dataset.inputs.shape[1:]} differ from "
                         f"the target's {dataset.inputs.shape[1:]}")
    shadow_model = model
    if config.setting == "arch" and config.shadow_model.name:
      shadow_model = models.get(config.shadow_model.name, dataset.num_classes,
                                **config.shadow_model.options.to_dict())
    return Setting(config.setting, shadow_model, shadow_dataset, shadow_data, shadow_recipe,
                   config.setting in ("shifted", "incremental"), reused["shadows"] or base,
                   reused["targets"], base)

  def check_reuse(self, kind, config, dataset, parts) -> None:
    """The reused run's ``kind`` models fit this run: same architecture and index sets (the
    incremental base's shadows are taken as they are)."""
    source = self.shadows_from if kind == "shadows" else self.targets_from
    if source is self.base:
      return
    own_arch, their_arch = architecture(config, kind), architecture(source.config, kind)
    if own_arch != their_arch:
      raise ValueError(f"reuse.{kind}={str(source.root)!r} holds {their_arch} models; this run "
                       f"needs {own_arch}")
    if kind == "shadows":
      theirs = np.load(source.path("splits.npz"))
      same = all(np.array_equal(theirs[key][:len(parts[key])], parts[key]) for key in
                 ("shadow_train", "shadow_test")) and np.array_equal(theirs["shadow_pool"],
                                                                     parts["shadow_pool"])
    else:
      theirs = splits_lib.load(source.path("splits.npz"), dataset)
      same = (runs(source.config) == runs(config)
              and num_originals(source.config) == num_originals(config)
              and all(np.array_equal(theirs[key], parts[key]) for key in parts
                      if key.split("_")[0] in ("pool", "flags", "val")))
    if not same:
      raise ValueError(f"reuse.{kind}={str(source.root)!r} was trained on other index sets "
                       "(splits, runs or shadows differ); use the same split settings and seeds")

  def splits_inputs(self, config) -> dict:
    """What the splits stage reads besides the target's data and the split settings."""
    return {"shadow_data": ((config.shadow_dataset.to_dict(), self.shadow_dataset.fingerprint)
                            if self.name == "shifted" else None),
            "incremental": config.incremental if self.base else None}

  def target_shadow_size(self, config, dataset) -> int:
    """Target training samples held out of the pool: incremental keeps ``pool_size`` of them as
    the new data's pool (iam-spec 7.4), of the training part left by `splits.iam`'s held-out cut
    where the dataset has no test part."""
    if not self.base:
      return config.split.shadow_size
    train = (dataset.num_train if dataset.num_test
             else int((1 - config.split.holdout_ratio) * dataset.num_train))
    return train - config.incremental.pool_size

  def shadow_splits(self, config) -> dict:
    """The shadows' pool and train / held-out splits where they are not the target split's: drawn
    from the shifted dataset, or the incremental base run's own; {} otherwise."""
    keys = ("shadow_pool", "shadow_train", "shadow_test")
    if self.base is not None:
      base = splits_lib.load(self.base.path("splits.npz"), self.shadow_dataset)
      if base["shadow_train"].shape[0] < config.num_shadows:
        raise ValueError(f"the base run has {base['shadow_train'].shape[0]} shadows; "
                         f"num_shadows={config.num_shadows} asks for more")
      return {k: base[k] if k == "shadow_pool" else base[k][:config.num_shadows] for k in keys}
    if self.shifted:
      s = splits_lib.iam(self.shadow_dataset.num_train, self.shadow_dataset.num_test,
                         config.shadow_dataset.shadow_size, forget_size=1, fixed_forget=0,
                         num_shadows=config.num_shadows, shadow_fix=config.split.shadow_fix,
                         shadow_train_frac=config.split.shadow_train_frac,
                         holdout_ratio=config.split.holdout_ratio,
                         split_seed=config.split.split_seed)  # its forget set is unused
      return {k: s[k] for k in keys}
    return {}

  def base_targets(self, model, own_runs, num_originals_here: int):
    """Incremental's start: the base run's original(s) and the same runs' retrained models."""
    base_runs, r = runs(self.base.config), len(own_runs)
    if base_runs[:r] != own_runs:
      raise ValueError(f"the base run's runs (type, seed, class) {base_runs} do not start "
                       f"with this run's {own_runs}; use the same types and seeds")
    base_o = num_originals(self.base.config)
    shape = self.shadow_dataset.inputs.shape[1:]
    like = lambda n: common.abstract_variables(model, n, shape)
    old_o = checkpoint.restore(self.base.path("models/original"), like(base_o))
    old_r = checkpoint.restore(self.base.path("models/retrain"), like(len(base_runs)))
    keep = np.arange(num_originals_here) % base_o
    return jax.tree.map(lambda a, b: np.concatenate([a[keep], b[:r]]), old_o, old_r)
