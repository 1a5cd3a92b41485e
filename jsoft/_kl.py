"""optax's KL losses, drop-in: :func:`kl_divergence` and
:func:`kl_divergence_with_log_targets`, with ``0·log 0 = 0`` (the term of
:func:`jsoft._distillation.kl_terms`), never NaN where the value is
finite."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jsoft import _checks
from jsoft._distillation import kl_terms


@functools.partial(jax.jit, static_argnames=("axis", "log_targets"))
def _kl_jit(log_predictions, targets, axis, where, log_targets):
  fn = ("kl_divergence_with_log_targets" if log_targets
        else "kl_divergence")
  lq, t = jnp.asarray(log_predictions), jnp.asarray(targets)
  _checks.floating(lq, fn, "log_predictions")
  _checks.floating(t, fn, "log_targets" if log_targets else "targets")
  if log_targets:
    zero = t == -jnp.inf
    loss = kl_terms(jnp.exp(t), t, lq, zero)
  else:
    zero = t == 0
    loss = kl_terms(t, jnp.log(jnp.where(zero, 1, t)), lq, zero)
  return jnp.sum(loss, axis=axis, where=where)


def kl_divergence(log_predictions: jax.typing.ArrayLike,
                  targets: jax.typing.ArrayLike, axis: Any = -1,
                  where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""The Kullback–Leibler divergence of the predictions from the targets:
  a drop-in for :func:`optax.kl_divergence`.

  .. math::
    \mathrm{KL}(t\,\|\,q) = \sum_c t_c\,(\log t_c - \log q_c),

  with ``0·log 0 = 0``: a zero target contributes exactly 0, also where
  ``log q = -inf`` (optax: NaN). A positive target on ``log q = -inf``
  gives ``+inf``. Gradients: :math:`-t` for ``log_predictions``,
  :math:`\log t - \log q + 1` for ``targets`` (0 where ``t = 0``, where the
  term is identically 0; optax: NaN); never NaN where the value is finite.

  Args:
    log_predictions: log-probabilities of the predicted distribution.
    targets: probabilities of the target distribution (same shape).
    axis: the axis or axes to sum over (None: all).
    where: optional boolean mask: entries to include in the sum.

  Returns:
    The divergence, of the inputs' shape without ``axis``.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> log_q = jnp.log(jnp.array([0.5, 0.5, 0.0]))
    >>> t = jnp.array([0.25, 0.75, 0.0])
    >>> print(f"{jsoft.kl_divergence(log_q, t):.4f}")
    0.1308
  """
  return _kl_jit(_checks.asarray(log_predictions), _checks.asarray(targets),
                 tuple(axis) if isinstance(axis, list) else axis,
                 _checks.asarray(where), False)


def kl_divergence_with_log_targets(
    log_predictions: jax.typing.ArrayLike,
    log_targets: jax.typing.ArrayLike, axis: Any = -1,
    where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""The Kullback–Leibler divergence with the targets given as
  log-probabilities: a drop-in for
  :func:`optax.kl_divergence_with_log_targets`.

  .. math::
    \mathrm{KL}(t\,\|\,q) = \sum_c e^{\log t_c}(\log t_c - \log q_c),

  exactly 0 where ``log t = -inf``, whatever ``log q`` (optax: NaN).
  Gradients: :math:`-t` for ``log_predictions`` and
  :math:`t\,(\log t - \log q + 1)` for ``log_targets`` (0 where
  ``log t = -inf``); never NaN where the value is finite.

  Args:
    log_predictions: log-probabilities of the predicted distribution.
    log_targets: log-probabilities of the target distribution.
    axis: the axis or axes to sum over (None: all).
    where: optional boolean mask: entries to include in the sum.

  Returns:
    The divergence, of the inputs' shape without ``axis``.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> log_q = jnp.log(jnp.array([0.5, 0.5, 0.0]))
    >>> log_t = jnp.log(jnp.array([0.25, 0.75, 0.0]))
    >>> print(f"{jsoft.kl_divergence_with_log_targets(log_q, log_t):.4f}")
    0.1308
  """
  return _kl_jit(_checks.asarray(log_predictions),
                 _checks.asarray(log_targets),
                 tuple(axis) if isinstance(axis, list) else axis,
                 _checks.asarray(where), True)
