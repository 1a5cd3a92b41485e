"""Ignored tokens gathered out of the tile loop: the kept tokens first (a
stable sort), so :func:`jsoft._tiling.scan_tokens` with ``kept`` runs only
the tiles that hold them. The gather's VJP is the inverse gather (no
scatter-add)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jsoft import _rules

# From this many tokens on, ignored tokens are gathered out of the loop
# (below, the gather costs more than the tiles it saves).
COMPACT_MIN_TOKENS = 1024


class Compaction(NamedTuple):
  """The tokens reordered, kept ones first (a stable sort), and their
  count ``K``: a loop over the first ``⌈K/c⌉`` tiles sees every kept
  token (:func:`jsoft._tiling.scan_tokens`' ``kept``)."""
  order: jax.Array  # [N] the kept tokens' indices, then the others'
  back: jax.Array  # [N] the inverse permutation
  count: jax.Array  # int32 K

  @staticmethod
  def of(keep: jax.Array) -> Compaction:
    order = jnp.argsort(~keep, stable=True).astype(jnp.int32)
    back = jnp.zeros_like(order).at[order].set(
        jnp.arange(order.shape[0], dtype=jnp.int32))
    return Compaction(order, back, jnp.sum(keep, dtype=jnp.int32))

  def gather(self, x: Any) -> Any:
    """``x[order]`` along the tokens (None and numbers pass), with the
    inverse gather as its VJP (no scatter-add)."""
    if not isinstance(x, jax.Array) or x.ndim == 0:
      return x
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return x[self.order]
    return _permute(None, x, self.order, self.back)

  def scatter(self, x: Any) -> Any:
    """The inverse of :meth:`gather`."""
    return Compaction(self.back, self.order, self.count).gather(x)


def _permute_fun(static, x, order, back):
  del static, back
  return x[order]


def _permute_fwd(static, x, order, back):
  return _permute_fun(static, x, order, back), (order, back)


def _permute_bwd(static, res, ct):
  del static
  _, back = res
  return ct[back], None, None


_permute = _rules.vjp_rule(_permute_fun, _permute_fwd, _permute_bwd)
