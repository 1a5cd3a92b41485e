r"""Policy-gradient losses on per-token log-probabilities: :func:`policy_loss`.

A loss of this family is a weighted sum of per-token terms,

.. math::
  L = \sum_{i,t} w_{i,t}\,\ell_{i,t}, \qquad
  \ell_{i,t} = \ell^{\text{pg}}_{i,t} + \beta_{\text{KL}}\,k_{i,t}
               - \beta_H\,H_{i,t},

the aggregation weights ``w`` depending on the mask alone
(:func:`weights`) and each term on its own token's numbers
(:func:`token_terms`; with a sequence-level ratio, on its sequence's mean
log-ratio). So the coefficient a fused head needs per token,
``c_t = ∂L/∂log p_t``, is ``w_t·∂ℓ_t/∂log p_t`` (plus the sequence mean's
share for GSPO): the head's gradient tile is ``−c_t·(onehot(y_t) − p_t)``.

Every log-ratio that is exponentiated is first clamped to
``[−max_log_ratio, max_log_ratio]``, and the PPO clip is taken on the
log-ratio before ``exp`` (``min(r, 1+ε) = exp(min(δ, log(1+ε)))``), so a
log-ratio of ±1000 gives a finite loss and a zero gradient where the clip
holds it, never ``inf − inf`` or ``0·inf``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks

LOSS_TYPES = ("ppo", "cispo")
IMPORTANCE = ("token", "sequence")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")


class PolicyStats(NamedTuple):
  """Diagnostics of :func:`jsoft.policy_loss`, each a scalar averaged with
  the loss's own aggregation weights (no gradient):

  * ``low_clipped``: the share of tokens clipped at ``1 − clip_low``
    (PPO: ``r < 1 − ε_low`` with ``A < 0``, whose gradient is 0; CISPO:
    ``r < 1 − ε_low``, whose weight is clipped);
  * ``high_clipped``: the share clipped at ``1 + clip_high`` (PPO:
    ``r > 1 + ε_high`` with ``A > 0``; CISPO: ``r > 1 + ε_high``);
  * ``dual_clipped``: the share held by the dual clip (``r > c``,
    ``A < 0``; 0 without ``clip_ratio_c``);
  * ``ratio``: the mean importance ratio ``r`` (token or sequence);
  * ``policy_kl``: ``k1`` from the old policy, the mean of
    ``log π_old − log π``;
  * ``kl``: the mean of the KL estimator to the reference (0 without
    ``ref_logprobs``);
  * ``entropy``: the mean entropy (0 without ``entropy``).
  """
  low_clipped: jax.Array
  high_clipped: jax.Array
  dual_clipped: jax.Array
  ratio: jax.Array
  policy_kl: jax.Array
  kl: jax.Array
  entropy: jax.Array


class Objective(NamedTuple):
  """The options of :func:`jsoft.policy_loss`, fixed at compile time."""
  loss_type: str
  importance: str
  clip_low: float
  clip_high: float
  clip_ratio_c: float | None
  kl_coef: float
  kl_estimator: str
  entropy_coef: float
  aggregation: str
  max_tokens: int | None
  max_log_ratio: float


def objective(fn: str, loss_type, importance, clip_low, clip_high,
              clip_ratio_c, kl_coef, kl_estimator, entropy_coef,
              aggregation, max_tokens, max_log_ratio) -> Objective:
  """Checks the options of a policy loss (trace-time errors naming
  ``fn``)."""
  if clip_ratio_c is not None:
    clip_ratio_c = _checks.static_float(clip_ratio_c, fn, "clip_ratio_c",
                                        low=1.0, open_low=True)
  max_tokens = _checks.static_int(max_tokens, fn, "max_tokens")
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"jsoft.{fn}: max_tokens must be at least 1, got "
                     f"{max_tokens}.")
  return Objective(
      _checks.one_of(loss_type, LOSS_TYPES, fn, "loss_type"),
      _checks.one_of(importance, IMPORTANCE, fn, "importance"),
      _checks.static_float(clip_low, fn, "clip_low", low=0.0, high=1.0),
      _checks.static_float(clip_high, fn, "clip_high", low=0.0),
      clip_ratio_c,
      _checks.static_float(kl_coef, fn, "kl_coef"),
      _checks.one_of(kl_estimator, KL_ESTIMATORS, fn, "kl_estimator"),
      _checks.static_float(entropy_coef, fn, "entropy_coef"),
      _checks.one_of(aggregation, AGGREGATIONS, fn, "aggregation"),
      max_tokens,
      _checks.static_float(max_log_ratio, fn, "max_log_ratio", low=0.0,
                           open_low=True))


def weights(mask: jax.Array, aggregation: str,
            max_tokens: int | None) -> jax.Array:
  """The aggregation weights ``w`` of ``[..., T]`` tokens (``mask``: 1 for
  kept tokens, 0 for the others), so that the loss is ``Σ w·ℓ``:

  * ``"token_mean"``: ``m / max(Σ m, 1)``, every kept token of the batch
    alike;
  * ``"sequence_mean"``: ``m / (max(n_i, 1)·max(S', 1))``, ``n_i`` the
    sequence's kept tokens and ``S'`` the sequences with at least one;
  * ``"constant"``: ``m / (S·max_tokens)``, ``S`` all sequences and
    ``max_tokens`` (default ``T``) a constant.

  An all-masked batch or sequence has weight 0 everywhere."""
  if aggregation == "token_mean":
    return mask / jnp.maximum(jnp.sum(mask), 1)
  if aggregation == "sequence_mean":
    n = jnp.sum(mask, -1, keepdims=True)
    seqs = jnp.maximum(jnp.sum((n > 0).astype(mask.dtype)), 1)
    return mask / (jnp.maximum(n, 1) * seqs)
  sequences = math.prod(mask.shape[:-1])
  return mask / (sequences * (max_tokens or mask.shape[-1]))


def _kl(estimator: str, rho: jax.Array, limit: float) -> jax.Array:
  """Schulman's estimators of ``KL(π‖π_ref)`` from ``ρ = log π_ref − log π``
  (tokens drawn from ``π``); ``k3`` exponentiates ``ρ`` clamped to
  ``±limit``."""
  if estimator == "k1":
    return -rho
  if estimator == "k2":
    return rho * rho / 2
  rho = jnp.clip(rho, -limit, limit)
  return jnp.expm1(rho) - rho


def log_ratios(obj: Objective, logp: jax.Array, old: jax.Array,
               mask: jax.Array) -> jax.Array:
  """Each token's log importance ratio ``δ = log π − log π_old`` (0 where
  masked), or with ``importance="sequence"`` its sequence's mean over the
  kept tokens (GSPO), clamped to ``±max_log_ratio``."""
  delta = jnp.where(mask > 0, logp - old, 0)
  if obj.importance == "sequence":
    n = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1)
    delta = jnp.broadcast_to(jnp.sum(delta, -1, keepdims=True) / n,
                             delta.shape)
  return jnp.clip(delta, -obj.max_log_ratio, obj.max_log_ratio)


def token_terms(obj: Objective, logp, old, adv, mask, ref, entropy):
  """Each token's term ``ℓ [..., T]`` and its diagnostics (a
  :class:`PolicyStats` of per-token arrays, before aggregation).

  ``logp`` and ``entropy`` carry gradients, the rest are constants. Masked
  tokens see ``log p = 0`` and ``δ = 0`` (the inner ``where`` of the
  double-where: whatever they hold, even NaN, never reaches a gradient)."""
  kept = mask > 0
  logp = jnp.where(kept, logp, 0)
  delta = log_ratios(obj, logp, old, mask)
  upper, lower = math.log1p(obj.clip_high), (
      -math.inf if obj.clip_low == 1 else math.log1p(-obj.clip_low))
  top = math.log(obj.clip_ratio_c) if obj.clip_ratio_c else math.inf
  neg = adv < 0
  if obj.loss_type == "ppo":
    # A ≥ 0: A·min(r, 1+ε_h); A < 0: A·min(max(r, 1−ε_l), c), the clip
    # taken on δ before exp, so a clipped δ never meets exp at all.
    clipped = jnp.where(neg, jnp.clip(delta, lower, top),
                        jnp.minimum(delta, upper))
    term = -adv * jnp.exp(clipped)
    low, high = (delta < lower) & neg, (delta > upper) & (adv > 0)
    dual = (delta > top) & neg
  else:
    # CISPO: the clipped ratio is a constant weight on log π.
    weight = lax.stop_gradient(jnp.exp(jnp.clip(delta, lower, upper)))
    term = -weight * adv * logp
    low, high, dual = delta < lower, delta > upper, jnp.zeros_like(kept)
  kl = jnp.zeros_like(term)
  if ref is not None:
    kl = _kl(obj.kl_estimator, jnp.where(kept, ref, 0) - logp,
             obj.max_log_ratio)
    term = term + obj.kl_coef * kl
  if entropy is None:
    entropy = jnp.zeros_like(term)
  else:
    entropy = jnp.where(kept, entropy, 0)
    if obj.entropy_coef:
      term = term - obj.entropy_coef * entropy
  dtype = term.dtype
  stats = PolicyStats(low.astype(dtype), high.astype(dtype),
                      dual.astype(dtype), jnp.exp(delta), old - logp, kl,
                      entropy)
  return term, stats


def aggregate(obj: Objective, term, stats, mask):
  """``(Σ w·ℓ, Σ w·stat)`` with the aggregation's weights ``w``."""
  w = weights(mask, obj.aggregation, obj.max_tokens)
  # Masked tokens weigh 0: where, not a product, so no 0·inf reaches them.
  total = lambda x: jnp.sum(jnp.where(mask > 0, w * x, 0))  # noqa: E731
  return total(term), lax.stop_gradient(PolicyStats(*map(total, stats)))


