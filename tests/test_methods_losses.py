"""GA, NG+, negative_gradient, SRL, SalUn, BT, SCRUB against independent computations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import search_space_table
import pytest

from jaxmu import models, train

from jaxmu import methods as methods_lib
from jaxmu.data import augment as augment_lib
from jaxmu.methods import ascent, distill, relabel

KEY = jax.random.key(7)
BATCH = 64  # every set of the small stack below fits one batch: one step per epoch

# Every run of the stack in this file, once (compiled programs are shared between tests).
RUNS = {
    "gradient_ascent": {"num_epochs": 2, "batch_size": BATCH, "learning_rate": 0.1},
    "neggrad_plus": {"num_epochs": 2, "batch_size": BATCH, "learning_rate": 0.05,
                     "weight_decay": 0.3, "alpha": 0.8},
    "negative_gradient": {"num_epochs": 1, "batch_size": BATCH},
    "random_labels": {"num_epochs": 1, "batch_size": BATCH},
    "salun": {"num_epochs": 2, "batch_size": BATCH, "threshold": [0.3, 0.6], "momentum": 0.0,
              "weight_decay": 0.01},
    "bad_teacher": {"num_epochs": 1, "batch_size": BATCH, "kl_temperature": 2.0},
}
SCRUB_HP = {"sgda_num_epochs": 2, "msteps": 1, "retain_batch_size": BATCH,
            "forget_batch_size": BATCH, "sgda_learning_rate": 1.0}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _model(tree, m):
  return jax.tree.map(lambda x: np.asarray(x[m]), tree)


def _valid(row):
  return row[row >= 0]


def _inputs(ctx, idx):
  """Normalised images of dataset indices (independent of the methods' batching)."""
  images = np.asarray(ctx.data.inputs)[idx]
  return augment_lib.normalize(images, ctx.recipe.mean, ctx.recipe.std)


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()


def _loss(kind, model, params, variables, a):
  """The tests' own losses, written without jaxmu: ``a`` holds the data and coefficients."""
  v = {**variables, "params": params}
  if kind in ("ce_train", "neg_ce_train"):
    logits, _ = model.apply(v, a["x"], train=True, mask=jnp.ones(a["x"].shape[0], bool),
                            mutable=["batch_stats"])
    return (-1 if kind == "neg_ce_train" else 1) * _ce(logits, a["y"])
  if kind == "neg_ce_eval":
    return -_ce(model.apply(v, a["x"], train=False), a["y"])
  if kind == "ngplus":  # α·(CE_r + (w/2)‖θ − θ_0‖²) − (1 − α)·CE_f, eval mode
    sq = sum(jnp.sum((p - q) ** 2) for p, q in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(a["anchor"])))
    ce_r = _ce(model.apply(v, a["x"], train=False), a["y"])
    ce_f = _ce(model.apply(v, a["xf"], train=False), a["yf"])
    return a["alpha"] * (ce_r + a["prox"] / 2 * sq) - (1 - a["alpha"]) * ce_f
  raise ValueError(kind)


_loss_value = jax.jit(_loss, static_argnums=(0, 1))
_loss_grad = jax.jit(jax.grad(_loss, argnums=2), static_argnums=(0, 1))


def _hand_sgd(kind, ctx, variables, a, lr, mu, decay, steps):
  """PyTorch SGD (coupled decay, momentum with buf = d on the first step) on ``kind``'s loss."""
  theta, buf = variables["params"], None
  for _ in range(steps):
    d = jax.tree.map(lambda g, p: g + decay * p, _loss_grad(kind, ctx.model, theta, variables, a),
                     theta)
    buf = d if buf is None else jax.tree.map(lambda b, x: mu * b + x, buf, d)
    theta = jax.tree.map(lambda p, b: p - lr * b, theta, buf)
  return theta


