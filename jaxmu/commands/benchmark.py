"""Throughput benchmarks of stacks of models (JSON, and Markdown with --out_md).

Measures training throughput of stacks of models (per model family, stack size, strategy and
compute dtype; the engine's training step dispatched per step), or
(``--config=bench:dispatch``) model-steps/s of `train.fit` with per-step dispatch vs each epoch
as one compiled program, or (``--config=bench:attacks``) the time of attack scoring, or
(``--config=bench:search``) trials x seeds per second of the search; prints a table and
writes JSON (and with ``--out_md`` a Markdown table: training rows with the issue [9/9]
projections, or the dispatch rows side by side).

    jaxmu benchmark --config=bench --out=runs/bench.json
    jaxmu benchmark --config=bench:gpu --out=runs/bench_gpu.json \
        --out_md=runs/bench_gpu.md

Throughput is steady state: the first step (compilation) is timed apart, ``warmup_steps`` more
steps are run untimed, then the median over ``repeats`` runs of ``steps`` steps. FLOPs per model
step come from XLA's cost analysis of the compiled one-model training step
(``compiled.cost_analysis()["flops"]``, forward + backward + update as compiled, not counted by
hand); utilisation divides the achieved FLOP rate by the device's dense peak (`PEAK_TFLOPS`).

Imports neither optuna nor tensorflow-datasets (except the ``search`` section), so it runs with
only jax/flax/optax installed (e.g. on a lent GPU machine with PYTHONPATH=.).
"""

import functools
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from jaxmu import cli
from jaxmu.errors import ConfigError, Problem

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results (optional).")
_OUT_MD = flags.DEFINE_string("out_md", None, "Where to write a Markdown summary (optional).")
flags.mark_flag_as_required("config")

# Dense peak TFLOP/s by device_kind substring: (bfloat16, float32). float32 matmuls and convs on
# Ampere/Hopper run as TF32 on tensor cores under JAX's default precision, so the TF32 peak is the
# float32 bar. Vendor datasheets (SXM parts unless named).
PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The dense peak of ``device_kind`` for ``dtype``, or None where unknown (CPUs)."""
  for name, (bf16, fp32) in PEAK_TFLOPS.items():
    if name in device_kind:
      return bf16 if dtype == "bfloat16" else fp32
  return None


def parse_model(spec: str) -> tuple[str, dict]:
  """``"resnet18:stem=cifar"`` -> ("resnet18", {"stem": "cifar"}); integer values become ints."""
  name, _, args = spec.partition(":")
  kw = dict(item.split("=", 1) for item in args.split(",") if item)
  return name, {k: int(v) if v.isdigit() else v for k, v in kw.items()}


def _setup(spec, num_models, strategy, dtype, config):
  """(step(internal, s) -> internal, internal state, XLA's FLOPs of one model's step) for a stack
  of ``num_models`` models of ``spec`` on synthetic data: the engine's step, dispatched per step."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxmu import airbench, models, parallel, train
  from jaxmu.models import airbench as airbench_net

  name, kw = parse_model(spec)
  shape, b = tuple(config.input_shape), config.batch_size
  rng = np.random.default_rng(0)
  num_samples = b * config.batches_per_epoch
  inputs = jnp.asarray(rng.integers(0, 256, (num_samples, *shape), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, config.num_classes, num_samples).astype(np.int32))
  keys = jax.random.split(jax.random.key(0), num_models)
  strat = parallel.Strategy(strategy)
  orders = {"train": jnp.tile(jnp.arange(num_samples, dtype=jnp.int32), (num_models, 1))}
  one = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
  if name == "airbench94":
    model = airbench_net.airbench94(config.num_classes, **kw)
    statics = (model, airbench.Hyper(batch_size=b, mean=(0.5,), std=(0.25,), dtype=dtype))
    variables = train.init_variables(model, keys, shape)
    state = airbench.State(variables["params"], variables["batch_stats"],
                           jax.tree.map(jnp.zeros_like, variables["params"]),
                           jax.tree.map(jnp.copy, variables), jnp.zeros((num_models,), jnp.int32))
    hp = {"flip_key": keys, "total_steps": jnp.full((num_models,), 10 ** 9, jnp.int32),
          "epoch_steps": jnp.full((num_models,), config.batches_per_epoch, jnp.int32)}
    step_fn = airbench.train_step
  else:
    model = models.get(name, config.num_classes, **kw)
    recipe = train.Recipe(batch_size=b, augment=config.augment, mean=(0.5,), std=(0.25,),
                          dtype=dtype)
    statics = (model, recipe)
    state = train.create_state(train.init_variables(model, keys, shape), recipe)
    hp = {"t_max": jnp.ones((num_models,), jnp.float32)}
    step_fn = train.train_step
  single = functools.partial(step_fn, *statics)
  step = strat.compile(single, num_per_model=3)
  per_model = (orders, keys, hp)
  shared = lambda s: (inputs, labels, jnp.int32(s % config.batches_per_epoch),  # noqa: E731
                      jnp.int32(0), jnp.float32(1))
  args = tuple(strat.enter_args(a) for a in per_model)
  flops = _FLOPS.get((spec, dtype, b))
  if (spec, dtype, b) not in _FLOPS:
    compiled = jax.jit(single).lower(one(state), *(one(a) for a in per_model), *shared(0)).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    flops = float(analysis["flops"]) if analysis and "flops" in analysis else None
    _FLOPS[spec, dtype, b] = flops
  return (lambda internal, s: step(internal, *args, *shared(s))[0]), strat.enter(state), flops