def _per_token(fn, x, shape, dtype, what):
  x = jnp.asarray(x)
  _checks.floating(x, fn, what)
  _checks.shape(x, shape, fn, what, "one per token, like logprobs")
  return x.astype(dtype)


def arrays(fn, logprobs, old_logprobs, advantages, where, ref_logprobs,
           entropy, obj):
  """The checked, cast operands: ``(logp, old, adv, mask, ref,
  entropy)``, the constants under ``stop_gradient``."""
  logprobs = jnp.asarray(logprobs)
  _checks.floating(logprobs, fn, "logprobs")
  if logprobs.ndim < 1:
    raise ValueError(f"jsoft.{fn}: logprobs must have shape [..., T] (tokens "
                     f"last), got a scalar.")
  shape, dtype = logprobs.shape, _checks.compute_dtype(logprobs.dtype)
  logp = logprobs.astype(dtype)
  old = _per_token(fn, old_logprobs, shape, dtype, "old_logprobs")
  adv = jnp.asarray(advantages)
  _checks.floating(adv, fn, "advantages")
  if adv.shape == shape[:-1]:  # one per sequence (GRPO, GSPO)
    adv = adv[..., None]
  adv = _checks.broadcast_to(adv, shape, fn, "advantages",
                             "logprobs' shape").astype(dtype)
  mask = _checks.mask(where, shape, fn)
  mask = jnp.ones(shape, dtype) if mask is None else mask.astype(dtype)
  if ref_logprobs is not None:
    ref_logprobs = _per_token(fn, ref_logprobs, shape, dtype, "ref_logprobs")
  elif obj.kl_coef:
    raise ValueError(f"jsoft.{fn}: kl_coef={obj.kl_coef} needs "
                     "ref_logprobs.")
  if entropy is not None:
    entropy = _per_token(fn, entropy, shape, dtype, "entropy")
  elif obj.entropy_coef:
    raise ValueError(f"jsoft.{fn}: entropy_coef={obj.entropy_coef} needs "
                     "entropy.")
  sg = lambda x: None if x is None else lax.stop_gradient(x)  # noqa: E731
  return logp, sg(old), sg(adv), mask, sg(ref_logprobs), entropy


