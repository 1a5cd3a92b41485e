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
from typing import Any, NamedTuple

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


# ---------------------------------------------------------------- options
#
# The training options are compile-time constants (part of the jit cache
# key), so an option left at its default adds no operation at all.


class Options(NamedTuple):
  """Loss options fixed at compile time (hashable)."""
  smoothing: float = 0.0
  z_loss: float = 0.0
  cap: float | None = None
  axis_name: Any = None  # mesh axis the classes are sharded over


# ------------------------------------------------------ sharded classes
#
# With ``axis_name`` (inside ``shard_map``) each device holds a slice of the
# classes. Only per-example numbers cross devices: the row max (pmax), the
# sum of exponentials, the label's logit and the target sums (psum); the
# gradient of each slice is computed where it lives.


def maybe_psum(x, axis_name):
  """``psum`` over ``axis_name``, or ``x`` itself without sharding."""
  return x if axis_name is None else lax.psum(x, axis_name)


def num_shards(axis_name) -> int:
  return 1 if axis_name is None else lax.axis_size(axis_name)


def cap_logits(x: jax.Array, cap: float, apart: bool = False) -> jax.Array:
  """``a·tanh(x/a)``; with ``apart``, spelled ``(−a)·tanh(x/(−a))``.

  The same bits (``tanh`` is odd and IEEE division is sign-symmetric), but
  a different expression: a second pass over the logits uses it so that XLA
  does not merge the two into one stored [N, C] array shared by the passes
  (recomputing ``tanh`` inside each fused pass is cheaper than writing it
  out and reading it back). The backward pass has its own form
  (:func:`capped_with_slope`).
  """
  if apart:
    return (-cap) * jnp.tanh(x / (-cap))
  return cap * jnp.tanh(x / cap)


def _logits(logits: jax.Array, entries: jax.Array | None,
            cap: float | None, apart: bool = False) -> jax.Array:
  """The logits the softmax sees: compute dtype, soft-capped, masked."""
  x = logits.astype(_checks.compute_dtype(logits.dtype))
  if cap is not None:
    x = cap_logits(x, cap, apart)
  return masked(x, entries)


def capped_with_slope(logits: jax.Array, entries: jax.Array | None,
                      cap: float) -> tuple[jax.Array, jax.Array]:
  """The backward pass's ``(x̃, dx̃/dx)`` under the soft cap ``x̃ = a·tanh(x/a)``.

  Both from ``v = −2|x|/a``: ``tanh(|x|/a) = −m/(2 + m)`` with
  ``m = expm1(v)`` (full precision near 0, where ``1 − e^v`` would cancel),
  and ``sech²(x/a) = 4e/(1 + e)²`` with ``e = e^v`` (full precision far out,
  where ``1 − tanh²`` rounds to 0 once ``|x|/a`` passes about 9 in
  float32). Within a few ulps of the forward's ``tanh``, and written with
  constants of its own, so XLA keeps this pass separate from the forward's
  fused reductions rather than storing shared [N, C] intermediates. Masked
  entries are read as 0 (slope 1, so whatever they hold cannot leak into
  the gradient) and come out as ``-inf``.
  """
  x = logits.astype(_checks.compute_dtype(logits.dtype))
  if entries is not None:
    x = jnp.where(entries, x, 0)
  v = jnp.abs(x) * (-2.0 / cap)
  m, e = jnp.expm1(v), jnp.exp(v)
  capped = jnp.sign(x) * (cap * (-m / (2 + m)))
  slope = (4 * e) / jnp.square(1 + e)
  return masked(capped, entries), slope


