r"""The one place that tiles: how big a tile is, and the loops over tiles.

Every fused head (:func:`jsoft.linear_cross_entropy`,
:func:`jsoft.linear_distillation_loss`) holds one tile of an LM head's
logits at a time. This module is the loop they share; the heads plug a
*rule* into it (what a tile's logits give per token, and its gradient tile
``g``) and keep nothing else:

* the tile policy: tokens or classes per tile from a byte budget
  (:data:`BUDGETS`, :func:`rows_per_tile`, :func:`class_tile`) and the
  peak-memory bound of each loop (:func:`peak_bytes`);
* :func:`scan_tokens`, the token-tile scan: ``[c, D]`` rows of ``h`` at a
  time, the last tile overlapping the one before where ``c`` does not
  divide ``N`` (nothing is padded or copied), and tiles that hold no kept
  token skipped at run time;
* :func:`scan_classes`, the class-tile scan, and :func:`class_bias`, the
  mask of an overlapping last class tile;
* :func:`fold`, :func:`add_at` and :func:`cast`: a gradient tile into
  ``dh = g Wᵀ``, ``dW += hᵀ g``, ``db += Σ g`` (float32), then back to the
  inputs' dtypes, summed over the mesh axes their inputs are replicated on;
* with :class:`jsoft._compaction.Compaction` (ignored tokens, padding and
  prompts, gathered behind the kept ones) a loop over the first ``⌈K/c⌉``
  tiles sees every kept token and the rest are skipped: the time goes with
  the kept count.

The word is *tile* throughout; ``chunk_size``, the public argument, is the
size of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _collectives, _compat

MIB = 2**20
# Byte budgets of one float32 tile of logits, per loop: a share of all the
# logits (1/share), clamped to [MIN_TILE_BYTES, cap]. A token tile's step
# holds about three such tiles (logits, exponentials, gradient); a class
# tile's step is sized as a whole (class_tile); a distillation tile holds
# both heads' logits. The class loop's share is the larger: 1/64 (its cap
# reached from N·V = 2^28 on, 1/16 from 2^26) made tiles of a few hundred
# classes, whose four matmuls per tile ran behind the unfused loss's three
# (the fused-head cells of python -m bench sizes); from a few hundred to a
# few thousand classes they run ahead of it, at about 1/16 of its temp.
MIN_TILE_BYTES = MIB
BUDGETS = {  # loop: (share, cap in bytes)
    "tokens": (64, 8 * MIB),
    "classes": (16, 16 * MIB),
    "distillation": (32, 16 * MIB),
}
# The class loop's default tile holds at least this many logits' bytes
# (2^20 logits: 1024 classes at 1024 tokens, 2048 at 512) where its step
# leaves room for hᵀ. With few tokens the budget's share made tiles of a
# few hundred classes, whose fixed costs per tile put the step behind the
# unfused loss on a 2-core Intel Xeon: 1024×128×8192 in 13 tiles of 632
# read 0.93–0.96× optax, in tiles of 1024 1.11–1.20× (temp 5.5 MiB against
# 3.8, optax's 64); 512×128×8192 in 15 of 552 0.87×, in tiles of 2048
# 1.17× (5.5 MiB against 1.9, optax's 32). With many tokens a tile is
# large already: 8192×64×16384 ran fastest in its 824-class tiles.
MIN_CLASS_TILE_BYTES = 4 * MIB
# Row tiles of a class loop whose ignored tokens are gathered out: the kept
# count is rounded up to 1/ROW_TILES of the tokens (the forward and backward
# passes skip the row tiles past it), so a kept fraction k runs at most
# k + 1/ROW_TILES of the work: with 16, room within the sweep's k + 0.10
# for the fixed costs (with 10, the rounding alone could take it all). Each
# row tile adds its share to every dW column once, so finer tiles cost a
# little time when every token is kept.
ROW_TILES = 16


def budget(n: int, width: int, loop: str) -> int:
  """Bytes for one float32 ``[n, width]`` tile of logits in ``loop``."""
  share, cap = BUDGETS[loop]
  return min(cap, max(MIN_TILE_BYTES, 4 * n * width // share))


def balanced(length: int, most: int) -> int:
  """The tile of at most ``most`` that covers ``length`` in as few tiles
  as ``most`` does, each as small as it can be (a multiple of 8 when
  ``most`` is): the last tile, which overlaps the one before, then
  recomputes few rows or columns (8192 classes in tiles of 1984 take five,
  the last 87% recomputed; in tiles of 1640, 8 columns)."""
  most = max(1, min(most, length))
  size = -(-length // -(-length // most))
  if most % 8 == 0:
    size += -size % 8
  return size


def rows_per_tile(length: int, width: int, nbytes: int) -> int:
  """Rows of ``width`` float32 columns that fit ``nbytes``: a multiple of 8
  when possible, at least 1, at most ``length``; :func:`balanced`."""
  rows = max(1, nbytes // (4 * max(width, 1)))
  if rows >= 8:
    rows -= rows % 8
  return balanced(length, rows)


def token_tile(n: int, vocab: int, loop: str = "tokens") -> int:
  """The default tokens per tile of ``loop`` ("tokens" or
  "distillation")."""
  return rows_per_tile(n, vocab, budget(n, vocab, loop))


def class_tile(n: int, d: int, vocab: int,
               size: int | None) -> tuple[int, bool]:
  """The class loop's tile (classes) and whether its backward pass keeps
  ``hᵀ`` for the ``dW`` products.

  ``hᵀ`` (``4·N·D`` bytes) is kept when it is no larger than a tile,
  ``D ≤ c``: XLA:CPU runs a product that contracts ``h``'s first axis on a
  slow path. By default the step — the tile, ``hᵀ`` and one tile's share
  of ``dh`` (``8·N·D``), ``W``'s tile (``4·D·c``) — stays within 31/32 of
  twice the "classes" budget (the rest for numbers per token); where that
  leaves no tile of ``D`` classes, the tile is the budget's own, without
  ``hᵀ``. A tile with room for ``hᵀ`` holds at least
  :data:`MIN_CLASS_TILE_BYTES` of logits.
  """
  if size:
    size = min(size, vocab)
    return size, d <= size
  nbytes = budget(n, vocab, "classes")
  size = (2 * nbytes * 31 // 32 - 8 * n * d) // (4 * (n + d))
  if size >= 8:
    size -= size % 8
  if size >= min(d, vocab):
    floor = MIN_CLASS_TILE_BYTES // (4 * n)
    size = balanced(vocab, max(size, floor - floor % 8))
    return size, d <= size
  return rows_per_tile(vocab, n, nbytes), False


def row_tile(n: int) -> int:
  """Tokens per row tile of a class loop with ignored tokens gathered out
  (:data:`ROW_TILES` of them, a multiple of 8)."""
  rows = -(-n // ROW_TILES)
  return min(n, rows + (-rows) % 8)


def row_tiled_class_tile(n: int, d: int, vocab: int, rows: int,
                         size: int | None) -> tuple[int, bool]:
  """:func:`class_tile` for row tiles of ``rows`` tokens: as asked, or by
  default a tile whose step fits the default step over all ``n`` tokens:
  the tile (``4·r·c``), the row tile's ``hᵀ`` and share of ``dh``
  (``8·r·D``) and the class tile's ``dW`` share, the sum it is added to
  and their sum (``12·D·c``), within 31/32 of twice the "classes" budget.
  So about as many tiles in all as over all tokens, each matmul about as
  large."""
  if size:
    return class_tile(rows, d, vocab, size)
  nbytes = budget(n, vocab, "classes")
  size = (2 * nbytes * 31 // 32 - 8 * rows * d) // (4 * rows + 12 * d)
  if size >= 8:
    size -= size % 8
  size = balanced(vocab, max(1, size))
  return size, d <= size


def peak_bytes(loop: str, n: int, d: int, v: int, c: int, *,
               rows: int | None = None, compacted: bool = False,
               reduced: bool = False, tiles: int = 12) -> int:
  """The documented bound on a fused head's temporary memory, in bytes
  (beyond its inputs and outputs), for ``n`` tokens, ``d`` features,
  ``v`` classes (this device's) and tiles of ``c``:

  * ``"tokens"``: ``8·c·V`` (a float32 tile of logits and its gradient;
    ``16·c·V`` when ``reduced``: differentiated, the gradients formed in
    the forward pass) + ``4·D·V`` (``dW``) + ``4·N·D`` (``dh``);
  * ``"classes"``: ``8·r·c`` (``r`` = ``rows``, the row tile, default all
    ``N``) + ``4·N·D`` (``dh``) + ``4·D·V`` (``dW``) + ``4·r·D`` (``hᵀ``,
    kept when ``D ≤ c``), and in row tiles ``12·D·c`` (a class tile's
    ``dW`` share, the sum it is added to, their sum) and ``4·D·V`` (a copy
    of ``W``: differentiated, each row tile's ``lax.cond`` is split in
    two, and ``W`` passes from one to the other);
  * ``"distillation"``: ``tiles·4·c·V`` (both heads' tiles and the
    gradient: 12 for forward KL at ``T = 1`` up to 48 with the JSD, a
    temperature and the hard loss) + ``8·D·V`` (``dW`` and ``Wᵀ``) +
    ``4·N·D`` (``dh``), and ``48·N`` more numbers per token;

  plus ``16·N`` (numbers per token), and ``8·N·D`` when ignored tokens are
  gathered out (``compacted``: the gathered features and their gradient).
  """
  extra = 16 * n + (8 * n * d if compacted else 0)
  if loop == "tokens":
    return (16 if reduced else 8) * c * v + 4 * d * v + 4 * n * d + extra
  if loop == "classes":
    r = n if rows is None else rows
    ht = 4 * r * d if d <= c else 0
    shares = 12 * d * c + 4 * d * v if r < n else 0
    return 8 * r * c + 4 * n * d + 4 * d * v + ht + shares + extra
  if loop == "distillation":
    return tiles * 4 * c * v + 8 * d * v + 4 * n * d + 48 * n + extra
  raise ValueError(f"unknown loop {loop!r}")


# -------------------------------------------------------------- the scans


class Tiles(NamedTuple):
  """``length`` rows (or columns) in tiles of ``size``; static."""
  length: int
  size: int

  @property
  def count(self) -> int:
    return -(-self.length // self.size)

  @property
  def overlaps(self) -> bool:
    """Whether the last tile overlaps the one before."""
    return self.length % self.size != 0

  def start(self, j) -> jax.Array:
    """Where tile ``j`` starts: ``j·size``, except that the last one ends at
    ``length``."""
    return jnp.minimum(j * self.size, self.length - self.size)

  def own(self, j, start, shape, axis: int) -> jax.Array:
    """Which entries along ``axis`` of tile ``j`` (of ``shape``) are its
    own, not the previous tile's."""
    index = start + lax.broadcasted_iota(jnp.int32, shape, axis)
    return index >= j * self.size

  def untile(self, stacked: jax.Array) -> jax.Array:
    """Per-tile outputs ``[count, size, ...]`` back to ``[length, ...]``."""
    flat = stacked.reshape((-1,) + stacked.shape[2:])
    if not self.overlaps:
      return flat
    cut = (self.count - 1) * self.size
    overlap = self.count * self.size - self.length
    return jnp.concatenate([flat[:cut], flat[cut + overlap:]])


def rows(x: Any, start, size: int) -> Any:
  """Rows ``start:start+size`` of a per-token array (None and numbers
  pass)."""
  if not isinstance(x, jax.Array) or x.ndim == 0:
    return x
  return lax.dynamic_slice_in_dim(x, start, size)


def scan_tokens(tiles: Tiles, body: Callable, init: Any, *,
                kept: jax.Array | None = None, remat: bool = False,
                refs: tuple[Any, ...] = ()) -> tuple[Any, Any]:
  """Runs ``body(carry, j, start, own) -> (carry, out)`` over the token
  tiles: ``own`` marks the tile's own rows (True where tiles do not
  overlap), ``out`` holds per-row outputs ``[size, ...]``. Returns the
  final carry and the outputs ``[length, ...]``.

  ``kept``: the number of leading rows that matter (the kept tokens,
  gathered first: :class:`Compaction`); tile ``j`` runs only when
  ``j·size < kept`` (a ``lax.cond``), else it leaves the carry as it is
  and gives zeros. ``refs``: the arrays the outputs are typed to vary like
  inside ``shard_map`` (both branches of the cond must agree). With
  ``remat``, differentiating the loop recomputes each tile.
  """
  def step(carry, j):
    start = tiles.start(j)
    own = tiles.own(j, start, (tiles.size,), 0) if tiles.overlaps else True
    return body(carry, j, start, own)

  if kept is None and tiles.count == 1:  # one tile: no loop
    return step(init, jnp.int32(0))
  if kept is not None:
    run = step

    def step(carry, j):  # noqa: F811
      live = j * tiles.size < kept.astype(j.dtype)
      return when(live, lambda: run(carry, j), refs, keep=carry)

  carry, stacked = lax.scan(jax.checkpoint(step) if remat else step, init,
                            jnp.arange(tiles.count, dtype=jnp.int32))
  return carry, jax.tree.map(tiles.untile, stacked)


def when(live: jax.Array, fn: Callable[[], Any], refs: tuple[Any, ...],
         keep: Any = None) -> Any:
  """``fn()`` where ``live``, else zeros shaped like its output, in a
  ``lax.cond``; the output typed to vary like ``refs`` inside
  ``shard_map`` (both branches must agree). With ``keep``, ``fn`` returns
  ``(carry, out)`` and a skipped call gives ``(keep, zeros)``: the carry
  passes through as it was."""
  def run(_):
    if keep is None:
      return _collectives.varying_tree(fn(), *refs)
    carry, out = fn()
    return carry, _collectives.varying_tree(out, *refs)

  shapes = jax.eval_shape(run, None)
  if keep is not None:
    shapes = shapes[1]

  def skip(_):
    zeros = _collectives.varying_tree(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), *refs)
    return zeros if keep is None else (keep, zeros)

  return lax.cond(live, run, skip, None)


