"""A hand-written VJP rule that keeps every autodiff mode working.

``jax.custom_vjp`` alone refuses forward mode (``jvp``, ``jacfwd``,
``hessian``), and a ``fwd`` rule that calls the ``custom_vjp`` function
itself breaks ``jax.hessian``. jsoft's losses need the VJP rule (it is where
the ``y - t`` gradient lives) *and* every mode, so :func:`vjp_rule` wraps the
``custom_vjp`` function in a ``custom_jvp`` whose JVP *is the transpose of
the VJP*:

* A VJP ``ct ↦ bwd(res, ct)`` is linear in the cotangent, so JAX can
  transpose it (``jax.linear_transpose``): the transpose maps input tangents
  to the output tangent, which is exactly the JVP.
* Forward mode evaluates that transpose directly.
* Reverse mode differentiates the JVP rule, and JAX transposes the linear map
  once more: transposing a transpose gives back ``bwd`` itself, fed the real
  incoming cotangent. ``grad`` therefore runs the hand-written ``y - t`` rule,
  op for op, as a bare ``custom_vjp`` would.
* Higher orders differentiate ``fwd`` and ``bwd`` themselves, which are plain
  JAX code (never a call of the ``custom_vjp`` function), so ``hessian``,
  ``jacfwd``, Hessian-vector products and ``check_grads(order=2)`` all work.

The price is one rule: ``bwd`` must be linear in the cotangent and built from
operations JAX can transpose (products with residuals, sums, broadcasts,
selects against zero, scatter-adds, casts) — which a VJP is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.custom_derivatives import SymbolicZero

from jsoft import _compat


def vjp_rule(fun: Callable[..., jax.Array], fwd: Callable[..., Any],
             bwd: Callable[..., tuple[Any, ...]]) -> Callable[..., jax.Array]:
  """Returns ``fun`` with the VJP rule ``(fwd, bwd)``, usable in every mode.

  Args:
    fun: ``fun(static, *args) -> out``; ``static`` is hashable configuration
      (not differentiated), ``args`` are arrays (or None).
    fwd: ``fwd(static, *args) -> (out, residuals)``, as for
      ``jax.custom_vjp``. Must not call the returned function.
    bwd: ``bwd(static, residuals, ct) -> cotangents`` for ``args``, one per
      argument (None for non-differentiable ones); linear in ``ct``.

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
    moving = [i for i, t in enumerate(tangents)
              if t is not None and type(t) is not SymbolicZero]

    def vjp_of_moving(ct):
      cts = pullback(ct)
      return tuple(cts[i] for i in moving)

    # The JVP is the transpose of the (linear) VJP.
    (dout,) = _compat.linear_transpose(vjp_of_moving, out)(
        tuple(tangents[i] for i in moving))
    return out, dout

  f.defjvp(f_jvp, symbolic_zeros=True)
  return f
