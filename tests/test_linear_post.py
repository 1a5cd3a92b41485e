"""linear_policy_loss and linear_preference_loss: the same values and
gradients (w.r.t. hidden, weight, bias) as policy_loss and preference_loss
composed on the materialised logits, in both loop orders, and sharded over
the vocabulary equal to one device in both shard_map modes."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jsoft
from jsoft import _compat
from tests import helpers

S, T, D, V = 3, 7, 4, 12
rng = np.random.default_rng(24)
H = rng.normal(size=(S, T, D))
W = rng.normal(size=(D, V))
B = rng.normal(size=V)
Y = rng.integers(0, V, size=(S, T))
MASK = np.arange(T) < np.array([7, 4, 0])[:, None]  # ragged, one empty
MASK[0, :2] = False  # prompt tokens
OLD = rng.normal(scale=0.3, size=(S, T)) - 2.5
REF = rng.normal(scale=0.5, size=(S, T)) - 2.5
ADV = np.array([0.9, -1.2, 0.4])
# Overlapping last tiles in both loops (21 tokens by 8, 12 classes by 5).
LOOPS = {"tokens": dict(tile_by="tokens", chunk_size=8),
         "classes": dict(tile_by="classes", chunk_size=5)}

POLICY = {
    "ppo_kl_entropy": dict(clip_high=0.28, clip_ratio_c=3.0, kl_coef=0.2,
                           entropy_coef=0.05),
    "gspo": dict(importance="sequence", clip_low=0.1, clip_high=0.1,
                 aggregation="sequence_mean"),
    "cispo_temperature": dict(loss_type="cispo", clip_low=1.0,
                              aggregation="constant", temperature=0.7,
                              kl_coef=0.1, kl_estimator="k2"),
}


def token_stats(h, w, b, y, temperature=1.0):
  """``log p_y`` and the entropy from the materialised logits."""
  logp = jax.nn.log_softmax((h @ w + b) / temperature)
  lp = jnp.take_along_axis(logp, jnp.asarray(y)[..., None], -1)[..., 0]
  return lp, -jnp.sum(jnp.exp(logp) * logp, -1)


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("name", sorted(POLICY))
def test_policy_equals_the_loss_on_materialised_logits(name, loop):
  kw = dict(POLICY[name])
  tau = kw.pop("temperature", 1.0)

  def fused(h, w, b):
    return jsoft.linear_policy_loss(h, w, Y, OLD, ADV, bias=b, where=MASK,
                                    ref_logprobs=REF, temperature=tau,
                                    **LOOPS[loop], **kw)

  def unfused(h, w, b):
    lp, ent = token_stats(h, w, b, Y, tau)
    return jsoft.policy_loss(lp, OLD, ADV, where=MASK, ref_logprobs=REF,
                             entropy=ent, **kw)

  helpers.assert_same_value_and_vjp(fused, unfused, H, W, B)


# The token-ratio fast path (gradients formed in the forward tile): 1040
# tokens, so the kept ones are gathered first (from 1024 on), in tiles of
# 96 whose last overlaps the one before; a ragged mask with an empty
# sequence, NaN in the masked tokens' old and reference log-probabilities.
FAST_S, FAST_T = 8, 130
FAST_H = rng.normal(size=(FAST_S, FAST_T, D))
FAST_Y = rng.integers(0, V, size=(FAST_S, FAST_T))
FAST_MASK = np.arange(FAST_T) < rng.integers(20, FAST_T, size=FAST_S)[:, None]
FAST_MASK[:, :10] = False  # the prompt
FAST_MASK[3] = False  # all masked
FAST_OLD = np.where(FAST_MASK, rng.normal(scale=0.4, size=FAST_MASK.shape)
                    - 2.5, np.nan)
FAST_REF = np.where(FAST_MASK, rng.normal(scale=0.4, size=FAST_MASK.shape)
                    - 2.5, np.nan)
FAST_ADV = rng.normal(size=(FAST_S, FAST_T))
FAST = dict(tile_by="tokens", chunk_size=96)


@pytest.mark.parametrize("bonus", [0.0, 0.05])
@pytest.mark.parametrize("aggregation",
                         ["token_mean", "sequence_mean", "constant"])
def test_token_ratio_fast_path_equals_materialised_logits(aggregation, bonus):
  kw = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, kl_coef=0.3,
            aggregation=aggregation, entropy_coef=bonus, max_tokens=150)
  tau, cap = 0.8, 3.0

  def fused(h, w, b):
    return jsoft.linear_policy_loss(h, w, FAST_Y, FAST_OLD, FAST_ADV, bias=b,
                                    where=FAST_MASK, ref_logprobs=FAST_REF,
                                    temperature=tau, logit_soft_cap=cap,
                                    **FAST, **kw)

  def unfused(h, w, b):
    logp = jax.nn.log_softmax(cap * jnp.tanh((h @ w + b) / cap) / tau)
    lp = jnp.take_along_axis(logp, FAST_Y[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    return jsoft.policy_loss(lp, FAST_OLD, FAST_ADV, where=FAST_MASK,
                             ref_logprobs=FAST_REF, entropy=ent, **kw)

  helpers.assert_same_value_and_vjp(fused, unfused, FAST_H, W, B)
  # Forward mode too (the rule's JVP is its VJP transposed).
  tangents = tuple(rng.normal(size=np.shape(x)) for x in (FAST_H, W, B))
  got = jax.jvp(lambda *a: fused(*a)[0], (FAST_H, W, B), tangents)
  want = jax.jvp(lambda *a: unfused(*a)[0], (FAST_H, W, B), tangents)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("vma", [True, False])
def test_token_ratio_fast_path_inside_shard_map(vma):
  # Data-parallel: each device takes two sequences through the fast path;
  # each device's loss equals the same call on its slice on one device.
  mesh = Mesh(np.array(jax.devices()[:4]), ("dp",))
  kw = dict(kl_coef=0.3, entropy_coef=0.05, aggregation="sequence_mean",
            **FAST)
  data = (FAST_Y, FAST_MASK, FAST_OLD, FAST_REF, FAST_ADV)

  def local(h, w, y, mask, old, ref, adv):
    loss, stats = jsoft.linear_policy_loss(h, w, y, old, adv, where=mask,
                                           ref_logprobs=ref, **kw)
    return loss[None], stats.entropy[None]

  spec = P("dp")
  step = helpers.shard_map(local, mesh=mesh,
                           in_specs=(spec, P(), *[spec] * len(data)),
                           out_specs=(spec, spec), check_vma=vma)
  sharded = jax.jit(lambda h, w: step(h, w, *data))

  def one(h, w):
    parts = [local(h[i:i + 2], w, *(x[i:i + 2] for x in data))
             for i in range(0, FAST_S, 2)]
    return tuple(jnp.concatenate(p) for p in zip(*parts, strict=True))

  helpers.assert_same_value_and_vjp(sharded, one, FAST_H, W, rtol=1e-12,
                                    vjp_rtol=1e-11)


def test_token_ratio_forms_its_gradients_in_the_forward_pass():
  # Three matmuls per token tile (logits, dh, dW), as the reduced CE head;
  # a sequence ratio needs the sequences' sums first: its backward pass
  # recomputes each tile (four).
  h, w = FAST_H[:, :64], W
  y, old, mask = FAST_Y[:, :64], FAST_OLD[:, :64], FAST_MASK[:, :64]

  def dots(**kw):
    step = jax.value_and_grad(lambda h, w: jsoft.linear_policy_loss(
        h, w, y, old, FAST_ADV[:, 0], where=mask, tile_by="tokens",
        chunk_size=96, **kw)[0], argnums=(0, 1))
    return helpers.count_dots(step, h, w)

  assert dots() == 3
  assert dots(entropy_coef=0.1, loss_type="cispo") == 3
  if _compat.JAX_VERSION < (0, 7):
    pytest.skip("the rest held; needs jax >= 0.7, before which the jaxpr "
                "keeps the dead forward pass of the transpose fallback "
                f"(XLA drops it); this is jax {jax.__version__}")
  assert dots(importance="sequence") == 4


PREFERENCE = {
    "dpo": dict(loss_type="sigmoid", beta=0.2,
                ref_chosen_logps=np.array([-9.0, -7.5]),
                ref_rejected_logps=np.array([-8.0, -6.0])),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "simpo": dict(loss_type="simpo", beta=2.0, gamma=0.3),
    "orpo": dict(loss_type="orpo", orpo_lambda=0.5),
}
PAIR_H = rng.normal(size=(2, 2, 5, D))
PAIR_Y = rng.integers(0, V, size=(2, 2, 5))
PAIR_MASK = np.ones((2, 2, 5), bool)
PAIR_MASK[:, :, :2] = False  # the prompt
PAIR_MASK[1, 0, 4] = False   # a shorter rejected completion


def composed_preference(lp, mask, name, kw):
  """``preference_loss`` of the sums of ``lp`` over each completion's kept
  tokens (``[2, ..., T]``, chosen first); SimPO and ORPO get the lengths."""
  sums = jnp.sum(jnp.where(mask, lp, 0), -1)
  more = {}
  if name in ("simpo", "orpo"):
    n = mask.sum(-1).astype(float)
    more = dict(chosen_lengths=n[0], rejected_lengths=n[1])
  return jsoft.preference_loss(sums[0], sums[1], **kw, **more)


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("name", sorted(PREFERENCE))
def test_preference_equals_the_loss_on_materialised_logits(name, loop):
  kw = PREFERENCE[name]

  def fused(h, w, b):
    return jsoft.linear_preference_loss(h, w, PAIR_Y, where=PAIR_MASK,
                                        bias=b, **LOOPS[loop], **kw)

  def unfused(h, w, b):
    return composed_preference(token_stats(h, w, b, PAIR_Y)[0], PAIR_MASK,
                               name, kw)

  helpers.assert_same_value_and_vjp(fused, unfused, PAIR_H, W, B)


# The reduced preference loss over tiles of tokens takes two passes in the
# forward pass (the sums, then the gradient tiles with each token's
# coefficient): 2 × 4 sequences × 130 tokens, so the kept ones are gathered
# first, in tiles of 96 whose last overlaps the one before; ragged
# completions, one empty, NaN features outside the completions.
TWO_T = 130
TWO_H = rng.normal(size=(2, 4, TWO_T, D))
TWO_Y = rng.integers(0, V, size=(2, 4, TWO_T))
TWO_MASK = np.arange(TWO_T) < rng.integers(30, TWO_T, size=(2, 4))[..., None]
TWO_MASK[..., :12] = False  # the prompt
TWO_MASK[1, 2] = False  # an empty rejected completion
TWO_REFS = dict(ref_chosen_logps=np.array([-200.0, -150.0, -90.0, -160.0]),
                ref_rejected_logps=np.array([-210.0, -120.0, 0.0, -170.0]))
TWO = {
    "dpo_smoothed": dict(loss_type="sigmoid", beta=0.02, label_smoothing=0.1,
                         **TWO_REFS),
    "robust": dict(loss_type="robust", beta=0.05, label_smoothing=0.2,
                   reduction="sum", **TWO_REFS),
    "ipo": dict(loss_type="ipo", beta=0.5, **TWO_REFS),
    "hinge": dict(loss_type="hinge", beta=0.1, reduction="sum", **TWO_REFS),
    "simpo": dict(loss_type="simpo", beta=2.0, gamma=0.3),
    "orpo": dict(loss_type="orpo", orpo_lambda=0.5, reduction="sum"),
}


@pytest.mark.parametrize("name", sorted(TWO))
def test_preference_two_passes_equal_materialised_logits(name):
  kw = TWO[name]
  tau, cap = 0.8, 3.0

  def fused(h, w, b):
    h = jnp.where(TWO_MASK[..., None], h, np.nan)  # NaN stays out
    return jsoft.linear_preference_loss(
        h, w, TWO_Y, where=TWO_MASK, bias=b, temperature=tau,
        logit_soft_cap=cap, tile_by="tokens", chunk_size=96, **kw)

  def unfused(h, w, b):
    logp = jax.nn.log_softmax(cap * jnp.tanh((h @ w + b) / cap) / tau)
    lp = jnp.take_along_axis(logp, TWO_Y[..., None], -1)[..., 0]
    return composed_preference(lp, TWO_MASK, name, kw)

  helpers.assert_same_value_and_vjp(fused, unfused, TWO_H, W, B)
  # Forward mode (the rule's JVP is its VJP transposed) and a
  # Hessian-vector product (the forward pass differentiated).
  tangents = tuple(rng.normal(size=np.shape(x)) for x in (TWO_H, W, B))
  got = jax.jvp(lambda *a: fused(*a)[0], (TWO_H, W, B), tangents)
  want = jax.jvp(lambda *a: unfused(*a)[0], (TWO_H, W, B), tangents)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)

  def hvp(f):
    grad = jax.grad(lambda *a: f(*a)[0], argnums=(0, 1, 2))
    return jax.jvp(grad, (TWO_H, W, B), tangents)[1]

  for g, want in zip(hvp(fused), hvp(unfused), strict=True):
    np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vma", [True, False])
def test_preference_two_passes_inside_shard_map(vma):
  # Data-parallel over the pairs: each device's loss and gradients equal
  # the same call on its pair on one device.
  mesh = Mesh(np.array(jax.devices()[:4]), ("dp",))
  kw = dict(loss_type="sigmoid", beta=0.02, tile_by="tokens", chunk_size=96)
  refs = (TWO_REFS["ref_chosen_logps"], TWO_REFS["ref_rejected_logps"])
  data = (TWO_Y, TWO_MASK, *refs)

  def local(h, w, y, mask, ref_c, ref_r):
    loss, stats = jsoft.linear_preference_loss(
        h, w, y, where=mask, ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r, **kw)
    return loss[None], stats.margin[None]

  pair, ref = P(None, "dp"), P("dp")
  step = helpers.shard_map(local, mesh=mesh,
                           in_specs=(pair, P(), pair, pair, ref, ref),
                           out_specs=(ref, ref), check_vma=vma)
  sharded = jax.jit(lambda h, w: step(h, w, *data))

  def one(h, w):
    parts = [local(h[:, i:i + 1], w, TWO_Y[:, i:i + 1],
                   TWO_MASK[:, i:i + 1], refs[0][i:i + 1], refs[1][i:i + 1])
             for i in range(4)]
    return tuple(jnp.concatenate(p) for p in zip(*parts, strict=True))

  helpers.assert_same_value_and_vjp(sharded, one, TWO_H, W, rtol=1e-12,
                                    vjp_rtol=1e-11)


def test_two_passes_check_the_references_shape():
  with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape "
                     r"\(4,\) \(one per pair\), got \(3,\)"):
    jsoft.linear_preference_loss(TWO_H, W, TWO_Y, where=TWO_MASK,
                                 tile_by="tokens", ref_chosen_logps=np.zeros(3),
                                 ref_rejected_logps=np.zeros(4))


def test_pairs_must_lead_with_an_axis_of_two():
  with pytest.raises(ValueError, match=r"\[2, \.\.\., T\]"):
    jsoft.linear_preference_loss(H, W, Y, where=MASK)


def test_hidden_nan_at_masked_tokens_stays_out():
  h = np.where(MASK[..., None], H, np.nan)
  f = lambda h, w: jsoft.linear_policy_loss(  # noqa: E731
      h, w, Y, OLD, ADV, where=MASK, entropy_coef=0.1)[0]
  loss, (gh, gw) = jax.value_and_grad(f, argnums=(0, 1))(h, W)
  want, (_, gw_clean) = jax.value_and_grad(f, argnums=(0, 1))(H, W)
  np.testing.assert_allclose(loss, want, rtol=1e-14)
  np.testing.assert_allclose(gw, gw_clean, rtol=1e-12)
  assert np.all(gh[~MASK] == 0)


@pytest.mark.parametrize("vma", [True, False])
def test_vocabulary_parallel_equals_one_device(vma):
  mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
  kw = dict(POLICY["ppo_kl_entropy"], where=MASK, ref_logprobs=REF)

  def local(h, w, b):
    loss, stats = jsoft.linear_policy_loss(h, w, Y, OLD, ADV, bias=b,
                                           axis_name="tp", **kw)
    return loss, stats.entropy

  sharded = jax.jit(helpers.shard_map(
      local, mesh=mesh, in_specs=(P(), P(None, "tp"), P("tp")),
      out_specs=(P(), P()), check_vma=vma))

  def one(h, w, b):
    loss, stats = jsoft.linear_policy_loss(h, w, Y, OLD, ADV, bias=b, **kw)
    return loss, stats.entropy

  helpers.assert_same_value_and_vjp(sharded, one, H, W, B, rtol=1e-12,
                                    vjp_rtol=1e-11)


def test_the_post_training_guide_runs():
  # The guide's Python blocks run as written, in order, in one namespace.
  guide = (pathlib.Path(__file__).resolve().parent.parent / "docs" /
           "guides" / "post_training.md")
  blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), re.S)
  assert len(blocks) == 3
  namespace: dict = {}
  with jax.numpy_dtype_promotion("standard"):
    for block in blocks:
      exec(compile(block, str(guide), "exec"), namespace)  # noqa: S102
  assert np.isfinite(namespace["loss"])
  assert all(np.all(np.isfinite(g)) for g in namespace["grads"])


@helpers.needs_jax((0, 10, 2), "the memory figures are this release's XLA")
def test_fused_heads_hold_under_a_sixteenth_of_the_logits_temp():
  # value_and_grad w.r.t. hidden and weight, float32, 8 × 1024 tokens with
  # a 128-token prompt masked out: XLA's temporaries against the same loss
  # on the materialised logits (compiled only, never run).
  s, t, d, v = 8, 1024, 64, 8192
  f32 = jnp.float32
  h, w = jnp.zeros((s, t, d), f32), jnp.zeros((d, v), f32)
  y, old = jnp.zeros((s, t), jnp.int32), jnp.zeros((s, t), f32)
  adv = jnp.ones((s,), f32)
  mask = jnp.broadcast_to(jnp.arange(t) >= 128, (s, t))
  pairs = lambda x: x.reshape(2, s // 2, *x.shape[1:])  # noqa: E731

  def temp(f):
    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    return step.lower(h, w).compile().memory_analysis().temp_size_in_bytes

  def logprobs(h, w):
    return token_stats(h, w, 0.0, y)[0]

  def preference(h, w, fused):
    if fused:
      return jsoft.linear_preference_loss(pairs(h), w, pairs(y),
                                          where=pairs(mask))[0]
    sums = pairs(jnp.sum(jnp.where(mask, logprobs(h, w), 0), -1))
    return jsoft.preference_loss(sums[0], sums[1])[0]

  fused = temp(lambda h, w: jsoft.linear_policy_loss(
      h, w, y, old, adv, where=mask)[0])
  unfused = temp(lambda h, w: jsoft.policy_loss(logprobs(h, w), old, adv,
                                                where=mask)[0])
  assert fused <= unfused / 16, (fused, unfused)
  fused = temp(lambda h, w: preference(h, w, True))
  unfused = temp(lambda h, w: preference(h, w, False))
  assert fused <= unfused / 16, (fused, unfused)
  # Its second pass is the reduced CE head's loop, and its backward pass
  # only scales: no more temp than that head on the same tokens (8.1 MiB
  # against 10.1; the per-token head's recompute took 18.2).
  head = temp(lambda h, w: jsoft.linear_cross_entropy(
      h, w, y, where=mask, tile_by="tokens", reduction="mean"))
  assert temp(lambda h, w: jsoft.linear_preference_loss(
      pairs(h), w, pairs(y), where=pairs(mask), tile_by="tokens")[0]) <= head
