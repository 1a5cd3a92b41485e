"""sigmoid_binary_cross_entropy: values, infinities, gradients, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoft
from tests import helpers

F32 = jnp.float32
INF = np.inf
bce = jsoft.sigmoid_binary_cross_entropy


def _grad(x, t):
  return jax.grad(lambda x: jnp.sum(bce(x, t)))(x)


class TestBinaryCrossEntropy:

  def test_matches_float64_reference(self):
    rng = np.random.default_rng(0)
    x = rng.normal(scale=10, size=50)
    t = rng.uniform(size=50)
    np.testing.assert_allclose(bce(x, t), helpers.bce(x, t), rtol=1e-14)

  def test_matches_optax_float32(self):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(scale=3, size=20), F32)
    t = jnp.asarray(rng.integers(0, 2, size=20), F32)
    np.testing.assert_allclose(bce(x, t),
                               optax.sigmoid_binary_cross_entropy(x, t),
                               rtol=1e-6)

  @pytest.mark.parametrize("x", [1e4, 1e9, -1e4, -1e9])
  @pytest.mark.parametrize("t", [0.0, 1.0, 0.25])
  def test_large_logits_are_finite_and_exact(self, x, t):
    out = bce(jnp.asarray(x, F32), jnp.asarray(t, F32))
    assert np.isfinite(out)
    np.testing.assert_allclose(out, helpers.bce(np.float32(x), t), rtol=1e-6)

  def test_infinite_logits(self):
    x = jnp.asarray([INF, -INF, INF, -INF, INF], F32)
    t = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.5], F32)
    np.testing.assert_array_equal(bce(x, t), [0.0, 0.0, INF, INF, INF])
    assert np.isnan(optax.sigmoid_binary_cross_entropy(x[:2], t[:2])).any()

  @pytest.mark.parametrize("copies", [1, 4])  # 45 and 180 elements
  @pytest.mark.parametrize("pos_weight", [None, 2.5])
  @pytest.mark.parametrize("dtype", [np.float64, np.float32])
  def test_both_spellings_on_every_edge_case(self, copies, pos_weight,
                                             dtype):
    # Up to 128 elements the loss takes a select spelling, over it a
    # select-free one (jsoft._binary_cross_entropy): both give
    # p·t·softplus(−x) + (1 − t)·softplus(x) with a zero-weight term
    # dropped, at infinite logits and at targets outside [0, 1] too. The
    # select-free one clamps to the largest float of the dtype: float32
    # checks its overflow term at a different largest float and 2^127.
    xs = [-INF, -1e30, -1e4, -3.0, -1e-3, 0.0, 2.0, 40.0, 1e30, INF, np.nan]
    ts = [0.0, 0.3, 1.0, 1.5, -0.5, 1e-30]
    x, t = (np.tile(a.ravel(), copies).astype(dtype)
            for a in np.meshgrid(xs, ts))
    p = 1.0 if pos_weight is None else pos_weight
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    with np.errstate(invalid="ignore"):
      terms = [np.where(w == 0, 0.0, w * np.logaddexp(0.0, s))
               for w, s in ((p * t64, -x64), (1 - t64, x64))]
    want = np.where(np.isnan(x64), np.nan, terms[0] + terms[1])
    got = bce(x, t, pos_weight=pos_weight)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want,
                               rtol=1e-13 if dtype == np.float64 else 1e-6)

  def test_gradient_is_sigmoid_minus_target_and_finite(self):
    x = jnp.asarray([INF, -INF, 1e9, -1e9, 0.0, 2.0], F32)
    t = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 0.3], F32)
    g = _grad(x, t)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, helpers.sigmoid(x) - np.asarray(t),
                               rtol=1e-6, atol=1e-7)

  def test_gradient_keeps_precision_near_the_target(self):
    # σ(30) − 1 = −σ(−30) ≈ −9.4e−14: computing σ(x) − t rounds it to 0.
    g = _grad(jnp.asarray([30.0], F32), jnp.asarray([1.0], F32))
    np.testing.assert_allclose(g, -helpers.sigmoid(-30.0), rtol=1e-6)

  def test_gradient_with_respect_to_labels_is_minus_logit(self):
    x = np.array([-2.0, 0.5, 3.0])
    t = np.array([0.1, 0.6, 0.9])
    g = jax.grad(lambda t: jnp.sum(bce(x, t)))(t)
    np.testing.assert_allclose(g, -x, rtol=1e-15)

  def test_broadcasting(self):
    x = np.array([[0.5], [-1.0]])
    t = np.array([0.0, 1.0, 0.5])
    out = bce(x, t)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, helpers.bce(x, t), rtol=1e-15)
    g = _grad(jnp.asarray(x), t)
    assert g.shape == (2, 1)
    np.testing.assert_allclose(
        g, np.sum(helpers.sigmoid(x) - t, axis=1, keepdims=True), rtol=1e-14)

  def test_integer_and_boolean_labels(self):
    x = jnp.asarray([1.0, -1.0], F32)
    np.testing.assert_array_equal(bce(x, jnp.asarray([1, 0])),
                                  bce(x, jnp.asarray([True, False])))

  def test_nan_propagates(self):
    for t in (0.0, 1.0):
      assert np.isnan(bce(jnp.asarray(np.nan, F32), jnp.asarray(t, F32)))

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_half_precision_computes_in_float32(self, dtype):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(scale=4, size=30), dtype)
    t = jnp.asarray(rng.uniform(size=30), dtype)
    out = bce(x, t)
    assert out.dtype == F32
    expected = helpers.bce(np.asarray(x, np.float64),
                           np.asarray(t.astype(F32), np.float64))
    assert helpers.rel_err(out, expected) < 1e-5
    assert _grad(x, t).dtype == dtype

  def test_empty(self):
    assert bce(jnp.zeros((0,), F32), jnp.zeros((0,), F32)).shape == (0,)
