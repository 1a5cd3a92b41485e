r"""Post-training losses of an LM head without its logits:
:func:`linear_policy_loss` and :func:`linear_preference_loss`.

Both losses are functions of each sampled token's log-probability
``log p_t = log softmax(h_t W + b)_{y_t}`` (and, for the entropy bonus, of
its entropy ``H_t``), which the fused cross-entropy head computes one tile
of logits at a time and differentiates in every mode
(:func:`jsoft.linear_cross_entropy` with ``return_stats=True``; the
preference losses need ``log p_t`` alone, minus the head's per-token loss,
which sums no entropy and tracks no argmax). So the loss is that head's
per-token statistics fed to :func:`jsoft.policy_loss` or, summed per
sequence, to :func:`jsoft.preference_loss`: JAX's chain rule
hands the head one coefficient per token, ``c_t = ∂L/∂log p_t``, and the
head's backward pass forms ``∂L/∂z_t = −c_t·(onehot(y_t) − p_t)`` (plus the
entropy's ``∂L/∂H_t·(−p_t(log p_t + H_t))``) tile by tile: never the
``[N, V]`` logits, at the head's memory (its backward pass recomputes each
tile: four matmuls per tile where the reduced cross-entropy head takes
three). With a per-token ratio over tiles of tokens on one device's
vocabulary, each ``c_t`` is known as soon as the token's row has been seen,
so the policy loss is instead a row rule of the reduced driver
(:mod:`jsoft._policy_head`): the gradient tile is formed in the forward
pass, three matmuls per tile, as the cross-entropy head's. A preference
loss reduced over tiles of tokens on one device's vocabulary runs the tiles
twice in its forward pass (:mod:`jsoft._preference_head`): the sequences'
sums, then the gradient tiles with every ``c_t`` known (four matmuls per
tile, the backward pass only scaling them).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jsoft import (
  _checks,
  _policy,
  _policy_head,
  _preference,
  _preference_head,
)
from jsoft._linear_cross_entropy import linear_cross_entropy
from jsoft._policy import PolicyStats
from jsoft._preference import PreferenceStats


class Head(NamedTuple):
  """The fused head's options (hashable, fixed at compile time)."""
  chunk_size: int | None
  tile_by: str | None
  logit_soft_cap: float | None
  temperature: float
  axis_name: Any


def _logprobs(head: Head, hidden, weight, tokens, bias, where):
  """Each token's ``log p_t`` alone, ``[..., T]`` (0 where masked): minus
  the fused head's per-token cross-entropy, which sums no entropy and
  tracks no argmax."""
  return -linear_cross_entropy(
      hidden, weight, tokens, bias=bias, chunk_size=head.chunk_size,
      tile_by=head.tile_by, logit_soft_cap=head.logit_soft_cap,
      temperature=head.temperature, axis_name=head.axis_name, where=where)


def _stats(head: Head, hidden, weight, tokens, bias, where):
  """The per-token :class:`jsoft.TokenStats` of the head, ``[..., T]``."""
  _, stats = linear_cross_entropy(
      hidden, weight, tokens, bias=bias, chunk_size=head.chunk_size,
      tile_by=head.tile_by, logit_soft_cap=head.logit_soft_cap,
      temperature=head.temperature, axis_name=head.axis_name, where=where,
      return_stats=True)
  return stats


