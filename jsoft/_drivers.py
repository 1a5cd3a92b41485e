r"""Two VJP rules for any *row rule*: a loss that sees whole rows of logits.

A row rule (the cross-entropy rule of :mod:`jsoft._linear_cross_entropy`,
the distillation rule of :mod:`jsoft._linear_distillation`) says, for one
tile of tokens of a head ``h @ W + b`` (all classes per tile), what each
token's loss is and what the gradient tile ``g = ∂(Σ k·L)/∂logits`` is for
per-token coefficients ``k``. It is a hashable NamedTuple with three
methods, each given the tile's rows ``h_t`` of the head's features, its
``W`` and ``b``, its rows of the per-token operands ``tokens`` (a tuple),
the operands that are not per token ``whole`` (a tuple: a teacher's head,
a smoothing target), and ``own`` (the tile's own rows: a boolean array, or
True):

* ``forward(...) -> (loss, residuals)``: the loss ``[c]`` and what the
  gradient needs per token (a tree of ``[c, ...]`` arrays);
* ``backward(..., residuals, k) -> g``: the gradient tile ``[c, V]``,
  exactly 0 on rows that are not ``own`` or have no loss;
* ``forward_and_backward(..., k) -> (loss, g)``: both from one tile of
  logits; a rule with ``aux`` (a class attribute, True) returns
  ``(loss, g, extra)``, ``extra`` a tree of ``[c, ...]`` arrays per token
  that :func:`reduced` hands back beside the sum (no gradient: a policy
  loss's log-probabilities for its statistics).

The drivers run them in :func:`jsoft._tiling.scan_tokens` and fold each
``g`` into ``dh``, ``dW``, ``db`` (:func:`jsoft._tiling.fold`):

* :func:`reduced`, ``Σ_n k_n·L_n`` with constant coefficients ``k`` (a
  "sum" or "mean" reduction): the cotangent of each token's loss is known
  as soon as its row has been seen, so the forward pass forms ``g`` and
  folds it while it has the tile, and the backward pass only scales the
  folded gradients by the incoming cotangent (three matmuls per tile, as
  many as an unfused loss's forward and backward); a call that is not
  differentiated runs the forward alone;
* :func:`per_token`, the loss ``[N]``: the backward pass recomputes each
  tile and forms ``g`` from the per-token cotangents.

* :func:`two_pass`, any scalar function ``F`` of the per-token losses (a
  preference loss of the sequences' sums): the forward pass runs the tiles
  once for the losses, takes ``F`` and its gradient ``k = ∂F/∂L`` (one
  coefficient per token), then runs :func:`reduced`'s forward with those
  ``k``; the backward pass only scales (four matmuls per tile, where the
  per-token driver's recompute under ``F`` also takes four but JAX
  transposes its loop twice).

All skip the tiles past ``kept`` (ignored tokens gathered out:
:class:`jsoft._compaction.Compaction`), and every autodiff mode works
(:mod:`jsoft._rules`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jsoft import _checks, _collectives, _rules
from jsoft import _tiling as tiling


class Static(NamedTuple):
  rule: Any  # the row rule (hashable)
  tokens: int  # tokens per tile
  count: int  # how many per-token operands
  whole: int  # how many other operands

  @property
  def aux(self) -> bool:
    """Whether the rule also gives per-token outputs (``extra``)."""
    return bool(getattr(self.rule, "aux", False))


def _split(static: Static, operands):
  return (tuple(operands[:static.count]), tuple(operands[static.count:]))


def _tile(static: Static, h, operands, start):
  """The tile's rows of ``h`` and of the per-token operands."""
  tokens, whole = _split(static, operands)
  size = static.tokens
  return (tiling.rows(h, start, size),
          tuple(tiling.rows(x, start, size) for x in tokens), whole)


def _refs(h, w, b, operands, *more):
  return (h, w, b, *jax.tree.leaves(operands), *more)


# ----------------------------------------------------- reduced to a scalar


