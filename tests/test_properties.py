"""Property tests over random shapes and extreme magnitudes (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jsoft

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6)
# Every finite float32, extreme magnitudes included.
FINITE32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Integer-valued logits: adding an integer shift is then exact.
INTEGRAL = st.integers(-(2**20), 2**20).map(float)


def logits(elements=FINITE32):
  return hnp.arrays(np.float32, SHAPES, elements=elements)


@SETTINGS
@given(logits())
def test_softmax_is_a_distribution(x):
  y = np.asarray(jsoft.softmax(x), np.float64)
  assert np.isfinite(y).all()
  assert (y >= 0).all()
  np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)


@SETTINGS
@given(logits(INTEGRAL), st.integers(-(2**20), 2**20))
def test_softmax_is_shift_invariant(x, c):
  shifted = x + np.float32(c)
  np.testing.assert_array_equal(jsoft.softmax(shifted), jsoft.softmax(x))
  np.testing.assert_array_equal(jsoft.log_softmax(shifted),
                                jsoft.log_softmax(x))


@SETTINGS
@given(logits())
def test_log_softmax_and_logsumexp_bounds(x):
  logp = jsoft.log_softmax(x)
  assert not np.isnan(logp).any()
  assert (np.asarray(logp) <= 0).all()
  lse = jsoft.logsumexp(x, axis=-1)
  assert not np.isnan(lse).any()
  assert (np.asarray(lse) >= np.max(x, axis=-1)).all()


@SETTINGS
@given(logits(), st.data())
def test_integer_cross_entropy_nonnegative_and_finite(x, data):
  labels = data.draw(hnp.arrays(np.int32, x.shape[:-1],
                                elements=st.integers(0, x.shape[-1] - 1)))
  loss = jsoft.softmax_cross_entropy_with_integer_labels(x, labels)
  assert not np.isnan(loss).any()
  assert (np.asarray(loss) >= 0).all()


@SETTINGS
@given(logits(st.floats(-1e4, 1e4, width=32)), st.data())
def test_cross_entropy_gradient_rows_sum_to_zero(x, data):
  raw = data.draw(hnp.arrays(np.float64, x.shape,
                             elements=st.floats(0.01, 1.0)))
  t = raw / raw.sum(-1, keepdims=True)
  x64 = x.astype(np.float64)
  loss = jsoft.softmax_cross_entropy(x64, t)
  assert (np.asarray(loss) >= 0).all()
  g = jax.grad(lambda x: jnp.sum(jsoft.softmax_cross_entropy(x, t)))(x64)
  np.testing.assert_allclose(np.sum(g, -1), 0.0, atol=1e-12)
  labels = np.argmax(t, -1)
  g_int = jax.grad(lambda x: jnp.sum(
      jsoft.softmax_cross_entropy_with_integer_labels(x, labels)))(x64)
  np.testing.assert_allclose(np.sum(g_int, -1), 0.0, atol=1e-12)


@SETTINGS
@given(logits(), st.data())
def test_binary_cross_entropy_nonnegative_finite_gradient(x, data):
  t = data.draw(hnp.arrays(np.float32, x.shape, elements=st.sampled_from(
      [0.0, 0.25, 1.0])))
  loss = jsoft.sigmoid_binary_cross_entropy(x, t)
  assert np.isfinite(loss).all()
  assert (np.asarray(loss) >= 0).all()
  g = jax.grad(lambda x: jnp.sum(jsoft.sigmoid_binary_cross_entropy(x, t)))(x)
  assert np.isfinite(g).all()
  assert (np.abs(np.asarray(g)) <= 1).all()


@SETTINGS
@given(logits())
def test_sigmoid_family_finite_and_bounded(x):
  s = np.asarray(jsoft.sigmoid(x))
  assert ((s >= 0) & (s <= 1)).all()
  ls = np.asarray(jsoft.log_sigmoid(x))
  assert (~np.isnan(ls)).all() and (ls <= 0).all()
