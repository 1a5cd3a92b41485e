r"""The softmax cross-entropy rule, written once for a block of logits.

Every softmax loss in jsoft is, per example,

.. math::
  L = -\sum_c t_c \log\operatorname{softmax}(\tilde x)_c
      + \lambda_z \operatorname{lse}(\tilde x)^2,
  \qquad t = \lambda\,\mathrm{onehot}(y) + u,

with ``x̃`` the logits the softmax sees (soft-capped, divided by the
temperature, masked: :class:`jsoft._softcap.LogitMap`) and a target in two
parts: a label part (integer labels: ``λ = (1 − ε)·w_y``) and a dense part ``u``
(label smoothing ``ε·w/C``, or a whole probability target). With the shift
``c = max x̃`` (held constant: nothing depends on it) and ``z = x̃ − c``,
``L`` reads the logits only through three sums per example,

.. math::
  s = \sum_c e^{z_c}, \qquad \tilde x_y, \qquad
  \textstyle\sum_c u_c z_c = -d \;\le 0, \qquad
  L = \lambda(\log s - z_y) + U\log s + d + \lambda_z (c + \log s)^2,

(``U = Σ u``), so any block of the classes — a whole row, one device's
shard, one tile of an LM head's vocabulary — contributes its own
:class:`Sums`, and blocks combine by addition once moved to a common shift
(:func:`rebase`). Nothing cancels: ``log s ≥ 0`` and ``d ≥ 0``.

:func:`block_sums` computes a block's sums; :func:`block_grad` is their
VJP, the seed post's ``y − t`` (README, "Where jsoft began") on the
block. With ``∂L/∂s = (λ + U + 2λ_z·lse)/s``, ``∂L/∂x̃_y = −λ`` and
``∂L/∂d = 1`` it is

.. math::
  \frac{\partial L}{\partial \tilde x} = \operatorname{softmax}(\tilde x)
  \,(\lambda + U + 2\lambda_z\operatorname{lse}) - \lambda\,\mathrm{onehot}(y)
  - u = \operatorname{softmax}(\tilde x)\textstyle\sum_c t_c - t
  \;(+\,2\lambda_z\operatorname{lse}\operatorname{softmax}),

times ``dx̃/dx`` (the cap's and the temperature's slope): one elementwise pass,
no one-hot array. :func:`row_loss`, the per-example algebra above, is plain JAX
and differentiated by JAX, as are the collectives that combine devices' sums.
The drivers call these: :func:`jsoft._plain.differentiable_sums` (the
block's sums with :func:`block_grad` as their VJP rule, every autodiff
mode) for sharded rows;
:func:`block_sums`, :func:`block_grad` and :func:`row_loss` inside their own
VJP rules for the whole-row plain loss (:mod:`jsoft._plain`) and for each tile
of the fused heads (:mod:`jsoft._head`, :mod:`jsoft._drivers`).
:func:`direct_loss` is
:func:`row_loss` of a whole row evaluated as one chain of reductions, for a
forward pass alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks, _spellings
from jsoft._softcap import LogitMap, apply
from jsoft._softmax import masked, mass, nan_where, row_shift


class Target(NamedTuple):
  """Each example's target ``t = λ·onehot(y) + u`` and whether it has a
  loss. Fields are shaped like the examples; a number that is the same for
  all of them may be a Python float."""
  label: jax.Array | None  # y: int32 global class index; None: no label part
  label_mass: Any  # λ, the target's mass at the label
  dense_mass: Any  # U = Σ_c u_c (0 without a dense part)
  weight: Any  # the example's share of "mean" when it has a loss
  has_loss: jax.Array | None  # bool; None: every example has a loss
  invalid: jax.Array | None  # label out of range: NaN loss and gradient
  keep: jax.Array | None  # has a gradient (else an exact 0); None: all

  def split(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The Python numbers (compile-time, for a rule's static argument) and
    the arrays (its operands), each None where the other holds the field."""
    numbers = tuple(None if isinstance(v, jax.Array) else v for v in self)
    arrays = tuple(v if isinstance(v, jax.Array) else None for v in self)
    return numbers, arrays

  @staticmethod
  def join(numbers, arrays) -> Target:
    """The inverse of :meth:`split`."""
    return Target(*(n if a is None else a
                    for n, a in zip(numbers, arrays, strict=True)))


