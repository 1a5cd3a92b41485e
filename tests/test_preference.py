"""preference_loss: DPO (with cDPO smoothing), robust DPO, IPO, hinge, SimPO
and ORPO against the papers' formulas in float64, gradients against
autodiff of the textbook formula, masks, margins of ±1000, check_grads,
jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoft

P = 5
rng = np.random.default_rng(23)
LEN_C = np.array([3.0, 7.0, 1.0, 12.0, 5.0])
LEN_R = np.array([4.0, 2.0, 9.0, 6.0, 5.0])
CHOSEN = -LEN_C * rng.uniform(0.3, 2.0, P)  # sums over the tokens
REJECTED = -LEN_R * rng.uniform(0.3, 2.0, P)
REF_C = CHOSEN + rng.normal(scale=1.5, size=P)
REF_R = REJECTED + rng.normal(scale=1.5, size=P)
WHERE = np.array([True, True, False, True, True])

TYPES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.3),
    "cdpo": dict(loss_type="sigmoid", beta=0.3, label_smoothing=0.2),
    "robust": dict(loss_type="robust", beta=0.3, label_smoothing=0.2),
    "ipo": dict(loss_type="ipo", beta=0.4),
    "hinge": dict(loss_type="hinge", beta=0.3),
    "simpo": dict(loss_type="simpo", beta=2.0, gamma=0.5,
                  label_smoothing=0.1),
    "orpo": dict(loss_type="orpo", beta=0.1, orpo_lambda=0.7),
}
LENGTH_NORMALISED = ("simpo", "orpo")


def textbook(xp, c, r, rc, rr, *, loss_type, beta, label_smoothing=0.0,
             gamma=0.0, orpo_lambda=0.1, len_c=None, len_r=None):
  """Each pair's loss as the papers write it (``log σ(u) =
  −log(1 + e^−u)``; ORPO's odds from ``p = e^π̄``)."""
  logsig = lambda u: -xp.logaddexp(0.0, -u)  # noqa: E731
  eps = label_smoothing
  if loss_type in LENGTH_NORMALISED:
    c, r = c / len_c, r / len_r
    if loss_type == "simpo":
      v = beta * (c - r) - gamma
      return -(1 - eps) * logsig(v) - eps * logsig(-v)
    pc, pr = xp.exp(c), xp.exp(r)
    log_or = xp.log(pc / (1 - pc)) - xp.log(pr / (1 - pr))
    return -c - orpo_lambda * logsig(log_or)
  h = (c - rc) - (r - rr)
  u = beta * h
  if loss_type == "sigmoid":
    return -(1 - eps) * logsig(u) - eps * logsig(-u)
  if loss_type == "robust":
    return (-(1 - eps) * logsig(u) + eps * logsig(-u)) / (1 - 2 * eps)
  if loss_type == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  return xp.maximum(0.0, 1 - u)


def _kw(name):
  kw = dict(TYPES[name])
  if name in LENGTH_NORMALISED:
    return kw, dict(chosen_lengths=LEN_C, rejected_lengths=LEN_R)
  return kw, dict(ref_chosen_logps=REF_C, ref_rejected_logps=REF_R)


def _ref_kw(name):
  kw, more = _kw(name)
  if name in LENGTH_NORMALISED:
    return dict(kw, len_c=LEN_C, len_r=LEN_R)
  return kw