def _target_sum(t, z, log_s, t_sum, axis_name=None):
  """``Σ_c t_c·(log s − z_c)``, that is ``Σ t·(−log softmax)``.

  Evaluated as ``log s·Σt + Σ(−t·z)`` with ``t_sum = Σt`` given (the
  callers know it without a pass over the targets): both terms are ≥ 0
  (``z ≤ 0``), so nothing cancels, and the reduction over the classes does
  not depend on ``log s``, so it never waits for a materialised ``z``.

  ``z`` is clamped to the finite range so that a zero target on a ``-inf``
  logit adds ``0·finite = 0``, not ``0·inf = NaN``. Positive target mass on
  a ``-inf`` logit makes the sum ``+inf``: ``zc − z`` is 0 at every finite
  ``z`` and ``+inf`` at ``z = −inf``; capped at 2^127, times ``t``, then
  times 2^127 again, it stays 0 for ``t = 0`` and overflows to ``+inf`` for
  any normal ``t > 0``. (No compare or select, so the sum stays one fused
  loop.) The overflow term is constant under autodiff: its derivative is 0
  wherever it is finite, and its huge partials would swamp the others.
  """
  info = jnp.finfo(z.dtype)
  zc = jnp.maximum(z, -float(info.max))
  scale = 2.0 ** (info.maxexp - 1)
  if jnp.ndim(t) == 0:
    # One positive target for every class (uniform smoothing): factored out
    # of the sum, which then reads only z. A −inf logit makes it +inf.
    lost = lax.stop_gradient(jnp.minimum(zc - z, scale) * scale)
    return log_s[..., 0] * t_sum + t * maybe_psum(jnp.sum(lost - zc, axis=-1),
                                             axis_name)
  lost = lax.stop_gradient((t * jnp.minimum(zc - z, scale)) * scale)
  return log_s[..., 0] * t_sum + maybe_psum(jnp.sum(lost - t * zc, axis=-1),
                                       axis_name)


def _class_count(entries, num_classes, dtype):
  """The number of classes the smoothing spreads over (per row if masked)."""
  if entries is None:
    return max(num_classes, 1)
  count = jnp.sum(entries, axis=-1, keepdims=True).astype(dtype)
  return jnp.maximum(count, 1)


# ---------------------------------------------------- integer-label kernel


def label_terms(labels, entries, rows, num_classes, axis_name=None):
  """Per-example bookkeeping for integer labels.

  Returns ``(idx, ok, fill, here)``: the label as an in-range int32 index
  into the local classes, whether the example has a loss at all, the value
  its loss and gradient take otherwise: NaN for a label outside ``[0, C)``
  (never a wrapped class); 0 for an example masked out (``where``,
  ``ignore_index``), or whose label entry is masked (the target restricted
  to the unmasked entries is then empty); and, with classes sharded over
  ``axis_name`` (``num_classes`` local ones per device), whether the label
  is on this device (None otherwise).
  """
  valid = (labels >= 0) & (labels < num_classes * num_shards(axis_name))
  here = None
  if axis_name is None:
    idx = jnp.where(valid, labels, 0).astype(jnp.int32)
  else:
    first = lax.axis_index(axis_name) * num_classes
    local = labels - first.astype(labels.dtype)
    here = (local >= 0) & (local < num_classes)
    idx = jnp.where(here, local, 0).astype(jnp.int32)
  ok, fill = valid, jnp.where(valid, 0.0, jnp.nan)
  live = _live(entries, rows)
  if live is not None:
    ok, fill = ok & live, jnp.where(live, fill, 0.0)
  if entries is not None and num_classes:
    ok = ok & jnp.take_along_axis(entries, idx[..., None], axis=-1)[..., 0]
  return idx, ok, fill, here


def _label_logit(x: jax.Array, idx: jax.Array) -> jax.Array:
  """``x[..., idx]`` (kept as a size-one axis); ``-inf`` without classes."""
  if x.shape[-1] == 0:
    return jnp.full(idx.shape + (1,), -jnp.inf, x.dtype)
  return jnp.take_along_axis(x, idx[..., None], axis=-1)


