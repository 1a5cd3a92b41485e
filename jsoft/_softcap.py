r"""The logit soft cap (Gemma 2): ``x̃ = a·tanh(x/a)``, and its slope.

The cap is increasing, so the row max of the capped logits is the cap of
the raw row max: the shift costs no ``tanh`` per logit, and the capped
logits are only ever computed inside the loops that consume them (each
pass spells them its own way: :mod:`jsoft._fusion`).

The gradient pass needs the slope

.. math::
  \frac{d\tilde x}{dx} = \operatorname{sech}^2(x/a) = 1 - \tanh^2(x/a),

and ``1 − tanh²`` rounds to 0 once ``|x|/a`` passes about 9 in float32.
:func:`tanh_parts` gives both from ``v = −2|x|/a`` instead:
``tanh(|x|/a) = −m/(2 + m)`` with ``m = expm1(v)`` (full precision near 0,
where ``1 − e^v`` would cancel) and ``sech²(x/a) = 4e/(1 + e)²`` with
``e = e^v`` (full precision far out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cap(x: jax.Array, a: float) -> jax.Array:
  """``a·tanh(x/a)``."""
  return a * jnp.tanh(x / a)


def tanh_parts(x: jax.Array, a: float) -> tuple[jax.Array, jax.Array]:
  """``(m, slope)``: ``m = expm1(−2|x|/a)``, so that ``tanh(|x|/a) =
  −m/(2 + m)``, and ``sech²(x/a)``; within a few ulps of ``tanh``."""
  v = jnp.abs(x) * (-2.0 / a)
  e = jnp.exp(v)
  return jnp.expm1(v), (4 * e) / jnp.square(1 + e)