@functools.partial(jax.jit, static_argnames=("obj", "head"))
def _policy_jit(hidden, weight, tokens, old_logprobs, advantages, bias,
                where, ref_logprobs, obj, head):
  fn = "linear_policy_loss"
  hidden, weight, tokens, bias = _policy_head.checked(fn, hidden, weight,
                                                      tokens, bias)
  n, vocab = tokens.size, weight.shape[1]
  if _policy_head.applies(obj, n, vocab, head.tile_by, head.axis_name):
    # Token ratios: each token's coefficient is known in the forward tile,
    # where the gradient is formed (three matmuls per tile).
    acc = _checks.compute_dtype(hidden.dtype)
    _, old, adv, mask, ref, _ = _policy.arrays(
        fn, jnp.zeros(tokens.shape, acc), old_logprobs, advantages, where,
        ref_logprobs, None, obj._replace(entropy_coef=0.0))
    loss, (logp, entropy) = _policy_head.policy_loss(
        head, obj, hidden, weight, tokens, bias, old, adv, mask, ref)
    _, token_stats = _policy.token_terms(obj, logp, old, adv, mask, ref,
                                         entropy)
    return loss, _policy.aggregate(obj, token_stats.ratio, token_stats,
                                   mask)[1]
  stats = _stats(head, hidden, weight, tokens, bias, where)
  # Without the bonus the entropy is only reported: no gradient, so the
  # head's backward pass skips its share (a symbolic-zero tangent).
  entropy = stats.entropy if obj.entropy_coef else jax.lax.stop_gradient(
      stats.entropy)
  logp, old, adv, mask, ref, ent = _policy.arrays(
      "linear_policy_loss", stats.logprob, old_logprobs, advantages, where,
      ref_logprobs, entropy, obj)
  term, token_stats = _policy.token_terms(obj, logp, old, adv, mask, ref, ent)
  return _policy.aggregate(obj, term, token_stats, mask)


def _head(fn, chunk_size, tile_by, logit_soft_cap, temperature,
          axis_name) -> Head:
  return Head(
      _checks.chunk_size(chunk_size, fn),
      None if tile_by is None else _checks.one_of(
          tile_by, ("tokens", "classes"), fn, "tile_by"),
      None if logit_soft_cap is None else _checks.static_float(
          logit_soft_cap, fn, "logit_soft_cap", low=0.0, open_low=True),
      _checks.static_float(temperature, fn, "temperature", low=0.0,
                           open_low=True),
      _checks.axis_name(axis_name, fn))


def linear_policy_loss(
    hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike, old_logprobs: jax.typing.ArrayLike,
    advantages: jax.typing.ArrayLike, *,
    bias: jax.typing.ArrayLike | None = None, temperature: float = 1.0,
    where: jax.typing.ArrayLike | None = None,
    ref_logprobs: jax.typing.ArrayLike | None = None,
    loss_type: str = "ppo", importance: str = "token",
    clip_low: float = 0.2, clip_high: float = 0.2,
    clip_ratio_c: float | None = None, kl_coef: float = 0.0,
    kl_estimator: str = "k3", entropy_coef: float = 0.0,
    aggregation: str = "token_mean", max_tokens: int | None = None,
    max_log_ratio: float = 20.0, logit_soft_cap: float | None = None,
    chunk_size: int | None = None, tile_by: str | None = None,
    axis_name: Any = None) -> tuple[jax.Array, PolicyStats]:
  r""":func:`jsoft.policy_loss` of an LM head's sampled tokens, without the
  ``[N, V]`` logits.

  .. math::
    \log p_t = \log\operatorname{softmax}\bigl((h_t W + b)/\tau\bigr)_{y_t},
    \qquad L = \texttt{policy\_loss}(\log p, \log p_{\text{old}}, A),

  with ``H_t`` the entropy of the same softmax for ``entropy_coef``. Equal,
  in value and in gradients with respect to ``hidden``, ``weight`` and
  ``bias``, to :func:`jsoft.policy_loss` on the materialised logits'
  log-probabilities.

  Gradient: with ``c_t = ∂L/∂log p_t`` (see :func:`jsoft.policy_loss`),
  ``∂L/∂z_t = −c_t(onehot(y_t) − p_t)/τ`` (and the entropy's share), one
  tile of logits at a time, in every autodiff mode. With
  ``importance="token"`` over tiles of tokens (``tile_by="tokens"``, or
  ``N ≥ V`` by default) and no ``axis_name``, ``c_t`` depends on the
  token's own ``log p_t`` and constants (the aggregation weights come from
  the mask alone), so the forward pass forms and folds each gradient tile
  while it holds the logits (three matmuls per tile, as the reduced
  cross-entropy head); otherwise (a sequence ratio, tiles of classes, a
  vocabulary-parallel head) the fused head's backward pass recomputes each
  tile (:func:`jsoft.linear_cross_entropy` with ``return_stats=True``;
  four).

  Args:
    hidden: ``[..., T, D]`` features of the sampled sequences.
    weight: ``[D, V]`` head weight.
    tokens: integer ``[..., T]`` sampled tokens (global class indices).
    old_logprobs, advantages, where, ref_logprobs: as in
      :func:`jsoft.policy_loss` (``where``: the completion tokens).
    loss_type, importance, clip_low, clip_high, clip_ratio_c: as there.
    kl_coef, kl_estimator, entropy_coef, aggregation: as there.
    max_tokens, max_log_ratio: as there.
    bias: optional ``[V]`` bias.
    temperature: ``τ > 0``, the sampler's temperature: the policy is
      ``softmax(z/τ)``.
    logit_soft_cap, chunk_size, tile_by, axis_name: as in
      :func:`jsoft.linear_cross_entropy` (``axis_name``: the mesh axis the
      vocabulary is split over inside ``shard_map``).

  Returns:
    ``(loss, stats)`` as :func:`jsoft.policy_loss`; ``stats.entropy`` is
    always the policy's mean entropy (the head computes it anyway).

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> h, w = jnp.ones((2, 3, 4)), jnp.zeros((4, 8))
    >>> y = jnp.array([[1, 2, 3], [4, 5, 6]])
    >>> old = jnp.full((2, 3), -jnp.log(8.0))  # uniform, as the head
    >>> loss, stats = jsoft.linear_policy_loss(h, w, y, old,
    ...                                        jnp.array([2.0, 1.0]))
    >>> print(f"{loss:.4f} {stats.ratio:.4f}")  # r = 1: −mean(A)
    -1.5000 1.0000
  """
  fn = "linear_policy_loss"
  obj = _policy.objective(fn, loss_type, importance, clip_low, clip_high,
                          clip_ratio_c, kl_coef, kl_estimator, entropy_coef,
                          aggregation, max_tokens, max_log_ratio)
  head = _head(fn, chunk_size, tile_by, logit_soft_cap, temperature,
               axis_name)
  a = _checks.asarray
  return _policy_jit(a(hidden), a(weight), a(tokens), a(old_logprobs),
                     a(advantages), a(bias), a(where), a(ref_logprobs), obj,
                     head)


