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
:func:`after_label` and :func:`guarded_mass`; and :func:`dense_sum` is
spelled one way for a program so small that XLA CPU runs it on the calling
thread, another for every other. This module is the one place that knows
them all;
``tests/test_memory.py`` pins them by asserting XLA's temp bytes for every
lean kernel, so a JAX upgrade that undoes one fails a test.

"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def _rows(shape: tuple[int, ...], axis: tuple[int, ...]) -> int:
  """How many slices over ``axis`` an array of ``shape`` holds."""
  return math.prod(shape) // max(math.prod(shape[a] for a in axis), 1)


def rereads_input(shape: tuple[int, ...], axis: tuple[int, ...]) -> bool:
  """Whether ``log_softmax``'s last pass should form ``x − m`` again from
  ``x`` rather than read the ``x − m`` that the max's pass wrote (a barrier
  keeps XLA from merging the two): over 2^22 entries below
  :func:`one_kernel` rows, where the passes are bound by memory. Measured,
  2-core Intel Xeon, float32, ``jax.nn``'s time ÷ jsoft's: 1024×8192 0.99 →
  1.21, 1024×16384 0.99 → 1.14, 1024×32000 and 2048×32000 1.00 → 1.07; at
  1024×4096 (2^22) 1.01 → 0.97 and at 1024×1000 1.03 → 0.98, so not there;
  from 4096 rows XLA runs the whole chain as one kernel either way."""
  return math.prod(shape) > 2**22 and not one_kernel(_rows(shape, axis))


def few_logits(size: int) -> bool:
  """Whether a forward pass over ``size`` logits is so small that XLA CPU
  takes longer to run a ``lax.cond`` (a fallback taken only when the
  one-pass loss is NaN) than to select per logit (measured: up to 2^16
  logits)."""
  return size <= 2**16


def inline_sized(size: int) -> bool:
  """Whether a pass over ``size`` logits is small enough that its whole
  training step can stay under the 1000 flops (XLA's cost analysis; ``exp``
  and ``log`` do not count) up to which XLA CPU runs a program on the
  calling thread instead of handing it to its thread pool (which costs
  more than such a program's work): about 12 flops per logit, as optax's
  step, so up to 80 logits; 128 leaves room for a few extra rows."""
  return size <= 128


def dense_sum(u, z: jax.Array) -> jax.Array:
  """``Σ_c u_c·z_c``, exactly 0 for ``u_c = 0`` on ``z_c = −inf`` and
  ``−inf`` for mass ``u_c > 0`` there; ``u`` an array like ``z`` or one
  number for every class.

  Past :func:`inline_sized`: no compare or select, so the sum stays one
  fused loop. ``z`` is clamped to the finite floats, so a zero target's
  term is ``0·finite = 0``, not ``0·inf = NaN``; the mass lost on
  ``−inf``, ``zc − z`` (0 at every finite ``z``, ``+inf`` at ``−inf``),
  capped at ``2^127``, times ``u``, then times ``2^127`` again, stays 0
  for ``u = 0`` and overflows for any normal ``u > 0``. That term is
  constant under autodiff: its derivative is 0 wherever it is finite, and
  its huge partials would swamp the others in reverse mode.
  """
  if inline_sized(z.size):
    return _dense_sum_small(u, z)
  info = jnp.finfo(z.dtype)
  zc = finite(z)
  scale = 2.0 ** (info.maxexp - 1)
  if jnp.ndim(u) == 0:
    # One target for every class: factored out, the sum reads only z.
    lost = jax.lax.stop_gradient(jnp.minimum(zc - z, scale) * scale)
    return u * jnp.sum(zc - lost, axis=-1)
  lost = jax.lax.stop_gradient((u * jnp.minimum(zc - z, scale)) * scale)
  return jnp.sum(u * zc - lost, axis=-1)


def product_sum_first(shape: tuple[int, ...], masked: bool) -> bool:
  """Whether :func:`dense_sum_product_first` pays at logits of ``shape``
  (measured, 2-core Intel Xeon): unmasked (a masked entry's ``−inf`` under
  a zero target would take the fallback on every call); more than 2^14
  logits (below, the cond costs what the ops save, and a tiny step leaves
  XLA CPU's calling thread); at most 2^22 (above, the step is bound by
  memory, not by the sum's ops, and the cond's split costs); and below
  :func:`one_kernel` rows (where XLA CPU runs the chain of reductions as one
  kernel, and a cond would split it)."""
  size = math.prod(shape)
  return (not masked and 2**14 < size <= 2**22
          and not one_kernel(_rows(shape, (-1,))))


def dense_sum_product_first(u, z: Callable[[], jax.Array]) -> jax.Array:
  """:func:`dense_sum` for a gradient's forward pass, as the plain sum of
  products ``Σ u·z`` (two ops per logit, where :func:`dense_sum`'s guards
  take eight), and by :func:`dense_sum` only when some row of that is NaN:
  a zero target on a ``−inf`` logit (``0·inf``), or a NaN input. Below
  :func:`one_kernel` rows XLA CPU runs this sum as its own single-threaded
  loop, beside the gradient's ``exp`` pass, and its ops then set the
  step's time. Not differentiated (the VJP rule's forward).

  ``z`` computes the shifted logits: each branch computes its own from the
  logits, so the cond holds no ``[N, C]`` array of them as its operand.
  """
  fast = jnp.sum(u * z(), axis=-1)
  return jax.lax.cond(jnp.any(jnp.isnan(fast)), lambda: dense_sum(u, z()),
                      lambda: fast)


@jax.custom_jvp
def _dense_sum_small(u, z: jax.Array) -> jax.Array:
  """:func:`dense_sum` in three ops per logit: a select drops the terms of
  a zero target, so ``0·inf`` never forms. The select would make
  ``∂/∂u`` 0 at ``u = 0``; the JVP rule gives the sum's own derivative,
  ``finite(z)``, and ``u·∂z`` (0 at ``z = −inf``)."""
  if jnp.ndim(u) == 0:
    return jnp.where(u == 0, 0, u * jnp.sum(z, axis=-1))
  return jnp.sum(jnp.where(u == 0, 0, u * z), axis=-1)


@_dense_sum_small.defjvp
def _dense_sum_small_jvp(primals, tangents):
  (u, z), (du, dz) = primals, tangents
  # Linear in (du, dz), for reverse mode's transpose.
  alive = z > -float(jnp.finfo(z.dtype).max)
  dout = jnp.sum(jnp.where(alive, u * dz, 0), axis=-1)
  if jnp.ndim(u) == 0:
    dout = dout + du * jnp.sum(finite(z), axis=-1)
  else:
    dout = dout + jnp.sum(du * finite(z), axis=-1)
  return _dense_sum_small(u, z), dout


@jax.custom_jvp
def inline_mass(s: jax.Array) -> jax.Array:
  """:func:`jsoft._softmax.mass` (the same values, the same slope 1) as one
  max per row instead of a compare and a select, for an
  :func:`inline_sized` pass with a dense target. Only there: XLA fuses a
  max differently, and elsewhere the integer-label loss would round apart
  from the same loss computed with its statistics."""
  return jnp.maximum(s, 1)


@inline_mass.defjvp
def _inline_mass_jvp(primals, tangents):
  (s,), (ds,) = primals, tangents
  return inline_mass(s), ds


def finite(z: jax.Array) -> jax.Array:
  """``z`` clamped to the finite floats: ``u·z`` and ``e^z·z`` are then 0,
  not NaN, at ``z = −inf``."""
  return jnp.maximum(z, -float(jnp.finfo(z.dtype).max))


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