def int_targets(opts, weights, entries, idx, num_classes, dtype, here=None):
  """The target, as ``(label weight, smoothing target)``.

  The target distribution is ``(1 − ε)·w_y·onehot(y) + ε·w/C'`` (torch's
  weighted label smoothing; ``C'`` counts the unmasked classes). The label
  weight ``(1 − ε)·w_y`` is a per-example array, or a Python number when it
  is the same for all (1 without options); the smoothing target ``ε·w/C'``
  is None without smoothing, else broadcastable to the logits.
  ``num_classes`` counts all classes; with sharded classes, ``weights`` are
  this device's and ``here`` says whether the label is among them.
  """
  keep = 1.0 - opts.smoothing
  if weights is None:
    label_w = keep
  elif weights.shape[0] == 0:
    label_w = jnp.zeros(idx.shape, dtype)
  else:
    w_y = jnp.take(weights, idx)
    if here is not None:
      w_y = maybe_psum(jnp.where(here, w_y, 0), opts.axis_name)
    label_w = keep * w_y
  if not opts.smoothing:
    return label_w, None
  w = jnp.ones((), dtype) if weights is None else weights
  if entries is not None:
    w = jnp.where(entries, w, 0)
  return label_w, w * (opts.smoothing / _class_count(entries, num_classes,
                                                     dtype))


def _shifted(logits, entries, cap, apart=False, axis_name=None):
  """``(x̃, c, raw)``: the logits the softmax sees, their row max, and the
  masked logits before the cap.

  Under a soft cap the max is taken on the raw logits and then capped
  (``tanh`` is increasing), so ``x̃ = a·tanh(x/a)`` is computed only inside
  the fused passes that consume it, never stored.
  """
  raw = _entries(logits, entries)
  c = row_shift(raw, _LAST)
  if axis_name is not None:
    c = lax.pmax(c, axis_name)
  if cap is None:
    return raw, c, raw
  return (_logits(logits, entries, cap, apart), cap_logits(c, cap, apart),
          raw)


def _smooth_mass(smooth, weights, entries, opts, shape):
  """``Σ_c`` of the smoothing target (``ε`` when unweighted and unmasked)."""
  if entries is None:
    if weights is None:
      return opts.smoothing
    total = shape[-1] * num_shards(opts.axis_name)
    return opts.smoothing / max(total, 1) * maybe_psum(jnp.sum(weights),
                                                  opts.axis_name)
  return jnp.sum(jnp.broadcast_to(smooth, shape), axis=-1)


def int_ce_fwd(opts, logits, labels, entries, rows, weights):
  ax = opts.axis_name
  x, c, raw = _shifted(logits, entries, opts.cap, axis_name=ax)
  idx, ok, fill, here = label_terms(labels, entries, rows, x.shape[-1], ax)
  label_w, smooth = int_targets(opts, weights, entries, idx,
                                x.shape[-1] * num_shards(ax), x.dtype, here)
  # One fused pass over the logits (and one psum of a number per example).
  s = maybe_psum(jnp.sum(jnp.exp(x - c), axis=-1), ax)
  log_s = jnp.log(mass(s))
  x_label = _label_logit(raw, idx)
  if opts.cap is not None:
    x_label = cap_logits(x_label, opts.cap)
  if here is not None:  # the label's logit, from the device that holds it
    x_label = maybe_psum(jnp.where(here[..., None], x_label, 0), ax)
  z_label = (x_label - c)[..., 0]
  # −log softmax(x)_y = log s − (x_y − m): from the shifted logits, so
  # [-1000]*3 gives log 3 − 0 exactly. A label without mass gives +inf.
  loss = log_s - z_label
  if not (isinstance(label_w, float) and label_w == 1.0):
    loss = label_w * loss
  if smooth is not None:
    # A second reduction that reads the logits again, spelled differently
    # from the sum above (x + (−c); under the cap, its own spelling of x̃
    # and c): a shared x̃ − c would be stored as an [N, C] temporary.
    if opts.cap is None:
      z2 = x + (-c)
    else:
      x2, c2, _ = _shifted(logits, entries, opts.cap, apart=True,
                           axis_name=ax)
      z2 = x2 - c2
    loss = loss + _target_sum(
        smooth, z2, log_s[..., None],
        _smooth_mass(smooth, weights, entries, opts, x.shape), ax)
  if opts.z_loss:
    loss = loss + opts.z_loss * jnp.square(c[..., 0] + log_s)
  return jnp.where(ok, loss, fill), (logits, labels, entries, rows, weights, c,
                                    s)


