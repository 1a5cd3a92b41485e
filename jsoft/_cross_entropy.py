r"""Softmax cross-entropy losses, with the ``y - t`` gradient as a VJP rule.

For logits ``x`` and a target distribution ``t`` over the classes,

.. math::
  L = -\sum_c t_c \log\operatorname{softmax}(x)_c
    = \sum_c t_c \bigl(\log s - z_c\bigr),
  \qquad z = x - \max x, \quad s = \sum_c e^{z_c},

and the gradient is the blog post's ``y - t``:

.. math::
  \frac{\partial L}{\partial x} = \operatorname{softmax}(x)\sum_c t_c - t .

Both losses compute from the shifted logits ``z`` (never ``lse - x``, which
loses every digit when ``|x|`` is large) and carry a hand-written VJP rule
(see :mod:`jsoft._rules`) that evaluates ``y - t`` in one pass over the
logits, without a one-hot array and without autodiff through the forward.

Masks: ``where=False`` entries take part in neither the softmax nor the
target; a row with nothing left has loss 0 and zero gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoft import _checks, _rules
from jsoft._softmax import masked, mass, row_shift

Axis = int | tuple[int, ...] | None
_LAST = (-1,)


# ------------------------------------------------------------ class layout


def _class_layout(fn: str, logits: jax.Array, axis: Any, allow_none: bool):
  """Resolves ``axis`` into (class axes, batch axes, batch shape)."""
  axes = _checks.axes(axis, logits.ndim, fn, allow_none=allow_none)
  batch_axes = tuple(i for i in range(logits.ndim) if i not in axes)
  return axes, batch_axes, tuple(logits.shape[i] for i in batch_axes)


def _classes_last(x: jax.Array, axes: tuple[int, ...],
                  batch_axes: tuple[int, ...]) -> jax.Array:
  """Moves the class axes last and flattens them into one (C order)."""
  perm = batch_axes + axes
  if perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, perm)
  batch = x.shape[:len(batch_axes)]
  return x.reshape(batch + (int(np.prod(x.shape[len(batch_axes):])),))


# ------------------------------------------------------------------ masks
#
# ``where`` reaches the kernels in one of two forms: ``rows`` (one flag per
# example, applied to whole rows after the fact, at no cost in the passes
# over the logits) or ``entries`` (one flag per logit; the masked logits are
# replaced by −inf before the max, which costs one select per logit).


def _entries(x: jax.Array, entries: jax.Array | None) -> jax.Array:
  return masked(x.astype(_checks.compute_dtype(x.dtype)), entries)


def _live(entries, rows):
  """Per-example flag: does the example take part at all? (None: all do.)"""
  live = None if entries is None else jnp.any(entries, axis=-1)
  if rows is not None:
    live = rows if live is None else live & rows
  return live


# ---------------------------------------------------- integer-label kernel


def _label_terms(labels, entries, rows, num_classes):
  """Per-example bookkeeping for integer labels.

  Returns ``(idx, ok, fill)``: the label as an in-range int32 index, whether
  the example has a loss at all, and the value its loss and gradient take
  otherwise: NaN for a label outside ``[0, C)`` (never a wrapped class); 0
  for an example masked out, or whose label entry is masked (the target
  restricted to the unmasked entries is then empty).
  """
  valid = (labels >= 0) & (labels < num_classes)
  idx = jnp.where(valid, labels, 0).astype(jnp.int32)
  ok, fill = valid, jnp.where(valid, 0.0, jnp.nan)
  live = _live(entries, rows)
  if live is not None:
    ok, fill = ok & live, jnp.where(live, fill, 0.0)
  if entries is not None and num_classes:
    ok = ok & jnp.take_along_axis(entries, idx[..., None], axis=-1)[..., 0]
  return idx, ok, fill


def _label_logit(x: jax.Array, idx: jax.Array) -> jax.Array:
  """``x[..., idx]`` (kept as a size-one axis); ``-inf`` without classes."""
  if x.shape[-1] == 0:
    return jnp.full(idx.shape + (1,), -jnp.inf, x.dtype)
  return jnp.take_along_axis(x, idx[..., None], axis=-1)


def _int_ce_fwd(static, logits, labels, entries, rows):
  del static
  x = _entries(logits, entries)
  idx, ok, fill = _label_terms(labels, entries, rows, x.shape[-1])
  c = row_shift(x, _LAST)
  s = jnp.sum(jnp.exp(x - c), axis=-1)  # one fused pass over the logits
  z_label = (_label_logit(x, idx) - c)[..., 0]
  # L = log s − (x_label − m): from the shifted logits, so [-1000]*3 gives
  # log 3 − 0 exactly. A label without mass (x_label = −inf) gives +inf.
  loss = jnp.log(mass(s)) - z_label
  return jnp.where(ok, loss, fill), (logits, labels, entries, rows, c, s)


def _int_ce_bwd(static, res, ct):
  del static
  logits, labels, entries, rows, c, s = res
  x = _entries(logits, entries)
  idx, ok, fill = _label_terms(labels, entries, rows, x.shape[-1])
  # Per-example weight: the cotangent, or NaN for an invalid label.
  w = ct * jnp.where(ok, 1.0, fill)
  # y − t: the softmax scaled by w, minus w at the label (iota == label: no
  # one-hot array). One elementwise pass that reads only the logits, so XLA
  # writes the gradient into their buffer when they die here (an LM head's
  # h @ W): no second [N, C] buffer. x + (−c) is x − c exactly, spelled so
  # that XLA does not share exp(x − c) with the forward's sum, which would
  # materialise it and keep the logits alive.
  p = jnp.exp(x + (-c)) * (w / mass(s))[..., None]
  is_label = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == (
      idx[..., None])
  g = jnp.where(is_label, p - w[..., None], p)
  if entries is not None or rows is not None:
    # Examples without a loss get an exact 0 by select, whatever their
    # logits hold (0·NaN would be NaN).
    has = ok | jnp.isnan(fill)
    g = jnp.where(has[..., None], g, 0)
  return g.astype(logits.dtype), None, None, None


def _int_ce_fun(static, logits, labels, entries, rows):
  return _int_ce_fwd(static, logits, labels, entries, rows)[0]


_int_ce = _rules.vjp_rule(_int_ce_fun, _int_ce_fwd, _int_ce_bwd)


# -------------------------------------------------- probability-label kernel


def _ce_parts(logits, labels, entries):
  """Masked logits and targets in compute dtype, the shift and the mass."""
  x = _entries(logits, entries)
  t = labels.astype(x.dtype)
  if entries is not None:
    t = jnp.where(entries, t, 0)
  c = row_shift(x, _LAST)
  s = jnp.sum(jnp.exp(x - c), axis=-1, keepdims=True)
  return x, t, c, s


def _ce_fwd(static, logits, labels, entries, rows):
  del static
  x, t, c, s = _ce_parts(logits, labels, entries)
  info = jnp.finfo(x.dtype)
  z = x - c
  # Σ t·(log s − z) = Σ t·(−log softmax), with z clamped to the finite range
  # so that a zero target on a −inf logit adds 0·finite = 0, not 0·inf = NaN.
  zc = jnp.maximum(z, -float(info.max))
  # Positive target mass on a −inf logit makes the loss +inf: zc − z is 0 at
  # every finite z and +inf at z = −inf; capped at 2^127, times t, then
  # times 2^127 again, it stays 0 for t = 0 and overflows to +inf for any
  # normal t > 0. (No compare or select: the whole sum is one fused pass.)
  # Constant under autodiff (its derivative is 0 wherever it is finite, and
  # its huge partials would swamp the others in reverse mode).
  scale = 2.0 ** (info.maxexp - 1)
  lost = lax.stop_gradient((t * jnp.minimum(zc - z, scale)) * scale)
  loss = jnp.sum(t * (jnp.log(mass(s)) - zc) + lost, axis=-1)
  if rows is not None:
    loss = jnp.where(rows, loss, 0)
  return loss, (logits, labels, entries, rows)


def _ce_bwd(static, res, ct):
  del static
  logits, labels, entries, rows = res
  x, t, c, s = _ce_parts(logits, labels, entries)
  z = x + (-c)  # x − c, not shared with the forward (see _int_ce_bwd)
  ct = ct[..., None]
  # y − t, for targets of any total mass: softmax·Σt − t.
  p = jnp.exp(z) / mass(s)
  g_logits = (p * jnp.sum(t, -1, keepdims=True) - t) * ct
  # ∂L/∂t = −log softmax = log s − z (+inf where the softmax is 0).
  g_labels = (jnp.log(mass(s)) - z) * ct
  if entries is not None:
    g_labels = jnp.where(entries, g_labels, 0)
  if rows is not None:
    g_logits = jnp.where(rows[..., None], g_logits, 0)
    g_labels = jnp.where(rows[..., None], g_labels, 0)
  return (g_logits.astype(logits.dtype), g_labels.astype(labels.dtype), None,
          None)


def _ce_fun(static, logits, labels, entries, rows):
  return _ce_fwd(static, logits, labels, entries, rows)[0]


_ce = _rules.vjp_rule(_ce_fun, _ce_fwd, _ce_bwd)


# -------------------------------------------------------------- public API


def _check_mask(x, entries, rows):
  """The entries the value checks look at (masked-out ones are exempt)."""
  if rows is None:
    return entries
  return jnp.broadcast_to(rows[..., None], x.shape)


def _static_axis(axis: Any) -> Any:
  return tuple(axis) if isinstance(axis, list) else axis


@functools.partial(jax.jit, static_argnames=("axis",))
def _int_ce_jit(logits, labels, axis, where):
  fn = "softmax_cross_entropy_with_integer_labels"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _checks.floating(logits, fn, "logits")
  _checks.integer(labels, fn, "labels")
  axes, batch_axes, batch = _class_layout(fn, logits, axis, allow_none=False)
  _checks.shape(labels, batch, fn, "labels",
                f"the logits' shape {logits.shape} without the class axes "
                f"{axes}")
  entries, rows = _checks.example_mask(where, logits.shape, batch, fn)
  x = _classes_last(logits, axes, batch_axes)
  if entries is not None:
    entries = _classes_last(entries, axes, batch_axes)
  _checks.finite(x, fn, "logits", _check_mask(x, entries, rows))
  live = _live(entries, rows)
  _checks.in_range(labels, x.shape[-1], fn, None if live is None else ~live)
  return _int_ce(None, x, labels, entries, rows)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Softmax cross-entropy against integer class labels: a drop-in for
  :func:`optax.softmax_cross_entropy_with_integer_labels`.

  .. math::
    L = \log \sum_c e^{x_c - m} - (x_y - m), \quad m = \max_c x_c .

  Computed from the shifted logits ``x - m`` (so ``[-1000, -1000, -1000]``
  gives ``log 3`` to full precision) and, near a confident prediction, as
  ``log1p`` of the mass off the label, so tiny losses keep their digits.
  Labels outside ``[0, C)`` give NaN, never a wrapped class.

  Gradient (the VJP rule): :math:`\partial L/\partial x =
  \operatorname{softmax}(x) - \operatorname{onehot}(y)`, scaled by the
  incoming cotangent, written in one pass without building a one-hot array.
  Every autodiff mode works (``jvp``, ``jacfwd``, ``hessian``, HVPs).

  Args:
    logits: floating array ``[..., C]`` (or with the classes on ``axis``);
      16-bit floats are computed in float32.
    labels: integer array of the logits' shape without the class axes.
    axis: the class axis, or a tuple of axes (a label is then a flat C-order
      index into the slice over those axes).
    where: optional boolean mask, of the logits' shape (entries) or the
      labels' shape (examples). ``False`` entries are left out of both the
      softmax and the target; a label on a masked entry, or an example with
      nothing unmasked, gives loss 0 and zero gradient.

  Returns:
    The per-example loss, of the labels' shape: float32 for 16-bit logits,
    else the logits' dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logits = jnp.array([[-1000.0, -1000.0, -1000.0], [2.0, 3.0, 5.0]])
    >>> labels = jnp.array([1, 2])
    >>> loss = jsoft.softmax_cross_entropy_with_integer_labels(logits, labels)
    >>> print(loss.round(4))  # log 3, and -log softmax([2, 3, 5])[2]
    [1.0986 0.1698]
  """
  return _int_ce_jit(_checks.asarray(logits), _checks.asarray(labels),
                     _static_axis(axis), _checks.asarray(where))


