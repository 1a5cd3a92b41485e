r"""The fused drivers: the loss rule on tiles of an LM head's logits.

:func:`head_sums` computes every token's :class:`~jsoft._loss_rule.Sums`
over the classes of ``h @ W + b`` this device holds, without holding the
``[N, V]`` logits: a ``lax.scan`` makes one tile of logits at a time,
applies :func:`~jsoft._loss_rule.block_sums` to it and keeps only numbers
per token. Its VJP rule scans the tiles again, recomputes each tile's
logits (one more matmul per tile), forms the gradient tile with
:func:`~jsoft._loss_rule.block_grad` and folds it straight into

.. math::
  \frac{\partial L}{\partial h} = g\,W^\top, \qquad
  \frac{\partial L}{\partial W} = \sum_{\text{tiles}} h^\top g, \qquad
  \frac{\partial L}{\partial b} = \sum_{\text{tiles}} \textstyle\sum_n g,

accumulated in float32 whatever the input dtype. The loop runs over tiles
of tokens (``[c, V]``; the accumulator is ``dW``, ``[D, V]``) when there
are at least as many tokens as classes, else over tiles of classes
(``[N, c]``; the sums of each tile are moved to the running max,
:func:`~jsoft._loss_rule.rebase`, an online logsumexp; the accumulator is
``dh``, ``[N, D]``): the loop with the smaller accumulator.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks, _collectives, _loss_rule, _rules
from jsoft._loss_rule import Block, Sums


class Loop(NamedTuple):
  """The tiling, fixed at compile time."""
  cap: float | None  # the soft cap
  chunk: int  # tokens (tokens loop) or classes (classes loop) per tile
  vocab: int  # this device's real classes (the rest of W is padding)
  by_tokens: bool  # tiles of tokens, else tiles of classes
  axis_name: Any  # the mesh axis W's classes are split over


class HeadResiduals(NamedTuple):
  hidden: jax.Array  # [N, D]
  weight: jax.Array  # [D, V]
  bias: jax.Array | None  # [V]
  label: jax.Array  # [N] int32 global class indices
  keep: jax.Array | None  # [N] tokens with a gradient (None: all)
  dense: Any  # the dense target u: a number, a [V] vector, or None
  shift: jax.Array  # [N] each token's shift


def _tile_logits(h, w, b):
  """One tile of logits, accumulated and returned in the compute dtype."""
  acc = _checks.compute_dtype(h.dtype)
  logits = jnp.matmul(h, w, preferred_element_type=acc)
  if b is not None:
    logits = logits + b.astype(acc)
  return logits


def _tiles(x, chunk):
  """``[N, ...]`` as ``[N / chunk, chunk, ...]``; None stays None."""
  if x is None:
    return None
  return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _class_tile(loop: Loop, h, w, b, dense, j):
  """Tile ``j`` of the classes: its block (padding masked out) and its
  slice of ``w``."""
  v = loop.chunk
  w_t = lax.dynamic_slice_in_dim(w, j * v, v, axis=1)
  b_t = None if b is None else lax.dynamic_slice_in_dim(b, j * v, v)
  cols = j * v + lax.broadcasted_iota(jnp.int32, (1, v), 1)
  valid = cols < loop.vocab
  if dense is not None:
    dense = (jnp.where(valid, dense, 0) if jnp.ndim(dense) == 0 else
             lax.dynamic_slice_in_dim(dense, j * v, v))
  first = _collectives.first_class(loop.axis_name, loop.vocab) + j * v
  return Block(_tile_logits(h, w_t, b_t), valid, first, dense), w_t


def _head_fwd(loop: Loop, h, w, b, label, keep, dense):
  if loop.by_tokens:
    first = _collectives.first_class(loop.axis_name, loop.vocab)

    def tile(_, xs):
      h_t, y_t = xs
      block = Block(_tile_logits(h_t, w, b), None, first, dense)
      m = _loss_rule.block_max(block, loop.cap)
      return None, (m, _loss_rule.block_sums(loop.cap, block, m, y_t))

    _, (shift, sums) = lax.scan(tile, None, (_tiles(h, loop.chunk),
                                             _tiles(label, loop.chunk)))
    shift, sums = jax.tree.map(lambda x: x.reshape(-1), (shift, sums))
  else:

    def tile(carry, j):
      m, sums, seen = carry
      block, _ = _class_tile(loop, h, w, b, dense, j)
      new = jnp.maximum(m, _loss_rule.block_max(block, loop.cap))
      sums = _loss_rule.add(_loss_rule.rebase(sums, m, new, seen),
                            _loss_rule.block_sums(loop.cap, block, new, label))
      if block.dense is not None:
        seen = seen + jnp.sum(block.dense, axis=-1)
      return (new, sums, seen), None

    acc = _checks.compute_dtype(h.dtype)
    refs = (h, w, b, label)
    zeros = _collectives.varying_like(jnp.zeros(label.shape, acc), *refs)
    floor = jnp.full(label.shape, -float(jnp.finfo(acc).max), acc)
    init = (_collectives.varying_like(floor, *refs),
            Sums(zeros, zeros, None if dense is None else zeros),
            _collectives.varying_like(jnp.zeros((1,), acc), *refs))
    (shift, sums, _), _ = lax.scan(tile, init, jnp.arange(
        w.shape[1] // loop.chunk, dtype=jnp.int32))
  return (shift, sums), HeadResiduals(h, w, b, label, keep, dense, shift)


def _head_bwd(loop: Loop, res: HeadResiduals, ct):
  _, ct_sums = ct  # the shift has no gradient
  h, w, b = res.hidden, res.weight, res.bias
  acc = _checks.compute_dtype(h.dtype)
  refs = (h, w, b, ct_sums.exp)

  def fold(g, h_t, w_t):
    g_in = g.astype(h.dtype)
    dh_t = jnp.matmul(g_in, w_t.T, preferred_element_type=acc)
    return dh_t, jnp.matmul(h_t.T, g_in, preferred_element_type=acc)

  if loop.by_tokens:
    first = _collectives.first_class(loop.axis_name, loop.vocab)

    def tile(carry, xs):
      dw, db = carry
      h_t, y_t, k_t, m_t, ct_t = xs
      block = Block(_tile_logits(h_t, w, b), None, first, res.dense)
      g, _ = _loss_rule.block_grad(loop.cap, block, m_t, y_t, k_t, ct_t)
      dh_t, dw_t = fold(g, h_t, w)
      db = None if db is None else db + jnp.sum(g, axis=0)
      return (dw + dw_t, db), dh_t

    init = (_collectives.varying_like(jnp.zeros(w.shape, acc), *refs),
            None if b is None else _collectives.varying_like(
                jnp.zeros(b.shape, acc), *refs))
    xs = jax.tree.map(lambda x: _tiles(x, loop.chunk),
                      (h, res.label, res.keep, res.shift, ct_sums))
    (dw, db), dh = lax.scan(jax.checkpoint(tile), init, xs)
    dh = dh.reshape(h.shape)
  else:

    def tile(carry, j):
      dh, dw, db = carry
      block, w_t = _class_tile(loop, h, w, b, res.dense, j)
      g, _ = _loss_rule.block_grad(loop.cap, block, res.shift, res.label,
                                   res.keep, ct_sums)
      dh_t, dw_t = fold(g, h, w_t)
      dw = lax.dynamic_update_slice_in_dim(dw, dw_t, j * loop.chunk, axis=1)
      if db is not None:
        db = lax.dynamic_update_slice_in_dim(db, jnp.sum(g, axis=0),
                                             j * loop.chunk, 0)
      return (dh + dh_t, dw, db), None

    init = (_collectives.varying_like(jnp.zeros(h.shape, acc), *refs),
            _collectives.varying_like(jnp.zeros(w.shape, acc), *refs),
            None if b is None else _collectives.varying_like(
                jnp.zeros(b.shape, acc), *refs))
    (dh, dw, db), _ = lax.scan(jax.checkpoint(tile), init, jnp.arange(
        w.shape[1] // loop.chunk, dtype=jnp.int32))
  # Each cotangent summed over the mesh axes its primal is replicated on
  # (h, with the classes split: each device holds part of dh).
  db = None if b is None else _collectives.summed_like(db, b).astype(b.dtype)
  return (_collectives.summed_like(dh, h).astype(h.dtype),
          _collectives.summed_like(dw, w).astype(w.dtype), db, None, None,
          None)


def _head_fun(loop, h, w, b, label, keep, dense):
  return _head_fwd(loop, h, w, b, label, keep, dense)[0]


_head = _rules.vjp_rule(_head_fun, _head_fwd, _head_bwd)


def head_sums(loop: Loop, h: jax.Array, w: jax.Array, b: jax.Array | None,
              label: jax.Array, keep: jax.Array | None,
              dense: Any) -> tuple[jax.Array, Sums]:
  """Each token's shift and sums over this device's classes of
  ``h @ w + b`` (``h``: ``[N, D]``, N a multiple of the tile by tokens;
  ``w``: ``[D, V]``, V a multiple of the tile by classes, padding columns
  past ``loop.vocab``), differentiable in every mode with respect to ``h``,
  ``w`` and ``b``. ``dense`` (the smoothing target, a constant) is a number
  or a ``[V]`` vector, zero on padding."""
  return _head(loop, h, w, b, label, keep, dense)