def int_ce_bwd(opts, res, ct):
  logits, labels, entries, rows, weights, c, s = res
  if opts.cap is None:
    x = _logits(logits, entries, None)
  else:
    x, slope = capped_with_slope(logits, entries, opts.cap)
  ax = opts.axis_name
  idx, ok, fill, here = label_terms(labels, entries, rows, x.shape[-1], ax)
  label_w, smooth = int_targets(opts, weights, entries, idx,
                                x.shape[-1] * num_shards(ax), x.dtype, here)
  # Per-example weight: the cotangent, or NaN for an invalid label.
  w = ct * jnp.where(ok, 1.0, fill)
  # y − t with y = softmax·k: k is the target's total mass, plus 2λ·lse for
  # the z-loss (∂ lse²/∂x = 2·lse·softmax).
  k = label_w
  if smooth is not None:
    k = k + _smooth_mass(smooth, weights, entries, opts, x.shape)
  if opts.z_loss:
    k = k + (2 * opts.z_loss) * (c[..., 0] + jnp.log(mass(s)))
  coef = w if isinstance(k, float) and k == 1.0 else w * k
  # The softmax scaled by w·k, minus w times the target: the label's weight
  # at the label (iota == label: no one-hot array) and the smoothing target
  # everywhere. One elementwise pass that reads only the logits, so XLA
  # writes the gradient into their buffer when they die here (an LM head's
  # h @ W): no second [N, C] buffer. x + (−c) is x − c exactly, spelled so
  # that XLA does not share exp(x − c) with the forward's sum, which would
  # materialise it and keep the logits alive.
  p = jnp.exp(x + (-c)) * (coef / mass(s))[..., None]
  if smooth is not None:
    p = p - w[..., None] * smooth
  at_label = w if isinstance(label_w, float) and label_w == 1.0 else (
      w * label_w)
  is_label = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == (
      idx[..., None])
  if here is not None:
    is_label = is_label & here[..., None]
  g = jnp.where(is_label, p - at_label[..., None], p)
  if opts.cap is not None:
    g = g * slope
  if entries is not None or rows is not None:
    # Examples without a loss get an exact 0 by select, whatever their
    # logits hold (0·NaN would be NaN).
    has = ok | jnp.isnan(fill)
    g = jnp.where(has[..., None], g, 0)
  return g.astype(logits.dtype), None, None, None, None


def _int_ce_fun(opts, logits, labels, entries, rows, weights):
  return int_ce_fwd(opts, logits, labels, entries, rows, weights)[0]


_int_ce = _rules.vjp_rule(_int_ce_fun, int_ce_fwd, int_ce_bwd)


# -------------------------------------------------- probability-label kernel


def _prob_targets(opts, labels, entries, dtype):
  """The target in compute dtype: smoothed to ``(1 − ε)·t + ε/C'`` (torch's
  smoothing of probability targets; ``C'`` counts the unmasked classes) and
  zero on masked entries."""
  t = labels.astype(dtype)
  if opts.smoothing:
    t = (1.0 - opts.smoothing) * t + opts.smoothing / _class_count(
        entries, t.shape[-1] * num_shards(opts.axis_name), dtype)
  if entries is not None:
    t = jnp.where(entries, t, 0)
  return t


def _prob_target_mass(opts, labels, entries, dtype):
  """``Σ_c`` of :func:`_prob_targets`, from the raw labels: the smoothed
  target never feeds two reductions (XLA would store it)."""
  t = labels.astype(dtype)
  if entries is not None:
    t = jnp.where(entries, t, 0)
  total = maybe_psum(jnp.sum(t, axis=-1, keepdims=True), opts.axis_name)
  if not opts.smoothing:
    return total
  spread = opts.smoothing if entries is None else opts.smoothing * jnp.any(
      entries, axis=-1, keepdims=True).astype(dtype)
  return (1.0 - opts.smoothing) * total + spread


