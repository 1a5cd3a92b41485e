"""XLA's temp memory for every kernel the docs call lean.

These pin the spellings in ``jsoft/_spellings.py``: XLA keeps each pass over
the logits a fused loop only as long as no [N, C] value is shared between
passes, and a JAX upgrade that changes how it fuses would quietly bring an
[N, C] temporary back. XLA's compile-time figures are exact, so the bounds
are too. Compile only, float32, at two row counts: 4096 rows, from which XLA
CPU runs a chain of row reductions as one kernel, and 128 rows, below that.

"No [N, C] temp" is asserted as at most an eighth of one [N, C] float32
array (per-example vectors, a handful of them, are what remains).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jsoft
from jsoft import _compat, _loss_rule
from jsoft import _tiling as tiling
from tests import helpers

F32 = jnp.float32
int_ce = jsoft.softmax_cross_entropy_with_integer_labels
prob_ce = jsoft.softmax_cross_entropy
SHAPES = {"4096_rows": (4096, 256), "128_rows": (128, 2048)}
IGNORE = -100

pytestmark = helpers.needs_jax((0, 10, 2), "the spellings in "
                               "jsoft/_spellings.py are XLA's of that "
                               "release; older XLA keeps some [N, C] "
                               "temporaries, same values")


def _temp(f, *args):
  compiled = jax.jit(f).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def _lean(temp, n, c):
  assert temp <= 4 * n * c / 8, (
      f"XLA temp {temp} B holds an [N, C] array ({4 * n * c} B)")


def _inputs(n, c):
  x = jnp.zeros((n, c), F32)
  y = jnp.zeros((n,), jnp.int32)
  t = jnp.full((n, c), 1.0 / c, F32)
  return x, y, t


def _int_options(n, c):
  weights = jnp.linspace(0.5, 2.0, c, dtype=F32)
  rows = jnp.arange(n) % 3 != 0
  every = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-4,
               logit_soft_cap=30.0, class_weights=weights)
  return {
      "plain": {},
      "ignore_index": dict(ignore_index=IGNORE),
      "class_weights": dict(class_weights=weights),
      "label_smoothing": dict(label_smoothing=0.1),
      "z_loss": dict(z_loss=1e-4),
      "logit_soft_cap": dict(logit_soft_cap=30.0),
      "temperature": dict(temperature=2.0),
      "cap_and_temperature": dict(logit_soft_cap=30.0, temperature=0.7),
      "smoothing_and_cap": dict(label_smoothing=0.1, logit_soft_cap=30.0),
      "every_option": every,
      "every_option_mean": dict(every, reduction="mean"),
      "where_rows": dict(where=rows),
  }


INT_OPTIONS = list(_int_options(8, 8))
PROB_OPTIONS = {
    "plain": {},
    "z_loss": dict(z_loss=1e-4),
    "logit_soft_cap": dict(logit_soft_cap=30.0),
    "temperature": dict(temperature=2.0),
    "cap_and_temperature": dict(logit_soft_cap=30.0, temperature=0.7),
    "where_rows": "rows",
    "cap_z_loss_rows_mean": "all",
}


def _prob_kwargs(name, n):
  kw = PROB_OPTIONS[name]
  rows = jnp.arange(n) % 3 != 0
  if kw == "rows":
    return dict(where=rows)
  if kw == "all":
    return dict(z_loss=1e-4, logit_soft_cap=30.0, where=rows,
                reduction="mean")
  return kw


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", INT_OPTIONS)
def test_integer_labels_forward_and_gradient_hold_no_nc_temp(shape, option):
  n, c = SHAPES[shape]
  x, y, _ = _inputs(n, c)
  kw = _int_options(n, c)[option]

  def loss(x):
    return jnp.sum(int_ce(x, y, **kw))

  _lean(_temp(loss, x), n, c)
  _lean(_temp(jax.value_and_grad(loss), x), n, c)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", PROB_OPTIONS)
def test_probability_labels_hold_no_nc_temp(shape, option):
  n, c = SHAPES[shape]
  x, _, t = _inputs(n, c)
  kw = _prob_kwargs(option, n)

  def loss(x, t):
    return jnp.sum(prob_ce(x, t, **kw))

  _lean(_temp(loss, x, t), n, c)
  _lean(_temp(jax.value_and_grad(loss), x, t), n, c)
  _lean(_temp(jax.value_and_grad(loss, argnums=(0, 1)), x, t), n, c)


@pytest.mark.parametrize("shape", SHAPES)
def test_label_smoothing_of_probability_targets_forward(shape):
  # The forward is lean; differentiated, the smoothed target is stored
  # once (docs/design/xla_and_memory.md: the pins).
  n, c = SHAPES[shape]
  x, _, t = _inputs(n, c)

  def loss(x, t):
    return jnp.sum(prob_ce(x, t, label_smoothing=0.1))

  _lean(_temp(loss, x, t), n, c)
  assert _temp(jax.value_and_grad(loss), x, t) <= 1.25 * 4 * n * c


def test_16bit_probability_targets_are_read_at_their_own_width():
  # A bfloat16 target stays bfloat16 into the one-pass forward and its
  # NaN fallback (jsoft._targets.narrow_float): converted first, the
  # fallback's operands held a float32 copy of it too, two [N, C] float32
  # arrays in all at 4096 rows (measured: 2.01), not one.
  n, c = SHAPES["4096_rows"]
  x = jnp.zeros((n, c), jnp.bfloat16)
  assert _temp(prob_ce, x, x) <= 1.05 * 4 * n * c


def test_16bit_one_pass_forward_stores_the_shifted_logits_once():
  # Below 4096 rows XLA CPU splits the one-pass forward's chain
  # (jsoft._loss_rule.direct_loss), and 16-bit logits are converted to
  # float32 once, into an array both later passes read. The max reads the
  # logits at their own width, and that array is x − c itself, not x
  # (which each pass then shifted again): read at 1024×1000, 18 bytes a
  # logit in all (by XLA's cost analysis), 20.04 before.
  # One flop a logit fewer too: 8, from 9.
  n, c = 1024, 1000
  cost = _direct_cost(jnp.bfloat16, n, c)
  assert cost["bytes accessed"] <= 18.1 * n * c
  assert cost["flops"] <= 8.01 * n * c


def _cost(f, *args):
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


def test_integer_label_forward_reads_the_label_logit_after_the_sums():
  # Without a gradient no e^z is written over the logits, so the forward's
  # shift is not spelled to read the label's logit first
  # (jsoft._spellings.after_label): that order cost the forward at
  # 1024×1000 float32 852 µs against 661 (2-core AMD EPYC), and held the
  # gathered logits across the exp pass, one [N] vector more of temp.
  n, c = 1024, 1000
  x, y = jnp.zeros((n, c), F32), jnp.zeros((n,), jnp.int32)
  assert _temp(int_ce, x, y) <= 4 * n  # the row sums; before: 8 * n


def test_16bit_integer_label_max_reads_the_logits_at_their_width():
  # The row max of 16-bit logits is taken at their width
  # (jsoft._loss_rule.block_max), so the float32 conversion XLA stores is
  # read by one pass, not two: at 1024×1000 bfloat16 the forward reads
  # 14.4 bytes a logit (16.4 before), the step 20.6 (28.8).
  n, c = 1024, 1000
  x, y = jnp.zeros((n, c), jnp.bfloat16), jnp.zeros((n,), jnp.int32)
  assert _cost(int_ce, x, y)["bytes accessed"] <= 14.5 * n * c
  step = jax.value_and_grad(lambda x, y: jnp.mean(int_ce(x, y)))
  assert _cost(step, x, y)["bytes accessed"] <= 20.7 * n * c


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_16bit_softmax_max_reads_the_input_at_its_width(fn):
  # softmax and log_softmax of 16-bit x take the row max at x's width
  # (jsoft._softmax._shift), not over a float32 conversion of x. XLA CPU
  # runs the large call as one kernel either way, but the wider max read
  # cost it: at 4096×4096 bfloat16 jax.nn's softmax took 0.93 of jsoft's
  # time before, 1.00 after (2-core Intel Xeon). Checked in the program:
  # every max over the [N, C] input, forward and backward, reads bfloat16.
  n, c = 4, 5
  x = jnp.zeros((n, c), jnp.bfloat16)
  f = getattr(jsoft, fn)
  step = jax.value_and_grad(lambda x: jnp.sum(f(x).astype(F32)))
  for g in (f, step):
    jaxpr = jax.make_jaxpr(g)(x)
    maxes = [e.invars[0].aval.dtype for e in helpers.jaxpr_eqns(jaxpr.jaxpr)
             if e.primitive.name in ("reduce", "reduce_max")
             and e.invars[0].aval.shape == (n, c)]
    assert maxes and all(d == jnp.bfloat16 for d in maxes), maxes


def test_long_log_softmax_forms_x_minus_m_again_in_its_last_pass():
  # Over 2^22 entries below 4096 rows XLA CPU runs log_softmax as passes
  # bound by memory; the last one reads x again rather than the stored
  # x − m, a barrier keeping XLA from merging the two
  # (jsoft._spellings.rereads_input). jax.nn's time ÷ jsoft's, float32
  # forward, 2-core Intel Xeon: 1024×8192 0.99 → 1.11–1.21, 2048×32000
  # 1.00 → 1.04–1.07; bfloat16 forward 2048×32000 1.21 → 2.09. A
  # float32 step keeps the stored x − m (with the barrier 1.19 → 1.03 at
  # 2048×32000); a bfloat16 step reads x again (1.47 → 1.71). Pinned in the
  # program, with no [N, C] temp (jax 0.4.38 cannot differentiate the
  # barrier: none there).
  on = 1 if _compat._barrier_differentiable() else 0

  def barriers(f, x, **kw):
    jaxpr = jax.make_jaxpr(lambda x: f(x, **kw))(x).jaxpr
    return sum(e.primitive.name == "optimization_barrier"
               for e in helpers.jaxpr_eqns(jaxpr))

  def step(x, **kw):
    return jax.value_and_grad(
        lambda x: jnp.sum(jsoft.log_softmax(x, **kw).astype(F32)))(x)

  long = jnp.zeros((1024, 4097), F32)
  assert barriers(jsoft.log_softmax, long) == on
  assert barriers(jsoft.log_softmax, long.astype(jnp.bfloat16)) == on
  assert barriers(jsoft.log_softmax, jnp.zeros((1024, 4096), F32)) == 0
  assert barriers(jsoft.log_softmax, jnp.zeros((4096, 1025), F32)) == 0
  assert barriers(jsoft.log_softmax, long,
                  where=jnp.ones(long.shape, bool)) == 0
  assert barriers(step, long) == 0
  assert barriers(step, long.astype(jnp.bfloat16)) == on
  _lean(_temp(jsoft.log_softmax, long), *long.shape)


def _direct_cost(dtype, n, c):
  """XLA's cost analysis of the one-pass forward alone (no fallback)."""
  def fast(x, t):
    target = _loss_rule.Target(None, 0.0, jnp.sum(t.astype(F32), -1), 1.0,
                               None, None, None)
    return _loss_rule.direct_loss(None, _loss_rule.Block(x, None, 0, t),
                                  target, 0.0)

  x = jnp.zeros((n, c), dtype)
  return _cost(fast, x, x)


