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

from jsoft import _checks, _collectives, _compat, _fusion, _loss_rule, _rules
from jsoft._loss_rule import Block, Sums
from jsoft._softcap import LogitMap


class Loop(NamedTuple):
  """The tiling, fixed at compile time."""
  lmap: LogitMap | None  # what the softmax sees (soft cap, temperature)
  chunk: int  # tokens (tokens loop) or classes (classes loop) per tile
  vocab: int  # this device's classes
  by_tokens: bool  # tiles of tokens, else tiles of classes
  axis_name: Any  # the mesh axis W's classes are split over
  stats: bool = False  # also the entropy sum and the argmax (TokenStats)
  # Classes loop: the backward pass keeps hᵀ ([D, N], 4·N·D bytes) for the
  # dW products (see weight_grad).
  transposed: bool = False


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
  logits = _compat.matmul(h, w, acc)
  if b is not None:
    logits = logits + b.astype(acc)
  return logits


def transposed(h: jax.Array) -> jax.Array:
  """``hᵀ`` made as an array of its own, for a ``dW = hᵀ g`` product.

  XLA folds a bare transpose into the product, and XLA:CPU runs a product
  that contracts its left operand's first axis well under the speed of a
  plain ``[D, c]·[c, V]`` one (measured at c=512, D=256, V=32768: the token
  loop took 1.2× as long). The barrier keeps the transpose its own op.
  """
  return _compat.barrier(h.T)


def weight_grad(h_t: jax.Array, g: jax.Array, acc: Any) -> jax.Array:
  """One token tile's ``h_tᵀ g`` (``[D, V]``), accumulated in ``acc``
  (:func:`transposed`)."""
  return _compat.matmul(transposed(h_t), g, acc)