def _ce_fwd(opts, logits, labels, entries, rows):
  ax = opts.axis_name
  x, c, _ = _shifted(logits, entries, opts.cap, axis_name=ax)
  t = _prob_targets(opts, labels, entries, x.dtype)
  s = maybe_psum(jnp.sum(jnp.exp(x - c), axis=-1, keepdims=True), ax)
  log_s = jnp.log(mass(s))
  # The target sum reads the logits in a pass of its own, spelled apart from
  # the one above (see int_ce_fwd).
  if opts.cap is None:
    z2 = x + (-c)
  else:
    x2, c2, _ = _shifted(logits, entries, opts.cap, apart=True, axis_name=ax)
    z2 = x2 - c2
  loss = _target_sum(t, z2, log_s,
                     _prob_target_mass(opts, labels, entries, x.dtype)[..., 0],
                     ax)
  if opts.z_loss:
    loss = loss + opts.z_loss * jnp.square(c[..., 0] + log_s[..., 0])
  if rows is not None:
    loss = jnp.where(rows, loss, 0)
  return loss, (logits, labels, entries, rows, c, s)


def _ce_bwd(opts, res, ct):
  logits, labels, entries, rows, c, s = res
  if opts.cap is None:
    x = _logits(logits, entries, None)
  else:
    x, slope = capped_with_slope(logits, entries, opts.cap)
  t = _prob_targets(opts, labels, entries, x.dtype)
  z = x + (-c)  # x − c, not shared with the forward (see int_ce_bwd)
  log_s = jnp.log(mass(s))
  ct = ct[..., None]
  # y − t, for targets of any total mass: softmax·Σt − t (and + 2λ·lse·
  # softmax for the z-loss).
  k = _prob_target_mass(opts, labels, entries, x.dtype)
  if opts.z_loss:
    k = k + (2 * opts.z_loss) * (c + log_s)
  p = jnp.exp(z) / mass(s)
  g_logits = (p * k - t) * ct
  if opts.cap is not None:
    g_logits = g_logits * slope
  # ∂L/∂t = −(1 − ε)·log softmax = (1 − ε)·(log s − z) (+inf where the
  # softmax is 0).
  g_labels = (log_s - z) * ct
  if opts.smoothing:
    g_labels = (1.0 - opts.smoothing) * g_labels
  if entries is not None:
    g_labels = jnp.where(entries, g_labels, 0)
  if rows is not None:
    g_logits = jnp.where(rows[..., None], g_logits, 0)
    g_labels = jnp.where(rows[..., None], g_labels, 0)
  return (_rules.summed_like(g_logits, logits).astype(logits.dtype),
          _rules.summed_like(g_labels, labels).astype(labels.dtype), None,
          None)


def _ce_fun(opts, logits, labels, entries, rows):
  return _ce_fwd(opts, logits, labels, entries, rows)[0]


_ce = _rules.vjp_rule(_ce_fun, _ce_fwd, _ce_bwd)


# -------------------------------------------------------------- public API


def _check_mask(x, entries, rows):
  """The entries the value checks look at (masked-out ones are exempt)."""
  if rows is None:
    return entries
  return jnp.broadcast_to(rows[..., None], x.shape)


def _static_axis(axis: Any) -> Any:
  return tuple(axis) if isinstance(axis, list) else axis


def options(fn: str, label_smoothing: Any, z_loss: Any,
            logit_soft_cap: Any, axis_name: Any = None) -> Options:
  """Validates the softmax losses' options into a hashable :class:`Options`."""
  cap = None
  if logit_soft_cap is not None:
    cap = _checks.static_float(logit_soft_cap, fn, "logit_soft_cap", low=0.0,
                               open_low=True)
  return Options(
      smoothing=_checks.static_float(label_smoothing, fn, "label_smoothing",
                                     low=0.0, high=1.0),
      z_loss=_checks.static_float(z_loss, fn, "z_loss", low=0.0),
      cap=cap, axis_name=_checks.axis_name(axis_name, fn))


