r"""Sigmoid binary cross-entropy, with the ``σ(x) - t`` gradient as a VJP rule.

For a logit ``x`` and a target probability ``t``,

.. math::
  L = -t\log\sigma(x) - (1 - t)\log\bigl(1 - \sigma(x)\bigr)
    = t\,\operatorname{softplus}(-x) + (1 - t)\operatorname{softplus}(x),

using ``log(1 - σ(x)) = log σ(-x) = -softplus(x)``. A term whose weight
(``t`` or ``1 - t``) is exactly 0 contributes 0, so the loss is exact at
``±inf`` where every peer returns NaN: ``L(+inf, 1) = L(-inf, 0) = 0`` and
``L(+inf, 0) = +inf``. The gradient is

.. math::
  \frac{\partial L}{\partial x} = \sigma(x) - t
    = (1 - t)\,\sigma(x) - t\,\sigma(-x),

written in the second form so neither ``t = 0`` nor ``t = 1`` cancels digits,
and finite for every ``x``.

Two spellings of the loss, the same values: over 128 elements a select-free
one (a reduction of the loss fuses with it), up to 128 one with a select
in under half the ops, so a small call stays under the cost up to which
XLA CPU runs it on the calling thread (:func:`jsoft._spellings.inline_sized`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks, _collectives, _rules, _spellings
from jsoft._options import reduce
from jsoft._sigmoid import sigmoid_pair, softplus_pair


def _bce_fwd(static, logits, labels, pos_weight):
  del static
  x, t = logits, labels
  # The weight on −log σ(x): t, or pos_weight·t (torch's pos_weight).
  tp = t if pos_weight is None else pos_weight * t
  if _spellings.inline_sized(x.size):
    loss = _few_loss(x, t, tp, pos_weight is None)
  else:
    loss = _loss(x, t, tp)
  return loss, (logits, labels, pos_weight)


def _loss(x, t, tp):
  """``tp·softplus(−x) + (1 − t)·softplus(x)``, elementwise, without a
  compare, so that a reduction of the loss fuses with it.

  With ``a = log(1 + e^−|x|)`` and ``y = −x`` the loss is
  ``tp·max(y, 0) + (1 − t)·max(−y, 0) + (tp + 1 − t)·a``, which is
  ``t·y − min(y, 0) + a`` for ``tp = t``.
  On ``y`` clamped to the finite floats every term is finite, so a zero
  weight on an infinite logit adds ``0·finite = 0``, not ``0·inf = NaN``.
  At ``x = ±inf`` that clamped loss is the weight on the infinite side
  times the largest float (``a = 0`` there); ``|x + y|`` (0 at every finite
  ``x``, ``+inf`` at ``±inf``) capped at ``2^127``, times it, times
  ``2^127`` again overflows to ``+inf`` for any normal weight ``> 0`` and
  stays 0 for a zero weight. 17 ops, 15 flops an element by XLA's cost
  analysis (22 as two capped softplus terms, 18 for optax's): the
  1024×1000 float32 forward reads 1.02–1.03× optax where 22 read
  0.89–0.95× (2-core Intel Xeon).

  The clamp is spelled ``min(−min(x, big), big)``, two one-sided caps: as
  ``clip`` (or ``min(max(…))``, which XLA rewrites to a clamp) it falls
  out of the YNNPACK fusion that XLA CPU gives a reduction of the loss,
  which then holds the clamped logits as an ``[N, C]`` temp.
  """
  info = jnp.finfo(x.dtype)
  big = float(info.max)
  y = jnp.minimum(-jnp.minimum(x, big), big)  # −x, clamped
  tail = jnp.log1p(jnp.exp(-jnp.abs(x)))  # of x, not y: off the clamp's chain
  low = jnp.minimum(y, 0)  # −max(x, 0), clamped
  if tp is t:
    # The linear terms first, so the tail survives their cancellation
    # (t = 1, x = 40: −40 + 40, then + 4.2e−18).
    clamped = (t * y - low) + tail
  else:
    # Each weight on its own side's max (y − low = max(−x, 0)), so a
    # weight over 1 cannot overflow the side it does not weigh.
    clamped = (tp * (y - low) - (1 - t) * low) + (tp + (1 - t)) * tail
  scale = 2.0 ** (info.maxexp - 1)
  infinite = jnp.minimum(jnp.abs(x + y), scale)
  # A constant under autodiff (its derivative is 0 wherever it is finite).
  return clamped + lax.stop_gradient((infinite * clamped) * scale)


def _few_loss(x, t, tp, plain):
  """:func:`_loss` in ten ops an element, for a call small enough to run
  on XLA CPU's calling thread (:func:`jsoft._spellings.inline_sized`;
  :func:`_loss` takes 17). With ``a = log(1 + e^−|x|)``, the loss is
  ``x·q + (tp + 1 − t)·a``, ``q = 1 − t`` for ``x > 0`` and ``−tp``
  otherwise; a select drops ``x·q`` where ``q = 0``, so ``±inf·0`` never
  forms. Never differentiated: the VJP rule gives the gradient, and its
  higher orders differentiate only the rule's backward pass."""
  tail = jnp.log1p(jnp.exp(-jnp.abs(x)))
  q = jnp.where(x > 0, 1 - t, -tp)
  linear = jnp.where(q == 0, 0, x * q)
  return linear + (tail if plain else (tp + (1 - t)) * tail)


