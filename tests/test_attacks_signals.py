"""Per-sample signals against float64 NumPy formulas (iam-spec 2), in float32 and with x64."""

import math

import jax
import numpy as np
import pytest

from jaxmu.attacks import signals

PRECISIONS = [(False, dict(atol=1e-5, rtol=2e-6)), (True, dict(atol=0, rtol=1e-9))]  # +1 ulp when |x| > 10


def _inputs(x64, shape=(3, 40), classes=7, scale=3.0):
  rng = np.random.default_rng(0)  # fresh draw per test
  logits = (scale * rng.standard_normal(shape + (classes,))).astype(np.float64 if x64 else np.float32)
  labels = rng.integers(0, classes, shape[-1])
  return logits, labels


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_true_class(z, y):
  return np.take_along_axis(z, np.broadcast_to(y, z.shape[:-1])[..., None], -1)[..., 0]


@pytest.mark.parametrize("x64,tol", PRECISIONS)
def test_prob_ce_scaled_logit_match_numpy(x64, tol):
  with jax.enable_x64(x64):
    logits, labels = _inputs(x64)
    z = logits.astype(np.float64)
    p = _np_softmax(z)
    p_y = _np_true_class(p, labels)
    others = p.sum(-1) - p_y
    np.testing.assert_allclose(signals.true_class_prob(logits, labels), p_y, **tol)
    np.testing.assert_allclose(signals.cross_entropy(logits, labels), -np.log(p_y), **tol)
    np.testing.assert_allclose(signals.scaled_logit(logits, labels), np.log(p_y) - np.log(others), **tol)
    out = jax.jit(signals.scaled_logit)(logits, labels)
    assert out.shape == logits.shape[:-1]
    assert out.dtype == (np.float64 if x64 else np.float32)


def test_scaled_logit_finite_and_exact_when_saturated():
  # p_y rounds to exactly 1 (first row) and exactly 0 (second row) in float32.
  logits = np.array([[120.0, -5.0, 3.0], [-200.0, 10.0, 40.0]], np.float32)
  labels = np.array([0, 0])
  p = np.asarray(signals.true_class_prob(logits, labels))
  assert p[0] == 1.0 and p[1] == 0.0
  z = logits.astype(np.float64)
  expected = [z[0, 0] - np.logaddexp(z[0, 1], z[0, 2]), z[1, 0] - np.logaddexp(z[1, 1], z[1, 2])]
  np.testing.assert_allclose(signals.scaled_logit(logits, labels), expected, rtol=1e-6)
  assert np.isfinite(signals.cross_entropy(logits, labels)).all()


def test_gumbel_map_matches_formula_and_spec_values():
  with jax.enable_x64(True):
    p = np.random.default_rng(0).random(50)
    p[:2] = [0.0, 1.0]
    e1, e2 = 1e-2, 1e-5
    r = -np.log(e1 - np.log(e2 + p))
    r0, r1 = -np.log(e1 - np.log(e2)), -np.log(e1 - np.log(1 + e2))
    np.testing.assert_allclose(signals.gumbel_map(p), r, rtol=1e-9)
    np.testing.assert_allclose(signals.normalized_gumbel(p), (r - r0) / (r1 - r0), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(signals.gumbel_map(p, normalize=True), signals.normalized_gumbel(p))
    # Other epsilons for the map, the default ones for the min/max (iam-spec 12.5).
    mixed = signals.gumbel_map(p, 0.1, 1e-6, normalize=True, norm_eps=(e1, e2))
    np.testing.assert_allclose(mixed, (-np.log(0.1 - np.log(1e-6 + p)) - r0) / (r1 - r0), rtol=1e-9)
  # iam-spec 2: max = 4.60617, min = -2.44434, and the table of r_hat values.
  np.testing.assert_allclose(signals.gumbel_map(np.array([1.0, 0.0])), [4.60617, -2.44434], atol=1e-5)
  table = {0.01: 0.1298, 0.1: 0.2278, 0.5: 0.3966, 0.9: 0.6530, 0.99: 0.9013, 0.999: 0.9865}
  np.testing.assert_allclose(signals.normalized_gumbel(np.array(list(table))), list(table.values()), atol=1e-4)


@pytest.mark.parametrize("x64,tol", PRECISIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_taylor_soft_margin_matches_numpy(x64, tol, temperature):
  with jax.enable_x64(x64):
    logits, labels = _inputs(x64)
    # Logits in [-1, 4]: every Taylor term T(v) > 0, so tsm is well conditioned (T < 0 for
    # v < -1.6 is a reference quirk, iam-spec 12.24).
    logits = (logits - logits.min()) / (logits.max() - logits.min()) * 5 - 1
    u = logits.astype(np.float64) / temperature
    taylor = lambda v: sum(v**i / math.factorial(i) for i in range(4))
    u_y = _np_true_class(u, labels)
    t_y = taylor(u_y - 0.6)
    others = taylor(u).sum(-1) - taylor(u_y)
    expected = t_y / (others + t_y)
    np.testing.assert_allclose(signals.taylor_soft_margin(logits, labels, temperature), expected, **tol)


def test_bad_input_raises():
  logits, labels = _inputs(False)
  with pytest.raises(ValueError, match="broadcast"):
    signals.true_class_prob(logits, labels[:-1])
  with pytest.raises(ValueError, match="integers"):
    signals.cross_entropy(logits, labels.astype(np.float32))
