"""The JAX APIs jsoft uses that are newer than its oldest supported JAX.

jsoft runs on jax >= 0.4.38. The kernels call the names below instead of
the new APIs; each takes the new API where this JAX has it, and otherwise a
fallback that computes the same thing. Each fallback names the releases
that need it, so it can go once the floor passes them.

Before jax 0.6 ``shard_map`` has no varying-axis types (``check_vma``):
:func:`typeof` then carries none, so jsoft's rules never cast and leave the
cotangent sums to ``shard_map`` itself.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

JAX_VERSION: tuple[int, ...] = tuple(jax.__version_info__[:3])
JAXLIB_VERSION: tuple[int, ...] = tuple(
    int(p) for p in re.findall(r"\d+", jaxlib.__version__)[:3])

# jax < 0.5.3 has no jax.typeof; jax.core.get_aval is the same there.
typeof: Callable[[Any], Any] = getattr(jax, "typeof", None) or (
    jax.core.get_aval)


def axis_size(axis_name: Any) -> int:
  """The size of the mapped axis ``axis_name`` (``lax.axis_size``)."""
  if hasattr(lax, "axis_size"):
    return lax.axis_size(axis_name)
  return lax.psum(1, axis_name)  # jax < 0.6.1: no lax.axis_size


def pcast_varying(x: jax.Array, axes: tuple) -> jax.Array:
  """``x`` typed as varying over the mesh axes ``axes`` (unchanged values)."""
  if hasattr(lax, "pcast"):
    return lax.pcast(x, axes, to="varying")
  if hasattr(lax, "pvary"):
    return lax.pvary(x, axes)  # jax 0.6.0 – 0.8.1: pcast's older name
  return x  # jax < 0.6: no varying types, nothing to cast


def enable_x64(on: bool = True) -> Any:
  """``with enable_x64(True):`` float64 arrays in the block."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(on)
  from jax.experimental import enable_x64 as old  # noqa: PLC0415

  return old(on)  # jax < 0.8: only jax.experimental's


def linear_transpose(fun: Callable[..., Any], *primals: Any) -> Callable:
  """``jax.linear_transpose(fun, *primals)``, for ``fun`` linear."""
  if JAX_VERSION >= (0, 10):
    return jax.linear_transpose(fun, *primals)
  return vjp_transpose(fun, *primals)  # jax < 0.10: not through lax.scan


def vjp_transpose(fun: Callable[..., Any], *primals: Any) -> Callable:
  """The transpose of the linear ``fun`` as its VJP (taken at zero): for
  ``f(x) = A·x``, ``vjp(f, 0)`` maps ``ct`` to ``Aᵀ·ct``."""
  zeros = jax.tree.map(jnp.zeros_like, primals)

  def transposed(*cts: Any) -> Any:
    return jax.vjp(fun, *zeros)[1](*cts)

  return transposed


_BF16_LOOP_DOT_FAILS = (0, 7, 1) <= JAXLIB_VERSION < (0, 10, 1)


@functools.cache
def _barrier_differentiable() -> bool:
  try:
    jax.jvp(lax.optimization_barrier, (0.0,), (1.0,))
    jax.linear_transpose(lax.optimization_barrier, 0.0)(1.0)
  except NotImplementedError:
    return False
  return True


def barrier(x: Any) -> Any:
  """``lax.optimization_barrier(x)`` (an array or a pytree of them): ``x``,
  made as its own value (XLA does not fold it into the op that reads it).
  jax 0.4.38 cannot differentiate the barrier; there ``x`` itself, the same
  values (the barrier changes the speed, not the result)."""
  return lax.optimization_barrier(x) if _barrier_differentiable() else x


def _loop_operands(a: jax.Array, b: jax.Array, acc: Any):
  if (_BF16_LOOP_DOT_FAILS and jax.default_backend() == "cpu"
      and jnp.bfloat16 in (a.dtype, b.dtype)):
    # jaxlib 0.7.1 – 0.10.0: XLA:CPU cannot compile a bfloat16 dot inside a
    # loop; the operands widened to ``acc`` give the same products.
    a, b = a.astype(acc), b.astype(acc)
  return a, b


def matmul(a: jax.Array, b: jax.Array, acc: Any) -> jax.Array:
  """``a @ b`` accumulated in ``acc`` (``preferred_element_type``)."""
  a, b = _loop_operands(a, b, acc)
  return jnp.matmul(a, b, preferred_element_type=acc)


def matmul_t(a: jax.Array, b: jax.Array, acc: Any) -> jax.Array:
  """``a @ bᵀ`` (``a``: ``[r, k]``, ``b``: ``[n, k]``) accumulated in
  ``acc``: one product contracting both last axes, with no ``bᵀ`` in the
  program. Spelled ``a @ b.T``, JAX's transposes of a rule's loop (the
  reverse mode of :mod:`jsoft._rules`) can leave ``bᵀ`` an array of its
  own: a transposed copy of the head's ``W`` per tile, or once beside it."""
  a, b = _loop_operands(a, b, acc)
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=acc)


class MetadataContext:
  """A value in the jit cache key, for jax < 0.7.2 (no make_user_context).

  The value is kept thread-local for reading, and handed to
  ``set_xla_metadata``, whose context is part of the tracing and jit cache
  keys there; it only labels the HLO ops traced inside.
  """

  def __init__(self, default: Any) -> None:
    self._name = f"jsoft_context_{id(self)}"
    self._default = default
    self._local = threading.local()

  @property
  def value(self) -> Any:
    return getattr(self._local, "value", self._default)

  @contextlib.contextmanager
  def __call__(self, value: Any) -> Iterator[None]:
    from jax.experimental.xla_metadata import set_xla_metadata  # noqa: PLC0415
    previous = self.value
    self._local.value = value
    try:
      with set_xla_metadata(**{self._name: value}):
        yield
    finally:
      self._local.value = previous


def make_user_context(default: Any) -> Any:
  """``jax.make_user_context``: ``with ctx(v):`` sets ``ctx.value`` to ``v``,
  and a jitted function traced under one value is retraced under another."""
  if hasattr(jax, "make_user_context"):
    return jax.make_user_context(default)
  return MetadataContext(default)  # jax < 0.7.2