@pytest.mark.parametrize("labels", ["integer", "probability"])
def test_small_step_stays_under_xla_cpus_inline_cost(labels):
  # XLA CPU runs a program of under 1000 flops (its cost analysis; exp and
  # log do not count) on the calling thread and dispatches a larger one to
  # its thread pool, which costs a tiny step several times its work. At
  # 8×10, 2-core AMD EPYC: the integer-label step took 0.11 ms against
  # optax's 0.03 ms at 1104 flops, before the label term's spelling for
  # the rule's transpose (jsoft._loss_rule.block_grad) brought it to 944;
  # the probability-label step 28.7 µs a call against optax's 16.4 at
  # 1424 flops, before jsoft._spellings.dense_sum's select and
  # inline_mass brought it to 984.
  x = jnp.zeros((8, 10), F32)
  if labels == "integer":
    other, ce = jnp.zeros((8,), jnp.int32), int_ce
  else:
    other, ce = jnp.full((8, 10), 0.1, F32), prob_ce

  def loss(x, other):  # as optax's users write it
    return jnp.mean(ce(x, other))

  assert _cost(jax.value_and_grad(loss), x, other)["flops"] < 1000


def test_small_binary_forward_stays_under_xla_cpus_inline_cost():
  # As above: at 8×10 the forward was 1760 flops (optax's 1440), both on
  # the thread pool, and timed 0.58–0.99× optax from run to run (2-core
  # AMD EPYC); the select spelling for small calls is 800.
  x = jnp.zeros((8, 10), F32)
  assert _cost(jsoft.sigmoid_binary_cross_entropy, x, x)["flops"] < 1000


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax", "logsumexp"])
def test_activations_forward_holds_no_nc_temp(shape, fn):
  n, c = SHAPES[shape]
  x, _, _ = _inputs(n, c)
  _lean(_temp(lambda x: getattr(jsoft, fn)(x, axis=-1), x), n, c)


