"""policy_loss: every variant and aggregation against the papers' formulas
in float64 (PPO, DAPO clip-higher, dual clip, GSPO, CISPO, KL k1/k2/k3,
entropy bonus, token/sequence/constant means), masks with ragged and empty
sequences, log-ratios of ±1000, gradients against autodiff of the
textbook formula, check_grads, jit and vmap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoft

S, T = 4, 6
rng = np.random.default_rng(22)
LOGP = np.log(rng.uniform(0.05, 0.95, (S, T)))
OLD = LOGP + rng.normal(scale=0.3, size=(S, T))
REF = LOGP + rng.normal(scale=0.5, size=(S, T))
ENT = rng.uniform(0.1, 2.0, (S, T))
ADV_SEQ = np.array([1.3, -0.7, 0.4, -1.1])
ADV_TOK = rng.normal(size=(S, T))
LENGTHS = np.array([6, 3, 0, 5])  # ragged, one sequence all masked
MASK = np.arange(T) < LENGTHS[:, None]
MASK[3, 0] = False  # a masked prompt token before the completion

VARIANTS = {
    "ppo": dict(),
    "clip_higher": dict(clip_low=0.2, clip_high=0.28),
    "dual_clip": dict(clip_ratio_c=1.15),
    "gspo": dict(importance="sequence", clip_low=0.03, clip_high=0.04),
    "cispo": dict(loss_type="cispo", clip_low=1.0, clip_high=0.25),
    "kl_k1": dict(kl_coef=0.3, kl_estimator="k1"),
    "kl_k2": dict(kl_coef=0.3, kl_estimator="k2"),
    "kl_k3": dict(kl_coef=0.3, kl_estimator="k3"),
    "entropy": dict(entropy_coef=0.05),
}
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def textbook(xp, logp, old, adv, mask, ref=None, entropy=None, *,
             loss_type="ppo", importance="token", clip_low=0.2,
             clip_high=0.2, clip_ratio_c=None, kl_coef=0.0,
             kl_estimator="k3", entropy_coef=0.0, aggregation="token_mean",
             max_tokens=None, sg=lambda x: x):
  """The papers' formulas as written, in ``xp`` (NumPy or jax.numpy): the
  ratio ``exp(log π − log π_old)``, the min of the two surrogates (verl's
  dual clip), CISPO's ``sg(clip(r))·A·log π``, Schulman's estimators and
  the three normalisers. Inputs must be clean at masked tokens."""
  m = mask.astype(logp.dtype)
  adv = adv[:, None] if adv.ndim == 1 else adv
  delta = logp - old
  if importance == "sequence":
    n = xp.maximum(m.sum(-1, keepdims=True), 1)
    r = xp.exp((delta * m).sum(-1, keepdims=True) / n) * xp.ones_like(logp)
  else:
    r = xp.exp(delta)
  clipped = xp.clip(r, 1 - clip_low, 1 + clip_high)
  if loss_type == "ppo":
    pg = xp.maximum(-adv * r, -adv * clipped)
    if clip_ratio_c is not None:
      pg = xp.where(adv < 0, xp.minimum(pg, -clip_ratio_c * adv), pg)
  else:
    pg = -sg(clipped) * adv * logp
  term = pg
  if kl_coef:
    rho = ref - logp
    kl = {"k1": -rho, "k2": rho**2 / 2,
          "k3": xp.exp(rho) - 1 - rho}[kl_estimator]
    term = term + kl_coef * kl
  if entropy_coef:
    term = term - entropy_coef * entropy
  total = (term * m).sum(-1)
  n = m.sum(-1)
  if aggregation == "token_mean":
    return total.sum() / n.sum()
  if aggregation == "sequence_mean":
    has = n > 0
    return xp.where(has, total / xp.maximum(n, 1), 0).sum() / xp.sum(
        has.astype(m.dtype))
  return total.sum() / (logp.shape[0] * (max_tokens or logp.shape[-1]))


def _call(kw, logp=LOGP, old=OLD, adv=ADV_SEQ, mask=MASK, ref=REF, ent=ENT,
          **more):
  return jsoft.policy_loss(logp, old, adv, where=mask, ref_logprobs=ref,
                           entropy=ent, **kw, **more)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loss_matches_float64_reference(variant, aggregation):
  kw = dict(VARIANTS[variant], aggregation=aggregation)
  loss, _ = _call(kw)
  want = textbook(np, LOGP, OLD, ADV_SEQ, MASK, REF, ENT, **kw)
  np.testing.assert_allclose(loss, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_per_token_advantages_match_float64_reference(variant):
  kw = dict(VARIANTS[variant], aggregation="sequence_mean")
  loss, _ = _call(kw, adv=ADV_TOK)
  want = textbook(np, LOGP, OLD, ADV_TOK, MASK, REF, ENT, **kw)
  np.testing.assert_allclose(loss, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_match_autodiff_of_the_textbook_formula(variant,
                                                          aggregation):
  kw = dict(VARIANTS[variant], aggregation=aggregation)
  got = jax.grad(lambda lp, e: _call(kw, logp=lp, ent=e)[0],
                 argnums=(0, 1))(LOGP, ENT)
  want = jax.grad(lambda lp, e: textbook(
      jnp, lp, jnp.asarray(OLD), jnp.asarray(ADV_SEQ), jnp.asarray(MASK),
      jnp.asarray(REF), e, sg=jax.lax.stop_gradient, **kw),
      argnums=(0, 1))(jnp.asarray(LOGP), jnp.asarray(ENT))
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15)
  assert not np.any(np.asarray(got[0])[~MASK])  # masked: no gradient


def test_constant_normaliser_takes_max_tokens():
  kw = dict(aggregation="constant", max_tokens=10)
  loss, _ = _call(kw)
  np.testing.assert_allclose(
      loss, textbook(np, LOGP, OLD, ADV_SEQ, MASK, **kw), rtol=1e-13)
  np.testing.assert_allclose(loss * 10, _call(
      dict(aggregation="constant", max_tokens=1))[0], rtol=1e-13)


def test_stats_follow_their_definitions():
  kw = dict(clip_low=0.1, clip_high=0.15, clip_ratio_c=1.2, kl_coef=0.1)
  _, stats = _call(kw, adv=ADV_TOK)
  assert isinstance(stats, jsoft.PolicyStats)
  m = MASK.astype(float)
  mean = lambda x: np.sum(np.where(MASK, x, 0)) / m.sum()  # noqa: E731
  r = np.exp(LOGP - OLD)
  rho = REF - LOGP
  want = dict(low_clipped=mean((r < 0.9) & (ADV_TOK < 0)),
              high_clipped=mean((r > 1.15) & (ADV_TOK > 0)),
              dual_clipped=mean((r > 1.2) & (ADV_TOK < 0)),
              ratio=mean(r), policy_kl=mean(OLD - LOGP),
              kl=mean(np.exp(rho) - 1 - rho), entropy=mean(ENT))
  assert 0 < want["low_clipped"] and 0 < want["high_clipped"]
  assert 0 < want["dual_clipped"]
  for name, value in want.items():
    np.testing.assert_allclose(getattr(stats, name), value, rtol=1e-13,
                               err_msg=name)


def test_hand_computed_clip_higher_and_dual_clip():
  # r = 2 (A=1): clip-higher holds it at 1.28; r = 4 (A=−1): the dual clip
  # holds −A·r at c = 3; r = 0.5 (A=−1): max(r, 1 − 0.2) = 0.8.
  logp = np.log(np.array([[2.0, 4.0, 0.5]]))
  old = np.zeros((1, 3))
  adv = np.array([[1.0, -1.0, -1.0]])
  loss, stats = jsoft.policy_loss(logp, old, adv, clip_high=0.28,
                                  clip_ratio_c=3.0, aggregation="constant",
                                  max_tokens=1)
  np.testing.assert_allclose(loss, -1.28 + 3.0 + 0.8, rtol=1e-15)
  np.testing.assert_allclose(
      [stats.high_clipped, stats.dual_clipped, stats.low_clipped],
      [1.0, 1.0, 1.0])  # one each, weights 1 (max_tokens=1)
  g = jax.grad(lambda lp: jsoft.policy_loss(
      lp, old, adv, clip_ratio_c=3.0, max_tokens=1,
      aggregation="constant")[0])(logp)
  np.testing.assert_array_equal(g, np.zeros((1, 3)))  # every one clipped


def test_on_policy_gradient_is_minus_advantage():
  # old = log π itself: r = 1 and ∂L/∂log π = −A·w.
  g = jax.grad(lambda lp: jsoft.policy_loss(lp, lp, ADV_SEQ, where=MASK)[0])(
      LOGP)
  np.testing.assert_allclose(g, -ADV_SEQ[:, None] * MASK / MASK.sum(),
                             rtol=1e-15)


EXTREME = np.array([[1000.0, -1000.0, 1000.0, -1000.0]])
EXTREME_ADV = np.array([[1.0, 1.0, -1.0, -1.0]])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_log_ratios_of_plus_minus_1000_are_finite(variant):
  old = np.zeros((1, 4))
  kw = dict(VARIANTS[variant], max_tokens=1, aggregation="constant")

  def f(lp, e):
    return jsoft.policy_loss(lp, old, EXTREME_ADV, ref_logprobs=-lp,
                             entropy=e, **kw)[0]

  loss, grads = jax.value_and_grad(f, argnums=(0, 1))(EXTREME, np.ones((1, 4)))
  assert np.isfinite(loss)
  for g in grads:
    assert np.all(np.isfinite(g))


def test_log_ratios_of_plus_minus_1000_clip_to_their_bounds():
  old = np.zeros((1, 4))
  f = lambda lp, **kw: jsoft.policy_loss(  # noqa: E731
      lp, old, EXTREME_ADV, aggregation="constant", max_tokens=1, **kw)[0]
  terms = [-1.2, -math.exp(-20), math.exp(20), 0.8]  # δ clamped to ±20
  np.testing.assert_allclose(f(EXTREME), sum(terms), rtol=1e-14)
  np.testing.assert_allclose(f(EXTREME, clip_ratio_c=3.0),
                             sum(terms[:2]) + 3.0 + 0.8, rtol=1e-14)
  g = jax.grad(f)(EXTREME)
  np.testing.assert_array_equal(g, np.zeros((1, 4)))  # clipped or clamped
  g = jax.grad(lambda lp: f(lp, max_log_ratio=1e4))(EXTREME)
  np.testing.assert_array_equal(g[0, [0, 3]], [0.0, 0.0])  # clipped
  assert g[0, 1] == 0.0  # exp(-1000) underflows: the gradient r·A too


def test_masked_tokens_may_hold_nan_and_give_no_gradient():
  bad = lambda x: np.where(MASK, x, np.nan)  # noqa: E731
  for variant in ("ppo", "gspo", "cispo", "kl_k3", "entropy"):
    kw = VARIANTS[variant]
    clean = jax.value_and_grad(lambda lp, kw=kw: _call(kw, logp=lp)[0])(
        LOGP)
    dirty = jax.value_and_grad(lambda lp, kw=kw: _call(
        kw, logp=lp, old=bad(OLD), ref=bad(REF), ent=bad(ENT))[0])(bad(LOGP))
    np.testing.assert_array_equal(dirty[0], clean[0])
    np.testing.assert_array_equal(dirty[1], clean[1])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_all_masked_sequence_contributes_zero(aggregation):
  # Sequence 2 has no kept token: the loss is the other three's, and for
  # "sequence_mean" it is not counted (the mean is over three sequences).
  loss, _ = _call(dict(aggregation=aggregation))
  keep = LENGTHS > 0
  sub = _call(dict(aggregation=aggregation, max_tokens=T),
              logp=LOGP[keep], old=OLD[keep], adv=ADV_SEQ[keep],
              mask=MASK[keep], ref=REF[keep], ent=ENT[keep])[0]
  scale = 3 / 4 if aggregation == "constant" else 1.0
  np.testing.assert_allclose(loss, sub * scale, rtol=1e-14)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_all_masked_batch_is_zero_with_zero_gradient(aggregation):
  none = np.zeros((S, T), bool)
  loss, grad = jax.value_and_grad(lambda lp: _call(
      dict(aggregation=aggregation, kl_coef=0.1), logp=lp, mask=none)[0])(
          LOGP)
  assert loss == 0
  np.testing.assert_array_equal(grad, np.zeros((S, T)))
  stats = _call(dict(aggregation=aggregation), mask=none)[1]
  assert all(v == 0 for v in stats)


def test_no_gradient_to_old_logprobs_advantages_or_reference():
  kw = dict(kl_coef=0.3)
  grads = jax.grad(lambda o, a, r: _call(kw, old=o, adv=a, ref=r)[0],
                   argnums=(0, 1, 2))(OLD, ADV_TOK, REF)
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))


# Not CISPO: its stop-gradient weight makes the gradient differ from the
# value's finite differences by design.
@pytest.mark.parametrize("kw", [
    dict(clip_ratio_c=1.15, kl_coef=0.3, entropy_coef=0.05),
    dict(VARIANTS["gspo"], kl_coef=0.3, kl_estimator="k2")])
def test_check_grads_second_order(kw):
  kw = dict(kw, aggregation="sequence_mean")
  check_grads(lambda lp, e: _call(kw, logp=lp, ent=e)[0], (LOGP, ENT),
              order=2, modes=("fwd", "rev"), eps=1e-4)


def test_vmap_over_batches_equals_each_call():
  logp = np.stack([LOGP, LOGP[::-1]])
  old, adv, mask = np.stack([OLD, OLD]), np.stack([ADV_SEQ] * 2), np.stack(
      [MASK, MASK[::-1]])
  f = lambda lp, o, a, m: jsoft.policy_loss(  # noqa: E731
      lp, o, a, where=m, aggregation="sequence_mean")[0]
  got = jax.jit(jax.vmap(f))(logp, old, adv, mask)
  for i in range(2):
    np.testing.assert_allclose(got[i], f(logp[i], old[i], adv[i], mask[i]),
                               rtol=1e-14)


def test_16_bit_inputs_compute_in_float32():
  loss, stats = jsoft.policy_loss(LOGP.astype(jnp.bfloat16),
                                  OLD.astype(jnp.bfloat16),
                                  ADV_SEQ.astype(jnp.bfloat16))
  assert loss.dtype == jnp.float32 and stats.ratio.dtype == jnp.float32


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kl_coef=0.1), ValueError, "needs ref_logprobs"),
    (dict(entropy_coef=0.1), ValueError, "needs entropy"),
    (dict(loss_type="grpo"), ValueError, "loss_type must be one of"),
    (dict(aggregation="mean"), ValueError, "aggregation must be one of"),
    (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c"),
    (dict(clip_low=1.5), ValueError, "clip_low"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(old_logprobs=np.zeros((S, T + 1))), ValueError, "old_logprobs"),
])
def test_argument_errors(kwargs, error, match):
  args = dict(logprobs=LOGP, old_logprobs=OLD, advantages=ADV_SEQ)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    jsoft.policy_loss(**args)