@pytest.fixture(scope="module")
def ctx(tiny_ctx):
  """The tiny stack with a prefix of each model's sets (different sizes per model), so that
  every epoch is one batch of 64 and hand computations need no batch order."""
  n_retain, n_forget = (40, 30), (20, 12)
  retain = np.full((2, max(n_retain)), -1, np.int32)
  forget = np.full((2, max(n_forget)), -1, np.int32)
  for m in range(2):
    retain[m, :n_retain[m]] = tiny_ctx.retain[m, :n_retain[m]]
    forget[m, :n_forget[m]] = tiny_ctx.forget[m, :n_forget[m]]
  return dataclasses.replace(tiny_ctx, retain=retain, forget=forget)


@pytest.fixture(scope="module")
def runs(ctx):
  out = {name: methods_lib.get(name).run(ctx, hp, KEY).states for name, hp in RUNS.items()}
  out["scrub"] = distill.scrub(ctx, methods_lib.get("scrub").hparams(SCRUB_HP), KEY)
  return out


# --------------------------------------------------------------------------------------------
# Registry, defaults, search spaces
# --------------------------------------------------------------------------------------------

LR = (1e-5, 1e-1, True, None)
MOM = (0.9, 0.9, False, None)
BS = (None, None, None, (64, 128, 256))
U01 = (0.0, 1.0, False, None)
EPOCHS = (1, 9, False, None)  # e_max = 9 below
COMMON5 = {"learning_rate": LR, "momentum": MOM, "weight_decay": LR, "batch_size": BS,
           "num_epochs": EPOCHS}
# (name, low, high, log, choices) from deepunlearn-spec 4.4-4.9, 4.21.
SPACES = {
    "gradient_ascent": COMMON5,
    "neggrad_plus": {**COMMON5, "alpha": U01},
    "negative_gradient": COMMON5,
    "random_labels": COMMON5,
    "salun": {**COMMON5, "threshold": U01, "mask_learning_rate": LR, "mask_momentum": MOM,
              "mask_weight_decay": LR},
    "bad_teacher": {**COMMON5, "kl_temperature": (0.0, 5.0, False, None)},
    "scrub": {"gamma": U01, "alpha": U01, "beta": U01, "smoothing": U01, "msteps": EPOCHS,
              "kd_T": (0.0, 5.0, False, None), "sgda_num_epochs": EPOCHS,
              "sgda_learning_rate": LR, "sgda_weight_decay": LR, "sgda_momentum": MOM,
              "retain_batch_size": BS, "forget_batch_size": BS},
}
DEFAULTS = {
    "gradient_ascent": dict(num_epochs=10, batch_size=256, learning_rate=0.01, momentum=0.9,
                            weight_decay=5e-4),
    "neggrad_plus": dict(num_epochs=10, batch_size=256, alpha=0.95, learning_rate=0.01,
                         momentum=0.9, weight_decay=0.0, faithful=False),
    "negative_gradient": dict(num_epochs=5, batch_size=256, learning_rate=0.1, momentum=0.9,
                              weight_decay=5e-4),
    "random_labels": dict(num_epochs=5, batch_size=256, learning_rate=0.1, momentum=0.9,
                          weight_decay=5e-4),
    "salun": dict(num_epochs=10, batch_size=256, threshold=0.5, learning_rate=0.01, momentum=0.0,
                  weight_decay=0.0, mask_learning_rate=0.01, mask_momentum=0.9,
                  mask_weight_decay=5e-4, faithful=False),
    "bad_teacher": dict(num_epochs=10, batch_size=256, kl_temperature=1.0, learning_rate=0.01,
                        momentum=None, weight_decay=0.0),
    "scrub": dict(gamma=1.0, alpha=0.5, beta=0.0, smoothing=0.5, msteps=3, kd_T=2.0,
                  sgda_num_epochs=5, sgda_learning_rate=5e-4, sgda_weight_decay=5e-4,
                  sgda_momentum=0.9, retain_batch_size=32, forget_batch_size=64,
                  lr_decay_rate=0.1, batch_size=32, faithful=False),
}


