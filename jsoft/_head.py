r"""The cross-entropy rule on tiles of an LM head's logits, per token.

:func:`head_sums` computes every token's :class:`~jsoft._loss_rule.Sums`
over the classes of ``h @ W + b`` this device holds, without holding the
``[N, V]`` logits: the loop of :mod:`jsoft._tiling` makes one tile of
logits at a time, applies :func:`~jsoft._loss_rule.block_sums` to it and
keeps only numbers per token. Its VJP rule runs the loop again, recomputes
each tile's logits (one more matmul per tile), forms the gradient tile
with :func:`~jsoft._loss_rule.block_grad` and folds it straight into

.. math::
  \frac{\partial L}{\partial h} = g\,W^\top, \qquad
  \frac{\partial L}{\partial W} = \sum_{\text{tiles}} h^\top g, \qquad
  \frac{\partial L}{\partial b} = \sum_{\text{tiles}} \textstyle\sum_n g,

accumulated in float32 whatever the input dtype. Tiles of tokens span all
of this device's classes (``[c, V]``; the accumulator is ``dW``,
``[D, V]``); or each tile of tokens is itself looped over tiles of classes
(``[r, c]``; the sums of each class tile are moved to the running max,
:func:`~jsoft._loss_rule.rebase`, an online logsumexp; the accumulator is
``dh``, ``[N, D]``), with one tile of all ``N`` tokens unless ignored
tokens are gathered out. Both passes loop the same way: token tiles
outside (those past the kept tokens skipped:
:func:`jsoft._tiling.scan_tokens`), class tiles inside.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import (
  _checks,
  _collectives,
  _compaction,
  _loss_rule,
  _rules,
  _spellings,
)
from jsoft import _tiling as tiling
from jsoft._loss_rule import Block, Sums
from jsoft._softcap import LogitMap


class Loop(NamedTuple):
  """The tiling, fixed at compile time."""
  lmap: LogitMap | None  # what the softmax sees (soft cap, temperature)
  tokens: int  # tokens per tile
  classes: int | None  # classes per tile; None: all of this device's
  vocab: int  # this device's classes
  axis_name: Any  # the mesh axis W's classes are split over
  stats: bool = False  # also the entropy sum and the argmax (TokenStats)
  # Class tiles: the backward pass keeps each token tile's hᵀ ([D, r]) for
  # the dW products (see jsoft._tiling.class_tile).
  keep_ht: bool = False


class HeadResiduals(NamedTuple):
  hidden: jax.Array  # [N, D]
  weight: jax.Array  # [D, V]
  bias: jax.Array | None  # [V]
  label: jax.Array  # [N] int32 global class indices
  keep: jax.Array | None  # [N] tokens with a gradient (None: all)
  dense: Any  # the dense target u: a number, a [V] vector, or None
  kept: jax.Array | None  # how many leading tokens are kept (None: all)
  shift: jax.Array  # [N] each token's shift


def _class_block(loop: Loop, tiles: tiling.Tiles, h, w, b, dense, j, start,
                 masked: bool = True):
  """Class tile ``j`` (columns ``start`` on) of the token rows ``h``: its
  block and its slice of ``w``. Unless ``masked`` is False, the columns of
  the tile before (where the last tile overlaps it) take no part."""
  acc = _checks.compute_dtype(h.dtype)
  w_t = lax.dynamic_slice_in_dim(w, start, tiles.size, axis=1)
  b_t = None if b is None else lax.dynamic_slice_in_dim(b, start, tiles.size)
  bias = tiling.class_bias(tiles, j, start, acc) if masked else None
  if dense is not None and jnp.ndim(dense):
    dense = lax.dynamic_slice_in_dim(dense, start, tiles.size)
  if dense is not None and bias is not None:
    dense = jnp.where(_spellings.kept(bias), dense, 0)
  first = _collectives.first_class(loop.axis_name, loop.vocab) + start
  return Block(tiling.logits(h, w_t, b_t, acc), None, first, dense,
               bias), w_t


def _row_sums(loop: Loop, h, w, b, label, dense, refs):
  """The shift, sums and argmax of the token rows ``h`` over this device's
  classes: one block, or an online logsumexp over class tiles."""
  acc = _checks.compute_dtype(h.dtype)
  if loop.classes is None:
    first = _collectives.first_class(loop.axis_name, loop.vocab)
    block = Block(tiling.logits(h, w, b, acc), None, first, dense)
    m = _loss_rule.block_max(block, loop.lmap)
    arg = _loss_rule.block_argmax(loop.lmap, block, m) if loop.stats else None
    return m, _loss_rule.block_sums(loop.lmap, block, m, label, loop.stats), arg
  tiles = tiling.Tiles(loop.vocab, loop.classes)

  def tile(carry, j, start):
    m, sums, seen, arg = carry
    block, _ = _class_block(loop, tiles, h, w, b, dense, j, start)
    new = jnp.maximum(m, _loss_rule.block_max(block, loop.lmap))
    sums = _loss_rule.add(
        _loss_rule.rebase(sums, m, new, seen),
        _loss_rule.block_sums(loop.lmap, block, new, label, loop.stats))
    if block.dense is not None:  # Σ u over the classes seen so far
      seen = seen + jnp.sum(jnp.broadcast_to(block.dense, (1, tiles.size)),
                            axis=-1)
    if arg is not None:  # the first class at the running max
      here = _loss_rule.block_argmax(loop.lmap, block, new)
      arg = jnp.where(m == new, jnp.minimum(arg, here), here)
    return new, sums, seen, arg

  zeros = tiling.zeros(label.shape, acc, *refs)
  floor = jnp.full(label.shape, -float(jnp.finfo(acc).max), acc)
  none = None
  if loop.stats:
    none = _collectives.varying_like(
        jnp.full(label.shape, _loss_rule.NO_CLASS, jnp.int32), *refs)
  init = (_collectives.varying_like(floor, *refs),
          Sums(zeros, zeros, None if dense is None else zeros,
               zeros if loop.stats else None),
          tiling.zeros((1,), acc, *refs), none)
  m, sums, _, arg = tiling.scan_classes(tiles, tile, init)
  return m, sums, arg


def _head_fwd(loop: Loop, h, w, b, label, keep, dense, kept):
  refs = (h, w, b, label, keep, dense)
  tiles = tiling.Tiles(h.shape[0], loop.tokens)

  def tile(_, j, start, own):
    del j, own
    rows = lambda x: tiling.rows(x, start, tiles.size)  # noqa: E731
    return None, _row_sums(loop, rows(h), w, b, rows(label), dense, refs)

  _, (shift, sums, argmax) = tiling.scan_tokens(tiles, tile, None,
                                                kept=kept, refs=refs)
  if argmax is not None:
    # Out as a float (a rule's outputs are differentiable types): exact
    # below 2^24 classes; -1 for none.
    argmax = jnp.where(argmax == _loss_rule.NO_CLASS, -1, argmax).astype(
        shift.dtype)
  # Typed to vary like every input, so cotangents arrive per device
  # (see jsoft._collectives).
  shift, sums, argmax = _collectives.varying_tree((shift, sums, argmax),
                                                  *refs)
  return ((shift, sums, argmax),
          HeadResiduals(h, w, b, label, keep, dense, kept, shift))


def _own_rows(keep, own):
  """``keep`` and the tile's own rows (the last tile's first rows are the
  previous tile's)."""
  if own is True:
    return keep
  return own if keep is None else keep & own


