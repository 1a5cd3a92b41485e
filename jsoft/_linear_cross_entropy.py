r"""Fused linear cross-entropy: the loss of ``h @ W + b`` without the logits.

For a language-model head the logits ``[N, V]`` dominate memory (8192 tokens
× 128k vocabulary in float32 is 4 GiB, and as much again for their
gradient). :func:`linear_cross_entropy` computes

.. math::
  L_n = \operatorname{CE}\bigl(h_n W + b,\ y_n\bigr)

— exactly :func:`jsoft.softmax_cross_entropy_with_integer_labels` of the
logits, with every option — one tile at a time inside a ``lax.scan``, so
at most one tile of logits exists at once.

Its ``jax.custom_vjp`` rule saves only each token's shift and sum (two
floats per token) and, in the backward pass, recomputes each tile of
logits, applies the same ``y - t`` rule as the unfused loss to the tile
(``g = softmax·k − t``, in float32), and folds it straight into the
gradients:

.. math::
  \frac{\partial L}{\partial h} = g\,W^\top, \qquad
  \frac{\partial L}{\partial W} = \sum_{\text{tiles}} h^\top g, \qquad
  \frac{\partial L}{\partial b} = \sum_{\text{tiles}} \textstyle\sum_n g .

The price is one more ``[chunk, D] × [D, V]`` matmul per tile (the forward
one, recomputed). ``dW`` accumulates in float32 whatever the input dtype.

Loop order: with at least as many tokens as classes the tiles run over
tokens (``[c, V]``), and the accumulator is ``dW`` (``[D, V]``); with fewer
tokens than classes they run over the vocabulary (``[N, c]``, with an online
logsumexp: a running max and sum per token), and the accumulator is ``dh``
(``[N, D]``). Either way the accumulator is the smaller of the two.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks, _rules
from jsoft import _cross_entropy as _ce

# Default memory budget for one float32 tile of logits (chunk_size=None):
# 1/64 of the full logits, between 1 and 8 MiB.
TILE_BYTES = 8 * 2**20
MIN_TILE_BYTES = 2**20


def default_chunk(length: int, other: int, budget: int | None = None) -> int:
  """Rows per tile along the loop's axis (``length``: tokens or classes)
  against ``other`` columns: as many as fit ``budget`` bytes of float32
  logits (by default 1/64 of all of them, clamped to [1, 8] MiB), a
  multiple of 8 when possible, at least 1, at most ``length``."""
  if budget is None:
    budget = min(TILE_BYTES, max(MIN_TILE_BYTES, 4 * length * other // 64))
  chunk = max(1, budget // (4 * max(other, 1)))
  if chunk >= 8:
    chunk -= chunk % 8
  return max(1, min(chunk, length))


def _tile_logits(h, w, b):
  """One tile of logits, accumulated and returned in the compute dtype
  (float32 for 16-bit inputs)."""
  acc = _checks.compute_dtype(h.dtype)
  logits = jnp.matmul(h, w, preferred_element_type=acc)
  if b is not None:
    logits = logits + b.astype(acc)
  return logits


def _varying(x, axis_name, *like):
  """A fresh accumulator ``x``, typed to vary over ``axis_name`` and over
  the ``shard_map`` mesh axes that the arrays ``like`` vary over (a scan
  carry must keep one type); ``x`` itself outside ``shard_map``."""
  axes = set()
  if axis_name is not None:
    axes |= set(axis_name) if isinstance(axis_name, tuple) else {axis_name}
  for ref in like:
    if ref is not None:
      axes |= _rules.varying_axes(ref)
  axes -= _rules.varying_axes(x)
  if not axes:
    return x
  return lax.pcast(x, tuple(sorted(axes, key=str)), to="varying")


def _cotangents(dh, dw, db, h, w, b):
  """The VJP's outputs: each cotangent summed over the mesh axes its primal
  is replicated on, in its primal's dtype; none for the labels, mask and
  class weights."""
  db = None if b is None else _rules.summed_like(db, b).astype(b.dtype)
  return (_rules.summed_like(dh, h).astype(h.dtype),
          _rules.summed_like(dw, w).astype(w.dtype), db, None, None, None)


def _tiles(x, chunk):
  """``[N, ...]`` as ``[N / chunk, chunk, ...]`` (N a multiple of chunk)."""
  return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _lce_fwd(static, h, w, b, labels, rows, weights):
  opts, chunk = static

  def tile(_, xs):
    h_t, y_t, r_t = xs
    loss, res = _ce.int_ce_fwd(opts, _tile_logits(h_t, w, b), y_t, None, r_t,
                               weights)
    c, s = res[-2], res[-1]
    return None, (loss, c[:, 0], s)

  _, (loss, c, s) = lax.scan(
      tile, None, (_tiles(h, chunk), _tiles(labels, chunk),
                   _tiles(rows, chunk)))
  return loss.reshape(-1), (h, w, b, labels, rows, weights, c, s)


def _lce_bwd(static, res, ct):
  opts, chunk = static
  h, w, b, labels, rows, weights, c, s = res
  acc = _checks.compute_dtype(h.dtype)

  def tile(carry, xs):
    dw, db = carry
    h_t, y_t, r_t, c_t, s_t, ct_t = xs
    logits = _tile_logits(h_t, w, b)
    # The unfused loss's y − t rule on this tile, in float32.
    g = _ce.int_ce_bwd(opts, (logits, y_t, None, r_t, weights, c_t[:, None],
                              s_t), ct_t)[0]
    g_in = g.astype(h.dtype)
    dh_t = jnp.matmul(g_in, w.T, preferred_element_type=acc)
    dw = dw + jnp.matmul(h_t.T, g_in, preferred_element_type=acc)
    if db is not None:
      db = db + jnp.sum(g, axis=0)
    return (dw, db), dh_t

  ax = opts.axis_name
  refs = (ax, h, w, b, ct)
  init = (_varying(jnp.zeros(w.shape, acc), *refs),
          None if b is None else _varying(jnp.zeros(b.shape, acc), *refs))
  (dw, db), dh = lax.scan(
      jax.checkpoint(tile), init, (_tiles(h, chunk), _tiles(labels, chunk),
                                   _tiles(rows, chunk), c, s,
                                   _tiles(ct, chunk)))
  # With the classes sharded, each device holds part of h's gradient.
  dh = _ce.maybe_psum(dh.reshape(h.shape), ax)
  return _cotangents(dh, dw, db, h, w, b)


def _lce_fun(static, h, w, b, labels, rows, weights):
  return _lce_fwd(static, h, w, b, labels, rows, weights)[0]


_lce = _rules.vjp_rule(_lce_fun, _lce_fwd, _lce_bwd)


# ------------------------------------------------ loop over the vocabulary
#
# With fewer tokens than classes the tiles run over the vocabulary instead:
# each tile is [N, v] and the accumulator is dh ([N, D]), smaller than dW.
# The forward pass keeps a running max and sum per token (the online
# logsumexp), the label's logit once its tile has passed, and for label
# smoothing the running Σ w·(x̃ − max), rescaled when the max moves.


def _vocab_tile(h, w, b, j, v, vocab):
  """Tile ``j``: its logits (``[N, v]``, compute dtype, before the cap), its
  class indices, which of them are real (not padding), and its slice of
  ``w``."""
  w_t = lax.dynamic_slice_in_dim(w, j * v, v, axis=1)
  b_t = None if b is None else lax.dynamic_slice_in_dim(b, j * v, v)
  x = _tile_logits(h, w_t, b_t)
  cols = j * v + lax.broadcasted_iota(jnp.int32, (1, v), 1)
  return x, cols, cols < vocab, w_t


def _smoothing_weights(weights, valid, j, v, dtype):
  """Tile ``j``'s class weights for the smoothing target (1 without
  ``class_weights``), 0 on padding."""
  if weights is None:
    return valid.astype(dtype)
  return lax.dynamic_slice_in_dim(weights, j * v, v)[None, :]


def _vocab_fwd(static, h, w, b, labels, rows, weights):
  opts, v, vocab = static
  ax = opts.axis_name
  n = h.shape[0]
  acc = _checks.compute_dtype(h.dtype)
  # Labels are global; this device's classes start at `first`.
  total = vocab * _ce.num_shards(ax)
  first = 0 if ax is None else lax.axis_index(ax) * vocab
  idx, ok, fill, _ = _ce.label_terms(labels, None, rows, total)
  floor = -float(jnp.finfo(acc).max)

  def tile(carry, j):
    m, s, x_label, zsum, wsum = carry
    x, cols, valid, _ = _vocab_tile(h, w, b, j, v, vocab)
    if opts.cap is not None:
      x = _ce.cap_logits(x, opts.cap)
    x = jnp.where(valid, x, -jnp.inf)
    m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(x, axis=1)))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
    here = cols + first == idx[:, None]
    x_label = x_label + jnp.sum(jnp.where(here, x, 0), axis=1)
    if opts.smoothing:
      cw = _smoothing_weights(weights, valid, j, v, acc)
      # Σ w·(x̃ − m) over the classes seen so far, re-based on the new max.
      zsum = (zsum + wsum * (m - m_new)
              + jnp.sum(jnp.where(valid, cw * (x - m_new[:, None]), 0), 1))
      wsum = wsum + jnp.sum(cw, axis=1)
    return (m_new, s, x_label, zsum, wsum), None

  refs = (ax, h, w, b, labels)
  zeros = _varying(jnp.zeros((n,), acc), *refs)
  init = (_varying(jnp.full((n,), floor, acc), *refs), zeros, zeros, zeros,
          zeros)
  (c, s, x_label, zsum, wsum), _ = lax.scan(
      tile, init, jnp.arange(w.shape[1] // v, dtype=jnp.int32))
  if ax is not None:
    # Combine the devices' online logsumexps: one max and four sums per
    # token cross devices.
    c_local = c
    c = lax.pmax(c_local, ax)
    s = lax.psum(s * jnp.exp(c_local - c), ax)
    x_label = lax.psum(x_label, ax)
    if opts.smoothing:
      zsum = lax.psum(zsum + wsum * (c_local - c), ax)
      wsum = lax.psum(wsum, ax)
  log_s = jnp.log(_ce.mass(s))
  loss = log_s - (x_label - c)
  label_w = _label_weight(opts, weights, idx, first, vocab, acc)
  if not (isinstance(label_w, float) and label_w == 1.0):
    loss = label_w * loss
  if opts.smoothing:
    # (ε/C)·Σ w·(log s − z) = (ε/C)·(log s·Σw − Σ w·z).
    loss = loss + (opts.smoothing / max(total, 1)) * (log_s * wsum - zsum)
  if opts.z_loss:
    loss = loss + opts.z_loss * jnp.square(c + log_s)
  return jnp.where(ok, loss, fill), (h, w, b, labels, rows, weights, c, s)


def _vocab_bwd(static, res, ct):
  opts, v, vocab = static
  ax = opts.axis_name
  h, w, b, labels, rows, weights, c, s = res
  acc = _checks.compute_dtype(h.dtype)
  total = vocab * _ce.num_shards(ax)
  first = 0 if ax is None else lax.axis_index(ax) * vocab
  idx, ok, fill, _ = _ce.label_terms(labels, None, rows, total)
  label_w = _label_weight(opts, weights, idx, first, vocab, acc)
  wct = ct * jnp.where(ok, 1.0, fill)
  log_s = jnp.log(_ce.mass(s))
  k = label_w
  if opts.smoothing:
    mass = float(total) if weights is None else _ce.maybe_psum(jnp.sum(weights),
                                                          ax)
    k = k + opts.smoothing / max(total, 1) * mass
  if opts.z_loss:
    k = k + (2 * opts.z_loss) * (c + log_s)
  coef = (wct * k / _ce.mass(s))[:, None]
  at_label = (wct if isinstance(label_w, float) and label_w == 1.0 else
              wct * label_w)[:, None]

  def tile(carry, j):
    dh, dw, db = carry
    raw, cols, valid, w_t = _vocab_tile(h, w, b, j, v, vocab)
    if opts.cap is None:
      x = raw
    else:
      x, slope = _ce.capped_with_slope(raw, None, opts.cap)
    x = jnp.where(valid, x, -jnp.inf)
    # y − t on the tile: softmax·k − (label weight at the label + ε·w/C).
    g = jnp.exp(x - c[:, None]) * coef
    if opts.smoothing:
      cw = _smoothing_weights(weights, valid, j, v, acc)
      g = g - wct[:, None] * (opts.smoothing / max(total, 1)) * cw
    g = jnp.where(cols + first == idx[:, None], g - at_label, g)
    if opts.cap is not None:
      g = g * slope
    has = ok | jnp.isnan(fill)
    g = jnp.where(has[:, None] & valid, g, 0)
    g_in = g.astype(h.dtype)
    dh = dh + jnp.matmul(g_in, w_t.T, preferred_element_type=acc)
    dw = lax.dynamic_update_slice_in_dim(
        dw, jnp.matmul(h.T, g_in, preferred_element_type=acc), j * v, axis=1)
    if db is not None:
      db = lax.dynamic_update_slice_in_dim(db, jnp.sum(g, axis=0), j * v, 0)
    return (dh, dw, db), None

  refs = (ax, h, w, b, labels, ct)
  init = (_varying(jnp.zeros(h.shape, acc), *refs),
          _varying(jnp.zeros(w.shape, acc), *refs),
          None if b is None else _varying(jnp.zeros(b.shape, acc), *refs))
  (dh, dw, db), _ = lax.scan(
      jax.checkpoint(tile), init,
      jnp.arange(w.shape[1] // v, dtype=jnp.int32))
  dh = _ce.maybe_psum(dh, ax)  # each device holds part of h's gradient
  return _cotangents(dh, dw, db, h, w, b)


def _label_weight(opts, weights, idx, first, vocab, dtype):
  """``(1 − ε)·w_y`` for global labels ``idx``, this device holding classes
  ``[first, first + vocab)`` of ``weights`` (all of them without sharding)."""
  local = idx - first
  here = (local >= 0) & (local < vocab)
  label_w, _ = _ce.int_targets(opts, weights, None,
                               jnp.where(here, local, 0), vocab, dtype,
                               None if opts.axis_name is None else here)
  return label_w


def _vocab_fun(static, h, w, b, labels, rows, weights):
  return _vocab_fwd(static, h, w, b, labels, rows, weights)[0]


_vocab_lce = _rules.vjp_rule(_vocab_fun, _vocab_fwd, _vocab_bwd)


@functools.partial(jax.jit, static_argnames=("opts", "chunk_size",
                                             "ignore_index", "reduction"))
def _lce_jit(hidden, weight, labels, bias, class_weights, opts, chunk_size,
             ignore_index, reduction):
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
  _checks.finite(hidden, fn, "hidden")
  _checks.finite(weight, fn, "weight")

  n = math.prod(batch)
  h = hidden.reshape(n, d)
  y = labels.reshape(n)
  y, rows = _ce.ignore(y, None, ignore_index)
  _checks.in_range(y, vocab * _ce.num_shards(opts.axis_name), fn,
                   None if rows is None else ~rows)
  live = jnp.ones((n,), bool) if rows is None else rows
  if rows is not None:
    # Ignored tokens take no part at all: zeroing their features keeps even
    # a NaN in them out of dW (0·NaN would be NaN).
    h = jnp.where(rows[:, None], h, 0)
  if n >= vocab:
    # Tiles of tokens; the accumulator is dW [D, V]. Padding tokens (to
    # whole tiles) are masked rows: no loss, no gradient.
    chunk = chunk_size or default_chunk(n, vocab)
    pad = -n % chunk
    loss = _lce((opts, chunk), jnp.pad(h, ((0, pad), (0, 0))), weight, bias,
                jnp.pad(y, (0, pad)), jnp.pad(live, (0, pad)), weights)[:n]
  else:
    # Tiles of classes; the accumulator is dh [N, D]. Padding classes (to
    # whole tiles) have no mass and get no gradient.
    chunk = chunk_size or default_chunk(vocab, n)
    pad = -vocab % chunk
    loss = _vocab_lce(
        (opts, chunk, vocab), h, jnp.pad(weight, ((0, 0), (0, pad))),
        None if bias is None else jnp.pad(bias, (0, pad)), y, live,
        None if weights is None else jnp.pad(weights, (0, pad)))
  share = _ce.mean_share(reduction, y, None, rows, weights, vocab,
                         opts.axis_name)
  return _ce.reduce(loss.reshape(batch), reduction, share)


def linear_cross_entropy(
    hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike, *,
    bias: jax.typing.ArrayLike | None = None, chunk_size: int | None = None,
    ignore_index: int | None = None, label_smoothing: float = 0.0,
    z_loss: float = 0.0, logit_soft_cap: float | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none", axis_name: Any = None) -> jax.Array:
  r"""Cross-entropy of a linear head, ``CE(hidden @ weight + bias, labels)``,
  without materialising the ``[N, V]`` logits or their gradient.

  Equal, in value and in gradients with respect to ``hidden``, ``weight``
  and ``bias``, to
  ``softmax_cross_entropy_with_integer_labels(hidden @ weight + bias,
  labels, ...)`` with the same options (see that function for the formula
  and the options).

  .. math::
    L_n = \operatorname{CE}\bigl(h_n W + b,\ y_n\bigr), \qquad
    \frac{\partial L}{\partial h} = g\,W^\top, \quad
    \frac{\partial L}{\partial W} = \sum_{\text{tiles}} h^\top g, \quad
    \frac{\partial L}{\partial b} = \sum_{\text{tiles}} \textstyle\sum_n g,

  where ``g = softmax·k − t`` is the unfused loss's ``y - t`` gradient on
  one tile of logits, in float32.

  Computed one tile at a time inside a ``lax.scan``: tiles of
  ``chunk_size`` tokens when there are at least as many tokens as classes
  (the accumulator is ``dW``, ``[D, V]``), else tiles of ``chunk_size``
  classes with an online logsumexp (the accumulator is ``dh``, ``[N, D]``):
  the loop order with the smaller accumulator. Gradient (the VJP rule): the
  backward pass recomputes each tile of logits (one extra matmul per tile)
  and folds ``g`` into the gradients above, ``dW`` accumulated in float32.
  Every autodiff mode works (``jvp``, ``hessian``, HVPs), as for the
  unfused loss.

  Peak memory beyond inputs and outputs, in bytes, for ``N`` tokens, ``D``
  features, ``V`` classes and tiles of ``c``: about ``8·c·V`` (a float32
  tile of logits and its gradient) plus ``4·D·V`` (the float32 ``dW``)
  when looping over tokens, ``8·N·c + 4·N·D`` when looping over classes;
  plus ``8·N`` (each token's shift and sum). The unfused loss needs at
  least ``4·N·V``. ``chunk_size=None`` picks ``c`` so that one float32 tile
  is 1/64 of the full logits, clamped to 1–8 MiB (a multiple of 8 rows).

  Args:
    hidden: ``[..., D]`` floating features.
    weight: ``[D, V]`` head weight (a Dense kernel; for tied embeddings pass
      ``embedding.T``).
    labels: integer ``[...]`` targets (``hidden``'s shape without ``D``).
    bias: optional ``[V]`` bias.
    chunk_size: tokens (or classes, when ``N < V``) per tile; None: from
      the memory budget above.
    ignore_index, label_smoothing, z_loss, logit_soft_cap, class_weights,
      reduction: as in
      :func:`jsoft.softmax_cross_entropy_with_integer_labels`.
    axis_name: inside ``shard_map``, the mesh axis ``weight``'s V axis (and
      ``bias``, ``class_weights``) is sharded over, ``hidden`` and
      ``labels`` (global class indices) being the same on each device of
      it. Returns the global loss; the logits' max and sums cross devices
      per token (per tile when looping over tokens), ``dh`` is summed over
      the devices once, and each device's ``dW`` is its slice's: no
      all-gather of logits or weights. The loop order follows the local
      ``V``.

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
  if chunk_size is not None:
    chunk_size = _checks.static_int(chunk_size, fn, "chunk_size")
    if chunk_size < 1:
      raise ValueError(f"jsoft.{fn}: chunk_size must be at least 1, got "
                       f"{chunk_size}.")
  return _lce_jit(
      _checks.asarray(hidden), _checks.asarray(weight),
      _checks.asarray(labels), _checks.asarray(bias),
      _checks.asarray(class_weights),
      _ce.options(fn, label_smoothing, z_loss, logit_soft_cap, axis_name),
      chunk_size,
      _checks.static_int(ignore_index, fn, "ignore_index"),
      _checks.reduction(reduction, fn))
