"""distillation_loss and the KL drop-ins for optax.

References: float64 NumPy from the definitions (``helpers.np_distill``) for
values, JAX's autodiff of the textbook formula (``helpers.jax_distill``)
for gradients and Hessians, and the closed form ``(p_s − p_t)/T`` of the
forward KL's gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jsoft
from tests import helpers

distill = jsoft.distillation_loss
KINDS = ("forward_kl", "reverse_kl", "jsd")
rng = np.random.default_rng(0)


def _logits(shape=(5, 7), scale=2.0, seed=0):
  r = np.random.default_rng(seed)
  return r.normal(scale=scale, size=shape), r.normal(scale=scale, size=shape)


def _with_no_mass(s, t):
  """Row 0: an entry where both have no mass; row 1: the teacher has none
  where the student has some (forward KL stays finite); row 2: a masked-out
  entry pattern is left to ``where``."""
  s, t = s.copy(), t.copy()
  s[0, 2] = t[0, 2] = -np.inf
  t[1, 4] = -np.inf
  return s, t


# ------------------------------------------------------------------ values


CASES = [(kind, temp, beta) for kind in KINDS for temp in (1.0, 2.0)
         for beta in ((0.1, 0.5, 0.9) if kind == "jsd" else (0.5,))]


@pytest.mark.parametrize("kind,temp,beta", CASES)
def test_values_match_float64_definition(kind, temp, beta):
  s, t = _logits()
  if kind != "reverse_kl":  # reverse KL is +inf there: tested below
    s, t = _with_no_mass(s, t)
  where = np.ones(s.shape, bool)
  where[3, [0, 5]] = False
  where[4] = False  # a row with nothing unmasked: 0
  got = distill(s, t, divergence=kind, beta=beta, temperature=temp,
                where=where)
  want = helpers.np_distill(s, t, kind, beta, temp, where)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  assert got[4] == 0


def test_seed_vector_by_hand():
  # p_t = softmax([3, 2, -inf]) = [e/(e+1), 1/(e+1), 0];
  # KL = Σ p_t (log p_t − log softmax([1, 2, 3])).
  e = np.e
  pt = np.array([e / (e + 1), 1 / (e + 1)])
  log_ps = np.array([1.0, 2.0]) - np.log(e + e**2 + e**3)
  want = np.sum(pt * (np.log(pt) - log_ps))
  got = distill(jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 2.0, -jnp.inf]))
  np.testing.assert_allclose(got, want, rtol=1e-14)


def test_equal_distributions_give_zero():
  s, _ = _logits()
  for kind in KINDS:
    np.testing.assert_allclose(distill(s, s + 3.0, divergence=kind), 0,
                               atol=1e-14)


def test_jsd_is_symmetric_at_one_half_and_bounded_by_log_2():
  s, t = _logits(scale=8.0)
  a = distill(s, t, divergence="jsd")
  np.testing.assert_allclose(a, distill(t, s, divergence="jsd"), rtol=1e-12)
  assert np.all(a <= np.log(2) + 1e-12) and np.all(a >= 0)


def test_forward_kl_is_optax_kl_of_the_softmaxes():
  s, t = _logits()
  want = optax.losses.kl_divergence(jax.nn.log_softmax(s / 2),
                                    jax.nn.softmax(t / 2))
  np.testing.assert_allclose(distill(s, t, temperature=2.0), want,
                             rtol=1e-12)


def test_infinite_where_the_other_distribution_has_no_mass():
  s = jnp.array([[0.0, -jnp.inf, 1.0], [0.0, 1.0, 2.0]])
  t = jnp.array([[0.0, 1.0, 1.0], [0.0, -jnp.inf, 2.0]])
  fwd = distill(s, t)
  rev = distill(s, t, divergence="reverse_kl")
  assert fwd[0] == jnp.inf and np.isfinite(fwd[1])
  assert rev[1] == jnp.inf and np.isfinite(rev[0])
  assert np.all(np.isfinite(distill(s, t, divergence="jsd")))


def test_reductions_and_example_mask():
  s, t = _logits()
  rows = np.array([True, False, True, True, False])
  per = helpers.np_distill(s, t, "jsd")
  np.testing.assert_allclose(
      distill(s, t, divergence="jsd", where=rows, reduction="sum"),
      per[rows].sum(), rtol=1e-12)
  np.testing.assert_allclose(
      distill(s, t, divergence="jsd", where=rows, reduction="mean"),
      per[rows].mean(), rtol=1e-12)
  np.testing.assert_allclose(distill(s, t, reduction="mean"),
                             helpers.np_distill(s, t).mean(), rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, (0, 2)])
def test_class_axis(axis):
  s, t = _logits((3, 4, 5))
  axes = axis if isinstance(axis, tuple) else (axis,)
  rest = tuple(i for i in range(3) if i not in axes)
  flat = lambda x: np.transpose(x, rest + axes).reshape(  # noqa: E731
      [s.shape[i] for i in rest] + [-1])
  np.testing.assert_allclose(distill(s, t, axis=axis, divergence="jsd"),
                             helpers.np_distill(flat(s), flat(t), "jsd"),
                             rtol=1e-12)


def test_16_bit_logits_give_float32():
  s, t = _logits()
  got = distill(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
  assert got.dtype == jnp.float32
  want = helpers.np_distill(jnp.asarray(s, jnp.bfloat16),
                            jnp.asarray(t, jnp.bfloat16))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- gradients


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_forward_kl_gradient_is_student_minus_teacher(temp):
  s, t = _with_no_mass(*_logits())
  g = jax.grad(lambda s: distill(s, t, temperature=temp).sum())(s)
  want = (helpers.softmax(s / temp) - helpers.softmax(t / temp)) / temp
  np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind,temp,beta", CASES)
def test_gradient_and_hessian_match_textbook_autodiff(kind, temp, beta):
  s, t = _logits((3, 6), seed=1)
  kw = dict(divergence=kind, beta=beta, temperature=temp)
  ct = np.array([0.5, 1.0, 2.0])

  def ours(s):
    return jnp.sum(distill(s, t, **kw) * ct)

  def ref(s):
    return jnp.sum(helpers.jax_distill(s, t, **kw) * ct)

  np.testing.assert_allclose(jax.grad(ours)(s), jax.grad(ref)(s),
                             rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(jax.hessian(ours)(s), jax.hessian(ref)(s),
                             rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,temp", [(k, tp) for k in KINDS
                                       for tp in (1.0, 2.0)])
def test_check_grads_order_2_with_no_mass_entries(kind, temp):
  s, t = _logits((4, 6), seed=2)
  s[0, 2] = t[0, 2] = -np.inf
  if kind != "reverse_kl":
    t[2, 1] = -np.inf
  where = np.ones(s.shape, bool)
  where[3, 0] = False
  check_grads(lambda s: distill(s, t, divergence=kind, beta=0.3,
                                temperature=temp, where=where),
              (s,), order=2, modes=["fwd", "rev"])


def test_teacher_gets_no_gradient():
  s, t = _logits()
  for kind in KINDS:
    g = jax.grad(lambda t, k=kind: distill(s, t, divergence=k).sum())(t)
    np.testing.assert_array_equal(g, 0)
    _, tangent = jax.jvp(lambda t, k=kind: distill(s, t, divergence=k), (t,),
                         (np.ones_like(t),))
    np.testing.assert_array_equal(tangent, 0)


def test_masked_entries_and_no_mass_rows_get_zero_gradient():
  s, t = _logits()
  where = np.ones(s.shape, bool)
  where[1, 3] = False
  where[4] = False
  for kind in KINDS:
    g = jax.grad(lambda s, k=kind: distill(s, t, divergence=k,
                                           where=where).sum())(s)
    assert g[1, 3] == 0 and np.all(g[4] == 0)
    assert np.all(np.isfinite(g))


def test_never_nan_where_finite_including_huge_logits():
  s = jnp.array([[-1000.0, -1000.0, -1000.0], [1e4, 0.0, -1e4]])
  t = jnp.array([[-1000.0, -1001.0, -1030.0], [-1e4, 0.0, 1e4]])
  for kind in KINDS:
    for temp in (1.0, 0.1):
      v, g = jax.value_and_grad(lambda s, k=kind, tp=temp: distill(
          s, t, divergence=k, temperature=tp).sum())(s)
      assert np.isfinite(v) and np.all(np.isfinite(g)), (kind, temp)
      want = helpers.np_distill(s, t, kind, 0.5, temp).sum()
      np.testing.assert_allclose(v, want, rtol=1e-12)


def test_transformations():
  s, t = _logits((2, 3, 5))
  f = lambda s: distill(s, t, divergence="jsd")  # noqa: E731
  np.testing.assert_allclose(
      jax.vmap(lambda s, t: distill(s, t, divergence="jsd"))(s, t), f(s),
      rtol=1e-13)
  jac_f = jax.jacfwd(lambda s: f(s).sum())(s)
  jac_r = jax.jacrev(lambda s: f(s).sum())(s)
  np.testing.assert_allclose(jac_f, jac_r, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kw,match", [
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(divergence="jsd", beta=1.0), "beta"),
    (dict(divergence="jsd", beta=0.0), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_options_raise(kw, match):
  s, t = _logits()
  with pytest.raises(ValueError, match=match):
    distill(s, t, **kw)


def test_shape_and_dtype_errors():
  s, t = _logits()
  with pytest.raises(ValueError, match="teacher_logits must have shape"):
    distill(s, t[:, :3])
  with pytest.raises(TypeError, match="student_logits must be a floating"):
    distill(np.ones((2, 3), np.int32), np.ones((2, 3)))


# -------------------------------------------------- optax's KL drop-ins
#
# optax's own cases (losses/_classification_test.py), in our words.

LOG_PS = np.array([[-2.9957, -3.5066, -3.9120, -1.2040, -0.6931, -2.3026],
                   [-1.6094, -1.6094, -1.6094, -2.3026, -1.8971, -1.8971]])
QS = np.array([[0.2, 0.2, 0.2, 0.1, 0.15, 0.15],
               [0.05, 0.03, 0.02, 0.3, 0.5, 0.0]])


def _np_kl(log_p, q):
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.sum(np.where(q > 0, q * (np.log(q) - log_p), 0), axis=-1)


def test_kl_divergence_optax_values():
  got = jax.jit(jsoft.kl_divergence)(LOG_PS, QS)
  np.testing.assert_allclose(got, [0.8875577, 0.7592807], atol=1e-4)
  np.testing.assert_allclose(got, _np_kl(LOG_PS, QS), rtol=1e-12)
  np.testing.assert_allclose(jsoft.kl_divergence(LOG_PS[0], QS[0]),
                             0.8875577, atol=1e-4)


def test_kl_divergence_with_log_targets_optax_values():
  got = jsoft.kl_divergence_with_log_targets(LOG_PS, LOG_PS[::-1])
  np.testing.assert_allclose(got, [0.8875625, 0.7187435584901326],
                             atol=1e-4)


@pytest.mark.parametrize("fn", ["kl_divergence",
                                "kl_divergence_with_log_targets"])
@pytest.mark.parametrize("size", [5, 10])
def test_kl_mask_is_leaving_entries_out(fn, size):
  r = np.random.default_rng(size)
  preds = r.normal(size=size)
  targets = r.dirichlet(np.ones(size))
  if fn.endswith("log_targets"):
    targets = np.log(targets)
  mask = r.integers(2, size=size).astype(bool)
  f = getattr(jsoft, fn)
  np.testing.assert_allclose(f(preds, targets, where=mask),
                             f(preds[mask], targets[mask]), rtol=1e-12)


@pytest.mark.parametrize("fn", ["kl_divergence",
                                "kl_divergence_with_log_targets"])
@pytest.mark.parametrize("axis", [0, 1, 2, (0, 2), None])
def test_kl_axis_matches_optax(fn, axis):
  r = np.random.default_rng(1)
  preds = r.normal(size=(4, 5, 6))
  targets = r.dirichlet(np.ones(6), size=(4, 5))
  if fn.endswith("log_targets"):
    targets = np.log(targets)
  np.testing.assert_allclose(
      getattr(jsoft, fn)(preds, targets, axis=axis),
      getattr(optax.losses, fn)(preds, targets, axis=axis), rtol=1e-12)


def test_kl_zero_targets_on_minus_inf_predictions():
  # optax gives NaN (0·inf); the math gives 0, with finite gradients.
  log_p = jnp.array([0.0, -jnp.inf, -1.0])
  q = jnp.array([0.7, 0.0, 0.3])
  want = 0.7 * np.log(0.7) + 0.3 * (np.log(0.3) + 1.0)
  assert np.isnan(optax.losses.kl_divergence(log_p, q))
  np.testing.assert_allclose(jsoft.kl_divergence(log_p, q), want,
                             rtol=1e-14)
  g_p, g_q = jax.grad(jsoft.kl_divergence, argnums=(0, 1))(log_p, q)
  np.testing.assert_allclose(g_p, -q)
  np.testing.assert_allclose(g_q, [np.log(0.7) + 1, 0, np.log(0.3) + 2],
                             rtol=1e-14)
  log_q = jnp.log(q)
  np.testing.assert_allclose(
      jsoft.kl_divergence_with_log_targets(log_p, log_q), want, rtol=1e-14)
  g_p, g_lq = jax.grad(jsoft.kl_divergence_with_log_targets,
                       argnums=(0, 1))(log_p, log_q)
  np.testing.assert_allclose(g_p, -q)
  np.testing.assert_allclose(g_lq, [0.7 * (np.log(0.7) + 1), 0,
                                    0.3 * (np.log(0.3) + 2)], rtol=1e-14)


def test_kl_positive_target_on_minus_inf_prediction_is_infinite():
  got = jsoft.kl_divergence(jnp.array([0.0, -jnp.inf]), jnp.array([0.5, 0.5]))
  assert got == jnp.inf


def test_kl_matches_optax_where_optax_is_finite():
  r = np.random.default_rng(3)
  log_p = jax.nn.log_softmax(r.normal(size=(6, 9)))
  q = r.dirichlet(np.ones(9), size=6)
  for fn, target in (("kl_divergence", q),
                     ("kl_divergence_with_log_targets", np.log(q))):
    ours, theirs = (jax.value_and_grad(
        lambda a, b, f=getattr(lib, fn): f(a, b).sum(),  # noqa: B008
        argnums=(0, 1))(log_p, target) for lib in (jsoft, optax.losses))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-12)


def test_kl_rejects_integer_inputs():
  with pytest.raises(TypeError, match="floating"):
    jsoft.kl_divergence(np.zeros(3, np.int32), np.ones(3))