def _token_bwd(loop: Loop, res: HeadResiduals, ct_sums, refs):
  """Tiles of tokens over all classes: each tile's ``dh`` rows; ``dW`` and
  ``db`` accumulated."""
  h, w, b = res.hidden, res.weight, res.bias
  acc = _checks.compute_dtype(h.dtype)
  first = _collectives.first_class(loop.axis_name, loop.vocab)
  tiles = tiling.Tiles(h.shape[0], loop.tokens)

  def tile(carry, j, start, own):
    del j
    dw, db = carry
    rows = lambda x: tiling.rows(x, start, tiles.size)  # noqa: E731
    h_t = rows(h)
    block = Block(tiling.logits(h_t, w, b, acc), None, first, res.dense)
    keep = _own_rows(rows(res.keep), own)
    g, _ = _loss_rule.block_grad(loop.lmap, block, rows(res.shift),
                                 rows(res.label), keep,
                                 jax.tree.map(rows, ct_sums))
    dh, dw_t, db_t = tiling.fold(g, tiling.transposed(h_t), w, acc)
    return (dw + dw_t, None if db is None else db + db_t), dh

  init = (tiling.zeros(w.shape, acc, *refs),
          None if b is None else tiling.zeros(b.shape, acc, *refs))
  (dw, db), dh = tiling.scan_tokens(tiles, tile, init, kept=res.kept,
                                    remat=True, refs=refs)
  return dh, dw, db