def _tile_starts(length: int, chunk: int):
  """How many tiles of ``chunk`` cover ``length``, and where tile ``j``
  starts: ``j·chunk``, except that the last one ends at ``length`` (and
  overlaps the one before when ``chunk`` does not divide ``length``; its
  first rows are then not its own). No padded copy of ``h`` or ``W``."""
  count = -(-length // chunk)
  return count, lambda j: jnp.minimum(j * chunk, length - chunk)


def _own(j, start, chunk: int, shape, axis: int):
  """Which rows (``axis`` 0) or columns (1) of tile ``j`` are its own, not
  the previous tile's; None when the tiles do not overlap."""
  index = start + lax.broadcasted_iota(jnp.int32, shape, axis)
  return index >= j * chunk


def _untile(stacked, length: int, chunk: int):
  """Per-tile outputs ``[T, chunk, ...]`` back to ``[length, ...]``."""
  flat = stacked.reshape((-1,) + stacked.shape[2:])
  count = stacked.shape[0]
  if count * chunk == length:
    return flat
  overlap = count * chunk - length  # the last tile's rows already covered
  return jnp.concatenate([flat[:(count - 1) * chunk],
                          flat[(count - 1) * chunk + overlap:]])


def _class_tile(loop: Loop, h, w, b, dense, j, start, masked: bool = True):
  """Tile ``j`` of the classes (columns ``start`` on): its block and its
  slice of ``w``. Unless ``masked`` is False, the columns of the tile
  before (where the last tile overlaps it) take no part in the block."""
  v = loop.chunk
  w_t = lax.dynamic_slice_in_dim(w, start, v, axis=1)
  b_t = None if b is None else lax.dynamic_slice_in_dim(b, start, v)
  valid = None
  if loop.vocab % v and masked:
    # The previous tile's columns, masked by a bias: an add fuses into
    # XLA:CPU's reductions, where a select makes a masked copy of the tile
    # (measured: 1.3× the time, twice the temp). Half the largest float,
    # not -inf: e^(x̃ - big) is 0 all the same, and the masked entries stay
    # finite, so their derivatives (higher orders) are 0, not 0·inf.
    own = _own(j, start, v, (1, v), 1)
    acc = _checks.compute_dtype(h.dtype)
    valid = jnp.where(own, 0.0, -0.5 * float(jnp.finfo(acc).max)).astype(acc)
  if dense is not None and jnp.ndim(dense):
    dense = lax.dynamic_slice_in_dim(dense, start, v)
  if dense is not None and valid is not None:
    dense = jnp.where(_fusion.kept(valid), dense, 0)
  first = _collectives.first_class(loop.axis_name, loop.vocab) + start
  return Block(_tile_logits(h, w_t, b_t), valid, first, dense), w_t


def _head_fwd(loop: Loop, h, w, b, label, keep, dense):
  if loop.by_tokens:
    first = _collectives.first_class(loop.axis_name, loop.vocab)
    count, start_of = _tile_starts(h.shape[0], loop.chunk)

    def tile(_, j):
      start = start_of(j)
      h_t = lax.dynamic_slice_in_dim(h, start, loop.chunk)
      y_t = lax.dynamic_slice_in_dim(label, start, loop.chunk)
      block = Block(_tile_logits(h_t, w, b), None, first, dense)
      m = _loss_rule.block_max(block, loop.lmap)
      arg = (_loss_rule.block_argmax(loop.lmap, block, m) if loop.stats
             else None)
      return None, (m, _loss_rule.block_sums(loop.lmap, block, m, y_t,
                                             loop.stats), arg)

    _, stacked = lax.scan(tile, None, jnp.arange(count, dtype=jnp.int32))
    shift, sums, argmax = jax.tree.map(
        lambda x: _untile(x, h.shape[0], loop.chunk), stacked)
  else:
    count, start_of = _tile_starts(loop.vocab, loop.chunk)

    def tile(carry, j):
      m, sums, seen, arg = carry
      block, _ = _class_tile(loop, h, w, b, dense, j, start_of(j))
      new = jnp.maximum(m, _loss_rule.block_max(block, loop.lmap))
      sums = _loss_rule.add(
          _loss_rule.rebase(sums, m, new, seen),
          _loss_rule.block_sums(loop.lmap, block, new, label, loop.stats))
      if block.dense is not None:  # Σ u over the classes seen so far
        seen = seen + jnp.sum(jnp.broadcast_to(block.dense, (1, loop.chunk)),
                              axis=-1)
      if arg is not None:  # the first class at the running max
        here = _loss_rule.block_argmax(loop.lmap, block, new)
        arg = jnp.where(m == new, jnp.minimum(arg, here), here)
      return (new, sums, seen, arg), None

    acc = _checks.compute_dtype(h.dtype)
    refs = (h, w, b, label)
    zeros = _collectives.varying_like(jnp.zeros(label.shape, acc), *refs)
    floor = jnp.full(label.shape, -float(jnp.finfo(acc).max), acc)
    none = None
    if loop.stats:
      none = _collectives.varying_like(
          jnp.full(label.shape, _loss_rule.NO_CLASS, jnp.int32), *refs)
    init = (_collectives.varying_like(floor, *refs),
            Sums(zeros, zeros, None if dense is None else zeros,
                 zeros if loop.stats else None),
            _collectives.varying_like(jnp.zeros((1,), acc), *refs), none)
    (shift, sums, _, argmax), _ = lax.scan(
        tile, init, jnp.arange(count, dtype=jnp.int32))
  if argmax is not None:
    # Out as a float (a rule's outputs are differentiable types): exact
    # below 2^24 classes; -1 for none.
    argmax = jnp.where(argmax == _loss_rule.NO_CLASS, -1, argmax).astype(
        shift.dtype)
  # Typed to vary like every input, so cotangents arrive per device
  # (see jsoft._collectives).
  shift, sums, argmax = _collectives.varying_tree(
      (shift, sums, argmax), h, w, b, label, keep, dense)
  return ((shift, sums, argmax),
          HeadResiduals(h, w, b, label, keep, dense, shift))


def _head_bwd(loop: Loop, res: HeadResiduals, ct):
  ct_sums = ct[1]  # the shift and the argmax have no gradient
  h, w, b = res.hidden, res.weight, res.bias
  acc = _checks.compute_dtype(h.dtype)
  refs = (h, w, b, *jax.tree.leaves(ct_sums), res.label, res.keep,
          res.shift)

  def fold(g, ht_t, w_t):
    # ht_t: the tile's hᵀ (see transposed) or, over classes without
    # Loop.transposed, a bare h.T left to XLA.
    g_in = g.astype(h.dtype)
    return (_compat.matmul(g_in, w_t.T, acc),
            _compat.matmul(ht_t, g_in, acc))

  if loop.by_tokens:
    c = loop.chunk
    first = _collectives.first_class(loop.axis_name, loop.vocab)
    count, start_of = _tile_starts(h.shape[0], c)

    def rows(x, start):
      return None if x is None else lax.dynamic_slice_in_dim(x, start, c)

    def tile(carry, j):
      dw, db = carry
      start = start_of(j)
      h_t, keep = rows(h, start), rows(res.keep, start)
      if h.shape[0] % c:  # the last tile's first rows are not its own
        own = _own(j, start, c, (c,), 0)
        keep = own if keep is None else keep & own
      block = Block(_tile_logits(h_t, w, b), None, first, res.dense)
      g, _ = _loss_rule.block_grad(
          loop.lmap, block, rows(res.shift, start), rows(res.label, start),
          keep, jax.tree.map(lambda x: rows(x, start), ct_sums))
      dh_t, dw_t = fold(g, transposed(h_t), w)
      db = None if db is None else db + jnp.sum(g, axis=0)
      return (dw + dw_t, db), dh_t

    init = (_collectives.varying_like(jnp.zeros(w.shape, acc), *refs),
            None if b is None else _collectives.varying_like(
                jnp.zeros(b.shape, acc), *refs))
    (dw, db), dh = lax.scan(jax.checkpoint(tile), init,
                            jnp.arange(count, dtype=jnp.int32))
    dh = _untile(dh, h.shape[0], c)
  else:
    count, start_of = _tile_starts(loop.vocab, loop.chunk)
    ht = transposed(h) if loop.transposed else h.T

    def tile(carry, j):
      dh, dw, db = carry
      start = start_of(j)
      # Every column of the tile, the previous tile's too where the last
      # one overlaps it: their dW and db columns come out the same and are
      # written again; only dh must not see them twice, so their W columns
      # are zeroed for it (a [D, c] select, not an [N, c] one).
      block, w_t = _class_tile(loop, h, w, b, res.dense, j, start,
                               masked=False)
      g, _ = _loss_rule.block_grad(loop.lmap, block, res.shift, res.label,
                                   res.keep, ct_sums)
      if loop.vocab % loop.chunk:
        w_t = jnp.where(_own(j, start, loop.chunk, (1, loop.chunk), 1), w_t,
                        0)
      dh_t, dw_t = fold(g, ht, w_t)
      dw = lax.dynamic_update_slice_in_dim(dw, dw_t, start, axis=1)
      if db is not None:
        db = lax.dynamic_update_slice_in_dim(db, jnp.sum(g, axis=0), start,
                                             axis=0)
      return (dh + dh_t, dw, db), None

    init = (_collectives.varying_like(jnp.zeros(h.shape, acc), *refs),
            _collectives.varying_like(jnp.zeros(w.shape, acc), *refs),
            None if b is None else _collectives.varying_like(
                jnp.zeros(b.shape, acc), *refs))
    (dh, dw, db), _ = lax.scan(jax.checkpoint(tile), init,
                               jnp.arange(count, dtype=jnp.int32))
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
              label: jax.Array, keep: jax.Array | None, dense: Any
              ) -> tuple[jax.Array, Sums, jax.Array | None]:
  """Each token's shift, sums and (with ``loop.stats``) argmax over this
  device's classes of ``h @ w + b`` (``h``: ``[N, D]``; ``w``: ``[D, V]``;
  a tile of at most N tokens or V classes), the sums differentiable in
  every mode with respect to ``h``, ``w`` and ``b``. ``dense`` (the
  smoothing target, a constant) is a number or a ``[V]`` vector. The
  argmax is a global class index (int32), :data:`NO_CLASS` where no class
  reaches the shift."""
  shift, sums, argmax = _head(loop, h, w, b, label, keep, dense)
  if argmax is not None:
    argmax = lax.stop_gradient(argmax).astype(jnp.int32)
    argmax = jnp.where(argmax < 0, _loss_rule.NO_CLASS, argmax)
  return shift, sums, argmax


