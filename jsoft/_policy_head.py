r"""The token-ratio policy loss as a row rule: its gradients formed in the
forward pass, as the reduced cross-entropy head's.

With a per-token importance ratio, a policy loss
``L = Σ_t w_t·ℓ_t(log p_t, H_t)`` (:mod:`jsoft._policy`) has aggregation
weights ``w_t`` that depend on the mask alone and terms ``ℓ_t`` that depend
on their own token's log-probability and entropy (and on constants: the
old and reference log-probabilities, the advantage). So each token's
coefficient ``c_t = w_t·∂ℓ_t/∂log p_t`` is known as soon as its row of
logits has been seen, and :class:`PolicyRows` forms the gradient tile

.. math::
  \frac{\partial L}{\partial z_t} = -\frac{c_t}{\tau}\,
  \bigl(\operatorname{onehot}(y_t) - p_t\bigr)
  + \frac{\partial L}{\partial H_t}\,\frac{\partial H_t}{\partial z_t}

right there: :func:`jsoft._drivers.reduced` folds it into ``dh``, ``dW``
and ``db`` while it holds the tile (three matmuls per tile, as the reduced
cross-entropy head; the per-token path recomputes each tile in the
backward pass, four). Each token's ``log p_t`` and ``H_t`` come back beside
the loss for the statistics (no gradient).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jsoft import (
  _checks,
  _collectives,
  _compaction,
  _drivers,
  _loss_rule,
  _policy,
)
from jsoft import _tiling as tiling
from jsoft._loss_rule import Block
from jsoft._softcap import LogitMap, logit_map
from jsoft._softmax import mass, nan_where


class PolicyRows(NamedTuple):
  """The token-ratio policy loss on whole rows of a tile of tokens (a row
  rule of :mod:`jsoft._drivers`, with per-token outputs): the per-token
  operands are the label, the mask and the old log-probability, the
  advantage and the reference log-probability (or None)."""
  lmap: LogitMap | None
  obj: _policy.Objective
  vocab: int

  aux = True  # forward_and_backward also gives (log p, H) per token

  def _logp(self, shift, sums, label):
    """``(log p_y, H)`` from the row's sums; NaN for a label out of
    range, as the head's statistics."""
    s = mass(sums.exp)
    log_s = jnp.log(s)
    logp = (sums.label - shift) - log_s
    bad = (label < 0) | (label >= self.vocab)
    logp = logp + nan_where(bad, logp.dtype)
    entropy = None if sums.entropy is None else log_s + sums.entropy / s
    return logp, entropy

  def forward_and_backward(self, h_t, w, b, tokens, whole, own, k):
    del whole
    label, keep, old, adv, ref = tokens
    if own is not True:  # the rows of the tile before: no gradient
      keep = keep & own
    acc = _checks.compute_dtype(h_t.dtype)
    block = Block(tiling.logits(h_t, w, b, acc), None, 0, None)
    shift = jax.lax.stop_gradient(_loss_rule.block_max(block, self.lmap,
                                                       label))
    sums, e = _loss_rule.block_sums_and_exp(self.lmap, block, shift, label,
                                            entropy=True)
    mask = keep.astype(acc)
    bonus = bool(self.obj.entropy_coef)

    def loss(part):  # the tokens' terms from the sums they depend on
      logp, entropy = self._logp(shift, part, label)
      term, _ = _policy.token_terms(self.obj, logp, old, adv, mask, ref,
                                    entropy)
      return jnp.where(keep, term, 0)

    # Without the bonus the entropy is only reported: out of the VJP, so
    # the gradient tile takes no share of it.
    moving = sums if bonus else sums._replace(entropy=None)
    term, pull = jax.vjp(loss, moving)
    (ct,) = pull(_collectives.varying_like(k.astype(term.dtype), term))
    g, _ = _loss_rule.block_grad(self.lmap, block, shift, label, keep, ct, e)
    logp, entropy = self._logp(shift, sums, label)
    extra = tuple(jax.lax.stop_gradient(jnp.where(keep, x, 0))
                  for x in (logp, entropy))
    return term, g, extra


