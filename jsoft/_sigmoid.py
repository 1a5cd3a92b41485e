r"""The sigmoid family: ``sigmoid`` and ``log_sigmoid``.

Both are written in terms of ``e = exp(-|x|)``, which lies in ``[0, 1]`` for
every ``x`` (so it never overflows):

.. math::
  \sigma(x) = \begin{cases} 1/(1 + e) & x \ge 0 \\ e/(1 + e) & x < 0
  \end{cases}, \qquad
  \log\sigma(x) = -\operatorname{softplus}(-x)
                = -\bigl(\max(-x, 0) + \log(1 + e)\bigr).

Each branch keeps full relative precision in its tail, and both are exact at
``±inf``: ``σ(inf) = 1``, ``σ(-inf) = 0``, ``log σ(inf) = 0``,
``log σ(-inf) = -inf``. The identity ``log(1 - σ(x)) = log σ(-x)`` gives the
other log-probability without cancellation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsoft import _checks


def _exp_neg_abs(x: jax.Array) -> jax.Array:
  return jnp.exp(-jnp.abs(x))


def sigmoid_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(σ(x), σ(-x))``, each to full relative precision, from one ``exp``."""
  e = _exp_neg_abs(x)
  big = 1 / (1 + e)       # σ(|x|)
  small = e * big         # σ(−|x|)
  pos = x >= 0
  return jnp.where(pos, big, small), jnp.where(pos, small, big)


def softplus_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(softplus(x), softplus(-x)) = (-log σ(-x), -log σ(x))``, stably."""
  tail = jnp.log1p(_exp_neg_abs(x))
  return jnp.maximum(x, 0) + tail, jnp.maximum(-x, 0) + tail


@jax.custom_jvp
def _sigmoid(x: jax.Array) -> jax.Array:
  return sigmoid_pair(x)[0]


@_sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = _sigmoid(x)
  # σ' = σ(x)·σ(−x), which unlike σ(1 − σ) keeps precision for large x.
  return y, y * _sigmoid(-x) * dx


@jax.custom_jvp
def _log_sigmoid(x: jax.Array) -> jax.Array:
  # −softplus(−x) = min(x, 0) − log(1 + e^−|x|); exact 0 and −inf at ±inf.
  return jnp.minimum(x, 0) - jnp.log1p(_exp_neg_abs(x))


@_log_sigmoid.defjvp
def _log_sigmoid_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  # (log σ)'(x) = σ(−x).
  return _log_sigmoid(x), _sigmoid(-x) * dx


def _elementwise(kernel, fn):
  @jax.jit
  def run(x):
    x = _checks.real(jnp.asarray(x), fn, "x")
    _checks.finite(x, fn, "x")
    return kernel(x.astype(_checks.compute_dtype(x.dtype))).astype(x.dtype)

  return run


_sigmoid_jit = _elementwise(_sigmoid, "sigmoid")
_log_sigmoid_jit = _elementwise(_log_sigmoid, "log_sigmoid")


def sigmoid(x: jax.typing.ArrayLike) -> jax.Array:
  r"""The logistic sigmoid: a drop-in for :func:`jax.nn.sigmoid`.

  .. math::
    \sigma(x) = \frac{1}{1 + e^{-x}}

  computed from ``e^{-|x|}`` so that neither tail overflows or loses relative
  precision; exact at ``±inf``. Derivative (a ``custom_jvp`` rule):
  :math:`\sigma'(x) = \sigma(x)\,\sigma(-x)`.

  Args:
    x: input array (16-bit floats are computed in float32).

  Returns:
    An array of ``x``'s shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> print(jsoft.sigmoid(jnp.array([-jnp.inf, 0.0, 1e9])))
    [0.  0.5 1. ]
  """
  return _sigmoid_jit(_checks.asarray(x))


def log_sigmoid(x: jax.typing.ArrayLike) -> jax.Array:
  r"""Log of the sigmoid: a drop-in for :func:`jax.nn.log_sigmoid`.

  .. math::
    \log\sigma(x) = -\operatorname{softplus}(-x)
                  = -\max(-x, 0) - \log\bigl(1 + e^{-|x|}\bigr),

  finite for all finite ``x`` and exact at ``±inf`` (``0`` and ``-inf``).
  Use ``log_sigmoid(-x)`` for ``log(1 - σ(x))``. Derivative (a ``custom_jvp``
  rule): :math:`(\log\sigma)'(x) = \sigma(-x)`.

  Args:
    x: input array (16-bit floats are computed in float32).

  Returns:
    An array of ``x``'s shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> [f"{v:.4f}" for v in jsoft.log_sigmoid(jnp.array([-1e4, 0.0, jnp.inf]))]
    ['-10000.0000', '-0.6931', '0.0000']
  """
  return _log_sigmoid_jit(_checks.asarray(x))