# Ignored tokens (padding, prompts: often most of a batch) are moved behind
# the kept ones, and the loop runs over the first N, N/2, N/4 or N/8 tokens:
# the smallest that holds every kept one, chosen at run time among static
# shapes (lax.switch). Below this many tokens the loop runs on all of them.
COMPACT_MIN_TOKENS = 1024
BUCKETS = 4


def compacted_head_sums(loop: Loop, h: jax.Array, w: jax.Array,
                        b: jax.Array | None, label: jax.Array,
                        keep: jax.Array, dense: Any
                        ) -> tuple[jax.Array, Sums, jax.Array | None]:
  """:func:`head_sums` that spends (almost) no tile on tokens outside
  ``keep``: the kept tokens are gathered first (a stable sort), the loop
  runs over the smallest bucket of ``N/2^k`` tokens that holds them (all
  ``N`` while more than half are kept), and the results are put back in
  place (the others get no mass: a zero loss and zero gradient after
  :func:`jsoft._loss_rule.finish`). Differentiable in every mode (the
  gather, ``lax.switch`` and the head's rule are)."""
  n = h.shape[0]
  sizes = sorted({max(1, -(-n // 2**k)) for k in range(BUCKETS)},
                 reverse=True)
  order = jnp.argsort(~keep, stable=True)  # kept tokens first
  back = jnp.zeros_like(order).at[order].set(  # the inverse permutation
      jnp.arange(n, dtype=order.dtype))
  kept = jnp.sum(keep.astype(jnp.int32))
  # The smallest bucket that holds every kept token.
  which = jnp.sum(jnp.asarray(sizes) >= kept) - 1
  h_k, label_k, keep_k = h[order], label[order], keep[order]

  def bucket(size):
    sub = loop._replace(chunk=min(loop.chunk, size)) if loop.by_tokens \
        else loop

    def run(h_k, w, b):
      shift, sums, argmax = head_sums(sub, h_k[:size], w, b, label_k[:size],
                                      keep_k[:size], dense)
      pad = n - size
      if not pad:
        return shift, sums, argmax
      floor = -float(jnp.finfo(shift.dtype).max)
      grow = lambda x, v: jnp.concatenate(  # noqa: E731
          [x, jnp.full((pad,), v, x.dtype)])
      sums = jax.tree.map(lambda x: grow(x, 0), sums)
      return (grow(shift, floor), sums,
              None if argmax is None else grow(argmax, _loss_rule.NO_CLASS))

    return run

  out = lax.switch(which, [bucket(s) for s in sizes], h_k, w, b)
  return jax.tree.map(lambda x: x[back], out)
