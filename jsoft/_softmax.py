r"""The softmax family: ``logsumexp``, ``softmax`` and ``log_softmax``.

All three rest on the max shift. For a slice ``x`` with maximum ``m``,

.. math::
  \operatorname{lse}(x) = m + \log \sum_i e^{x_i - m}, \qquad
  \operatorname{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}},

which is exact for any constant ``m`` and, with ``m = max x``, never overflows
(every exponent is ≤ 0) and never divides by zero (one term is ``e^0 = 1``).
Because the results do not depend on ``m``, the shift is held constant under
differentiation (``stop_gradient``).

Non-finite inputs follow one convention everywhere in jsoft:

* ``-inf`` entries, and entries with ``where=False``, carry no mass. A slice
  with no mass at all (all masked, all ``-inf``, or empty) has softmax 0,
  log_softmax ``-inf``, logsumexp ``-inf``, and zero gradient.
* NaN propagates to every output of its slice. A ``+inf`` logit makes
  ``logsumexp`` ``+inf``; the softmax of its slice is ``inf/inf``, undefined,
  and NaN as in ``jax.nn``.

Each function has a hand-written ``custom_jvp`` rule (reverse mode is its
transpose) that calls the function itself, so derivatives of every order keep
using these rules.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks, _compat, _spellings

Axis = int | tuple[int, ...] | None


# --------------------------------------------------------------- max shift
#
# Kernels are written so that every pass over the logits is one fused XLA
# loop: a per-entry compare-and-select, or an [N, C] intermediate shared by
# two reductions, would instead be materialised as an [N, C] temporary.
# Per-row selects (on the max, the sum) cost nothing and are used freely.


def masked(x: jax.Array, where: jax.Array | None) -> jax.Array:
  """``x`` with ``where=False`` entries replaced by ``-inf`` (no mass)."""
  return x if where is None else jnp.where(where, x, -jnp.inf)


def row_shift(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
  """The shift ``c``: the max over ``axis`` (kept), and at least the most
  negative float.

  The floor makes a slice with no mass (all ``-inf``, all masked, or empty)
  shift by a finite number, so its entries stay ``-inf`` instead of becoming
  ``-inf - (-inf) = NaN``; NaN and ``+inf`` propagate. It is the reduction's
  initial value rather than a ``maximum`` afterwards, which keeps the max and
  the ``exp(x - c)`` that follows in one fused XLA loop. Constant under
  autodiff: the results do not depend on the shift.
  """
  x = lax.stop_gradient(x)
  axis = tuple(a % x.ndim for a in axis)
  floor = -jnp.finfo(x.dtype).max
  if all(x.shape[a] == 1 for a in axis) and axis:
    # XLA folds a reduction over size-one axes into its operand and drops
    # the initial value, which would leave a -inf shift: take it explicitly.
    return jnp.maximum(x, floor)
  c = lax.reduce(x, floor, lax.max, axis)
  return lax.expand_dims(c, axis)


def nan_where(flag: jax.Array, dtype: Any) -> jax.Array:
  """NaN where ``flag`` is True and ``-0.0`` elsewhere (add it, or multiply
  by ``1 +`` it), without a NaN constant: ``jnp.where(flag, jnp.nan, …)``
  would make every call raise under ``jax.debug_nans`` with
  ``jax.disable_jit``, whatever its inputs. Constant under autodiff."""
  return lax.stop_gradient(jnp.sqrt(-flag.astype(dtype)))


def lse_from_parts(c: jax.Array, s: jax.Array) -> jax.Array:
  """``c + log s``, and ``+inf`` when the slice holds ``+inf`` (where the
  shifted sum is NaN). A slice with no mass has ``s = 0``: ``-inf``."""
  return jnp.where(c == jnp.inf, jnp.inf, c + jnp.log(s))


@jax.custom_jvp
def mass(s: jax.Array) -> jax.Array:
  """``max(s, 1)`` for a sum ``s = Σ e^(x - c)``, which is 0 (no mass) or at
  least 1 (the max term is ``e^0``): a slice with no mass divides 0 by 1 and
  takes ``log 1 = 0``, so its softmax is 0 and its log-softmax ``-inf - 0``.
  NaN passes through (``NaN < 1`` is false).

  Its derivative is exactly 1 everywhere: not ``maximum``'s, which splits
  1/2 : 1/2 between its operands at a confident prediction's ``s = 1`` and
  would halve ``∂s`` in every second derivative (Hessians, HVPs) computed
  through the VJP rules, and not the select's, which costs a select per
  row in every gradient. Where ``s < 1`` (``s = 0``) every ``e^(x − c)``
  is 0, and so are ``∂s`` (a sum of ``e^(x − c)·∂x``) and every gradient
  a cotangent of ``s`` scales: the slope there is never read.
  """
  return jnp.where(s < 1, 1, s).astype(s.dtype)


@mass.defjvp
def _mass_jvp(primals, tangents):
  (s,), (ds,) = primals, tangents
  return mass(s), ds


# ------------------------------------------------------------------ kernels


def _upcast(x: jax.Array) -> jax.Array:
  """``x`` in the compute dtype (float32 for 16-bit floats)."""
  return x.astype(_checks.compute_dtype(x.dtype))


def _shift(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
  """:func:`row_shift` of ``x`` in the compute dtype, for all three
  kernels. The max of 16-bit ``x`` is taken at their own width (exact: the
  upcast is increasing, so it commutes with the max), which reads half the
  bytes of a float32 copy."""
  return row_shift(x, axis).astype(_checks.compute_dtype(x.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax(x: jax.Array, axis: tuple[int, ...],
             where: jax.Array | None) -> jax.Array:
  x = masked(x, where)
  e = jnp.exp(_upcast(x) - _shift(x, axis))
  return e / _spellings.guarded_mass(jnp.sum(e, axis=axis, keepdims=True))


@_softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
  x, where = primals
  dx = _upcast(tangents[0])
  y = _softmax(x, axis, where)
  # dy = y ⊙ (dx − Σ y·dx); masked entries have y = 0 and stay at 0.
  # Spelled y ⊙ dx + y·(−Σ y ⊙ dx), so that its transpose (the gradient)
  # comes out as y ⊙ (ct − Σ y ⊙ ct), the negation on the per-slice sum:
  # three ops per entry, not five.
  p = y * dx
  return y, p + y * -jnp.sum(p, axis=axis, keepdims=True)


def _log_softmax_value(x: jax.Array, axis: tuple[int, ...],
                       where: jax.Array | None, reread: bool) -> jax.Array:
  x = masked(x, where)
  c = _shift(x, axis)
  z = _upcast(x) - c
  s = jnp.sum(jnp.exp(z), axis=axis, keepdims=True)
  if reread and where is None and _spellings.rereads_input(x.shape, axis):
    # Large and split into passes: the last pass reads x (no mask: a masked
    # x would be held whole for it) instead of the stored x − m.
    x, c = _compat.barrier((x, c))
    z = _upcast(x) - c
  # log softmax = (x − m) − log Σ e^(x − m); −inf for a slice with no mass.
  return z - jnp.log(_spellings.guarded_mass(s))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _log_softmax(x: jax.Array, axis: tuple[int, ...],
                 where: jax.Array | None) -> jax.Array:
  return _log_softmax_value(x, axis, where, reread=True)


@_log_softmax.defjvp
def _log_softmax_jvp(axis, primals, tangents):
  x, where = primals
  dx = _upcast(tangents[0])
  # Differentiated, float32 x − m is better kept for the last pass (the
  # 2048×32000 step: 1.19× jax.nn's speed kept, 1.03× formed again); 16-bit
  # x is better read again (1.47× → 1.71×).
  y = _log_softmax_value(x, axis, where, reread=x.dtype.itemsize == 2)
  p = jnp.exp(y)
  dy = dx - jnp.sum(p * dx, axis=axis, keepdims=True)
  # Masked entries are the constant −inf: zero tangent, exactly.
  return y, dy if where is None else jnp.where(where, dy, 0)


def _lse_weights(a, b, where, axis):
  """Shared by logsumexp and its JVP: ``(c, e, s)``, ``s = Σ b·e^(a − c)``,
  in float32 for 16-bit ``a``.

  Entries with ``b == 0`` carry no mass (as in ``jax.nn.logsumexp``), so a
  large ``a`` there cannot swamp the shift. The max is taken on ``a`` as it
  comes (the upcast is increasing, so it commutes with the max): each pass
  then upcasts inside its own loop, and no float32 copy of ``a`` is stored.
  """
  if b is not None:
    where = (b != 0) if where is None else where & (b != 0)
  x = masked(a, where)
  c = _shift(x, axis)
  e = jnp.exp(_upcast(x) - c)
  s = jnp.sum(e if b is None else b * e, axis=axis, keepdims=True)
  return c, e, s


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _logsumexp(a: jax.Array, b: jax.Array | None, where: jax.Array | None,
               axis: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """``(log|Σ b·e^a|, sign)`` over ``axis``, both with the axes kept."""
  c, _, s = _lse_weights(a, b, where, axis)
  return lse_from_parts(c, jnp.abs(s)), jnp.sign(s)


@_logsumexp.defjvp
def _logsumexp_jvp(axis, primals, tangents):
  a, b, where = primals
  da, db, _ = tangents
  out, sign = _logsumexp(a, b, where, axis)
  c, e, s = _lse_weights(a, b, where, axis)
  inv = 1 / jnp.where(s == 0, 1, s)  # s is signed when b is given
  q = e * inv  # e^(a − lse)·sign: the softmax when b is None.
  da = da.astype(q.dtype)  # a (and so da) may be 16-bit: see _lse_weights
  d = q * da if b is None else q * (b * da)
  if b is not None:
    # ∂/∂b_i = e^(a_i − lse)·sign for every unmasked i, including b_i = 0.
    x = _upcast(masked(a, where))
    q_all = jnp.exp(x - c) * inv
    d = d + q_all * db
  dout = jnp.sum(d, axis=axis, keepdims=True)
  return (out, sign), (dout, jnp.zeros_like(sign))


def _infinite_sign(a, b, where, axis, out, sign):
  """The sign where the sum is infinite (a ``+inf`` in ``a``), where the
  shifted sum is ``inf/inf``: that of ``Σ b`` over the ``+inf`` entries."""
  if b is None:
    return jnp.where(out == jnp.inf, 1, sign).astype(sign.dtype)
  at_inf = (a == jnp.inf) if where is None else (a == jnp.inf) & where
  s_inf = jnp.sum(jnp.where(at_inf, b, 0), axis=axis, keepdims=True)
  return jnp.where(out == jnp.inf, jnp.sign(s_inf), sign).astype(sign.dtype)


# -------------------------------------------------------------- public API


def _static_axis(axis: Any) -> Any:
  return tuple(axis) if isinstance(axis, list) else axis


@functools.partial(jax.jit, static_argnames=("axis", "keepdims",
                                             "return_sign"))
def _logsumexp_jit(a, axis, b, keepdims, return_sign, where):
  fn = "logsumexp"
  a = _checks.real(jnp.asarray(a), fn, "a")
  arrays = [a]
  if b is not None:
    b = _checks.real(jnp.asarray(b), fn, "b")
    arrays.append(b)
  dtype = jnp.result_type(*arrays)
  shape = _checks.broadcast_shape([x.shape for x in arrays], fn, "a and b")
  axes = _checks.axes(axis, len(shape), fn, allow_none=True)
  where = _checks.mask(where, shape, fn)
  _checks.finite(a, fn, "a", where)
  ct = _checks.compute_dtype(dtype)
  # a stays in its dtype: the kernel upcasts it (see _lse_weights).
  a = jnp.broadcast_to(a, shape).astype(dtype)
  if b is not None:
    b = jnp.broadcast_to(b, shape).astype(ct)
  out, sign = _logsumexp(a, b, where, axes)
  sign = _infinite_sign(a, b, where, axes, out, sign)
  if not return_sign and b is not None:
    out = out + nan_where(sign < 0, out.dtype)  # the log of a negative sum
  if not keepdims:
    out, sign = jnp.squeeze(out, axes), jnp.squeeze(sign, axes)
  out, sign = out.astype(dtype), sign.astype(dtype)
  return (out, sign) if return_sign else out


def logsumexp(a: jax.typing.ArrayLike, axis: Axis = None,
              b: jax.typing.ArrayLike | None = None, keepdims: bool = False,
              return_sign: bool = False,
              where: jax.typing.ArrayLike | None = None
              ) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Log-sum-exp, computed without overflow: a drop-in for
  :func:`jax.nn.logsumexp`.

  .. math::
    \operatorname{lse}(a) = \log \sum_i b_i e^{a_i}
                          = m + \log \sum_i b_i e^{a_i - m},
    \quad m = \max_i a_i .

  The max shift keeps every exponent ≤ 0. Derivative:
  :math:`\partial\,\mathrm{lse}/\partial a_i = b_i e^{a_i - \mathrm{lse}}`
  (the softmax when ``b`` is None) and
  :math:`\partial\,\mathrm{lse}/\partial b_i = e^{a_i - \mathrm{lse}}`.

  Args:
    a: input array.
    axis: int, tuple of ints, or None (all axes) to reduce over.
    b: optional scale factors, broadcastable with ``a``; entries with
      ``b == 0`` are excluded, so they cannot overflow the sum.
    keepdims: keep the reduced axes with size one.
    return_sign: also return the sign of :math:`\sum b e^a`, and the log of
      its absolute value (otherwise a negative sum gives NaN).
    where: optional boolean mask broadcastable with ``a``; ``False`` entries
      are left out of the sum and get zero gradient.

  Returns:
    The log-sum-exp, in ``a``'s (promoted) floating dtype; with
    ``return_sign``, a pair ``(lse, sign)``. An all ``-inf`` or all-masked
    slice gives ``-inf`` (sign 0) with zero gradient; a slice holding
    ``+inf`` gives ``+inf``.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> lse = jsoft.logsumexp(jnp.array([-1000.0, -1000.0, -1000.0]))
    >>> print(f"{lse:.4f}")  # -1000 + log 3
    -998.9014
  """
  return _logsumexp_jit(_checks.asarray(a), _static_axis(axis),
                        _checks.asarray(b), keepdims, return_sign,
                        _checks.asarray(where))