@functools.partial(jax.jit, static_argnames=("axis",))
def _ce_jit(logits, labels, axis, where):
  fn = "softmax_cross_entropy"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _checks.floating(logits, fn, "logits")
  labels = _checks.real(labels, fn, "labels")
  _checks.shape(labels, logits.shape, fn, "labels", "the logits' shape")
  axes, batch_axes, batch = _class_layout(fn, logits, axis, allow_none=True)
  entries, rows = _checks.example_mask(where, logits.shape, batch, fn)
  x = _classes_last(logits, axes, batch_axes)
  t = _classes_last(labels, axes, batch_axes)
  if entries is not None:
    entries = _classes_last(entries, axes, batch_axes)
  checked_entries = _check_mask(x, entries, rows)
  _checks.finite(x, fn, "logits", checked_entries)
  _checks.finite(t, fn, "labels", checked_entries)
  return _ce(None, x, t, entries, rows)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Softmax cross-entropy against target distributions: a drop-in for
  :func:`optax.softmax_cross_entropy`.

  .. math::
    L = -\sum_c t_c \log\operatorname{softmax}(x)_c
      = \sum_c t_c \Bigl(\log \sum_k e^{x_k - m} - (x_c - m)\Bigr).

  Uses the max shift, and a target entry of 0 contributes nothing even where
  the logit is ``-inf`` (optax returns NaN there).

  Gradient (the VJP rule): :math:`\partial L/\partial x =
  \operatorname{softmax}(x)\sum_c t_c - t` (``y - t`` for normalised targets)
  and :math:`\partial L/\partial t = -\log\operatorname{softmax}(x)`, scaled
  by the incoming cotangent. Every autodiff mode works.

  Args:
    logits: floating array; 16-bit floats are computed in float32.
    labels: target probabilities, of the logits' shape.
    axis: the class axis, a tuple of axes, or None (all axes).
    where: optional boolean mask, of the logits' shape or the per-example
      shape; ``False`` entries are left out of the softmax and the target.

  Returns:
    The per-example loss (the logits' shape without ``axis``): float32 for
    16-bit logits, else the logits' dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logits = jnp.array([0.0, 1.0, -jnp.inf])
    >>> labels = jnp.array([0.5, 0.5, 0.0])
    >>> print(f"{jsoft.softmax_cross_entropy(logits, labels):.4f}")
    0.8133
  """
  return _ce_jit(_checks.asarray(logits), _checks.asarray(labels),
                 _static_axis(axis), _checks.asarray(where))
