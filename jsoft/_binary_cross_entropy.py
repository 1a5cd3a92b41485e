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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks, _rules
from jsoft._sigmoid import sigmoid_pair, softplus_pair


def _bce_fwd(static, logits, labels):
  del static
  x, t = logits, labels
  sp_pos, sp_neg = softplus_pair(x)  # −log σ(−x), −log σ(x): +inf at ∓inf
  info = jnp.finfo(x.dtype)
  # t·softplus(−x) + (1 − t)·softplus(x) with each softplus capped at the
  # largest float, so a weight of exactly 0 on an infinite softplus adds
  # 0·finite = 0 (not NaN) ...
  a, b = jnp.minimum(sp_neg, float(info.max)), jnp.minimum(sp_pos, float(
      info.max))
  # ... while any positive weight on one makes the loss +inf: sp − cap is 0
  # when finite and +inf when not; capped at 2^127, times the weight, times
  # 2^127 again it overflows for any normal weight > 0 and stays 0 for a
  # zero weight. No compares, so a reduction of the loss fuses with it; a
  # constant under autodiff (its derivative is 0 wherever it is finite).
  scale = 2.0 ** (info.maxexp - 1)
  infinite = lax.stop_gradient(
      (t * jnp.minimum(sp_neg - a, scale)) * scale
      + ((1 - t) * jnp.minimum(sp_pos - b, scale)) * scale)
  return t * a + (1 - t) * b + infinite, (logits, labels)


def _bce_bwd(static, res, ct):
  del static
  x, t = res
  # σ(x) − t = (1 − t)·σ(x) − t·σ(−x): neither t = 0 nor t = 1 cancels
  # digits, and both sigmoids keep full precision in their tails.
  sig, sig_neg = sigmoid_pair(x)
  g_logits = ((1 - t) * sig - t * sig_neg) * ct
  g_labels = -x * ct  # ∂L/∂t = softplus(−x) − softplus(x) = −x
  return g_logits, g_labels


def _bce_fun(static, logits, labels):
  return _bce_fwd(static, logits, labels)[0]


_bce = _rules.vjp_rule(_bce_fun, _bce_fwd, _bce_bwd)


@jax.jit
def _bce_jit(logits, labels):
  fn = "sigmoid_binary_cross_entropy"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _checks.floating(logits, fn, "logits")
  labels = _checks.real(labels, fn, "labels")
  shape = _checks.broadcast_shape([logits.shape, labels.shape], fn,
                                  "logits and labels")
  _checks.finite(logits, fn, "logits")
  _checks.finite(labels, fn, "labels")
  dtype = _checks.compute_dtype(logits.dtype)
  x = jnp.broadcast_to(logits.astype(dtype), shape)
  t = jnp.broadcast_to(labels.astype(dtype), shape)
  return _bce(None, x, t)


def sigmoid_binary_cross_entropy(logits: jax.typing.ArrayLike,
                                 labels: jax.typing.ArrayLike) -> jax.Array:
  r"""Element-wise sigmoid cross-entropy: a drop-in for
  :func:`optax.sigmoid_binary_cross_entropy`.

  .. math::
    L = t\,\operatorname{softplus}(-x) + (1 - t)\operatorname{softplus}(x)
      = -t\log\sigma(x) - (1 - t)\log\sigma(-x),

  with ``log(1 - σ(x))`` taken as ``log σ(-x)`` (no cancellation) and zero-
  weight terms left out, so the loss is exact at ``±inf``:
  ``L(+inf, 1) = 0``, ``L(-inf, 0) = 0``, ``L(+inf, 0) = +inf``.

  Gradient (the VJP rule): :math:`\partial L/\partial x = \sigma(x) - t`,
  finite for every ``x``, and :math:`\partial L/\partial t = -x`, scaled by
  the incoming cotangent. Every autodiff mode works.

  Args:
    logits: floating array; 16-bit floats are computed in float32.
    labels: targets in ``[0, 1]`` (bool, int or float), broadcastable with
      ``logits``.

  Returns:
    The element-wise loss, of the broadcast shape: float32 for 16-bit logits,
    else the logits' dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logits = jnp.array([jnp.inf, -jnp.inf, jnp.inf, 0.0])
    >>> labels = jnp.array([1.0, 0.0, 0.0, 1.0])
    >>> print(jsoft.sigmoid_binary_cross_entropy(logits, labels).round(4))
    [0.     0.        inf 0.6931]
  """
  return _bce_jit(_checks.asarray(logits), _checks.asarray(labels))
