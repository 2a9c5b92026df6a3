"""Models: parameter counts, shapes, torch semantics (padding, BN, GELU, LN), initialisers,
TinyViT window attention against a NumPy reference, parameter-group helpers."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jaxmu import models
from jaxmu.models import resnet, tinyvit

IMG = (32, 32, 3)


def shapes_of(model, input_shape):
  return jax.eval_shape(lambda k: models.init(model, k, input_shape), jax.random.key(0))


def at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def init_leaf(model, input_shape, *path):
  """One initialised leaf; jit drops the other initialisers, so this is cheap."""
  return np.asarray(jax.jit(lambda k: at(models.init(model, k, input_shape)["params"], path))(jax.random.key(0)))


def gelu_erf(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


@pytest.fixture(scope="module")
def r18():
  model = models.get("resnet18", 10)
  return model, models.init(model, jax.random.key(0), IMG)


@pytest.fixture(scope="module")
def vit():
  model = models.get("tinyvit_11m", 10, img_size=32)
  return model, models.init(model, jax.random.key(0), IMG)


# ---------------------------------------------------------------- registry, counts, shapes

def test_registry():
  assert models.NAMES == ("resnet18", "resnet34", "resnet50", "tinyvit_11m", "small_cnn", "purchase_mlp",
                          "airbench94", "vgg11", "vgg16", "densenet121")
  with pytest.raises(ValueError, match="resnet18.*purchase_mlp"):
    models.get("vgg19", 10)
  with pytest.raises(ValueError, match="stem"):
    models.get("resnet18", 10, stem="tiny")
  with pytest.raises(ValueError, match="init"):
    models.get("resnet18", 10, init="xavier")
  with pytest.raises(ValueError, match="img_size"):
    models.get("tinyvit_11m", 10, img_size=48)


@pytest.mark.parametrize("name, kw, classes, expected", [
    ("resnet18", {}, 10, 11_181_642), ("resnet18", {}, 100, 11_227_812),
    ("resnet18", {"stem": "cifar"}, 10, 11_173_962), ("resnet18", {"stem": "cifar"}, 100, 11_220_132),
    ("tinyvit_11m", {"img_size": 32}, 10, 10_552_462), ("tinyvit_11m", {"img_size": 224}, 100, 10_592_872),
    ("purchase_mlp", {}, 100, 1_317_348),
  # torchvision's published 1000-class counts minus the classifier difference
    ("resnet34", {}, 10, 21_797_672 - 513_000 + 5_130), ("resnet50", {}, 10, 25_557_032 - 2_049_000 + 20_490),
])
def test_param_counts(name, kw, classes, expected):
  shape = (600,) if name == "purchase_mlp" else (kw.get("img_size", 32),) * 2 + (3,)
  assert models.count_params(shapes_of(models.get(name, classes, **kw), shape)["params"]) == expected


@pytest.mark.parametrize("name, kw, shape", [
    ("resnet18", {}, IMG), ("resnet18", {"stem": "cifar"}, IMG), ("resnet34", {}, IMG),
    ("resnet50", {"stem": "cifar"}, IMG), ("resnet50", {}, IMG), ("tinyvit_11m", {"img_size": 32}, IMG),
    ("small_cnn", {}, IMG), ("small_cnn", {}, (8, 8, 1)), ("purchase_mlp", {}, (600,)),
])
def test_output_shapes(name, kw, shape):
  model = models.get(name, 7, **kw)
  variables = shapes_of(model, shape)
  x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
  assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x).shape == (3, 7)
  if "batch_stats" in variables:
    out, new = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={"droppath": jax.random.key(0)},
                                                       mutable=["batch_stats"]), variables, x)
    assert out.shape == (3, 7)
    assert jax.tree.structure(new["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  else:
    assert set(variables) == {"params"}


def test_resnet_spatial_sizes_match_torch_for_odd_inputs():
  model = models.get("resnet18", 10)
  variables = shapes_of(model, IMG)
  def torch_out(h, k, s, p):
    return (h + 2 * p - k) // s + 1
  for size in (33, 35, 37):
    _, inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"]),
        variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    inter = inter["intermediates"]
    h = torch_out(size, 7, 2, 3)
    assert inter["stem_conv"]["__call__"][0].shape[1] == h
    h = torch_out(h, 3, 2, 1)  # max-pool
    assert inter["layer1_1"]["__call__"][0].shape[1] == h
    for layer in (2, 3, 4):
      h = torch_out(h, 3, 2, 1)
      assert inter[f"layer{layer}_1"]["__call__"][0].shape[1] == h


# ---------------------------------------------------------------- torch semantics, numerically

def test_resnet_stem_padding_bn_eps_and_momentum(r18):
  model, variables = r18
  x = jax.random.normal(jax.random.key(1), (4, *IMG))  # even size: "SAME" would pad (2, 3)
  kernel = variables["params"]["stem_conv"]["kernel"]
  dn = ("NHWC", "HWIO", "NHWC")
  expected = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=dn)
  same = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=dn)
  assert expected.shape == same.shape and not np.allclose(expected, same, atol=1e-3)

  # eval mode: running statistics, eps 1e-5 (tiny running variances make eps visible)
  stats = jax.tree.map(lambda a: a, variables["batch_stats"])
  mean = jax.random.normal(jax.random.key(2), (64,))
  var = jnp.full((64,), 2e-5)
  stats["stem_bn"] = {"mean": mean, "var": var}
  _, inter = model.apply({**variables, "batch_stats": stats}, x, train=False,
                         capture_intermediates=True, mutable=["intermediates"])
  inter = inter["intermediates"]
  np.testing.assert_allclose(inter["stem_conv"]["__call__"][0], expected, atol=1e-5)
  bn = inter["stem_bn"]["__call__"][0]
  np.testing.assert_allclose(bn, (expected - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-3)

  # train mode: batch statistics; running mean 0.9 old + 0.1 batch mean, running var with the
  # biased batch variance (Flax; PyTorch would use the unbiased one: a documented deviation)
  _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
  batch_mean, batch_var = np.mean(expected, (0, 1, 2)), np.var(expected, (0, 1, 2))
  np.testing.assert_allclose(new["batch_stats"]["stem_bn"]["mean"], 0.1 * batch_mean, atol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["stem_bn"]["var"], 0.9 + 0.1 * batch_var, rtol=1e-5)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], new["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_layer_norm_eps_and_gelu_flavour():
  x = 1e-3 * jax.random.normal(jax.random.key(0), (4, 16))  # variance ~1e-6, comparable to eps
  ln = tinyvit.layer_norm("ln")
  out = ln.apply(ln.init(jax.random.key(0), x), x)
  xn = np.asarray(x, np.float64)
  ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  z = np.linspace(-4, 4, 81, dtype=np.float32)
  np.testing.assert_allclose(tinyvit.gelu(z), gelu_erf(z), atol=1e-6)
  assert np.abs(jax.nn.gelu(z, approximate=True) - gelu_erf(z)).max() > 1e-4


def test_tinyvit_forward_gelu_and_224(vit):
  model, variables = vit
  x = jax.random.normal(jax.random.key(1), (2, *IMG))
  out, inter = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                                mutable=["intermediates"]))(variables, x)
  assert out.shape == (2, 10) and np.isfinite(out).all()
  inter = inter["intermediates"]
  # MBConv's last BN has gamma 0 at init, so the first MBConv returns GELU(its input) exactly
  embed = np.asarray(inter["patch_embed"]["__call__"][0], np.float64)
  assert embed.shape == (2, 8, 8, 64)
  np.testing.assert_allclose(inter["stage0_block0"]["__call__"][0], gelu_erf(embed), atol=1e-5)
  assert inter["stage2_block0"]["__call__"][0].shape == (2, 2, 2, 256)
  # the parameter shapes do not depend on img_size: the same variables run at 224 px
  big = models.get("tinyvit_11m", 10, img_size=224)
  assert jax.jit(lambda v, x: big.apply(v, x, train=False))(variables, jnp.ones((1, 224, 224, 3))).shape == (1, 10)
  with pytest.raises(ValueError, match="img_size=224"):
    big.apply(variables, x, train=False)


def test_tinyvit_droppath_only_in_train_mode(vit):
  model, variables = vit
  x = jax.random.normal(jax.random.key(1), (4, *IMG))
  train = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={"droppath": k}, mutable=["batch_stats"]))
  a, stats = train(variables, x, jax.random.key(5))
  b, _ = train(variables, x, jax.random.key(5))
  c, _ = train(variables, x, jax.random.key(6))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c, atol=1e-4)
  assert jax.tree.structure(stats["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  with pytest.raises(Exception, match="droppath"):
    model.apply(variables, x, train=True, mutable=["batch_stats"])
  # without stochastic depth, train mode needs no rng
  plain = models.get("tinyvit_11m", 10, img_size=32, drop_path_rate=0.0)
  out, _ = jax.eval_shape(lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert out.shape == (4, 10)


def _numpy_tinyvit_block(x, p, heads, window):
  """The reference TinyViTBlock (eval mode, fresh BN stats) in float64 NumPy, written from
  tiny_vit.py: zero-pad, partition, unmasked attention with the offset-table bias, reverse, crop,
  residual, depthwise local conv + BN, residual MLP."""
  x = np.asarray(x, np.float64)[0]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  h, w, c = x.shape
  hd = c // heads

  def ln(t, q):
    return (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5) * q["scale"] + q["bias"]

  points = list(itertools.product(range(window), range(window)))
  offsets, idxs = {}, []
  for p1 in points:
    for p2 in points:
      off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
      idxs.append(offsets.setdefault(off, len(offsets)))
  idxs = np.array(idxs).reshape(len(points), len(points))

  a = p["attn"]
  ph, pw = -(-h // window) * window, -(-w // window) * window
  padded = np.zeros((ph, pw, c))
  padded[:h, :w] = x
  attended = np.zeros_like(padded)
  for r0 in range(0, ph, window):
    for c0 in range(0, pw, window):
      t = padded[r0:r0 + window, c0:c0 + window].reshape(window * window, c)
      qkv = ln(t, a["norm"]) @ a["qkv"]["kernel"] + a["qkv"]["bias"]
      out = np.zeros((len(t), c))
      for i in range(heads):
        q, k, v = (qkv[:, i * 3 * hd + j * hd: i * 3 * hd + (j + 1) * hd] for j in range(3))
        logits = q @ k.T * hd ** -0.5 + a["attention_biases"][i][idxs]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        out[:, i * hd:(i + 1) * hd] = (e / e.sum(-1, keepdims=True)) @ v
      out = out @ a["proj"]["kernel"] + a["proj"]["bias"]
      attended[r0:r0 + window, c0:c0 + window] = out.reshape(window, window, c)
  x = x + attended[:h, :w]
  k = p["local_conv"]["c"]["kernel"][:, :, 0, :]
  xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  conv = sum(xp[i:i + h, j:j + w] * k[i, j] for i in range(3) for j in range(3))
  bn = p["local_conv"]["bn"]
  x = conv / np.sqrt(1 + 1e-5) * bn["scale"] + bn["bias"]
  m = p["mlp"]
  hidden = gelu_erf(ln(x, m["norm"]) @ m["fc1"]["kernel"] + m["fc1"]["bias"])
  return x + hidden @ m["fc2"]["kernel"] + m["fc2"]["bias"]


@pytest.mark.parametrize("grid, dim, heads, window", [(2, 32, 4, 14), (9, 16, 2, 7)])
def test_tinyvit_block_padded_windows_without_mask(grid, dim, heads, window):
  """At 32 px stage 2 is a 2x2 grid in one zero-padded 14x14 window; a 9x9 grid gives 4 windows."""
  block = tinyvit.TinyViTBlock(dim, heads, window, 0.1)
  x = jax.random.normal(jax.random.key(0), (1, grid, grid, dim))
  variables = jax.jit(lambda k, x: block.init(k, x, train=False))(jax.random.key(1), x)
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = treedef.unflatten([0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  out = jax.jit(lambda v, x: block.apply(v, x, train=False))({**variables, "params": params}, x)
  np.testing.assert_allclose(out[0], _numpy_tinyvit_block(x, params, heads, window), rtol=1e-4, atol=1e-4)
  if grid == 2:  # padding tokens matter: a masked (4-token) attention gives another answer
    unpadded = tinyvit.TinyViTBlock(dim, heads, 2, 0.1)
    p2 = jax.tree.map(lambda a: a, params)
    p2["attn"]["attention_biases"] = params["attn"]["attention_biases"][:, :4]
    masked = jax.jit(lambda v, x: unpadded.apply(v, x, train=False))({**variables, "params": p2}, x)
    assert not np.allclose(out, masked, atol=1e-3)


# ---------------------------------------------------------------- initialisers

def assert_uniform(w, bound):
  assert np.abs(w).max() <= bound
  assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05


def assert_normal(w, std):
  assert abs(w.std() / std - 1) < 0.05 and abs(w.mean()) < 0.05 * std
  assert np.abs(w).max() > 3 * std  # not truncated at 2 std (flax's truncated_normal would be)


def test_resnet_initialisers():
  tv = models.get("resnet18", 100)
  assert_normal(init_leaf(tv, IMG, "stem_conv", "kernel"), math.sqrt(2 / (64 * 49)))
  assert_normal(init_leaf(tv, IMG, "layer4_1", "conv2", "kernel"), math.sqrt(2 / (512 * 9)))
  assert_uniform(init_leaf(tv, IMG, "fc", "kernel"), 1 / math.sqrt(512))
  bias = init_leaf(tv, IMG, "fc", "bias")
  assert np.abs(bias).max() <= 1 / math.sqrt(512) and np.unique(bias).size == 100
  cifar = models.get("resnet18", 10, stem="cifar")
  assert_uniform(init_leaf(cifar, IMG, "layer4_1", "conv2", "kernel"), 1 / math.sqrt(512 * 9))
  assert_uniform(init_leaf(cifar, IMG, "layer2_0", "downsample_0", "kernel"), 1 / math.sqrt(64))
  overridden = models.get("resnet18", 10, stem="cifar", init="torchvision")
  assert_normal(init_leaf(overridden, IMG, "layer4_1", "conv2", "kernel"), math.sqrt(2 / (512 * 9)))
  overridden = models.get("resnet18", 10, init="pytorch_default")
  assert_uniform(init_leaf(overridden, IMG, "layer4_1", "conv2", "kernel"), 1 / math.sqrt(512 * 9))


def test_resnet_batchnorm_init(r18):
  _, variables = r18
  bn_leaves = [(path[-1].key, np.asarray(v)) for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]
               if path[-2].key.startswith(("bn", "stem_bn", "downsample_1"))]
  assert len(bn_leaves) == 20 * 4  # 20 BatchNorms: scale, bias, mean, var
  expected = {"scale": 1, "bias": 0, "mean": 0, "var": 1}
  assert all((v == expected[name]).all() for name, v in bn_leaves)


def test_tinyvit_initialisers(vit):
  _, variables = vit
  p = variables["params"]
  assert_normal(np.asarray(p["stage2_block3"]["attn"]["qkv"]["kernel"]), 0.02)
  assert_normal(np.asarray(p["stage3_block1"]["mlp"]["fc1"]["kernel"]), 0.02)
  assert (np.asarray(p["stage2_block3"]["attn"]["qkv"]["bias"]) == 0).all()
  assert (np.asarray(p["head"]["bias"]) == 0).all()
  assert_uniform(np.asarray(p["patch_embed"]["conv2"]["c"]["kernel"]), 1 / math.sqrt(9 * 32))
  assert_uniform(np.asarray(p["stage0_block0"]["conv1"]["c"]["kernel"]), 1 / math.sqrt(64))
  assert_uniform(np.asarray(p["stage0_block1"]["conv2"]["c"]["kernel"]), 1 / 3)  # depthwise: fan_in 9
  assert (np.asarray(p["stage0_block0"]["conv3"]["bn"]["scale"]) == 0).all()
  assert (np.asarray(p["stage0_block0"]["conv2"]["bn"]["scale"]) == 1).all()
  assert (np.asarray(p["stage2_block0"]["attn"]["attention_biases"]) == 0).all()
  assert p["stage2_block0"]["attn"]["attention_biases"].shape == (8, 196)
  assert p["stage3_block0"]["attn"]["attention_biases"].shape == (14, 49)
  norm = p["norm_head"]
  assert (np.asarray(norm["scale"]) == 1).all() and (np.asarray(norm["bias"]) == 0).all()


def test_small_models():
  mlp = models.get("purchase_mlp", 100)
  variables = models.init(mlp, jax.random.key(0), (600,))
  p = variables["params"]
  assert_uniform(np.asarray(p["stem_dense"]["kernel"]), 1 / math.sqrt(600))
  assert_uniform(np.asarray(p["stem_dense"]["bias"]), 1 / math.sqrt(600))
  assert_uniform(np.asarray(p["layer1_0"]["kernel"]), 1 / math.sqrt(1024))
  x = np.asarray(jax.random.normal(jax.random.key(1), (5, 600)), np.float64)
  h = x
  for name in ("stem_dense", "layer1_0", "layer2_0", "layer3_0"):
    h = np.tanh(h @ p[name]["kernel"] + p[name]["bias"])
  np.testing.assert_allclose(mlp.apply(variables, x.astype(np.float32)), h @ p["fc"]["kernel"] + p["fc"]["bias"],
                             rtol=1e-4, atol=1e-5)

def test_determinism_under_vmap():
  """Same key, same variables and outputs; another key, other variables (init and apply vmapped)."""
  cnn = models.get("small_cnn", 10)
  keys = jnp.stack([jax.random.key(3), jax.random.key(3), jax.random.key(4)])
  stacked = jax.vmap(lambda k: models.init(cnn, k, (8, 8, 1)))(keys)
  a, b, c = (jax.tree.map(lambda l, i=i: l[i], stacked) for i in range(3))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a["params"]["stem_conv"]["kernel"], c["params"]["stem_conv"]["kernel"])
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
  out = jax.jit(jax.vmap(lambda v: cnn.apply(v, x, train=False)))(stacked)
  np.testing.assert_array_equal(out[0], out[1])
  assert not np.allclose(out[0], out[2])


# ---------------------------------------------------------------- parameter groups

def test_resnet_param_groups():
  params = shapes_of(models.get("resnet18", 10), IMG)["params"]
  groups = models.param_groups(params)
  assert [g for g, _ in groups] == ["stem"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + ["head"]
  sizes = {g: sum(math.prod(at(params, p).shape) for p in paths) for g, paths in groups}
  assert sizes["stem"] == 7 * 7 * 3 * 64 + 2 * 64 and sizes["head"] == 512 * 10 + 10
  assert sizes["layer4.0"] == 9 * 256 * 512 + 9 * 512 * 512 + 256 * 512 + 3 * 2 * 512
  assert sum(sizes.values()) == 11_181_642
  assert models.head_path(params) == ("fc",)
  layer4 = {p for g, paths in groups if g.startswith("layer4") for p in paths}
  fc = set(dict(groups)["head"])
  assert models.last_blocks(params, 1) == layer4 | fc
  everything_but_stem = {p for g, paths in groups if g != "stem" for p in paths}
  assert models.last_blocks(params, 4) == models.last_blocks(params, 10) == everything_but_stem
  with pytest.raises(ValueError):
    models.last_blocks(params, 0)
  mask = models.conv_kernel_mask(params)
  assert sum(jax.tree.leaves(mask)) == 20
  assert mask["layer2_0"]["downsample_0"]["kernel"] and not mask["fc"]["kernel"]
  assert not mask["layer2_0"]["downsample_1"]["scale"]
  # RNI's "bn"-substring rule sees 34 of the 62 tensors, as with torchvision's names
  paths = [p for _, ps in groups for p in ps]
  assert len(paths) == 62 and sum("bn" in ".".join(p) for p in paths) == 34


def test_tinyvit_param_groups():
  params = shapes_of(models.get("tinyvit_11m", 10, img_size=32), IMG)["params"]
  groups = dict(models.param_groups(params))
  expected = (["stem", "stage0.block0", "stage0.block1", "stage0.merge", "stage1.block0", "stage1.block1",
               "stage1.merge"] + [f"stage2.block{j}" for j in range(6)] + ["stage2.merge", "stage3.block0",
                                                                              "stage3.block1", "head"])
  assert [g for g, _ in models.param_groups(params)] == expected
  assert {p[0] for p in groups["head"]} == {"norm_head", "head"}
  assert models.head_path(params) == ("head",)
  head = {p for p in groups["head"] if p[0] == "head"}
  stage3 = set(groups["stage3.block0"]) | set(groups["stage3.block1"])
  assert models.last_blocks(params, 1) == stage3 | head
  stages123 = {p for g, ps in groups.items() if g.startswith(("stage1", "stage2", "stage3")) for p in ps}
  assert models.last_blocks(params, 3) == models.last_blocks(params, 9) == stages123 | head
  mask = models.conv_kernel_mask(params)
  assert sum(jax.tree.leaves(mask)) == 2 + 2 * 3 + 3 * 3 + 10
  assert mask["stage1_block0"]["local_conv"]["c"]["kernel"]
  assert not mask["stage1_block0"]["attn"]["qkv"]["kernel"]
  selected = models.paths_mask(params, models.last_blocks(params, 1))
  assert selected["head"]["kernel"] and selected["stage3_block1"]["attn"]["attention_biases"]
  assert not selected["norm_head"]["scale"] and not selected["stage2_merge"]["conv1"]["c"]["kernel"]


def test_conv_kernel_mask_on_stacked_params():
  cnn = models.get("small_cnn", 10)
  keys = jax.random.split(jax.random.key(0), 3)
  stacked = jax.eval_shape(jax.vmap(lambda k: models.init(cnn, k, (8, 8, 1))), keys)
  mask = models.conv_kernel_mask(stacked["params"])
  assert mask["stem_conv"]["kernel"] and mask["layer1_0"]["conv"]["kernel"] and not mask["fc"]["kernel"]
  assert [g for g, _ in models.param_groups(stacked["params"])] == ["stem", "layer1.0", "head"]
