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

============  ========================  ====================  ==============
pass          soft cap and ``T``         ``T`` alone           shift
============  ========================  ====================  ==============
``FIRST``     ``s·tanh(x/a)``            ``x·r``               ``x̃ − c``
``SECOND``    ``(−s)·tanh(x/(−a))``      ``−(x·(−r))``         ``x̃ + (−c)``
``GRADIENT``  ``2s·(−m/(4 + 2m))``       ``(x·2r)·½``          ``−(c − x̃)``
============  ========================  ====================  ==============

(``s = a/T``, ``r = 1/T``; ``tanh`` is odd, IEEE division, multiplication and
negation are sign-symmetric, and scaling by 2 is exact; ``m`` is
:func:`jsoft._softcap.tanh_parts`'s ``expm1``.) The exception is a forward pass
that XLA CPU runs as one kernel, a chain of row reductions each feeding the
next, reading each row once (:func:`jsoft._loss_rule.direct_loss`): inside one
kernel a shared ``z`` costs nothing and spelling it twice costs an op per
logit. XLA CPU does so from 4096 rows on (:func:`one_kernel`); below that it
splits the chain, and the second pass takes the ``SECOND`` spelling. Except
for 16-bit logits: XLA stores their float32 conversion between the split
passes anyway, so the shared ``z`` is what it stores (the logits shifted
once), as optax's ``log_softmax`` does.

Two more spellings steer the order XLA runs things in:
:func:`after_label` and :func:`guarded_mass`. This module is the one
place that knows them all;
``tests/test_memory.py`` pins them by asserting XLA's temp bytes for every
lean kernel, so a JAX upgrade that undoes one fails a test.

"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsoft._softcap import LogitMap, tanh_parts

FIRST, SECOND, GRADIENT = "first", "second", "gradient"


def is_bias(valid: jax.Array | None) -> bool:
  """Whether a block's mask is a bias added to the logits (0, or so
  negative that ``e^x`` underflows to 0) rather than booleans."""
  return valid is not None and jnp.issubdtype(valid.dtype, jnp.floating)


def _masked(x, valid):
  if valid is None:
    return x
  return x + valid if is_bias(valid) else jnp.where(valid, x, -jnp.inf)


def kept(valid: jax.Array) -> jax.Array:
  """A mask as booleans: ``valid`` itself, or where its bias is 0."""
  return valid == 0 if is_bias(valid) else valid


def shifted(x: jax.Array, shift: jax.Array, valid: jax.Array | None,
            lmap: LogitMap | None, spelling: str = FIRST) -> jax.Array:
  """``masked(x̃) − shift`` for a forward pass (``FIRST`` or ``SECOND``).

  Args:
    x: raw logits (before the logit map).
    shift: the row shift (of the capped logits), broadcastable to ``x``.
    valid: where False, the result is ``-inf`` (no mass); None: all.
    lmap: the soft cap and temperature (None: neither).
    spelling: which pass reads the result.
  """
  x = _masked(mapped(x, lmap, spelling), valid)
  return x + (-shift) if spelling == SECOND else x - shift


def mapped(x: jax.Array, lmap: LogitMap | None,
           spelling: str = FIRST) -> jax.Array:
  """``x̃``, in the ``FIRST`` or ``SECOND`` spelling: bit for bit the same
  values (no add, so nothing for a fused multiply-add to contract)."""
  if lmap is None:
    return x
  if lmap.cap is None:
    r = lmap.scale
    return -(x * (-r)) if spelling == SECOND else x * r
  a, s = lmap.cap, lmap.scale
  if spelling == SECOND:
    a, s = -a, -s
  return s * jnp.tanh(x / a)


def gap_with_slope(x: jax.Array, shift: jax.Array, valid: jax.Array | None,
                   lmap: LogitMap | None) -> tuple[jax.Array, jax.Array | None]:
  """The gradient pass's ``(shift − masked(x̃), dx̃/dx)``: the gap ``−z``
  (``+inf`` where masked) and the slope (None for the identity map, a
  number for a temperature alone). Entries where ``valid`` is False are
  read as 0 under the cap (whatever they hold cannot leak into the
  gradient)."""
  if lmap is None:
    return shift - _masked(x, valid), None
  if lmap.cap is None:
    r = lmap.scale
    return shift - _masked((x * (2 * r)) * 0.5, valid), r
  if valid is not None:
    x = jnp.where(kept(valid), x, 0)
  m, slope = tanh_parts(x, lmap.cap)
  capped = jnp.sign(x) * ((2 * lmap.scale) * (-m / (4 + 2 * m)))
  if lmap.temperature != 1.0:
    slope = slope * (1 / lmap.temperature)
  return shift - _masked(capped, valid), slope


def one_kernel(rows: int) -> bool:
  """Whether XLA CPU runs a chain of reductions over ``rows`` rows as one
  kernel (measured: from 4096 rows on, for any row length)."""
  return rows >= 4096


def few_logits(size: int) -> bool:
  """Whether a forward pass over ``size`` logits is so small that XLA CPU
  takes longer to run a ``lax.cond`` (a fallback taken only when the
  one-pass loss is NaN) than to select per logit (measured: up to 2^16
  logits)."""
  return size <= 2**16


def after_label(shift: jax.Array, label_logit: jax.Array) -> jax.Array:
  """``max(shift, x_y)``, which is ``shift`` (the label's logit is one of
  the entries, or ``-inf``), spelled so that the shift depends on the
  gather of ``x_y``: XLA then reads the label's logit before the pass that
  computes ``e^(x − c)``, and that pass can write ``e`` over the logits
  when they die there (an LM head's ``h @ W``). No gradient."""
  return jnp.maximum(shift, jax.lax.stop_gradient(label_logit))


def guarded_mass(s: jax.Array) -> jax.Array:
  """``max(s, 1)`` as an elementwise op that fuses with the sum ``s``;
  only where the guard is never differentiated (its derivative splits at
  ``s == 1``)."""
  return jnp.maximum(s, 1)