@pytest.mark.parametrize("name", sorted(SPACES))
def test_search_space_and_defaults_match_reference(name):
  method = methods_lib.get(name)
  assert dict(method.defaults) == DEFAULTS[name]
  got, _ = search_space_table(method, e_max=9)
  assert got == SPACES[name]


def test_reference_names_are_aliases():
  for alias, name in [("neggradplus", "neggrad_plus"), ("successive_random_labels", "random_labels"),
                      ("scrubv2", "scrub")]:
    assert methods_lib.get(alias) is methods_lib.get(name)


def test_every_method_runs_on_the_stack(ctx, runs):
  structure = jax.tree.structure(ctx.originals)
  finals = [*((n, runs[n]) for n in RUNS), ("scrub", runs["scrub"][0]),
            ("scrub final", runs["scrub"][1]["final"])]
  for name, states in finals:
    assert jax.tree.structure(states) == structure, name
    assert all(np.isfinite(x).all() for x in _leaves(states)), name
  for name, states in finals[:-2] + finals[-1:]:
    moved = [not np.array_equal(a, b) for a, b in zip(_leaves(states["params"]),
                                                      _leaves(ctx.originals["params"]))]
    assert any(moved), name


# --------------------------------------------------------------------------------------------
# GA, NG+, negative_gradient
# --------------------------------------------------------------------------------------------


def test_gradient_ascent_is_sgd_on_minus_ce_and_raises_the_forget_loss(ctx, runs):
  hp = methods_lib.get("gradient_ascent").hparams(RUNS["gradient_ascent"])
  labels = np.asarray(ctx.data.labels)
  out = runs["gradient_ascent"]
  for m in range(2):
    variables = _model(ctx.originals, m)
    f = _valid(ctx.forget[m])
    a = {"x": _inputs(ctx, f), "y": labels[f]}
    expected = _hand_sgd("neg_ce_train", ctx, variables, a, hp.learning_rate, hp.momentum,
                         hp.weight_decay, hp.num_epochs)
    got = _model(out["params"], m)
    for x, y in zip(_leaves(got), _leaves(expected)):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)
    before = -_loss_value("neg_ce_train", ctx.model, variables["params"], variables, a)
    after = -_loss_value("neg_ce_train", ctx.model, got, variables, a)
    assert after > before + 0.05, (before, after)


@pytest.mark.parametrize("faithful", [False, True])
def test_neggrad_plus_two_steps_match_hand_sgd_in_eval_mode(ctx, runs, faithful):
  """2 epochs = 2 SGD steps on the whole sets (one batch each), computed by hand."""
  hp = methods_lib.get("neggrad_plus").hparams({**RUNS["neggrad_plus"], "faithful": faithful})
  out = runs["neggrad_plus"] if not faithful else methods_lib.get("neggrad_plus").run(
      ctx, hp, KEY).states
  labels = np.asarray(ctx.data.labels)
  w = hp.weight_decay
  for m in range(2):
    variables = _model(ctx.originals, m)
    r, f = _valid(ctx.retain[m]), _valid(ctx.forget[m])
    # Intended: weight_decay is the proximal weight towards the original, no coupled decay.
    # Faithful: the proximal term is dead and the optimiser decays with weight_decay.
    a = {"x": _inputs(ctx, r), "y": labels[r], "xf": _inputs(ctx, f), "yf": labels[f],
         "alpha": hp.alpha, "prox": 0.0 if faithful else w, "anchor": variables["params"]}
    expected = _hand_sgd("ngplus", ctx, variables, a, hp.learning_rate, hp.momentum,
                         w if faithful else 0.0, 2)
    for x, y in zip(_leaves(_model(out["params"], m)), _leaves(expected)):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)
    # Eval mode: the running statistics are bit-identical.
    for x, y in zip(_leaves(_model(out["batch_stats"], m)), _leaves(variables["batch_stats"])):
      np.testing.assert_array_equal(x, y)