def _class_bwd(loop: Loop, res: HeadResiduals, ct_sums, refs):
  """Tiles of tokens (one, unless ignored tokens are gathered out; those
  past the kept ones skipped, as in the forward pass), each over tiles of
  classes: each token tile's ``dh`` rows accumulated over its class tiles;
  ``dW`` and ``db`` columns written by the first token tile, added to by
  the others."""
  h, w, b = res.hidden, res.weight, res.bias
  acc = _checks.compute_dtype(h.dtype)
  classes = tiling.Tiles(loop.vocab, loop.classes)
  tokens = tiling.Tiles(h.shape[0], loop.tokens)
  ht = tiling.transposed(h) if loop.keep_ht else h.T

  def token_tile(carry, i, row, own):
    rows = lambda x: tiling.rows(x, row, tokens.size)  # noqa: E731
    h_i, shift, label = rows(h), rows(res.shift), rows(res.label)
    keep = _own_rows(rows(res.keep), own)
    ct_i = jax.tree.map(rows, ct_sums)
    ht_i = (ht if tokens.count == 1 else
            lax.dynamic_slice_in_dim(ht, row, tokens.size, axis=1))

    def add(total, part, start, axis):
      """``part`` into the columns of ``total`` from ``start`` on."""
      if tokens.count > 1:  # the token tiles before wrote them
        return tiling.add_at(total, part, start, axis)
      return lax.dynamic_update_slice_in_dim(total, part, start, axis=axis)

    def class_tile(carry, j, start):
      dh, dw, db = carry
      block, w_t = _class_block(loop, classes, h_i, w, b, res.dense, j,
                                start, masked=False)
      g, _ = _loss_rule.block_grad(loop.lmap, block, shift, label, keep,
                                   ct_i)
      # Every column of the tile, the previous tile's too where the last
      # one overlaps it: dh must not see them twice, so their W columns are
      # zeroed for it (a [D, c] select, not an [r, c] one); their dW and db
      # columns, the same values, are written again over one token tile,
      # zeroed before they are added over several.
      own_c = None
      if classes.overlaps:
        own_c = classes.own(j, start, (1, classes.size), 1)
        w_t = jnp.where(own_c, w_t, 0)
      dh_j, dw_j, db_j = tiling.fold(g, ht_i, w_t, acc)
      if own_c is not None and tokens.count > 1:
        dw_j, db_j = jnp.where(own_c, dw_j, 0), jnp.where(own_c[0], db_j, 0)
      dw = add(dw, dw_j, start, 1)
      db = None if db is None else add(db, db_j, start, 0)
      return dh + dh_j, dw, db

    dh = tiling.zeros((tokens.size, h.shape[1]), acc, *refs)
    dh, dw, db = tiling.scan_classes(classes, class_tile, (dh, *carry),
                                     remat=True)
    return (dw, db), dh

  init = (tiling.zeros(w.shape, acc, *refs),
          None if b is None else tiling.zeros(b.shape, acc, *refs))
  (dw, db), dh = tiling.scan_tokens(tokens, token_tile, init, kept=res.kept,
                                    remat=True, refs=refs)
  return dh, dw, db


def _head_bwd(loop: Loop, res: HeadResiduals, ct):
  ct_sums = ct[1]  # the shift and the argmax have no gradient
  h, w, b = res.hidden, res.weight, res.bias
  refs = (h, w, b, *jax.tree.leaves(ct_sums), res.label, res.keep,
          res.shift)
  run = _token_bwd if loop.classes is None else _class_bwd
  grads = tiling.cast(tiling.Grads(*run(loop, res, ct_sums, refs)), h, w, b)
  return (*grads, None, None, None, None)


def _head_fun(loop, h, w, b, label, keep, dense, kept):
  return _head_fwd(loop, h, w, b, label, keep, dense, kept)[0]


_head = _rules.vjp_rule(_head_fun, _head_fwd, _head_bwd)


def head_sums(loop: Loop, h: jax.Array, w: jax.Array, b: jax.Array | None,
              label: jax.Array, keep: jax.Array | None, dense: Any,
              compaction: _compaction.Compaction | None = None
              ) -> tuple[jax.Array, Sums, jax.Array | None]:
  """Each token's shift, sums and (with ``loop.stats``) argmax over this
  device's classes of ``h @ w + b`` (``h``: ``[N, D]``; ``w``: ``[D, V]``),
  the sums differentiable in every mode with respect to ``h``, ``w`` and
  ``b``. ``dense`` (the smoothing target, a constant) is a number or a
  ``[V]`` vector. The argmax is a global class index (int32),
  :data:`~jsoft._loss_rule.NO_CLASS` where no class reaches the shift.

  With ``compaction``, the kept tokens are gathered first and the loop
  spends no tile on the others (their shift and sums are 0: no mass, a
  zero loss and zero gradient after :func:`jsoft._loss_rule.finish`).
  """
  if compaction is None:
    out = _head(loop, h, w, b, label, keep, dense, None)
  else:
    c = compaction
    out = jax.tree.map(c.scatter, _head(
        loop, c.gather(h), w, b, c.gather(label), c.gather(keep), dense,
        c.count))
  shift, sums, argmax = out
  if argmax is not None:
    argmax = lax.stop_gradient(argmax).astype(jnp.int32)
    argmax = jnp.where(argmax < 0, _loss_rule.NO_CLASS, argmax)
  return shift, sums, argmax
