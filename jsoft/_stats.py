r"""Per-token statistics of the softmax losses: :class:`TokenStats`.

From a row's shift ``c``, its sums (:class:`jsoft._loss_rule.Sums`, with
the entropy sum) and its argmax, for ``p = softmax(x̃)``:

.. math::
  \operatorname{lse} = c + \log s, \qquad
  \log p_y = (\tilde x_y - c) - \log s, \qquad
  H = -\sum_c p_c \log p_c = \log s + \frac{\sum_c e^{z_c}(-z_c)}{s},

every term ≥ 0 where it is added (``z = x̃ − c ≤ 0``), so nothing cancels.
The three are plain JAX of the sums, so JAX differentiates them into the
sums' cotangents and the loss rule's ``y − t`` tile carries them to the
logits (:func:`jsoft._loss_rule.block_grad`): the gradient of ``log p_y``
is ``onehot(y) − p``, of ``lse`` is ``p``, and of ``H`` is
``−p·(log p + H)``, each times ``dx̃/dx``. ``correct`` is an integer
compare, without a gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft._loss_rule import Sums, Target
from jsoft._softmax import mass, nan_where


class TokenStats(NamedTuple):
  """Per-token statistics of a softmax cross-entropy, each shaped like the
  labels, for the logits the softmax sees ``x̃`` (soft-capped, then divided
  by the temperature) and ``p = softmax(x̃)``:

  * ``logprob``: ``log p_y``, before label smoothing, z-loss and weights;
  * ``logsumexp``: ``log Σ_c e^x̃_c``;
  * ``entropy``: ``−Σ_c p_c log p_c``;
  * ``correct``: whether ``argmax x̃ == y`` (bool; ties go to the lowest
    index, as :func:`jax.numpy.argmax`).

  Ignored or masked tokens give 0, 0, 0 and False; a label out of range
  gives a NaN ``logprob``. ``logprob``, ``logsumexp`` and ``entropy`` are
  differentiable in every autodiff mode; ``correct`` is not.
  """
  logprob: jax.Array
  logsumexp: jax.Array
  entropy: jax.Array
  correct: jax.Array


def from_sums(target: Target, shift: jax.Array, sums: Sums,
              argmax: jax.Array) -> TokenStats:
  """The statistics of whole rows from their shift, sums (with the entropy
  sum) and argmax (a global class index)."""
  shift = lax.stop_gradient(shift)
  s = mass(sums.exp)
  log_s = jnp.log(s)
  lse = jnp.where(sums.exp == 0, -jnp.inf, shift + log_s)
  logprob = (sums.label - shift) - log_s
  entropy = log_s + sums.entropy / s
  correct = argmax == target.label
  counted = target.has_loss
  if target.invalid is not None:
    logprob = logprob + nan_where(target.invalid, logprob.dtype)
    if counted is not None:
      counted = counted | target.invalid
    correct = correct & ~target.invalid
  if target.has_loss is not None:
    correct = correct & target.has_loss
  if counted is not None:
    logprob, lse, entropy = (jnp.where(counted, v, 0)
                             for v in (logprob, lse, entropy))
  return TokenStats(logprob, lse, entropy, correct)
