"""A plan of a pipeline run, without data and without training (`jaxmu plan`).

    p = plan.make(config, workdir="runs/cifar10_resnet18")   # the pipeline follows from config
    print(p.markdown()); p.write("runs/plan")                 # plan.md and plan.json

Per stage, in the pipeline's order: the models it trains or unlearns, its stack chunks
(programs), its training sample-passes (epochs x samples per model, summed) and forward passes
(validation, signals, evaluation), FLOPs and device time at a stated sustained rate, device memory
per program (estimate), the disk of its outputs, and whether a workdir's records let it be reused.

Counts follow the config and the datasets' known sizes (`dataset_info`; nothing is loaded).
FLOPs of one training step per model are XLA's count of the *lowered* (not compiled) engine step
`train.train_step` on abstract variables (`jax.eval_shape`); a forward sample costs the lowered
`train.logits` of a batch divided by its size. Estimates, each labelled as such in the output:
unlearning sample-passes (`_unlearn_passes`), memory per program (`_arch`: the vmapped stack's
training states, a step's activations and the dataset on the device), and reuse (the records'
outputs and dependency hashes, and the config sections each stage reads against the workdir's
``config.json``; the run itself also checks the data's fingerprint).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxmu import distributed, models, search, stages, train, validate
from jaxmu import methods as methods_lib
from jaxmu.data import sources
from jaxmu.pipelines import common, iam_setting, iam_tables
from jaxmu.pipelines.deepunlearn import variant_runs

# The default sustained rate of the device-time estimate (docs/benchmarks.md, "Plan's default
# rate"): an assumption until issue [9/9] measures it.
RATE_TFLOPS = 100.0
LOGIT_BYTES = 4  # float32 logits and scaled logits
INDEX_BYTES = 8  # int64 split indices
# Epochs of the faithful variants (approx.faithful) that run fewer than their num_epochs:
# forsaken's returns after its first iteration (jaxmu/methods/forsaken.py).
FAITHFUL_EPOCHS = {"forsaken": 1}


def dataset_info(spec: ml_collections.ConfigDict) -> sources.Metadata:
  """A config's ``dataset`` section's sizes, classes and input shape, from known metadata."""
  info = sources.metadata(spec.name, **spec.options.to_dict())
  if info is None:
    raise ValueError(f"dataset {spec.name!r} has no known sizes to plan with; known: "
                     f"{', '.join(sorted(sources.KNOWN))}, synthetic")
  return info


def pipeline_of(config: ml_collections.ConfigDict) -> str:
  """The pipeline a config belongs to: IAM configs have ``score_ui``, U-LiRA-alone configs
  ``search_dir``, DeepUnlearn configs ``search``."""
  if "score_ui" in config:
    return "iam"
  if "search_dir" in config:
    return "ulira"
  if "search" in config:
    return "deepunlearn"
  raise ValueError("the config belongs to no known pipeline (no score_ui, search_dir or search)")


# ------------------------------------------------------------------------------------ costs


class Arch(NamedTuple):
  """One architecture's costs: per training step of one model at ``batch`` (XLA's count of the
  lowered step), per forward sample, its variables and training state (bytes), a step's
  activations (estimate) and its dataset on the device."""

  name: str
  batch: int
  step_flops: float
  forward_flops: float  # per sample
  variable_bytes: int
  state_bytes: int
  activation_bytes: int
  data_bytes: int

  @property
  def flops_per_sample(self) -> float:
    return self.step_flops / self.batch

  def program_bytes(self, models: int) -> int:
    """Device memory of a vmapped program over ``models`` of them (estimate)."""
    return self.data_bytes + models * (self.state_bytes + self.activation_bytes)


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _kept_outputs(jaxpr) -> int:
  """Bytes of the outputs of every convolution and matrix product of a jaxpr (nested ones
  included)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
      total += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns"):
          total += _kept_outputs(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          total += _kept_outputs(sub.jaxpr)
  return total


@functools.lru_cache(maxsize=None)
def _arch(name: str, model: nn.Module, shape: tuple, recipe: train.Recipe,
          num_samples: int) -> Arch:
  """The costs of ``model`` (registered as ``name``; see `Arch`), from lowered programs on
  abstract values. Cached by the module itself (its class and every field: classes, widths,
  options), not by ``name``: the registry may build another architecture under the same name.

  Activations (estimate): the outputs of a training step's convolutions and matrix products,
  three times over (each layer's output, its normalised and its activated form are kept for the
  backward pass).
  """
  stacked = common.abstract_variables(model, 1, shape)
  one = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), tree)
  state = one(jax.eval_shape(lambda v: train.create_state(v, recipe), stacked))
  variables = one(stacked)
  spec = jax.ShapeDtypeStruct
  b = recipe.batch_size
  scalar = lambda dtype: spec((), dtype)
  key = jax.eval_shape(lambda: jax.random.key(0))
  inputs, labels = spec((b, *shape), jnp.uint8), spec((b,), jnp.int32)
  step = functools.partial(train.train_step, model, recipe)
  args = (state, {"train": spec((b,), jnp.int32)}, key, {"t_max": scalar(jnp.float32)}, inputs,
          labels, scalar(jnp.int32), scalar(jnp.int32), scalar(jnp.float32))
  traced = jax.jit(step).trace(*args)
  step_flops = traced.lower().cost_analysis()["flops"]
  forward = jax.jit(functools.partial(train.logits, model, recipe)).lower(
      variables, inputs, spec((b,), jnp.int32)).cost_analysis()["flops"]
  return Arch(name, b, float(step_flops), float(forward) / b, _bytes(variables), _bytes(state),
              3 * _kept_outputs(traced.jaxpr.jaxpr), num_samples * math.prod(shape))


