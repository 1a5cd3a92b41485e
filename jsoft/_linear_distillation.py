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

The row rule (:class:`Rows`) is written once and run by the shared
drivers: reduced to a scalar (``"sum"``, ``"mean"``), the gradient tiles
are formed in the forward pass (:func:`jsoft._drivers.reduced`); per token
(``"none"``), the backward pass recomputes both tiles of logits
(:func:`jsoft._drivers.per_token`); vocabulary-parallel (``axis_name``),
the row sums cross devices inside each tile and JAX differentiates the
tile, rematerialised in the backward pass (:func:`_sharded_loss`). All of
them loop in :func:`jsoft._tiling.scan_tokens`, with ignored tokens
gathered out of the loop.
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
  _compaction,
  _distillation,
  _drivers,
  _loss_rule,
  _options,
  _plain,
)
from jsoft import _tiling as tiling
from jsoft._distillation import Divergence
from jsoft._loss_rule import Block, Target
from jsoft._softmax import mass, row_shift


class Rows(NamedTuple):
  """The distillation rule on whole rows of a tile of tokens (a row rule
  of :mod:`jsoft._drivers`). Per-token operands: the teacher's features,
  the labels, which tokens have a loss, which labels are out of range;
  the others: the teacher's weight and bias (constants). The hard-label
  term is the cross-entropy rule (:mod:`jsoft._loss_rule`) on the
  student's logits, its target one-hot at the label."""
  div: Divergence
  hard: float  # α: the hard-label cross-entropy's weight
  vocab: int  # this device's classes
  axis_name: Any  # the mesh axis the classes are split over

  def _heads(self, h_t, w, b, tokens, whole):
    """Both tiles of logits (the teacher's a constant), the hard loss's
    :class:`~jsoft._loss_rule.Target`, and the divergence's scaled logits
    ``s/T``, ``t/T``."""
    ht, label, keep, invalid = tokens
    acc = _checks.compute_dtype(h_t.dtype)
    s = tiling.logits(h_t, w, b, acc)
    t = lax.stop_gradient(tiling.logits(ht, *whole, acc))
    temp = self.div.temperature
    scaled = (_distillation.scaled(s, None, temp, acc),
              _distillation.scaled(t, None, temp, acc))
    target = Target(label, 1.0, 0.0, 1.0, keep & ~invalid, invalid, keep)
    first = _collectives.first_class(self.axis_name, self.vocab)
    return Block(s, None, first, None), target, scaled

  def _hard_loss(self, target, shift):
    return lambda sums: self.hard * _loss_rule.row_loss(target, shift, sums,
                                                        0.0)

  def _forward(self, block, target, scaled):
    d, rows = _distillation.row_stats(self.div, *scaled)
    loss = jnp.where(target.keep, (1 - self.hard) * d, 0)
    hard = None
    if self.hard:
      m = _loss_rule.block_max(block, None)
      sums = _loss_rule.block_sums(None, block, m, target.label)
      loss, hard = loss + self._hard_loss(target, m)(sums), (m, sums)
    return loss, (rows, hard)

  def _backward(self, block, target, scaled, own, res, k):
    rows, hard = res
    keep = target.keep & own
    k = jnp.where(keep, k, 0)
    g = _distillation.row_grad(self.div, *scaled, rows, (1 - self.hard) * k)
    g = jnp.where(keep[:, None], g, 0)
    if hard is not None:
      m, sums = hard
      _, pull = jax.vjp(self._hard_loss(target, m), sums)
      (ct,) = pull(k)
      g = g + _loss_rule.block_grad(None, block, m, target.label, keep,
                                    ct)[0]
    return g

  def forward(self, h_t, w, b, tokens, whole, own):
    del own
    return self._forward(*self._heads(h_t, w, b, tokens, whole))

  def backward(self, h_t, w, b, tokens, whole, own, res, k):
    heads = self._heads(h_t, w, b, tokens, whole)
    return self._backward(*heads, own, res, k)

  def forward_and_backward(self, h_t, w, b, tokens, whole, own, k):
    heads = self._heads(h_t, w, b, tokens, whole)  # one tile of each head
    loss, res = self._forward(*heads)
    return loss, self._backward(*heads, own, res, k)

  def sharded(self, h_t, w, b, tokens, whole):
    """Each token's loss with its row split over ``axis_name``: the max
    and the sums cross devices (:mod:`jsoft._collectives`), and JAX
    differentiates the tile (the hard term through the loss rule's own
    VJP, :func:`jsoft._plain.differentiable_sums`)."""
    ax = self.axis_name
    block, target, (s_t, t_t) = self._heads(h_t, w, b, tokens, whole)
    lse_s, lse_t = _sharded_lse(s_t, ax), _sharded_lse(t_t, ax)
    terms = _distillation.terms(self.div, s_t - lse_s[:, None],
                                t_t - lse_t[:, None])
    d = _collectives.psum(jnp.sum(terms, axis=-1), ax)
    loss = jnp.where(target.keep, (1 - self.hard) * d, 0)
    if self.hard:
      top = _collectives.pmax(_loss_rule.block_max(block, None), ax)
      sums = _plain.differentiable_sums(None, block, top, target.label,
                                        target.keep)
      sums = _collectives.psum(sums, ax)
      loss = loss + self._hard_loss(target, top)(sums)
    return loss


