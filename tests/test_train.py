"""The training core: per-model data, strategies, determinism, resume, compilation reuse."""

import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmu import checkpoint, engine, models, parallel, timing, train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = train.Recipe(batch_size=32, augment="flip", mean=(0.5,), std=(0.25,))


def _data(seed=0, n=300):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  y = rng.integers(0, 10, n).astype(np.int32)
  return x, y


def _setup(num_models=2, lrs=(0.1, 0.05), width=8):
  model = models.get("small_cnn", 10, width=width)
  variables = train.init_variables(model, jax.random.split(jax.random.key(0), num_models), (8, 8, 1))
  state = train.create_state(variables, RECIPE, learning_rate=list(lrs[:num_models]))
  return model, state


def _fit(model, state, x, y, sets, epochs=2, **kw):
  data = train.DeviceData(jnp.asarray(x), jnp.asarray(y))
  return train.fit(model, state, data, sets, RECIPE, epochs, jax.random.key(1), progress=False,
                   **kw)


def _leaves(tree):
  return [np.asarray(l) for l in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b, atol=0.0):
  for u, v in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_allclose(u, v, atol=atol, rtol=0)


SETS = [np.arange(100), np.arange(100, 137)]


def test_stack_with_unequal_index_sets_equals_each_model_alone():
  model, state = _setup()
  x, y = _data()
  stacked = _fit(model, state, x, y, SETS, strategy="loop")
  for m in range(2):
    alone = _fit(model, jax.tree.map(lambda a, m=m: a[m:m + 1], state), x, y, SETS[m:m + 1],
                 model_ids=[m], strategy="loop")
    _assert_trees_equal(jax.tree.map(lambda a, m=m: a[m:m + 1], stacked.state), alone.state)
  # ceil(100/32) = 4 and ceil(37/32) = 2 real steps per epoch; padded steps count nothing.
  np.testing.assert_array_equal(stacked.state.step, [8, 4])


def test_step_cap_stops_every_epoch_after_its_first_steps():
  """The smoke runs' cap: one step per epoch of each model; a cap above the epoch's steps changes
  nothing; the cap ends with its block."""
  model, state = _setup()
  x, y = _data()
  with engine.step_cap(1):
    capped = _fit(model, state, x, y, SETS, epochs=3, strategy="loop")
  np.testing.assert_array_equal(capped.state.step, [3, 3])
  with engine.step_cap(4):
    loose = _fit(model, state, x, y, SETS, strategy="loop")
  _assert_trees_equal(loose.state, _fit(model, state, x, y, SETS, strategy="loop").state)
  with pytest.raises(ValueError, match="max_steps must be >= 1"):
    with engine.step_cap(0):
      pass


def test_vmap_and_loop_agree():
  model, state = _setup()
  x, y = _data()
  a = _fit(model, state, x, y, SETS, strategy="vmap")
  b = _fit(model, state, x, y, SETS, strategy="loop")
  _assert_trees_equal(a.state.params, b.state.params, atol=1e-5)
  _assert_trees_equal(a.state.batch_stats, b.state.batch_stats, atol=1e-5)


@pytest.mark.parametrize("kind", ["loop", "vmap"])
def test_scanned_epochs_equal_dispatched_steps(kind):
  """An epoch as one compiled program (fori_loop over the steps) gives the per-step numbers,
  metrics included."""
  model, state = _setup()
  x, y = _data()
  steps = _fit(model, state, x, y, SETS, strategy=parallel.Strategy(kind, scan=False))
  scanned = _fit(model, state, x, y, SETS, strategy=parallel.Strategy(kind, scan=True))
  _assert_trees_equal(scanned.state, steps.state, atol=1e-6)
  for a, b in zip(scanned.history, steps.history, strict=True):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_array_equal(a["accuracy"], b["accuracy"])


