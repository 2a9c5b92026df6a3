"""FF (fisher) and IU (influence) against independent computations (deepunlearn-spec 4.10, 4.11)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest
from jax.flatten_util import ravel_pytree

from conftest import ARCH_SIZES, arch_model
from jaxmu import data as data_lib
from jaxmu import models, train
from jaxmu import methods as methods_lib
from jaxmu.methods import base, second_order

C = 3


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _model(tree, m):
  return jax.tree.map(lambda x: x[m], tree)


@pytest.fixture(scope="module")
def mlp_ctx():
  """Two Purchase MLPs (4 binary features, 3 classes) on 60 synthetic rows; per-model sets."""
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 2, (60, 4)).astype(np.uint8)
  labels = rng.integers(0, C, 60).astype(np.int32)
  model = models.get("purchase_mlp", C, num_features=4)
  inits = train.init_variables(model, jax.random.split(jax.random.key(0), 2), (4,))
  recipe = train.Recipe(batch_size=8, augment="none", mean=(0.0,), std=(1.0,))
  return base.Context.create(
      model, recipe, train.DeviceData(jnp.asarray(inputs), jnp.asarray(labels)), inits, inits,
      [np.arange(0, 20), np.arange(25, 42)[::-1]], [np.arange(44, 50), np.arange(48, 58)],
      [np.arange(50, 60)] * 2, model_ids=(0, 1), num_classes=C, strategy="loop")


def _rows(ctx, idx):
  return (np.asarray(ctx.data.inputs, np.float32)[idx], np.asarray(ctx.data.labels)[idx])


def _own(index_set):
  return index_set[index_set >= 0]


# ----------------------------------------------------------------------------------------- FF


def _numpy_fisher(ctx, params, idx, batch_size):
  """Reference step 2 written out: per batch and class a separate backward pass of the mean CE."""
  logp = jax.jit(lambda p, x: jax.nn.log_softmax(ctx.model.apply({"params": p}, x)))
  grad = jax.jit(jax.grad(lambda p, x, y: -jnp.mean(logp(p, x)[:, y])), static_argnums=2)
  total, batches = None, 0
  for s in range(0, len(idx), batch_size):
    x, _ = _rows(ctx, idx[s:s + batch_size])
    probs = np.exp(np.asarray(logp(params, x), np.float64))
    for y in range(C):
      g = _flat(grad(params, x, y))
      term = probs[:, y].mean() * g ** 2
      total = term if total is None else total + term
    batches += 1
  return total / batches


def _torch_layout_variance(fisher, alpha):
  """deepunlearn-spec 4.10 step 3 literally, on PyTorch layouts (kernels transposed to
  [out, in] / [out, in, kh, kw] and back)."""
  def one(path, f):
    f = np.asarray(f, np.float64)
    kernel = path[-1].key == "kernel"
    perm = {2: (1, 0), 4: (3, 2, 0, 1)}[f.ndim] if kernel else tuple(range(f.ndim))
    t = np.transpose(f, perm)
    var = np.minimum(1.0 / (t + 1e-8), 1e3)
    if t.shape[0] == C:
      var = np.minimum(var, 1e2)
    var = alpha * var
    if t.ndim > 1:
      var = np.broadcast_to(var.mean(axis=1, keepdims=True), t.shape)
    if t.shape[0] == C or t.ndim == 1:
      var = var * 10
    return np.transpose(var, np.argsort(perm))
  return jax.tree_util.tree_map_with_path(one, fisher)


def test_fisher_matches_per_class_backward_passes_and_the_noise_follows_the_variance(mlp_ctx):
  ctx = mlp_ctx
  # The Fisher of a prefix, classes in chunks of 2 (a scan with a padding class) vs per class.
  fisher = second_order.fisher_diagonal(ctx, ctx.originals, 8, num_samples=13, class_chunk=2)
  for m in range(2):
    expected = _numpy_fisher(ctx, _model(ctx.originals["params"], m), _own(ctx.retain[m])[:13], 8)
    np.testing.assert_allclose(_flat(_model(fisher, m)), expected, rtol=2e-4,
                               atol=1e-6 * expected.max())
  # The whole method: noise / sqrt(numpy variance of the numpy Fisher) is standard normal.
  alphas = (0.01, 0.2)
  out = methods_lib.get("fisher").run(ctx, {"alpha": list(alphas), "batch_size": 8},
                                  jax.random.key(3)).states
  for m, alpha in enumerate(alphas):
    params = _model(ctx.originals["params"], m)
    f = _numpy_fisher(ctx, params, _own(ctx.retain[m]), 8)
    var = _torch_layout_variance(ravel_pytree(params)[1](f), alpha)
    z = (_flat(_model(out["params"], m)) - _flat(params)) / np.sqrt(_flat(var))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01, (z.mean(), z.std())
    # the variance rule itself on this Fisher
    tree = ravel_pytree(params)[1](jnp.asarray(f, jnp.float32))
    np.testing.assert_allclose(_flat(second_order.fisher_variance(tree, alpha, C)),
                               _flat(_torch_layout_variance(tree, alpha)), rtol=1e-5)


def _stack_of(tree, m):
  return jax.tree.map(lambda x: x[m:m + 1], tree)


def test_fisher_variance_maps_pytorch_axes_to_flax_layouts():
  """Conv [kh, kw, in, out], depthwise, Dense [in, out], 1-D and TinyViT-style [heads, offsets]
  leaves, with C = 3 output channels in some of them, against the PyTorch-layout rule."""
  rng = np.random.default_rng(1)
  shapes = {"conv": {"kernel": (3, 3, 4, C)}, "conv2": {"kernel": (3, 3, 2, 5)},
            "dw": {"kernel": (3, 3, 1, 6)}, "bn": {"scale": (C,), "bias": (6,)},
            "fc": {"kernel": (7, C), "bias": (C,)}, "dense": {"kernel": (C, 5)},
            "attn": {"attention_biases": (C, 9)}, "attn2": {"attention_biases": (2, 9)}}
  fisher = jax.tree.map(lambda s: jnp.asarray(10.0 ** rng.uniform(-6, 2, s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))
  got = second_order.fisher_variance(fisher, 0.3, C)
  want = _torch_layout_variance(fisher, 0.3)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5)
  # e.g. the conv kernel's variance is constant over its input channels only
  conv = np.asarray(got["conv2"]["kernel"])
  assert np.all(conv == conv[:, :, :1, :]) and len(np.unique(conv)) > 5


# ----------------------------------------------------------------------------------------- IU


def _per_sample(ctx, params, idx):
  x, y = _rows(ctx, idx)
  grad = _sample_grad(ctx.model)
  return np.stack([_flat(grad(params, x[i], y[i])) for i in range(len(idx))])


@functools.lru_cache(maxsize=None)
def _sample_grad(model):
  return jax.jit(jax.grad(lambda p, xi, yi: -jax.nn.log_softmax(
      model.apply({"params": p}, xi[None]))[0, yi]))


def _numpy_influence(ctx, m, num_samples, faithful):
  """k of deepunlearn-spec 4.11 in float64: the intended WoodFisher recursion (o re-projected on
  every new gradient, o_i = H_{i-1}^-1 g_i with all previous o_j kept) or the reference's."""
  params = _model(ctx.originals["params"], m)
  retain, forget = _own(ctx.retain[m]), _own(ctx.forget[m])
  g_f, g_r = _per_sample(ctx, params, forget).sum(0), _per_sample(ctx, params, retain).sum(0)
  n_f, n_r = len(forget), len(retain)
  v = g_f / (n_f + n_r) - g_r * n_f / ((n_f + n_r) * n_r)
  grads = _per_sample(ctx, params, retain[:num_samples])
  k, n = v.copy(), 1000.0
  if faithful:
    o = None
    for g in grads:
      if o is None:
        o = g.copy()
        continue
      t = o @ g
      k = k - (k @ g) / (n + t) * o
      o = o - t / (n + t) * o
    return v, k
  previous = []
  for g in grads:
    o = g.copy()
    for oj, dj in previous:
      o = o - oj * (oj @ g) / dj
    d = n + g @ o
    k = k - o * (g @ k) / d
    previous.append((o, d))
  return v, k


