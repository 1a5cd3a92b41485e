r"""``linear_distillation_loss``: distillation between two LM heads without
either head's logits.

A student head ``s = h_s W_s + b_s`` and a teacher head ``t = h_t W_t +
b_t`` are streamed through the same tiles of tokens: each tile makes both
tiles of logits ``[c, V]``, the row rule of :mod:`jsoft._distillation`
(plus, with ``hard_weight``, the hard-label cross-entropy) gives each
token's loss and the ``y − t`` gradient tile ``g`` of the student's logits,
which is folded into ``dh_s = g W_sᵀ``, ``dW_s += h_sᵀ g`` and
``db_s += Σ g`` (float32) while the tile is at hand. The teacher gets no
gradient and no matmul is spent on one.

Three drivers around that one rule:

* reduced to a scalar (``"sum"``, ``"mean"``): the gradient tiles are formed
  in the forward pass, scaled by each token's known coefficient, and the
  backward pass only scales the folded gradients by the incoming cotangent
  — the same four matmuls per tile as the unfused loss's forward and
  backward (:func:`_scalar_loss`);
* per token (``"none"``): the backward pass recomputes both tiles of
  logits and forms ``g`` from the per-token cotangents (:func:`_token_loss`);
* vocabulary-parallel (``axis_name``): the rule's row sums cross devices as
  plain JAX collectives inside each tile, and JAX differentiates the tile
  (rematerialised in the backward pass), which keeps every autodiff mode
  and both ``shard_map`` modes exact (:func:`_sharded_loss`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import (
  _checks,
  _collectives,
  _compat,
  _distillation,
  _fused,
  _options,
  _rules,
)
from jsoft._distillation import Divergence, RowStats
from jsoft._softmax import mass, nan_where, row_shift

# Default tile: one float32 [c, V] tile of logits of 1/32 of a head's
# logits, between 1 and 16 MiB (a tile holds three such buffers: both heads'
# logits and the gradient).
TILE_BYTES = 16 * 2**20
MIN_TILE_BYTES = 2**20


class Head(NamedTuple):
  """The fused loop's configuration, fixed at compile time."""
  div: Divergence
  hard: float  # α: the hard-label cross-entropy's weight
  chunk: int  # tokens per tile
  vocab: int  # this device's classes
  axis_name: Any  # the mesh axis the classes are split over


class TileStats(NamedTuple):
  """Per token, what its gradient tile needs besides its logits."""
  rows: RowStats
  lse_hard: jax.Array | None  # logsumexp(s) for the hard loss (T ≠ 1)


class Grads(NamedTuple):
  hidden: jax.Array  # [N, D_s]
  weight: jax.Array  # [D_s, V]
  bias: jax.Array | None  # [V]


