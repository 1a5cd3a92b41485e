"""The softmax losses' options: validated once, fixed at compile time.

The options are Python values in a hashable :class:`Options` (part of the
jit cache key), so an option left at its default adds no operation at all.
Also here: how ``ignore_index`` becomes an example mask, and the
reductions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jsoft import _checks
from jsoft._softcap import LogitMap, logit_map


class Options(NamedTuple):
  """Loss options fixed at compile time (hashable)."""
  smoothing: float = 0.0  # label smoothing ε
  z_loss: float = 0.0  # λ of λ·lse²
  lmap: LogitMap | None = None  # soft cap and temperature (None: neither)
  axis_name: Any = None  # the mesh axis the classes are split over


def options(fn: str, label_smoothing: Any, z_loss: Any,
            logit_soft_cap: Any, axis_name: Any = None,
            temperature: Any = 1.0) -> Options:
  """Validates the softmax losses' options into an :class:`Options`."""
  cap = None
  if logit_soft_cap is not None:
    cap = _checks.static_float(logit_soft_cap, fn, "logit_soft_cap", low=0.0,
                               open_low=True)
  temperature = _checks.static_float(temperature, fn, "temperature", low=0.0,
                                     open_low=True)
  return Options(
      smoothing=_checks.static_float(label_smoothing, fn, "label_smoothing",
                                     low=0.0, high=1.0),
      z_loss=_checks.static_float(z_loss, fn, "z_loss", low=0.0),
      lmap=logit_map(cap, temperature),
      axis_name=_checks.axis_name(axis_name, fn))


def ignore(labels: jax.Array, rows: jax.Array | None,
           ignore_index: int | None) -> tuple[jax.Array, jax.Array | None]:
  """Folds ``ignore_index`` into the example mask ``rows``.

  An ignored target is a masked-out example: loss 0, gradient 0 and no
  share in "mean"; its label becomes 0 so that it is not out of range.
  """
  if ignore_index is None:
    return labels, rows
  kept = labels != ignore_index
  rows = kept if rows is None else rows & kept
  return jnp.where(kept, labels, 0).astype(labels.dtype), rows


def reduce(loss: jax.Array, reduction: str,
           share: jax.Array | None) -> jax.Array:
  """Applies ``reduction``; "mean" divides the sum by ``Σ share``.

  ``share`` is each example's share of the denominator (0 for ignored or
  masked examples, ``w_y`` with class weights; None: all count 1). When
  nothing counts, the sum is 0 too and "mean" returns 0 with zero gradient
  rather than ``0/0``.
  """
  if reduction == "none":
    return loss
  total = jnp.sum(loss)
  if reduction == "sum":
    return total
  if share is None:
    return total / max(loss.size, 1)
  count = jnp.sum(share.astype(total.dtype))
  return total / jnp.where(count == 0, 1, count)