def _reduced_fwd(static: Static, h, w, b, coef, kept, *operands):
  acc = _checks.compute_dtype(h.dtype)
  tiles = tiling.Tiles(h.shape[0], static.tokens)
  refs = _refs(h, w, b, operands, coef)

  def tile(carry, j, start, own):
    del j
    total, dw, db = carry
    h_t, tokens, whole = _tile(static, h, operands, start)
    k = tiling.rows(coef, start, tiles.size)
    if own is not True:
      k = jnp.where(own, k, 0)
    loss, g, *extra = static.rule.forward_and_backward(h_t, w, b, tokens,
                                                       whole, own, k)
    dh_t, dw_t, db_t = tiling.fold(g, tiling.transposed(h_t), w, acc)
    db = None if db is None else db + db_t
    return (total + jnp.sum(k * loss), dw + dw_t, db), (dh_t, extra)

  init = (tiling.zeros((), acc, *refs), tiling.zeros(w.shape, acc, *refs),
          None if b is None else tiling.zeros(b.shape, acc, *refs))
  (total, dw, db), (dh, extra) = tiling.scan_tokens(
      tiles, tile, init, kept=kept, refs=refs)
  # Per device, float32: the backward pass scales them by each device's
  # cotangent, then sums each over the mesh axes its input is replicated
  # on.
  res = (tiling.Grads(dh, dw, db), (h, w, b))
  if static.aux:
    return (total, _collectives.varying_tree(extra[0], *refs)), res
  return total, res


def _reduced_bwd(static: Static, res, ct):
  grads, primals = res
  if static.aux:  # the per-token outputs get no gradient
    ct = ct[0]
  scaled = tiling.Grads(*(None if g is None else ct.astype(g.dtype) * g
                          for g in grads))
  return (*tiling.cast(scaled, *primals), None, None,
          *([None] * (static.count + static.whole)))


def _reduced_fun(static: Static, h, w, b, coef, kept, *operands):
  if static.aux:  # the per-token outputs come from the gradient's tile
    return _reduced_fwd(static, h, w, b, coef, kept, *operands)[0]
  # Not differentiated: the loss alone (no gradient work).
  return jnp.sum(coef * _token_fwd(static, h, w, b, kept, *operands)[0])


_reduced = _rules.vjp_rule(_reduced_fun, _reduced_fwd, _reduced_bwd)


def reduced(rule: Any, tokens: int, h: jax.Array, w: jax.Array,
            b: jax.Array | None, coef: jax.Array, kept: jax.Array | None,
            per_token_operands: tuple, whole: tuple) -> Any:
  """``Σ_n coef_n·L_n`` of ``rule`` over tiles of ``tokens`` rows of
  ``h`` (all classes per tile), its gradients with respect to ``h``, ``w``
  and ``b`` formed in the forward pass. ``coef`` is a constant (no
  gradient); ``kept``: skip the tiles past the first ``kept`` rows. With
  a rule's ``aux``: ``(sum, extra)``, ``extra`` per token ``[N, ...]``
  (no gradient)."""
  static = Static(rule, tokens, len(per_token_operands), len(whole))
  return _reduced(static, h, w, b, jax.lax.stop_gradient(coef), kept,
                  *per_token_operands, *whole)


# --------------------------------------------------------------- per token


def _token_fwd(static: Static, h, w, b, kept, *operands):
  tiles = tiling.Tiles(h.shape[0], static.tokens)
  refs = _refs(h, w, b, operands)

  def tile(_, j, start, own):
    del j
    h_t, tokens, whole = _tile(static, h, operands, start)
    return None, static.rule.forward(h_t, w, b, tokens, whole, own)

  _, (loss, res) = tiling.scan_tokens(tiles, tile, None, kept=kept,
                                      refs=refs)
  # Typed to vary like every input, so cotangents arrive per device.
  loss = _collectives.varying_like(loss, *refs)
  return loss, (h, w, b, kept, operands, res)


def _token_bwd(static: Static, res, ct):
  h, w, b, kept, operands, residuals = res
  acc = _checks.compute_dtype(h.dtype)
  tiles = tiling.Tiles(h.shape[0], static.tokens)
  refs = _refs(h, w, b, operands, ct)

  def tile(carry, j, start, own):
    del j
    dw, db = carry
    h_t, tokens, whole = _tile(static, h, operands, start)
    rows = lambda x: tiling.rows(x, start, tiles.size)  # noqa: E731
    k = rows(ct)
    if own is not True:
      k = jnp.where(own, k, 0)
    g = static.rule.backward(h_t, w, b, tokens, whole, own,
                             jax.tree.map(rows, residuals), k)
    dh_t, dw_t, db_t = tiling.fold(g, tiling.transposed(h_t), w, acc)
    return (dw + dw_t, None if db is None else db + db_t), dh_t

  init = (tiling.zeros(w.shape, acc, *refs),
          None if b is None else tiling.zeros(b.shape, acc, *refs))
  (dw, db), dh = tiling.scan_tokens(tiles, tile, init, kept=kept,
                                    remat=True, refs=refs)
  grads = tiling.cast(tiling.Grads(dh, dw, db), h, w, b)
  return (*grads, None, *([None] * len(operands)))