def test_neggrad_plus_loss_is_the_weighted_difference(ctx):
  labels = np.asarray(ctx.data.labels)
  variables = _model(ctx.originals, 0)
  r, f = _valid(ctx.retain[0]), _valid(ctx.forget[0])
  retain = (_inputs(ctx, r), jnp.asarray(labels[r]), jnp.ones(len(r), bool))
  forget = (_inputs(ctx, f), jnp.asarray(labels[f]), jnp.ones(len(f), bool))
  got = jax.jit(ascent.neggrad_loss, static_argnums=(0, 1))(
      ctx.model, ctx.recipe, variables["params"], variables["params"], variables["batch_stats"],
      retain, forget, 0.7, 0.5)
  logits_r = np.asarray(ctx.model.apply(variables, retain[0], train=False), np.float64)
  logits_f = np.asarray(ctx.model.apply(variables, forget[0], train=False), np.float64)

  def ce(z, y):
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))

  np.testing.assert_allclose(got, 0.7 * ce(logits_r, labels[r]) - 0.3 * ce(logits_f, labels[f]),
                             rtol=1e-5)


def test_negative_gradient_clamps_signed_losses():
  logits = jnp.asarray([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0], [5.0, 0.0, 0.0, 0.0],
                        [0.0, 1.0, 0.0, 0.0]])
  y = jnp.asarray([0, 0, 0, 1])
  is_forget = jnp.asarray([False, False, True, False])
  valid = jnp.asarray([True, True, True, False])
  z = np.asarray(logits, np.float64)
  ce = np.log(np.exp(z).sum(1)) - z[np.arange(4), np.asarray(y)]
  signed = np.where(np.asarray(is_forget), -ce, ce)
  expected = np.clip(signed, 0, 0.25)[:3].mean()
  assert 0 < expected < 0.25
  np.testing.assert_allclose(ascent.negative_gradient_loss(logits, y, is_forget, valid), expected,
                             rtol=1e-6)


# --------------------------------------------------------------------------------------------
# SRL, SalUn
# --------------------------------------------------------------------------------------------


def test_forget_labels_uniform_including_true_class_and_per_model(ctx):
  keys = ctx.keys(KEY)
  idx = jnp.arange(ctx.data.labels.shape[0])
  draw = jax.jit(lambda k, e: relabel.forget_labels(jax.random.fold_in(k, e), idx, 10))
  first = [np.asarray(draw(k, 0)) for k in keys]
  assert not np.array_equal(first[0], first[1])  # each model its own labels
  assert not np.array_equal(first[0], np.asarray(draw(keys[0], 1)))  # re-drawn every epoch
  many = np.stack([np.asarray(draw(keys[0], e)) for e in range(12)])  # 21,564 draws
  counts = np.bincount(many.ravel(), minlength=10)
  chi2 = ((counts - many.size / 10) ** 2 / (many.size / 10)).sum()
  assert chi2 < 30, counts  # chi-square, 9 dof: p ~ 4e-4
  same = (many == np.asarray(ctx.data.labels)[None]).mean()
  assert abs(same - 0.1) < 0.01  # the true class is drawn like any other