class Block(NamedTuple):
  """A block of classes of every example: a row, a shard or a tile."""
  logits: jax.Array  # [..., width] raw logits x (x̃ is their LogitMap)
  # bool, broadcastable to logits: the entries that take part (a max, a
  # sum and the gradient skip the others); None: all of them
  mask: jax.Array | None
  first: Any  # the global index of the block's first class
  dense: Any  # u on the block, broadcastable to logits; None: no dense part
  # float, broadcastable to logits, 0 or hugely negative: added to the
  # logits, for real logits another block counts (the fused head's
  # overlapping class tile: a sum skips them, a max may see them twice);
  # None: none. Never together with a mask.
  bias: jax.Array | None = None


def _masking(block: Block) -> jax.Array | None:
  """The block's mask or its bias, as :mod:`jsoft._spellings` takes it."""
  return block.mask if block.bias is None else block.bias


class Sums(NamedTuple):
  """A block's sums per example, relative to the shift ``c``."""
  exp: jax.Array  # s = Σ e^(x̃ − c)
  label: jax.Array | None  # x̃_y, or 0 where y is not in the block
  # Σ u·(x̃ − c) = −d ≤ 0, −inf for mass on −inf (stored with its own
  # sign: no negation per example; the loss subtracts it)
  dense: jax.Array | None
  # Σ e^z·(−z) ≥ 0 (0 for z = −inf), for the entropy log s + entropy/s;
  # None unless the caller asks for statistics.
  entropy: jax.Array | None = None


def _raw(block: Block) -> jax.Array:
  """The block's logits in the compute dtype (float32 for 16-bit)."""
  return block.logits.astype(_checks.compute_dtype(block.logits.dtype))


def _dense(block: Block) -> Any:
  """The block's dense target in the compute dtype: a 16-bit one (see
  :func:`jsoft._targets.narrow_float`) is cast where each pass reads it."""
  u = block.dense
  if getattr(u, "dtype", None) is not None and jnp.dtype(u.dtype).itemsize == 2:
    u = u.astype(_checks.compute_dtype(u.dtype))
  return u


def block_max(block: Block, lmap: LogitMap | None,
              label: jax.Array | None = None) -> jax.Array:
  """The block's row max of ``x̃`` (no gradient), at least the most
  negative float (mapped), so a block with no mass shifts by a finite
  number. Mapped after the max: the logit map is increasing.

  With ``label``, the label's logit takes part too (it is one of the
  entries, so the max is the same): see :func:`jsoft._spellings.after_label`.
  """
  x = _raw(block)
  # The max of 16-bit logits is exact at their own width: read at it (a
  # float32 copy of them is then no operand of this pass).
  c = row_shift(masked(block.logits, block.mask), (-1,))[..., 0].astype(
      x.dtype)
  if label is not None and x.shape[-1]:
    x_label, present = _gather(block, label)
    c = _spellings.after_label(c, jnp.where(present, x_label, -jnp.inf))
  if lmap is None:
    return c
  if lmap.cap is None and lmap.scale > 1:
    # T < 1 would take the floor to -inf (a row with no mass): keep it.
    return jnp.maximum(apply(c, lmap), -float(jnp.finfo(c.dtype).max))
  return apply(c, lmap)