def _token_fun(static: Static, h, w, b, kept, *operands):
  return _token_fwd(static, h, w, b, kept, *operands)[0]


_token = _rules.vjp_rule(_token_fun, _token_fwd, _token_bwd)


def per_token(rule: Any, tokens: int, h: jax.Array, w: jax.Array,
              b: jax.Array | None, kept: jax.Array | None,
              per_token_operands: tuple, whole: tuple) -> jax.Array:
  """Each token's loss ``[N]`` under ``rule``, over tiles of ``tokens``
  rows of ``h`` (all classes per tile), differentiable in every mode with
  respect to ``h``, ``w`` and ``b``; ``kept``: the tiles past the first
  ``kept`` rows are skipped (their loss is 0)."""
  static = Static(rule, tokens, len(per_token_operands), len(whole))
  return _token(static, h, w, b, kept, *per_token_operands, *whole)


# ------------------------------------ any function of the per-token losses


class TwoPass(NamedTuple):
  static: Static  # the row rule and its tiling (no ``aux``)
  objective: Any  # hashable: objective(losses [N], *args) -> (value, aux)
  args: int  # how many arrays the objective takes after the losses


def _two_pass_split(tp: TwoPass, operands):
  cut = tp.static.count + tp.static.whole
  return tuple(operands[:cut]), tuple(operands[cut:])


def _two_pass_fwd(tp: TwoPass, h, w, b, kept, *operands):
  ops, args = _two_pass_split(tp, operands)
  losses = _token_fwd(tp.static, h, w, b, kept, *ops)[0]
  value, pull, aux = jax.vjp(lambda x: tp.objective(x, *args), losses,
                             has_aux=True)
  # Each token's coefficient ∂F/∂L_n, known now that every loss is: the
  # second pass forms and folds the gradient tiles as the reduced driver's.
  (coef,) = pull(jnp.ones_like(value))
  _, res = _reduced_fwd(tp.static, h, w, b, coef, kept, *ops)
  return (value, jax.lax.stop_gradient(aux)), res


def _two_pass_bwd(tp: TwoPass, res, ct):
  grads, primals = res
  ct = ct[0]  # the objective's aux gets no gradient
  scaled = tiling.Grads(*(None if g is None else ct.astype(g.dtype) * g
                          for g in grads))
  return (*tiling.cast(scaled, *primals), None,
          *([None] * (tp.static.count + tp.static.whole + tp.args)))


def _two_pass_fun(tp: TwoPass, h, w, b, kept, *operands):
  # Not differentiated: the first pass and the objective alone.
  ops, args = _two_pass_split(tp, operands)
  losses = _token_fwd(tp.static, h, w, b, kept, *ops)[0]
  value, aux = tp.objective(losses, *args)
  return value, jax.lax.stop_gradient(aux)


_two_pass = _rules.vjp_rule(_two_pass_fun, _two_pass_fwd, _two_pass_bwd)


def two_pass(rule: Any, tokens: int, h: jax.Array, w: jax.Array,
             b: jax.Array | None, kept: jax.Array | None,
             per_token_operands: tuple, whole: tuple, objective: Any,
             args: tuple) -> tuple[jax.Array, Any]:
  """``(F, aux) = objective(L, *args)`` of the per-token losses ``L``
  ``[N]`` of ``rule`` over tiles of ``tokens`` rows of ``h`` (all classes
  per tile), ``F`` a scalar differentiable in every mode with respect to
  ``h``, ``w`` and ``b``: its gradients formed in the forward pass, with
  ``∂F/∂L`` as :func:`reduced`'s coefficients. ``aux`` and ``args`` get no
  gradient; ``kept`` as in :func:`reduced`."""
  static = Static(rule, tokens, len(per_token_operands), len(whole))
  args = tuple(None if a is None else jax.lax.stop_gradient(a) for a in args)
  return _two_pass(TwoPass(static, objective, len(args)), h, w, b, kept,
                   *per_token_operands, *whole, *args)