def test_random_labels_one_step_matches_hand_sgd(ctx, runs):
  hp = methods_lib.get("random_labels").hparams(RUNS["random_labels"])
  labels = np.asarray(ctx.data.labels)
  for m in range(2):
    variables = _model(ctx.originals, m)
    r, f = _valid(ctx.retain[m]), _valid(ctx.forget[m])
    epoch_key = jax.random.fold_in(ctx.keys(KEY)[m], 0)
    y = np.concatenate([labels[r], np.asarray(relabel.forget_labels(epoch_key, f, 10))])
    a = {"x": _inputs(ctx, np.concatenate([r, f])), "y": y}
    expected = _hand_sgd("ce_train", ctx, variables, a, hp.learning_rate, hp.momentum,
                         hp.weight_decay, 1)
    for a, b in zip(_leaves(_model(runs["random_labels"]["params"], m)), _leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_saliency_accumulation_intended_and_faithful():
  grads = [{"w": jnp.full(3, v)} for v in (1.0, 10.0, 100.0)]
  for faithful, expected in [(False, 111.0), (True, 3 * 1 + 2 * 10 + 100.0)]:
    saliency, running = {"w": jnp.zeros(3)}, {"w": jnp.zeros(3)}
    for g in grads:
      saliency, running = relabel.accumulate(saliency, running, g, faithful)
    np.testing.assert_allclose(saliency["w"], expected)


@pytest.fixture(scope="module")
def salun_mask(ctx):
  return relabel.saliency_mask(ctx, methods_lib.get("salun").hparams(RUNS["salun"]), KEY)


def test_salun_mask_keeps_exactly_the_top_fraction_by_abs_gradient(ctx, salun_mask):
  mask, saliency = salun_mask
  labels = np.asarray(ctx.data.labels)
  for m, threshold in enumerate(RUNS["salun"]["threshold"]):
    variables = _model(ctx.originals, m)
    f = _valid(ctx.forget[m])  # one batch: G = grad of -CE (eval mode) on the whole forget set
    a = {"x": _inputs(ctx, f), "y": labels[f]}
    g = _loss_grad("neg_ce_eval", ctx.model, variables["params"], variables, a)
    g = np.concatenate([np.abs(np.asarray(v, np.float64)).ravel() for v in jax.tree.leaves(g)])
    got_g = np.concatenate([np.abs(v).ravel() for v in _leaves(_model(saliency, m))])
    np.testing.assert_allclose(got_g, g, rtol=1e-4, atol=1e-7)
    keep = np.concatenate([v.ravel() for v in _leaves(_model(mask, m))])
    assert set(np.unique(keep)) <= {0.0, 1.0}
    assert keep.sum() == int(threshold * g.size)
    assert g[keep == 1].min() >= g[keep == 0].max() * (1 - 1e-4)


def test_salun_masked_out_weights_move_only_by_weight_decay(ctx, runs, salun_mask):
  hp = methods_lib.get("salun").hparams(RUNS["salun"])
  lr, wd = np.float32(hp.learning_rate), np.float32(hp.weight_decay)
  moved_in = 0
  for out, orig, keep in zip(_leaves(runs["salun"]["params"]), _leaves(ctx.originals["params"]),
                             _leaves(salun_mask[0])):
    decayed = orig.copy()
    for _ in range(hp.num_epochs):  # one step per epoch, momentum 0
      decayed = decayed - lr * (wd * decayed)
    np.testing.assert_allclose(out[keep == 0], decayed[keep == 0], rtol=1e-6, atol=1e-9)
    moved_in += (~np.isclose(out, decayed, rtol=1e-6, atol=1e-9) & (keep == 1)).sum()
  assert moved_in > 0


def test_attention_bias_mask_marks_tinyvit_biases_only():
  model = models.get("tinyvit_11m", 10, img_size=32)
  shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0), (32, 32, 3)))["params"]
  flags = jax.tree_util.tree_leaves_with_path(relabel.attention_bias_mask(shapes))
  marked = [path for path, flag in flags if flag]
  assert marked and all(path[-1].key == "attention_biases" for path in marked)
  assert len(marked) == sum(1 for path, _ in flags if path[-1].key == "attention_biases")


# --------------------------------------------------------------------------------------------
# BT
# --------------------------------------------------------------------------------------------


