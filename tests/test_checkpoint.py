"""Tests of jaxmu.checkpoint: bit-identical round trips, clear mismatch errors, periodic ckpts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import struct

from jaxmu import checkpoint, stages


@struct.dataclass
class State:
  params: dict
  opt_state: optax.OptState
  step: jax.Array
  key: jax.Array


def _stacked_state(n=3, width=5, steps=2):
  """A stack of n tiny MLPs trained a few SGD-momentum steps (non-zero momentum)."""
  model = nn.Sequential([nn.Dense(width), nn.relu, nn.Dense(2)])
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jnp.arange(8) % 2
  params = jax.vmap(lambda k: model.init(k, x))(jax.random.split(jax.random.key(0), n))
  opt_state = jax.vmap(tx.init)(params)

  def step(p, o):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, x), y).mean()
    updates, o = tx.update(jax.grad(loss)(p), o, p)
    return optax.apply_updates(p, updates), o

  for _ in range(steps):
    params, opt_state = jax.vmap(step)(params, opt_state)
  return State(params, opt_state, jnp.full((n,), steps, jnp.int32),
               jax.random.split(jax.random.key(7), n))


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_bit_identical_with_optax_state_and_keys(tmp_path):
  state = _stacked_state()
  momentum = jax.tree.leaves(state.opt_state)
  assert any(np.abs(np.asarray(m)).max() > 0 for m in momentum)
  tree = {"state": state, "raw_keys": jax.random.split(jax.random.PRNGKey(3), 3)}
  checkpoint.save(tmp_path / "ck", tree, {"epochs": 2, "note": "x"})
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  restored = checkpoint.restore(tmp_path / "ck", like)
  _assert_identical(tree, restored)
  assert isinstance(restored["state"], State)
  assert isinstance(restored["state"].params, type(state.params))
  assert restored["raw_keys"].dtype == jnp.uint32
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
  # Restored typed keys are usable keys drawing the same numbers.
  np.testing.assert_array_equal(jax.random.uniform(restored["state"].key[1]),
                                jax.random.uniform(state.key[1]))
  assert checkpoint.read_metadata(tmp_path / "ck") == {"epochs": 2, "note": "x"}


def test_overwrite_replaces_checkpoint(tmp_path):
  a = {"w": jnp.zeros((2, 3))}
  b = {"w": jnp.ones((2, 3))}
  checkpoint.save(tmp_path / "ck", a, {"v": 1})
  checkpoint.save(tmp_path / "ck", b, {"v": 2})
  _assert_identical(checkpoint.restore(tmp_path / "ck", a), b)
  assert checkpoint.read_metadata(tmp_path / "ck") == {"v": 2}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dirs left


def test_restore_other_architecture_fails_clearly(tmp_path):
  checkpoint.save(tmp_path / "ck", _stacked_state(width=5))
  with pytest.raises(ValueError, match="another model/state") as err:
    checkpoint.restore(tmp_path / "ck", _stacked_state(width=6))
  msg = str(err.value)
  assert "params/params/layers_0/kernel: checkpoint (3, 4, 5), expected (3, 4, 6)" in msg
  # A different leaf set (other structure) fails the same way, naming the absent leaf.
  with pytest.raises(ValueError, match="extra: checkpoint absent"):
    checkpoint.restore(tmp_path / "ck", {**_stacked_state().__dict__, "extra": jnp.zeros(1)})


def test_missing_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(tmp_path / "nothing", {"w": jnp.zeros(1)})


def test_training_checkpoints_latest_prune_restore(tmp_path):
  ckpts = checkpoint.TrainingCheckpoints(tmp_path / "train", keep=2)
  assert ckpts.latest() is None
  for epoch in range(4):
    ckpts.save(epoch, {"w": jnp.full((2,), float(epoch))}, {"epoch": epoch})
  assert ckpts.epochs() == [2, 3] and ckpts.latest() == 3
  like = {"w": jnp.zeros((2,))}
  np.testing.assert_array_equal(ckpts.restore(2, like)["w"], [2.0, 2.0])
  assert ckpts.metadata(3) == {"epoch": 3}


def test_training_checkpoints_ignore_crashed_save(tmp_path):
  """A save that dies after the state is written (its metadata cannot be encoded) leaves only
  orbax's temp directory: never listed, and replaced by the next save of a resumed run."""
  ckpts = checkpoint.TrainingCheckpoints(tmp_path / "train", keep=2)
  ckpts.save(0, {"w": jnp.zeros((2,))})
  with pytest.raises(TypeError, match="JSON serializable"):
    ckpts.save(1, {"w": jnp.ones((2,))}, {"not json": object()})
  assert ckpts.latest() == 0
  assert any(p.name.startswith("00000001.") for p in ckpts.dir.iterdir())  # the temp directory
  resumed = checkpoint.TrainingCheckpoints(tmp_path / "train", keep=2)
  assert resumed.latest() == 0
  resumed.save(1, {"w": jnp.ones((2,))}, {"epoch": 1})
  assert resumed.latest() == 1 and resumed.metadata(1) == {"epoch": 1}
  assert sorted(p.name for p in ckpts.dir.iterdir()) == ["00000000", "00000001"]


def test_training_checkpoints_keep_typed_keys_and_refuse_another_model(tmp_path):
  ckpts = checkpoint.TrainingCheckpoints(tmp_path / "train")
  tree = {"key": jax.random.split(jax.random.key(3), 2), "w": jnp.arange(4.0)}
  ckpts.save(0, tree)
  restored = ckpts.restore(0, tree)
  assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(tree["key"]))
  with pytest.raises(ValueError, match="written for another model/state"):
    ckpts.restore(0, {"key": tree["key"], "w": jnp.zeros(5)})


def test_training_checkpoints_of_process_1_of_2_are_its_own(tmp_path, monkeypatch):
  """Under jax.distributed process 1 writes and restores its training checkpoints alone (process
  index mocked): the arrays too, bf16 and typed keys bit for bit."""
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  ckpts = checkpoint.TrainingCheckpoints(tmp_path / "train", keep=1)
  tree = {"key": jax.random.split(jax.random.key(3), 2), "step": jnp.int32(4),
          "w": jnp.arange(4.0, dtype=jnp.bfloat16), "state": _stacked_state()}
  for epoch in (1, 2):
    ckpts.save(epoch, tree, {"epoch": epoch})
  assert ckpts.epochs() == [2] and ckpts.metadata(2) == {"epoch": 2}
  restored = ckpts.restore(2, tree)
  _assert_identical(restored, tree)
  assert restored["w"].dtype == jnp.bfloat16 and isinstance(restored["w"], jax.Array)


def test_checkpoint_as_stage_output(tmp_path):
  wd, tree = stages.Workdir(tmp_path), {"w": jnp.arange(6.0).reshape(2, 3)}
  for _ in range(2):
    with wd.stage("train", config={"n": 1}, outputs=("models/original",)) as st:
      if not st.done:
        checkpoint.save(st.tmp / "models/original", tree, {"n": 1})
        st.commit()
  assert st.reason is None
  _assert_identical(checkpoint.restore(wd.path("models/original"), tree), tree)
