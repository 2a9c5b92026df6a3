"""The Kaggle-derived DeepUnlearn methods: FCS, MSG, CFW, PRMQ, CT, KDE, RNI (deepunlearn-spec
4.14-4.20), each checked against an independent computation (NumPy, closed forms, hand-built
gradients), on the 2-model tiny stack and with a step on ResNet-18 / TinyViT at 32x32."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest
from sklearn.utils.class_weight import compute_class_weight

from conftest import ARCH_SIZES, arch_model, search_space_table

from jaxmu import data as data_lib
from jaxmu import models, train
from jaxmu import methods as methods_lib
from jaxmu.methods import base
from jaxmu.methods.kaggle import fcs, perturb, reinit

KAGGLE = ("fcs", "msg", "cfw", "prmq", "ct", "kde", "rni")
TINY_HP = {  # 1-2 epochs, batch 64: programs shared between tests
    "fcs": {"num_epochs": 1, "batch_size": 64},
    "msg": {"num_epochs": 1},
    "cfw": {"num_epochs": 2},
    "prmq": {"num_epochs": 1.3, "prune_amount": 0.5},
    "ct": {"num_epochs": 1},
    "kde": {"num_epochs": 1, "retain_num_epochs": 1},
    "rni": {"num_epochs": 3, "fine_num_epochs": 1, "reset_num_epochs": 1},
}
ZERO_LR = {"learning_rate": 0.0}


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _unflat(flat, like):
  return jax.tree.unflatten(jax.tree.structure(like), [flat["/".join(p)] for p in reinit.leaf_paths(like)])


def _flat(tree):
  return {"/".join(p): np.asarray(x) for p, x in zip(reinit.leaf_paths(tree), jax.tree.leaves(tree))}


def _arch_ctx(model_name, size, **model_kw):
  """One untrained `model_name` on 32x32 digits (originals = inits: no training to compile),
  with one batch of 64 retain, 16 forget and 16 val samples."""
  ds = data_lib.load("digits", image_size=32, channels=3)
  model = arch_model(model_name, ds.num_classes, size, **model_kw)
  recipe = train.Recipe(batch_size=64, augment="flip", mean=(0.3054,), std=(0.3760,))
  inits = train.init_variables(model, jax.random.split(jax.random.key(0), 1), ds.inputs.shape[1:])
  perm = np.random.default_rng(0).permutation(len(ds.labels))
  return methods_lib.Context.create(model, recipe, train.DeviceData.create(ds), inits, inits,
                                perm[:64], perm[64:80], perm[80:96], model_ids=(0,),
                                num_classes=ds.num_classes, strategy="loop")


@pytest.fixture(scope="module", params=ARCH_SIZES)
def resnet_ctx(request):
  return _arch_ctx("resnet18", request.param)


@pytest.fixture(scope="module", params=ARCH_SIZES)
def vit_ctx(request):
  return _arch_ctx("tinyvit_11m", request.param, img_size=32)


# ---------------------------------------------------------------------------------------------
# Registry, defaults, search spaces
# ---------------------------------------------------------------------------------------------

LR, WD, MOM = (1e-5, 1e-1, True, None), (1e-5, 1e-1, True, None), (0.9, 0.9, False, None)
BATCH, EPOCHS = (None, None, None, (64, 128, 256)), (1, 7, False, None)
COMMON5 = {"learning_rate": LR, "momentum": MOM, "weight_decay": WD, "batch_size": BATCH,
           "num_epochs": EPOCHS}
UNIT = (0.0, 1.0, False, None)
SPACES = {  # deepunlearn-spec 4.14-4.20 with E_max = 7: (low, high, log, choices)
    "fcs": {"retain_learning_rate": LR, "retain_momentum": MOM, "retain_weight_decay": WD,
            "forget_learning_rate": LR, "forget_momentum": MOM, "forget_weight_decay": WD,
            "temperature": (0.0, 5.0, False, None), "eta_min": (1e-6, 1e-1, True, None),
            **COMMON5},
    "msg": {"init_rate": UNIT, **COMMON5},
    "cfw": {"start_confuser_std": UNIT, "final_confuser_std": UNIT, **COMMON5},
    "prmq": {"prune_amount": UNIT, "learning_rate": LR, "momentum": MOM, "weight_decay": WD,
             "batch_size": BATCH, "num_epochs": (1.0, 7.0, False, None)},
    "ct": COMMON5,
    "kde": {"temperature": (0.0, 5.0, False, None), "retain_num_epochs": EPOCHS,
            "retain_learning_rate": LR, "retain_momentum": MOM, "retain_weight_decay": WD,
            **COMMON5},
    "rni": {"fine_num_epochs": EPOCHS, "fine_learning_rate": LR, "fine_momentum": MOM,
            "fine_weight_decay": WD, "reset_num_epochs": EPOCHS, "noise_ratio": UNIT,
            "origin_noise": UNIT, **COMMON5},
}
DEFAULTS = {
    "fcs": dict(num_epochs=8, batch_size=256, temperature=1.15, eta_min=1e-6, learning_rate=5e-3,
                momentum=0.9, weight_decay=0.0, retain_learning_rate=1e-3, retain_momentum=0.9,
                retain_weight_decay=1e-2, forget_learning_rate=3e-4, forget_momentum=0.9,
                forget_weight_decay=0.0),
    "msg": dict(num_epochs=5, batch_size=64, init_rate=0.3, learning_rate=1e-3, momentum=0.9,
                weight_decay=5e-4),
    "cfw": dict(num_epochs=4, batch_size=64, learning_rate=7e-4, momentum=0.9, weight_decay=5e-4,
                start_confuser_std=0.6, final_confuser_std=0.005, class_weight=0.05),
    "prmq": dict(num_epochs=3.2, batch_size=64, learning_rate=5e-4, momentum=0.9,
                 weight_decay=5e-4, prune_amount=0.99),
    "ct": dict(num_epochs=3, batch_size=64, learning_rate=1e-3, momentum=0.9, weight_decay=5e-4),
    "kde": dict(num_epochs=3, retain_num_epochs=3, batch_size=64, temperature=5.0,
                learning_rate=9e-4, momentum=0.9, weight_decay=5e-4, retain_learning_rate=1e-3,
                retain_momentum=0.9, retain_weight_decay=5e-4, faithful=False),
    "rni": dict(num_epochs=9, fine_num_epochs=4, reset_num_epochs=1, batch_size=64,
                learning_rate=2e-4, momentum=0.9, weight_decay=5e-4,
                fine_learning_rate=[2e-4, 2e-4, 2e-4, 1e-3, 1e-3, 1e-4], fine_momentum=0.9,
                fine_weight_decay=5e-4, noise_ratio=0.7, origin_noise=0.04, faithful=False),
}


@pytest.mark.parametrize("name", KAGGLE)
def test_search_space_defaults_and_alias(name):
  method = methods_lib.get(name)
  assert methods_lib.get(f"kgltop{KAGGLE.index(name) + 1}") is method
  assert dict(method.defaults) == DEFAULTS[name]
  got, trial = search_space_table(method, e_max=7)
  assert got == SPACES[name]
  assert isinstance(trial.distributions["num_epochs"], optuna.distributions.FloatDistribution) == (
      name == "prmq")


# ---------------------------------------------------------------------------------------------
# Every method on the tiny stack
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KAGGLE)
def test_runs_on_tiny_stack(tiny_ctx, name):
  out = methods_lib.get(name).run(tiny_ctx, TINY_HP[name], jax.random.key(0)).states
  assert jax.tree.structure(out) == jax.tree.structure(tiny_ctx.originals)
  for leaf, orig in zip(jax.tree.leaves(out), jax.tree.leaves(tiny_ctx.originals)):
    assert leaf.shape == orig.shape and np.isfinite(np.asarray(leaf)).all()
  for m in range(2):  # every model's weights moved
    assert not np.allclose(out["params"]["fc"]["kernel"][m], tiny_ctx.originals["params"]["fc"]["kernel"][m])


# ---------------------------------------------------------------------------------------------
# FCS
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_lr,eta_min", [(3e-4, 1e-6), (1e-3, 1e-2)])
def test_fcs_forget_lr_is_torch_cosine_annealing_stepped_per_batch(base_lr, eta_min):
  t_max = 12  # len(forget_loader) * num_epochs
  lr, torch_lrs = base_lr, [base_lr]  # torch's chainable CosineAnnealingLR.get_lr recursion
  for t in range(1, t_max + 1):
    if (t - 1 - t_max) % (2 * t_max) == 0:
      lr = lr + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
    else:
      lr = ((1 + math.cos(math.pi * t / t_max)) / (1 + math.cos(math.pi * (t - 1) / t_max))
            * (lr - eta_min) + eta_min)
    torch_lrs.append(lr)
  ours = [float(fcs.fcs_forget_lr(base_lr, eta_min, t, t_max)) for t in range(t_max + 1)]
  np.testing.assert_allclose(ours, torch_lrs, rtol=1e-5)
  assert ours[-1] == pytest.approx(eta_min, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# MSG
# ---------------------------------------------------------------------------------------------


def test_msg_triangle_factors():
  assert [reinit.msg_triangle(5)(e) for e in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
  assert [reinit.msg_triangle(1)(e) for e in range(1)] == [1.0]
  assert [reinit.msg_triangle(2)(e) for e in range(2)] == [1.0, 0.5]


def test_msg_reinit_smallest_gradients_and_grad_mask():
  rng = np.random.default_rng(0)
  params = {"stem_conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
            "big": {"kernel": rng.normal(size=(3, 3, 64, 128)).astype(np.float32)},
            "fc": {"kernel": rng.normal(size=(8, 5)).astype(np.float32),
                   "bias": rng.normal(size=(5,)).astype(np.float32)}}
  grads = jax.tree.map(lambda x: rng.permutation(x.size).reshape(x.shape).astype(np.float32)
                       * rng.choice([-1, 1], x.shape), params)  # distinct |g|
  rate = 0.3
  counts = reinit.msg_counts(params, rate)
  new, scale = jax.jit(reinit.msg_reinit)(params, grads, counts, jax.random.key(1))
  paths = reinit.leaf_paths(params)
  for path, p, g, q, s in zip(paths, *map(jax.tree.leaves, (params, grads, new, scale))):
    q, s = np.asarray(q), np.asarray(s)
    if path[0] == "fc":  # linear layers untouched, gradient unscaled
      np.testing.assert_array_equal(q, p)
      assert np.all(s == 1.0)
      continue
    n = round(rate * p.size)
    smallest = np.zeros(p.size, bool)
    smallest[np.argsort(np.abs(g).reshape(-1))[:n]] = True
    smallest = smallest.reshape(p.shape)
    np.testing.assert_array_equal(q != p, smallest)  # exactly the n smallest-|g| entries redrawn
    np.testing.assert_array_equal(s, np.where(smallest, 1.0, 0.1).astype(np.float32))
    if path[0] == "big":  # kaiming_normal(fan_out, relu): std sqrt(2 / (out * kh * kw))
      assert q[smallest].std() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.03)
  # The mask scales the gradient of one SGD step (no momentum/decay): 1.0 redrawn, 0.1 elsewhere.
  opt = base.init_opt("sgd", new)
  stepped, _ = base.sgd_update("sgd", new, opt, grads, 0.5, 0.0, 0.0, grad_scale=scale)
  delta = np.asarray(stepped["big"]["kernel"]) - np.asarray(new["big"]["kernel"])
  expected = -0.5 * grads["big"]["kernel"] * np.asarray(scale["big"]["kernel"])
  np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-3)


def test_msg_probe_is_retain_grad_minus_forget_grad(tiny_ctx):
  ctx = dataclasses.replace(tiny_ctx, forget=tiny_ctx.forget[:, :50])  # one batch per pass
  subset = np.stack([tiny_ctx.retain[0][:50], tiny_ctx.retain[1][:50]])
  grads, _ = reinit.msg_probe(ctx, jnp.asarray(subset), 64, jax.random.key(0))
  images, labels = ctx.data.inputs, ctx.data.labels
  for m in range(2):
    variables = jax.tree.map(lambda x: x[m], ctx.originals)

    def ce(params, idx):  # train-mode BN, mean CE over the batch
      x, y, valid = base.inputs(ctx.recipe, images, labels, jnp.asarray(idx))
      logits, _ = base.forward(ctx.model, ctx.recipe, params, variables["batch_stats"], x, valid,
                             training=True)
      return base.masked_mean(base.cross_entropy(logits, y), valid)

    expect = jax.tree.map(lambda a, b: a - b, jax.grad(ce)(variables["params"], subset[m]),
                          jax.grad(ce)(variables["params"], ctx.forget[m]))
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[m], grads)), jax.tree.leaves(expect)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_msg_end_to_end_redraws_round_rate_entries_per_model(tiny_ctx):
  rate = [0.3, 0.55]
  out = methods_lib.get("msg").run(tiny_ctx, {"num_epochs": 1, "init_rate": rate, **ZERO_LR},
                               jax.random.key(2)).states
  new, old = _flat(out["params"]), _flat(tiny_ctx.originals["params"])
  for name in new:
    for m in range(2):
      changed = int((new[name][m] != old[name][m]).sum())
      expect = round(rate[m] * old[name][m].size) if old[name].ndim == 5 else 0
      assert changed == expect, (name, m)


# ---------------------------------------------------------------------------------------------
# CFW
# ---------------------------------------------------------------------------------------------


def test_cfw_class_weights_are_sklearn_balanced(tiny_ctx):
  labels = np.asarray(tiny_ctx.data.labels)
  for m in range(2):
    idx = tiny_ctx.retain[m][tiny_ctx.retain[m] >= 0]
    y = labels[idx]
    ours = np.asarray(perturb.balanced_class_weights(tiny_ctx.num_classes, jnp.asarray(tiny_ctx.retain[m]),
                                                    tiny_ctx.data.labels))
    np.testing.assert_allclose(ours[np.unique(y)], compute_class_weight("balanced", classes=np.unique(y), y=y),
                               rtol=1e-5)


def test_cfw_confuser_touches_only_the_stem_conv_with_its_std(resnet_ctx):
  std = 0.3
  out = methods_lib.get("cfw").run(resnet_ctx, {"num_epochs": 1, "start_confuser_std": std, **ZERO_LR},
                               jax.random.key(3)).states
  new, old = _flat(out["params"]), _flat(resnet_ctx.originals["params"])
  changed = {name for name in new if not np.array_equal(new[name], old[name])}
  assert changed == {"stem_conv/kernel"}
  diff = new["stem_conv/kernel"] - old["stem_conv/kernel"]
  assert diff.std() == pytest.approx(std, rel=0.05) and abs(diff.mean()) < 0.02


@pytest.mark.slow  # the mini variant too: compiles too long for `make test`
def test_cfw_confuser_is_a_noop_on_tinyvit(vit_ctx):
  params = jax.tree.map(lambda x: x[0], vit_ctx.originals["params"])
  same = perturb.confuse(params, 0.6, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# PRMQ
# ---------------------------------------------------------------------------------------------


def test_prmq_prunes_the_global_fraction_then_redraws_kernels(tiny_ctx):
  params = _np(jax.tree.map(lambda x: x[0], tiny_ctx.originals["params"]))
  prunable = {"stem_conv/kernel", "layer1_0/conv/kernel", "fc/kernel", "fc/bias"}
  assert {"/".join(p) for p in reinit.prunable_paths(params)} == prunable
  amount = 0.7
  pool = np.concatenate([np.abs(v).ravel() for k, v in _flat(params).items() if k in prunable])
  k = round(amount * pool.size)
  count = reinit.prune_count(params, amount)
  assert count == k
  pruned = _flat(jax.jit(reinit.prmq_prune)(params, count))
  zeros = sum(int((pruned[name] == 0).sum()) for name in prunable)
  assert zeros == k
  threshold = np.sort(pool)[k - 1]  # NumPy global L1 threshold
  for name, orig in _flat(params).items():
    if name in prunable:
      np.testing.assert_array_equal(pruned[name] == 0, np.abs(orig) <= threshold)
      np.testing.assert_array_equal(pruned[name][pruned[name] != 0], orig[pruned[name] != 0])
    else:
      np.testing.assert_array_equal(pruned[name], orig)
  redrawn = _flat(jax.jit(reinit.prmq_reinit)(
      jax.tree.map(jnp.asarray, _unflat(pruned, params)), jax.random.key(0)))
  for name in prunable:
    was_zero = pruned[name] == 0
    if name.endswith("bias"):
      np.testing.assert_array_equal(redrawn[name], pruned[name])  # biases stay 0
      continue
    fan_in = np.prod(pruned[name].shape[:-1])
    assert np.all(redrawn[name][was_zero] != 0)
    assert np.abs(redrawn[name][was_zero]).max() <= 1 / math.sqrt(fan_in)
    np.testing.assert_array_equal(redrawn[name][~was_zero], pruned[name][~was_zero])


def test_prmq_step_budget_crosses_epochs_and_fp16_round_trip(tiny_ctx):
  # int(len(retain_loader) * num_epochs) + 1 per model: 600 -> 10 batches, 560 -> 9 batches.
  np.testing.assert_array_equal(reinit.prmq_steps(tiny_ctx, 64, 1.3),
                                [int(10 * 1.3) + 1, int(9 * 1.3) + 1])
  x = {"a": jnp.asarray([1.0 + 2 ** -13, 3.14159265]), "n": jnp.asarray([3], jnp.int32)}
  out = reinit.fp16_round_trip(x)
  np.testing.assert_array_equal(out["a"], np.asarray(x["a"]).astype(np.float16).astype(np.float32))
  assert out["n"].dtype == jnp.int32


# ---------------------------------------------------------------------------------------------
# CT
# ---------------------------------------------------------------------------------------------


def _ct_check(ctx):
  ct = methods_lib.get("ct")
  frozen = ct.run(ctx, {"num_epochs": 1, **ZERO_LR}, jax.random.key(4)).states
  new, old = _flat(frozen["params"]), _flat(ctx.originals["params"])
  transposed = 0
  for name, orig in old.items():
    if orig.ndim == 5:  # [N, kh, kw, in, out]: spatial axes swapped
      np.testing.assert_array_equal(new[name], np.swapaxes(orig, 1, 2))
      transposed += orig.shape[1] > 1
    else:
      np.testing.assert_array_equal(new[name], orig)
  assert transposed > 0
  trained = _flat(ct.run(ctx, {"num_epochs": 1}, jax.random.key(4)).states["params"])
  assert all(np.isfinite(v).all() for v in trained.values())
  assert sum(not np.array_equal(trained[k], new[k]) for k in new) > len(new) // 2  # it trains


def test_ct_transposes_every_conv_kernel_then_trains(tiny_ctx):
  _ct_check(tiny_ctx)


def test_ct_on_resnet18(resnet_ctx):
  _ct_check(resnet_ctx)


# ---------------------------------------------------------------------------------------------
# KDE
# ---------------------------------------------------------------------------------------------


def test_kde_resets_exactly_stem_conv_and_head(resnet_ctx):
  hp = {"num_epochs": 1, "retain_num_epochs": 1, **ZERO_LR, "retain_learning_rate": 0.0}
  out = methods_lib.get("kde").run(resnet_ctx, hp, jax.random.key(5)).states
  new, old = _flat(out["params"]), _flat(resnet_ctx.originals["params"])
  changed = {name for name in new if not np.array_equal(new[name], old[name])}
  assert changed == {"stem_conv/kernel", "fc/kernel", "fc/bias"}
  for name, fan_in in (("stem_conv/kernel", 7 * 7 * 3), ("fc/kernel", 512), ("fc/bias", 512)):
    bound = 1 / math.sqrt(fan_in)  # PyTorch reset_parameters: U(+-1/sqrt(fan_in))
    assert np.abs(new[name]).max() <= bound
    if new[name].size > 1000:  # uniform: std bound / sqrt(3)
      assert new[name].std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
  assert reinit.kde_reset_modules({"patch_embed": {}, "head": {}}) == ("head",)  # TinyViT


def test_kde_warmup_data_source_faithful_val_or_retain(tiny_ctx):
  no_val = dataclasses.replace(tiny_ctx, val=np.full_like(tiny_ctx.val, -1))
  kde = methods_lib.get("kde")
  frozen = {"num_epochs": 1, "retain_num_epochs": 1, "retain_learning_rate": 0.0}
  reset = kde.run(no_val, {**frozen, **ZERO_LR}, jax.random.key(6)).states["params"]
  faithful = kde.run(no_val, {**frozen, "learning_rate": 0.1, "faithful": True},
                     jax.random.key(6)).states["params"]
  intended = kde.run(no_val, {**frozen, "learning_rate": 0.1}, jax.random.key(6)).states["params"]
  for a, b in zip(jax.tree.leaves(faithful), jax.tree.leaves(reset)):
    np.testing.assert_array_equal(a, b)  # faithful: warm-up on the (empty) validation set
  assert not np.array_equal(intended["fc"]["kernel"], reset["fc"]["kernel"])  # retain warm-up


# ---------------------------------------------------------------------------------------------
# RNI
# ---------------------------------------------------------------------------------------------


def _resnet_tree():
  model = models.get("resnet18", 10)
  return jax.eval_shape(lambda: models.init(model, jax.random.key(0), (32, 32, 3)))


@pytest.mark.parametrize("faithful,num_bn", [(False, 40), (True, 34)])
def test_rni_selection_rules_per_model(faithful, num_bn):
  variables = _resnet_tree()
  paths = ["/".join(p) for p in reinit.leaf_paths(variables["params"])]
  bn = np.array(reinit.rni_bn_flags(variables, faithful))
  assert len(paths) == 62 and bn.sum() == num_bn
  expected_bn = {p for p in paths if "bn" in p or (not faithful and "downsample_1" in p)}
  assert {p for p, f in zip(paths, bn) if f} == expected_bn
  params = jax.tree.map(lambda _: jnp.zeros(()), variables["params"])
  stack = base.stacked(params, 2)
  keys = jax.random.split(jax.random.key(7), 2)
  already = jnp.zeros((2, 62), bool).at[0, np.flatnonzero(~bn)[:10]].set(True)
  select = jax.vmap(lambda p, a, c, s, k: reinit.rni_select(tuple(bn), False, True, p, a, c, s, k))
  noisy, selected, now = select(stack, already, jnp.asarray([6, 6]), jnp.asarray([0.04, 0.04]), keys)
  selected, noise = np.asarray(selected), np.stack(
      [np.asarray(x) != 0 for x in jax.tree.leaves(noisy)], axis=1)
  for m in range(2):
    assert selected[m][bn].all() and selected[m][~bn].sum() == 9  # 9 non-bn + every bn key
    assert not (noise[m] & ~selected[m]).any() and not noise[m][bn].any()
    assert not (noise[m] & np.asarray(already[m])).any()  # only never-selected keys get noise
    np.testing.assert_array_equal(np.asarray(now[m]), np.asarray(already[m]) | selected[m])
  assert noise[1].sum() == 6  # int(0.7 * 9) noisy keys when none was selected before
  assert not np.array_equal(selected[0], selected[1])  # per-model draws
  _, fine, _ = jax.vmap(lambda p, a, c, s, k: reinit.rni_select(tuple(bn), True, False, p, a, c, s, k))(
      stack, already, jnp.asarray([6, 6]), jnp.asarray([0.04, 0.04]), keys)
  assert np.asarray(fine).all()


def test_rni_fine_lr_schedule():
  sched = [2e-4, 2e-4, 2e-4, 1e-3, 1e-3, 1e-4]
  np.testing.assert_allclose(reinit.rni_fine_lr(sched, 3, 2), [1e-3, 1e-3])
  np.testing.assert_allclose(reinit.rni_fine_lr(0.01, 7, 2), [0.01, 0.01])
  np.testing.assert_allclose(reinit.rni_fine_lr([[0.1], [0.2]], 2, 2), [0.1, 0.2])
  with pytest.raises(ValueError, match="deepunlearn-spec 4.20"):
    reinit.rni_fine_lr(sched, 6, 2)


def test_rni_stack_equals_each_model_alone(tiny_ctx):
  hp = TINY_HP["rni"]
  rni = methods_lib.get("rni")
  stacked = rni.run(tiny_ctx, hp, jax.random.key(0)).states
  for m in range(2):
    alone = dataclasses.replace(
        tiny_ctx, originals=jax.tree.map(lambda x: x[m:m + 1], tiny_ctx.originals),
        retain=tiny_ctx.retain[m:m + 1], forget=tiny_ctx.forget[m:m + 1],
        val=tiny_ctx.val[m:m + 1], model_ids=(m,))
    single = rni.run(alone, hp, jax.random.key(0)).states
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[m:m + 1], stacked)), jax.tree.leaves(single)):
      np.testing.assert_allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Architectures: a step on ResNet-18 and TinyViT at 32x32
# ---------------------------------------------------------------------------------------------

ONE_STEP = {"msg": {"num_epochs": 1}, "prmq": {"num_epochs": 1.0},
            "rni": {"num_epochs": 2, "fine_num_epochs": 1, "reset_num_epochs": 0}}


def _runs(ctx, name):
  out = methods_lib.get(name).run(ctx, ONE_STEP[name], jax.random.key(8)).states
  assert jax.tree.structure(out) == jax.tree.structure(ctx.originals)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))
  return out


@pytest.mark.slow  # the mini variant too: compiles too long for `make test`
@pytest.mark.parametrize("name", ["msg", "prmq", "rni"])
def test_runs_on_resnet18(resnet_ctx, name):
  _runs(resnet_ctx, name)


@pytest.mark.slow  # the mini variant too: compiles too long for `make test`
def test_ct_and_msg_on_tinyvit(vit_ctx):
  _ct_check(vit_ctx)
  _runs(vit_ctx, "msg")