def test_binary_forward_takes_fifteen_flops_an_element():
  # Past 128 elements the loss is spelled on the clamped logit with one
  # overflow term (jsoft._binary_cross_entropy._loss): 15 flops an element
  # by XLA's cost analysis, where two capped softplus terms took 22 and
  # optax takes 18. At 1024×1000 float32 that put the forward at optax's
  # time or better where 22 read 0.89–0.95× (2-core Intel Xeon).
  n, c = 1024, 1000
  x = jnp.zeros((n, c), F32)
  flops = _cost(jsoft.sigmoid_binary_cross_entropy, x, x)["flops"]
  assert flops <= 15.01 * n * c


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pos_weight", [None, 2.0])
def test_binary_cross_entropy_forward_holds_no_nc_temp(shape, pos_weight):
  # A reduction of the loss runs as one YNNPACK fusion on XLA CPU; an op
  # it does not take (a clamp, a select) is computed before it, into an
  # [N, C] temp (jsoft._binary_cross_entropy._loss).
  n, c = SHAPES[shape]
  x, _, t = _inputs(n, c)
  _lean(_temp(lambda x, t: jnp.sum(jsoft.sigmoid_binary_cross_entropy(
      x, t, pos_weight=pos_weight)), x, t), n, c)


LM_HEAD = {  # option: how many [N, V] float32 arrays the step may hold
    "plain": ({}, 1),
    "ignore_index": (dict(ignore_index=IGNORE), 1),
    "z_loss": (dict(z_loss=1e-4), 1),
    "label_smoothing": (dict(label_smoothing=0.1), 2),
    "logit_soft_cap": (dict(logit_soft_cap=30.0), 2),
    "every_option": (dict(ignore_index=IGNORE, label_smoothing=0.1,
                          z_loss=1e-4, logit_soft_cap=30.0), 2),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", LM_HEAD)
def test_lm_head_step_writes_the_gradient_over_the_logits(shape, option):
  # value_and_grad of the mean of CE(h @ W) w.r.t. W: the logits are the
  # one [N, V] buffer (optax's step holds two), with smoothing or the cap
  # one more.
  n, v = SHAPES[shape]
  kw, arrays = LM_HEAD[option]
  h = jnp.zeros((n, 64), F32)
  w = jnp.zeros((64, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def step(w):
    return jax.value_and_grad(
        lambda w: int_ce(h @ w, y, reduction="mean", **kw))(w)

  # (and h's transpose, [D, N], for dW = hᵀ g)
  assert _temp(step, w) <= (arrays + 0.125) * 4 * n * v + 4 * n * 64


def _fused_bound(n, d, v, chunk, compacted=False, scalar=False,
                 by_tokens=None):
  """linear_cross_entropy's documented bound (jsoft._tiling.peak_bytes):
  ``scalar``, differentiated and reduced to a scalar (over tiles of tokens,
  the gradients formed in the forward pass); ``compacted``, ignored tokens
  gathered out (from 1024 tokens on; over classes, in row tiles).
  ``by_tokens``: the loop (None: the default, tokens when N ≥ V)."""
  if n >= v if by_tokens is None else by_tokens:
    return tiling.peak_bytes("tokens", n, d, v, chunk, compacted=compacted,
                             reduced=scalar)
  rows = tiling.row_tile(n) if compacted else None
  return tiling.peak_bytes("classes", n, d, v, chunk, rows=rows,
                           compacted=compacted)


FUSED = {  # (N, D, V, chunk): both loop orders, padded tiles
    "tokens": (2048, 64, 512, 128),
    "tokens_padded": (2000, 64, 512, 128),
    "classes": (256, 64, 8192, 512),
    "classes_padded": (256, 64, 8000, 512),
}


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("every_option", [False, True])
def test_fused_head_within_its_documented_bound(name, every_option):
  n, d, v, chunk = FUSED[name]
  kw = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-4,
            logit_soft_cap=30.0) if every_option else {}
  h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def loss(h, w):
    return jsoft.linear_cross_entropy(h, w, y, chunk_size=chunk,
                                      reduction="mean", **kw)

  compacted = every_option and n >= 1024
  assert _temp(loss, h, w) <= _fused_bound(n, d, v, chunk, compacted)
  assert _temp(jax.value_and_grad(loss, argnums=(0, 1)), h, w) <= (
      _fused_bound(n, d, v, chunk, compacted, scalar=True))


ROW_TILED = {  # (N, D, V, chunk): ignored tokens gathered out, class loop
    "default_tile": (2048, 64, 8192, None),
    "small_tile": (2048, 64, 8192, 512),
    "overlapping_tile": (1024, 64, 4000, 512),
}


@pytest.mark.parametrize("name", ROW_TILED)
def test_row_tiled_class_loop_within_its_documented_bound(name):
  # From 1024 tokens on, with ignore_index, the class loop runs in row
  # tiles: each row tile's cond, split in two when differentiated, passes a
  # copy of W from one half to the other. Small tiles went over a bound
  # without it (6.07 MB against 5.00 at 2048×64×8192 in tiles of 512).
  n, d, v, chunk = ROW_TILED[name]
  h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def loss(h, w):
    return jsoft.linear_cross_entropy(h, w, y, chunk_size=chunk,
                                      ignore_index=IGNORE, tile_by="classes",
                                      reduction="mean")

  c = chunk or tiling.row_tiled_class_tile(n, d, v, tiling.row_tile(n),
                                           None)[0]
  bound = _fused_bound(n, d, v, c, compacted=True, by_tokens=False)
  assert _temp(loss, h, w) <= bound
  assert _temp(jax.value_and_grad(loss, argnums=(0, 1)), h, w) <= bound


@pytest.mark.parametrize("name", ROW_TILED)
def test_row_tiles_cost_the_class_loop_no_copy_of_dw(name):
  # The row tiles add each class tile's dW share to the columns the row
  # tiles before wrote. Spelled as an update of the slice plus the share,
  # the backward pass (transposed twice in reverse mode) copied dW twice
  # per tile: 1.93 MB more temp than without ignore_index at 2048×64×8192,
  # 0.39 MB at 1024×64×4000. As a scatter-add (jsoft._tiling.add_at) the
  # two differ by less than the gathered features (4·N·D).
  n, d, v, chunk = ROW_TILED[name]
  h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def step(**ignore):
    def loss(h, w):
      return jsoft.linear_cross_entropy(h, w, y, chunk_size=chunk,
                                        tile_by="classes", reduction="mean",
                                        **ignore)
    return jax.value_and_grad(loss, argnums=(0, 1))

  plain = _temp(step(), h, w)
  assert _temp(step(ignore_index=IGNORE), h, w) <= plain + 4 * n * d


def test_default_tile_keeps_the_fused_head_under_a_sixteenth():
  n, d, v = 8192, 64, 8192
  h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def loss(h, w):
    return jsoft.linear_cross_entropy(h, w, y, reduction="mean")

  chunk = tiling.token_tile(n, v)
  temp = _temp(jax.value_and_grad(loss, argnums=(0, 1)), h, w)
  assert temp <= _fused_bound(n, d, v, chunk, scalar=True)
  assert temp <= 4 * n * v / 16


def test_default_class_tile_below_its_cap_within_its_bound():
  # Below the class budget's cap (N·V < 2^26) the default step is sized
  # from 1/16 of the logits' bytes (jsoft._tiling.BUDGETS), its tile at
  # least 4 MiB of them (MIN_CLASS_TILE_BYTES): 1024 classes here, where
  # the unfused loss's float32 logits alone are 32 MiB; the temp at most
  # a quarter of them (5.5 MiB, measured).
  n, d, v = 1024, 128, 8192
  h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def loss(h, w):
    return jsoft.linear_cross_entropy(h, w, y, reduction="mean")

  chunk = tiling.class_tile(n, d, v, None)[0]
  temp = _temp(jax.value_and_grad(loss, argnums=(0, 1)), h, w)
  assert temp <= _fused_bound(n, d, v, chunk, scalar=True)
  assert temp <= 4 * n * v / 4


def test_reduced_token_head_holds_no_transposed_weight():
  # Each tile's dh = g·Wᵀ is one product contracting both operands' last
  # axes (jsoft._compat.matmul_t). Spelled g @ W.T, XLA kept Wᵀ as an array
  # of its own beside dW here: 68.0 MiB against a bound of 41.0 (36.0 now).
  n, d, v = 1024, 256, 32768
  h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def loss(h, w):
    return jsoft.linear_cross_entropy(h, w, y, reduction="mean",
                                      tile_by="tokens")

  chunk = tiling.token_tile(n, v)
  temp = _temp(jax.value_and_grad(loss, argnums=(0, 1)), h, w)
  assert temp <= _fused_bound(n, d, v, chunk, scalar=True, by_tokens=True)
  assert temp < 4 * d * v * 2  # dW, and no second [D, V] array


def test_overlapping_class_tile_costs_no_more_than_one_that_divides():
  # Where the class tile does not divide V the last tile overlaps the one
  # before: its columns are masked by a bias that fuses into the passes
  # (a masked copy of the tile would add 4·N·c in the forward pass and the
  # dW accumulation a copy of dW in the backward).
  n, d, c = 8192, 64, 512
  y = jnp.zeros((n,), jnp.int32)

  def step_temp(v):
    h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
    return _temp(jax.value_and_grad(
        lambda h, w: jsoft.linear_cross_entropy(h, w, y, reduction="mean",
                                                chunk_size=c),
        argnums=(0, 1)), h, w)

  assert step_temp(32000) <= step_temp(32768) + 4 * d * c


# The LM head's two memory targets at N=8192, D=256, V=32768 (compile
# only), against the unfused loss's [N, V] float32 logits: the default
# tiles (over classes there, hᵀ kept) within 1/32, and 512-token tiles
# with the gradients formed in the forward pass within 1/4.
@pytest.mark.parametrize("tile_by,chunk,share", [(None, None, 32),
                                                 ("tokens", 512, 4)])
def test_lm_head_tiles_within_their_share_of_the_unfused_loss(tile_by, chunk,
                                                              share):
  n, d, v = 8192, 256, 32768
  h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def loss(h, w):
    return jsoft.linear_cross_entropy(h, w, y, reduction="mean",
                                      tile_by=tile_by, chunk_size=chunk)

  temp = _temp(jax.value_and_grad(loss, argnums=(0, 1)), h, w)
  by_tokens = tile_by == "tokens"
  length, other = (n, v) if by_tokens else (v, n)
  c = chunk or tiling.class_tile(n, d, v, None)[0]
  assert temp <= _fused_bound(n, d, v, c, scalar=True, by_tokens=by_tokens)
  assert temp <= 4 * n * v / share


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
def test_sharded_fused_head_per_device_within_its_bound():
  n, d, v, chunk, shards = 512, 32, 8 * 1024, 256, 8
  mesh = Mesh(np.array(jax.devices()[:shards]), ("tp",))
  h, w = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def loss(h, w, y):
    return jsoft.linear_cross_entropy(h, w, y, chunk_size=chunk,
                                      axis_name="tp", reduction="sum")

  step = jax.value_and_grad(
      helpers.shard_map(loss, mesh=mesh,
                        in_specs=(P(), P(None, "tp"), P()), out_specs=P()),
      argnums=(0, 1))
  assert _temp(step, h, w, y) <= _fused_bound(n, d, v // shards, chunk)


def _distill_bound(n, d, v, chunk, tiles, compacted=False):
  """linear_distillation_loss's documented bound (jsoft._tiling.peak_bytes)
  with ``tiles`` float32 tiles of logits; ``compacted``: ignored tokens
  gathered out (labels with ignore_index, from 1024 tokens on)."""
  return tiling.peak_bytes("distillation", n, d, v, chunk, tiles=tiles,
                           compacted=compacted)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("hard", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_distillation_within_its_documented_bound(kind, hard,
                                                        reduction):
  n, d, v, chunk = 2000, 64, 4096, 128  # the last tile overlaps
  hs, ws = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  ht, wt = jnp.zeros((n, d + 16), F32), jnp.zeros((d + 16, v), F32)
  y = jnp.zeros((n,), jnp.int32)

  def loss(hs, ws):
    return jnp.sum(jsoft.linear_distillation_loss(
        hs, ws, ht, wt, labels=y, ignore_index=IGNORE, hard_weight=hard,
        divergence=kind, temperature=2.0, chunk_size=chunk,
        reduction=reduction))

  bound = _distill_bound(n, d, v, chunk, 12, compacted=True)
  assert _temp(loss, hs, ws) <= bound
  assert _temp(jax.value_and_grad(loss, argnums=(0, 1)), hs, ws) <= bound


def test_fused_distillation_default_under_a_sixteenth_of_unfused():
  n, d, v = 4096, 64, 8192
  hs, ws = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)
  ht, wt = jnp.zeros((n, d), F32), jnp.zeros((d, v), F32)

  def fused(hs, ws):
    return jsoft.linear_distillation_loss(hs, ws, ht, wt, reduction="mean")

  def unfused(hs, ws):
    return jsoft.distillation_loss(hs @ ws, ht @ wt, reduction="mean")

  temp = _temp(jax.value_and_grad(fused, argnums=(0, 1)), hs, ws)
  chunk = tiling.token_tile(n, v, "distillation")
  assert temp <= _distill_bound(n, d, v, chunk, 5)
  assert temp <= _temp(jax.value_and_grad(unfused, argnums=(0, 1)), hs,
                       ws) / 16