def default_chunk(n: int, vocab: int) -> int:
  """Tokens per tile: a float32 tile of 1/32 of the logits, clamped to
  [1, 16] MiB, a multiple of 8 when possible, at most ``n``."""
  budget = min(TILE_BYTES, max(MIN_TILE_BYTES, 4 * n * vocab // 32))
  chunk = max(1, budget // (4 * max(vocab, 1)))
  if chunk >= 8:
    chunk -= chunk % 8
  return max(1, min(chunk, n))


# ------------------------------------------------------------ the tile rule


def _label_logit(s: jax.Array, label: jax.Array, first: Any) -> tuple[
    jax.Array, jax.Array]:
  """``s_y`` where the label is one of this block's classes (else 0), and
  whether it is."""
  local = label - first
  here = (local >= 0) & (local < s.shape[-1])
  at = jnp.clip(local, 0, s.shape[-1] - 1)[:, None]
  return jnp.where(here, jnp.take_along_axis(s, at, axis=-1)[:, 0], 0), here


def _scaled(head: Head, s: jax.Array, t: jax.Array):
  """``s/T`` and ``t/T`` (the teacher a constant)."""
  temp = head.div.temperature
  return (_distillation.scaled(s, None, temp, s.dtype),
          _distillation.scaled(lax.stop_gradient(t), None, temp, t.dtype))


def _tile_loss(head: Head, s, t, label, keep, invalid):
  """Each token's loss ``α·CE(s, y) + (1 − α)·D`` (0 where not ``keep``)
  from its whole rows of logits, and its :class:`TileStats`."""
  d, rows = _distillation.row_stats(head.div, *_scaled(head, s, t))
  loss, lse_hard = (1 - head.hard) * d, None
  if head.hard:
    lse_hard = (rows.lse_s if head.div.temperature == 1.0
                else _distillation.lse(s)[0])
    loss = loss + head.hard * (lse_hard - _label_logit(s, label, 0)[0])
    loss = loss + nan_where(invalid, loss.dtype)
  return jnp.where(keep, loss, 0), TileStats(rows, lse_hard)


def _tile_grad(head: Head, s, t, label, stats: TileStats, k, invalid):
  """The gradient tile of ``Σ k·loss`` with respect to the student's logits:
  ``(1 − α)·k·(φ₁ − p_s Σφ₁)/T + α·k·(softmax(s) − onehot(y))``."""
  g = _distillation.row_grad(head.div, *_scaled(head, s, t), stats.rows,
                             (1 - head.hard) * k)
  if head.hard:
    k_hard = head.hard * k + nan_where(invalid, k.dtype)
    onehot = lax.broadcasted_iota(jnp.int32, s.shape, 1) == label[:, None]
    g = g + k_hard[:, None] * (jnp.exp(s - stats.lse_hard[:, None])
                               - onehot.astype(s.dtype))
  return g


def _logits(h, w, b, start, chunk):
  return _fused._tile_logits(lax.dynamic_slice_in_dim(h, start, chunk), w, b)


def _rows(x, start, chunk):
  return None if x is None else lax.dynamic_slice_in_dim(x, start, chunk)


class Inputs(NamedTuple):
  hs: jax.Array  # [N, D_s] student features
  ws: jax.Array  # [D_s, V]
  bs: jax.Array | None  # [V]
  ht: jax.Array  # [N, D_t] teacher features (a constant)
  wt: jax.Array  # [D_t, V]
  bt: jax.Array | None
  label: jax.Array  # [N] int32 (0 where ignored)
  keep: jax.Array  # [N] bool: tokens with a loss
  invalid: jax.Array  # [N] bool: a label out of range (hard loss only)


def _tiles(head: Head, x: Inputs, body, init, remat: bool = False):
  """Runs ``body(carry, tile, own)`` over the tiles of tokens, where
  ``tile`` is ``(start, s, t, label, keep, invalid)`` and ``own`` marks the
  rows that are the tile's own (the last tile may overlap the one before).
  Returns the final carry and the per-token outputs, untiled. With
  ``remat``, differentiating the loop recomputes each tile (logits
  included) instead of storing it."""
  n, c = x.hs.shape[0], head.chunk
  count, start_of = _fused._tile_starts(n, c)

  def step(carry, j):
    start = start_of(j)
    s = _logits(x.hs, x.ws, x.bs, start, c)
    t = _logits(x.ht, x.wt, x.bt, start, c)
    own = _fused._own(j, start, c, (c,), 0) if n % c else True
    tile = (start, s, t, *(_rows(v, start, c)
                           for v in (x.label, x.keep, x.invalid)))
    return body(carry, tile, own)

  carry, stacked = lax.scan(jax.checkpoint(step) if remat else step, init,
                            jnp.arange(count, dtype=jnp.int32))
  return carry, jax.tree.map(lambda v: _fused._untile(v, n, c), stacked)


def _fold(x: Inputs, g, start, chunk, dw, db):
  """``g``'s share of ``dh`` (returned), ``dW`` and ``db`` (accumulated)."""
  h_t = lax.dynamic_slice_in_dim(x.hs, start, chunk)
  acc = dw.dtype
  g_in = g.astype(x.hs.dtype)
  dh_t = _compat.matmul(g_in, x.ws.T, acc)
  dw = dw + _fused.weight_grad(h_t, g_in, acc)
  if db is not None:
    db = db + jnp.sum(g, axis=0)
  return dh_t, dw, db


def _zeros(shape, acc, *like):
  """A zero accumulator typed to vary like ``like`` inside ``shard_map``
  (a scan carry keeps one type; see :mod:`jsoft._collectives`)."""
  return _collectives.varying_like(jnp.zeros(shape, acc), *like)


def _grad_init(x: Inputs, acc, *like):
  return (_zeros(x.ws.shape, acc, *x, *like),
          None if x.bs is None else _zeros(x.bs.shape, acc, *x, *like))


def _cast(x: Inputs, dh, dw, db) -> Grads:
  """The gradients in the inputs' dtypes, each summed over the mesh axes
  its input is replicated on."""
  def back(g, primal):
    return _collectives.summed_like(g, primal).astype(primal.dtype)

  return Grads(back(dh, x.hs), back(dw, x.ws),
               None if db is None else back(db, x.bs))


def _no_teacher(grads: Grads) -> tuple[Any, ...]:
  """Cotangents for :class:`Inputs`: the student's, nothing else."""
  return (*grads, None, None, None, None, None, None)


# ----------------------------------------------------- reduced to a scalar


def _scalar_fwd(head: Head, coef, *inputs):
  x = Inputs(*inputs)
  acc = _checks.compute_dtype(x.hs.dtype)

  def body(carry, tile, own):
    total, dw, db = carry
    start, s, t, label, keep, invalid = tile
    k = jnp.where(own & keep, lax.dynamic_slice_in_dim(coef, start,
                                                        head.chunk), 0)
    loss, stats = _tile_loss(head, s, t, label, keep, invalid)
    g = _tile_grad(head, s, t, label, stats, k, invalid)
    dh_t, dw, db = _fold(x, g, start, head.chunk, dw, db)
    return (total + jnp.sum(k * loss), dw, db), dh_t

  init = (_zeros((), acc, *x, coef), *_grad_init(x, acc, coef))
  (total, dw, db), dh = _tiles(head, x, body, init)
  # The folded gradients stay per device: the backward pass scales them by
  # each device's cotangent, then sums them (_cast).
  return total, ScalarResiduals(x, Grads(dh, dw, db))


class ScalarResiduals(NamedTuple):
  inputs: Inputs
  grads: Grads  # for a unit cotangent, float32, per device


def _scalar_bwd(head, res: ScalarResiduals, ct):
  del head

  def scaled(g):
    return None if g is None else ct.astype(g.dtype) * g

  return (None, *_no_teacher(_cast(res.inputs,
                                   *map(scaled, res.grads))))


def _scalar_fun(head, coef, *inputs):
  # Not differentiated: the loss alone (two matmuls per tile).
  return jnp.sum(coef * _token_fwd(head, *inputs)[0])


_scalar = _rules.vjp_rule(_scalar_fun, _scalar_fwd, _scalar_bwd)


# --------------------------------------------------------------- per token


class TokenResiduals(NamedTuple):
  inputs: Inputs
  stats: TileStats  # per token


def _token_fwd(head: Head, *inputs):
  x = Inputs(*inputs)

  def body(_, tile, own):
    del own
    _, s, t, label, keep, invalid = tile
    return None, _tile_loss(head, s, t, label, keep, invalid)

  _, (loss, stats) = _tiles(head, x, body, None)
  # Typed to vary like every input, so cotangents arrive per device.
  loss = _collectives.varying_like(loss, *x)
  return loss, TokenResiduals(x, stats)


def _token_bwd(head: Head, res: TokenResiduals, ct):
  x = res.inputs
  acc = _checks.compute_dtype(x.hs.dtype)

  def body(carry, tile, own):
    dw, db = carry
    start, s, t, label, keep, invalid = tile
    k = jnp.where(own & keep, _rows(ct, start, head.chunk), 0)
    stats = jax.tree.map(lambda v: _rows(v, start, head.chunk), res.stats)
    g = _tile_grad(head, s, t, label, stats, k, invalid)
    dh_t, dw, db = _fold(x, g, start, head.chunk, dw, db)
    return (dw, db), dh_t

  (dw, db), dh = _tiles(head, x, body, _grad_init(x, acc, ct), remat=True)
  return _no_teacher(_cast(x, dh, dw, db))


def _token_fun(head, *inputs):
  return _token_fwd(head, *inputs)[0]


_token = _rules.vjp_rule(_token_fun, _token_fwd, _token_bwd)


# -------------------------------------------------------- vocabulary-parallel


def _sharded_lse(x: jax.Array, ax: Any) -> tuple[jax.Array, jax.Array]:
  """:func:`jsoft._distillation.lse` of rows split over the mesh axis."""
  c = _collectives.pmax(row_shift(x, (-1,))[..., 0], ax)
  s = lax.psum(jnp.sum(jnp.exp(x - c[:, None]), axis=-1), ax)
  return c + jnp.log(mass(s)), s >= 1


def _sharded_tile_loss(head: Head, s, t, label, keep, invalid):
  """:func:`_tile_loss` with each token's row split over ``head.axis_name``:
  the max, the sums and the label's logit cross devices (plain JAX, so JAX
  differentiates them)."""
  ax = head.axis_name
  s_t, t_t = _scaled(head, s, t)
  (lse_s, _), (lse_t, _) = _sharded_lse(s_t, ax), _sharded_lse(t_t, ax)
  terms = _distillation.terms(head.div, s_t - lse_s[:, None],
                              t_t - lse_t[:, None])
  loss = (1 - head.hard) * lax.psum(jnp.sum(terms, axis=-1), ax)
  if head.hard:
    lse_hard = lse_s if head.div.temperature == 1.0 else _sharded_lse(s, ax)[0]
    first = lax.axis_index(ax) * head.vocab
    x_label = lax.psum(_label_logit(s, label, first)[0], ax)
    loss = loss + head.hard * (lse_hard - x_label) + nan_where(invalid,
                                                               loss.dtype)
  return jnp.where(keep, loss, 0)


def _sharded_loss(head: Head, x: Inputs) -> jax.Array:
  def body(_, tile, own):
    del own
    _, s, t, label, keep, invalid = tile
    return None, _sharded_tile_loss(head, s, t, label, keep, invalid)

  teacher = lax.stop_gradient((x.ht, x.wt, x.bt))
  x = x._replace(ht=teacher[0], wt=teacher[1], bt=teacher[2])
  return _tiles(head, x, body, None, remat=True)[1]


# ------------------------------------------------------------------ the API


def _matrix(x, fn, what, rows_name):
  x = jnp.asarray(x)
  _checks.floating(x, fn, what)
  if x.ndim != 2:
    raise ValueError(f"jsoft.{fn}: {what} must have shape [{rows_name}, V] "
                     f"(a Dense kernel), got {tuple(x.shape)}.")
  return x


def _features(x, d, fn, what, weight_name, weight_shape):
  x = jnp.asarray(x)
  _checks.floating(x, fn, what)
  if x.ndim < 1 or x.shape[-1] != d:
    raise ValueError(f"jsoft.{fn}: {what} must have shape [..., {d}] to "
                     f"match {weight_name} {tuple(weight_shape)}, got "
                     f"{tuple(x.shape)}.")
  return x


def _bias(b, vocab, fn, what):
  if b is None:
    return None
  b = jnp.asarray(b)
  _checks.floating(b, fn, what)
  _checks.shape(b, (vocab,), fn, what, "one entry per class")
  return b


@functools.partial(jax.jit, static_argnames=(
    "div", "hard", "chunk_size", "ignore_index", "reduction", "axis_name"))
def _ld_jit(hs, ws, ht, wt, bs, bt, labels, div, hard, chunk_size,
            ignore_index, reduction, axis_name):
  fn = "linear_distillation_loss"
  ws = _matrix(ws, fn, "student_weight", "D_s")
  wt = _matrix(wt, fn, "teacher_weight", "D_t")
  vocab = ws.shape[1]
  if wt.shape[1] != vocab:
    raise ValueError(f"jsoft.{fn}: the teacher's vocabulary must be the "
                     f"student's: teacher_weight {tuple(wt.shape)} against "
                     f"student_weight {tuple(ws.shape)}.")
  hs = _features(hs, ws.shape[0], fn, "student_hidden", "student_weight",
                 ws.shape)
  ht = _features(ht, wt.shape[0], fn, "teacher_hidden", "teacher_weight",
                 wt.shape)
  batch = hs.shape[:-1]
  _checks.shape(ht, batch + (wt.shape[0],), fn, "teacher_hidden",
                "one row per student token")
  bs = _bias(bs, vocab, fn, "student_bias")
  bt = _bias(bt, vocab, fn, "teacher_bias")
  n = math.prod(batch)
  if labels is None:
    if hard:
      raise ValueError(f"jsoft.{fn}: hard_weight={hard} needs labels.")
    if ignore_index is not None:
      raise ValueError(f"jsoft.{fn}: ignore_index needs labels.")
    y, keep = jnp.zeros((n,), jnp.int32), None
  else:
    labels = jnp.asarray(labels)
    _checks.integer(labels, fn, "labels")
    _checks.shape(labels, batch, fn, "labels",
                  "student_hidden's shape without D")
    y, keep = _options.ignore(labels.reshape(n).astype(jnp.int32), None,
                              ignore_index)
  total = vocab * _collectives.num_shards(axis_name)
  invalid = jnp.zeros((n,), bool)
  if hard:
    _checks.in_range(y, total, fn, None if keep is None else ~keep)
    invalid = (y < 0) | (y >= total)
  dtype = jnp.promote_types(hs.dtype, ws.dtype)
  hs, ws = hs.reshape(n, -1).astype(dtype), ws.astype(dtype)
  ht = ht.reshape(n, -1)
  _checks.finite(hs, fn, "student_hidden")
  _checks.finite(ht, fn, "teacher_hidden")
  rows = jnp.ones((n,), bool) if keep is None else keep
  if keep is not None:
    # Ignored tokens take no part: zeroed features keep even a NaN in them
    # out of dW (0·NaN would be NaN).
    hs = jnp.where(keep[:, None], hs, 0)
    ht = jnp.where(keep[:, None], ht, 0)
  head = Head(div, hard, min(chunk_size or default_chunk(n, vocab), max(n, 1)),
              vocab, axis_name)
  x = Inputs(hs, ws, bs, ht, wt, bt, y, rows, invalid)
  acc = _checks.compute_dtype(dtype)
  if axis_name is None and reduction != "none" and n:
    count = jnp.sum(rows.astype(acc))
    coef = rows.astype(acc)
    if reduction == "mean":
      coef = coef / jnp.where(count == 0, 1, count)
    return _scalar(head, lax.stop_gradient(coef), *x)
  if not n:
    loss = jnp.zeros((0,), acc)
  elif axis_name is None:
    loss = _token(head, *x)
  else:
    loss = _sharded_loss(head, x)
  if reduction == "none":
    return loss.reshape(batch)
  return _options.reduce(loss, reduction, keep)


def linear_distillation_loss(
    student_hidden: jax.typing.ArrayLike,
    student_weight: jax.typing.ArrayLike,
    teacher_hidden: jax.typing.ArrayLike,
    teacher_weight: jax.typing.ArrayLike, *,
    student_bias: jax.typing.ArrayLike | None = None,
    teacher_bias: jax.typing.ArrayLike | None = None,
    labels: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None, hard_weight: float = 0.0,
    divergence: str = "forward_kl", beta: float = 0.5,
    temperature: float = 1.0, chunk_size: int | None = None,
    reduction: str = "none", axis_name: Any = None) -> jax.Array:
  r"""Distillation between two linear heads, without either head's
  ``[N, V]`` logits.

  Per token, with student logits ``s = h_s W_s + b_s``, teacher logits
  ``t = h_t W_t + b_t`` and ``α`` = ``hard_weight``:

  .. math::
    L_n = \alpha\,\operatorname{CE}(s_n, y_n)
      + (1 - \alpha)\,D\bigl(\operatorname{softmax}(t_n/T),\
        \operatorname{softmax}(s_n/T)\bigr),

  with ``D`` the divergence of :func:`jsoft.distillation_loss` (forward KL,
  reverse KL or the β-JSD; no ``T²`` factor) and the hard loss on the
  student's logits at temperature 1. Equal, in value and in the student's
  gradients, to ``α·softmax_cross_entropy_with_integer_labels(hs @ Ws +
  bs, y) + (1 − α)·distillation_loss(hs @ Ws + bs, ht @ Wt + bt, ...)``.

  Both heads are computed one tile of ``chunk_size`` tokens at a time, all
  ``V`` classes per tile, inside a ``lax.scan``. Gradient (the VJP rule):
  the gradient tile with respect to the student's logits,

  .. math::
    g = (1-\alpha)\,\frac{\varphi_1 - p_s\sum_c\varphi_{1,c}}{T}
      + \alpha\,\bigl(\operatorname{softmax}(s) - \mathrm{onehot}(y)\bigr)

  (for forward KL the first term is :math:`(1-\alpha)(p_s - p_t)/T`), is
  folded into :math:`\partial L/\partial h_s = g W_s^\top`,
  :math:`\partial L/\partial W_s = \sum h_s^\top g` and
  :math:`\partial L/\partial b_s = \sum g`, accumulated in float32.
  Reduced to a scalar, those tiles are formed in the forward pass (four
  matmuls per tile in all, as many as the unfused loss's forward and
  backward); ``reduction="none"`` recomputes both tiles of logits in the
  backward pass. The teacher is a constant: no gradient reaches
  ``teacher_*``, and no matmul is spent on one. Every autodiff mode works.

  Peak memory beyond inputs and outputs, in bytes, for tiles of ``c``
  tokens: ``12·c·V`` to ``20·c·V`` for forward KL at ``T = 1`` (both
  float32 tiles of logits and the gradient tile), up to ``48·c·V`` with
  the JSD, a temperature and the hard loss (more per-entry temporaries),
  plus ``8·D_s·V`` (``dW_s`` and a transposed copy of ``W_s``) and
  ``4·N·D_s`` (``dh_s``) (``tests/test_memory.py`` holds it to that); the
  unfused composition holds at least ``8·N·V`` (both heads' logits).
  ``chunk_size=None`` picks ``c`` so that one float32 tile is 1/32 of one
  head's logits, clamped to 1–16 MiB (a multiple of 8 tokens): at 4096
  tokens and 32768 classes, 128 tokens per tile.

  Args:
    student_hidden: ``[..., D_s]`` floating features of the student.
    student_weight: ``[D_s, V]`` the student's head (a Dense kernel).
    teacher_hidden: ``[..., D_t]`` the teacher's features for the same
      tokens (a constant).
    teacher_weight: ``[D_t, V]`` the teacher's head, same vocabulary.
    student_bias, teacher_bias: optional ``[V]`` biases.
    labels: optional integer ``[...]`` targets: tokens equal to
      ``ignore_index`` get loss 0, zero gradient and no share in "mean";
      with ``hard_weight > 0`` also the hard loss's targets (out of range:
      NaN, as in the cross-entropy).
    ignore_index: the label value of tokens to ignore (needs ``labels``).
    hard_weight: ``α`` in ``[0, 1]``.
    divergence, beta, temperature: as in :func:`jsoft.distillation_loss`.
    chunk_size: tokens per tile; None: from the memory budget above.
    reduction: "none" (per token), "sum", or "mean" (over the tokens not
      ignored; 0 when there are none).
    axis_name: inside ``shard_map``, the mesh axis both heads' ``V`` axis
      (``*_weight``, ``*_bias``) is sharded over, the features and labels
      (global class indices) being the same on each device of it. Each
      token's max, sums and label logit cross devices per tile; each
      device's ``dW_s`` is its slice's, ``dh_s`` is summed over devices.

  Returns:
    The per-token loss ``[...]`` (float32 for 16-bit inputs, else the
    inputs' dtype), or a scalar.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> hs, ws = jnp.ones((4, 3)), jnp.zeros((3, 5))
    >>> ht, wt = jnp.ones((4, 2)), jnp.zeros((2, 5))
    >>> print(jsoft.linear_distillation_loss(hs, ws, ht, wt))  # same heads
    [0. 0. 0. 0.]
  """
  fn = "linear_distillation_loss"
  chunk_size = _checks.chunk_size(chunk_size, fn)
  return _ld_jit(
      _checks.asarray(student_hidden), _checks.asarray(student_weight),
      _checks.asarray(teacher_hidden), _checks.asarray(teacher_weight),
      _checks.asarray(student_bias), _checks.asarray(teacher_bias),
      _checks.asarray(labels),
      _distillation.config(fn, divergence, beta, temperature),
      _checks.static_float(hard_weight, fn, "hard_weight", low=0.0,
                           high=1.0),
      chunk_size, _checks.static_int(ignore_index, fn, "ignore_index"),
      _checks.reduction(reduction, fn), _checks.axis_name(axis_name, fn))