def test_auto_epoch_mode_scans_mlps_but_not_conv_nets_on_cpu():
  auto = parallel.Strategy.create("loop")
  assert auto.scan is None and jax.default_backend() == "cpu"
  _, cnn = _setup()
  mlp = train.init_variables(models.get("purchase_mlp", 10), jax.random.split(jax.random.key(0), 2),
                             (600,))
  assert not auto.scans(cnn) and auto.scans(mlp)
  assert parallel.Strategy.create("loop", "scan").scans(cnn)
  assert not parallel.Strategy.create("loop", "steps").scans(mlp)


def test_samples_outside_a_models_index_set_do_not_touch_it():
  model, state = _setup()
  x, y = _data()
  x2, y2 = x.copy(), y.copy()
  x2[100:] = 255 - x2[100:]  # only model 1's samples (and unused ones) change
  y2[100:] = (y2[100:] + 1) % 10
  a = _fit(model, state, x, y, SETS, strategy="vmap")
  b = _fit(model, state, x2, y2, SETS, strategy="vmap")
  _assert_trees_equal(jax.tree.map(lambda t: t[0], a.state), jax.tree.map(lambda t: t[0], b.state))
  assert not np.array_equal(a.state.params["fc"]["kernel"][1], b.state.params["fc"]["kernel"][1])


def test_same_seed_same_numbers_and_caller_state_survives():
  model, state = _setup()
  x, y = _data()
  a = _fit(model, state, x, y, SETS)
  b = _fit(model, state, x, y, SETS)  # `state` was not consumed by donation
  _assert_trees_equal(a.state, b.state)
  c = train.fit(model, state, train.DeviceData(jnp.asarray(x), jnp.asarray(y)), SETS, RECIPE, 2,
                jax.random.key(2), progress=False)
  assert not np.array_equal(a.state.params["fc"]["kernel"], c.state.params["fc"]["kernel"])


