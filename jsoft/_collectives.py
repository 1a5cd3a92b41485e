"""What crosses devices when the classes are split over a mesh axis.

Inside ``shard_map`` with ``axis_name``, each device holds a block of the
classes. Only numbers per example cross devices: the row max (``pmax``, no
gradient) and the loss rule's block sums (``psum``). Those collectives are
plain JAX outside the hand-written rules, so JAX's own autodiff of ``psum``
carries the cotangents across devices, in both ``shard_map`` modes.

With ``check_vma=True`` JAX types each value as varying over some mesh axes
or not, and its autodiff sums a cotangent over the devices where the primal
is the same (replicated) but the cotangent is not. A hand-written rule keeps
to that in two steps: its outputs vary over every axis any of its inputs
does (:func:`varying_tree`), so every cotangent reaching it is one device's
part, never an already-summed total that a second sum would count twice;
and it returns each cotangent with its primal's type, summed over the axes
where the primal is replicated (:func:`summed_like`). With
``check_vma=False`` neither does anything and ``shard_map``'s own transpose
sums the cotangents of replicated inputs.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from jsoft import _compat


def num_shards(axis_name: Any) -> int:
  """How many blocks the classes are split into (1 without sharding)."""
  return 1 if axis_name is None else _compat.axis_size(axis_name)


def first_class(axis_name: Any, width: int) -> Any:
  """The global index of this device's first class (0 without sharding)."""
  return 0 if axis_name is None else lax.axis_index(axis_name) * width


def pmax(x: jax.Array, axis_name: Any) -> jax.Array:
  """The max over devices, without a gradient (``lax.pmax`` has no
  differentiation rule, which jax 0.6 and older ask for even where the
  tangent goes unused)."""
  if axis_name is None:
    return x
  return lax.pmax(lax.stop_gradient(x), axis_name)


def pmin(x: jax.Array, axis_name: Any) -> jax.Array:
  return x if axis_name is None else lax.pmin(x, axis_name)


def psum(tree: Any, axis_name: Any) -> Any:
  """``psum`` of every array in ``tree`` (None leaves stay None)."""
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: lax.psum(x, axis_name), tree)


def varying_axes(x: Any) -> set:
  """The ``shard_map`` mesh axes ``x`` varies over (empty outside, or where
  JAX does not track them)."""
  aval = _compat.typeof(x)
  mat = getattr(aval, "mat", None)  # manual-axis type, where JAX has it
  if mat is not None:
    return set(mat.varying)
  return set(getattr(aval, "vma", ()) or ())


def summed_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """``ct`` summed over the mesh axes it varies over but ``primal`` does not.

  ``primal`` was the same on those devices (replicated), so its cotangent is
  the sum of theirs; a VJP rule returns it with the primal's type.
  """
  extra = varying_axes(ct) - varying_axes(primal)
  if not extra:
    return ct
  return lax.psum(ct, tuple(sorted(extra, key=str)))


def varying_tree(tree: Any, *like: Any) -> Any:
  """Every array in ``tree`` through :func:`varying_like`."""
  return jax.tree.map(lambda x: varying_like(x, *like), tree)


def varying_like(x: jax.Array, *like: Any) -> jax.Array:
  """A fresh ``x`` typed to vary over every mesh axis the arrays ``like``
  vary over (a ``lax.scan`` carry must keep one type); ``x`` itself outside
  ``shard_map``."""
  axes = set()
  for ref in like:
    if ref is not None:
      axes |= varying_axes(ref)
  axes -= varying_axes(x)
  if not axes:
    return x
  return _compat.pcast_varying(x, tuple(sorted(axes, key=str)))
