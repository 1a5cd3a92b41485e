r"""What the softmax sees: the logit soft cap (Gemma 2) and the
temperature, ``x̃ = a·tanh(x/a) / T`` (``x / T`` without a cap), and its
slope.

The map is increasing, so the row max of the mapped logits is the map of
the raw row max: the shift costs no ``tanh`` per logit, and the mapped
logits are only ever computed inside the loops that consume them (each
pass spells them its own way: :mod:`jsoft._spellings`). The factor ``a/T``
(or ``1/T``) is one constant, so every spelling rounds the same.

The gradient pass needs the slope

.. math::
  \frac{d\tilde x}{dx} = \frac{\operatorname{sech}^2(x/a)}{T}
  = \frac{1 - \tanh^2(x/a)}{T},

and ``1 − tanh²`` rounds to 0 once ``|x|/a`` passes about 9 in float32.
:func:`tanh_parts` gives both from ``v = −2|x|/a`` instead:
``tanh(|x|/a) = −m/(2 + m)`` with ``m = expm1(v)`` (full precision near 0,
where ``1 − e^v`` would cancel) and ``sech²(x/a) = 4e/(1 + e)²`` with
``e = e^v`` (full precision far out).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LogitMap(NamedTuple):
  """``x̃ = scale·tanh(x/cap)`` with ``scale = cap/T``, or ``x·scale`` with
  ``scale = 1/T`` without a cap (hashable, compile-time)."""
  cap: float | None  # the soft cap a (None: no cap)
  temperature: float  # T > 0

  @property
  def scale(self) -> float:
    a = 1.0 if self.cap is None else self.cap
    return a / self.temperature


def logit_map(cap: float | None, temperature: float) -> LogitMap | None:
  """The :class:`LogitMap`, or None for the identity (no cap, T = 1)."""
  if cap is None and temperature == 1.0:
    return None
  return LogitMap(cap, temperature)


def apply(x: jax.Array, m: LogitMap) -> jax.Array:
  """``x̃`` from ``x``, spelled as the forward's first pass
  (:data:`jsoft._spellings.FIRST`), so the bits agree with it."""
  if m.cap is None:
    return x * m.scale
  return m.scale * jnp.tanh(x / m.cap)


def tanh_parts(x: jax.Array, a: float) -> tuple[jax.Array, jax.Array]:
  """``(m, slope)``: ``m = expm1(−2|x|/a)``, so that ``tanh(|x|/a) =
  −m/(2 + m)``, and ``sech²(x/a)``; within a few ulps of ``tanh``."""
  v = jnp.abs(x) * (-2.0 / a)
  e = jnp.exp(v)
  return jnp.expm1(v), (4 * e) / jnp.square(1 + e)