def test_bad_teacher_loss_is_torch_kl_div_mean(ctx):
  rng = np.random.default_rng(0)
  s, tc, ti = (rng.normal(size=(6, 5)).astype(np.float32) * 3 for _ in range(3))
  is_forget = np.array([0, 1, 0, 1, 1, 0], bool)
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  temperature = 1.7

  def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  p = np.where(is_forget[:, None], softmax(ti.astype(np.float64) / temperature),
               softmax(tc.astype(np.float64) / temperature))
  log_q = np.log(softmax(s.astype(np.float64) / temperature))
  expected = (p * (np.log(p) - log_q))[valid].sum() / (valid.sum() * 5)  # mean over B x C
  got = distill.bad_teacher_loss(jnp.asarray(s), jnp.asarray(tc), jnp.asarray(ti),
                                 jnp.asarray(is_forget), jnp.asarray(valid), temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # The incompetent teachers: fresh models of the same architecture, one per model.
  teachers = distill.incompetent_teachers(ctx, KEY)
  assert jax.tree.structure(teachers) == jax.tree.structure(ctx.originals)
  kernels = np.asarray(teachers["params"]["fc"]["kernel"])
  assert not np.array_equal(kernels[0], kernels[1])
  assert not np.allclose(kernels, np.asarray(ctx.originals["params"]["fc"]["kernel"]))


# --------------------------------------------------------------------------------------------
# SCRUB
# --------------------------------------------------------------------------------------------


def test_scrub_lr_factors_follow_the_spec():
  factors = lambda e: [distill.scrub_lr_factor(e, i) for i in range(1, e + 1)]  # noqa: E731
  assert np.allclose(factors(1), [0.001])
  assert np.allclose(factors(5), [1, 1, 0.1, 0.1, 0.001])
  assert np.allclose(factors(10), [1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.001])


def test_scrub_selection_is_per_model_argmin_and_index_zero():
  errors = np.array([[10.0, 50.0, 30.0], [20.0, 40.0, 28.0], [25.0, 45.0, 25.0],
                     [40.0, 44.0, 5.0]])  # [E+1 = 4, N = 3]
  target = np.array([24.0, 60.0, 28.4])
  np.testing.assert_array_equal(distill.select_checkpoint(errors, target, False), [2, 0, 1])
  np.testing.assert_array_equal(distill.select_checkpoint(errors, target, True), [2, 3, 1])
  snapshots = {i: {"w": jnp.full((3, 2), float(i))} for i in range(3)}
  picked = distill.pick(jnp.asarray([2, 3, 0]), snapshots, {"w": jnp.full((3, 2), 3.0)})
  np.testing.assert_array_equal(picked["w"], [[2, 2], [3, 3], [0, 0]])


def test_scrub_returns_each_models_argmin_epoch(ctx, runs):
  out, info = runs["scrub"]
  labels = np.asarray(ctx.data.labels)

  def errors(variables, sets):
    return 100 - 100 * train.evaluate(ctx.model, variables, ctx.data, sets,
                                      ctx.recipe)["accuracy"]

  np.testing.assert_allclose(info["errors"][0], errors(ctx.originals, ctx.forget))
  forget_val = []
  for m in range(2):
    val = _valid(ctx.val[m])
    forget_val.append(val[np.isin(labels[val], labels[_valid(ctx.forget[m])])])
  np.testing.assert_allclose(info["target"], errors(info["final"], forget_val))
  assert info["errors"].shape == (3, 2)
  gap = np.abs(info["errors"] - info["target"][None])
  np.testing.assert_array_equal(info["choice"], gap.argmin(0))
  np.testing.assert_allclose(errors(out, ctx.forget),
                             info["errors"][info["choice"], [0, 1]])
  for m in range(2):
    if info["choice"][m] == 0:
      for a, b in zip(_leaves(_model(out, m)), _leaves(_model(ctx.originals, m))):
        np.testing.assert_array_equal(a, b)


def test_scrub_stack_equals_each_model_alone(ctx, runs):
  hp = methods_lib.get("scrub").hparams(SCRUB_HP)
  stacked, info = runs["scrub"]
  for m in range(2):
    alone = dataclasses.replace(
        ctx, originals=jax.tree.map(lambda x: x[m:m + 1], ctx.originals),
        retain=ctx.retain[m:m + 1], forget=ctx.forget[m:m + 1],
        val=ctx.val[m:m + 1], model_ids=(m,))
    single, single_info = distill.scrub(alone, hp, KEY)
    np.testing.assert_allclose(single_info["errors"][:, 0], info["errors"][:, m])
    assert single_info["choice"][0] == info["choice"][m]
    for a, b in zip(_leaves(jax.tree.map(lambda x: x[m:m + 1], stacked)), _leaves(single)):
      np.testing.assert_allclose(a, b, atol=1e-6)
