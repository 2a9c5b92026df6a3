"""IAM's approximate unlearning methods (iam-spec 8) against independent computations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ARCH_SIZES, make_context
from jaxmu import models, train
from jaxmu import methods as methods_lib
from jaxmu.data import augment as augment_lib
from jaxmu.methods import forsaken, lcodec, relabel

IAM = ("iam_ascent", "boundary_expanding", "ssd", "iam_fisher", "forsaken", "l_codec")


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _paths(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_runs(ctx, out):
  assert jax.tree.structure(out) == jax.tree.structure(ctx.originals)
  assert all(np.isfinite(x).all() for x in _leaves(out))


@pytest.fixture(scope="module")
def small_ctx(tiny_ctx):
  """The tiny stack with small sets (96 retain, 32 forget per model, whole batches of 16);
  class 3 is absent from every retain set (IAM's one_class case)."""
  labels = np.asarray(tiny_ctx.data.labels)
  retain = np.stack([r[labels[np.maximum(r, 0)] != 3][:96] for r in tiny_ctx.retain])
  return dataclasses.replace(tiny_ctx, retain=retain, forget=tiny_ctx.forget[:, :32])


def _one(ctx, m=0):
  return jax.tree.map(lambda a: a[m], ctx.originals)


def _losses(model, params, stats, x, y):
  """Per-sample CE of a train-mode forward of a batch (the test's own loss)."""
  logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                          mutable=["batch_stats"])
  return -jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y]


_mean_grad = jax.jit(jax.grad(lambda *a: jnp.mean(_losses(*a)), argnums=1), static_argnums=0)
_jacobian = jax.jit(jax.jacrev(_losses, argnums=1), static_argnums=0)


def _batch(ctx, idx, m):
  x = augment_lib.normalize(ctx.data.inputs[idx], ctx.recipe.mean, ctx.recipe.std)
  return ctx.model, _one(ctx, m)["params"], _one(ctx, m)["batch_stats"], x, ctx.data.labels[idx]


def _batch_grad(ctx, idx, m):
  return [np.asarray(g, np.float64) for g in jax.tree.leaves(_mean_grad(*_batch(ctx, idx, m)))]


def test_search_spaces_are_empty_as_iam_did_not_search():
  for name in IAM:
    assert methods_lib.get(name).space == {}
  assert methods_lib.get("ascent") is methods_lib.get("iam_ascent")
  assert methods_lib.get("ssd").defaults["selection_weighting"] == 10.0