def scan_classes(tiles: Tiles, body: Callable, init: Any, *,
                 remat: bool = False) -> Any:
  """Runs ``body(carry, j, start) -> carry`` over the class tiles; returns
  the final carry."""
  def step(carry, j):
    return body(carry, j, tiles.start(j)), None

  return lax.scan(jax.checkpoint(step) if remat else step, init,
                  jnp.arange(tiles.count, dtype=jnp.int32))[0]


def class_bias(tiles: Tiles, j, start, dtype) -> jax.Array | None:
  """The mask of class tile ``j`` as a bias ``[1, size]`` (None where tiles
  do not overlap): 0 on its own columns, half the largest float on the
  previous tile's. An add fuses into XLA:CPU's reductions, where a select
  makes a masked copy of the tile (more time, twice the temp); finite,
  not -inf, so ``e^(x̃ - big)`` is 0 all the same and every derivative of a
  masked entry is 0, not ``0·inf``."""
  if not tiles.overlaps:
    return None
  own = tiles.own(j, start, (1, tiles.size), 1)
  return jnp.where(own, 0.0, -0.5 * float(jnp.finfo(dtype).max)).astype(dtype)


# --------------------------------------------------------- gradient tiles


def logits(h: jax.Array, w: jax.Array, b: jax.Array | None,
           acc: Any) -> jax.Array:
  """One tile of logits ``h @ w + b``, accumulated and returned in
  ``acc``."""
  out = _compat.matmul(h, w, acc)
  return out if b is None else out + b.astype(acc)


