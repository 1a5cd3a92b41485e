"""From labels and options to the loss rule's :class:`Target` and ``u``.

Integer labels: ``t = (1 − ε)·w_y·onehot(y) + ε·w/C'`` (torch's weighted
label smoothing; ``C'`` counts the classes not masked out, ``w`` the class
weights, 1 without). Probability labels: ``t = (1 − ε)·t + ε/C'``, zero on
masked entries. Both are per-example bookkeeping: nothing here reads the
logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jsoft import _collectives
from jsoft._loss_rule import Target
from jsoft._options import Options, reduce


def live(entries: jax.Array | None,
         rows: jax.Array | None) -> jax.Array | None:
  """Per example: does it take part at all? (None: all do.)"""
  out = None if entries is None else jnp.any(entries, axis=-1)
  if rows is not None:
    out = rows if out is None else out & rows
  return out


def _class_count(entries: jax.Array | None, num_classes: int, dtype) -> Any:
  """``C'``: the classes smoothing spreads over (per example if masked)."""
  if entries is None:
    return max(num_classes, 1)
  count = jnp.sum(entries, axis=-1).astype(dtype)
  return jnp.maximum(count, 1)


def label_weight(weights: jax.Array | None, label: jax.Array, first: Any,
                 axis_name: Any) -> Any:
  """``w_y`` for global labels, this device holding the class weights of
  classes ``[first, first + len(weights))``; 1.0 without weights."""
  if weights is None:
    return 1.0
  width = weights.shape[0]
  if width == 0:
    return jnp.zeros(label.shape, weights.dtype)
  local = label - first
  inside = (local >= 0) & (local < width)
  w_y = jnp.take(weights, jnp.clip(local, 0, width - 1))
  if axis_name is None:
    return w_y
  return _collectives.psum(jnp.where(inside, w_y, 0), axis_name)


def integer(opts: Options, labels: jax.Array, entries: jax.Array | None,
            rows: jax.Array | None, weights: jax.Array | None,
            width: int, dtype) -> tuple[Target, Any]:
  """The integer-label :class:`Target`, and the smoothing target's scale
  ``ε/C'`` (None without smoothing; ``u = ε/C'·w``, see :func:`smoothing`).

  ``width`` is the number of classes this call holds (all of them, or one
  device's block). A label outside ``[0, C)`` gives NaN, never a wrapped
  class; an example masked out (``where``, ``ignore_index``), with nothing
  unmasked, or whose label entry is masked has no loss.
  """
  ax = opts.axis_name
  total = width * _collectives.num_shards(ax)
  first = _collectives.first_class(ax, width)
  valid = (labels >= 0) & (labels < total)
  label = jnp.where(valid, labels, 0).astype(jnp.int32)
  # Unmasked, every example has a loss (NaN for an invalid label): no
  # per-example select to the rule.
  has_loss, invalid, keep = None, ~valid, None
  taking_part = live(entries, rows)
  if taking_part is not None:
    has_loss, invalid = valid & taking_part, invalid & taking_part
  if entries is not None and width:
    has_loss = has_loss & jnp.take_along_axis(entries, label[..., None],
                                              axis=-1)[..., 0]
  if taking_part is not None:
    keep = has_loss | invalid
  w_y = label_weight(weights, label, first, ax)
  unsmoothed = 1.0 - opts.smoothing
  label_mass = unsmoothed if isinstance(w_y, float) else unsmoothed * w_y
  scale, dense_mass = None, 0.0
  if opts.smoothing:
    scale = opts.smoothing / _class_count(entries, total, dtype)
    if entries is not None:
      w = 1.0 if weights is None else weights
      dense_mass = jnp.sum(jnp.where(entries, w, 0), axis=-1) * scale
    elif weights is None:
      dense_mass = opts.smoothing
    else:
      dense_mass = scale * _collectives.psum(jnp.sum(weights), ax)
  return Target(label, label_mass, dense_mass, w_y, has_loss, invalid,
                keep), scale


