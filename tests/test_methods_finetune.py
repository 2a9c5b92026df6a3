"""CF-k and EU-k (deepunlearn-spec 4.12, 4.13): selection, freezing, re-initialisation, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest

from conftest import ARCH_SIZES, arch_model
from jaxmu import data as data_lib
from jaxmu import models, train
from jaxmu import methods as methods_lib
from jaxmu.methods import base, finetune


def _flat(tree):
  return {tuple(k.key for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shapes(name, **kw):
  model = models.get(name, 10, **kw)
  return jax.eval_shape(lambda k: model.init({"params": k}, jnp.zeros((1, 32, 32, 3)),
                                             train=False), jax.random.key(0))["params"]


def test_selection_is_the_last_k_stages_and_the_classifier():
  resnet, vit = _shapes("resnet18"), _shapes("tinyvit_11m", img_size=32)

  def named(params, prefixes):
    return {p for p in _flat(jax.tree.map(lambda s: np.zeros(()), params))
            if p[0].startswith(prefixes)}

  assert finetune.selected_paths(resnet, 1) == named(resnet, ("layer4_", "fc"))
  assert finetune.selected_paths(resnet, 2) == named(resnet, ("layer3_", "layer4_", "fc"))
  assert finetune.selected_paths(resnet, 10) == named(resnet, ("layer", "fc"))
  assert finetune.selected_paths(vit, 1) == named(vit, ("stage3_", "head"))
  assert finetune.selected_paths(vit, 2) == named(vit, ("stage2_", "stage3_", "head"))
  assert finetune.selected_paths(vit, 10) == named(vit, ("stage1_", "stage2_", "stage3_", "head"))
  faithful = finetune.selected_paths(vit, 1, faithful=True)
  assert faithful == {p for p in named(vit, ("stage3_", "head")) if p[-1] != "attention_biases"}


def test_step_decay_factors_are_the_reference_list():
  r = 0.3
  assert finetune.step_decay_factors(10, r) == [1, 1, 1, 1, 1, 1, r, r, r, r * r]
  assert finetune.step_decay_factors(3, r) == [1, 1, r]  # decay points (1, 2, 2)


@pytest.mark.parametrize("name", ["cf_k", "eu_k"])
def test_freezes_everything_but_the_last_blocks_on_the_tiny_stack(tiny_ctx, name):
  out = methods_lib.get(name).run(tiny_ctx, {"num_epochs": 1, "learning_rate": 0.05},
                              jax.random.key(0)).states
  assert jax.tree.structure(out) == jax.tree.structure(tiny_ctx.originals)
  new, old = _flat(out), _flat(tiny_ctx.originals)
  for path, value in new.items():
    assert np.isfinite(value).all()
    if path[0] == "params" and path[1] in ("layer1_0", "fc"):  # small_cnn: its one block + head
      for m in range(2):
        assert not np.array_equal(value[m], old[path][m]), path
    else:  # the stem, and all BatchNorm statistics (eval mode)
      np.testing.assert_array_equal(value, old[path], err_msg=str(path))


def test_per_model_decay_rate_acts_in_the_decayed_epoch_only(tiny_ctx):
  cf_k = methods_lib.get("cf_k")

  def run(epochs, rates):
    hp = {"num_epochs": epochs, "sgda_decay_rate": rates, "learning_rate": 0.05}
    return cf_k.run(tiny_ctx, hp, jax.random.key(2)).states["params"]["fc"]["kernel"]

  a, b = run(3, [0.0, 0.0]), run(3, [0.5, 0.0])  # epoch 2 runs at lr x r
  assert not np.array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(run(2, [0.0, 0.0]), run(2, [0.5, 0.0]))  # E = 2: no decay


@pytest.fixture(scope="module", params=ARCH_SIZES)
def vit_ctx(request):
  """One TinyViT at 32 px whose weights are all perturbed (so resets are visible); 8 retain."""
  ds = data_lib.load("digits", image_size=32, channels=3)
  model = arch_model("tinyvit_11m", ds.num_classes, request.param, img_size=32)
  inits = train.init_variables(model, jax.random.split(jax.random.key(0), 1), ds.inputs.shape[1:])
  rng = np.random.default_rng(0)
  originals = {**inits, "params": jax.tree.map(
      lambda x: x + np.float32(0.05) * rng.standard_normal(x.shape, np.float32), inits["params"])}
  return base.Context.create(model, train.Recipe(batch_size=8, augment="crop_flip"), ds,
                             originals, inits, np.arange(8), np.arange(8, 12), np.arange(12, 16),
                             model_ids=(0,), num_classes=ds.num_classes)


@pytest.mark.slow  # the mini variant too: compiles too long for `make test`
def test_cf_k_on_tinyvit_faithful_freezes_attention_biases(vit_ctx):
  hp = {"num_epochs": 1, "batch_size": 8, "num_blocks": 1, "faithful": True}
  out = methods_lib.get("cf_k").run(vit_ctx, hp, jax.random.key(0)).states
  new, old = _flat(out), _flat(vit_ctx.originals)
  changed = 0
  for path, value in new.items():
    assert np.isfinite(value).all()
    trainable = (path[0] == "params" and path[1].startswith(("stage3_", "head"))
                 and path[-1] != "attention_biases")
    if not trainable:
      np.testing.assert_array_equal(value, old[path], err_msg=str(path))
    elif path[-1] == "kernel":
      assert not np.array_equal(value, old[path]), path
      changed += 1
  assert changed >= 6  # the last stage's qkv, proj, fc1, fc2, local conv and the head


def test_eu_k_reinitialises_exactly_the_last_blocks_and_head_on_tinyvit(vit_ctx):
  """A 0-lr run leaves the re-initialised weights: init statistics, resets, untouched rest."""
  hp = {"num_epochs": 1, "batch_size": 8, "num_blocks": 1, "learning_rate": 0.0}
  out = methods_lib.get("eu_k").run(vit_ctx, hp, jax.random.key(0)).states
  new, old = _flat(out), _flat(vit_ctx.originals)
  bn_modules = {p[1:-1] for p in old if p[0] == "batch_stats"}
  checked = set()
  for path, value in new.items():
    value, before = value[0], old[path][0]
    selected = path[0] == "params" and path[1].startswith(("stage3_", "head"))
    module = path[1:-1]
    if not selected or path[-1] == "attention_biases" or (
        module not in bn_modules and path[-2].startswith("norm")):  # LayerNorms, biases kept
      np.testing.assert_array_equal(value, before, err_msg=str(path))
    elif module in bn_modules:
      want = np.ones_like(value) if path[-1] == "scale" else np.zeros_like(value)
      np.testing.assert_array_equal(value, want)
      checked.add("bn")
    elif path[-1] == "bias":
      np.testing.assert_array_equal(value, 0 * value)
      checked.add("bias")
    else:
      assert path[-1] == "kernel", path
      if value.ndim == 4:  # kaiming_uniform(fan_out, relu): U(+-sqrt(6 / (out kh kw)))
        bound = np.sqrt(6 / (value.shape[0] * value.shape[1] * value.shape[3]))
        checked.add("conv")
      else:  # xavier_uniform: U(+-sqrt(6 / (in + out)))
        bound = np.sqrt(6 / sum(value.shape))
        checked.add("dense")
      assert 0.95 * bound < np.abs(value).max() <= bound * (1 + 1e-6), path
      if value.size > 10_000:
        assert abs(value.std() / (bound / np.sqrt(3)) - 1) < 0.03, path
        assert abs(value.mean()) < 0.02 * bound, path
  assert checked == {"bn", "bias", "conv", "dense"}


SPACE = {  # deepunlearn-spec 4.12: name -> (low, high, log, choices); E_max = 7 here
    "num_epochs": (1, 7, False, None), "batch_size": (None, None, None, (64, 128, 256)),
    "sgda_decay_rate": (0.0, 1.0, False, None), "sgda_learning_rate": (1e-5, 1e-1, True, None),
    "sgda_weight_decay": (1e-5, 1e-1, True, None), "learning_rate": (1e-5, 1e-1, True, None),
    "momentum": (0.9, 0.9, False, None), "num_blocks": (1, 10, False, None),
}


@pytest.mark.parametrize("name,extra", [("cfk", {}), ("euk", {
    "training_epoch_factor": (1, 10, False, None)})])
def test_search_space_defaults_and_aliases_are_the_reference(name, extra):
  method = methods_lib.get(name)
  trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
  method.suggest(trial, e_max=7)
  table = {**SPACE, **extra}
  assert set(trial.distributions) == set(table)
  for hp, (low, high, log, choices) in table.items():
    dist = trial.distributions[hp]
    if choices is not None:
      assert tuple(dist.choices) == choices
    else:
      assert (dist.low, dist.high, dist.log) == (low, high, log), hp
  d = method.defaults
  assert (d["num_epochs"], d["batch_size"], d["num_blocks"], d["learning_rate"],
          d["sgda_learning_rate"], d["sgda_decay_rate"], d["sgda_weight_decay"], d["momentum"]) == (
              10, 256, 1, 0.01, 5e-4, 0.1, 0.1, 0.9)
  assert d.get("training_epoch_factor", 10) == 10 and d["faithful"] is False