@functools.partial(jax.jit, static_argnames=("opts", "head"))
def _preference_jit(hidden, weight, tokens, where, bias, ref_chosen,
                    ref_rejected, opts, head):
  fn = "linear_preference_loss"
  tokens = jnp.asarray(tokens)
  if tokens.ndim < 2 or tokens.shape[0] != 2:
    raise ValueError(f"jsoft.{fn}: tokens must have shape [2, ..., T] "
                     f"(chosen, then rejected), got {tuple(tokens.shape)}.")
  where = _checks.mask(where, tokens.shape, fn)
  hidden, weight, tokens, bias = _policy_head.checked(fn, hidden, weight,
                                                      tokens, bias)
  if _preference_head.applies(opts, tokens.size, weight.shape[1],
                              head.tile_by, head.axis_name):
    # A reduced loss over tiles of tokens: the sums, then the gradient
    # tiles formed with each token's coefficient (four matmuls per tile,
    # the backward pass only scales).
    return _preference_head.preference_loss(head, opts, hidden, weight,
                                            tokens, bias, where, ref_chosen,
                                            ref_rejected)
  logprob = _logprobs(head, hidden, weight, tokens, bias, where)
  # Masked tokens have log-probability 0: the sums are over the completion.
  sums = jnp.sum(logprob, -1)
  lengths = None
  if opts.loss_type in _preference.NO_REFERENCE:
    lengths = jnp.sum(where, -1).astype(sums.dtype)
  c, r, rc, rr, mask = _preference.operands(
      fn, opts, sums[0], sums[1], ref_chosen, ref_rejected,
      None if lengths is None else lengths[0],
      None if lengths is None else lengths[1], None)
  loss, rewards = _preference.pair_losses(opts, c, r, rc, rr)
  return _preference.reduce_pairs(opts, loss, rewards, mask)


