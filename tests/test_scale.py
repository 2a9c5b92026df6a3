"""Scale-out groundwork: mixed precision, the compilation cache, 4 fake devices (model axis and a
("models", "data") mesh), and two jax.distributed processes on localhost."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmu import data as data_lib
from jaxmu import distributed, models, parallel, train

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAXMU_CACHE="")


def _recipe(dtype):
  return train.Recipe(batch_size=64, augment="none", mean=(0.3054,), std=(0.3760,), dtype=dtype)


@pytest.fixture(scope="module")
def digits():
  return train.DeviceData.create(data_lib.load("digits"))


def _relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_bf16_forward_is_within_2e2_of_fp32(digits):
  model = models.get("small_cnn", 10, width=8)
  variables = train.init_variables(model, jax.random.split(jax.random.key(0), 2), (8, 8, 1))
  batch = jnp.arange(256)
  out = {dt: train._compiled_logits(model, _recipe(dt), parallel.Strategy("vmap"))(variables, digits.inputs, batch)
         for dt in ("float32", "bfloat16")}
  assert out["bfloat16"].dtype == jnp.float32
  error = _relative_error(out["bfloat16"], out["float32"])
  assert 0 < error < 2e-2  # > 0: the forward pass really ran in bf16


def test_bf16_training_keeps_fp32_state_and_accuracy(digits):
  """Five epochs on digits: master params, momentum and BatchNorm statistics stay float32, and
  test accuracy is within one point of the float32 run."""
  model = models.get("small_cnn", 10, width=8)
  variables = train.init_variables(model, jax.random.split(jax.random.key(0), 1), (8, 8, 1))
  accuracy = {}
  for dt in ("float32", "bfloat16"):
    state = train.create_state(variables, _recipe(dt), learning_rate=0.1)
    out = train.fit(model, state, digits, [np.arange(1437)], _recipe(dt), 5, jax.random.key(1),
                    strategy="vmap", progress=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(out.state.params)} == {jnp.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(out.state.batch_stats)} == {jnp.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(out.state.opt_state)} == {jnp.dtype("float32")}
    accuracy[dt] = train.evaluate(model, out.state.variables, digits, np.arange(1437, 1797),
                                  _recipe(dt), strategy="vmap")["accuracy"][0]
  assert accuracy["float32"] > 0.85
  assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 0.01


def test_bad_dtype_and_strategy_names_fail_clearly():
  with pytest.raises(ValueError, match="dtype"):
    train.Recipe(dtype="float16")
  with pytest.raises(ValueError, match="sharded:data=D"):
    parallel.Strategy.create("sharded:data=0")
  assert parallel.Strategy("sharded:data=4").data_axis == 4
  assert parallel.Strategy("sharded").data_axis == 1


def test_process_models_partitions_a_stack():
  assert distributed.process_models(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
  assert distributed.process_models(2, 2) == [range(0, 1), range(1, 2)]
  shares = distributed.process_models(64, 5)
  assert [m for s in shares for m in s] == list(range(64))


_CACHE_RUN = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from jaxmu import cli
    cli.parse_flags(["prog", "--compilation_cache=" + sys.argv[1]])
    assert jax.config.jax_compilation_cache_dir == sys.argv[1]
    # This program compiles faster than cli's 0.1 s threshold on an idle machine: cache it anyway.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: name == "/jax/compilation_cache/cache_hits" and hits.append(name))
    f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + jnp.tanh(x).sum())
    f(jnp.ones((64, 64))).block_until_ready()
    print("HITS", len(hits))
""")


