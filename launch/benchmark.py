"""Measures training throughput of stacks of models, per strategy, or (``configs/bench.py:attacks``)
the time of attack scoring; prints and writes JSON.

    python launch/benchmark.py --config=configs/bench.py --out=runs/bench.json

Imports neither optuna nor tensorflow-datasets, so it runs with only jax/flax/optax installed
(e.g. on a lent GPU machine with PYTHONPATH=.).
"""

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results (optional).")
flags.mark_flag_as_required("config")


def measure(model_name, num_models, strategy, config) -> dict:
  """Steady-state model-steps per second of one stack (compilation timed apart)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxmu import models, parallel, train

  model = models.get(model_name, config.num_classes)
  shape = tuple(config.input_shape)
  recipe = train.Recipe(batch_size=config.batch_size, augment="none",
                        mean=(0.5,), std=(0.25,))
  rng = np.random.default_rng(0)
  num_samples = config.batch_size * 8
  data = train.DeviceData(
      jnp.asarray(rng.integers(0, 256, (num_samples, *shape), dtype=np.uint8)),
      jnp.asarray(rng.integers(0, config.num_classes, num_samples).astype(np.int32)))
  keys = jax.random.split(jax.random.key(0), num_models)
  state = train.create_state(train.init_variables(model, keys, shape), recipe)
  strat = parallel.Strategy(strategy)
  step = train._compiled_step(model, recipe, strategy)
  orders = strat.enter_args(jnp.tile(jnp.arange(num_samples, dtype=jnp.int32), (num_models, 1)))
  step_keys = strat.enter_args(keys)
  internal = strat.enter(state)

  def run(internal, count, offset):
    for s in range(count):
      internal, metrics = step(internal, orders, step_keys, data.inputs, data.labels,
                               jnp.int32((offset + s) % 8), jnp.float32(0), jnp.float32(1))
    jax.block_until_ready((internal, metrics))
    return internal

  start = time.perf_counter()
  internal = run(internal, 1, 0)
  first = time.perf_counter() - start
  internal = run(internal, config.warmup_steps, 1)
  start = time.perf_counter()
  run(internal, config.steps, 0)
  seconds = time.perf_counter() - start
  model_steps = num_models * config.steps / seconds
  return {"model": model_name, "num_models": num_models, "strategy": strategy,
          "batch_size": config.batch_size, "input_shape": list(shape),
          "first_step_seconds": round(first, 3), "model_steps_per_s": round(model_steps, 2),
          "images_per_s": round(model_steps * config.batch_size, 1)}


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
  return rows


def main(argv):
  del argv
  import jax
  config = _CONFIG.value
  rows = []
  if config.section == "attacks":
    rows = measure_attacks(config)
    for row in rows:
      print(json.dumps(row), flush=True)
  for model_name in config.models if config.section == "training" else ():
    for n in config.num_models:
      for strategy in config.strategies:
        row = measure(model_name, n, strategy, config)
        rows.append(row)
        print(json.dumps(row), flush=True)
  result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "config": config.to_dict(), "rows": rows}
  if _OUT.value:
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(result, indent=1))
    print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