_FLOPS: dict[tuple, float | None] = {}  # per (spec, dtype, batch): one compile for the analysis


def measure(spec, num_models, strategy, dtype, config) -> dict:
  """Steady-state throughput of one stack (see the module docstring)."""
  import jax
  import numpy as np

  run, internal, flops = _setup(spec, num_models, strategy, dtype, config)

  def steps(internal, count, offset):
    for s in range(count):
      internal = run(internal, offset + s)
    jax.block_until_ready(internal)
    return internal

  start = time.perf_counter()
  internal = steps(internal, 1, 0)
  first = time.perf_counter() - start
  internal = steps(internal, config.warmup_steps, 1)
  seconds = []
  for _ in range(config.repeats):
    start = time.perf_counter()
    internal = steps(internal, config.steps, 0)
    seconds.append(time.perf_counter() - start)
  model_steps = num_models * config.steps / float(np.median(seconds))
  images = model_steps * config.batch_size
  rate = flops * model_steps / 1e12 if flops else None
  peak = peak_tflops(jax.devices()[0].device_kind, dtype)
  return {"model": spec, "num_models": num_models, "strategy": strategy, "dtype": dtype,
          "batch_size": config.batch_size, "input_shape": list(config.input_shape),
          "first_step_seconds": round(first, 3), "seconds": [round(t, 4) for t in seconds],
          "model_steps_per_s": round(model_steps, 2), "images_per_s": round(images, 1),
          "model_epochs_per_s": round(images / config.epoch_images, 4),
          "gflops_per_model_step": round(flops / 1e9, 3) if flops else None,
          "tflops_per_s": round(rate, 3) if rate else None,
          "utilisation": round(rate / peak, 4) if rate and peak else None}