def _bce_bwd(static, res, ct):
  del static
  x, t, pos_weight = res
  tp = t if pos_weight is None else pos_weight * t
  # σ(x) − t = (1 − t)·σ(x) − t·σ(−x): neither t = 0 nor t = 1 cancels
  # digits, and both sigmoids keep full precision in their tails. With a
  # positive weight p the target term is p·t·σ(−x).
  sig, sig_neg = sigmoid_pair(x)
  g_logits = ((1 - t) * sig - tp * sig_neg) * ct
  if pos_weight is None:
    g_labels = -x * ct  # ∂L/∂t = softplus(−x) − softplus(x) = −x
  else:
    sp_pos, sp_neg = softplus_pair(x)
    g_labels = (pos_weight * sp_neg - sp_pos) * ct
  # Inside shard_map, an operand may be the same on devices where ct is
  # not (replicated logits, split labels): its cotangent sums theirs.
  return (_collectives.summed_like(g_logits, x),
          _collectives.summed_like(g_labels, t), None)


def _bce_fun(static, logits, labels, pos_weight):
  return _bce_fwd(static, logits, labels, pos_weight)[0]


_bce = _rules.vjp_rule(_bce_fun, _bce_fwd, _bce_bwd)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _bce_jit(logits, labels, pos_weight, where, reduction):
  fn = "sigmoid_binary_cross_entropy"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _checks.floating(logits, fn, "logits")
  labels = _checks.real(labels, fn, "labels")
  shape = _checks.broadcast_shape([logits.shape, labels.shape], fn,
                                  "logits and labels")
  mask = _checks.mask(where, shape, fn)
  dtype = _checks.compute_dtype(logits.dtype)
  x = jnp.broadcast_to(logits.astype(dtype), shape)
  t = jnp.broadcast_to(labels.astype(dtype), shape)
  _checks.finite(x, fn, "logits", mask)
  _checks.finite(t, fn, "labels", mask)
  if pos_weight is not None:
    pos_weight = _checks.real(jnp.asarray(pos_weight), fn, "pos_weight")
    pos_weight = lax.stop_gradient(
        _checks.broadcast_to(pos_weight.astype(dtype), shape, fn,
                             "pos_weight", "the loss shape"))
  if mask is not None:
    # Masked entries are computed on (0, 0) and then zeroed by select: an
    # exact 0 in the loss and in both gradients, whatever they held.
    x, t = jnp.where(mask, x, 0), jnp.where(mask, t, 0)
  loss = _bce(None, x, t, pos_weight)
  if mask is not None:
    loss = jnp.where(mask, loss, 0)
  return reduce(loss, reduction, mask)


def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
    pos_weight: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none") -> jax.Array:
  r"""Element-wise sigmoid cross-entropy: a drop-in for
  :func:`optax.sigmoid_binary_cross_entropy`, with the options of
  :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

  .. math::
    L = p\,t\,\operatorname{softplus}(-x) + (1 - t)\operatorname{softplus}(x)
      = -p\,t\log\sigma(x) - (1 - t)\log\sigma(-x),

  (``p = 1`` without ``pos_weight``) with ``log(1 - σ(x))`` taken as
  ``log σ(-x)`` (no cancellation) and zero-weight terms left out, so the
  loss is exact at ``±inf``: ``L(+inf, 1) = 0``, ``L(-inf, 0) = 0``,
  ``L(+inf, 0) = +inf``.

  Gradient (the VJP rule): predicted minus target, :math:`\partial
  L/\partial x = \sigma(x) - t` (with ``pos_weight``: :math:`(1 - t)\sigma(x)
  - p\,t\,\sigma(-x)`), finite for every ``x``, and :math:`\partial
  L/\partial t = p\operatorname{softplus}(-x) - \operatorname{softplus}(x)`
  (``-x`` for ``p = 1``), scaled by the incoming cotangent. Every autodiff
  mode works.

  Args:
    logits: floating array; 16-bit floats are computed in float32.
    labels: targets in ``[0, 1]`` (bool, int or float), broadcastable with
      ``logits``.
    pos_weight: weight of the positive term, broadcastable to the loss (as
      torch's, typically ``[C]`` for ``[..., C]`` logits; a constant: no
      gradient flows to it).
    where: optional boolean mask broadcastable to the loss: ``False``
      entries have loss 0, zero gradient and no share in "mean".
    reduction: "none" (element-wise), "sum", or "mean" (over the unmasked
      entries; 0 when there are none).

  Returns:
    The element-wise loss, of the broadcast shape, or a scalar; float32 for
    16-bit logits, else the logits' dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logits = jnp.array([jnp.inf, -jnp.inf, jnp.inf, 0.0])
    >>> labels = jnp.array([1.0, 0.0, 0.0, 1.0])
    >>> print(jsoft.sigmoid_binary_cross_entropy(logits, labels).round(4))
    [0.     0.        inf 0.6931]
  """
  fn = "sigmoid_binary_cross_entropy"
  return _bce_jit(_checks.asarray(logits), _checks.asarray(labels),
                  _checks.asarray(pos_weight), _checks.asarray(where),
                  _checks.reduction(reduction, fn))