def transposed(h: jax.Array) -> jax.Array:
  """``hᵀ`` made as an array of its own, for a ``dW = hᵀ g`` product.

  XLA folds a bare transpose into the product, and XLA:CPU runs a product
  that contracts its left operand's first axis well under the speed of a
  plain ``[D, c]·[c, V]`` one. The barrier keeps the transpose its own op.
  """
  return _compat.barrier(h.T)


def fold(g: jax.Array, ht: jax.Array, w: jax.Array,
         acc: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A gradient tile ``g`` ``[r, c]`` of the logits ``h @ w``: its
  ``(dh, dW, db)`` shares ``(g wᵀ, hᵀ g, Σ_r g)`` in ``acc``. ``ht`` is
  the tile's ``hᵀ`` (:func:`transposed`)."""
  g_in = g.astype(w.dtype)
  return (_compat.matmul_t(g_in, w, acc), _compat.matmul(ht, g_in, acc),
          jnp.sum(g, axis=0))


def add_at(total: jax.Array, part: jax.Array, start,
           axis: int) -> jax.Array:
  """``part`` added to ``total`` from ``start`` on along ``axis``, in place.

  A scatter-add, not ``dynamic_update_slice(total, part + slice)``: a VJP
  rule's backward pass runs transposed twice in reverse mode
  (:mod:`jsoft._rules`); a scatter-add comes back a scatter-add, while
  the slice-and-update spelling comes back as a zeroed copy of ``total``
  plus a sum, two copies of it per update (of ``dW`` per tile, in the
  class loop's row tiles)."""
  dnums = lax.ScatterDimensionNumbers(
      update_window_dims=tuple(range(part.ndim)), inserted_window_dims=(),
      scatter_dims_to_operand_dims=(axis,))
  return lax.scatter_add(total, jnp.reshape(start, (1,)), part, dnums,
                         indices_are_sorted=True, unique_indices=True,
                         mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


class Grads(NamedTuple):
  hidden: jax.Array  # [N, D]
  weight: jax.Array  # [D, V]
  bias: jax.Array | None  # [V]


def zeros(shape, acc, *refs) -> jax.Array:
  """A zero accumulator typed to vary like ``refs`` inside ``shard_map``
  (a scan carry keeps one type; see :mod:`jsoft._collectives`)."""
  return _collectives.varying_like(jnp.zeros(shape, acc), *refs)


def cast(grads: Grads, h, w, b) -> Grads:
  """The float32 gradients in the inputs' dtypes, each summed over the mesh
  axes its input is replicated on."""
  def back(g, primal):
    if g is None:
      return None
    return _collectives.summed_like(g, primal).astype(primal.dtype)

  return Grads(back(grads.hidden, h), back(grads.weight, w),
               back(grads.bias, b))