def test_compilation_cache_flag_serves_a_second_run(tmp_path):
  cache = tmp_path / "cache"
  def run():
    return subprocess.run([sys.executable, "-c", _CACHE_RUN, str(cache)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)

  hits = lambda out: int(out.stdout.split("HITS")[-1]) if "HITS" in out.stdout else -1  # noqa: E731
  first = run()
  assert hits(first) == 0, first.stderr[-2000:]
  assert any(cache.iterdir())
  second = run()
  assert hits(second) >= 1, second.stderr[-2000:]  # the jitted function and its inputs' programs


_FOUR_DEVICES = textwrap.dedent("""
    import jax, numpy as np, jax.numpy as jnp
    assert jax.local_device_count() == 4, jax.devices()
    import tests.test_train as t
    from jaxmu import engine, parallel, train
    x, y = t._data()
    sets = t.SETS * 3  # N = 6 models on 4 devices: padded to 8
    model, state = t._setup(num_models=6, lrs=(0.1, 0.05, 0.02, 0.03, 0.04, 0.06))
    loop = t._fit(model, state, x, y, sets, epochs=1, strategy="loop")
    sharded = t._fit(model, state, x, y, sets, epochs=1, strategy="sharded")
    t._assert_trees_equal(sharded.state, loop.state, atol=1e-5)
    # One ("models", "data") mesh of 2 x 2: each model's batch is split over 2 devices.
    data = t._fit(model, state, x, y, sets, epochs=1, strategy="sharded:data=2")
    t._assert_trees_equal(data.state, loop.state, atol=1e-5)
    strat = parallel.Strategy("sharded:data=2")
    assert dict(strat._mesh.shape) == {"models": 2, "data": 2}
    step = engine._compiled_step(train.train_step, (model, t.RECIPE), strat)
    orders = {"train": jnp.tile(jnp.arange(128, dtype=jnp.int32), (6, 1))}
    hlo = step.lower(strat.enter(state), strat.enter_args(orders),
                     strat.enter_args(jax.random.split(jax.random.key(0), 6)),
                     strat.enter_args({"t_max": jnp.ones((6,), jnp.float32)}),
                     jnp.asarray(x), jnp.asarray(y), jnp.int32(0), jnp.int32(0),
                     jnp.float32(1)).compile().as_text()
    assert "all-reduce" in hlo  # gradients and BatchNorm statistics summed over the data axis
    try:
      parallel.Strategy("sharded:data=3").enter(state)
      raise SystemExit("no error for 3 devices per model on 4 devices")
    except ValueError as e:
      assert "groups of 3" in str(e)
    print("FOUR_DEVICES_OK")
""")


@pytest.mark.e2e
def test_four_fake_devices_shard_six_models_and_split_batches():
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert "FOUR_DEVICES_OK" in out.stdout, out.stderr[-3000:]


_PROCESS = textwrap.dedent("""
    import sys, jax, numpy as np, jax.numpy as jnp
    from jaxmu import cli, distributed, train
    cli.initialize_distributed("localhost:" + sys.argv[1], 2, int(sys.argv[2]))
    import tests.test_scale as t
    model, state, data, sets = t._distributed_setup()
    out = distributed.fit(model, state, data, sets, t.MLP_RECIPE, 2, jax.random.key(1),
                          val_sets=np.arange(40, 64), strategy="loop", progress=False)
    assert jax.process_count() == 2 and jax.local_device_count() == 1
    np.savez(sys.argv[3], *jax.tree.leaves((out.state, out.best, out.best_accuracy)),
             acc=np.stack([h["accuracy"] for h in out.history]))
""")
MLP_RECIPE = train.Recipe(batch_size=8, augment="none")


def _distributed_setup():
  """3 purchase MLPs (8 features) on 64 random rows, unequal index sets."""
  model = models.get("purchase_mlp", 4, num_features=8)
  variables = train.init_variables(model, jax.random.split(jax.random.key(0), 3), (8,))
  state = train.create_state(variables, MLP_RECIPE, learning_rate=[0.1, 0.05, 0.2])
  rng = np.random.default_rng(0)
  data = train.DeviceData(jnp.asarray(rng.integers(0, 2, (64, 8), dtype=np.uint8)),
                          jnp.asarray(rng.integers(0, 4, 64).astype(np.int32)))
  return model, state, data, [np.arange(30), np.arange(10, 40), np.arange(20)]


@pytest.mark.e2e
def test_two_processes_train_their_shares_and_equal_one_process(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(port), str(p),
                             str(tmp_path / f"p{p}.npz")], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in range(2)]
  model, state, data, sets = _distributed_setup()
  alone = train.fit(model, state, data, sets, MLP_RECIPE, 2, jax.random.key(1),
                    val_sets=np.arange(40, 64), strategy="loop", progress=False)
  expected = [np.asarray(leaf)
              for leaf in jax.tree.leaves((alone.state, alone.best, alone.best_accuracy))]
  expected.append(np.stack([h["accuracy"] for h in alone.history]))
  for p, proc in enumerate(procs):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    got = np.load(tmp_path / f"p{p}.npz")
    assert len(got.files) == len(expected)
    for name, want in zip([f"arr_{i}" for i in range(len(expected) - 1)] + ["acc"], expected):
      np.testing.assert_array_equal(got[name], want, err_msg=name)