def test_one_sgd_step_matches_numpy_reference():
  """Coupled weight decay + momentum + per-epoch cosine, against PyTorch's SGD written in numpy."""
  model = models.get("purchase_mlp", 3, num_features=4)
  variables = train.init_variables(model, jax.random.split(jax.random.key(3), 1), (4,))
  recipe = train.Recipe(batch_size=8, augment="none", mean=(0.0,), std=(1.0,))
  lr, wd, mu, epochs = 0.3, 0.01, 0.9, 4
  state = train.create_state(variables, recipe, learning_rate=lr, weight_decay=wd, momentum=mu)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2, (8, 4), dtype=np.uint8)
  y = rng.integers(0, 3, 8).astype(np.int32)
  data = train.DeviceData(jnp.asarray(x), jnp.asarray(y))
  out = train.fit(model, state, data, [np.arange(8)], recipe, epochs, jax.random.key(0),
                  progress=False)

  def loss(params):  # full batch every epoch: the order does not matter
    logits = model.apply({"params": params}, jnp.asarray(x, jnp.float32), train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  params = jax.tree.map(lambda a: np.asarray(a[0], np.float64), variables["params"])
  buf = jax.tree.map(np.zeros_like, params)
  for e in range(epochs):
    g = jax.grad(loss)(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
    step_lr = lr * (1 + np.cos(np.pi * e / epochs)) / 2
    d = jax.tree.map(lambda gi, p: np.asarray(gi, np.float64) + wd * p, g, params)
    buf = jax.tree.map(lambda b, di: mu * b + di, buf, d)
    params = jax.tree.map(lambda p, b: p - step_lr * b, params, buf)
  _assert_trees_equal(jax.tree.map(lambda a: a[0], out.state.params), params, atol=2e-6)


def test_hyperparameters_are_per_model_and_compile_once():
  model, state = _setup()
  x, y = _data()
  a = _fit(model, state, x, y, SETS, strategy="vmap")
  compiles = []
  listener = lambda name, *_, **__: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    other = train.create_state(jax.tree.map(lambda t: t, state.variables), RECIPE,
                               learning_rate=[0.01, 0.2], weight_decay=[0.0, 1e-3])
    b = _fit(model, other, x, y, SETS, strategy="vmap")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  assert not np.array_equal(a.state.params["fc"]["kernel"], b.state.params["fc"]["kernel"])


def test_best_state_on_validation_is_kept_per_model():
  model, state = _setup()
  x, y = _data()
  val = np.arange(200, 300)
  out = _fit(model, state, x, y, SETS, epochs=3, val_sets=val)
  val_hist = np.stack([h["val_accuracy"] for h in out.history])
  np.testing.assert_allclose(out.best_accuracy, val_hist.max(0))
  data = train.DeviceData(jnp.asarray(x), jnp.asarray(y))
  again = train.evaluate(model, out.best, data, val, RECIPE)["accuracy"]
  np.testing.assert_allclose(again, out.best_accuracy)


def test_evaluate_matches_numpy_on_per_model_sets():
  model, state = _setup()
  x, y = _data()
  data = train.DeviceData(jnp.asarray(x), jnp.asarray(y))
  sets = [np.arange(0, 50), np.arange(20, 90)]
  ev = train.evaluate(model, state.variables, data, sets, RECIPE, batch_size=16)
  for m, s in enumerate(sets):
    v = jax.tree.map(lambda a, m=m: a[m], state.variables)
    xs = (x[s].astype(np.float32) / 255 - 0.5) / 0.25
    logits = np.asarray(model.apply(v, jnp.asarray(xs), train=False), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    assert ev["accuracy"][m] == pytest.approx((logits.argmax(1) == y[s]).mean())
    assert ev["loss"][m] == pytest.approx(-logp[np.arange(len(s)), y[s]].mean(), rel=1e-4)


def test_chunked_stack_equals_whole_stack(monkeypatch):
  _tick(monkeypatch)
  model, state = _setup(num_models=3, lrs=(0.1, 0.05, 0.02))
  x, y = _data()
  sets = SETS + [np.arange(150, 250)]
  whole = _fit(model, state, x, y, sets, strategy="vmap")
  chunked = _fit(model, state, x, y, sets, strategy="vmap", max_models_per_program=2)
  _assert_trees_equal(whole.state, chunked.state, atol=1e-6)
  assert whole.seconds + whole.compile_seconds == pytest.approx(2 * 100)  # 2 epochs
  # the chunks train one after the other
  assert chunked.seconds + chunked.compile_seconds == pytest.approx(2 * 2 * 100)


def _tick(monkeypatch):
  """`jaxmu.timing`'s clock made to advance 100 s at every reading: each timed epoch lasts 100 s."""
  ticks = iter(range(0, 10**9, 100))
  monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))


def test_compile_clock_takes_compilation_out_of_the_wall_time(monkeypatch):
  _tick(monkeypatch)
  with timing.CompileClock() as clock:
    jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 30.0)
    jax.monitoring.record_event_duration_secs("/jax/core/compile/jaxpr_trace_duration", 5.0)
    jax.monitoring.record_event_duration_secs("/jax/some/other/event", 7.0)
  assert (clock.seconds, clock.work_seconds) == (35.0, 65.0)


