"""sigmoid and log_sigmoid: values, extremes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoft
from tests import helpers

F32 = jnp.float32
INF = np.inf
EXTREMES = [-INF, -1e9, -1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4, 1e9, INF]


class TestSigmoid:

  def test_seed_post_table(self):
    out = jsoft.sigmoid(jnp.asarray([2.0, 3.0, 5.0, 6.0], jnp.float64))
    np.testing.assert_allclose(
        out, [0.8807970779778823, 0.9525741268224334, 0.9933071490757153,
              0.9975273768433653], rtol=1e-15)

  def test_extremes_float32(self):
    x = np.array(EXTREMES, np.float32)
    out = jsoft.sigmoid(x)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, helpers.sigmoid(x), rtol=2e-7, atol=0)

  def test_exact_at_infinities(self):
    np.testing.assert_array_equal(jsoft.sigmoid(jnp.asarray([-INF, INF], F32)),
                                  [0.0, 1.0])

  def test_lower_tail_keeps_relative_precision(self):
    x = np.array([-30.0, -80.0, -700.0])
    np.testing.assert_allclose(jsoft.sigmoid(x), helpers.sigmoid(x),
                               rtol=1e-15)

  def test_matches_jax_nn(self):
    x = jnp.asarray(np.random.default_rng(0).normal(scale=5, size=50), F32)
    np.testing.assert_allclose(jsoft.sigmoid(x), jax.nn.sigmoid(x), rtol=1e-6)

  def test_gradient_finite_at_extremes(self):
    x = jnp.asarray(EXTREMES, F32)
    g = jax.vmap(jax.grad(jsoft.sigmoid))(x)
    expected = helpers.sigmoid(x) * helpers.sigmoid(-np.asarray(x))
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=0)

  def test_nan_propagates(self):
    assert np.isnan(jsoft.sigmoid(jnp.asarray(np.nan, F32)))

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_returns_input_dtype(self, dtype):
    x = jnp.asarray([-3.0, 0.5, 4.0], dtype)
    out = jsoft.sigmoid(x)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float64),
                               helpers.sigmoid(np.asarray(x, np.float64)),
                               rtol=float(jnp.finfo(dtype).eps))

  def test_empty(self):
    assert jsoft.sigmoid(jnp.zeros((0, 2), F32)).shape == (0, 2)


class TestLogSigmoid:

  def test_extremes_float32(self):
    x = np.array(EXTREMES, np.float32)
    out = jsoft.log_sigmoid(x)
    expected = helpers.log_sigmoid(x)
    assert out[0] == -INF and out[-1] == 0.0
    np.testing.assert_allclose(out, expected, rtol=2e-7, atol=0)

  def test_matches_scipy_float64(self):
    x = np.random.default_rng(1).normal(scale=30, size=100)
    np.testing.assert_allclose(jsoft.log_sigmoid(x), helpers.log_sigmoid(x),
                               rtol=1e-15)

  def test_log_one_minus_sigmoid_identity(self):
    # log(1 − σ(x)) = log σ(−x): no cancellation even when σ(x) rounds to 1.
    x = np.array([5.0, 40.0, 1e4])
    np.testing.assert_allclose(jsoft.log_sigmoid(-x), helpers.log_sigmoid(-x),
                               rtol=1e-15)

  def test_gradient_at_extremes(self):
    x = jnp.asarray(EXTREMES, F32)
    g = jax.vmap(jax.grad(jsoft.log_sigmoid))(x)
    np.testing.assert_allclose(g, helpers.sigmoid(-np.asarray(x)), rtol=1e-6)

  def test_nan_propagates(self):
    assert np.isnan(jsoft.log_sigmoid(jnp.asarray(np.nan, F32)))

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_returns_input_dtype(self, dtype):
    assert jsoft.log_sigmoid(jnp.zeros(2, dtype)).dtype == dtype