@pytest.mark.parametrize("name", sorted(TYPES))
def test_per_pair_loss_matches_float64_reference(name):
  kw, more = _kw(name)
  loss, _ = jsoft.preference_loss(CHOSEN, REJECTED, reduction="none",
                                  **kw, **more)
  want = textbook(np, CHOSEN, REJECTED, REF_C, REF_R, **_ref_kw(name))
  np.testing.assert_allclose(loss, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_gradients_match_autodiff_of_the_textbook_formula(name):
  kw, more = _kw(name)

  def ours(c, r):
    return jsoft.preference_loss(c, r, where=WHERE, **kw, **more)[0]

  def theirs(c, r):
    loss = textbook(jnp, c, r, jnp.asarray(REF_C), jnp.asarray(REF_R),
                    **_ref_kw(name))
    return jnp.sum(jnp.where(WHERE, loss, 0)) / float(WHERE.sum())

  got = jax.value_and_grad(ours, argnums=(0, 1))(CHOSEN, REJECTED)
  want = jax.value_and_grad(theirs, argnums=(0, 1))(jnp.asarray(CHOSEN),
                                                     jnp.asarray(REJECTED))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
  for g, w in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15)
    assert g[2] == 0  # the masked pair


def test_dpo_hand_computed_and_stats():
  # h = (−5 + 6) − (−5 + 4) = 2, u = βh = 1: −log σ(1) = log(1 + e^−1).
  loss, stats = jsoft.preference_loss(
      [-5.0, -3.0], [-5.0, -1.0], ref_chosen_logps=[-6.0, -3.0],
      ref_rejected_logps=[-4.0, -1.0], beta=0.5, reduction="none")
  np.testing.assert_allclose(loss, [np.log1p(np.exp(-1.0)), np.log(2.0)],
                             rtol=1e-15)
  assert isinstance(stats, jsoft.PreferenceStats)
  np.testing.assert_allclose(stats.chosen_rewards, [0.5, 0.0])
  np.testing.assert_allclose(stats.rejected_rewards, [-0.5, 0.0])
  np.testing.assert_allclose([stats.accuracy, stats.margin], [0.5, 0.5])


def test_reductions_and_masked_pairs():
  kw, more = _kw("sigmoid")
  each, _ = jsoft.preference_loss(CHOSEN, REJECTED, reduction="none",
                                  **kw, **more)
  mean, stats = jsoft.preference_loss(CHOSEN, REJECTED, where=WHERE, **kw,
                                      **more)
  total, _ = jsoft.preference_loss(CHOSEN, REJECTED, where=WHERE,
                                   reduction="sum", **kw, **more)
  np.testing.assert_allclose(mean, np.sum(each[WHERE]) / 4, rtol=1e-14)
  np.testing.assert_allclose(total, np.sum(each[WHERE]), rtol=1e-14)
  rc, rr = 0.3 * (CHOSEN - REF_C), 0.3 * (REJECTED - REF_R)
  np.testing.assert_allclose(stats.chosen_rewards, np.where(WHERE, rc, 0),
                             rtol=1e-14)
  np.testing.assert_allclose(stats.accuracy, np.mean((rc > rr)[WHERE]))
  np.testing.assert_allclose(stats.margin, np.mean((rc - rr)[WHERE]),
                             rtol=1e-14)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_masked_pairs_may_hold_nan(name):
  kw, more = _kw(name)
  bad = lambda x: np.where(WHERE, x, np.nan)  # noqa: E731
  more = {k: bad(v) for k, v in more.items()}
  f = lambda c, r: jsoft.preference_loss(  # noqa: E731
      c, r, where=WHERE, **kw, **more)[0]
  loss, grads = jax.value_and_grad(f, argnums=(0, 1))(bad(CHOSEN),
                                                       bad(REJECTED))
  assert np.isfinite(loss)
  for g in grads:
    assert np.all(np.isfinite(g)) and g[2] == 0


def test_all_masked_batch_is_zero():
  none = np.zeros(P, bool)
  kw, more = _kw("sigmoid")
  (loss, stats), grad = jax.value_and_grad(
      lambda c: jsoft.preference_loss(c, REJECTED, where=none, **kw, **more),
      has_aux=True)(CHOSEN)
  assert loss == 0 and stats.accuracy == 0 and stats.margin == 0
  np.testing.assert_array_equal(grad, np.zeros(P))


