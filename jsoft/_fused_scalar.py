r"""The fused head reduced to a scalar: gradients formed in the forward pass.

When ``linear_cross_entropy`` is reduced to a scalar, ``L = Σ_n k_n·L_n``
with constant per-token coefficients ``k`` (1, the sample weight, over the
"mean" denominator), the cotangent of every token's sums is known as soon
as the token's whole row has been seen: a tile of tokens (all classes)
gives its sums, the per-token algebra's VJP at ``k`` gives their
cotangents, and :func:`jsoft._loss_rule.block_grad` gives the gradient
tile ``g`` at once. The forward pass of the VJP rule therefore folds
``g`` into ``dh = g Wᵀ``, ``dW += hᵀ g`` and ``db += Σ g`` while it has the
tile, and the backward pass only scales them by the incoming cotangent:
three matmuls per tile, not four (the recomputed logits are gone). A call
that is not differentiated runs the plain loop (no gradient work).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks, _collectives, _compat, _fused, _loss_rule, _rules
from jsoft._loss_rule import Block, Target


class Grads(NamedTuple):
  hidden: jax.Array  # [N, D], ∂L/∂h for a unit cotangent
  weight: jax.Array  # [D, V] float32
  bias: jax.Array | None  # [V] float32


def _rows(x: Any, start, size: int) -> Any:
  """Rows ``start:start+size`` of a per-token array (numbers pass)."""
  if not isinstance(x, jax.Array) or x.ndim == 0:
    return x
  return lax.dynamic_slice_in_dim(x, start, size)


def _loss_fun(static, h, w, b, coef, dense, *target_arrays):
  loop, z_loss, numbers = static
  target = Target.join(numbers, target_arrays)
  shift, sums, _ = _fused.head_sums(loop._replace(stats=False), h, w, b,
                                    target.label, target.keep, dense)
  return jnp.sum(coef * _loss_rule.row_loss(target, shift, sums, z_loss))


def _loss_fwd(static, h, w, b, coef, dense, *target_arrays):
  loop, z_loss, numbers = static
  target = Target.join(numbers, target_arrays)
  n, c = h.shape[0], loop.chunk
  acc = _checks.compute_dtype(h.dtype)
  first = 0
  count, start_of = _fused._tile_starts(n, c)

  def tile(carry, j):
    total, dw, db = carry
    start = start_of(j)
    h_t = lax.dynamic_slice_in_dim(h, start, c)
    t = Target(*(_rows(v, start, c) for v in target))
    k = lax.dynamic_slice_in_dim(coef, start, c)
    if n % c:  # the last tile's first rows are the previous tile's
      own = _fused._own(j, start, c, (c,), 0)
      k = jnp.where(own, k, 0)
      t = t._replace(keep=own if t.keep is None else t.keep & own)
    block = Block(_fused._tile_logits(h_t, w, b), None, first, dense)
    m = _loss_rule.block_max(block, loop.lmap)
    sums, e = _loss_rule.block_sums_and_exp(loop.lmap, block, m, t.label)
    loss, pull = jax.vjp(lambda s: _loss_rule.row_loss(t, m, s, z_loss), sums)
    (ct_sums,) = pull(_collectives.varying_like(k.astype(loss.dtype), loss))
    g, _ = _loss_rule.block_grad(loop.lmap, block, m, t.label, t.keep,
                                 ct_sums, e)
    g_in = g.astype(h.dtype)
    dh_t = _compat.matmul(g_in, w.T, acc)
    dw = dw + _fused.weight_grad(h_t, g_in, acc)
    if db is not None:
      db = db + jnp.sum(g, axis=0)
    total = total + jnp.sum(k * loss)
    return (total, dw, db), dh_t

  # Typed to vary like every input inside shard_map (a scan carry keeps
  # one type; see jsoft._collectives).
  refs = (h, w, b, coef, dense, *target_arrays)
  init = _collectives.varying_tree(
      (jnp.zeros((), acc), jnp.zeros(w.shape, acc),
       None if b is None else jnp.zeros(b.shape, acc)), *refs)
  (total, dw, db), dh = lax.scan(tile, init,
                                 jnp.arange(count, dtype=jnp.int32))
  dh = _fused._untile(dh, n, c)
  # Per device, float32: the backward pass scales them by each device's
  # cotangent, then sums each over the mesh axes its input is replicated on.
  return total, (Grads(dh, dw, db), Grads(h, w, b))


def _loss_bwd(static, res, ct):
  _, _, numbers = static
  grads, primals = res

  def scaled(g, primal):
    if g is None:
      return None
    g = _collectives.summed_like(ct.astype(g.dtype) * g, primal)
    return g.astype(primal.dtype)

  return (scaled(grads.hidden, primals.hidden),
          scaled(grads.weight, primals.weight),
          scaled(grads.bias, primals.bias), None, None,
          *([None] * len(numbers)))


_loss = _rules.vjp_rule(_loss_fun, _loss_fwd, _loss_bwd)


def scalar_loss(loop: _fused.Loop, z_loss: float, h, w, b, target: Target,
                dense: Any, coef: jax.Array) -> jax.Array:
  """``Σ_n coef_n·L_n`` over tiles of ``loop.chunk`` tokens (all classes
  per tile), its gradients with respect to ``h``, ``w`` and ``b`` formed in
  the forward pass when it is differentiated."""
  numbers, arrays = target.split()
  return _loss((loop, z_loss, numbers), h, w, b, coef, dense, *arrays)