def linear_preference_loss(
    hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
    tokens: jax.typing.ArrayLike, *, where: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    ref_chosen_logps: jax.typing.ArrayLike | None = None,
    ref_rejected_logps: jax.typing.ArrayLike | None = None,
    loss_type: str = "sigmoid", beta: float = 0.1,
    label_smoothing: float = 0.0, gamma: float = 0.0,
    orpo_lambda: float = 0.1, reduction: str = "mean",
    temperature: float = 1.0, logit_soft_cap: float | None = None,
    chunk_size: int | None = None, tile_by: str | None = None,
    axis_name: Any = None) -> tuple[jax.Array, PreferenceStats]:
  r""":func:`jsoft.preference_loss` of chosen and rejected completions
  scored by an LM head, without the ``[N, V]`` logits.

  Each completion's log-probability is the sum of its tokens'
  ``log softmax((h_t W + b)/τ)_{y_t}`` over the tokens ``where`` keeps
  (the completion, not the prompt or padding); SimPO and ORPO divide it by
  the kept count. Layout: the leading axis of ``hidden``, ``tokens`` and
  ``where`` has size 2, the chosen completions at index 0 and the
  rejected at 1 (a concatenated ``[2B, T, D]`` batch, chosen first, is
  ``hidden.reshape(2, B, T, D)``).

  .. math::
    \pi_w = \sum_t m_{0,t}\log p_{0,t}, \quad
    \pi_l = \sum_t m_{1,t}\log p_{1,t}, \qquad
    L = \texttt{preference\_loss}(\pi_w, \pi_l, \dots).

  Gradient: each pair's loss gives one number per sequence,
  ``∂L/∂π``, which is every kept token's ``c_t``, and
  ``∂L/∂z_t = −c_t(onehot(y_t) − p_t)/τ``, formed tile by tile. The
  sequences' sums are needed before any ``c_t`` is known, so every tile is
  seen twice: reduced (``"mean"``, ``"sum"``) over tiles of tokens
  (``tile_by="tokens"``, or ``N ≥ V`` by default) without ``axis_name``,
  both passes run in the forward pass — the sums (one matmul per tile),
  then the gradient tiles, formed and folded while each tile's logits are
  held (three) — and the backward pass only scales the folded gradients;
  otherwise (``reduction="none"``, tiles of classes, a vocabulary-parallel
  head) the head's backward pass recomputes each tile. Four matmuls per
  tile either way; every autodiff mode works.

  Args:
    hidden: ``[2, ..., T, D]`` features: chosen, then rejected.
    weight: ``[D, V]`` head weight.
    tokens: integer ``[2, ..., T]`` completion tokens.
    where: boolean ``[2, ..., T]``: the completion tokens (required).
    bias: optional ``[V]`` bias.
    ref_chosen_logps, ref_rejected_logps: as in
      :func:`jsoft.preference_loss` (``[...]``, sums over the same tokens).
    loss_type, beta, label_smoothing, gamma, orpo_lambda, reduction: as
      there.
    temperature: ``τ > 0``: the policy is ``softmax(z/τ)``.
    logit_soft_cap, chunk_size, tile_by, axis_name: as in
      :func:`jsoft.linear_cross_entropy`.

  Returns:
    ``(loss, stats)`` as :func:`jsoft.preference_loss`.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> h, w = jnp.ones((2, 1, 3, 4)), jnp.zeros((4, 8))
    >>> y = jnp.zeros((2, 1, 3), jnp.int32)
    >>> loss, _ = jsoft.linear_preference_loss(h, w, y,
    ...                                        where=jnp.ones((2, 1, 3), bool))
    >>> print(f"{loss:.4f}")  # equal policies: −log σ(0) = log 2
    0.6931
  """
  fn = "linear_preference_loss"
  opts = _preference.preference(fn, loss_type, beta, label_smoothing, gamma,
                                orpo_lambda, reduction)
  head = _head(fn, chunk_size, tile_by, logit_soft_cap, temperature,
               axis_name)
  a = _checks.asarray
  return _preference_jit(a(hidden), a(weight), a(tokens), a(where), a(bias),
                         a(ref_chosen_logps), a(ref_rejected_logps), opts,
                         head)