def _sharded_lse(x: jax.Array, ax: Any) -> jax.Array:
  """:func:`jsoft._distillation.lse` of rows split over the mesh axis."""
  c = _collectives.pmax(row_shift(x, (-1,))[..., 0], ax)
  s = _collectives.psum(jnp.sum(jnp.exp(x - c[:, None]), axis=-1), ax)
  return c + jnp.log(mass(s))


def _sharded_loss(rule: Rows, size: int, h, w, b, kept, tokens, whole):
  tiles = tiling.Tiles(h.shape[0], size)

  def tile(_, j, start, own):
    del j, own
    rows = lambda x: tiling.rows(x, start, size)  # noqa: E731
    return None, rule.sharded(rows(h), w, b, tuple(map(rows, tokens)),
                              whole)

  whole = lax.stop_gradient(whole)
  # Each token's loss is summed over the devices that split its row: it
  # varies like the per-token operands, not like W.
  return tiling.scan_tokens(tiles, tile, None, kept=kept, remat=True,
                            refs=(h, *tokens))[1]


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
  acc = _checks.compute_dtype(dtype)
  if not n:
    loss = jnp.zeros((0,), acc)
    return loss.reshape(batch) if reduction == "none" else jnp.sum(loss)
  size = min(chunk_size or tiling.token_tile(n, vocab, "distillation"), n)
  rule = Rows(div, hard, vocab, axis_name)
  coef = None
  if reduction != "none":
    count = jnp.sum(rows.astype(acc))
    coef = rows.astype(acc)
    if reduction == "mean":
      coef = coef / jnp.where(count == 0, 1, count)
  compaction, kept = None, None
  tokens = (ht, y, rows, invalid)
  if keep is not None and n >= _compaction.COMPACT_MIN_TOKENS:
    # Ignored tokens gathered out of the tile loop.
    compaction = _compaction.Compaction.of(keep)
    hs, coef, kept = compaction.gather(hs), compaction.gather(coef), \
        compaction.count
    tokens = tuple(map(compaction.gather, tokens))
  whole = (wt, bt)
  if axis_name is None and reduction != "none":
    return _drivers.reduced(rule, size, hs, ws, bs, coef, kept, tokens,
                            whole)
  if axis_name is None:
    loss = _drivers.per_token(rule, size, hs, ws, bs, kept, tokens, whole)
  else:
    loss = _sharded_loss(rule, size, hs, ws, bs, kept, tokens, whole)
  if compaction is not None:
    loss = compaction.scatter(loss)
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

  Peak memory beyond inputs and outputs, for tiles of ``c`` tokens, is
  bounded by :func:`jsoft._tiling.peak_bytes` (``tests/test_memory.py``
  holds XLA to it): from three float32 ``[c, V]`` tiles (both heads'
  logits and the gradient tile) for forward KL at ``T = 1`` to twelve with
  the JSD, a temperature and the hard loss, plus ``dW_s`` and a transposed
  copy of ``W_s`` (``8·D_s·V``) and ``dh_s`` (``4·N·D_s``); the unfused
  composition holds at least ``8·N·V`` (both heads' logits).
  ``chunk_size=None`` picks ``c`` so that one float32 tile is 1/32 of one
  head's logits, clamped to 1–16 MiB (:data:`jsoft._tiling.BUDGETS`).
  Ignored tokens cost in proportion to the kept ones: from 1024 tokens on
  they are gathered behind the kept tokens and the tiles that hold none
  are skipped.

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