def reduce(loss: jax.Array, reduction: str,
           weight: jax.Array | None) -> jax.Array:
  """Applies ``reduction``; "mean" divides the sum by ``Σ weight``.

  ``weight`` is each example's share of the denominator (0 for ignored or
  masked examples, ``w_y`` with class weights; None: all count 1). When
  nothing counts, the sum is 0 too and "mean" returns 0 with zero gradient
  rather than ``0/0``.
  """
  if reduction == "none":
    return loss
  total = jnp.sum(loss)
  if reduction == "sum":
    return total
  if weight is None:
    return total / max(loss.size, 1)
  count = jnp.sum(weight.astype(total.dtype))
  return total / jnp.where(count == 0, 1, count)


@functools.partial(jax.jit, static_argnames=("axis", "opts", "ignore_index",
                                             "reduction"))
def _int_ce_jit(logits, labels, axis, where, class_weights, opts, ignore_index,
                reduction):
  fn = "softmax_cross_entropy_with_integer_labels"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _checks.floating(logits, fn, "logits")
  _checks.integer(labels, fn, "labels")
  axes, batch_axes, batch = _class_layout(fn, logits, axis, allow_none=False)
  _checks.shape(labels, batch, fn, "labels",
                f"the logits' shape {logits.shape} without the class axes "
                f"{axes}")
  entries, rows = _checks.example_mask(where, logits.shape, batch, fn)
  _sharded_layout(fn, opts, axes, entries)
  x = _classes_last(logits, axes, batch_axes)
  num_classes = x.shape[-1]
  weights = _checks.per_class(class_weights, num_classes,
                              _checks.compute_dtype(x.dtype), fn,
                              "class_weights")
  if entries is not None:
    entries = _classes_last(entries, axes, batch_axes)
  labels, rows = ignore(labels, rows, ignore_index)
  _checks.finite(x, fn, "logits", _check_mask(x, entries, rows))
  live = _live(entries, rows)
  _checks.in_range(labels, num_classes * num_shards(opts.axis_name), fn,
                   None if live is None else ~live)
  loss = _int_ce(opts, x, labels, entries, rows, weights)
  return reduce(loss, reduction,
                mean_share(reduction, labels, entries, rows, weights,
                           num_classes, opts.axis_name))


def _sharded_layout(fn, opts, axes, entries):
  """With ``axis_name``: one class axis, and masks per example only."""
  if opts.axis_name is None:
    return
  if len(axes) != 1:
    raise ValueError(f"jsoft.{fn}: with axis_name the classes must lie on "
                     f"one axis (the sharded one), got axis={axes}.")
  if entries is not None:
    raise ValueError(f"jsoft.{fn}: with axis_name, where= must be a "
                     "per-example mask (the labels' shape), not per class.")


def ignore(labels, rows, ignore_index):
  """Folds ``ignore_index`` into the example mask ``rows``.

  An ignored target is a masked-out example: loss 0, gradient 0 and no
  share in "mean"; its label becomes 0 so that it is not out of range.
  """
  if ignore_index is None:
    return labels, rows
  kept = labels != ignore_index
  rows = kept if rows is None else rows & kept
  return jnp.where(kept, labels, 0).astype(labels.dtype), rows