def test_ssd_dampens_exactly_where_forget_importance_dominates(small_ctx):
  alpha = 1.5
  out = methods_lib.get("ssd").run(small_ctx, {"batch_size": 16, "augment": False,
                                           "selection_weighting": alpha}).states
  _check_runs(small_ctx, out)

  def importance(indices, m):
    total = None
    for start in range(0, len(indices), 16):
      grads = _batch_grad(small_ctx, indices[start:start + 16], m)
      norm = np.sqrt(sum((g ** 2).sum() for g in grads))
      sq = [(g * min(1.0, 1.0 / (norm + 1e-6))) ** 2 for g in grads]
      total = sq if total is None else [t + s for t, s in zip(total, sq)]
    return [t / (len(indices) // 16) for t in total]

  for m in range(2):
    i_f = importance(small_ctx.forget[m], m)
    i_d = importance(np.concatenate([small_ctx.retain[m], small_ctx.forget[m]]), m)
    dampened = 0
    for new, old, f, d in zip(_leaves(out["params"]), _leaves(small_ctx.originals["params"]),
                              i_f, i_d):
      new, old = new[m], old[m]
      where = f > alpha * d
      clear = np.abs(f - alpha * d) > 1e-4 * np.abs(f)  # away from float ties at the threshold
      expected = np.where(where, old * np.minimum(d / np.where(where, f, 1.0), 1.0), old)
      np.testing.assert_allclose(new[clear], expected[clear], rtol=1e-4, atol=1e-7)
      np.testing.assert_array_equal((new != old)[clear], where[clear] & (old != 0)[clear])
      dampened += where.sum()
    assert 0 < dampened < sum(x.size for x in i_f)
  for new, old in zip(_leaves(out["batch_stats"]), _leaves(small_ctx.originals["batch_stats"])):
    assert not np.allclose(new, old)  # train-mode passes move the running statistics


def _torch_var(path, p, f, alpha, c, absent):
  """Golatkar's get_mean_var on PyTorch layouts (kernels transposed), written independently."""
  kernel = path.endswith("['kernel']")
  p_t, f_t = (p.T, f.T) if kernel else (p, f)
  var = np.minimum(1.0 / (f_t + 1e-8), 1e3)
  if p_t.shape[0] == c:
    var = np.minimum(var, 1e2)
  var = alpha * var
  if p_t.ndim > 1:
    var = np.repeat(var.mean(axis=1, keepdims=True), p_t.shape[1], axis=1)
  mu = p_t.copy()
  if p_t.shape[0] == c:
    mu[absent] = 0
    var[absent] = 1e-4
  if p_t.shape[0] == c or p_t.ndim == 1:
    var = var * 10
  return (mu.T, var.T) if kernel else (mu, var)


def test_iam_fisher_noise_follows_the_fisher_and_the_one_class_rule(small_ctx):
  alpha = 1e-3
  out = methods_lib.get("iam_fisher").run(small_ctx, {"batch_size": 16, "augment": False,
                                                  "alpha": alpha}, jax.random.key(4)).states
  _check_runs(small_ctx, out)
  paths = _paths(small_ctx.originals["params"])
  for m in range(2):
    retain = small_ctx.retain[m]
    fisher = None
    for start in range(0, len(retain), 16):  # per-sample gradients through each batch's BN stats
      jac = _jacobian(*_batch(small_ctx, retain[start:start + 16], m))
      sq = [(np.asarray(j, np.float64) ** 2).sum(0) for j in jax.tree.leaves(jac)]
      fisher = sq if fisher is None else [f + s for f, s in zip(fisher, sq)]
    fisher = [f / len(retain) for f in fisher]
    for path, new, old, f in zip(paths, _leaves(out["params"]),
                                 _leaves(small_ctx.originals["params"]), fisher):
      mu, var = _torch_var(path, old[m].astype(np.float64), f, alpha, 10, np.array([3]))
      z = (new[m] - mu) / np.sqrt(var)
      assert np.abs(z).max() < 6, path
      if z.size > 1000:
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1, (path, z.mean(), z.std())
      if path.startswith("['fc']"):  # class 3 is absent from the retain set: mu = 0, var = 1e-3
        col = new[m][..., 3]
        assert np.abs(col).max() < 6 * np.sqrt(1e-3) and np.abs(col).max() > 1e-3


def test_boundary_expanding_moves_only_the_classifier_and_pushes_forget_away(tiny_ctx):
  out = methods_lib.get("boundary_expanding").run(
      tiny_ctx, {"num_epochs": 3, "learning_rate": 0.5, "augment": False}).states
  _check_runs(tiny_ctx, out)
  for path, a, b in zip(_paths(out), _leaves(out), _leaves(tiny_ctx.originals)):
    if "['fc']" in path:
      assert not np.array_equal(a, b)
    else:
      np.testing.assert_array_equal(a, b, err_msg=path)

  def forget_prob(variables):
    logits = train.predict(tiny_ctx.model, variables, tiny_ctx.data, tiny_ctx.forget[1],
                           tiny_ctx.recipe, "loop")
    probs = jax.nn.softmax(logits)
    return np.asarray(probs[:, np.arange(logits.shape[1]), tiny_ctx.data.labels[tiny_ctx.forget[1]]])

  before, after = forget_prob(tiny_ctx.originals), forget_prob(out)
  assert (after.mean(1) < before.mean(1) - 1e-3).all(), (before.mean(1), after.mean(1))


@pytest.mark.parametrize("size", ARCH_SIZES)
def test_boundary_expanding_resnet18_cifar_stem_and_the_missing_relu(size):
  ctx = make_context("resnet18", num_models=1, image_size=32, train_epochs=0, stem="cifar",
                     size=size)
  variables = jax.tree.map(lambda x: x[0], ctx.originals)
  x, _, valid = methods_lib.base.inputs(ctx.recipe, ctx.data.inputs, ctx.data.labels,
                                    jnp.arange(4))
  extra = {"kernel": jnp.ones((512, 1)) * 0.01, "bias": jnp.zeros((1,))}
  plain = ctx.model.apply(variables, x, train=False)
  wide, _ = relabel.widened_forward(ctx.model, ctx.recipe, variables["params"],
                                        variables["batch_stats"], extra, x, valid, training=False)
  np.testing.assert_allclose(wide[:, :10], plain, rtol=1e-5, atol=1e-5)
  no_relu, _ = relabel.widened_forward(ctx.model, ctx.recipe, variables["params"],
                                           variables["batch_stats"], extra, x, valid,
                                           training=False, drop_stem_relu=True)
  assert relabel.drops_stem_relu(ctx.model) and not np.allclose(no_relu, wide)
  ctx = dataclasses.replace(ctx, forget=ctx.forget[:, :8])
  out = methods_lib.get("boundary_expanding").run(
      ctx, {"num_epochs": 1, "faithful": True, "batch_size": 8, "learning_rate": 0.01}).states
  _check_runs(ctx, out)
  for path, a, b in zip(_paths(out), _leaves(out), _leaves(ctx.originals)):
    assert ("['fc']" in path) != np.array_equal(a, b), path


def _forget_loss(ctx, variables):
  return np.asarray(train.evaluate(ctx.model, variables, ctx.data, ctx.forget, ctx.recipe,
                                   "loop")["loss"])


def test_iam_ascent_raises_forget_loss_and_faithful_uses_a_fresh_network(tiny_ctx):
  out = methods_lib.get("iam_ascent").run(tiny_ctx, {"num_epochs": 1, "learning_rate": 2.0}).states
  _check_runs(tiny_ctx, out)
  before, after = _forget_loss(tiny_ctx, tiny_ctx.originals), _forget_loss(tiny_ctx, out)
  assert (after > before + 0.02).all(), (before, after)

  key = jax.random.key(9)
  hp = {"num_epochs": 1, "augment": False, "faithful": True}
  out = methods_lib.get("iam_ascent").run(tiny_ctx, hp, key).states
  fresh = train.init_variables(tiny_ctx.model, tiny_ctx.keys(jax.random.fold_in(key, 7)),
                               tiny_ctx.input_shape)
  for m in range(2):
    idx = tiny_ctx.forget[m][tiny_ctx.forget[m] >= 0]
    x = augment_lib.normalize(tiny_ctx.data.inputs[idx], tiny_ctx.recipe.mean, tiny_ctx.recipe.std)
    y = tiny_ctx.data.labels[idx]
    net = jax.tree.map(lambda a: a[m], fresh)
    grads = _mean_grad(tiny_ctx.model, net["params"], net["batch_stats"], x, y)
    expected = jax.tree.map(lambda o, g: o[m] + 0.01 * g, tiny_ctx.originals["params"], grads)
    for a, b in zip(_leaves(jax.tree.map(lambda t: t[m], out["params"])), _leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(_leaves(out["batch_stats"]), _leaves(tiny_ctx.originals["batch_stats"])):
    np.testing.assert_array_equal(a, b)


def test_forsaken_faithful_is_one_step_of_a_random_generator(tiny_ctx):
  key, chunk = jax.random.key(2), 512
  out = methods_lib.get("forsaken").run(tiny_ctx, {"faithful": True, "chunk": chunk}, key).states
  _check_runs(tiny_ctx, out)
  gen_keys = forsaken.generator_key(tiny_ctx, key)
  for m in range(2):
    params = jax.tree.map(lambda a: a[m], tiny_ctx.originals["params"])
    stats = jax.tree.map(lambda a: a[m], tiny_ctx.originals["batch_stats"])
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    idx = tiny_ctx.forget[m][tiny_ctx.forget[m] >= 0]
    x = augment_lib.normalize(tiny_ctx.data.inputs[idx], tiny_ctx.recipe.mean, tiny_ctx.recipe.std)
    logits, _ = tiny_ctx.model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                     mutable=["batch_stats"])
    conf = np.asarray(jax.nn.softmax(logits)).max(1)
    labels = np.asarray(tiny_ctx.data.labels)[idx]
    profile = np.array([conf[labels == c].mean() if (labels == c).any() else 0.0
                        for c in range(10)])
    inp = np.concatenate([np.asarray(flat), profile])
    k1, kb1, k2, kb2 = jax.random.split(gen_keys[m], 4)
    b1, b2 = inp.size ** -0.5, 64 ** -0.5

    def matrix(k, rows, cols, bound):
      n = -(-rows // chunk)
      blocks = [jax.random.uniform(jax.random.fold_in(k, i), (chunk,) + cols, jnp.float32,
                                   -bound, bound) for i in range(n)]
      return np.concatenate([np.asarray(b) for b in blocks])[:rows]

    w1 = matrix(k1, inp.size, (64,), b1)
    bias1 = np.asarray(jax.random.uniform(kb1, (64,), jnp.float32, -b1, b1))
    w2 = matrix(k2, flat.size, (64,), b2)
    bias2 = matrix(kb2, flat.size, (), b2)
    v = w2 @ np.maximum(inp @ w1 + bias1, 0) + bias2
    expected = unravel(flat - 0.01 * jnp.asarray(v, jnp.float32))
    for a, b in zip(_leaves(jax.tree.map(lambda t: t[m], out["params"])), _leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def _numpy_foci(y, x, k):
  n = len(y)
  x = (x - x.mean(0)) / x.std(0)
  r = np.array([(y <= yi).sum() for yi in y])
  left = np.array([(y >= yi).sum() for yi in y])

  def q(cols):
    z = x[:, cols]
    d = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn_ = d.argmin(1)
    return (np.minimum(r, r[nn_]).sum() - (left ** 2).sum() / n) / n ** 2

  chosen, prev = [], 0.0
  for _ in range(k):
    scores = {j: q(chosen + [j]) for j in range(x.shape[1]) if j not in chosen}
    best = max(scores, key=scores.get)
    if scores[best] <= prev:
      break
    chosen.append(best)
    prev = scores[best]
  return chosen


def test_foci_matches_a_numpy_greedy_selection():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(120, 9)).astype(np.float32)
  y = (np.sin(2 * x[:, 4]) + 0.7 * x[:, 1] ** 2 + 0.05 * rng.normal(size=120)).astype(np.float32)
  got = np.asarray(lcodec.foci(jnp.asarray(y), jnp.asarray(x), 5, chunk=4))
  want = _numpy_foci(y.astype(np.float64), x.astype(np.float64), 5)
  assert list(got[got >= 0]) == want and set(want[:2]) == {1, 4}


def test_l_codec_changes_only_the_selected_units_and_is_stack_parallel(tiny_ctx):
  hp = methods_lib.get("l_codec").hparams({"n_perturbations": 16, "max_units": 3, "cg_iters": 5})
  out, mask = lcodec.lcodec_with_selection(tiny_ctx, hp, jax.random.key(1))
  _check_runs(tiny_ctx, out)
  changed = 0
  for path, a, b, m in zip(_paths(out["params"]), _leaves(out["params"]),
                           _leaves(tiny_ctx.originals["params"]), _leaves(mask)):
    assert not (a != b)[~m].any(), path
    changed += (a != b).sum()
    if m.ndim > 2:  # a unit's whole kernel column: the mask depends on the output channel only
      assert (m == m[..., :1, :]).all() if m.ndim == 3 else (m == m[:, :1, :1, :1, :]).all()
  assert changed > 0
  for a, b in zip(_leaves(out["batch_stats"]), _leaves(tiny_ctx.originals["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  alone = dataclasses.replace(
      tiny_ctx, originals=jax.tree.map(lambda x: x[1:], tiny_ctx.originals),
      retain=tiny_ctx.retain[1:], forget=tiny_ctx.forget[1:], val=tiny_ctx.val[1:], model_ids=(1,))
  single, _ = lcodec.lcodec_with_selection(alone, hp, jax.random.key(1))
  for a, b in zip(_leaves(jax.tree.map(lambda x: x[1:], out)), _leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,hp", [  # ssd and iam_fisher run on the stack above
    ("forsaken", {"num_epochs": 2, "chunk": 512}),
    ("l_codec", {"n_perturbations": 8, "max_units": 2, "faithful": True}),
])
def test_runs_on_the_tiny_stack(tiny_ctx, name, hp):
  out = methods_lib.get(name).run(tiny_ctx, hp, jax.random.key(0)).states
  _check_runs(tiny_ctx, out)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(out), _leaves(tiny_ctx.originals)))