def measure_attacks(config) -> list[dict]:
  """Seconds per attack scoring call on random signals: first call (with compilation) and the
  median of ``repeats`` later calls."""
  import jax
  import numpy as np

  from jaxmu.attacks import iam, lira

  c = config.attacks
  rng = np.random.default_rng(0)
  n = c.num_samples

  def timed(fn, **row):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(c.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
    return row | {"num_samples": n, "first_call_seconds": round(first, 3),
                  "seconds": round(float(np.median(times)), 4)}

  target, fit = rng.random(n, np.float32), rng.random(n, np.float32)
  shadows = rng.random((c.iam_shadows, n), np.float32)
  rows = [timed(lambda: iam.iam_score(target, fit, shadows, c.num_interp, dist),
                attack=f"iam_{dist}", num_shadows=c.iam_shadows, num_interp=c.num_interp)
          for dist in c.iam_dists]
  lira_shadows = rng.normal(size=(c.lira_shadows, n)).astype(np.float32)
  in_mask = rng.random((c.lira_shadows, n)) < 0.5
  rows.append(timed(lambda: lira.carlini_lira_online(target, lira_shadows, in_mask),
                    attack="carlini_lira_online", num_shadows=c.lira_shadows))
  if c.get("audit_classes"):  # one `audit` call with every attack: the unit of BinUI and ScoreUI
    rows.append(timed(_audit_call(rng, n, c.audit_classes, c.audit_population),
                      attack="audit_all_attacks", num_shadows=1, num_classes=c.audit_classes,
                      population=c.audit_population))
  return rows


def _audit_call(rng, n, num_classes, z):
  """`audit` of every attack on random logits (K = 1, a population of z, UnLeak prefitted once
  per shadow group as the pipeline does), as a thunk."""
  from jaxmu.attacks.audit import Population, UnleakData, audit, unleak_model

  logits = lambda *shape: rng.normal(size=(*shape, num_classes)).astype("float32")
  labels = lambda m: rng.integers(0, num_classes, m)
  original, target, shadows, y = logits(n), logits(n), logits(1, n), labels(n)
  population = Population(logits(z), logits(1, z), labels(z), logits(z))
  unleak = unleak_model(UnleakData(logits(2000), logits(1, 2000), rng.random((1, 2000)) < 0.2))
  shadow_train = [(logits(4000), labels(4000))]
  return lambda: audit(original, target, shadows, y, population=population, unleak=unleak,
                       shadow_train=shadow_train).scores["iam_on"]


def measure_search(config) -> list[dict]:
  """Trials x seeds per second of the hyper-parameter search (`jaxmu.search.throughput`): the
  tuning seeds as one stack vs one seed at a time, the same trials, on digits originals and
  retrained models trained here as one stack (imports optuna)."""
  import jax
  import numpy as np

  from jaxmu import data as data_lib
  from jaxmu import models, search, train
  from jaxmu import methods as methods_lib
  from jaxmu.data import splits as splits_lib

  c = config.search
  ds = data_lib.load("digits")
  parts = splits_lib.deepunlearn(ds.num_train, ds.num_test, seed=123)
  model = models.get("small_cnn", ds.num_classes)
  r = data_lib.recipe("digits")
  recipe = train.Recipe(batch_size=64, mean=tuple(r.mean), std=tuple(r.std), augment=r.augment)
  seeds = tuple(range(c.seeds))
  inits = train.init_variables(model, jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32)),
                               ds.inputs.shape[1:])
  both = jax.tree.map(lambda x: np.concatenate([x, x]), inits)
  state = train.create_state(both, recipe, learning_rate=0.05)
  full = np.concatenate([parts["retain"], parts["forget"]])
  trained = train.fit(model, state, train.DeviceData.create(ds),
                      [full] * len(seeds) + [parts["retain"]] * len(seeds), recipe,
                      c.train_epochs, jax.random.key(0), progress=False).state.variables
  originals, retrained = (jax.tree.map(lambda x, g=g: x[g * len(seeds):(g + 1) * len(seeds)],
                                       trained) for g in range(2))
  ctx = methods_lib.Context.create(model, recipe, train.DeviceData.create(ds), originals, inits,
                               parts["retain"], parts["forget"], parts["val"], model_ids=seeds,
                               num_classes=ds.num_classes, train_epochs=c.train_epochs)
  return [search.throughput(method, ctx, retrained, c.trials, stacked)
          for method in c.methods for stacked in (True, False)]