def test_fit_time_excludes_compilation_and_sums_over_a_resume(tmp_path, monkeypatch):
  """RTE's retraining time (deepunlearn-spec 6.5) as the unlearning time: each epoch's wall time
  less JAX's compilation in it, and a resumed fit adds the time stored with its checkpoint."""
  _tick(monkeypatch)
  model, state = _setup(width=6)  # a program no other test compiles
  x, y = _data()
  fit = lambda **kw: _fit(model, state, x, y, SETS, epochs=3, **kw)  # noqa: E731

  def stop_at_2(epoch, record):
    if epoch == 2:
      raise KeyboardInterrupt  # after epoch 1's checkpoint, before epoch 2's

  with pytest.raises(KeyboardInterrupt):
    fit(checkpoints=checkpoint.TrainingCheckpoints(tmp_path / "c"), on_epoch=stop_at_2)
  ckpts = checkpoint.TrainingCheckpoints(tmp_path / "c")
  first = ckpts.metadata(ckpts.latest())
  assert ckpts.latest() == 1 and first["compile_seconds"] > 0  # compiled in epoch 1, not counted
  assert first["seconds"] + first["compile_seconds"] == pytest.approx(100)
  monkeypatch.setattr(timing.CompileClock, "EVENTS", ())  # from here on: no compilation seen
  resumed = fit(checkpoints=ckpts, checkpoint_every=3)
  assert resumed.seconds == pytest.approx(first["seconds"] + 2 * 100)  # epoch 1 + epochs 2, 3
  assert resumed.compile_seconds == first["compile_seconds"]
  assert ckpts.metadata(3)["seconds"] == resumed.seconds
  # A checkpoint written before times were stored resumes with an unknown (NaN) total.
  old = checkpoint.TrainingCheckpoints(tmp_path / "old")
  tree = {"state": state, "best": None, "best_acc": None}
  old.save(1, ckpts.restore(1, tree), metadata={"history": first["history"]})
  assert np.isnan(fit(checkpoints=old).seconds)


def test_bad_inputs_fail_clearly():
  with pytest.raises(ValueError, match="optimizer"):
    train.Recipe(optimizer="sgdd")
  model, state = _setup()
  with pytest.raises(ValueError, match="index sets for a stack of 2"):
    _fit(model, state, *_data(), SETS[:1])
  with pytest.raises(ValueError, match="unknown hyper-parameters"):
    train.create_state(state.variables, RECIPE, lr=0.1)


_RESUME = textwrap.dedent("""
    import os, signal, sys
    import jax, numpy as np
    from jaxmu import checkpoint, train
    import tests.test_train as t
    model, state = t._setup()
    x, y = t._data()
    ckpt = checkpoint.TrainingCheckpoints(sys.argv[1])
    def on_epoch(epoch, record):
      if epoch == 2 and sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    out = t._fit(model, state, x, y, t.SETS, epochs=4, checkpoints=ckpt, on_epoch=on_epoch,
                 val_sets=np.arange(200, 300))
    np.savez(sys.argv[3], *[np.asarray(l) for l in jax.tree.leaves((out.state, out.best))],
             acc=np.stack([h["accuracy"] for h in out.history]))
""")


@pytest.mark.e2e
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  # The three runs share a persistent compilation cache: the later two skip compiling.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def run(ckpt, mode, out):
    return subprocess.run([sys.executable, "-c", _RESUME, str(ckpt), mode, str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)

  killed = run(tmp_path / "a", "kill", tmp_path / "a.npz")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert checkpoint.TrainingCheckpoints(tmp_path / "a").latest() == 1  # epoch 2 was not saved
  resumed = run(tmp_path / "a", "go", tmp_path / "a.npz")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  straight = run(tmp_path / "b", "go", tmp_path / "b.npz")
  assert straight.returncode == 0, straight.stderr[-2000:]
  a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
  assert a.files == b.files
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_masked_batchnorm_equals_the_smaller_real_batch():
  """A partial batch padded to full size behaves exactly as the unpadded batch."""
  model = models.get("small_cnn", 10, width=8)
  variables = train.init_variables(model, jax.random.split(jax.random.key(0), 1), (8, 8, 1))
  variables = jax.tree.map(lambda a: a[0], variables)
  x = jax.random.normal(jax.random.key(1), (12, 8, 8, 1))
  real = 7
  valid = jnp.arange(12) < real
  padded_x = jnp.where(valid[:, None, None, None], x, 100.0)  # garbage in the padding
  out_pad, upd_pad = model.apply(variables, padded_x, train=True, mask=valid,
                                 mutable=["batch_stats"])
  out_real, upd_real = model.apply(variables, x[:real], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out_pad[:real], out_real, atol=1e-5)
  _assert_trees_equal(upd_pad, upd_real, atol=1e-6)
