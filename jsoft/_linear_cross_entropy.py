r"""``linear_cross_entropy``: the loss of an LM head without its logits.

For a language-model head the logits ``[N, V]`` dominate memory (8192
tokens × 128k vocabulary in float32 is 4 GiB, and as much again for their
gradient). :func:`linear_cross_entropy` is the integer-label loss of
``h @ W + b`` computed one tile of logits at a time (:mod:`jsoft._tiling`):
the per-token sums of :mod:`jsoft._head`, or, reduced to a scalar over
tiles of tokens, the row rule :class:`Rows` run by
:func:`jsoft._drivers.reduced`. This module checks the arguments, picks the
loop order and the tile, and combines the per-token sums with the same rule
as the unfused loss.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jsoft import (
  _checks,
  _collectives,
  _compaction,
  _drivers,
  _head,
  _loss_rule,
  _options,
  _stats,
  _targets,
)
from jsoft import _tiling as tiling
from jsoft._loss_rule import Block, Target
from jsoft._softcap import LogitMap
from jsoft._stats import TokenStats

# What a tile spans a slice of (tile_by=None: the loop with the smaller
# accumulator).
TILE_BY = ("tokens", "classes")


class Rows(NamedTuple):
  """The cross-entropy rule on whole rows of a tile of tokens (a row rule
  of :mod:`jsoft._drivers`): the per-token operands are the
  :class:`~jsoft._loss_rule.Target`'s arrays, the one other operand the
  smoothing target ``u``."""
  lmap: LogitMap | None
  z_loss: float
  numbers: tuple[Any, ...]  # the Target's Python numbers (Target.split)

  def _start(self, h_t, w, b, tokens, whole, own):
    target = Target.join(self.numbers, tokens)
    if own is not True:  # the rows of the tile before: no gradient
      target = target._replace(
          keep=own if target.keep is None else target.keep & own)
    acc = _checks.compute_dtype(h_t.dtype)
    block = Block(tiling.logits(h_t, w, b, acc), None, 0, whole[0])
    return target, block, _loss_rule.block_max(block, self.lmap)

  def _loss(self, target, shift):
    return lambda sums: _loss_rule.row_loss(target, shift, sums, self.z_loss)

  def forward(self, h_t, w, b, tokens, whole, own):
    target, block, m = self._start(h_t, w, b, tokens, whole, own)
    sums = _loss_rule.block_sums(self.lmap, block, m, target.label)
    return self._loss(target, m)(sums), (m, sums)

  def backward(self, h_t, w, b, tokens, whole, own, res, k):
    target, block, _ = self._start(h_t, w, b, tokens, whole, own)
    m, sums = res
    _, pull = jax.vjp(self._loss(target, m), sums)
    (ct,) = pull(k)
    return _loss_rule.block_grad(self.lmap, block, m, target.label,
                                 target.keep, ct)[0]

  def forward_and_backward(self, h_t, w, b, tokens, whole, own, k):
    target, block, m = self._start(h_t, w, b, tokens, whole, own)
    sums, e = _loss_rule.block_sums_and_exp(self.lmap, block, m,
                                            target.label)
    loss, pull = jax.vjp(self._loss(target, m), sums)
    (ct,) = pull(_collectives.varying_like(k.astype(loss.dtype), loss))
    g, _ = _loss_rule.block_grad(self.lmap, block, m, target.label,
                                 target.keep, ct, e)
    return loss, g


def _target(opts, y, rows, weights, vocab, acc):
  """The per-token :class:`~jsoft._loss_rule.Target` and the smoothing
  target ``u`` (a number, a ``[V]`` vector, or None)."""
  target, scale = _targets.integer(opts, y, None, rows, weights, vocab, acc)
  dense = _targets.smoothing(scale, weights, None)
  return target, None if dense is None else jnp.asarray(dense, acc)


def _by_tokens(tile_by: str | None, n: int, vocab: int) -> bool:
  """Tiles of tokens (the accumulator is dW, ``[D, V]``) or of classes
  (dh, ``[N, D]``): as asked, else the smaller accumulator."""
  return n >= vocab if tile_by is None else tile_by == "tokens"


def _head_loss(opts, chunk_size, by_tokens, h, w, b, target, dense,
               compaction, stats=False):
  """The per-token loss of ``h @ w + b`` (``h``: ``[N, D]``), and with
  ``stats`` its :class:`jsoft.TokenStats` (else None)."""
  n, vocab = h.shape[0], w.shape[1]
  if by_tokens:
    loop = _head.Loop(opts.lmap, min(chunk_size or tiling.token_tile(
        n, vocab), n), None, vocab, opts.axis_name, stats)
  else:
    if compaction is None:
      rows = n
      size, keep_ht = tiling.class_tile(n, h.shape[1], vocab, chunk_size)
    else:
      rows = tiling.row_tile(n)
      size, keep_ht = tiling.row_tiled_class_tile(n, h.shape[1], vocab, rows,
                                                  chunk_size)
    loop = _head.Loop(opts.lmap, rows, size, vocab, opts.axis_name, stats,
                      keep_ht)
  shift, sums, argmax = _head.head_sums(loop, h, w, b, target.label,
                                        target.keep, dense, compaction)
  ax = opts.axis_name
  if ax is not None:
    # Each device's sums, moved to the global max, then added: one max
    # and two or three sums per token cross devices.
    local = 0.0 if dense is None else (
        dense * vocab if jnp.ndim(dense) == 0 else jnp.sum(dense))
    top = _collectives.pmax(shift, ax)
    sums = _collectives.psum(_loss_rule.rebase(sums, shift, top, local), ax)
    if argmax is not None:
      argmax = _collectives.pmin(
          jnp.where(shift == top, argmax, _loss_rule.NO_CLASS), ax)
    shift = top
  loss = _loss_rule.row_loss(target, shift, sums, opts.z_loss)
  if not stats:
    return loss, None
  return loss, _stats.from_sums(target, shift, sums, argmax)


def _reduced_head_loss(opts, chunk_size, h, w, b, target, dense, coef,
                       compaction):
  """``Σ_n coef_n·L_n`` of ``h @ w + b`` with its gradients formed in the
  forward pass (:func:`jsoft._drivers.reduced`): tiles of tokens."""
  n, vocab = h.shape[0], w.shape[1]
  size = min(chunk_size or tiling.token_tile(n, vocab), n)
  kept = None
  if compaction is not None:
    h, coef, kept = compaction.gather(h), compaction.gather(coef), \
        compaction.count
    target = Target(*map(compaction.gather, target))
  numbers, arrays = target.split()
  return _drivers.reduced(Rows(opts.lmap, opts.z_loss, numbers), size, h, w,
                          b, coef, kept, arrays, (dense,))


@functools.partial(jax.jit, static_argnames=("opts", "chunk_size", "tile_by",
                                             "ignore_index", "reduction",
                                             "return_stats"))
def _lce_jit(hidden, weight, labels, bias, class_weights, sample_weights,
             where, opts, chunk_size, tile_by, ignore_index, reduction,
             return_stats):
  fn = "linear_cross_entropy"
  hidden, weight, labels = map(jnp.asarray, (hidden, weight, labels))
  _checks.floating(hidden, fn, "hidden")
  _checks.floating(weight, fn, "weight")
  _checks.integer(labels, fn, "labels")
  if weight.ndim != 2:
    raise ValueError(f"jsoft.{fn}: weight must have shape [D, V] (a Dense "
                     f"kernel), got {tuple(weight.shape)}.")
  d, vocab = weight.shape
  if hidden.ndim < 1 or hidden.shape[-1] != d:
    raise ValueError(f"jsoft.{fn}: hidden must have shape [..., {d}] to match "
                     f"weight {tuple(weight.shape)}, got "
                     f"{tuple(hidden.shape)}.")
  batch = hidden.shape[:-1]
  _checks.shape(labels, batch, fn, "labels", "hidden's shape without D")
  dtype = jnp.promote_types(hidden.dtype, weight.dtype)
  hidden, weight = hidden.astype(dtype), weight.astype(dtype)
  if bias is not None:
    bias = jnp.asarray(bias)
    _checks.floating(bias, fn, "bias")
    _checks.shape(bias, (vocab,), fn, "bias", "one entry per class")
  weights = _checks.per_class(class_weights, vocab,
                              _checks.compute_dtype(dtype), fn,
                              "class_weights")
  samples = _checks.per_example(sample_weights, batch,
                                _checks.compute_dtype(dtype), fn,
                                "sample_weights")
  where = _checks.mask(where, batch, fn)
  n = math.prod(batch)
  rows = None if where is None else where.reshape(n)
  _checks.finite(hidden, fn, "hidden",
                 None if rows is None else where[..., None])
  _checks.finite(weight, fn, "weight")
  if samples is not None:
    samples = samples.reshape(n)
    _checks.finite(samples, fn, "sample_weights")

  h = hidden.reshape(n, d)
  y, rows = _options.ignore(labels.reshape(n), rows, ignore_index)
  _checks.in_range(y, vocab * _collectives.num_shards(opts.axis_name), fn,
                   None if rows is None else ~rows)
  if rows is not None:
    # Ignored tokens take no part at all: zeroing their features keeps even
    # a NaN in them out of dW (0·NaN would be NaN).
    h = jnp.where(rows[:, None], h, 0)
  acc = _checks.compute_dtype(dtype)
  target, dense = _target(opts, y, rows, weights, vocab, acc)
  # From COMPACT_MIN_TOKENS on, ignored tokens are gathered out of the
  # tile loop.
  compaction = None
  if rows is not None and n >= _compaction.COMPACT_MIN_TOKENS:
    compaction = _compaction.Compaction.of(target.keep)

  def reduced(loss):  # the per-token loss [N], weighted and reduced
    return _targets.reduced(loss, target, reduction,
                            weights is not None or rows is not None, samples)

  by_tokens = _by_tokens(tile_by, n, vocab)
  if (reduction != "none" and not return_stats and opts.axis_name is None
      and by_tokens):
    # The reduction is linear in the per-token loss: its gradient is each
    # token's coefficient.
    coef = jax.grad(reduced)(jnp.zeros((n,), acc))
    return _reduced_head_loss(opts, chunk_size, h, weight, bias, target,
                              dense, coef, compaction)
  loss, stats = _head_loss(opts, chunk_size, by_tokens, h, weight, bias,
                           target, dense, compaction, return_stats)
  loss = reduced(loss)
  if reduction == "none":
    loss = loss.reshape(batch)
  if stats is None:
    return loss
  return loss, jax.tree.map(lambda v: v.reshape(batch), stats)


def linear_cross_entropy(
    hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike, *,
    bias: jax.typing.ArrayLike | None = None, chunk_size: int | None = None,
    tile_by: str | None = None, ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0, logit_soft_cap: float | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none", axis_name: Any = None,
    temperature: float = 1.0,
    sample_weights: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    return_stats: bool = False) -> jax.Array | tuple[jax.Array, TokenStats]:
  r"""Cross-entropy of a linear head, ``CE(hidden @ weight + bias, labels)``,
  without materialising the ``[N, V]`` logits or their gradient.

  Equal, in value and in gradients with respect to ``hidden``, ``weight``
  and ``bias``, to
  ``softmax_cross_entropy_with_integer_labels(hidden @ weight + bias,
  labels, ...)`` with the same options, ``where=`` per token (see that
  function for the formula and the options): the same loss rule
  (:mod:`jsoft._loss_rule`) applied to one tile of logits at a time.

  .. math::
    L_n = \operatorname{CE}\bigl(h_n W + b,\ y_n\bigr), \qquad
    \frac{\partial L}{\partial h} = g\,W^\top, \quad
    \frac{\partial L}{\partial W} = \sum_{\text{tiles}} h^\top g, \quad
    \frac{\partial L}{\partial b} = \sum_{\text{tiles}} \textstyle\sum_n g,

  where ``g = softmax·k − t`` is the unfused loss's ``y - t`` gradient on
  one tile of logits, in float32.

  Computed one tile at a time inside a ``lax.scan``: tiles of
  ``chunk_size`` tokens (the accumulator is ``dW``, ``[D, V]``) or tiles of
  ``chunk_size`` classes with an online logsumexp (the accumulator is
  ``dh``, ``[N, D]``); by default the loop with the smaller accumulator
  (tokens when ``N ≥ V``), else as ``tile_by`` says. A tile that does not
  divide the axis overlaps the one before (nothing is padded or copied).
  Gradient (the VJP rule): the backward pass recomputes each tile of logits
  (one extra matmul per tile) and folds ``g`` into the gradients above,
  ``dW`` accumulated in float32 — except over tiles of tokens with the loss
  reduced to a scalar, where each tile holds whole rows, so the forward
  pass forms ``g`` and folds it in, and the backward pass only scales the
  gradients (three matmuls per tile, as many as the unfused loss; a call
  that is not differentiated does no gradient work). Every autodiff mode
  works (``jvp``, ``hessian``, HVPs), as for the unfused loss.

  Ignored tokens (``ignore_index``, ``where``) take no tile work: from
  1024 tokens on they are gathered behind the kept tokens and the tiles
  that hold none are skipped at run time (a ``lax.cond`` per tile; over
  classes, the tokens go in :data:`jsoft._tiling.ROW_TILES` row tiles).

  Peak memory beyond inputs and outputs, for ``N`` tokens, ``D``
  features, ``V`` classes and tiles of ``c``, is bounded by
  :func:`jsoft._tiling.peak_bytes` (``tests/test_memory.py`` holds XLA to
  it): over tokens, two float32 tiles of logits (``8·c·V``; four when the
  gradients are formed in the forward pass), ``dW`` (``4·D·V``) and ``dh``
  (``4·N·D``); over classes, ``8·N·c``, ``dh``, ``dW`` and ``hᵀ`` (when
  ``D ≤ c``); plus numbers per token, and the gathered features and their
  gradient (``8·N·D``) when ignored tokens are gathered out. The unfused
  loss needs at least ``4·N·V``. ``chunk_size=None`` picks ``c`` from a
  byte budget (:data:`jsoft._tiling.BUDGETS`: a token tile 1/64 of the
  logits, at most 8 MiB; over classes the whole step within twice 1/16 of
  them, at most twice 16 MiB).
  Over classes the fourth matmul costs time, over tokens ``dW`` costs
  memory: ``python -m bench tiles`` measures the trade.

  Args:
    hidden: ``[..., D]`` floating features.
    weight: ``[D, V]`` head weight (a Dense kernel; for tied embeddings pass
      ``embedding.T``).
    labels: integer ``[...]`` targets (``hidden``'s shape without ``D``).
    bias: optional ``[V]`` bias.
    chunk_size: tokens or classes (see ``tile_by``) per tile; None: from
      the memory budget above.
    tile_by: ``"tokens"`` or ``"classes"``: what each tile takes a slice of;
      None (the default): tokens when ``N ≥ V`` (this device's ``V`` with
      ``axis_name``), else classes.
    ignore_index, label_smoothing, z_loss, logit_soft_cap: as in
      :func:`jsoft.softmax_cross_entropy_with_integer_labels`.
    class_weights, reduction, temperature, sample_weights: as there.
    return_stats: as there (the statistics come from the same tile loop: an
      entropy sum and a running argmax per token, never the ``[N, V]``
      logits).
    where: optional boolean mask of the labels' shape: ``False`` tokens are
      ignored (loss 0, zero gradient, no share in "mean"), as with
      ``ignore_index``.
    axis_name: inside ``shard_map``, the mesh axis ``weight``'s V axis (and
      ``bias``, ``class_weights``) is sharded over, ``hidden`` and
      ``labels`` (global class indices) being the same on each device of
      it. Returns the global loss; after the loop, each token's max and
      two or three sums cross devices once, ``dh`` is summed over the
      devices once, and each device's ``dW`` is its slice's: no all-gather
      of logits or weights. The loop order follows the local ``V``.

  Returns:
    The per-token loss ``[...]`` (float32 for 16-bit inputs, else the
    inputs' dtype), or a scalar.

  Examples:
    >>> import jax, jax.numpy as jnp, jsoft
    >>> h, w = jnp.ones((4, 3)), jnp.zeros((3, 5))
    >>> y = jnp.array([0, 1, 2, -100])
    >>> loss = jsoft.linear_cross_entropy(h, w, y, ignore_index=-100,
    ...                                   reduction="mean")
    >>> print(f"{loss:.4f}")  # log 5: uniform over 5 classes
    1.6094
  """
  fn = "linear_cross_entropy"
  chunk_size = _checks.chunk_size(chunk_size, fn)
  if tile_by is not None:
    tile_by = _checks.one_of(tile_by, TILE_BY, fn, "tile_by")
  return _lce_jit(
      _checks.asarray(hidden), _checks.asarray(weight),
      _checks.asarray(labels), _checks.asarray(bias),
      _checks.asarray(class_weights), _checks.asarray(sample_weights),
      _checks.asarray(where),
      _options.options(fn, label_smoothing, z_loss, logit_soft_cap, axis_name,
                       temperature),
      chunk_size, tile_by,
      _checks.static_int(ignore_index, fn, "ignore_index"),
      _checks.reduction(reduction, fn),
      _checks.static_bool(return_stats, fn, "return_stats"))
