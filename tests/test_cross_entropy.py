"""softmax_cross_entropy(_with_integer_labels): values, gradients, contract."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special as sp

import jsoft
from jsoft import _spellings
from tests import helpers

F32 = jnp.float32
INF = np.inf
int_ce = jsoft.softmax_cross_entropy_with_integer_labels
prob_ce = jsoft.softmax_cross_entropy


def _grad(fn, *args, **kwargs):
  return jax.grad(lambda x: jnp.sum(fn(x, *args, **kwargs)))


def _rng(seed):
  return np.random.default_rng(seed)


class TestIntegerLabels:

  def test_matches_float64_reference(self):
    x = _rng(0).normal(scale=10, size=(6, 9))
    y = _rng(1).integers(0, 9, size=6)
    np.testing.assert_allclose(int_ce(x, y), helpers.ce_int(x, y), rtol=1e-14)

  def test_gradient_is_softmax_minus_onehot(self):
    x = _rng(2).normal(scale=3, size=(5, 7))
    y = _rng(3).integers(0, 7, size=5)
    np.testing.assert_allclose(_grad(int_ce, y)(x), helpers.ce_int_grad(x, y),
                               rtol=1e-13, atol=1e-16)

  def test_gradient_scales_by_the_cotangent(self):
    x = _rng(4).normal(size=(3, 4))
    y = np.array([0, 3, 1])
    ct = np.array([2.0, -0.5, 0.0])
    _, pullback = jax.vjp(lambda x: int_ce(x, y), x)
    (g,) = pullback(ct)
    np.testing.assert_allclose(g, ct[:, None] * helpers.ce_int_grad(x, y),
                               rtol=1e-13, atol=1e-16)

  def test_matches_optax_float32(self):
    x = jnp.asarray(_rng(5).normal(size=(8, 10)), F32)
    y = jnp.asarray(_rng(6).integers(0, 10, size=8))
    np.testing.assert_allclose(
        int_ce(x, y),
        optax.softmax_cross_entropy_with_integer_labels(x, y), rtol=1e-6)

  @pytest.mark.parametrize("label", [0, 1, 2])
  def test_minus_1000_is_log3_in_float32(self, label):
    out = int_ce(jnp.full((3,), -1000.0, F32), jnp.asarray(label))
    assert out.dtype == F32
    assert helpers.rel_err(out, math.log(3)) < 1e-6

  @pytest.mark.parametrize("values", [[1000.0] * 3, [1000.0, -1000.0, 0.0]])
  def test_large_magnitudes_float32(self, values):
    x = jnp.asarray(values, F32)
    for label in range(3):
      out = int_ce(x, jnp.asarray(label))
      expected = helpers.ce_int(np.asarray(x), label)
      assert helpers.rel_err(out, expected) < 1e-6

  def test_masked_out_row_of_garbage_gets_zero_gradient(self):
    # The VJP rule selects 0 for masked-out examples; autodiff through a
    # masked forward would multiply that 0 by the row's NaN softmax.
    x = jnp.asarray([[np.nan, np.inf, 1.0], [1.0, 2.0, 3.0]], F32)
    y = jnp.asarray([0, 2])
    where = np.array([False, True])
    g = np.asarray(_grad(int_ce, y, where=where)(x))
    np.testing.assert_array_equal(g[0], np.zeros(3))
    np.testing.assert_allclose(g[1], helpers.ce_int_grad([1.0, 2.0, 3.0], 2),
                               rtol=1e-6)

  @pytest.mark.parametrize("label", [-1, 3, 100, -100])
  def test_out_of_range_label_is_nan_not_wrapped(self, label):
    x = jnp.asarray([[1.0, 2.0, 3.0]], F32)
    assert np.isnan(int_ce(x, jnp.asarray([label]))).all()
    assert np.isnan(_grad(int_ce, jnp.asarray([label]))(x)).all()

  def test_out_of_range_label_only_poisons_its_row(self):
    x = jnp.zeros((2, 3), F32)
    out = int_ce(x, jnp.asarray([5, 1]))
    assert np.isnan(out[0])
    assert helpers.rel_err(out[1], math.log(3)) < 1e-6

  def test_label_on_minus_inf_logit_is_inf_with_finite_gradient(self):
    x = jnp.asarray([0.0, -INF, 1.0], F32)
    assert int_ce(x, jnp.asarray(1)) == INF
    g = _grad(int_ce, jnp.asarray(1))(x)
    np.testing.assert_allclose(
        g, np.append(helpers.softmax([0.0, 1.0]), 0)[[0, 2, 1]] - [0, 1, 0],
        rtol=1e-6)

  def test_minus_inf_logits_elsewhere_are_masks(self):
    x = jnp.asarray([0.0, -INF, 1.0], F32)
    np.testing.assert_allclose(int_ce(x, jnp.asarray(2)),
                               helpers.ce_int([0.0, 1.0], 1), rtol=1e-6)
    assert np.isfinite(_grad(int_ce, jnp.asarray(2))(x)).all()

  def test_nan_propagates(self):
    x = jnp.asarray([[np.nan, 0.0], [0.0, 0.0]], F32)
    out = int_ce(x, jnp.asarray([1, 1]))
    assert np.isnan(out[0]) and np.isfinite(out[1])

  def test_where_per_example(self):
    x = _rng(7).normal(size=(3, 4))
    y = np.array([0, 1, 2])
    where = np.array([True, False, True])
    out = int_ce(x, y, where=where)
    np.testing.assert_allclose(out, np.where(where, helpers.ce_int(x, y), 0),
                               rtol=1e-14)
    g = np.asarray(_grad(int_ce, y, where=where)(x))
    np.testing.assert_array_equal(g[1], np.zeros(4))
    np.testing.assert_allclose(g[[0, 2]], helpers.ce_int_grad(x, y)[[0, 2]],
                               rtol=1e-13)

  def test_where_per_entry_matches_dropping_the_entries(self):
    x = np.array([[1.0, 1e4, 2.0, 0.5]])
    where = np.array([[True, False, True, True]])
    out = int_ce(x, np.array([2]), where=where)
    np.testing.assert_allclose(out, helpers.ce_int(x[:, [0, 2, 3]], [1]),
                               rtol=1e-14)

  def test_masked_1e4_entry_gets_exactly_zero_gradient(self):
    x = jnp.asarray([[1.0, 1e4, 2.0]], F32)
    where = np.array([[True, False, True]])
    g = _grad(int_ce, jnp.asarray([0]), where=where)(x)
    assert g[0, 1] == 0.0
    assert np.isfinite(g).all()

  def test_where_all_false_gives_zero_loss_and_gradient(self):
    x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], F32)
    where = np.zeros((2, 2), bool)
    y = jnp.asarray([0, 1])
    np.testing.assert_array_equal(int_ce(x, y, where=where), [0, 0])
    np.testing.assert_array_equal(_grad(int_ce, y, where=where)(x),
                                  np.zeros((2, 2)))

  def test_masked_out_example_with_padding_label_is_zero(self):
    x = jnp.zeros((2, 3), F32)
    out = int_ce(x, jnp.asarray([-100, 1]), where=np.array([False, True]))
    assert out[0] == 0.0 and np.isfinite(out[1])

  def test_label_on_masked_entry_gives_zero(self):
    # Masked entries leave both the softmax and the target: the restricted
    # target is empty, so the loss and its gradient are 0.
    x = jnp.asarray([[1.0, 2.0, 3.0]], F32)
    where = np.array([[True, False, True]])
    assert int_ce(x, jnp.asarray([1]), where=where)[0] == 0.0
    np.testing.assert_array_equal(
        _grad(int_ce, jnp.asarray([1]), where=where)(x), np.zeros((1, 3)))

  def test_axis_tuple_flat_index(self):
    # optax's documented example: a label is a C-order index over the axes.
    shape = (1, 2, 3, 4)
    x = jnp.arange(np.prod(shape), dtype=F32).reshape(shape)
    labels = jnp.ravel_multi_index((jnp.array([[1, 2]]), jnp.array([[1, 3]])),
                                   shape[2:])
    np.testing.assert_allclose(int_ce(x, labels, axis=(2, 3)),
                               [[6.4587, 0.4587]], atol=1e-4)

  @pytest.mark.parametrize("axis", [0, 1, (2, 0)])
  def test_other_axes(self, axis):
    x = _rng(8).normal(size=(3, 4, 5))
    axes = axis if isinstance(axis, tuple) else (axis,)
    rest = tuple(i for i in range(3) if i not in axes)
    flat = np.transpose(x, rest + axes).reshape(
        tuple(x.shape[i] for i in rest) + (-1,))
    y = _rng(9).integers(0, flat.shape[-1], size=flat.shape[:-1])
    np.testing.assert_allclose(int_ce(x, y, axis=axis),
                               helpers.ce_int(flat, y), rtol=1e-14)

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_half_precision_computes_in_float32(self, dtype):
    x = jnp.asarray(_rng(10).normal(scale=4, size=(16, 33)), dtype)
    y = jnp.asarray(_rng(11).integers(0, 33, size=16))
    out = int_ce(x, y)
    assert out.dtype == F32
    expected = helpers.ce_int(np.asarray(x, np.float64), y)
    assert helpers.rel_err(out, expected) < 1e-5
    g = _grad(int_ce, y)(x)
    assert g.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(g, np.float64),
        helpers.ce_int_grad(np.asarray(x, np.float64), y),
        atol=float(jnp.finfo(dtype).eps))

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_half_precision_targets_past_the_small_call_spelling(self, dtype):
    # Over 2^16 logits the forward is the one-pass sum with its NaN
    # fallback, and a 16-bit target enters both unconverted: the values,
    # the fallback (a zero target on a -inf logit in row 0) and both
    # gradients must still be float32-exact.
    x = _rng(38).normal(scale=4, size=(300, 257))
    x[0, 5] = -np.inf
    t = _rng(39).dirichlet(np.ones(257), size=300)
    t[0, 5] = 0.0
    x, t = jnp.asarray(x, dtype), jnp.asarray(t, dtype)
    x64, t64 = np.asarray(x, np.float64), np.asarray(t, np.float64)
    out = prob_ce(x, t)
    assert out.dtype == F32
    with np.errstate(invalid="ignore", divide="ignore"):
      expected, logp = helpers.ce_prob(x64, t64), sp.log_softmax(x64, axis=-1)
    assert helpers.rel_err(out, expected) < 1e-5
    gx, gt = jax.grad(lambda x, t: jnp.sum(prob_ce(x, t)), (0, 1))(x, t)
    assert gx.dtype == gt.dtype == dtype
    np.testing.assert_allclose(np.asarray(gx, np.float64),
                               helpers.ce_prob_grad(x64, t64), atol=1e-2)
    finite = np.isfinite(logp)
    np.testing.assert_allclose(np.asarray(gt, np.float64)[finite],
                               -logp[finite], rtol=1e-2)

  def test_float32_over_100k_classes(self):
    x = jnp.asarray(_rng(12).normal(scale=3, size=(4, 100_000)), F32)
    y = jnp.asarray(_rng(13).integers(0, 100_000, size=4))
    expected = helpers.ce_int(np.asarray(x), y)
    assert helpers.rel_err(int_ce(x, y), expected) < 2e-6

  def test_empty_batch(self):
    out = int_ce(jnp.zeros((0, 5), F32), jnp.zeros((0,), jnp.int32))
    assert out.shape == (0,) and out.dtype == F32

  def test_no_classes_every_label_is_out_of_range(self):
    out = int_ce(jnp.zeros((2, 0), F32), jnp.zeros((2,), jnp.int32))
    assert np.isnan(out).all()


class TestProbabilityLabels:

  def test_matches_float64_reference(self):
    x = _rng(20).normal(scale=10, size=(6, 9))
    t = _rng(21).dirichlet(np.ones(9), size=6)
    np.testing.assert_allclose(prob_ce(x, t), helpers.ce_prob(x, t),
                               rtol=1e-13)

  def test_gradient_is_softmax_times_mass_minus_target(self):
    x = _rng(22).normal(scale=3, size=(4, 5))
    t = _rng(23).uniform(size=(4, 5))  # unnormalised on purpose
    np.testing.assert_allclose(_grad(prob_ce, t)(x), helpers.ce_prob_grad(x, t),
                               rtol=1e-12, atol=1e-15)

  def test_gradient_with_respect_to_labels_is_minus_log_softmax(self):
    x = _rng(24).normal(size=(2, 3))
    t = _rng(25).dirichlet(np.ones(3), size=2)
    g = jax.grad(lambda t: jnp.sum(prob_ce(x, t)))(t)
    np.testing.assert_allclose(g, -helpers.log_softmax(x), rtol=1e-14)

  @pytest.mark.parametrize("columns", [3, 40])
  def test_target_derivatives_at_zero_targets(self, columns):
    # Both spellings of the dense sum (up to 128 logits and over): ∂L/∂t =
    # −log softmax(x) at every class, zero targets included, in reverse
    # and forward mode, and ∂²L/∂x∂t = p − onehot.
    x = _rng(40).normal(size=(4, columns))
    t = _rng(41).dirichlet(np.ones(columns), size=4)
    t[:, ::2] = 0.0
    want = -helpers.log_softmax(x)
    for mode in (jax.grad, jax.jacfwd):
      got = mode(lambda t: jnp.sum(prob_ce(x, t)))(t)
      np.testing.assert_allclose(got, want, rtol=1e-13)
    dx = jax.grad(lambda x, t: jnp.sum(prob_ce(x, t)))
    mixed = jax.jacfwd(dx, argnums=1)(x, t)  # [4, C] by [4, C]
    p = helpers.softmax(x)
    eye = np.eye(columns)
    want = np.einsum("ij,icd->icjd", np.eye(4), p[:, :, None] - eye)
    np.testing.assert_allclose(mixed, want, rtol=1e-12, atol=1e-15)

  @pytest.mark.parametrize("columns", [3, 40])
  def test_dense_sum_and_its_derivatives(self, columns):
    # jsoft._spellings.dense_sum, Σ u·z, is spelled with a select up to 128
    # logits (whose own ∂/∂u is 0 at u = 0) and with a clamp over; the
    # rule's higher-order derivatives differentiate it. Both: 0 for a zero
    # target on -inf, -inf for mass there; ∂/∂u = z clamped to the finite
    # floats, ∂/∂z = u (0 on -inf), in reverse and forward mode.
    z = _rng(42).normal(size=(4, columns))
    u = _rng(43).uniform(size=(4, columns))
    u[:, ::2] = 0.0
    z[0, 0] = -INF  # zero target
    z[1, 1] = -INF  # mass
    dense_sum = jax.jit(_spellings.dense_sum)  # traced, as in the rule
    value = np.asarray(dense_sum(u, z))
    with np.errstate(invalid="ignore"):
      want = np.sum(np.where(u == 0, 0.0, u * z), -1)
    np.testing.assert_allclose(value, want, rtol=1e-14)
    assert value[1] == -INF
    tiny = -np.finfo(np.float64).max
    rows = jnp.asarray([0, 2, 3])  # the rows without mass on -inf
    for mode in (jax.jacrev, jax.jacfwd):
      du, dz = mode(lambda u, z: dense_sum(u, z)[rows],
                    argnums=(0, 1))(u, z)
      du, dz = np.asarray(du)[:, rows], np.asarray(dz)[:, rows]
      eye = np.eye(3)[:, :, None]
      np.testing.assert_allclose(du, eye * np.maximum(z[rows], tiny),
                                 rtol=1e-14)
      live = np.where(z[rows] == -INF, 0, u[rows])
      np.testing.assert_allclose(dz, eye * live, rtol=1e-14)

  def test_matches_optax_float32(self):
    x = jnp.asarray(_rng(26).normal(size=(8, 10)), F32)
    t = jnp.asarray(_rng(27).dirichlet(np.ones(10), size=8), F32)
    np.testing.assert_allclose(prob_ce(x, t),
                               optax.softmax_cross_entropy(x, t), rtol=1e-6)

  def test_minus_inf_logit_with_zero_label_contributes_nothing(self):
    x = jnp.asarray([0.0, 1.0, -INF], F32)
    t = jnp.asarray([0.5, 0.5, 0.0], F32)
    assert np.isnan(optax.softmax_cross_entropy(x, t))  # the peer
    out = prob_ce(x, t)
    np.testing.assert_allclose(out, helpers.ce_prob([0.0, 1.0], [0.5, 0.5]),
                               rtol=1e-6)
    g = _grad(prob_ce, t)(x)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g[:2], helpers.ce_prob_grad([0.0, 1.0],
                                                           [0.5, 0.5]),
                               rtol=1e-6)
    assert g[2] == 0.0

  def test_one_hot_equals_integer_labels(self):
    x = _rng(28).normal(scale=5, size=(5, 6))
    y = _rng(29).integers(0, 6, size=5)
    np.testing.assert_allclose(prob_ce(x, np.eye(6)[y]), int_ce(x, y),
                               rtol=1e-14)

  def test_where_per_entry_and_per_example(self):
    x = _rng(30).normal(size=(2, 4))
    t = _rng(31).dirichlet(np.ones(4), size=2)
    entries = np.array([[True, False, True, True], [True] * 4])
    out = prob_ce(x, t, where=entries)
    np.testing.assert_allclose(out[0], helpers.ce_prob(x[0, [0, 2, 3]],
                                                       t[0, [0, 2, 3]]),
                               rtol=1e-14)
    np.testing.assert_allclose(out[1], helpers.ce_prob(x[1], t[1]), rtol=1e-14)
    examples = np.array([False, True])
    out = prob_ce(x, t, where=examples)
    assert out[0] == 0.0
    g = _grad(prob_ce, t, where=examples)(x)
    np.testing.assert_array_equal(g[0], np.zeros(4))

  def test_masked_out_row_of_garbage_gets_zero_gradient(self):
    x = jnp.asarray([[np.nan, 1.0], [1.0, 2.0]], F32)
    t = jnp.asarray([[0.5, 0.5], [0.5, 0.5]], F32)
    where = np.array([False, True])
    out = prob_ce(x, t, where=where)
    assert out[0] == 0.0
    g = np.asarray(_grad(prob_ce, t, where=where)(x))
    np.testing.assert_array_equal(g[0], np.zeros(2))
    np.testing.assert_allclose(g[1], helpers.ce_prob_grad([1.0, 2.0],
                                                          [0.5, 0.5]),
                               rtol=1e-6)

  def test_where_all_false(self):
    x = jnp.asarray([[1.0, 1e4]], F32)
    t = jnp.asarray([[0.5, 0.5]], F32)
    where = np.zeros((1, 2), bool)
    assert prob_ce(x, t, where=where)[0] == 0.0
    np.testing.assert_array_equal(_grad(prob_ce, t, where=where)(x),
                                  np.zeros((1, 2)))

  def test_axis_none_is_a_scalar(self):
    x = _rng(32).normal(size=(2, 3))
    t = _rng(33).dirichlet(np.ones(6)).reshape(2, 3)
    out = prob_ce(x, t, axis=None)
    assert out.shape == ()
    np.testing.assert_allclose(out, helpers.ce_prob(x.ravel(), t.ravel()),
                               rtol=1e-14)

  def test_minus_1000_float32(self):
    x = jnp.full((3,), -1000.0, F32)
    t = jnp.asarray([0.2, 0.3, 0.5], F32)
    assert helpers.rel_err(prob_ce(x, t), math.log(3)) < 1e-6

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_half_precision_computes_in_float32(self, dtype):
    x = jnp.asarray(_rng(34).normal(scale=4, size=(8, 17)), dtype)
    t = jnp.asarray(_rng(35).dirichlet(np.ones(17), size=8), dtype)
    out = prob_ce(x, t)
    assert out.dtype == F32
    expected = helpers.ce_prob(np.asarray(x, np.float64),
                               np.asarray(t, np.float64))
    assert helpers.rel_err(out, expected) < 1e-5
    assert _grad(prob_ce, t)(x).dtype == dtype

  def test_float32_over_100k_classes(self):
    x = jnp.asarray(_rng(36).normal(scale=3, size=(2, 100_000)), F32)
    t = jnp.asarray(_rng(37).dirichlet(np.ones(100_000), size=2), F32)
    expected = helpers.ce_prob(np.asarray(x), np.asarray(t))
    assert helpers.rel_err(prob_ce(x, t), expected) < 2e-6

  def test_nan_propagates(self):
    x = jnp.asarray([np.nan, 0.0], F32)
    assert np.isnan(prob_ce(x, jnp.asarray([0.0, 1.0], F32)))

  def test_empty(self):
    assert prob_ce(jnp.zeros((0, 3), F32), jnp.zeros((0, 3), F32)).shape == (
        0,)
    np.testing.assert_array_equal(
        prob_ce(jnp.zeros((2, 0), F32), jnp.zeros((2, 0), F32)), [0, 0])