def applies(obj: _policy.Objective, n: int, vocab: int, tile_by, axis_name
            ) -> bool:
  """Whether :func:`policy_loss` takes the loss: a token ratio, one device's
  whole vocabulary, tiles of tokens (asked for, or ``N ≥ V``)."""
  by_tokens = n >= vocab if tile_by is None else tile_by == "tokens"
  return obj.importance == "token" and axis_name is None and by_tokens


def checked(fn: str, hidden, weight, tokens, bias):
  """The head's operands checked at trace time as the fused head checks
  them, ``hidden`` and ``weight`` in one dtype."""
  hidden, weight, tokens = map(jnp.asarray, (hidden, weight, tokens))
  _checks.floating(hidden, fn, "hidden")
  _checks.floating(weight, fn, "weight")
  _checks.integer(tokens, fn, "tokens")
  if weight.ndim != 2:
    raise ValueError(f"jsoft.{fn}: weight must have shape [D, V] (a Dense "
                     f"kernel), got {tuple(weight.shape)}.")
  d, vocab = weight.shape
  if hidden.ndim < 2 or hidden.shape[-1] != d:
    raise ValueError(f"jsoft.{fn}: hidden must have shape [..., T, {d}] to "
                     f"match weight {tuple(weight.shape)}, got "
                     f"{tuple(hidden.shape)}.")
  _checks.shape(tokens, hidden.shape[:-1], fn, "tokens",
                "hidden's shape without D")
  dtype = jnp.promote_types(hidden.dtype, weight.dtype)
  if bias is not None:
    bias = jnp.asarray(bias)
    _checks.floating(bias, fn, "bias")
    _checks.shape(bias, (vocab,), fn, "bias", "one entry per class")
  return hidden.astype(dtype), weight.astype(dtype), tokens, bias


def policy_loss(head: Any, obj: _policy.Objective, hidden, weight, tokens,
                bias, old, adv, mask, ref):
  """``(loss, (log p, H))`` of the token-ratio policy loss of
  ``hidden @ weight + bias`` (``hidden``: ``[..., T, D]``; the per-token
  operands ``[..., T]``, checked and cast by :func:`jsoft._policy.arrays`;
  ``mask`` float), the gradients formed in the forward pass."""
  fn = "linear_policy_loss"
  batch, d = hidden.shape[:-1], hidden.shape[-1]
  n, vocab = math.prod(batch), weight.shape[1]
  keep = (mask > 0).reshape(n)
  _checks.finite(hidden, fn, "hidden", (mask > 0)[..., None])
  _checks.finite(weight, fn, "weight")
  _checks.in_range(tokens.reshape(n), vocab, fn, ~keep)
  # Masked tokens take no part: zeroed features keep even a NaN there
  # out of dW (0·NaN would be NaN).
  h = jnp.where(keep[:, None], hidden.reshape(n, d), 0)
  w = _policy.weights(mask, obj.aggregation, obj.max_tokens).reshape(n)
  flat = lambda x: None if x is None else x.reshape(n)  # noqa: E731
  operands = [tokens.reshape(n).astype(jnp.int32), keep, flat(old),
              flat(adv), flat(ref)]
  # Kept tokens gathered first, the tiles past them skipped (as the head).
  compaction, kept = None, None
  if n >= _compaction.COMPACT_MIN_TOKENS:
    compaction = _compaction.Compaction.of(keep)
    h, w, kept = compaction.gather(h), compaction.gather(w), compaction.count
    operands = [compaction.gather(x) for x in operands]
  size = min(head.chunk_size or tiling.token_tile(n, vocab), n)
  total, extra = _drivers.reduced(
      PolicyRows(logit_map(head.logit_soft_cap, head.temperature), obj,
                 vocab), size, h, weight, bias, w, kept,
      tuple(operands), ())
  if compaction is not None:
    extra = tuple(compaction.scatter(x) for x in extra)
  return total, tuple(x.reshape(batch) for x in extra)