def measure_dispatch(config, write) -> list[dict]:
  """Model-steps/s of `train.fit` per model, stack size N and strategy kind, with each epoch as
  one dispatch per step and as one compiled program (``Strategy.scan``). A first fit per mode
  compiles; then the two modes' timed fits alternate ``repeats`` times (a shared machine's load
  drift hits both), each ``epochs`` epochs of ``batches_per_epoch`` steps; the median is kept.
  ``write(rows)`` after each measured pair, so a run stopped early keeps what it measured."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxmu import models, parallel, train

  c = config.dispatch
  rng = np.random.default_rng(0)
  rows = []
  for spec, shape, b in zip(c.models, c.input_shapes, c.batch_sizes):
    name, kw = parse_model(spec)
    num_samples = b * c.batches_per_epoch
    data = train.DeviceData(
        jnp.asarray(rng.integers(0, 256, (num_samples, *shape), dtype=np.uint8)),
        jnp.asarray(rng.integers(0, config.num_classes, num_samples).astype(np.int32)))
    model = models.get(name, config.num_classes, **kw)
    recipe = train.Recipe(batch_size=b, augment="none", mean=(0.5,), std=(0.25,),
                          dtype=c.dtype)
    for n in c.num_models:
      state = train.create_state(train.init_variables(
          model, jax.random.split(jax.random.key(0), n), shape), recipe)
      sets = [np.arange(num_samples)] * n
      for kind in c.strategies:
        fit = lambda epochs, scan: train.fit(  # noqa: E731
            model, state, data, sets, recipe, epochs, jax.random.key(1),
            strategy=parallel.Strategy(kind, scan), progress=False).state.params
        timed = {False: [], True: []}
        first = {scan: _seconds(lambda scan=scan: fit(1, scan)) for scan in (False, True)}
        for _ in range(c.repeats):
          for scan in (False, True):
            timed[scan].append(_seconds(lambda scan=scan: fit(c.epochs, scan)))
        for scan in (False, True):
          seconds = float(np.median(timed[scan]))
          row = {"model": spec, "input_shape": list(shape), "batch_size": b, "num_models": n,
                 "dtype": c.dtype, "strategy": kind, "epoch": "scan" if scan else "steps",
                 "steps_per_epoch": c.batches_per_epoch, "epochs": c.epochs,
                 "first_fit_seconds": round(first[scan], 3),
                 "seconds": [round(t, 4) for t in timed[scan]],
                 "model_steps_per_s": round(n * c.epochs * c.batches_per_epoch / seconds, 1),
                 "load_average": [round(x, 2) for x in os.getloadavg()]}
          rows.append(row)
          print(json.dumps(row), flush=True)
        write(rows)
  return rows


def _seconds(fn) -> float:
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def environment() -> dict:
  """Device, backend and library versions for the JSON and the printed table."""
  import jax
  versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")}
  return {"device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(),
          "backend": jax.default_backend(), **versions, "python": platform.python_version(),
          "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}


def training_rows(config, write) -> list[dict]:
  """Measures the config's rows, most important first: per dtype, per stack size (in the config's
  order), every model and strategy (one strategy for N = 1, where they coincide). Stops before a
  row once ``time_budget_s`` is spent; a row that fails (e.g. out of memory) records its error."""
  rows, start = [], time.perf_counter()
  for dtype in config.dtypes:
    for n in config.num_models:
      for spec in config.models:
        for strategy in config.strategies[:1] if n == 1 else config.strategies:
          if config.time_budget_s and time.perf_counter() - start > config.time_budget_s:
            print(f"time budget of {config.time_budget_s} s spent; stopping", flush=True)
            return rows
          try:
            row = measure(spec, n, strategy, dtype, config)
          except Exception as e:  # noqa: BLE001 (one failed row must not lose the others)
            row = {"model": spec, "num_models": n, "strategy": strategy, "dtype": dtype,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}
          rows.append(row)
          print(json.dumps(row), flush=True)
          write(rows)
  return rows


def markdown(result: dict) -> str:
  """The table of training rows and, where ResNet-18 rows exist, the [9/9] projections."""
  env = result["environment"]
  lines = [f"Device: {env['device']} x{env['device_count']} ({env['backend']}), jax {env['jax']}, "
           f"flax {env['flax']}, optax {env['optax']}, {env['date']}.", "",
           "| model | N | strategy | dtype | images/s | model-epochs/s | GFLOP/model-step | "
           "TFLOP/s | utilisation | first step s |", "|---|---|---|---|---|---|---|---|---|---|"]
  rows = [r for r in result["rows"] if "images_per_s" in r or "error" in r]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['num_models']} | {r['strategy']} | {r['dtype']} | "
                   f"error: {r['error'][:80]} |||||")
      continue
    util = f"{100 * r['utilisation']:.1f}%" if r["utilisation"] is not None else "-"
    lines.append(f"| {r['model']} | {r['num_models']} | {r['strategy']} | {r['dtype']} | "
                 f"{r['images_per_s']:,.0f} | {r['model_epochs_per_s']:.3f} | "
                 f"{r['gflops_per_model_step'] or '-'} | {r['tflops_per_s'] or '-'} | {util} | "
                 f"{r['first_step_seconds']} |")
  lines += ["", *projections(rows)]
  return "\n".join(lines) + "\n"


def dispatch_markdown(result: dict) -> str:
  """The dispatch rows side by side: per (model, N, strategy), steps vs scanned epochs."""
  env = result["environment"]
  lines = [f"Device: {env['device']} x{env['device_count']} ({env['backend']}), jax {env['jax']}, "
           f"flax {env['flax']}, optax {env['optax']}, {env['date']}.", "",
           "| model | input | batch | dtype | N | strategy | model-steps/s, steps | "
           "model-steps/s, scan | scan / steps | first fit s, steps / scan | load average |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  rows = result["rows"]
  for steps, scan in zip(rows[::2], rows[1::2]):
    lines.append(
        f"| {steps['model']} | {'x'.join(map(str, steps['input_shape']))} | "
        f"{steps['batch_size']} | {steps.get('dtype', 'float32')} | {steps['num_models']} | "
        f"{steps['strategy']} | {steps['model_steps_per_s']:,.1f} | {scan['model_steps_per_s']:,.1f} | "
        f"{scan['model_steps_per_s'] / steps['model_steps_per_s']:.2f}x | "
        f"{steps['first_fit_seconds']} / {scan['first_fit_seconds']} | "
        f"{scan['load_average'][0]} |")
  return "\n".join(lines) + "\n"


def projections(rows) -> list[str]:
  """Issue [9/9] targets from the best measured rows: stack-of-16 speed-up over one model
  (ResNet-18 imagenet stem, bf16), the 20 DeepUnlearn CIFAR-10 reference models (10 x (182 epochs
  of 42,500 + 182 of 38,250 images)) and 128 IAM shadows (CIFAR-stem ResNet-18, 201 epochs of
  16,000 images)."""
  def best(model, dtype, n=None):
    fits = [r for r in rows if "images_per_s" in r and r["model"] == model and r["dtype"] == dtype
            and (n is None or r["num_models"] == n)]
    return max(fits, key=lambda r: r["images_per_s"]) if fits else None

  out = []
  alone, stack = best("resnet18", "bfloat16", 1), best("resnet18", "bfloat16", 16)
  if alone and stack:
    out.append(f"- ResNet-18 (imagenet stem, bf16): a stack of 16 trains "
               f"{stack['images_per_s'] / alone['images_per_s']:.1f}x the images/s of one model "
               f"({stack['strategy']} vs {alone['strategy']}; target >= 5x).")
  for dtype in ("bfloat16", "float32"):
    r = best("resnet18", dtype)
    if r:
      minutes = 10 * 182 * (42_500 + 38_250) / r["images_per_s"] / 60
      out.append(f"- 20 DeepUnlearn CIFAR-10 reference models, ResNet-18 {dtype}: "
                 f"{minutes:.1f} min at the best measured {r['images_per_s']:,.0f} images/s (N={r['num_models']}, "
                 f"{r['strategy']}; target <= 10 min).")
    r = best("resnet18:stem=cifar", dtype)
    if r:
      minutes = 128 * 201 * 16_000 / r["images_per_s"] / 60
      out.append(f"- 128 IAM shadows, CIFAR-stem ResNet-18 {dtype}: {minutes:.1f} min at "
                 f"{r['images_per_s']:,.0f} images/s (N={r['num_models']}, {r['strategy']}; "
                 "target <= 90 min).")
  if out:
    out.insert(0, "Projections (training steps only; evaluation, data loading and compilation "
                  "excluded):")
  return out


_MARKDOWN = {"training": markdown, "dispatch": dispatch_markdown}
SECTIONS = ("training", "attacks", "search", "dispatch")
DTYPES = ("float32", "bfloat16")


def problems(config, out: str | None = None, out_md: str | None = None) -> list[Problem]:
  """What is wrong with a benchmark config (and the output paths) before anything runs."""
  from jaxmu import models, parallel
  found = []

  def need(field, ok, what, fix):
    if not ok:
      found.append(Problem(field, what, fix))

  def counts(field, values, low=1):
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    need(field, values and all(isinstance(v, int) and v >= low for v in values),
         f"{values if len(values) != 1 else values[0]!r} is not a whole number >= {low}",
         f"set {field} >= {low}")

  section = config.get("section", "training")
  need("section", section in SECTIONS, f"unknown section {section!r}",
       f"use one of {', '.join(SECTIONS)}")
  if section == "training":
    for field in ("steps", "repeats", "batch_size", "batches_per_epoch", "num_classes",
                  "epoch_images"):
      counts(field, config[field])
    counts("warmup_steps", config.warmup_steps, 0)
    counts("num_models", config.num_models)
    for spec in config.models:
      name = parse_model(spec)[0]
      need("models", name in models.NAMES, f"unknown model {name!r}",
           f"use one of {', '.join(models.NAMES)}")
    need("models", len(config.models) > 0, "is empty", "name at least one model")
    bad = [s for s in config.strategies if s not in parallel.NAMES]
    need("strategies", config.strategies and not bad, f"{tuple(config.strategies)} has unknown "
         f"or no strategies", f"use {', '.join(parallel.NAMES)}")
    bad = [d for d in config.dtypes if d not in DTYPES]
    need("dtypes", config.dtypes and not bad, f"{tuple(config.dtypes)} has unknown or no dtypes",
         f"use {', '.join(DTYPES)}")
  elif section == "dispatch":
    d = config.dispatch
    for field in ("batches_per_epoch", "epochs", "repeats"):
      counts(f"dispatch.{field}", d[field])
    counts("dispatch.num_models", d.num_models)
    counts("dispatch.batch_sizes", d.batch_sizes)
    need("dispatch.models", len(d.models) == len(d.input_shapes) == len(d.batch_sizes) > 0,
         "models, input_shapes and batch_sizes differ in length or are empty",
         "give one input shape and batch size per model")
  elif section == "attacks":
    for field in ("num_samples", "iam_shadows", "num_interp", "lira_shadows", "repeats"):
      counts(f"attacks.{field}", config.attacks[field])
  elif section == "search":
    for field in ("seeds", "trials", "train_epochs"):
      counts(f"search.{field}", config.search[field])
  for flag, path in (("--out", out), ("--out_md", out_md)):
    need(flag, not path or not Path(path).is_dir(), f"{path} is a directory",
         "give a file path, e.g. runs/bench.json")
  return found


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  found = problems(config, _OUT.value, _OUT_MD.value)
  if found:
    raise ConfigError(found)
  result = {"environment": environment(), "config": config.to_dict(), "rows": []}

  def write(rows):
    result["rows"] = rows
    if _OUT.value:
      Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
      Path(_OUT.value).write_text(json.dumps(result, indent=1))
    if _OUT_MD.value and config.section in ("training", "dispatch"):
      Path(_OUT_MD.value).parent.mkdir(parents=True, exist_ok=True)
      Path(_OUT_MD.value).write_text(_MARKDOWN[config.section](result))

  print(json.dumps(result["environment"]), flush=True)
  if config.section in ("attacks", "search"):
    rows = {"attacks": measure_attacks, "search": measure_search}[config.section](config)
    for row in rows:
      print(json.dumps(row), flush=True)
  elif config.section == "dispatch":
    rows = measure_dispatch(config, write)
  else:
    rows = training_rows(config, write)
  write(rows)
  if config.section in _MARKDOWN:
    print(_MARKDOWN[config.section](result))
  if _OUT.value:
    print(f"Wrote {_OUT.value}")
  failed = [r for r in rows if "error" in r]
  if failed:  # kept in the table (the other rows stand), and the run fails
    for r in failed:
      print(f"error: row model={r['model']} N={r['num_models']} strategy={r['strategy']} "
            f"dtype={r['dtype']}: {cli.one_line(r['error'])}", file=sys.stderr)
    sys.exit(1)

