"""The training options: autodiff modes, dtypes, masks, edge cases, errors.

Values against PyTorch live in test_torch_parity.py; this file needs no
PyTorch. References are float64 NumPy/SciPy, or the textbook formula in
jax.nn differentiated by JAX's own autodiff.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
from jax.test_util import check_grads

import jsoft
from tests import helpers

int_ce = jsoft.softmax_cross_entropy_with_integer_labels
prob_ce = jsoft.softmax_cross_entropy
bce = jsoft.sigmoid_binary_cross_entropy
rng = np.random.default_rng(1)
N, C = 4, 5
X = rng.normal(scale=2.0, size=(N, C))
Y = np.array([0, 4, -1, 2])
W = rng.uniform(0.5, 2.0, size=C)
P = rng.dirichlet(np.ones(C), size=N)
T = rng.uniform(size=(N, C))

ALL_INT = dict(ignore_index=-1, label_smoothing=0.1, z_loss=1e-2,
               logit_soft_cap=3.0, class_weights=W)


# ----------------------------------------------------------- the y − t rule


def test_gradient_is_prediction_minus_target():
  # ∂L/∂x̃ = softmax(x̃)·(Σt + 2λ·lse) − t, times sech²(x/a), from NumPy.
  eps, lam, cap = 0.1, 1e-2, 3.0
  g = jax.grad(lambda x: int_ce(x, Y, **ALL_INT).sum())(X)
  z = cap * np.tanh(X / cap)
  t = helpers.ce_int_target(Y, C, ignore_index=-1, label_smoothing=eps,
                           class_weights=W)
  lse = sp.logsumexp(z, -1, keepdims=True)
  expected = sp.softmax(z, -1) * (t.sum(-1, keepdims=True) + 2 * lam * lse) - t
  expected = expected / np.cosh(X / cap) ** 2 * (Y >= 0)[:, None]
  np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-15)


def test_values_match_float64_reference():
  np.testing.assert_allclose(
      int_ce(X, Y, **ALL_INT), helpers.ce_int(X, Y, **ALL_INT), rtol=1e-13)


# ------------------------------------------------------- every autodiff mode


MODES = {
    "int_all": lambda x: int_ce(x, Y, **ALL_INT),
    "int_all_mean": lambda x: int_ce(x, Y, **ALL_INT, reduction="mean"),
    "int_smoothing_entries": lambda x: int_ce(
        x, np.array([0, 4, 1, 2]), where=X > -1.5, label_smoothing=0.2),
    "int_cap_only": lambda x: int_ce(x, np.array([0, 4, 1, 2]),
                                     logit_soft_cap=2.0),
    "int_z_only": lambda x: int_ce(x, np.array([0, 4, 1, 2]), z_loss=0.05),
    "int_temperature": lambda x: int_ce(x, np.array([0, 4, 1, 2]),
                                        temperature=0.6),
    "int_all_temperature": lambda x: int_ce(x, Y, **ALL_INT, temperature=2.5,
                                            reduction="mean"),
    "prob_temperature_grad_labels": lambda t: prob_ce(
        X, t, logit_soft_cap=2.5, temperature=1.7),
    "prob_all": lambda x: prob_ce(x, P, label_smoothing=0.2, z_loss=1e-2,
                                  logit_soft_cap=2.5, reduction="mean"),
    "prob_all_grad_labels": lambda t: prob_ce(X, t, label_smoothing=0.2,
                                              z_loss=1e-2, logit_soft_cap=2.5),
    "binary_pos_weight": lambda x: bce(x, T, pos_weight=W, reduction="sum"),
    "binary_where_mean": lambda x: bce(x, T, pos_weight=W, where=X > 0,
                                       reduction="mean"),
    "binary_pos_weight_grad_labels": lambda t: bce(X, t, pos_weight=W),
}


@pytest.mark.parametrize("name", sorted(MODES))
def test_check_grads_every_mode(name):
  arg = P if name.endswith("labels") and "prob" in name else (
      T if name.endswith("labels") else X)
  check_grads(MODES[name], (arg,), order=2, modes=("fwd", "rev"))


def test_hessian_jacfwd_and_hvp_match_autodiff_of_the_formula():
  # The textbook formula in jax.nn, differentiated by JAX's autodiff.
  ref_all = lambda x: helpers.jax_ce_int(x, Y, **ALL_INT)  # noqa: E731
  f = lambda x: MODES["int_all"](x).sum()  # noqa: E731
  ref = lambda x: ref_all(x).sum()  # noqa: E731
  np.testing.assert_allclose(jax.hessian(f)(X), jax.hessian(ref)(X),
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(jax.jacfwd(MODES["int_all"])(X),
                             jax.jacrev(ref_all)(X), rtol=1e-10, atol=1e-12)
  v = rng.normal(size=X.shape)
  hvp = jax.jvp(jax.grad(f), (X,), (v,))[1]
  np.testing.assert_allclose(hvp, jax.jvp(jax.grad(ref), (X,), (v,))[1],
                             rtol=1e-10, atol=1e-12)


def test_vmap_matches_a_loop():
  xs = rng.normal(size=(3, N, C))
  ys = np.stack([Y, np.roll(Y, 1), np.full(N, -1)])
  fn = lambda x, y: int_ce(x, y, **ALL_INT, reduction="mean")  # noqa: E731
  batched = jax.vmap(fn)(xs, ys)
  looped = [fn(x, y) for x, y in zip(xs, ys, strict=True)]
  np.testing.assert_allclose(batched, looped, rtol=1e-14)
  assert batched[2] == 0.0  # all ignored


def test_options_under_jit_are_compile_time_constants():
  @jax.jit
  def step(x):
    return int_ce(x, Y, **ALL_INT, reduction="sum")

  np.testing.assert_allclose(step(X), int_ce(X, Y, **ALL_INT).sum(),
                             rtol=1e-14)
  with pytest.raises(TypeError, match="label_smoothing must be a Python"):
    jax.jit(lambda e: int_ce(X, Y, label_smoothing=e))(0.1)


# ------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_logits_give_float32_loss_and_own_dtype_gradient(dtype):
  x = jnp.asarray(X * 4, dtype)
  loss = int_ce(x, Y, **ALL_INT)
  assert loss.dtype == jnp.float32
  expected = helpers.ce_int(x, Y, **dict(
      ALL_INT, class_weights=np.asarray(W, np.float32)))
  assert helpers.rel_err(loss, expected) < 1e-5
  g = jax.grad(lambda x: int_ce(x, Y, **ALL_INT, reduction="mean"))(x)
  assert g.dtype == dtype
  for fn in (lambda x: prob_ce(x, P.astype(np.float32), label_smoothing=0.1,
                               reduction="mean"),
             lambda x: bce(x, T.astype(np.float32), pos_weight=W.astype(
                 np.float32), reduction="mean")):
    assert fn(x).dtype == jnp.float32
    assert jax.grad(fn)(x).dtype == dtype


# -------------------------------------------------- masks and edge cases


def test_ignored_and_masked_rows_get_exact_zero_even_with_nan_logits():
  x = X.copy()
  x[2] = np.nan  # row 2 is ignored (label -1)
  x[3] = np.inf
  where = np.array([True, True, True, False])
  loss, grad = jax.value_and_grad(
      lambda x: int_ce(x, Y, where=where, **ALL_INT, reduction="sum"))(x)
  assert np.isfinite(loss)
  assert np.all(np.asarray(grad)[2:] == 0)
  np.testing.assert_allclose(
      loss, helpers.ce_int(X[:2], Y[:2], **ALL_INT).sum(), rtol=1e-13)


def test_out_of_range_labels_that_are_not_ignored_are_nan():
  y = np.array([0, 5, -1, -2])
  loss = int_ce(X, y, ignore_index=-1, label_smoothing=0.1)
  assert np.isnan(loss[1]) and np.isnan(loss[3])
  assert loss[2] == 0 and np.isfinite(loss[0])
  assert np.isnan(int_ce(X, y, ignore_index=-1, reduction="mean"))


def test_smoothing_spreads_over_unmasked_classes_only():
  where = np.ones((N, C), bool)
  where[:, 3] = False
  y = np.array([0, 4, 1, 2])
  loss = int_ce(X, y, where=where, label_smoothing=0.3)
  logp = sp.log_softmax(np.where(where, X, -np.inf), -1)
  t = 0.7 * np.eye(C)[y] + 0.3 / 4 * where
  expected = -(t * np.where(where, logp, 0)).sum(-1)
  np.testing.assert_allclose(loss, expected, rtol=1e-13)
  g = jax.grad(lambda x: int_ce(x, y, where=where, label_smoothing=0.3).sum())(
      X)
  assert np.all(np.asarray(g)[:, 3] == 0)


def test_soft_cap_gradient_keeps_precision_far_out():
  # sech²(20) ≈ 1.7e-17: 1 − tanh² would give 0 in any precision.
  x = np.array([[60.0, 0.0, -60.0]])
  g = jax.grad(lambda x: int_ce(x, np.array([1]), logit_soft_cap=3.0).sum())(
      x)
  z = 3.0 * np.tanh(x / 3.0)
  expected = (sp.softmax(z) - np.eye(3)[1]) / np.cosh(x / 3.0) ** 2
  np.testing.assert_allclose(g, expected, rtol=1e-12)
  assert np.all(np.asarray(g)[0, [0, 2]] != 0)


def test_soft_cap_maps_infinite_logits_to_the_cap():
  # a·tanh(±inf/a) = ±a: finite loss, zero gradient at the infinite entries.
  x = np.array([[np.inf, 0.0, -np.inf]])
  loss, g = jax.value_and_grad(
      lambda x: int_ce(x, np.array([1]), logit_soft_cap=2.0).sum())(x)
  np.testing.assert_allclose(loss, -sp.log_softmax([2.0, 0.0, -2.0])[1],
                             rtol=1e-14)
  assert np.asarray(g)[0, 0] == 0 and np.asarray(g)[0, 2] == 0


def test_binary_pos_weight_is_exact_at_infinity():
  x = np.array([np.inf, -np.inf, -np.inf, np.inf])
  t = np.array([1.0, 0.0, 1.0, 0.0])
  loss, g = jax.value_and_grad(
      lambda x: bce(x, t, pos_weight=2.0).sum())(x)
  assert loss == np.inf
  np.testing.assert_array_equal(bce(x, t, pos_weight=2.0),
                                [0.0, 0.0, np.inf, np.inf])
  np.testing.assert_array_equal(g, [0.0, 0.0, -2.0, 1.0])


def test_probability_labels_mean_over_unmasked_examples():
  rows = np.array([True, False, True, True])
  loss = prob_ce(X, P, where=rows, label_smoothing=0.2, reduction="mean")
  t = 0.8 * P + 0.2 / C
  expected = -(t * sp.log_softmax(X, -1)).sum(-1)[rows].mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-13)
  assert prob_ce(X, P, where=np.zeros(N, bool), reduction="mean") == 0


def test_checked_lets_ignored_labels_through():
  step = jsoft.checked(jax.jit(
      lambda x, y: int_ce(x, y, ignore_index=-100, reduction="mean")))
  y = np.array([0, -100, 3, -100])
  np.testing.assert_allclose(
      step(X, y), helpers.ce_int(X[[0, 2]], y[[0, 2]]).mean(), rtol=1e-13)
  with pytest.raises(AssertionError, match="must lie in"):
    step(X, np.array([0, -100, 3, -3]))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing .* \[0, 1\]"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(logit_soft_cap=0.0), ValueError, r"logit_soft_cap .* \(0, inf\)"),
    (dict(logit_soft_cap=np.inf), ValueError, "finite"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be a Python int"),
    (dict(class_weights=np.ones(C + 1)), ValueError,
     r"class_weights must have shape \(5,\)"),
    (dict(label_smoothing="a lot"), TypeError, "must be a number"),
    (dict(temperature=0.0), ValueError, r"temperature .* \(0, inf\)"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=np.inf), ValueError, "finite"),
])
def test_bad_options_raise_clear_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    int_ce(X, np.array([0, 1, 2, 3]), **kwargs)


def test_binary_bad_pos_weight_shape():
  with pytest.raises(ValueError, match="pos_weight of shape"):
    bce(X, T, pos_weight=np.ones(C + 1))


# ------------------------------------------------------------ temperature


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_temperature_divides_what_the_softmax_sees(temperature, cap):
  # L = −log softmax(a·tanh(x/a)/T)_y, float64 SciPy.
  z = X if cap is None else cap * np.tanh(X / cap)
  z = z / temperature
  kept = Y >= 0
  want = helpers.ce_int(X, Y, ignore_index=-1, logit_soft_cap=cap,
                        temperature=temperature)
  got = int_ce(X, Y, ignore_index=-1, logit_soft_cap=cap,
               temperature=temperature)
  np.testing.assert_allclose(got, want, rtol=1e-13)
  want_prob = -np.sum(P * sp.log_softmax(z, -1), -1)
  np.testing.assert_allclose(
      prob_ce(X, P, logit_soft_cap=cap, temperature=temperature), want_prob,
      rtol=1e-13)
  # The gradient is (softmax − onehot)·dx̃/dx, with dx̃/dx = sech²(x/a)/T.
  slope = (1.0 if cap is None else 1 - np.tanh(X / cap) ** 2) / temperature
  onehot = np.eye(C)[np.where(kept, Y, 0)] * kept[:, None]
  g = jax.grad(lambda x: jnp.sum(int_ce(
      x, Y, ignore_index=-1, logit_soft_cap=cap, temperature=temperature)))(X)
  np.testing.assert_allclose(
      g, (sp.softmax(z, -1) * kept[:, None] - onehot) * slope, rtol=1e-12,
      atol=1e-15)


def test_temperature_with_every_option_matches_autodiff_of_the_formula():
  kw = dict(ALL_INT, temperature=0.7, reduction="mean")
  ref = lambda x: helpers.jax_ce_int(  # noqa: E731
      x, jnp.asarray(Y), **dict(kw, ignore_index=-1))
  f = lambda x: int_ce(x, Y, **kw)  # noqa: E731
  np.testing.assert_allclose(f(X), ref(X), rtol=1e-13)
  np.testing.assert_allclose(jax.hessian(f)(X), jax.hessian(ref)(X),
                             rtol=1e-10, atol=1e-12)


def test_temperature_one_is_the_plain_loss_bit_for_bit():
  x32 = jnp.asarray(X, jnp.float32)
  y = np.array([0, 4, 1, 2])
  np.testing.assert_array_equal(int_ce(x32, y, temperature=1.0),
                                int_ce(x32, y))
  np.testing.assert_array_equal(
      int_ce(x32, y, logit_soft_cap=3.0, temperature=1.0),
      int_ce(x32, y, logit_soft_cap=3.0))


# --------------------------------------------------------- sample weights

S = np.array([0.5, 2.0, 7.0, 1.5])  # example 2 is ignored (label -1)


def test_sample_weights_scale_each_example_and_the_mean():
  # L_n = s_n·w_y·CE_n; "mean" divides by Σ s_n·w_y over kept examples.
  kept = Y >= 0
  safe = np.where(kept, Y, 0)
  ce = helpers.ce_int(X, Y, ignore_index=-1, class_weights=W)
  got = int_ce(X, Y, ignore_index=-1, class_weights=W, sample_weights=S)
  np.testing.assert_allclose(got, S * ce, rtol=1e-13)
  mean = int_ce(X, Y, ignore_index=-1, class_weights=W, sample_weights=S,
                reduction="mean")
  np.testing.assert_allclose(mean, np.sum(S * ce) / np.sum((S * W[safe])[kept]),
                             rtol=1e-13)
  g = jax.grad(lambda x: int_ce(x, Y, ignore_index=-1, sample_weights=S,
                                reduction="sum"))(X)
  onehot = np.eye(C)[safe]
  np.testing.assert_allclose(
      g, (S * kept)[:, None] * (sp.softmax(X, -1) - onehot), rtol=1e-12,
      atol=1e-15)


def test_sample_weights_with_every_option_match_autodiff_of_the_formula():
  kw = dict(ALL_INT, temperature=1.3)
  f = lambda x: int_ce(x, Y, sample_weights=S, reduction="mean",  # noqa: E731
                       **kw)
  kept = Y >= 0
  share = np.sum((S * W[np.where(kept, Y, 0)])[kept])
  ref = lambda x: jnp.sum(helpers.jax_ce_int(  # noqa: E731
      x, jnp.asarray(Y), **kw) * S) / share
  np.testing.assert_allclose(f(X), ref(X), rtol=1e-13)
  np.testing.assert_allclose(jax.hessian(f)(X), jax.hessian(ref)(X),
                             rtol=1e-10, atol=1e-12)
  check_grads(f, (X,), order=2, modes=("fwd", "rev"))


def test_sample_weights_are_constants_and_ignored_rows_stay_zero():
  s = S.copy()
  s[2] = np.nan  # on the ignored example: no effect
  loss = int_ce(X, Y, ignore_index=-1, sample_weights=s)
  assert loss[2] == 0.0 and np.isfinite(loss).all()
  g = jax.grad(lambda s: int_ce(X, Y, ignore_index=-1, sample_weights=s,
                                reduction="sum"))(S)
  np.testing.assert_array_equal(g, np.zeros(N))
  with pytest.raises(ValueError, match=r"sample_weights must have shape"):
    int_ce(X, Y, sample_weights=np.ones(N + 1))
  assert np.isnan(int_ce(X, np.array([0, 9, 1, 2]), sample_weights=S)[1])
