"""The plain driver: the loss rule on whole rows of logits.

Each example's row is one block. The forward pass is the row max and the
rule's sums (a third pass, spelled apart, for a dense target), then the
per-example algebra; the gradient is one more pass,
:func:`jsoft._loss_rule.block_grad`, fed the per-example cotangents of the
sums (JAX's VJP of :func:`~jsoft._loss_rule.row_loss`).

With ``axis_name`` (the classes split over a mesh axis) the row max
crosses devices before the sums and the sums after them, as plain JAX
collectives around the rule's own VJP (:func:`differentiable_sums`).
Without it, one hand-written VJP covers the whole row, so that a call that
is not differentiated can take :func:`~jsoft._loss_rule.direct_loss`: for a
dense target (probability labels) that reads the logits and the targets
once instead of three and two times.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _collectives, _loss_rule, _rules, _spellings, _stats
from jsoft._loss_rule import Block, Sums, Target
from jsoft._options import Options
from jsoft._softcap import LogitMap


def loss(opts: Options, logits: jax.Array, valid: jax.Array | None,
         target: Target, dense: Any) -> jax.Array:
  """The per-example loss of ``logits`` ``[..., C]`` (classes last).

  Args:
    opts: the options (logit map, z-loss, the mesh axis of the classes).
    logits: raw logits (16-bit ones are computed in float32).
    valid: the entries taking part (``where``), or None.
    target: the per-example target (:mod:`jsoft._targets`).
    dense: the dense target ``u`` on the row, or None.
  """
  if opts.axis_name is None:
    numbers, arrays = target.split()
    return _row((opts.lmap, opts.z_loss, numbers), logits, valid, dense,
                *arrays)
  return _by_sums(opts, logits, valid, target, dense, stats=False)[0]


def loss_and_stats(opts: Options, logits: jax.Array, valid: jax.Array | None,
                   target: Target, dense: Any
                   ) -> tuple[jax.Array, _stats.TokenStats]:
  """:func:`loss` and the per-example :class:`jsoft.TokenStats` (integer
  labels), from one pass of the rule's sums with the entropy sum, and the
  argmax. Differentiable in every mode through the sums' rule, with or
  without ``axis_name``."""
  return _by_sums(opts, logits, valid, target, dense, stats=True)


def _by_sums(opts, logits, valid, target, dense, stats):
  """The loss (and with ``stats`` the statistics, else None) through the
  sums' own VJP rule, the collectives around it plain JAX."""
  ax = opts.axis_name
  block = Block(logits, valid, _collectives.first_class(ax, logits.shape[-1]),
                dense)
  shift = _collectives.pmax(
      _loss_rule.block_max(block, opts.lmap, target.label), ax)
  sums = _collectives.psum(
      differentiable_sums(opts.lmap, block, shift, target.label,
                          target.keep, entropy=stats), ax)
  loss = _loss_rule.row_loss(target, shift, sums, opts.z_loss)
  if not stats:
    return loss, None
  argmax = _collectives.pmin(
      _loss_rule.block_argmax(opts.lmap, block, shift), ax)
  return loss, _stats.from_sums(target, shift, sums, argmax)


class RowResiduals(NamedTuple):
  logits: jax.Array
  valid: jax.Array | None
  dense: Any
  arrays: tuple[Any, ...]  # the target's arrays (see Target.split)
  shift: jax.Array
  sums: _loss_rule.Sums
  exp: jax.Array  # the forward's e^z, which the gradient scales


def _with_mass(target: Target, dense: Any) -> Target:
  """The target, with its dense part's mass ``U = Σ u`` summed here when
  the caller left it to the driver (None)."""
  if target.dense_mass is not None or dense is None:
    return target
  # A 16-bit target (see jsoft._targets.narrow_float) is summed in float32.
  wide = jnp.float32 if jnp.dtype(dense.dtype).itemsize == 2 else None
  return target._replace(dense_mass=jnp.sum(dense, axis=-1, dtype=wide))


def _forward(lmap, z_loss, block, target, keeps_exp=True):
  """The loss by the rule's sums: ``(loss, shift, sums, e^z)``.

  ``keeps_exp``: the gradient will scale the ``e^z`` (the VJP rule's
  forward), so the shift is spelled to read the label's logit first
  (:func:`jsoft._spellings.after_label`), and the dense sum may be taken
  product first (:func:`jsoft._spellings.dense_sum_product_first`: its
  cond holds a computed target, which the gradient stores anyway). Without
  a gradient nothing is written over the logits, and that ordering costs a
  forward pass (measured at 1024×1000 float32: 852 µs against 661, 2-core
  AMD EPYC).
  """
  target = _with_mass(target, block.dense)
  shift = _loss_rule.block_max(block, lmap,
                               target.label if keeps_exp else None)
  sums, e = _loss_rule.block_sums_and_exp(lmap, block, shift, target.label,
                                          product_first=keeps_exp)
  loss = _loss_rule.row_loss(target, shift, sums, z_loss, _inline(block))
  return loss, shift, sums, e


def _inline(block: Block) -> bool:
  """Whether the row rule's program may run on XLA CPU's calling thread: a
  dense target on :func:`jsoft._spellings.inline_sized` logits."""
  return (block.dense is not None
          and _spellings.inline_sized(block.logits.size))