@pytest.mark.parametrize("name", sorted(TYPES))
def test_margins_of_plus_minus_1000_are_finite(name):
  kw, more = _kw(name)
  c = np.array([-1.0, -2000.0, -1e-30, -1000.0])
  r = np.array([-2000.0, -1.0, -1000.0, -1e-30])
  more = {k: np.ones(4) if "lengths" in k else np.zeros(4) for k in more}
  loss, grads = jax.value_and_grad(
      lambda c, r: jsoft.preference_loss(c, r, reduction="sum", **kw,
                                         **more)[0], argnums=(0, 1))(c, r)
  assert np.isfinite(loss)
  for g in grads:
    assert np.all(np.isfinite(g))


def test_dpo_tails_are_exact():
  # u = ±500: −log σ(u) is e^−500 (to full relative precision) or 500,
  # the gradient −β·σ(−u): −β·e^−500 or −β.
  loss, _ = jsoft.preference_loss([0.0, -1000.0], [-1000.0, 0.0], beta=0.5,
                                  reduction="none")
  np.testing.assert_allclose(loss, [np.exp(-500.0), 500.0], rtol=1e-15)
  g = jax.grad(lambda c: jsoft.preference_loss(
      c, np.array([-1000.0, 0.0]), beta=0.5, reduction="sum")[0])(
          np.array([0.0, -1000.0]))
  np.testing.assert_allclose(g, [-0.5 * np.exp(-500.0), -0.5], rtol=1e-15)


def test_lengths_equal_averages_given():
  for name in LENGTH_NORMALISED:
    kw, more = _kw(name)
    a = jsoft.preference_loss(CHOSEN, REJECTED, **kw, **more)[0]
    b = jsoft.preference_loss(CHOSEN / LEN_C, REJECTED / LEN_R, **kw)[0]
    np.testing.assert_allclose(a, b, rtol=1e-14)


def test_reference_free_dpo_is_zero_references():
  a = jsoft.preference_loss(CHOSEN, REJECTED)[0]
  b = jsoft.preference_loss(CHOSEN, REJECTED, ref_chosen_logps=np.zeros(P),
                            ref_rejected_logps=np.zeros(P))[0]
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["cdpo", "ipo", "simpo", "orpo"])
def test_check_grads_second_order(name):
  kw, more = _kw(name)
  check_grads(lambda c, r: jsoft.preference_loss(c, r, **kw, **more)[0],
              (CHOSEN, REJECTED), order=2, modes=("fwd", "rev"))


def test_no_gradient_to_references():
  g = jax.grad(lambda a, b: jsoft.preference_loss(
      CHOSEN, REJECTED, ref_chosen_logps=a, ref_rejected_logps=b)[0],
      argnums=(0, 1))(REF_C, REF_R)
  for x in g:
    np.testing.assert_array_equal(x, np.zeros(P))


def test_vmap_equals_each_call():
  c, r = np.stack([CHOSEN, REJECTED]), np.stack([REJECTED, CHOSEN])
  f = lambda c, r: jsoft.preference_loss(c, r, loss_type="ipo")[0]  # noqa
  got = jax.jit(jax.vmap(f))(c, r)
  for i in range(2):
    np.testing.assert_allclose(got[i], f(c[i], r[i]), rtol=1e-14)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="kto"), "loss_type must be one of"),
    (dict(ref_chosen_logps=REF_C), "or neither"),
    (dict(loss_type="simpo", ref_chosen_logps=REF_C,
          ref_rejected_logps=REF_R), "takes no reference"),
    (dict(chosen_lengths=LEN_C, rejected_lengths=LEN_R), "length-normalised"),
    (dict(loss_type="orpo", chosen_lengths=LEN_C), "or neither"),
    (dict(loss_type="robust", label_smoothing=0.5), "below 0.5"),
    (dict(beta=0.0), "beta"),
    (dict(rejected_logps=np.zeros(P + 1)), "rejected_logps"),
])
def test_argument_errors(kwargs, match):
  args = dict(chosen_logps=CHOSEN, rejected_logps=REJECTED)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    jsoft.preference_loss(**args)