def _activation(kernel, fn):
  """The jitted entry point shared by softmax and log_softmax."""

  @functools.partial(jax.jit, static_argnames=("axis",))
  def run(x, axis, where):
    x = _checks.real(jnp.asarray(x), fn, "x")
    axes = _checks.axes(axis, x.ndim, fn, allow_none=True)
    where = _checks.mask(where, x.shape, fn)
    _checks.finite(x, fn, "x", where)
    # The kernel computes 16-bit x in float32 (see _shift).
    return kernel(x, axes, where).astype(x.dtype)

  return run


_softmax_jit = _activation(_softmax, "softmax")
_log_softmax_jit = _activation(_log_softmax, "log_softmax")


def softmax(x: jax.typing.ArrayLike, axis: Axis = -1,
            where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Softmax, computed without overflow: a drop-in for :func:`jax.nn.softmax`.

  .. math::
    \operatorname{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}},
    \quad m = \max_j x_j .

  Subtracting the max changes nothing mathematically and keeps every exponent
  ≤ 0, so ``softmax([-1000, -1000, -1000])`` is exactly ``1/3`` (the naive
  formula gives ``0/0``). Derivative (a ``custom_jvp`` rule):
  :math:`\dot y = y \odot (\dot x - \langle y, \dot x\rangle)`.

  Args:
    x: input array (16-bit floats are computed in float32).
    axis: int, tuple of ints or None (all axes) to normalise over.
    where: optional boolean mask broadcastable with ``x``; ``False`` entries
      get probability 0 and zero gradient, whatever their value.

  Returns:
    An array of ``x``'s shape and dtype. A slice with no mass (all masked or
    all ``-inf``) gives zeros.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> print(jsoft.softmax(jnp.array([2.0, 3.0, 5.0, 6.0])).round(4))
    [0.0128 0.0347 0.2562 0.6964]
  """
  return _softmax_jit(_checks.asarray(x), _static_axis(axis),
                      _checks.asarray(where))


def log_softmax(x: jax.typing.ArrayLike, axis: Axis = -1,
                where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Log-softmax, computed without overflow: a drop-in for
  :func:`jax.nn.log_softmax`.

  .. math::
    \log\operatorname{softmax}(x)_i = (x_i - m) - \log \sum_j e^{x_j - m},
    \quad m = \max_j x_j .

  Computed from the shifted logits, never as ``log(softmax(x))``, so it keeps
  full precision where the softmax underflows. Derivative (a ``custom_jvp``
  rule): :math:`\dot y = \dot x - \langle \operatorname{softmax}(x),
  \dot x\rangle`.

  Args:
    x: input array (16-bit floats are computed in float32).
    axis: int, tuple of ints or None (all axes) to normalise over.
    where: optional boolean mask broadcastable with ``x``; ``False`` entries
      give ``-inf`` and get zero gradient.

  Returns:
    An array of ``x``'s shape and dtype; ``-inf`` throughout a slice with no
    mass.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> print(jsoft.log_softmax(jnp.array([1000.0, -1000.0, 0.0])))
    [    0. -2000. -1000.]
  """
  return _log_softmax_jit(_checks.asarray(x), _static_axis(axis),
                          _checks.asarray(where))