def smoothing(scale: Any, weights: jax.Array | None,
              valid: jax.Array | None) -> Any:
  """The smoothing target ``u = ε/C'·w`` on a block (``weights``: the
  block's class weights), 0 where ``valid`` is False; None without."""
  if scale is None:
    return None
  if weights is None and valid is None:
    if isinstance(scale, float):
      return scale
    return scale[..., None]
  w = jnp.ones((), jnp.result_type(scale)) if weights is None else weights
  if valid is not None:
    w = jnp.where(valid, w, 0)
  return w * (scale if isinstance(scale, float) else scale[..., None])


def narrow_float(dtype, compute) -> bool:
  """Whether a target of ``dtype`` can stay as it is on a computation in
  ``compute`` (float32): a 16-bit float, which every product with a
  float32 operand promotes exactly. Left unconverted, it is read at its own
  width, and a ``lax.cond`` that takes it as an operand stores no float32
  copy of it."""
  return (jnp.dtype(compute) == jnp.float32
          and jnp.issubdtype(dtype, jnp.floating)
          and jnp.dtype(dtype).itemsize == 2)


def probability(opts: Options, labels: jax.Array, entries: jax.Array | None,
                rows: jax.Array | None, dtype) -> tuple[Target, jax.Array]:
  """The probability-label :class:`Target` and ``u = (1 − ε)·t + ε/C'``
  (zero on masked entries).

  The target's mass ``Σ u`` is summed here from the raw labels (the
  smoothed target must not feed two reductions: XLA would store it), and
  across devices with ``axis_name``; without either, it is left to the
  plain driver (None), which sums ``u`` only where it needs it.
  """
  ax = opts.axis_name
  t = labels
  if not (opts.smoothing == 0 and narrow_float(labels.dtype, dtype)):
    t = labels.astype(dtype)
  if entries is not None:
    t = jnp.where(entries, t, 0)
  mass = None
  if ax is not None or opts.smoothing:
    mass = _collectives.psum(jnp.sum(t, axis=-1, dtype=dtype), ax)
  u = t
  if opts.smoothing:
    count = _class_count(entries, t.shape[-1] * _collectives.num_shards(ax),
                         dtype)
    if entries is not None:
      count = count[..., None]
    u = (1.0 - opts.smoothing) * t + opts.smoothing / count
    if entries is not None:
      u = jnp.where(entries, u, 0)
    spread = opts.smoothing if entries is None else opts.smoothing * jnp.any(
        entries, axis=-1).astype(dtype)
    mass = (1.0 - opts.smoothing) * mass + spread
  has_loss = live(entries, rows)
  return Target(None, 0.0, mass, 1.0, has_loss, None, has_loss), u


def mean_share(target: Target, masked: bool,
               sample_weights: jax.Array | None = None) -> jax.Array | None:
  """Each example's share of the "mean" denominator: its weight (class
  weight × sample weight) if it has a loss, else 0; None when every example
  counts 1 (``masked`` False, no sample weights)."""
  if sample_weights is not None:
    share = target.weight * sample_weights
    if target.has_loss is None:
      return share
    return jnp.where(target.has_loss, share, 0)
  if not masked and isinstance(target.weight, float):
    return None
  if target.has_loss is None:
    return None if isinstance(target.weight, float) else target.weight
  return jnp.where(target.has_loss, target.weight, 0)


def weighted(loss: jax.Array, target: Target,
             sample_weights: jax.Array | None) -> jax.Array:
  """Each example's loss times its sample weight (a constant, so the
  gradient is scaled alike); examples without a loss stay an exact 0
  whatever their weight holds, and a NaN loss (label out of range) stays
  NaN."""
  if sample_weights is None:
    return loss
  s = sample_weights.astype(loss.dtype)
  if target.has_loss is not None:
    s = jnp.where(target.has_loss, s, 0)
  return loss * s


def reduced(loss: jax.Array, target: Target, reduction: str, masked: bool,
            sample_weights: jax.Array | None) -> jax.Array:
  """The per-example loss weighted by the sample weights and reduced:
  "mean" divides by :func:`mean_share`'s total. Linear in ``loss``."""
  share = None
  if reduction == "mean":
    share = mean_share(target, masked, sample_weights)
  return reduce(weighted(loss, target, sample_weights), reduction, share)