def mean_share(reduction, labels, entries, rows, weights, num_classes,
               axis_name=None):
  """Each example's share of the "mean" denominator: 1, or its class weight
  ``w_y``, for the examples that have a loss; None when all count 1."""
  if reduction != "mean" or (weights is None and entries is None
                             and rows is None):
    return None
  idx, ok, _, here = label_terms(labels, entries, rows, num_classes,
                                 axis_name)
  if weights is None:
    return ok
  w_y, _ = int_targets(Options(axis_name=axis_name), weights, None, idx,
                       num_classes, weights.dtype, here)
  return jnp.where(ok, w_y, 0)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None, *,
    ignore_index: int | None = None, label_smoothing: float = 0.0,
    z_loss: float = 0.0, logit_soft_cap: float | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none", axis_name: Any = None) -> jax.Array:
  r"""Softmax cross-entropy against integer class labels: a drop-in for
  :func:`optax.softmax_cross_entropy_with_integer_labels`, with the options
  of :func:`torch.nn.functional.cross_entropy`.

  .. math::
    L = \log \sum_c e^{x_c - m} - (x_y - m), \quad m = \max_c x_c .

  Computed from the shifted logits ``x - m``, so ``[-1000, -1000, -1000]``
  gives ``log 3`` to full precision. Labels outside ``[0, C)`` (other than
  ``ignore_index``) give NaN, never a wrapped class.

  With options, for class weights ``w`` (1 without), smoothing ``ε`` over
  the ``C`` (unmasked) classes, z-loss ``λ`` and soft cap ``a``:

  .. math::
    \tilde x = a\tanh(x/a), \quad
    t = (1-\varepsilon)\,w_y\,\mathrm{onehot}(y) + \varepsilon\,w/C, \quad
    L = -\sum_c t_c \log\operatorname{softmax}(\tilde x)_c
        + \lambda \operatorname{lse}(\tilde x)^2 .

  Gradient (the VJP rule, one pass, no one-hot array): predicted minus
  target, :math:`\partial L/\partial\tilde x = \operatorname{softmax}(\tilde
  x)\,(\textstyle\sum_c t_c + 2\lambda\operatorname{lse}) - t` — plainly
  ``softmax − onehot(y)`` without options — times :math:`1 -
  \tanh^2(x/a)` under the soft cap and the incoming cotangent. Every
  autodiff mode works (``jvp``, ``jacfwd``, ``hessian``, HVPs).

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
    ignore_index: a label value whose examples get loss 0, zero gradient and
      no share in "mean" (torch's ``ignore_index``; torch ignores ``-100`` by
      default, jsoft nothing).
    label_smoothing: ``ε`` in ``[0, 1]``, as in torch.
    z_loss: ``λ ≥ 0``: adds ``λ·logsumexp(logits)²`` per example (PaLM).
    logit_soft_cap: ``a > 0``: the logits become ``a·tanh(logits/a)`` before
      everything else (Gemma 2).
    class_weights: ``[C]`` per-class weights, as torch's ``weight``
      (constants: no gradient flows to them).
    reduction: "none" (per example), "sum", or "mean": the sum divided by
      the total weight ``Σ w_y`` of the examples that count (not masked,
      not ignored), as in torch; 0 when none count.
    axis_name: inside ``shard_map``, the mesh axis the class axis is
      sharded over: each device passes its slice of the classes (and of
      ``class_weights``) and gets the global per-example loss. Only a max,
      a sum, the label's logit and the target sums per example cross
      devices (``pmax``/``psum``); each device's gradient is its slice's.
      Labels are global class indices. "sum"/"mean" reduce over the
      examples this call sees (reduce over data-parallel axes yourself).

  Returns:
    The per-example loss, of the labels' shape, or a scalar: float32 for
    16-bit logits, else the logits' dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logits = jnp.array([[-1000.0, -1000.0, -1000.0], [2.0, 3.0, 5.0]])
    >>> labels = jnp.array([1, 2])
    >>> loss = jsoft.softmax_cross_entropy_with_integer_labels(logits, labels)
    >>> print(loss.round(4))  # log 3, and -log softmax([2, 3, 5])[2]
    [1.0986 0.1698]
    >>> labels = jnp.array([1, -100])  # torch-style padding
    >>> print(jsoft.softmax_cross_entropy_with_integer_labels(
    ...     logits, labels, ignore_index=-100, reduction="mean").round(4))
    1.0986
  """
  fn = "softmax_cross_entropy_with_integer_labels"
  return _int_ce_jit(
      _checks.asarray(logits), _checks.asarray(labels), _static_axis(axis),
      _checks.asarray(where), _checks.asarray(class_weights),
      options(fn, label_smoothing, z_loss, logit_soft_cap, axis_name),
      _checks.static_int(ignore_index, fn, "ignore_index"),
      _checks.reduction(reduction, fn))


