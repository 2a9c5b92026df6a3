"""Fig. 4's architectures (iam-spec 6.1, 7.3): torchvision's VGG-11/16 and DenseNet-121 with a
100-class head: exact torchvision parameter counts, shapes on 32x32 inputs, the adaptive pool
against PyTorch's bin formula in NumPy, dropout's rng and masked BatchNorm (on smaller instances
of the same modules, to keep compiles short)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmu import models
from jaxmu.models import densenet, resnet, vgg

IMG = (32, 32, 3)
# torchvision vgg11 / vgg16 / densenet121 (weights=None) with the head replaced by a 100-class one.
TORCHVISION_COUNTS = {"vgg11": 129_176_036, "vgg16": 134_670_244, "densenet121": 7_056_356}


def abstract(name):
  model = models.get(name, 100)
  return model, jax.eval_shape(lambda k: models.init(model, k, IMG), jax.random.key(0))


def filled(shapes):
  """Variables of these shapes without compiling the initialisers (slow for these depths):
  He-normal kernels, unit BatchNorm scales and running variances, zeros elsewhere."""
  rng = np.random.default_rng(0)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      std = np.float32(np.sqrt(2 / np.prod(s.shape[:-1])))
      return rng.standard_normal(s.shape, np.float32) * std
    return np.full(s.shape, name in ("scale", "var"), np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.mark.parametrize("name", TORCHVISION_COUNTS)
def test_parameter_counts_and_shapes(name):
  model, variables = abstract(name)
  assert models.count_params(variables["params"]) == TORCHVISION_COUNTS[name]
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jnp.zeros((2, *IMG)))
  assert out.shape == (2, 100)
  # The rest of jaxmu reads blocks and the head off the tree.
  params = variables["params"]
  assert models.head_path(params) == ("fc",)
  last = {path[0] for path in models.last_blocks(params, 1)}
  assert "fc" in last and ("layer5_0" in last if name.startswith("vgg") else "layer4_15" in last)
  assert ("batch_stats" in variables) == (name == "densenet121")


def test_adaptive_avg_pool_matches_pytorch_bins():
  """Bin i of AdaptiveAvgPool2d covers [floor(i H / 7), ceil((i + 1) H / 7)); a 1x1 map is
  replicated, as VGG's classifier sees it on 32x32 inputs."""
  rng = np.random.default_rng(0)
  for h, w in ((1, 1), (5, 3), (10, 14)):
    x = rng.normal(size=(2, h, w, 3))
    rows = [(i * h // 7, -(-(i + 1) * h // 7)) for i in range(7)]
    cols = [(j * w // 7, -(-(j + 1) * w // 7)) for j in range(7)]
    want = np.array([[[x[b, r0:r1, c0:c1].mean((0, 1)) for c0, c1 in cols] for r0, r1 in rows]
                     for b in range(2)])
    np.testing.assert_allclose(vgg.adaptive_avg_pool(jnp.asarray(x, jnp.float32), 7), want,
                               rtol=1e-6, atol=1e-6)


def test_vgg_forward_and_dropout_rng():
  """A two-stage VGG (the same module; the 4096-wide classifier on its 2x2 map pooled to 7x7)."""
  model = vgg.VGG(((16,), (32,)), 100)
  variables = filled(jax.eval_shape(lambda k: models.init(model, k, (8, 8, 3)), jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  apply = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={"droppath": k}))
  eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert eval_out.shape == (2, 100) and np.isfinite(eval_out).all()
  a, b = apply(variables, x, jax.random.key(2)), apply(variables, x, jax.random.key(3))
  assert not np.allclose(a, b) and not np.allclose(a, eval_out)
  np.testing.assert_array_equal(a, apply(variables, x, jax.random.key(2)))
  with pytest.raises(flax.errors.InvalidRngError, match="droppath"):
    model.apply(variables, x, train=True)


def test_densenet_train_forward_with_mask():
  """One train-mode forward on 2 images, the second masked out of the BatchNorm statistics, of a
  DenseNet with blocks (2, 2) (the same modules as DenseNet-121, whose shapes are checked above)."""
  model = densenet.DenseNet((2, 2), 100)
  variables = filled(jax.eval_shape(lambda k: models.init(model, k, IMG), jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (2, *IMG))
  apply = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask=m, mutable=["batch_stats"]))
  out, updates = apply(variables, x, jnp.array([True, False]))
  assert out.shape == (2, 100) and np.isfinite(out).all()
  # The stem BN's running mean moved by 0.1 x the first image's channel means only.
  stem = resnet.conv(64, 7, 2, 3, densenet.conv_init)
  y = stem.apply({"params": variables["params"]["stem_conv"]}, x[:1])
  np.testing.assert_allclose(updates["batch_stats"]["stem_bn"]["mean"], 0.1 * y.mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
