"""The one tile loop (jsoft/_tiling.py): its tile policy, its scans, the
gather-out of ignored tokens, and the memory bound of each loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoft
from jsoft import _compaction
from jsoft import _tiling as tiling
from tests import helpers

IGNORE = -100
MIB = 2**20


def test_default_token_tiles():
  # 1/64 of the logits, clamped to [1, 8] MiB, a multiple of 8 rows: at
  # V=8192, 8 MiB / (4·8192 B) = 256 tokens; at N=64, V=1000 the budget is
  # the 1 MiB floor: 262 rows, at most N.
  assert tiling.token_tile(32768, 8192) == 256
  assert tiling.token_tile(8192, 32768) == 64
  assert tiling.token_tile(64, 1000) == 64
  assert tiling.token_tile(5000, 1000) == 256  # 1 MiB: 262 → 256
  # The distillation head's tiles: 1/32 of one head's logits, [1, 16] MiB.
  assert tiling.token_tile(4096, 32768, "distillation") == 128
  assert tiling.token_tile(5, 32768, "distillation") == 5
  assert tiling.token_tile(1 << 20, 256, "distillation") % 8 == 0


def test_default_class_tiles():
  # Over classes the step (tile 4·N·c, hᵀ and dh's share 8·N·D, W's tile
  # 4·D·c) within 31/32 of twice the budget (1/16 of the logits, at most
  # 16 MiB): at N=8192, D=256, (31 MiB − 16 MiB) / (4·8448 B) = 465.4,
  # so 464 classes, at V=32000 too (69 tiles of 464). Below the cap, at
  # N=1024, D=128, V=8192 the budget is 2 MiB: (3.875 MiB − 1 MiB) /
  # (4·1152 B) = 654.2, so 648, under the 4 MiB floor's 2^20 / 1024 = 1024
  # classes: 8 tiles of 1024; at N=512 the floor is 2048 classes (the
  # budget's 1 MiB gave 552). Where hᵀ leaves no room, the budget's own
  # tile without it, and no floor.
  tile = tiling.class_tile
  assert tile(8192, 256, 32768, None) == (464, True)
  assert tile(8192, 256, 32000, None) == (464, True)
  assert tile(1024, 128, 8192, None) == (1024, True)
  assert tile(512, 128, 8192, None) == (2048, True)
  assert tile(1024, 128, 3000, None) == (1000, True)  # balanced: 3 tiles
  assert tile(4096, 4096, 32768, None) == (1024, False)  # 16 MiB; D > c
  assert tile(8192, 256, 32768, 128) == (128, False)  # as asked; D > c
  assert tile(8192, 256, 32768, 256) == (256, True)


def test_balanced_tiles_cover_the_axis_in_as_few_tiles_with_least_overlap():
  assert tiling.balanced(8192, 1984) == 1640  # 5 tiles: 8200 columns
  assert tiling.balanced(32768, 464) == 464  # 71 tiles either way
  assert tiling.balanced(10, 4) == 4  # 3 tiles; 4 is not a multiple of 8
  assert tiling.balanced(1000, 7) == 7
  assert tiling.balanced(5, 8) == 5  # at most the axis
  assert tiling.balanced(100, 64) == 56  # 2 tiles of 50 → 56, not 64
  for length, most in [(8192, 1984), (1000, 96), (33, 16), (7, 3)]:
    size = tiling.balanced(length, most)
    assert size <= most
    assert -(-length // size) == -(-length // most)


def test_row_tiles_of_a_compacted_class_loop():
  # 1/16 of the tokens, rounded up to a multiple of 8; and the class tile
  # for such rows: the step (4·r·c + 8·r·D + 12·D·c) within 31/32 of twice
  # the 16 MiB budget: (31 MiB − 8·512·256 B) / (4·512 + 12·256 B) = 6144,
  # so at most 6144 classes at N=8192, D=256, V=32768: six tiles, balanced
  # to 32768 / 6 = 5461.3 → 5464.
  assert tiling.row_tile(8192) == 512
  assert tiling.row_tile(1000) == 64  # 62.5 → 63 → 64
  assert tiling.row_tile(4) == 4
  assert tiling.row_tiled_class_tile(8192, 256, 32768, 512, None) == (
      5464, True)
  # N=32768, D=128: (31 MiB − 8·2048·128 B) / (4·2048 + 12·128 B) = 3125.9,
  # at most 3120: three tiles, 8192 / 3 = 2730.7 → 2736 (not a last tile
  # that recomputes 37% of the one before).
  assert tiling.row_tile(32768) == 2048
  assert tiling.row_tiled_class_tile(32768, 128, 8192, 2048, None) == (
      2736, True)
  assert tiling.row_tiled_class_tile(8192, 256, 32768, 512, 128) == (
      128, False)  # as asked


def test_tiles_overlap_at_the_end_without_padding():
  t = tiling.Tiles(10, 4)  # tiles at 0, 4 and 6 (not 8: it ends at 10)
  assert t.count == 3 and t.overlaps
  assert [int(t.start(j)) for j in range(3)] == [0, 4, 6]
  # The last tile's first two rows (6, 7) belong to the tile before.
  np.testing.assert_array_equal(t.own(2, t.start(2), (4,), 0),
                                [False, False, True, True])
  stacked = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7], [6, 7, 8, 9]])
  np.testing.assert_array_equal(t.untile(stacked), np.arange(10))
  assert not tiling.Tiles(8, 4).overlaps


@pytest.mark.parametrize("kept,runs", [(0, 0), (1, 1), (4, 1), (5, 2),
                                       (9, 3), (10, 3)])
def test_scan_runs_only_the_tiles_that_hold_kept_rows(kept, runs):
  # Tile j runs when j·size < kept: ⌈kept/size⌉ tiles. A skipped tile
  # leaves the carry and gives zeros.
  tiles = tiling.Tiles(10, 4)

  def body(count, j, start, own):
    del j, own
    return count + 1, (jnp.arange(4, dtype=jnp.int32) + start + 1).astype(
        jnp.float32)

  count, out = jax.jit(lambda k: tiling.scan_tokens(
      tiles, body, jnp.int32(0), kept=k))(jnp.int32(kept))
  assert int(count) == runs
  want = np.arange(1, 11, dtype=np.float32)  # every tile run
  if runs < 3:
    want[runs * 4:] = 0
  np.testing.assert_array_equal(out, want)


def test_compaction_puts_kept_tokens_first_in_order():
  keep = jnp.asarray([False, True, False, True, True, False])
  c = _compaction.Compaction.of(keep)
  np.testing.assert_array_equal(c.order, [1, 3, 4, 0, 2, 5])
  assert int(c.count) == 3
  x = jnp.arange(6.0) * 10
  np.testing.assert_array_equal(c.gather(x), [10, 30, 40, 0, 20, 50])
  np.testing.assert_array_equal(c.scatter(c.gather(x)), x)


def test_compaction_gradient_is_the_inverse_gather():
  keep = jnp.asarray([True, False, True, False, False, True, True])
  c = _compaction.Compaction.of(keep)
  weights = np.arange(1.0, 8.0)
  x = np.linspace(-1, 1, 7)

  def f(x):
    return jnp.sum(weights * c.gather(x) ** 2)

  # d/dx_i Σ_j w_j x_order[j]² = 2·w_back[i]·x_i
  order = np.asarray(c.order)
  back = np.argsort(order)
  np.testing.assert_allclose(jax.grad(f)(x), 2 * weights[back] * x)
  t = np.ones(7)
  np.testing.assert_allclose(jax.jvp(f, (x,), (t,))[1],
                             np.sum(2 * weights * x[order]))


def test_peak_bytes_by_hand():
  # Tokens: 8·c·V + 4·D·V + 4·N·D + 16·N.
  assert tiling.peak_bytes("tokens", 100, 8, 50, 10) == (
      8 * 10 * 50 + 4 * 8 * 50 + 4 * 100 * 8 + 16 * 100)
  # Reduced: 16·c·V; gathered out: + 8·N·D.
  assert tiling.peak_bytes("tokens", 100, 8, 50, 10, reduced=True,
                           compacted=True) == (
      16 * 10 * 50 + 4 * 8 * 50 + 4 * 100 * 8 + 16 * 100 + 8 * 100 * 8)
  # Classes: 8·r·c + 4·N·D + 4·D·V (+ 4·r·D for hᵀ, D ≤ c) + 16·N, and
  # in row tiles (r < N) 12·D·c for each class tile's dW share and 4·D·V
  # for the copy of W a row tile's cond passes on.
  assert tiling.peak_bytes("classes", 100, 8, 50, 10, rows=20) == (
      8 * 20 * 10 + 4 * 100 * 8 + 4 * 8 * 50 + 4 * 20 * 8 + 16 * 100
      + 12 * 8 * 10 + 4 * 8 * 50)
  assert tiling.peak_bytes("classes", 100, 16, 50, 10) == (
      8 * 100 * 10 + 4 * 100 * 16 + 4 * 16 * 50 + 16 * 100)
  assert tiling.peak_bytes("distillation", 100, 8, 50, 10, tiles=5) == (
      5 * 4 * 10 * 50 + 8 * 8 * 50 + 4 * 100 * 8 + 64 * 100)
  with pytest.raises(ValueError, match="unknown loop"):
    tiling.peak_bytes("rows", 1, 1, 1, 1)


def _conds(f, *args):
  jaxpr = jax.make_jaxpr(f)(*args)
  return [e for e in helpers.jaxpr_eqns(jaxpr.jaxpr)
          if e.primitive.name == "cond"]


@pytest.mark.parametrize("head", ["tokens", "classes", "distillation"])
def test_ignored_tokens_are_skipped_tile_by_tile(head):
  # The structure that makes ignored tokens cost nothing: a two-way cond
  # per tile (run it, or skip it) from 1024 tokens on, none without
  # ignore_index.
  n, d, v = 1024, 2, 6
  h, w = jnp.zeros((n, d)), jnp.zeros((d, v))
  y = jnp.zeros((n,), jnp.int32)

  def loss(h, w, **kw):
    if head == "distillation":
      return jsoft.linear_distillation_loss(h, w, h, w, labels=y,
                                            reduction="mean", **kw)
    return jsoft.linear_cross_entropy(h, w, y, tile_by=head,
                                      reduction="mean", **kw)

  grad = jax.grad(lambda h, w: loss(h, w, ignore_index=IGNORE))
  conds = _conds(grad, h, w)
  assert conds and all(len(e.params["branches"]) == 2 for e in conds)
  assert not _conds(jax.grad(loss), h, w)


@pytest.mark.parametrize("reduction,hard", [("mean", 0.4), ("none", 0.0)])
def test_distillation_with_ignored_tokens_gathered_out(reduction, hard):
  # From 1024 tokens on the kept tokens are gathered first and the tiles
  # past them skipped: value and student gradients equal the unfused
  # formulas in float64, the ignored tokens' NaN features included.
  n, d, v, chunk = 1100, 3, 40, 96
  r = np.random.default_rng(int(hard * 10) + len(reduction))
  hs, ws = r.normal(size=(n, d)), r.normal(size=(d, v))
  ht, wt = r.normal(size=(n, d + 1)), r.normal(size=(d + 1, v))
  y = r.integers(0, v, size=n)
  y[r.random(n) < 0.7] = IGNORE
  hs[y == IGNORE] = np.nan
  kept = y != IGNORE
  kw = dict(labels=y, ignore_index=IGNORE, hard_weight=hard,
            divergence="jsd", temperature=1.5, reduction=reduction)

  def fused(hs, ws):
    return jnp.sum(jsoft.linear_distillation_loss(hs, ws, ht, wt,
                                                  chunk_size=chunk, **kw))

  def unfused(hs, ws):
    s, t = hs @ ws, ht @ wt
    soft = helpers.jax_distill(s, t, divergence="jsd", temperature=1.5)
    ce = helpers.jax_ce_int(s, np.where(kept, y, 0))
    per = jnp.where(kept, (1 - hard) * soft + hard * ce, 0)
    return jnp.sum(per) / (float(kept.sum()) if reduction == "mean" else 1.0)

  safe = np.where(np.isnan(hs), 0, hs)
  got, want = (jax.value_and_grad(f, (0, 1)) for f in (fused, unfused))
  (value, grads), (ref, ref_grads) = got(hs, ws), want(safe, ws)
  np.testing.assert_allclose(value, ref, rtol=1e-12)
  for a, b in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
