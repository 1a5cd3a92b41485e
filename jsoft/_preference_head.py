r"""The reduced preference losses in two passes over tiles of tokens.

A preference loss ``L = F(π_w, π_l)`` is a function of each completion's
log-probability ``π = Σ_t m_t log p_t``: every kept token of a sequence
has the coefficient ``c_t = ∂L/∂π`` of its sequence, so

.. math::
  \frac{\partial L}{\partial z_t} = -\frac{c_t}{\tau}
  \bigl(\operatorname{onehot}(y_t) - p_t\bigr),

the cross-entropy head's gradient tile scaled by one number per token. The
``c_t`` need the sums, and the sums need every tile, so
:func:`jsoft._drivers.two_pass` runs the tiles twice in the forward pass:
the tokens' ``log p_t`` (one matmul per tile), then, with the ``c_t``
known, the reduced cross-entropy driver's tiles with ``−c_t`` as their
coefficients (three: the gradient tile formed and folded while the
logits are held). The backward pass only scales the folded gradients.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from jsoft import (
  _checks,
  _compaction,
  _drivers,
  _options,
  _preference,
  _targets,
)
from jsoft import _tiling as tiling
from jsoft._linear_cross_entropy import Rows, _by_tokens
from jsoft._softcap import logit_map


class Pairs(NamedTuple):
  """The objective of :func:`jsoft._drivers.two_pass`: the reduced
  preference loss of the per-token cross-entropies ``−log p_t`` (0 on the
  tokens outside the completions), with its :class:`PreferenceStats`."""
  opts: _preference.Preference
  pairs: int  # B
  fn: str

  def __call__(self, losses, back, ref_chosen, ref_rejected, lengths):
    # Back in the sequences' order (``back``: the inverse of the gather
    # that put the kept tokens first), each row summed as the unfused loss
    # sums it: float32 sums of a thousand log-probabilities taken in
    # another order differ in their last digits, which a preference loss
    # of their differences magnifies.
    if back is not None:
      losses = losses[back]
    sums = -jnp.sum(losses.reshape(2, self.pairs, -1), axis=-1)
    per_length = (None, None) if lengths is None else (lengths[0],
                                                       lengths[1])
    c, r, rc, rr, mask = _preference.operands(
        self.fn, self.opts, sums[0], sums[1], ref_chosen, ref_rejected,
        *per_length, None)
    loss, rewards = _preference.pair_losses(self.opts, c, r, rc, rr)
    return _preference.reduce_pairs(self.opts, loss, rewards, mask)


def applies(opts: _preference.Preference, n: int, vocab: int, tile_by,
            axis_name) -> bool:
  """Whether :func:`preference_loss` takes the loss: a reduced loss, one
  device's whole vocabulary, tiles of tokens (asked for, or ``N ≥ V``)."""
  return (opts.reduction != "none" and axis_name is None
          and _by_tokens(tile_by, n, vocab))


def preference_loss(head: Any, opts: _preference.Preference, hidden, weight,
                    tokens, bias, where, ref_chosen, ref_rejected):
  """``(loss, stats)`` of the preference loss of ``hidden @ weight + bias``
  (``hidden``: ``[2, ..., T, D]``, checked; ``where``: boolean
  ``[2, ..., T]``), reduced over the pairs, in two passes."""
  fn = "linear_preference_loss"
  batch, d = hidden.shape[:-1], hidden.shape[-1]
  n, vocab = math.prod(batch), weight.shape[1]
  pairs = math.prod(batch[1:-1])
  keep = where.reshape(n)
  _checks.finite(hidden, fn, "hidden", where[..., None])
  _checks.finite(weight, fn, "weight")
  labels = tokens.reshape(n)
  _checks.in_range(labels, vocab, fn, ~keep)
  # Tokens outside the completions take no part: zeroed features keep even
  # a NaN there out of dW (0·NaN would be NaN).
  h = jnp.where(keep[:, None], hidden.reshape(n, d), 0)
  acc = _checks.compute_dtype(h.dtype)
  lmap = logit_map(head.logit_soft_cap, head.temperature)
  target, _ = _targets.integer(_options.Options(lmap=lmap), labels, None,
                               keep, None, vocab, acc)
  kept, back = None, None
  if n >= _compaction.COMPACT_MIN_TOKENS:
    compaction = _compaction.Compaction.of(keep)
    h, kept, back = compaction.gather(h), compaction.count, compaction.back
    target = type(target)(*map(compaction.gather, target))
  lengths = None
  if opts.loss_type in _preference.NO_REFERENCE:
    lengths = jnp.sum(where, -1).astype(acc).reshape(2, pairs)
  numbers, arrays = target.split()
  size = min(head.chunk_size or tiling.token_tile(n, vocab), n)
  refs = []
  for x, what in ((ref_chosen, "ref_chosen_logps"),
                  (ref_rejected, "ref_rejected_logps")):
    if x is not None:  # one per pair, flattened as the sums are
      _checks.shape(x, batch[1:-1], fn, what, "one per pair")
      x = x.reshape(pairs)
    refs.append(x)
  loss, stats = _drivers.two_pass(
      Rows(lmap, 0.0, numbers), size, h, weight, bias, kept, arrays, (None,),
      Pairs(opts, pairs, fn), (back, *refs, lengths))
  shape = batch[1:-1]
  return loss, stats._replace(
      chosen_rewards=stats.chosen_rewards.reshape(shape),
      rejected_rewards=stats.rejected_rewards.reshape(shape))