# ------------------------------------------------------------------------------------ stages


@dataclasses.dataclass
class StagePlan:
  """One stage of the plan (counts per the whole stage; ``arch`` names the model it runs)."""

  name: str
  reads: tuple[str, ...] = ()  # config sections its hash reads
  deps: tuple[str, ...] = ()
  arch: str = "model"
  models: int = 0
  chunk: int = 0  # models per program
  split: int = 0  # models of a stack split over jax.distributed processes (0: not split)
  # (models, forward passes) of each stack of a stage predicting stacks of several sizes, each
  # split over the processes (IAM's signals; ``split`` unused)
  stacks: tuple[tuple[int, int], ...] = ()
  programs: int = 0
  sample_passes: int = 0  # training (or, estimated, unlearning) sample-passes
  forward_passes: int = 0
  disk_bytes: int = 0
  estimated: bool = False  # sample_passes come from `_unlearn_passes`
  outputs_in: str = ""  # the sub-workdir holding its record ("ulira" inside DeepUnlearn)
  record: str = ""  # its record's name, if not ``name``
  flops: float = 0.0
  device_seconds: float = 0.0
  memory_bytes: int = 0
  reuse: str = ""


def _train_stage(name, reads, deps, arch, sets, epochs, chunk, forward=0, disk=0, **kw):
  """A stage training one stack: ``sets`` = samples per model."""
  chunk = chunk or len(sets)
  kw.setdefault("split", len(sets))
  return StagePlan(name, reads, deps, arch, models=len(sets), chunk=min(chunk, len(sets)),
                   programs=-(-len(sets) // chunk) if sets else 0,
                   sample_passes=epochs * sum(sets), forward_passes=forward, disk_bytes=disk, **kw)


def _unlearn_passes(hparams: dict, retain: float, budget: int | None = None) -> int:
  """Estimated sample-passes of one unlearning run: as many epochs as the method's
  ``num_epochs`` (in a search with epoch ``budget``: the mean of 1..budget; 1 without one), each
  a pass over the retain set or ``batches`` batches where the method has them; 0 for
  ``original`` (no hyper-parameters: nothing runs)."""
  if not hparams:
    return 0
  epochs = hparams.get("num_epochs", 1) if budget is None or "num_epochs" not in hparams else (
      (budget + 1) / 2)
  per_epoch = hparams["batches"] * hparams["batch_size"] if "batches" in hparams else retain
  return round(epochs * per_epoch)


def _unlearn_stage(name, reads, deps, hparams, runs, retain, chunk, disk, forward=0, **kw):
  """A stage unlearning ``runs`` models (estimated sample-passes)."""
  chunk = min(chunk or runs, runs)
  return StagePlan(name, reads, deps, models=runs, chunk=chunk, programs=-(-runs // chunk),
                   split=runs,
                   sample_passes=runs * _unlearn_passes(hparams, retain), forward_passes=forward,
                   disk_bytes=disk, estimated=True, **kw)


def _tuned(c) -> list[str]:
  """DeepUnlearn's searched methods (canonical names): those of search.methods in methods."""
  methods = {methods_lib.get(m).name for m in c.methods}
  return [m for m in (methods_lib.get(m).name for m in c.search.methods) if m in methods]


def _deepunlearn(c, info: sources.Metadata, var_bytes: int) -> list[StagePlan]:
  n, total = len(c.seeds), info.num_train + info.num_test
  val = math.ceil(c.split.val_ratio * info.num_train)
  forget = math.ceil(c.split.forget_ratio * (info.num_train - val))
  retain = info.num_train - val - forget
  chunk = c.parallel.max_models_per_program
  plans = [
      StagePlan("splits", ("split", "dataset"), disk_bytes=INDEX_BYTES * total),
      StagePlan("init", ("model", "seeds", "dataset"), models=n, disk_bytes=n * var_bytes),
      _train_stage("train", ("train", "data", "parallel", "seeds"), ("splits", "init"), "model",
                   [retain + forget] * n + [retain] * n, c.train.epochs, chunk,
                   disk=2 * n * var_bytes)]
  methods, tuned = [methods_lib.get(m).name for m in c.methods], _tuned(c)
  e_max = search.epoch_budget(c.train.epochs, c.search.epoch_fraction)
  runs = c.search.trials * len(c.search.seeds)
  plans.append(StagePlan(
      "search", ("search",), ("train",), models=runs * len(tuned), chunk=len(c.search.seeds),
      split=len(c.search.seeds),  # each trial's tuning stack
      programs=runs * len(tuned) // max(len(c.search.seeds), 1), estimated=True,
      sample_passes=runs * sum(_unlearn_passes(common.method_hparams(c, m), retain, e_max)
                               for m in tuned),
      forward_passes=runs * len(tuned) * total))
  groups = [(m, m) for m in methods] + list(variant_runs(c, tuned))
  plans += [_unlearn_stage(f"unlearn_{name}", ("unlearn", "parallel"), ("train",),
                           common.method_hparams(c, m), n, retain, n, n * var_bytes)
            for name, m in groups]
  plans.append(StagePlan("evaluate", deps=("train",) + tuple(f"unlearn_{g}" for g, _ in groups),
                         split=n, forward_passes=(2 + len(groups)) * n * total))
  if c.ulira.enabled:
    plans += [dataclasses.replace(p, name=f"ulira/{p.name}", outputs_in="ulira", record=p.name)
              for p in _ulira(c, info, var_bytes)[:-1]]
  plans.append(StagePlan("report", ("methods",), ("evaluate",)))
  return plans


def _ulira(c, info: sources.Metadata, var_bytes: int) -> list[StagePlan]:
  u = c.ulira
  s, f = u.lira.num_splits, u.lira.num_forget_draws
  val = int(info.num_train * u.lira.val_ratio)
  ins = (info.num_train - val) // 2
  retain = ins - int(ins * u.lira.forget_ratio)
  signals = s * f * info.num_train * (LOGIT_BYTES + 1)  # scaled logits and correctness
  chunk = u.max_models_per_program
  plans = [
      StagePlan("splits", ("ulira", "dataset"), disk_bytes=INDEX_BYTES * s * f * ins * 2),
      StagePlan("init", ("model", "ulira", "dataset"), models=1, disk_bytes=var_bytes),
      _train_stage("train", ("train", "ulira", "data", "parallel"), ("splits", "init"), "model",
                   [ins] * s + [retain] * (s * f), u.epochs, chunk,
                   forward=s * f * info.num_train, disk=s * var_bytes + signals)]
  methods = tuple(c.ulira.methods)
  for m in methods:
    plans.append(_unlearn_stage(f"unlearn_{m}", ("unlearn", "ulira", "parallel"), ("train",),
                                common.method_hparams(c, m), s * f, retain, chunk, signals,
                                forward=s * f * info.num_train))
  plans.append(StagePlan("ulira", ("ulira",), ("splits", "train") + tuple(
      f"unlearn_{m}" for m in methods)))
  plans.append(StagePlan("report", (), ("ulira",)))
  return plans


def _iam(c, info: sources.Metadata, var_bytes: dict[str, int]) -> list[StagePlan]:
  runs = iam_setting.runs(c)
  o, r, k = iam_setting.num_originals(c), len(runs), c.num_shadows
  train_part = info.num_train if info.num_test else int((1 - c.split.holdout_ratio) * info.num_train)
  held = info.num_test or info.num_train - train_part
  incremental = c.setting == "incremental"
  pool = c.incremental.pool_size if incremental else train_part - c.split.shadow_size
  shadow_pool = c.shadow_dataset.shadow_size if c.setting == "shifted" else c.split.shadow_size
  val = min(held - (held + 1) // 2, c.split.val_cap)
  per_class = pool // info.num_classes  # balanced classes assumed
  forget = {"set_random": c.split.forget_size, "one_class": per_class,
            "class_percentage": int(c.split.class_ratio * per_class)}
  retain = [pool - forget[run.forget] for run in runs]
  chunk = c.parallel.max_models_per_program
  shadow_train = int(c.split.shadow_train_frac * shadow_pool)
  epochs, t_epochs = c.train.epochs, c.train.target_epochs
  select = int(c.train.select_best)
  trains = ("train", "data", "parallel", "model")
  taken = dict(models=0, programs=0, chunk=0)
  shadows = _train_stage(
      "shadows", trains + ("shadow_model", "setting", "shadow_dataset"), ("splits",), "shadow",
      [shadow_train] * k + [shadow_pool], epochs, chunk,
      forward=select * epochs * (k * (shadow_pool - shadow_train) + shadow_pool),
      disk=(k + 1) * var_bytes["shadow"])
  ref_in = _train_stage("ref_in", trains + ("ref_in",), ("splits",), "model", [val],
                        c.ref_in.epochs, 1, forward=select * c.ref_in.epochs * shadow_pool,
                        disk=var_bytes["model"])
  targets = _train_stage("targets", trains + ("original_per_seed",), ("splits",), "model",
                         [pool] * o + retain, t_epochs, chunk,
                         forward=select * t_epochs * (o + r) * val,
                         disk=(o + r) * var_bytes["model"])
  if c.reuse.shadows or incremental:
    shadows = dataclasses.replace(shadows, sample_passes=0, forward_passes=0, **taken)
  if c.reuse.targets:
    ref_in, targets = (dataclasses.replace(p, sample_passes=0, forward_passes=0, **taken)
                       for p in (ref_in, targets))
  # the stacks the signals predict: shadows (queries, each target's population, pool), originals,
  # targets; one model at a time: each target and the IN model on its population, the origin
  stacks = ((k, k * (pool + r * val + shadow_pool)), (o, o * pool), (r, r * pool),
            (1, 2 * r * val + shadow_pool))
  logits = sum(f for _, f in stacks)
  plans = [StagePlan("splits", ("split", "seeds", "num_shadows", "dataset", "setting"),
                     disk_bytes=INDEX_BYTES * (train_part + held + k * shadow_pool)),
           shadows, ref_in, targets,
           StagePlan("signals", ("signals",), ("shadows", "ref_in", "targets"), stacks=stacks,
                     forward_passes=logits, disk_bytes=logits * info.num_classes * LOGIT_BYTES),
           StagePlan("binui", ("audit",), ("signals",))]
  if c.audit.scoring_ablation:
    plans.append(StagePlan("scoring", ("audit",), ("signals",)))
  if iam_tables.sensitivity_grid(c)[0]:  # from the saved signals, on the host
    plans.append(StagePlan("sensitivity", ("sensitivity",), ("signals",)))
  loops, breaks = c.score_ui.start_models, c.score_ui.breaks
  if loops:
    plans.append(_train_stage(
        "score_ui", ("score_ui", "audit") + trains, ("signals",), "shadow", [pool] * loops,
        c.score_ui.epochs, loops, split=0,  # on process 0 alone
        forward=loops * (c.score_ui.epochs * val + (breaks + 1) * (pool + val))))
  methods = tuple(methods_lib.get(m).name for m in c.approx.methods)
  for m in methods:  # a faithful variant (approx.faithful) is named as Table 8 names it
    hparams = {**methods_lib.get(m).defaults, **iam_tables.approx_hparams(c, m)}
    if hparams.get("faithful") and m in FAITHFUL_EPOCHS:
      hparams["num_epochs"] = FAITHFUL_EPOCHS[m]
    plans.append(_unlearn_stage(f"approx_{iam_tables.approx_label(c, m)}", ("approx", "parallel"),
                                ("targets",), hparams, r, sum(retain) / r, r,
                                r * var_bytes["model"], record=f"approx_{m}"))
  if methods:
    plans.append(StagePlan("approx", ("audit", "approx"), ("signals",) + tuple(
        f"approx_{m}" for m in methods), split=r, forward_passes=len(methods) * r * pool))
  plans.append(StagePlan("report", ("approx",), ("binui",)))
  return plans


# ------------------------------------------------------------------------------------ reuse


def _first_difference(a: Any, b: Any, path: str) -> str | None:
  """The first dotted path where two plain JSON trees differ, or None."""
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      found = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
      if found:
        return found
    return None
  return None if a == b else path


def _reuse(plans: list[StagePlan], config, workdir: Path) -> None:
  """Sets each stage's ``reuse``: "reused" or why it would run, from the stage records of
  ``workdir`` (read only) and its ``config.json``."""
  verdicts: dict[tuple[str, str], bool] = {}
  for p in plans:
    root = workdir / p.outputs_in
    record = p.record or p.name
    saved = root / "config.json"
    # Workdir() creates stages/ and .tmp/; every workdir a run wrote already has both.
    wd = stages.Workdir(root) if (root / "stages").is_dir() and (root / ".tmp").is_dir() else None
    manifest = wd and wd.manifest(record)
    if p.name.endswith("search"):
      tuned = _tuned(config)
      have = [m for m in tuned if (workdir / "search" / f"{m}.json").exists()]
      ok = verdicts.get(("", "train"), False) and len(have) == len(tuned)
      p.reuse = "continues the studies" if ok else f"runs ({len(have)} of {len(tuned)} results)"
      verdicts[(p.outputs_in, record)] = True
      continue
    if manifest is None:
      p.reuse = "new"
    elif not all(wd.path(o).exists() for o in manifest["outputs"]):
      p.reuse = "outputs missing"
    elif changed := [d for d in p.deps if not verdicts.get((p.outputs_in, d), True)
                     or manifest["deps"].get(d) != (wd.manifest(d) or {}).get("hash")]:
      p.reuse = f"input '{changed[0]}' changed"
    else:
      old = json.loads(saved.read_text()) if saved.exists() else {}
      new = json.loads(stages.to_json(config))
      diff = next((d for s in p.reads if (d := _first_difference(old.get(s), new.get(s), s))),
                  None)
      p.reuse = f"config changed: {diff}" if diff else "reused"
    verdicts[(p.outputs_in, record)] = p.reuse == "reused"


# ------------------------------------------------------------------------------------ plan


@dataclasses.dataclass
class Plan:
  pipeline: str
  title: str
  rate_tflops: float
  stages: list[StagePlan]
  archs: dict[str, Arch]
  workdir: str | None

  @property
  def totals(self) -> dict[str, float]:
    return {"flops": sum(s.flops for s in self.stages),
            "device_hours": sum(s.device_seconds for s in self.stages) / 3600,
            "sample_passes": sum(s.sample_passes for s in self.stages),
            "models": sum(s.models for s in self.stages),
            "programs": sum(s.programs for s in self.stages),
            "disk_bytes": sum(s.disk_bytes for s in self.stages),
            "max_memory_bytes": max(s.memory_bytes for s in self.stages)}

  def wall_hours(self, processes: int) -> float:
    """Estimated wall time on ``processes`` processes (one device each): a split stage takes
    its largest share (contiguous shares, `jaxmu.distributed.process_models`; a stack of fewer
    models than processes runs whole on each), a stage of ``stacks`` each stack's largest share
    of its forward passes, any other stage all its time."""
    def share(models):
      if not models or models < processes:
        return 1.0
      return len(distributed.process_models(models, processes)[0]) / models  # the largest

    def fraction(s):
      if not s.stacks:
        return share(s.split)
      return sum(f * share(m) for m, f in s.stacks) / (sum(f for _, f in s.stacks) or 1)
    return sum(s.device_seconds * fraction(s) for s in self.stages) / 3600

  @property
  def over_processes(self) -> list[dict]:
    """Wall time and device-hours (wall x processes) on 1, 2, 4, 8 and 16 processes."""
    return [{"processes": p, "wall_hours": h, "device_hours": p * h}
            for p, h in ((p, self.wall_hours(p)) for p in PROCESSES)]

  def to_json(self) -> dict:
    return {"pipeline": self.pipeline, "title": self.title, "rate_tflops": self.rate_tflops,
            "workdir": self.workdir,
            "archs": {k: a._asdict() for k, a in self.archs.items()},
            "stages": [dataclasses.asdict(s) for s in self.stages], "totals": self.totals,
            "over_processes": self.over_processes, "assumptions": ASSUMPTIONS}

  def markdown(self) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = [f"# Plan: {self.title}", "",
             f"Pipeline `{self.pipeline}`; device time at a sustained {self.rate_tflops:g} "
             "TFLOP/s (an assumption: docs/benchmarks.md, \"Plan's default rate\"); memory as "
             "one vmapped program per stack chunk (the strategy on a GPU).", ""]
    for key, a in self.archs.items():
      lines.append(f"- {key} `{a.name}`: {a.step_flops / 1e9:.3f} GFLOP per training step of "
                   f"one model at batch {a.batch} (XLA, lowered step), {a.forward_flops / 1e6:.2f} "
                   f"MFLOP per forward sample; variables {a.variable_bytes / 2**20:.1f} MiB, "
                   f"training state {a.state_bytes / 2**20:.1f} MiB, step activations "
                   f"{a.activation_bytes / 2**20:.1f} MiB (estimate) per model")
    lines += ["", "| stage | models | programs | sample-passes | forward passes | PFLOP | device h "
              "| memory GiB per program (est.) | disk GiB | workdir |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in self.stages:
      passes = f"{s.sample_passes:,}" + (" (est.)" if s.estimated else "")
      lines.append(f"| {s.name} | {s.models} | {s.programs} | {passes} | {s.forward_passes:,} | "
                   f"{s.flops / 1e15:.3g} | {s.device_seconds / 3600:.3g} | "
                   f"{gib(s.memory_bytes) if s.memory_bytes else '-'} | {gib(s.disk_bytes)} | "
                   f"{s.reuse or '-'} |")
    t = self.totals
    lines += [f"| **total** | {t['models']} | {t['programs']} | {t['sample_passes']:,} | | "
              f"{t['flops'] / 1e15:.3g} | {t['device_hours']:.3g} | {gib(t['max_memory_bytes'])} "
              f"(max) | {gib(t['disk_bytes'])} | |", "",
              "Over jax.distributed processes (one device each; README \"On a cluster\"):", "",
              "| processes | wall h | device h |", "|---|---|---|"]
    lines += [f"| {r['processes']} | {r['wall_hours']:.3g} | {r['device_hours']:.3g} |"
              for r in self.over_processes]
    lines += ["", "Assumptions:", ""]
    lines += [f"- {a}" for a in ASSUMPTIONS]
    return "\n".join(lines) + "\n"

  def write(self, directory: str | Path) -> Path:
    """Writes ``plan.md`` and ``plan.json`` into ``directory``; returns the Markdown's path."""
    directory = Path(directory)
    with stages.atomic_write(directory / "plan.json", "w") as f:
      f.write(stages.to_json(self.to_json(), indent=1) + "\n")
    with stages.atomic_write(directory / "plan.md", "w") as f:
      f.write(self.markdown())
    return directory / "plan.md"


ASSUMPTIONS = (
    "sample-passes: epochs x samples per model, summed; padding steps of shorter stack-mates "
    "are not counted",
    "unlearning sample-passes (est.): per run, the method's num_epochs (1 without one; in the "
    "search the mean of 1..the epoch budget; FAITHFUL_EPOCHS for a faithful variant) passes over "
    "the retain set (or its `batches` batches)",
    "FLOPs: sample-passes x (training step FLOPs / batch) + forward passes x forward FLOPs per "
    "sample; attacks and scoring run on the host and are not counted",
    "memory per program (est.): the dataset on the device + per model its training state and "
    "3 x the outputs of a step's convolutions and matrix products",
    "disk: the stage's outputs (models as float32 variables, signals, splits); training "
    "checkpoints are temporary and not counted",
    "workdir: the stage records and the config sections each stage reads against config.json; "
    "the run also checks the data's fingerprint",
    "processes: stages that train, unlearn or predict a stack (and the search's trials) split "
    "its models over processes, each stack's work divided by its largest share (a stack of fewer "
    "models than processes runs whole on each); ScoreUI runs whole on process 0 while the others "
    "wait",
)
PROCESSES = (1, 2, 4, 8, 16)


def make(config: ml_collections.ConfigDict, workdir: str | Path | None = None,
         rate_tflops: float = RATE_TFLOPS) -> Plan:
  """The plan of ``config``'s pipeline (`pipeline_of`); ``workdir``: an existing run whose stage
  records say what would be reused (only read)."""
  pipeline = pipeline_of(config)
  validate.check(pipeline, config)
  archs = {"model": iam_setting.architecture(config, "targets")}
  if pipeline == "iam":
    iam_tables.check_approx(config)  # approx.faithful and sensitivity, as the pipeline's run
    archs["shadow"] = iam_setting.architecture(config, "shadows")
  info = dataset_info(config.dataset)
  # Normalisation constants change no count: plans that differ only in them share the lowering.
  recipe = dataclasses.replace(common.recipe(config), mean=(0.0,), std=(1.0,))
  costs = {k: _arch(name, models.get(name, info.num_classes, **dict(options)), info.shape, recipe,
                    info.num_train + info.num_test) for k, (name, options) in archs.items()}
  var_bytes = {k: a.variable_bytes for k, a in costs.items()}
  build = {"deepunlearn": _deepunlearn, "ulira": _ulira, "iam": _iam}[pipeline]
  plans = build(config, info, var_bytes if pipeline == "iam" else var_bytes["model"])
  for p in plans:
    a = costs[p.arch]
    p.flops = p.sample_passes * a.flops_per_sample + p.forward_passes * a.forward_flops
    p.device_seconds = p.flops / (rate_tflops * 1e12)
    p.memory_bytes = a.program_bytes(p.chunk) if p.sample_passes else 0
  if workdir is not None and Path(workdir).is_dir():
    _reuse(plans, config, Path(workdir))
  title = f"{pipeline}: {config.dataset.name} / {config.model.name}"
  return Plan(pipeline, title, rate_tflops, plans, costs,
              None if workdir is None else str(workdir))
