"""Never NaN where the math is finite: size-one and empty axes, every mix
of masks and ``-inf``, jax's own ``logsumexp`` cases, NaN debugging, and
``jsoft.checked`` with every mask.

References are float64 NumPy/SciPy or hand computation; the convention for
a slice with no mass (all masked, all ``-inf``, or empty) is softmax 0,
log_softmax and logsumexp ``-inf``, a loss of 0, and zero gradient.
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp

import jsoft
from tests import helpers

INF = np.inf
int_ce = jsoft.softmax_cross_entropy_with_integer_labels
prob_ce = jsoft.softmax_cross_entropy


# ------------------------------------------------- every mask, every -inf


def _rows(num_classes):
  """Every row of ``num_classes`` entries each one of: a finite logit, a
  ``-inf`` logit, or a finite logit masked out; as (logits, where)."""
  kinds = list(itertools.product(range(3), repeat=num_classes))
  finite = np.random.default_rng(num_classes).normal(
      size=(len(kinds), num_classes))
  k = np.asarray(kinds).reshape(len(kinds), num_classes)
  x = np.where(k == 1, -INF, finite)
  return x, k != 2


def _reference(x, where):
  """float64 softmax, log_softmax and logsumexp with the no-mass
  convention."""
  z = np.where(where, x, -INF)
  has_mass = np.isfinite(z).any(-1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    lse = np.where(has_mass, sp.logsumexp(np.where(has_mass, z, 0), -1,
                                          keepdims=True), -INF)
    logp = np.where(has_mass, z - lse, -INF)
  return np.exp(logp), logp, lse[..., 0]


@pytest.mark.parametrize("num_classes", [0, 1, 2, 3])
def test_softmax_family_for_every_mix_of_masks_and_minus_inf(num_classes):
  x, where = _rows(num_classes)
  p, logp, lse = _reference(x, where)
  np.testing.assert_allclose(jsoft.softmax(x, where=where), p, rtol=1e-14)
  np.testing.assert_allclose(jsoft.log_softmax(x, where=where), logp,
                             rtol=1e-14)
  np.testing.assert_allclose(jsoft.logsumexp(x, axis=-1, where=where), lse,
                             rtol=1e-14)
  # The gradient of Σ lse is the softmax: 0 on masked and -inf entries and
  # throughout a row with no mass.
  g = jax.grad(lambda x: jnp.sum(jsoft.logsumexp(x, axis=-1,
                                                 where=where)))(x)
  np.testing.assert_allclose(g, p, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("num_classes", [1, 2, 3])
def test_losses_for_every_mix_of_masks_and_minus_inf(num_classes):
  x, where = _rows(num_classes)
  p, logp, _ = _reference(x, where)
  # The probability loss against the uniform target over the row's classes
  # that have mass: finite wherever some class has mass, 0 where none has.
  live = where & np.isfinite(x)
  t = live / np.maximum(live.sum(-1, keepdims=True), 1)
  with np.errstate(invalid="ignore"):
    want = -np.sum(np.where(t > 0, t * logp, 0), -1)
  loss = prob_ce(x, t, where=where)
  np.testing.assert_allclose(loss, want, rtol=1e-14)
  g = jax.grad(lambda x: jnp.sum(prob_ce(x, t, where=where)))(x)
  np.testing.assert_allclose(g, p * t.sum(-1, keepdims=True) - t,
                             rtol=1e-13, atol=1e-15)
  # The integer loss on a label that has mass: finite, with y − t gradient.
  rows = live.any(-1)
  label = np.argmax(live, -1)
  loss = int_ce(x[rows], label[rows], where=where[rows])
  np.testing.assert_allclose(loss, -logp[rows, label[rows]], rtol=1e-14)


class TestSizeOneClassAxis:
  """A class axis of one entry is the seed post's formula at its smallest:
  the same results as longer axes."""

  def test_activations_with_every_entry_masked(self):
    x, none = jnp.array([[0.5]]), jnp.array([[False]])
    assert jsoft.softmax(x, where=none)[0, 0] == 0.0
    assert jsoft.log_softmax(x, where=none)[0, 0] == -INF

  def test_activations_unmasked(self):
    x = jnp.array([[0.5], [-1e30], [-INF]])
    np.testing.assert_array_equal(jsoft.softmax(x)[:2], [[1.0], [1.0]])
    np.testing.assert_array_equal(jsoft.log_softmax(x)[:2], [[0.0], [0.0]])
    assert jsoft.softmax(x)[2, 0] == 0.0  # no mass
    assert jsoft.log_softmax(x)[2, 0] == -INF

  def test_logsumexp_of_minus_inf_has_zero_gradient(self):
    assert jsoft.logsumexp(jnp.array([-INF])) == -INF
    assert jax.grad(jsoft.logsumexp)(jnp.array([-INF]))[0] == 0.0
    out = jsoft.logsumexp(jnp.array([1.0]), where=jnp.array([False]))
    assert out == -INF

  def test_logsumexp_over_several_size_one_axes(self):
    x = jnp.full((1, 1, 3), -INF)
    np.testing.assert_array_equal(jsoft.logsumexp(x, axis=(0, 1)),
                                  [-INF] * 3)

  def test_losses(self):
    x, none = jnp.array([[0.5]]), jnp.array([[False]])
    assert prob_ce(x, jnp.array([[1.0]]), where=none)[0] == 0.0
    assert prob_ce(x, jnp.array([[1.0]]))[0] == 0.0
    assert int_ce(x, jnp.array([0]))[0] == 0.0
    assert int_ce(x, jnp.array([0]), where=jnp.array([False]))[0] == 0.0
    g = jax.grad(lambda x: prob_ce(x, jnp.array([[1.0]]), where=none)[0])(x)
    assert g[0, 0] == 0.0
    out = jsoft.linear_cross_entropy(jnp.ones((2, 3)), jnp.ones((3, 1)),
                                     jnp.array([0, 0]))
    np.testing.assert_array_equal(out, [0.0, 0.0])


# ------------------------------------------- jax's own logsumexp cases

# Shapes with size-one axes, as in jax's tests/lax_scipy_test.py.
LSE_SHAPES = [(), (1,), (4,), (1, 1), (1, 4), (4, 1), (2, 1, 3), (1, 3, 1)]


# (keepdims, return_sign, use_b): each flag on and off, each pair together.
FLAGS = [(False, False, False), (True, True, False), (True, False, True),
         (False, True, True)]


def _lse_cases():
  for shape in LSE_SHAPES:
    for axis in [None, *range(-len(shape), len(shape))]:
      for keepdims, return_sign, use_b in FLAGS:
        yield shape, axis, keepdims, return_sign, use_b


def test_logsumexp_matches_scipy_on_jax_s_cases():
  rng = np.random.default_rng(12)
  for shape, axis, keepdims, return_sign, use_b in _lse_cases():
    a = rng.normal(size=shape)
    b = rng.normal(size=shape) if use_b else None
    want = sp.logsumexp(a, axis=axis, b=b, keepdims=keepdims,
                        return_sign=return_sign)
    got = jsoft.logsumexp(a, axis=axis, b=b, keepdims=keepdims,
                          return_sign=return_sign)
    # Shapes as NumPy's reductions (SciPy makes a 0-d input 1-d under
    # keepdims).
    reduced = np.shape(np.sum(a, axis=axis, keepdims=keepdims))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      case = str((shape, axis, keepdims, return_sign, use_b))
      assert np.shape(g) == reduced, case
      np.testing.assert_allclose(g, np.reshape(w, np.shape(g)), rtol=1e-13,
                                 err_msg=case)


@pytest.mark.parametrize("a,b", [
    ([1.0, INF], None), ([INF, INF], None), ([-INF, INF], None),
    ([1.0, INF], [1.0, 2.0]), ([1.0, INF], [1.0, -2.0]),
    ([-INF], None), ([-INF, -INF], None), ([np.nan, 1.0], None)])
def test_logsumexp_with_infinities_matches_scipy(a, b):
  a = np.asarray(a)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    want, want_sign = sp.logsumexp(a, b=b, return_sign=True)
    want_plain = sp.logsumexp(a, b=b)
  got, sign = jsoft.logsumexp(a, b=b, return_sign=True)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(sign, want_sign)
  np.testing.assert_array_equal(jsoft.logsumexp(a, b=b), want_plain)


def test_logsumexp_zero_scale_leaves_out_its_entry():
  # jax #5370: b = 0 on the largest entry must not dominate the shift.
  out = jsoft.logsumexp(np.array([-1000.0, -2.0]), b=np.array([1.0, 0.0]))
  assert out == -1000.0


def test_logsumexp_of_ones_raises_no_inf_alarm():
  # jax #7390: no internal inf under debug_infs.
  with jax.debug_infs(True):
    out = jsoft.logsumexp(np.ones(4, np.float32))
  np.testing.assert_allclose(out, 1 + np.log(4), rtol=1e-6)


def test_complex_input_names_the_difference():
  with pytest.raises(TypeError, match="real"):
    jsoft.logsumexp(jnp.array([1 + 1j, 2.0]))


# ------------------------------------------------------ NaN debugging

F = np.float32
X = jnp.asarray([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], F)
T = jnp.asarray([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], F)
Y = jnp.asarray([2, 0])

NAN_FREE = {
    "logsumexp": lambda: jsoft.logsumexp(F(1.0)),
    "logsumexp_b": lambda: jsoft.logsumexp(F(1.0), b=F(1.0)),
    "logsumexp_sign": lambda: jsoft.logsumexp(X, axis=1, return_sign=True),
    "softmax": lambda: jsoft.softmax(X),
    "log_softmax": lambda: jsoft.log_softmax(X),
    "int_ce": lambda: int_ce(X, Y),
    "int_ce_options": lambda: int_ce(
        X, Y.at[1].set(-100), ignore_index=-100, label_smoothing=0.1,
        z_loss=1e-3, logit_soft_cap=5.0, reduction="mean"),
    "int_ce_grad": lambda: jax.grad(lambda x: int_ce(
        x, Y, reduction="mean"))(X),
    "prob_ce": lambda: prob_ce(X, T),
    "prob_ce_grad": lambda: jax.grad(lambda x: prob_ce(
        x, T, reduction="sum"))(X),
    "bce": lambda: jsoft.sigmoid_binary_cross_entropy(X, T),
    "lce": lambda: jsoft.linear_cross_entropy(X, X.T, Y % 2, chunk_size=1),
    "distill": lambda: [jsoft.distillation_loss(X, T, divergence=d)
                        for d in ("forward_kl", "reverse_kl", "jsd")],
    "distill_grad": lambda: jax.grad(lambda x: jsoft.distillation_loss(
        x, T, divergence="jsd", reduction="sum"))(X),
    "kl": lambda: jsoft.kl_divergence(jnp.log(T[0]), T[1]),
    "linear_distill": lambda: jax.grad(lambda x: jsoft.linear_distillation_loss(
        x, X.T, X, X.T, labels=Y % 2, hard_weight=0.5, chunk_size=1,
        reduction="mean"))(X),
}


@pytest.mark.parametrize("name", sorted(NAN_FREE))
def test_no_false_alarm_under_debug_nans_op_by_op(name):
  # jax #7634: jax.debug_nans checks every operation's output when JIT is
  # disabled, so a NaN constant inside a kernel raises on clean input.
  with jax.debug_nans(True), jax.disable_jit():
    out = NAN_FREE[name]()
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(out))


def test_out_of_range_label_is_still_nan():
  loss = int_ce(X, jnp.asarray([2, 7]))
  assert np.isfinite(loss[0]) and np.isnan(loss[1])
  g = jax.grad(lambda x: int_ce(x, jnp.asarray([2, 7]))[1])(X)
  assert np.isnan(g[1]).all()


# ------------------------------------------------------ checked and masks


@pytest.mark.parametrize("rows", [
    dict(ignore_index=-100), dict(where=np.array([True, True]))])
def test_checked_accepts_nan_on_a_masked_entry_with_a_row_mask(rows):
  # A NaN masked out with a per-entry where= is not an error, whatever
  # per-example mask (ignore_index, or a row where=) comes with it.
  x = X.at[0, 1].set(np.nan)
  entries = np.array([[True, False, True], [True, True, True]])
  y = Y.at[1].set(-100) if "ignore_index" in rows else Y
  if "where" in rows:
    out = jsoft.checked(lambda x: int_ce(x, y, where=entries))(x)
    out_prob = jsoft.checked(lambda x: prob_ce(x, T, where=entries))(x)
  else:
    out = jsoft.checked(lambda x: int_ce(x, y, where=entries, **rows))(x)
    out_prob = out
  assert np.isfinite(out).all() and np.isfinite(out_prob).all()
  want = -helpers.log_softmax(np.asarray(X[0])[[0, 2]])[1]
  np.testing.assert_allclose(out[0], want, rtol=1e-6)


def test_checked_still_catches_nan_on_a_kept_entry_with_a_row_mask():
  x = X.at[0, 0].set(np.nan)
  entries = np.array([[True, False, True], [True, True, True]])
  with pytest.raises(AssertionError, match="finite"):
    jsoft.checked(lambda x: int_ce(x, Y, where=entries,
                                   ignore_index=-100))(x)


def _probability_edge_rows(columns, seed):
  """12 rows of logits and probability targets, the first three the edge
  cases: zero target on three -inf logits; all -inf with no target; target
  mass on a -inf logit."""
  rng = np.random.default_rng(seed)
  x = rng.normal(scale=3.0, size=(12, columns))
  t = rng.dirichlet(np.ones(columns), size=12)
  x[0, :3] = -INF  # zero target there
  t[0, :3] = 0.0
  t[0] /= t[0].sum()
  x[1, :] = -INF  # no mass, no target
  t[1, :] = 0.0
  x[2, 1] = -INF  # target mass on -inf
  return x, t


@pytest.mark.parametrize("columns", [6, 6000])
def test_probability_forward_on_both_sides_of_the_small_call_size(columns):
  # A forward pass over at most 2^16 logits takes the exact one-pass
  # spelling (a select per logit); over more, the one-pass loss with a
  # fallback when it is NaN. Both give: zero targets on -inf logits add
  # nothing; a row with no mass and no target gives 0; target mass on a
  # -inf logit gives +inf.
  x, t = _probability_edge_rows(columns, seed=columns)
  want = helpers.ce_prob(np.where(np.isinf(x), 0.0, x), t)
  want[0] = helpers.ce_prob(np.where(x[0] == -INF, -1e300, x[0]), t[0])
  want[1], want[2] = 0.0, INF
  np.testing.assert_allclose(prob_ce(x, t), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("columns", [6, 2000])
def test_probability_gradient_on_both_sides_of_the_product_first_size(columns):
  # A training step over 2^14 to 2^22 logits takes the dense sum as a plain
  # sum of products, with a fallback when it is NaN
  # (jsoft._spellings.dense_sum_product_first); a smaller one the guarded
  # sum. Both give the loss and the y − t gradient of a float64 reference:
  # zero targets on -inf logits add nothing and get a zero gradient, a row
  # with no mass and no target has loss 0 and gradient 0, target mass on a
  # -inf logit gives +inf.
  x, t = _probability_edge_rows(columns, seed=columns + 1)
  finite = np.where(np.isinf(x), -1e300, x)
  want = helpers.ce_prob(finite, t)
  want[1], want[2] = 0.0, INF
  want_grad = helpers.ce_prob_grad(finite, t)
  want_grad[1] = 0.0

  def total(x):
    per_row = prob_ce(x, t)
    return jnp.sum(per_row), per_row

  (_, loss), grad = jax.value_and_grad(total, has_aux=True)(x)
  np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-12)
  kept = np.arange(12) != 2  # the +inf row's gradient is not a number
  np.testing.assert_allclose(np.asarray(grad)[kept], want_grad[kept],
                             rtol=1e-12, atol=1e-12)


def test_probability_step_takes_the_product_first_sum_only_where_it_pays():
  # Pins the spelling: the training step's forward holds the cond of
  # jsoft._spellings.dense_sum_product_first from 2^14 to 2^22 unmasked
  # logits below 4096 rows, and nowhere else.
  def conds(n, c, where=None):
    x, t = jnp.zeros((n, c), jnp.float32), jnp.zeros((n, c), jnp.float32)
    step = jax.value_and_grad(
        lambda x: jnp.sum(prob_ce(x, t, where=where)))
    jaxpr = jax.make_jaxpr(step)(x)
    return sum(e.primitive.name == "cond"
               for e in helpers.jaxpr_eqns(jaxpr.jaxpr))

  assert conds(12, 2000) == 1
  assert conds(1024, 1000) == 1
  assert conds(8, 10) == 0  # too small
  assert conds(2048, 4096) == 0  # over 2^22 logits
  assert conds(4096, 8) == 0  # one kernel
  assert conds(12, 2000, where=jnp.ones((12, 2000), bool)) == 0  # masked