def _gather(block: Block, label: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The label's raw logit, and whether it is in the block and valid."""
  x = _raw(block)
  width = x.shape[-1]
  # Read as unsigned, a label left of the block wraps past its end: one
  # compare says whether it is in the block, one min keeps the index in
  # it, and the gather then needs no bounds handling of its own (a few ops
  # per example, which count at small sizes).
  local = lax.bitcast_convert_type(
      jnp.asarray(label - block.first, jnp.int32), jnp.uint32)
  present = local < width
  at = jnp.minimum(local, width - 1)[..., None]
  x_label = jnp.take_along_axis(x, at, axis=-1,
                                mode="promise_in_bounds")[..., 0]
  if _masking(block) is not None:
    valid = jnp.broadcast_to(_spellings.kept(_masking(block)), x.shape)
    present = present & jnp.take_along_axis(
        valid, at, axis=-1, mode="promise_in_bounds")[..., 0]
  return x_label, present


def _label_logit(block: Block, label: jax.Array,
                 lmap: LogitMap | None) -> jax.Array:
  """``x̃_y`` where the label is a valid class of the block, else 0."""
  if block.logits.shape[-1] == 0:
    return jnp.zeros(label.shape, _raw(block).dtype)
  x_label, present = _gather(block, label)
  if lmap is not None:
    x_label = apply(x_label, lmap)
  return jnp.where(present, x_label, 0)


def block_sums_and_exp(lmap: LogitMap | None, block: Block, shift: jax.Array,
                       label: jax.Array | None, entropy: bool = False,
                       product_first: bool = False
                       ) -> tuple[Sums, jax.Array]:
  """:func:`block_sums`, and the ``e^z`` it summed (for the gradient).
  ``product_first``: a caller that does not differentiate this function may
  have the dense sum taken by
  :func:`jsoft._spellings.dense_sum_product_first` where that pays."""
  c = shift[..., None]
  x = _raw(block)
  z = _spellings.shifted(x, c, _masking(block), lmap)
  e = jnp.exp(z)
  x_label = None if label is None else _label_logit(block, label, lmap)
  d = None
  if block.dense is not None:
    u = _dense(block)
    if (product_first and jnp.ndim(u) and _spellings.product_sum_first(
        x.shape, _masking(block) is not None)):
      # (Each branch shifts the logits as it reads them: see there.)
      d = _spellings.dense_sum_product_first(u, lambda: _spellings.shifted(
          _raw(block), c, None, lmap, _spellings.SECOND))
    else:
      # An inline-sized block shares z: no [N, C] temp is at stake there,
      # and the SECOND spelling's negated shift is a flop per row.
      z2 = (z if _spellings.inline_sized(x.size) else _spellings.shifted(
          x, c, _masking(block), lmap, _spellings.SECOND))
      d = _spellings.dense_sum(u, z2)
  h = None
  if entropy:
    h = jnp.sum(e * -_spellings.finite(z), axis=-1)
  return Sums(jnp.sum(e, axis=-1), x_label, d, h), e


def block_sums(lmap: LogitMap | None, block: Block, shift: jax.Array,
               label: jax.Array | None, entropy: bool = False) -> Sums:
  """The block's :class:`Sums` relative to ``shift`` (``[...]``); with
  ``entropy``, also ``Σ e^z·(−z)``."""
  return block_sums_and_exp(lmap, block, shift, label, entropy)[0]


# The argmax sentinel: no class of the block reaches the shift.
NO_CLASS = 2**31 - 1


def block_argmax(lmap: LogitMap | None, block: Block,
                 shift: jax.Array) -> jax.Array:
  """The global index of the block's first class whose ``x̃`` equals
  ``shift`` (the row max, so the lowest-index argmax, as ``jnp.argmax``),
  or :data:`NO_CLASS`; int32, no gradient. One min-reduction, no variadic
  reduce (slow on XLA CPU)."""
  # x̃ compared with the shift, the map of the raw max: the same bits where
  # x̃ is the max. Not x̃ − c == 0: XLA may contract x·r − c into a fused
  # multiply-add, which does not round x·r.
  x = masked(_spellings.mapped(lax.stop_gradient(_raw(block)), lmap,
                            _spellings.SECOND), block.mask)
  cols = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) + block.first
  top = x == lax.stop_gradient(shift)[..., None]
  return jnp.min(jnp.where(top, cols, NO_CLASS), axis=-1, initial=NO_CLASS)


