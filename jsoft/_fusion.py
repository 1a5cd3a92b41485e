"""Spellings that keep every pass over the logits a fused loop of its own.

XLA merges equal expressions before it fuses (common subexpression
elimination). When two passes over the same ``[N, C]`` logits — the
forward's sum of exponentials, its target sum, and the gradient pass when
``value_and_grad`` traces them into one program — compute the same
elementwise expression, or broadcast the same constant or per-row number,
they end up sharing one value. XLA copies a cheap shared value into each
consumer's loop, but not an expensive one (``exp``, ``tanh``), and XLA
CPU's reduction fusions do not take a shared broadcast either: such a value
is stored as an ``[N, C]`` temporary (and keeps the logits alive).
Recomputing it inside each loop is far cheaper than writing ``4·N·C``
bytes and reading them back.

So each pass spells its shifted logits ``z = x̃ − c`` its own way, with the
same bits:

============  ======================  =============================
pass          soft cap ``x̃``           shift
============  ======================  =============================
``FIRST``     ``a·tanh(x/a)``          ``x̃ − c``
``SECOND``    ``(−a)·tanh(x/(−a))``    ``x̃ + (−c)``
``GRADIENT``  ``2a·(−m/(4 + 2m))``     ``x̃ − c``; uncapped ``x + (−c)``
============  ======================  =============================

(``tanh`` is odd, IEEE division and negation are sign-symmetric, and
scaling by 2 is exact; ``m`` is :func:`jsoft._softcap.tanh_parts`'s
``expm1``.) This module is the one place that knows them;
``tests/test_memory.py`` pins them by asserting XLA's temp bytes for every
lean kernel, so a JAX upgrade that undoes one fails a test.

:func:`guarded_mass` is the activations' spelling of the sum guard (see
:func:`jsoft._softmax.mass`): a ``maximum`` fuses with the sum before it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsoft._softcap import tanh_parts

FIRST, SECOND, GRADIENT = "first", "second", "gradient"


def _masked(x, valid):
  return x if valid is None else jnp.where(valid, x, -jnp.inf)


def shifted(x: jax.Array, shift: jax.Array, valid: jax.Array | None,
            cap: float | None, spelling: str = FIRST) -> jax.Array:
  """``masked(x̃) − shift`` for a forward pass (``FIRST`` or ``SECOND``).

  Args:
    x: logits before the soft cap.
    shift: the row shift (of the capped logits), broadcastable to ``x``.
    valid: where False, the result is ``-inf`` (no mass); None: all.
    cap: the soft cap ``a`` (None: no cap).
    spelling: which pass reads the result.
  """
  if cap is not None:
    a = -cap if spelling == SECOND else cap
    x = a * jnp.tanh(x / a)
  x = _masked(x, valid)
  return x + (-shift) if spelling == SECOND else x - shift


def shifted_with_slope(x: jax.Array, shift: jax.Array,
                       valid: jax.Array | None, cap: float | None
                       ) -> tuple[jax.Array, jax.Array | None]:
  """The gradient pass's ``(masked(x̃) − shift, dx̃/dx)`` (slope None
  without a cap). Entries where ``valid`` is False are read as 0 under the
  cap (slope 1: whatever they hold cannot leak into the gradient)."""
  if cap is None:
    return _masked(x, valid) + (-shift), None
  if valid is not None:
    x = jnp.where(valid, x, 0)
  m, slope = tanh_parts(x, cap)
  capped = jnp.sign(x) * ((2 * cap) * (-m / (4 + 2 * m)))
  return _masked(capped, valid) - shift, slope


def guarded_mass(s: jax.Array) -> jax.Array:
  """``max(s, 1)`` as an elementwise op that fuses with the sum ``s``;
  only where the guard is never differentiated (its derivative splits at
  ``s == 1``)."""
  return jnp.maximum(s, 1)