@functools.partial(jax.jit, static_argnames=("obj",))
def _policy_jit(logprobs, old_logprobs, advantages, where, ref_logprobs,
                entropy, obj):
  logp, old, adv, mask, ref, ent = arrays(
      "policy_loss", logprobs, old_logprobs, advantages, where, ref_logprobs,
      entropy, obj)
  term, stats = token_terms(obj, logp, old, adv, mask, ref, ent)
  return aggregate(obj, term, stats, mask)


def policy_loss(
    logprobs: jax.typing.ArrayLike, old_logprobs: jax.typing.ArrayLike,
    advantages: jax.typing.ArrayLike, *,
    where: jax.typing.ArrayLike | None = None,
    ref_logprobs: jax.typing.ArrayLike | None = None,
    loss_type: str = "ppo", importance: str = "token",
    clip_low: float = 0.2, clip_high: float = 0.2,
    clip_ratio_c: float | None = None, kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: jax.typing.ArrayLike | None = None, entropy_coef: float = 0.0,
    aggregation: str = "token_mean", max_tokens: int | None = None,
    max_log_ratio: float = 20.0) -> tuple[jax.Array, PolicyStats]:
  r"""The clipped policy-gradient losses of RL fine-tuning (PPO, GRPO, DAPO,
  dual-clip PPO, GSPO, CISPO, Dr. GRPO) on per-token log-probabilities.

  With ``δ = log π − log π_old`` per token, ``r = e^δ`` and advantages
  ``A``, the loss is ``L = Σ_{i,t} w_{i,t}·ℓ_{i,t}`` over sequences ``i``
  and tokens ``t``, with the per-token term

  .. math::
    \ell = \ell^{\text{pg}} + \beta_{\text{KL}}\,k(\log\pi,
      \log\pi_{\text{ref}}) - \beta_H\,H,

    \text{PPO/GRPO:}\ \ell^{\text{pg}} = -\min\bigl(rA,\
      \operatorname{clip}(r, 1-\varepsilon_l, 1+\varepsilon_h)\,A\bigr),
    \qquad \text{dual clip } (A<0):\ \min(\ell^{\text{pg}}, -cA),

    \text{CISPO:}\ \ell^{\text{pg}} = -\operatorname{sg}\bigl(
      \operatorname{clip}(r, 1-\varepsilon_l, 1+\varepsilon_h)\bigr)
      \,A\,\log\pi,

  ``sg`` the stop-gradient (CISPO's value is the paper's objective, whose
  gradient, not its value, is the policy gradient). Sources: PPO's clipped
  surrogate (Schulman et al., 2017), GRPO (Shao et al., 2024, DeepSeekMath),
  DAPO's decoupled clip-higher ``ε_h > ε_l`` and token-mean aggregation (Yu et
  al., 2025), dual-clip PPO's ``c > 1`` (Ye et al., 2020), GSPO's sequence
  ratio ``s_i = exp(mean_t δ_{i,t})`` (Zheng et al., 2025) with
  ``importance="sequence"``, CISPO (MiniMax-M1, 2025), Dr. GRPO's constant
  normaliser (Liu et al., 2025). KL estimators (Schulman, 2020, "Approximating
  KL divergence"), from ``ρ = log π_ref − log π``: ``k1 = −ρ``, ``k2 = ρ²/2``,
  ``k3 = e^ρ − 1 − ρ``. Aggregation weights ``w`` (``m`` the mask, ``n_i`` a
  sequence's kept tokens): ``"token_mean"`` ``m/Σm`` (DAPO; verl's
  "token-mean", TRL's "bnpo"); ``"sequence_mean"`` ``m/(n_i·S')`` over the
  ``S'`` sequences with a kept token (GRPO; verl's "seq-mean-token-mean");
  ``"constant"`` ``m/(S·max_tokens)`` (Dr. GRPO; TRL's "dr_grpo"; verl's
  "seq-mean-token-sum-norm" divides by ``T`` alone, ``S`` times this).

  Conventions where TRL and verl differ: the KL term is added per token
  before aggregation (TRL; verl aggregates it apart with the same weights,
  the same number); an all-masked sequence is left out of
  ``"sequence_mean"``'s count (TRL counts it as a 0; verl's
  "seq-mean-token-mean" divides 0 by 0 there); the log-ratio
  is clamped to ``±max_log_ratio`` (verl's ±20) wherever it is
  exponentiated; the clip fractions are TRL's (low: ``r < 1−ε_l`` with
  ``A < 0``; high: ``r > 1+ε_h`` with ``A > 0``). GSPO's sequence ratio
  is broadcast to the sequence's tokens and aggregated like token terms
  (TRL), so ``"sequence_mean"`` gives the paper's per-sequence mean.

  Stability: the clip is taken on ``δ`` before ``exp``
  (``A·min(r, 1+ε_h) = A·exp(min(δ, log(1+ε_h)))``; for ``A < 0``,
  ``A·exp(clip(δ, log(1−ε_l), log c))``), and every exponentiated
  log-ratio is clamped to ``±max_log_ratio``: a log-ratio of ±1000 gives a
  finite loss and a gradient of 0 (where the clip holds it) or a finite
  one. Masked tokens are replaced by 0 before any arithmetic, so NaN or
  ``-inf`` there never reach the loss or its gradient.

  Gradient: ``∂L/∂log π_t = w_t·∂ℓ_t/∂log π_t``: for PPO ``−A·r`` where
  the ratio is inside its clip and 0 where it is clipped; for CISPO
  ``−sg(clip(r))·A``; ``k1: 1``, ``k2: −ρ``, ``k3: 1 − e^ρ``; the entropy
  term ``−β_H·∂H``. With ``importance="sequence"``, each token of sequence
  ``i`` also gets ``1/n_i`` of the sequence ratio's gradient.
  ``old_logprobs``, ``advantages`` and ``ref_logprobs`` get none.

  Args:
    logprobs: ``[..., T]`` log-probabilities of the sampled tokens under the
      policy being trained (tokens last; the leading axes are sequences).
    old_logprobs: ``[..., T]`` the same under the policy that sampled them
      (no gradient; pass ``logprobs`` itself for the on-policy step, where
      ``r = 1``).
    advantages: ``[..., T]`` per token, or ``[...]`` one per sequence (no
      gradient).
    where: optional boolean mask broadcastable to ``[..., T]``: False
      tokens (prompt, padding) take no part (weight 0, zero gradient).
    ref_logprobs: optional ``[..., T]`` log-probabilities under the frozen
      reference (no gradient); needed when ``kl_coef != 0``.
    loss_type: ``"ppo"`` (the clipped surrogate of PPO, GRPO, DAPO, GSPO) or
      ``"cispo"``.
    importance: ``"token"`` (``r = e^δ`` per token) or ``"sequence"``
      (GSPO: ``r = exp(Σ_t m δ / n_i)`` for each token of sequence ``i``).
    clip_low, clip_high: ``ε_l ∈ [0, 1]`` and ``ε_h ≥ 0``: the ratio is
      clipped to ``[1 − ε_l, 1 + ε_h]`` (DAPO: 0.2 and 0.28; GSPO: 3e-4
      and 4e-4; CISPO: ``ε_l = 1``, no lower clip).
    clip_ratio_c: optional dual-clip bound ``c > 1`` for ``A < 0`` (PPO
      only; verl's default is 3).
    kl_coef: ``β_KL``, the weight of the KL penalty to the reference.
    kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (default: the low-variance,
      always non-negative ``k3`` of GRPO).
    entropy: optional ``[..., T]`` entropies of the policy's distributions
      (differentiable, e.g. :class:`jsoft.TokenStats` ``.entropy``); needed
      when ``entropy_coef != 0``.
    entropy_coef: ``β_H``, the weight of the entropy bonus (subtracted).
    aggregation: ``"token_mean"``, ``"sequence_mean"`` or ``"constant"``.
    max_tokens: the constant of ``"constant"`` (default ``T``).
    max_log_ratio: ``M > 0``: exponentiated log-ratios are clamped to
      ``[−M, M]`` (default 20, as verl).

  Returns:
    ``(loss, stats)``: the scalar loss (float32 for 16-bit inputs, else
    ``logprobs``' dtype) and a :class:`jsoft.PolicyStats` of scalars. An
    all-masked batch gives a loss of 0 and a zero gradient.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logp = jnp.log(jnp.array([[0.5, 0.25], [0.5, 0.5]]))
    >>> old = jnp.log(jnp.array([[0.25, 0.25], [0.5, 1.0]]))
    >>> loss, stats = jsoft.policy_loss(logp, old, jnp.array([1.0, -1.0]))
    >>> print(f"{loss:.4f} {stats.high_clipped:.2f}")  # (-1.2-1+1+0.8)/4
    -0.1000 0.25
  """
  fn = "policy_loss"
  obj = objective(fn, loss_type, importance, clip_low, clip_high,
                  clip_ratio_c, kl_coef, kl_estimator, entropy_coef,
                  aggregation, max_tokens, max_log_ratio)
  a = _checks.asarray
  return _policy_jit(a(logprobs), a(old_logprobs), a(advantages), a(where),
                     a(ref_logprobs), a(entropy), obj)