def direct_loss(lmap: LogitMap | None, block: Block, target: Target,
                z_loss: float, exact: bool = False) -> jax.Array:
  """:func:`row_loss` of a whole row (at least one class, no masked
  entries), evaluated as one chain of reductions,
  ``Σ_c t_c·(log s − z_c) + λ_z·lse²``, which XLA CPU runs as one kernel
  that reads each row of the logits and the target once.

  Equal to :func:`row_loss` wherever it is not NaN; it is NaN where a zero
  target meets a ``-inf`` logit (``0·inf``), on a row with no mass, and for
  NaN inputs, and the caller then takes :func:`row_loss` instead. With
  ``exact`` it equals :func:`row_loss` everywhere: the shift has its floor
  and ``s`` its guard (:func:`jsoft._softmax.mass`), so a row with no mass
  reads ``log s = 0``, and a select drops each term of a zero target, so
  ``0·inf`` never forms (one more op per logit, for calls too small to
  pay for the caller's fallback). Forward only (never differentiated).
  """
  x = _raw(block)
  if exact:
    shift = lax.stop_gradient(block_max(block, lmap))
  else:
    # The max of 16-bit logits is exact in their own width: read at it.
    shift = lax.stop_gradient(
        jnp.max(block.logits, axis=-1).astype(x.dtype))
    if lmap is not None:
      shift = apply(shift, lmap)
  c = shift[..., None]
  z = _spellings.shifted(x, c, None, lmap)
  s = jnp.sum(jnp.exp(z), axis=-1, keepdims=True)
  log_s = jnp.log(mass(s) if exact else s)
  # (16-bit logits: the shared z, see jsoft._spellings.)
  if (not _spellings.one_kernel(x.size // max(x.shape[-1], 1))
      and x.dtype == block.logits.dtype):
    z = _spellings.shifted(x, c, None, lmap, _spellings.SECOND)
  terms = _dense(block) * (log_s - z)
  if exact:
    terms = jnp.where(block.dense == 0, 0, terms)
  loss = jnp.sum(terms, axis=-1)
  log_s = log_s[..., 0]
  if target.label is not None:
    loss = loss + target.label_mass * (
        log_s - (_label_logit(block, target.label, lmap) - shift))
  if z_loss:
    loss = loss + z_loss * jnp.square(shift + log_s)
  return finish(loss, target)


def block_grad(lmap: LogitMap | None, block: Block, shift: jax.Array,
               label: jax.Array | None, keep: jax.Array | None,
               ct: Sums, exp: jax.Array | None = None,
               for_transpose: bool = False
               ) -> tuple[jax.Array, jax.Array | None]:
  """The VJP of :func:`block_sums`: ``(∂/∂logits, ∂/∂dense)``.

  ``∂/∂logits = (e^z·ct.exp + onehot(y)·ct.label + u·ct.dense)·dx̃/dx``;
  ``∂/∂dense = z·ct.dense`` (``−inf`` where ``x̃ = −inf``), None when the
  dense target is broadcast over the examples (then a constant). Examples
  outside ``keep`` get an exact 0, whatever their logits hold. ``exp``:
  the forward's ``e^z``, if it kept them (the plain driver), else they are
  recomputed (the fused head's tiles). ``for_transpose``: JAX transposes
  this function (the plain driver's rule in reverse mode, see
  :mod:`jsoft._rules`), so the label's term is spelled for its transpose.
  """
  gap, slope = _spellings.gap_with_slope(_raw(block), shift[..., None],
                                        _masking(block), lmap)
  e = jnp.exp(-gap) if exp is None else exp
  g = e * ct.exp[..., None]
  if ct.entropy is not None:
    # ∂(e^z·(−z))/∂z = −e^z·(1 + z), with z = −gap clamped (0 at −inf).
    g = g - (e * (1 + _spellings.finite(-gap))) * ct.entropy[..., None]
  if block.dense is not None:
    g = g + ct.dense[..., None] * _dense(block)
  if label is not None:
    cols = lax.broadcasted_iota(jnp.int32, gap.shape, gap.ndim - 1)
    hit = cols == (label - block.first)[..., None]
    if for_transpose:
      # A select against 0, added: its transpose is one select and one add
      # per logit, where the transpose of a select between g + ct and g is
      # two of each (which costs a tiny call XLA CPU's inline dispatch).
      g = g + jnp.where(hit, ct.label[..., None], 0)
    else:
      # (Run as written, this spelling holds less in the fused heads' tiles.)
      g = jnp.where(hit, g + ct.label[..., None], g)
  if slope is not None:
    g = g * slope
  if keep is not None:
    g = jnp.where(keep[..., None], g, 0)
  g_dense = None
  if block.dense is not None and jnp.shape(block.dense) == gap.shape:
    # z = −gap: the sign on the per-example cotangent, not per logit.
    g_dense = gap * (-ct.dense)[..., None]
    if keep is not None:
      g_dense = jnp.where(keep[..., None], g_dense, 0)
  return g, g_dense


def rebase(sums: Sums, shift: jax.Array, new_shift: jax.Array,
           dense_mass: Any) -> Sums:
  """``sums`` relative to ``new_shift ≥ shift`` instead (``dense_mass`` is the
  block's ``Σ u``). Both changes have the sign of the sums: exact."""
  moved = jnp.exp(shift - new_shift)
  dense = None
  if sums.dense is not None:
    dense = sums.dense - dense_mass * (new_shift - shift)
  entropy = None
  if sums.entropy is not None:
    # Σ e^z'·(−z') with z' = z − δ, δ = new_shift − shift ≥ 0:
    # e^−δ·(Σ e^z·(−z) + δ·s); 0 for a block with no mass.
    entropy = jnp.where(sums.exp == 0, 0,
                        (sums.entropy + (new_shift - shift) * sums.exp) * moved)
  return Sums(sums.exp * moved, sums.label, dense, entropy)


def add(a: Sums, b: Sums) -> Sums:
  """The sums of two blocks with the same shift."""
  return jax.tree.map(jnp.add, a, b)


def row_loss(target: Target, shift: jax.Array, sums: Sums,
             z_loss: float, inline: bool = False) -> jax.Array:
  """The per-example loss from a whole row's sums (plain JAX). ``inline``:
  guard ``s`` with :func:`jsoft._spellings.inline_mass`."""
  guard = _spellings.inline_mass if inline else mass
  log_s = jnp.log(guard(sums.exp))
  loss = None
  if target.label is not None:
    # −log softmax(x̃)_y = log s − (x̃_y − c): from the shifted logits, so
    # [-1000]*3 gives log 3 − 0 exactly. A label without mass gives +inf.
    loss = log_s - (sums.label - shift)
    if not (isinstance(target.label_mass, float)
            and target.label_mass == 1.0):
      loss = target.label_mass * loss
  if sums.dense is not None:
    dense = log_s * target.dense_mass - sums.dense  # Σ u·(log s − z)
    loss = dense if loss is None else loss + dense
  if z_loss:
    loss = loss + z_loss * jnp.square(shift + log_s)
  return finish(loss, target)


def finish(loss: jax.Array, target: Target) -> jax.Array:
  """An exact 0 for examples without a loss; NaN, in the loss and its
  gradient, for a label out of range."""
  counted = target.has_loss
  if target.invalid is not None:
    loss = loss * (1 + nan_where(target.invalid, loss.dtype))
    if counted is not None:
      counted = counted | target.invalid
  return loss if counted is None else jnp.where(counted, loss, 0)
