"""softmax, log_softmax and logsumexp: values, numerics contract, dtypes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoft
from tests import helpers

# One eps of float32 or float64 allows XLA's exp half an ulp of error or so.
OLD_EXP = helpers.needs_jax((0, 10, 1), "XLA:CPU's exp was 1-3 ulps off "
                            "before, beyond the one-eps bound")

F32 = jnp.float32
INF = np.inf
EXTREMES = [[-1000.0] * 3, [1000.0] * 3, [1000.0, -1000.0, 0.0]]


def _x(values, dtype=F32):
  return jnp.asarray(values, dtype)


class TestSeedPost:
  """The table of the seed post jsoft started from (docs/design/y_minus_t.md,
  "Where it comes from")."""

  def test_softmax_of_2_3_5_6(self):
    np.testing.assert_allclose(
        jsoft.softmax(_x([2, 3, 5, 6])),
        [0.01275478, 0.03467109, 0.25618664, 0.69638749], rtol=1e-6)

  def test_naive_formula_gives_nan_and_jsoft_is_exact(self):
    x = np.array([-1000.0] * 3)
    with np.errstate(all="ignore"):
      naive = np.exp(x) / np.sum(np.exp(x))
    assert np.isnan(naive).all()
    np.testing.assert_array_equal(jsoft.softmax(_x(x)), np.full(3, 1 / 3, F32))


class TestSoftmax:

  @pytest.mark.parametrize("values", EXTREMES)
  def test_extremes_are_exact(self, values):
    expected = helpers.softmax(values).astype(np.float32)
    np.testing.assert_array_equal(jsoft.softmax(_x(values)), expected)

  def test_matches_scipy_float64(self):
    x = np.random.default_rng(0).normal(scale=20, size=(7, 11))
    np.testing.assert_allclose(jsoft.softmax(x, axis=0),
                               helpers.softmax(x, axis=0), rtol=1e-14)

  def test_matches_jax_nn_where_both_are_right(self):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 9)), F32)
    np.testing.assert_allclose(jsoft.softmax(x), jax.nn.softmax(x),
                               rtol=2e-6, atol=1e-7)

  def test_minus_inf_entries_act_as_masks(self):
    x = _x([1.0, -INF, 2.0, -INF])
    expected = helpers.softmax([1.0, 2.0])
    np.testing.assert_allclose(jsoft.softmax(x), [expected[0], 0,
                                                  expected[1], 0], rtol=1e-6)
    np.testing.assert_array_equal(
        jsoft.softmax(_x([1.0, 5.0, 2.0, 7.0]),
                      where=np.array([True, False, True, False])),
        jsoft.softmax(x))

  def test_all_masked_row_is_zero(self):
    out = jsoft.softmax(_x([[1.0, 2.0], [3.0, 4.0]]),
                        where=np.array([[False, False], [True, True]]))
    np.testing.assert_array_equal(out[0], [0, 0])
    np.testing.assert_allclose(out[1], helpers.softmax([3.0, 4.0]), rtol=1e-6)

  def test_all_minus_inf_row_is_zero(self):
    np.testing.assert_array_equal(jsoft.softmax(_x([-INF, -INF])), [0, 0])

  def test_plus_inf_is_undefined_like_jax_nn(self):
    # inf/inf: the slice is NaN, as in jax.nn; logsumexp is still +inf.
    assert np.isnan(jsoft.softmax(_x([INF, 0.0]))[0])
    assert np.isnan(jax.nn.softmax(_x([INF, 0.0]))[0])

  def test_nan_propagates_to_its_row_only(self):
    out = jsoft.softmax(_x([[1.0, np.nan], [1.0, 2.0]]))
    assert np.isnan(out[0]).all()
    assert np.isfinite(out[1]).all()

  def test_masked_nan_is_ignored(self):
    out = jsoft.softmax(_x([np.nan, 1.0]), where=np.array([False, True]))
    np.testing.assert_array_equal(out, [0, 1])

  @pytest.mark.parametrize("axis", [0, 1, -1, (0, 2), None])
  def test_axes(self, axis):
    x = np.random.default_rng(2).normal(size=(3, 4, 5))
    if axis is None:
      expected = helpers.softmax(x.ravel()).reshape(x.shape)
    elif isinstance(axis, tuple):
      moved = np.moveaxis(x, axis, (-2, -1)).reshape(4, 15)
      expected = np.moveaxis(
          helpers.softmax(moved).reshape(4, 3, 5), (-2, -1), axis)
    else:
      expected = helpers.softmax(x, axis=axis)
    np.testing.assert_allclose(jsoft.softmax(x, axis=axis), expected,
                               rtol=1e-13)

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, *(
      pytest.param(d, marks=OLD_EXP) for d in (jnp.float32, jnp.float64))])
  def test_returns_input_dtype(self, dtype):
    x = jnp.asarray([2.0, 3.0, 5.0, 6.0], dtype)
    out = jsoft.softmax(x)
    assert out.dtype == dtype
    # Computed in (at least) float32, then rounded once to the output dtype.
    expected = helpers.softmax(np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(out, np.float64), expected,
                               rtol=float(jnp.finfo(dtype).eps))

  def test_empty(self):
    assert jsoft.softmax(jnp.zeros((0, 3), F32)).shape == (0, 3)
    assert jsoft.softmax(jnp.zeros((2, 0), F32)).shape == (2, 0)

  def test_accepts_lists_and_ints(self):
    np.testing.assert_allclose(jsoft.softmax([2, 3, 5, 6]),
                               helpers.softmax([2, 3, 5, 6]), rtol=1e-6)


class TestLogSoftmax:

  @pytest.mark.parametrize("values", EXTREMES)
  def test_extremes_are_exact(self, values):
    expected = helpers.log_softmax(values).astype(np.float32)
    np.testing.assert_array_equal(jsoft.log_softmax(_x(values)), expected)

  def test_matches_scipy_float64(self):
    x = np.random.default_rng(3).normal(scale=50, size=(5, 13))
    np.testing.assert_allclose(jsoft.log_softmax(x), helpers.log_softmax(x),
                               rtol=1e-14)

  def test_keeps_precision_where_softmax_underflows(self):
    out = jsoft.log_softmax(_x([0.0, -200.0]))
    np.testing.assert_allclose(out, [0.0, -200.0], rtol=1e-7)

  def test_all_masked_is_minus_inf(self):
    out = jsoft.log_softmax(_x([1.0, 2.0]), where=np.array([False, False]))
    np.testing.assert_array_equal(out, [-INF, -INF])

  def test_masked_entries_are_minus_inf(self):
    out = jsoft.log_softmax(_x([1.0, 1e4, 2.0]),
                            where=np.array([True, False, True]))
    assert out[1] == -INF
    np.testing.assert_allclose(np.asarray(out)[[0, 2]],
                               helpers.log_softmax([1.0, 2.0]), rtol=1e-6)

  def test_all_minus_inf_is_minus_inf(self):
    np.testing.assert_array_equal(jsoft.log_softmax(_x([-INF, -INF])),
                                  [-INF, -INF])

  def test_nan_propagates(self):
    assert np.isnan(jsoft.log_softmax(_x([np.nan, 1.0]))).all()

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_returns_input_dtype(self, dtype):
    assert jsoft.log_softmax(jnp.zeros(3, dtype)).dtype == dtype


class TestLogsumexp:

  @pytest.mark.parametrize("values", EXTREMES)
  def test_extremes_are_exact(self, values):
    expected = np.float32(helpers.logsumexp(values))
    assert jsoft.logsumexp(_x(values)) == expected

  def test_default_axis_is_all(self):
    x = np.random.default_rng(4).normal(size=(3, 4))
    np.testing.assert_allclose(jsoft.logsumexp(x),
                               helpers.logsumexp(x, axis=None), rtol=1e-15)

  @pytest.mark.parametrize("axis", [0, -1, (0, 1), None])
  @pytest.mark.parametrize("keepdims", [False, True])
  def test_axes_and_keepdims_match_jax_nn(self, axis, keepdims):
    x = np.random.default_rng(5).normal(size=(3, 4, 2))
    out = jsoft.logsumexp(x, axis=axis, keepdims=keepdims)
    ref = jax.nn.logsumexp(jnp.asarray(x), axis=axis, keepdims=keepdims)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-14)

  def test_all_minus_inf_row_is_minus_inf_with_zero_gradient(self):
    x = _x([[-INF, -INF], [0.0, 0.0]])
    out = jsoft.logsumexp(x, axis=1)
    assert out[0] == -INF
    np.testing.assert_allclose(out[1], math.log(2), rtol=1e-7)
    g = jax.grad(lambda x: jsoft.logsumexp(x, axis=1)[0])(x)
    np.testing.assert_array_equal(g, np.zeros((2, 2)))

  def test_where_all_false(self):
    out = jsoft.logsumexp(_x([1.0, 2.0]), where=np.array([False, False]))
    assert out == -INF

  def test_scale_factors_b(self):
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([0.5, 0.0, 2.0])
    expected = np.log(np.sum(b * np.exp(a)))
    np.testing.assert_allclose(jsoft.logsumexp(a, b=b), expected, rtol=1e-15)

  def test_b_zero_excludes_an_overflowing_entry(self):
    out = jsoft.logsumexp(_x([1e4, 0.0]), b=_x([0.0, 1.0]))
    assert out == 0.0

  def test_return_sign(self):
    a = np.array([0.0, 1.0])
    b = np.array([1.0, -1.0])
    out, sign = jsoft.logsumexp(a, b=b, return_sign=True)
    expected = np.log(np.e - 1)
    np.testing.assert_allclose(out, expected, rtol=1e-15)
    assert sign == -1
    assert np.isnan(jsoft.logsumexp(a, b=b))  # log of a negative sum

  def test_plus_inf(self):
    assert jsoft.logsumexp(_x([INF, 0.0])) == INF

  def test_nan_propagates(self):
    assert np.isnan(jsoft.logsumexp(_x([np.nan, 0.0])))

  def test_empty_is_minus_inf(self):
    assert jsoft.logsumexp(jnp.zeros((0,), F32)) == -INF

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_returns_input_dtype(self, dtype):
    out = jsoft.logsumexp(jnp.asarray([1.0, 2.0], dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(float(out), helpers.logsumexp([1.0, 2.0]),
                               rtol=float(jnp.finfo(dtype).eps))


class TestMaskGradients:
  """where=False entries of any size get exactly zero gradient; an all-False
  slice gets a zero (finite) gradient."""

  MASK = np.array([[True, False, True], [False, False, False]])
  X = _x([[1.0, 1e4, 2.0], [3.0, 1e4, -5.0]])
  W = np.array([[0.3, -1.2, 0.7], [1.0, 2.0, -1.0]], np.float32)

  @pytest.mark.parametrize("fn", [jsoft.softmax, jsoft.log_softmax])
  def test_activations(self, fn):
    def scalar(x):
      y = fn(x, where=self.MASK)
      return jnp.sum(jnp.where(self.MASK, self.W * y, 0))
    g = np.asarray(jax.grad(scalar)(self.X))
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[~self.MASK], 0.0)
    assert np.any(g[0] != 0)

  def test_logsumexp(self):
    g = np.asarray(jax.grad(lambda x: jnp.sum(
        jsoft.logsumexp(x, axis=1, where=self.MASK)[:1]))(self.X))
    np.testing.assert_array_equal(g[~self.MASK], 0.0)
    np.testing.assert_allclose(g[0, [0, 2]], helpers.softmax([1.0, 2.0]),
                               rtol=1e-6)

  def test_probability_cross_entropy(self):
    t = _x([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    g = np.asarray(jax.grad(lambda x: jnp.sum(
        jsoft.softmax_cross_entropy(x, t, where=self.MASK)))(self.X))
    np.testing.assert_array_equal(g[~self.MASK], 0.0)
    assert np.isfinite(g).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_16bit_gradient_matches_float64(fn, dtype):
  # 16-bit x is computed in float32 inside the rules (the max at x's width):
  # the gradient comes back in x's dtype, rounded once from the exact value
  # at x's entries and the output's cotangent (16-bit like the output).
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(scale=3, size=(3, 6)), dtype)
  w = rng.normal(size=(3, 6)).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(w * getattr(jsoft, fn)(x).astype(F32)))(x)
  assert g.dtype == dtype
  x64 = np.asarray(x, np.float64)
  w64 = np.asarray(jnp.asarray(w, dtype), np.float64)
  y = helpers.softmax(x64)
  if fn == "softmax":  # J^T w = y ⊙ (w − Σ y·w)
    expected = y * (w64 - np.sum(y * w64, -1, keepdims=True))
  else:  # J^T w = w − softmax·Σ w
    expected = w64 - y * np.sum(w64, -1, keepdims=True)
  np.testing.assert_allclose(np.asarray(g, np.float64), expected,
                             rtol=float(jnp.finfo(dtype).eps), atol=1e-6)


# Over 2^22 entries in fewer than 4096 rows the forward's last pass forms
# x − m again from x (jsoft._spellings.rereads_input): the shape just past
# that, and a row that is all −inf, one with a NaN and one with a large
# spread, against float64 (the float32 case is computed in float32).
REREAD = (1024, 4097)


def _reread_case(dtype):
  rng = np.random.default_rng(11)
  x = rng.normal(scale=4, size=REREAD)
  x[1] = -np.inf
  x[2, 5] = np.nan
  x[3, ::2] -= 1e4
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_log_softmax_past_2_22_entries_matches_float64(dtype):
  x = _reread_case(dtype)
  got = np.asarray(jsoft.log_softmax(x).astype(F32), np.float64)
  x64 = np.asarray(x, np.float64)
  with np.errstate(invalid="ignore"):
    want = helpers.log_softmax(x64)
  want[1] = -np.inf
  want[2] = np.nan
  # float32: a few units in the last place of the value and of the row's
  # log-sum (up to ~30 here); bfloat16: the one rounding to bfloat16.
  tol = dict(rtol=4e-6, atol=4e-6) if dtype == F32 else dict(
      rtol=float(jnp.finfo(jnp.bfloat16).eps), atol=0)
  np.testing.assert_allclose(got, want, **tol)


def test_log_softmax_step_past_2_22_entries_matches_float64():
  # bfloat16 takes the reread in the JVP rule too; its gradient against
  # float64 (finite rows; J^T w = w − softmax·Σ w).
  x = _reread_case(jnp.bfloat16)[4:]
  w = jnp.asarray(np.random.default_rng(12).normal(size=x.shape), F32)
  g = jax.grad(lambda x: jnp.sum(w * jsoft.log_softmax(x).astype(F32)))(x)
  x64 = np.asarray(x, np.float64)
  w64 = np.asarray(w.astype(jnp.bfloat16), np.float64)
  want = w64 - helpers.softmax(x64) * np.sum(w64, -1, keepdims=True)
  np.testing.assert_allclose(np.asarray(g, np.float64), want,
                             rtol=float(jnp.finfo(jnp.bfloat16).eps),
                             atol=1e-6)
