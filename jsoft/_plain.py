"""The plain driver: the loss rule on whole rows of logits.

Each example's row is one block (with ``axis_name``, this device's block of
the classes). Two passes over the logits: the row max, then the rule's
sums (a third, spelled apart, for a dense target); the gradient is one
more pass, :func:`jsoft._loss_rule.block_grad`. With ``axis_name`` the max
crosses devices before the sums and the sums after them; everything else
is local.
"""

from __future__ import annotations

from typing import Any

import jax

from jsoft import _collectives, _loss_rule
from jsoft._loss_rule import Block, Target
from jsoft._options import Options


def loss(opts: Options, logits: jax.Array, valid: jax.Array | None,
         target: Target, dense: Any) -> jax.Array:
  """The per-example loss of ``logits`` ``[..., C]`` (classes last).

  Args:
    opts: the options (soft cap, z-loss, the mesh axis of the classes).
    logits: raw logits (16-bit ones are computed in float32).
    valid: the entries taking part (``where``), or None.
    target: the per-example target (:mod:`jsoft._targets`).
    dense: the dense target ``u`` on the row, or None.
  """
  ax = opts.axis_name
  block = Block(logits, valid,
                _collectives.first_class(ax, logits.shape[-1]), dense)
  shift = _collectives.pmax(_loss_rule.block_max(block, opts.cap), ax)
  sums = _loss_rule.sums(opts.cap, block, shift, target.label, target.keep)
  return _loss_rule.row_loss(target, shift, _collectives.psum(sums, ax),
                             opts.z_loss)
