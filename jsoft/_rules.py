"""A hand-written VJP rule that keeps every autodiff mode working.

``jax.custom_vjp`` alone refuses forward mode (``jvp``, ``jacfwd``,
``hessian``), and a ``fwd`` rule that calls the ``custom_vjp`` function itself
breaks ``jax.hessian``. jsoft's losses need the VJP rule (it is where the
``y - t`` gradient lives) *and* every mode, so :func:`vjp_rule` wraps the
``custom_vjp`` function in a ``custom_jvp`` whose JVP rule is built from the
VJP rule:

* The losses are *separable*: each output element depends only on its own
  slice of the inputs (one row of logits, one label), so the Jacobian is
  block-diagonal and one VJP with an all-ones cotangent yields every block:
  ``g = vjp(ones)`` holds ``∂out[i]/∂x[i, :]`` in row ``i``.
* The JVP is then ``dout[i] = Σ_c g[i, c] · dx[i, c]`` (a sum over the class
  axis; no sum for elementwise losses).
* Reverse mode differentiates that JVP rule: JAX transposes the linear map
  ``dx ↦ Σ g·dx`` into ``ct ↦ ct·g``, so ``grad`` returns exactly the VJP
  rule's ``y - t`` scaled by the cotangent, computed by ``bwd``.
* Higher orders differentiate ``fwd`` and ``bwd`` themselves, which are plain
  JAX code (never a call of the ``custom_vjp`` function), so ``hessian``,
  ``jacfwd``, Hessian-vector products and ``check_grads(order=2)`` all work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def vjp_rule(fun: Callable[..., jax.Array], fwd: Callable[..., Any],
             bwd: Callable[..., tuple[Any, ...]], *,
             class_axis: bool) -> Callable[..., jax.Array]:
  """Returns ``fun`` with the VJP rule ``(fwd, bwd)``, usable in every mode.

  Args:
    fun: ``fun(static, *args) -> out``; ``static`` is hashable configuration
      (not differentiated), ``args`` are arrays (or None).
    fwd: ``fwd(static, *args) -> (out, residuals)``, as for
      ``jax.custom_vjp``. Must not call the returned function.
    bwd: ``bwd(static, residuals, ct) -> cotangents`` for ``args``, one per
      argument (None for non-differentiable ones).
    class_axis: True if each output element reduces the last axis of the
      array arguments (the softmax losses); False if ``fun`` is elementwise.

  Returns:
    ``f(static, *args)``.
  """
  with_vjp = jax.custom_vjp(fun, nondiff_argnums=(0,))
  with_vjp.defvjp(fwd, bwd)

  @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
  def f(static, *args):
    return with_vjp(static, *args)

  def f_jvp(static, primals, tangents):
    out, pullback = jax.vjp(functools.partial(with_vjp, static), *primals)
    grads = pullback(jnp.ones_like(out))
    dout = None
    for g, t in zip(grads, tangents, strict=True):
      if t is None or type(t) is SymbolicZero or g is None:
        continue
      term = g.astype(out.dtype) * t.astype(out.dtype)
      if class_axis:
        term = jnp.sum(term, axis=-1)
      dout = term if dout is None else dout + term
    if dout is None:
      dout = jnp.zeros_like(out)
    return out, dout

  f.defjvp(f_jvp, symbolic_zeros=True)
  return f