IU_HP = {"num_samples": 12, "grad_chunk": 5, "batch_size": 7}


@pytest.mark.parametrize("faithful", [False, True])
def test_influence_matches_a_numpy_woodfisher_recursion(mlp_ctx, faithful):
  ctx = mlp_ctx
  hp = {**IU_HP, "alpha": [1.0, 0.5], "faithful": faithful}
  out = methods_lib.get("influence").run(ctx, hp, jax.random.key(0)).states
  corrections = []
  for m, alpha in enumerate(hp["alpha"]):
    v, k = _numpy_influence(ctx, m, 12, faithful)
    step = (_flat(_model(out["params"], m)) - _flat(_model(ctx.originals["params"], m))) / alpha
    np.testing.assert_allclose(step, k, atol=2e-3 * np.abs(k).max())
    # the Newton-like correction k - v itself (small next to v) is right too
    np.testing.assert_allclose(step - v, k - v, atol=0.05 * np.abs(k - v).max())
    corrections.append((v, k - v))
  # the two recursions differ, so the test above tells them apart
  _, other = _numpy_influence(ctx, 0, 12, not faithful)
  v0, correction = corrections[0]
  assert np.abs((other - v0) - correction).max() > 0.3 * np.abs(correction).max()


def test_influence_stack_equals_each_model_alone(mlp_ctx):
  hp = IU_HP
  stacked = methods_lib.get("influence").run(mlp_ctx, hp, jax.random.key(1)).states
  for m in range(2):
    alone = dataclasses.replace(mlp_ctx, originals=_stack_of(mlp_ctx.originals, m),
                                retain=mlp_ctx.retain[m:m + 1], forget=mlp_ctx.forget[m:m + 1],
                                val=mlp_ctx.val[m:m + 1], model_ids=(m,))
    single = methods_lib.get("influence").run(alone, hp, jax.random.key(1)).states
    for a, b in zip(jax.tree.leaves(_stack_of(stacked, m)), jax.tree.leaves(single)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ stacks, architectures


@pytest.mark.parametrize("name,hp", [("fisher", {"alpha": 1e-4, "batch_size": 64}),
                                     ("influence", {"num_samples": 20, "grad_chunk": 8})])
def test_runs_on_the_tiny_stack(tiny_ctx, name, hp):
  out = methods_lib.get(name).run(tiny_ctx, hp, jax.random.key(0)).states
  assert jax.tree.structure(out) == jax.tree.structure(tiny_ctx.originals)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))
  before = tiny_ctx.originals
  for a, b in zip(jax.tree.leaves(out["batch_stats"]), jax.tree.leaves(before["batch_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # eval mode
  assert not np.array_equal(out["params"]["fc"]["kernel"], before["params"]["fc"]["kernel"])


@pytest.mark.slow  # the mini variant too: compiles too long for `make test`
@pytest.mark.parametrize("size", ARCH_SIZES)
def test_resnet18_32px_runs_both(size):
  ds = data_lib.load("digits", image_size=32, channels=3)
  model = arch_model("resnet18", ds.num_classes, size)
  inits = train.init_variables(model, jax.random.split(jax.random.key(0), 1), ds.inputs.shape[1:])
  ctx = base.Context.create(model, train.Recipe(batch_size=8, augment="none"), ds, inits, inits,
                            np.arange(12), np.arange(12, 16), np.arange(16, 20), model_ids=(0,),
                            num_classes=ds.num_classes)
  for name, hp in (("fisher", {"alpha": 1e-4, "batch_size": 8, "num_samples": 8}),
                   ("influence", {"num_samples": 4, "grad_chunk": 4, "batch_size": 16,
                                  "faithful": True})):
    out = methods_lib.get(name).run(ctx, hp, jax.random.key(0)).states
    assert jax.tree.structure(out) == jax.tree.structure(ctx.originals)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out)), name


def test_faithful_on_tinyvit_raises_citing_the_spec(tiny_ctx):
  model = models.get("tinyvit_11m", 10, img_size=32)
  shapes = jax.eval_shape(lambda k: model.init({"params": k}, jnp.zeros((1, 32, 32, 3)),
                                               train=False), jax.random.key(0))
  stacked = jax.tree.map(lambda s: jax.ShapeDtypeStruct((2, *s.shape), s.dtype), shapes)
  fake = dataclasses.replace(tiny_ctx, originals=stacked)
  for name in ("fisher", "influence"):
    with pytest.raises(ValueError, match=r"deepunlearn-spec 10\.8"):
      methods_lib.get(name).run(fake, {"faithful": True})


# ----------------------------------------------------------------------------- search spaces

SPACES = {  # deepunlearn-spec 4.10 / 4.11: name -> (low, high, log, choices)
    "fisher": {"batch_size": (None, None, None, (64, 128, 256)), "alpha": (0.0, 1.0, False, None)},
    "influence": {"num_epochs": (1, 7, False, None),
                  "batch_size": (None, None, None, (64, 128, 256)),
                  "alpha": (0.0, 1.0, False, None)},
}


@pytest.mark.parametrize("name", sorted(SPACES))
def test_search_space_is_the_reference(name):
  trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
  methods_lib.get(name).suggest(trial, e_max=7)
  assert set(trial.distributions) == set(SPACES[name])
  for hp, (low, high, log, choices) in SPACES[name].items():
    dist = trial.distributions[hp]
    if choices is not None:
      assert tuple(dist.choices) == choices
    else:
      assert (dist.low, dist.high, dist.log) == (low, high, log)


def test_defaults_are_the_reference():
  ff, iu = methods_lib.get("fisher").defaults, methods_lib.get("influence").defaults
  assert (ff["batch_size"], ff["alpha"], ff["num_samples"]) == (64, 0.2, 0)
  assert (iu["num_epochs"], iu["batch_size"], iu["alpha"], iu["num_samples"]) == (
      10, 256, 0.2, 1002)