def _row_fun(static, logits, valid, dense, *arrays):
  lmap, z_loss, numbers = static
  block, target = Block(logits, valid, 0, dense), Target.join(numbers, arrays)

  def by_sums():
    return _forward(lmap, z_loss, block, target, keeps_exp=False)[0]

  if (dense is None or jnp.ndim(dense) == 0 or valid is not None
      or target.dense_mass is not None or not logits.shape[-1]):
    # Nothing to gain (one target for every class, masked entries), or the
    # target is smoothed: the cond would store it.
    return by_sums()
  if _spellings.few_logits(logits.size):
    # Too small to pay for the cond: the exact spelling, no fallback.
    return _loss_rule.direct_loss(lmap, block, target, z_loss, exact=True)
  fast = _loss_rule.direct_loss(lmap, block, target, z_loss)
  return lax.cond(jnp.any(jnp.isnan(fast)), by_sums, lambda: fast)


def _row_fwd(static, logits, valid, dense, *arrays):
  lmap, z_loss, numbers = static
  block, target = Block(logits, valid, 0, dense), Target.join(numbers, arrays)
  out, shift, sums, e = _forward(lmap, z_loss, block, target)
  # The gradient scales the forward's e^z (see _loss_rule._sums_fwd).
  return out, RowResiduals(logits, valid, dense, arrays, shift, sums, e)


def _row_bwd(static, res: RowResiduals, ct):
  lmap, z_loss, numbers = static
  logits, dense, shift, sums, arrays = (res.logits, res.dense, res.shift,
                                        res.sums, res.arrays)
  block = Block(logits, res.valid, 0, dense)
  target = Target.join(numbers, arrays)

  # The per-example cotangents of the sums and of the target's mass U (or,
  # where the driver sums U, of u through it), then the y − t tile.
  lazy = target.dense_mass is None

  def by_sums(s, mass_or_u):
    full = (_with_mass(target, mass_or_u) if lazy else
            target._replace(dense_mass=mass_or_u))
    return _loss_rule.row_loss(full, shift, s, z_loss, _inline(block))

  # Inside shard_map, the sums may be the same on devices where the loss
  # and its cotangent differ (replicated logits, split labels): typed as
  # varying with ct, JAX's VJP leaves their cotangents per device, and each
  # gradient below is summed over those devices once (summed_like).
  mass_in = dense if lazy else target.dense_mass
  ct_sums, ct_mass = jax.vjp(
      by_sums, *_collectives.varying_tree((sums, mass_in), ct))[1](ct)
  g, g_dense = _loss_rule.block_grad(lmap, block, shift, target.label,
                                     target.keep, ct_sums, res.exp,
                                     for_transpose=True)
  g = _collectives.summed_like(g, logits).astype(logits.dtype)
  if g_dense is not None:
    if lazy:
      g_dense = g_dense + ct_mass.astype(g_dense.dtype)
      if target.keep is not None:
        g_dense = jnp.where(target.keep[..., None], g_dense, 0)
    g_dense = _collectives.summed_like(g_dense, dense).astype(dense.dtype)
  ct_arrays = [None] * len(arrays)
  mass = arrays[_MASS]
  if mass is not None and not lazy:  # a per-example mass, from the labels
    ct_arrays[_MASS] = _collectives.summed_like(ct_mass, mass).astype(
        mass.dtype)
  return (g, None, g_dense, *ct_arrays)


_MASS = Target._fields.index("dense_mass")
_row = _rules.vjp_rule(_row_fun, _row_fwd, _row_bwd)


# ------------------------------------------------- sums across devices


class SumsResiduals(NamedTuple):
  block: Block
  label: jax.Array | None
  keep: jax.Array | None
  shift: jax.Array
  exp: jax.Array  # the forward's e^z, which the gradient scales


def _sums_fun(static, logits, mask, first, dense, label, keep, shift):
  lmap, entropy = static
  out = _loss_rule.block_sums(lmap, Block(logits, mask, first, dense), shift,
                              label, entropy)
  # Typed to vary like every input, so cotangents arrive per device
  # (see jsoft._collectives).
  return _collectives.varying_tree(out, logits, mask, dense, label, keep,
                                   shift)


def _sums_fwd(static, logits, mask, first, dense, label, keep, shift):
  lmap, entropy = static
  block = Block(logits, mask, first, dense)
  # The gradient scales the forward's e^z rather than recompute them: the
  # exp (and the cap's tanh), not memory, bounds these passes, and XLA
  # writes e into the buffer the gradient then takes (the logits', when
  # they die here).
  out, e = _loss_rule.block_sums_and_exp(lmap, block, shift, label, entropy)
  out = _collectives.varying_tree(out, logits, mask, dense, label, keep,
                                  shift)
  return out, SumsResiduals(block, label, keep, shift, e)


def _sums_bwd(static, res: SumsResiduals, ct):
  lmap, _ = static
  block = res.block
  g, g_dense = _loss_rule.block_grad(lmap, block, res.shift, res.label,
                                     res.keep, ct, res.exp, for_transpose=True)
  g = _collectives.summed_like(g, block.logits).astype(block.logits.dtype)
  if g_dense is not None:
    g_dense = _collectives.summed_like(g_dense, block.dense).astype(
        block.dense.dtype)
  return g, None, None, g_dense, None, None, None


_sums = _rules.vjp_rule(_sums_fun, _sums_fwd, _sums_bwd)


def differentiable_sums(lmap: LogitMap | None, block: Block, shift: jax.Array,
         label: jax.Array | None, keep: jax.Array | None,
         entropy: bool = False) -> Sums:
  """:func:`block_sums`, differentiable in every mode through
  :func:`block_grad` (with respect to the logits and a per-example dense
  target)."""
  return _sums((lmap, entropy), block.logits, block.mask, block.first,
               block.dense, label, keep, lax.stop_gradient(shift))
