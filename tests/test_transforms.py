"""Every public function under every JAX transformation, in float64.

Each case pairs a jsoft function of one float array with an independent
reference: the textbook formula written with jax.nn and differentiated by
JAX's own autodiff. Derivatives of every order must agree with it, and
``check_grads(order=2, modes=("fwd", "rev"))`` must pass against finite
differences.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoft
from tests import helpers

rng = np.random.default_rng(0)
X = rng.normal(size=(3, 4))
MASK = np.array([[True, False, True, True]] * 2 + [[True] * 4])
T = rng.dirichlet(np.ones(4), size=3)
Y = np.array([0, 3, 1])
B = rng.uniform(0.5, 2.0, size=(3, 4))
BIN = rng.uniform(size=(3, 4))
TEACHER = rng.normal(size=(3, 4))
HEAD = rng.normal(size=(4, 5))  # the student's head for X as hidden states
T_HIDDEN, T_HEAD = rng.normal(size=(3, 2)), rng.normal(size=(2, 5))


def _ref_kl(log_q, t):
  return jnp.sum(t * (jnp.log(t) - log_q), -1)


# name: (jsoft function of x, reference function of x, input)
CASES = {
    "softmax": (jsoft.softmax, jax.nn.softmax, X),
    "softmax_axis0": (functools.partial(jsoft.softmax, axis=0),
                      functools.partial(jax.nn.softmax, axis=0), X),
    "softmax_where": (functools.partial(jsoft.softmax, where=MASK),
                      lambda x: jnp.where(MASK, jax.nn.softmax(x, where=MASK),
                                          0), X),
    "log_softmax": (jsoft.log_softmax, jax.nn.log_softmax, X),
    "logsumexp": (functools.partial(jsoft.logsumexp, axis=-1),
                  functools.partial(jax.nn.logsumexp, axis=-1), X),
    "logsumexp_b": (lambda x: jsoft.logsumexp(x, axis=-1, b=B),
                    lambda x: jnp.log(jnp.sum(B * jnp.exp(x), axis=-1)), X),
    "logsumexp_b_grad_b": (lambda b: jsoft.logsumexp(X, axis=-1, b=b),
                           lambda b: jnp.log(jnp.sum(b * jnp.exp(X), -1)), B),
    "logsumexp_where": (lambda x: jsoft.logsumexp(x, axis=1, where=MASK),
                        lambda x: jax.nn.logsumexp(x, axis=1, where=MASK), X),
    "sigmoid": (jsoft.sigmoid, jax.nn.sigmoid, X),
    "log_sigmoid": (jsoft.log_sigmoid, jax.nn.log_sigmoid, X),
    "softmax_cross_entropy": (
        lambda x: jsoft.softmax_cross_entropy(x, T),
        lambda x: -jnp.sum(T * jax.nn.log_softmax(x), -1), X),
    "softmax_cross_entropy_grad_labels": (
        lambda t: jsoft.softmax_cross_entropy(X, t),
        lambda t: -jnp.sum(t * jax.nn.log_softmax(X), -1), T),
    "softmax_cross_entropy_where": (
        lambda x: jsoft.softmax_cross_entropy(x, T, where=MASK),
        lambda x: -jnp.sum(jnp.where(MASK, T * jax.nn.log_softmax(
            x, where=MASK), 0), -1), X),
    "integer_labels": (
        lambda x: jsoft.softmax_cross_entropy_with_integer_labels(x, Y),
        lambda x: helpers.jax_ce_int(x, jnp.asarray(Y)), X),
    "integer_labels_axis0": (
        lambda x: jsoft.softmax_cross_entropy_with_integer_labels(
            x.T, Y, axis=0),
        lambda x: helpers.jax_ce_int(x, jnp.asarray(Y)), X),
    "integer_labels_where": (
        lambda x: jsoft.softmax_cross_entropy_with_integer_labels(
            x, Y, where=MASK),
        # (No label of Y falls on a masked entry of MASK.)
        lambda x: helpers.jax_ce_int(x, jnp.asarray(Y), where=MASK), X),
    "sigmoid_binary_cross_entropy": (
        lambda x: jsoft.sigmoid_binary_cross_entropy(x, BIN),
        lambda x: helpers.jax_bce(x, BIN), X),
    "sigmoid_binary_cross_entropy_grad_labels": (
        lambda t: jsoft.sigmoid_binary_cross_entropy(X, t),
        lambda t: helpers.jax_bce(X, t), BIN),
    "distillation_forward_kl": (
        lambda x: jsoft.distillation_loss(x, TEACHER),
        lambda x: helpers.jax_distill(x, TEACHER), X),
    "distillation_reverse_kl_t2": (
        lambda x: jsoft.distillation_loss(x, TEACHER, divergence="reverse_kl",
                                          temperature=2.0),
        lambda x: helpers.jax_distill(
            x, TEACHER, divergence="reverse_kl", temperature=2.0), X),
    "distillation_jsd": (
        lambda x: jsoft.distillation_loss(x, TEACHER, divergence="jsd",
                                          beta=0.3),
        lambda x: helpers.jax_distill(
            x, TEACHER, divergence="jsd", beta=0.3), X),
    "kl_divergence": (lambda x: jsoft.kl_divergence(x, T),
                      lambda x: _ref_kl(x, T), X),
    "kl_divergence_grad_targets": (lambda t: jsoft.kl_divergence(X, t),
                                   lambda t: _ref_kl(X, t), T),
    "kl_divergence_with_log_targets_grad_targets": (
        lambda lt: jsoft.kl_divergence_with_log_targets(X, lt),
        lambda lt: _ref_kl(X, jnp.exp(lt)), np.log(T)),
    "linear_distillation_loss": (
        lambda h: jsoft.linear_distillation_loss(
            h, HEAD, T_HIDDEN, T_HEAD, divergence="jsd", chunk_size=2),
        lambda h: helpers.jax_distill(
            h @ HEAD, T_HIDDEN @ T_HEAD, divergence="jsd"), X),
}

# A fixed random weighting turns any output into a scalar with a non-trivial
# Hessian (a plain sum of softmax outputs is constant).
W = {name: rng.normal(size=np.shape(jax.eval_shape(f, x)))
     for name, (f, _, x) in CASES.items()}
V = rng.normal(size=X.shape)


def _scalar(name, f):
  return lambda x: jnp.sum(W[name] * f(x))


@pytest.fixture(params=sorted(CASES))
def case(request):
  name = request.param
  f, ref, x = CASES[name]
  return name, f, ref, jnp.asarray(x)


def test_jit(case):
  _, f, ref, x = case
  np.testing.assert_allclose(jax.jit(f)(x), ref(x), rtol=1e-12, atol=1e-14)


def test_vmap(case):
  _, f, ref, x = case
  xs = jnp.stack([x, 2 * x, -x])
  np.testing.assert_allclose(jax.vmap(f)(xs), jnp.stack([ref(v) for v in xs]),
                             rtol=1e-12, atol=1e-14)


def test_grad(case):
  name, f, ref, x = case
  np.testing.assert_allclose(jax.grad(_scalar(name, f))(x),
                             jax.grad(_scalar(name, ref))(x), rtol=1e-11,
                             atol=1e-13)


def test_jvp(case):
  _, f, ref, x = case
  v = jnp.asarray(V)
  out, tangent = jax.jvp(f, (x,), (v,))
  ref_out, ref_tangent = jax.jvp(ref, (x,), (v,))
  np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-11, atol=1e-13)


def test_jacfwd_and_jacrev(case):
  _, f, ref, x = case
  expected = jax.jacrev(ref)(x)
  np.testing.assert_allclose(jax.jacfwd(f)(x), expected, rtol=1e-11,
                             atol=1e-13)
  np.testing.assert_allclose(jax.jacrev(f)(x), expected, rtol=1e-11,
                             atol=1e-13)


def test_hessian(case):
  name, f, ref, x = case
  np.testing.assert_allclose(jax.hessian(_scalar(name, f))(x),
                             jax.hessian(_scalar(name, ref))(x), rtol=1e-10,
                             atol=1e-12)


def test_hessian_vector_product(case):
  name, f, ref, x = case
  v = jnp.asarray(V)
  hvp = jax.jvp(jax.grad(_scalar(name, f)), (x,), (v,))[1]
  hessian = jax.hessian(_scalar(name, ref))(x)
  expected = jnp.tensordot(hessian, v, axes=v.ndim)
  np.testing.assert_allclose(hvp, expected, rtol=1e-10, atol=1e-12)


def test_reverse_over_reverse(case):
  name, f, ref, x = case
  v = jnp.asarray(V)
  def grad_dot_v(g):
    return lambda x: jnp.vdot(jax.grad(_scalar(name, g))(x), v)
  np.testing.assert_allclose(jax.grad(grad_dot_v(f))(x),
                             jax.grad(grad_dot_v(ref))(x), rtol=1e-10,
                             atol=1e-12)


def test_check_grads_order_2(case):
  _, f, _, x = case
  check_grads(f, (x,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("name", ["integer", "probability", "linear"])
def test_float32_hessian_of_a_confident_prediction(name):
  # exp(-20) ≈ 2e-9: the sum of exponentials rounds to exactly 1 in float32,
  # where a max(s, 1) guard would halve ∂s (Hessian diag(p) − p pᵀ/2).
  logits = np.array([[20.0, 0.0, 0.0, 0.0]], np.float32)
  y = np.array([0])
  fns = {
      "integer": lambda z: jsoft.softmax_cross_entropy_with_integer_labels(
          z, y).sum(),
      "probability": lambda z: jsoft.softmax_cross_entropy(
          z, np.eye(4, dtype=np.float32)[y]).sum(),
      "linear": lambda z: jsoft.linear_cross_entropy(
          np.ones((1, 1), np.float32), z.reshape(1, 4), y).sum(),
  }
  hess = np.asarray(jax.hessian(fns[name])(jnp.asarray(logits)),
                    np.float64).reshape(4, 4)
  x = logits[0].astype(np.float64)
  p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
  expected = np.diag(p) - np.outer(p, p)
  # H[0, 0] = p₀(1 − p₀) ≈ 6e-9 is below float32's resolution at p₀ ≈ 1
  # (any float32 evaluation cancels to within an ulp of 1.0); every other
  # entry keeps its relative precision.
  off = ~np.eye(4, dtype=bool) | (np.arange(4) > 0)[:, None]
  np.testing.assert_allclose(hess[off], expected[off], rtol=1e-5, atol=1e-12)
  assert abs(hess[0, 0] - expected[0, 0]) < 1.2e-7