@functools.partial(jax.jit, static_argnames=("axis", "opts", "reduction"))
def _ce_jit(logits, labels, axis, where, opts, reduction):
  fn = "softmax_cross_entropy"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _checks.floating(logits, fn, "logits")
  labels = _checks.real(labels, fn, "labels")
  _checks.shape(labels, logits.shape, fn, "labels", "the logits' shape")
  axes, batch_axes, batch = _class_layout(fn, logits, axis, allow_none=True)
  entries, rows = _checks.example_mask(where, logits.shape, batch, fn)
  _sharded_layout(fn, opts, axes, entries)
  x = _classes_last(logits, axes, batch_axes)
  t = _classes_last(labels, axes, batch_axes)
  if entries is not None:
    entries = _classes_last(entries, axes, batch_axes)
  checked_entries = _check_mask(x, entries, rows)
  _checks.finite(x, fn, "logits", checked_entries)
  _checks.finite(t, fn, "labels", checked_entries)
  loss = _ce(opts, x, t, entries, rows)
  return reduce(loss, reduction, _live(entries, rows))


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None, *,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
    logit_soft_cap: float | None = None,
    reduction: str = "none", axis_name: Any = None) -> jax.Array:
  r"""Softmax cross-entropy against target distributions: a drop-in for
  :func:`optax.softmax_cross_entropy`, with the options of
  :func:`torch.nn.functional.cross_entropy` for probability targets.

  .. math::
    L = -\sum_c t_c \log\operatorname{softmax}(x)_c
      = \sum_c t_c \Bigl(\log \sum_k e^{x_k - m} - (x_c - m)\Bigr).

  Uses the max shift, and a target entry of 0 contributes nothing even where
  the logit is ``-inf`` (optax returns NaN there). With options the logits
  are first soft-capped, ``x̃ = a·tanh(x/a)``, the target smoothed,
  ``t̃ = (1 − ε)·t + ε/C``, and ``λ·lse(x̃)²`` added.

  Gradient (the VJP rule): predicted minus target,
  :math:`\partial L/\partial\tilde x = \operatorname{softmax}(\tilde x)
  \,(\textstyle\sum_c \tilde t_c + 2\lambda\operatorname{lse}) - \tilde t`
  (``y - t`` for normalised targets without options), times :math:`1 -
  \tanh^2(x/a)` under the soft cap; and :math:`\partial L/\partial t =
  -(1 - \varepsilon)\log\operatorname{softmax}(\tilde x)`; both scaled by
  the incoming cotangent. Every autodiff mode works.

  Args:
    logits: floating array; 16-bit floats are computed in float32.
    labels: target probabilities, of the logits' shape.
    axis: the class axis, a tuple of axes, or None (all axes).
    where: optional boolean mask, of the logits' shape or the per-example
      shape; ``False`` entries are left out of the softmax and the target.
    label_smoothing: ``ε`` in ``[0, 1]``, as in torch.
    z_loss: ``λ ≥ 0``: adds ``λ·logsumexp(logits)²`` per example.
    logit_soft_cap: ``a > 0``: soft-caps the logits first.
    reduction: "none", "sum", or "mean" (over the examples not masked out;
      0 when there are none).
    axis_name: inside ``shard_map``, the mesh axis the class axis is
      sharded over (logits and labels sliced alike): the global loss, from
      a max and sums per example; each device's gradients are its slice's.

  Returns:
    The per-example loss (the logits' shape without ``axis``) or a scalar:
    float32 for 16-bit logits, else the logits' dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logits = jnp.array([0.0, 1.0, -jnp.inf])
    >>> labels = jnp.array([0.5, 0.5, 0.0])
    >>> print(f"{jsoft.softmax_cross_entropy(logits, labels):.4f}")
    0.8133
  """
  fn = "softmax_cross_entropy"
  return _ce_jit(_checks.asarray(logits), _checks.asarray(labels),
                 _static_axis(axis), _checks.asarray(where),
                 options(fn, label_smoothing, z_loss, logit_soft_cap,
                         axis_name),
                 _checks.reduction(reduction, fn))
