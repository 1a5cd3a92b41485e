"""What callers pass in: trace-time checks, and value checks on request.

Two kinds of check live here, with different costs:

* Static checks (rank, shape, dtype, axis) read only array metadata, so they
  run once per trace, raise ``TypeError``/``ValueError`` naming the jsoft
  function, what was expected and what arrived, and cost nothing per call.
* Value checks (finite logits, labels in range) need the data. They are
  emitted only while :func:`checked` is active, as chex value assertions that
  ``chex.chexify`` turns into runtime errors. Outside ``checked`` no checking
  code reaches the compiled program at all.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jsoft import _compat

F = TypeVar("F", bound=Callable[..., Any])

# Part of JAX's jit cache key: a function traced without value checks is
# traced again (with them) inside ``checked``, and the other way round.
_VALUE_CHECKS = _compat.make_user_context(False)


def asarray(x: Any) -> Any:
  """Lets Python lists and tuples through the jitted entry points."""
  return jnp.asarray(x) if isinstance(x, (list, tuple)) else x


def compute_dtype(dtype: Any) -> np.dtype:
  """The dtype kernels compute in: float32 for 16-bit floats, else ``dtype``."""
  dtype = np.dtype(dtype)
  return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


# ----------------------------------------------------------------- static


def floating(x: jax.Array, fn: str, what: str) -> None:
  """Raises ``TypeError`` unless ``x`` holds real floating-point numbers."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"jsoft.{fn}: {what} must be a floating-point array, got dtype "
        f"{x.dtype}.")


def integer(x: jax.Array, fn: str, what: str) -> None:
  """Raises ``TypeError`` unless ``x`` holds integers."""
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(
        f"jsoft.{fn}: {what} must be an integer array, got dtype {x.dtype}.")


def real(x: jax.Array, fn: str, what: str) -> jax.Array:
  """Promotes integer/bool input to the default float; rejects complex."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"jsoft.{fn}: {what} must be real, got dtype {x.dtype}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  return x


def axes(axis: Any, ndim: int, fn: str, *, allow_none: bool) -> tuple[int, ...]:
  """Normalises ``axis`` (int, tuple of ints, or None = all) to sorted-free
  non-negative axes, in the order given, like NumPy's ``normalize_axis_tuple``.
  """
  if axis is None:
    if not allow_none:
      raise TypeError(f"jsoft.{fn}: axis must be an int or a tuple of ints, "
                      "got None.")
    return tuple(range(ndim))
  given = axis if isinstance(axis, Sequence) else (axis,)
  try:
    given = tuple(operator.index(a) for a in given)
  except TypeError:
    raise TypeError(f"jsoft.{fn}: axis must be an int or a tuple of ints, got "
                    f"{axis!r}.") from None
  out = []
  for a in given:
    if not -ndim <= a < ndim:
      raise ValueError(f"jsoft.{fn}: axis {a} is out of range for an array of "
                       f"rank {ndim}.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"jsoft.{fn}: axis {axis!r} repeats an axis.")
  return tuple(out)


def shape(x: jax.Array, expected: Sequence[int], fn: str, what: str,
          why: str) -> None:
  """Raises ``ValueError`` unless ``x.shape == expected`` (a chex assert)."""
  chex.assert_shape(
      x, tuple(expected), exception_type=ValueError,
      custom_message=f"jsoft.{fn}: {what} must have shape "
      f"{tuple(expected)} ({why}), got {tuple(x.shape)}")


def broadcast_shape(shapes: Sequence[Sequence[int]], fn: str,
                    what: str) -> tuple[int, ...]:
  """The common broadcast shape, or ``ValueError`` naming the operands."""
  try:
    return tuple(np.broadcast_shapes(*map(tuple, shapes)))
  except ValueError:
    raise ValueError(
        f"jsoft.{fn}: {what} have shapes "
        f"{', '.join(str(tuple(s)) for s in shapes)}, which do not "
        "broadcast together.") from None


def _boolean(where: Any, fn: str) -> jax.Array:
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"jsoft.{fn}: where must be a boolean array, got dtype "
                    f"{where.dtype}.")
  return where


def broadcast_to(x: jax.Array, target: Sequence[int], fn: str, what: str,
                 to: str = "the input shape") -> jax.Array:
  """``x`` broadcast to ``target``, or ``ValueError`` naming both shapes."""
  try:
    return jnp.broadcast_to(x, tuple(target))
  except ValueError:
    raise ValueError(
        f"jsoft.{fn}: {what} of shape {tuple(x.shape)} does not broadcast "
        f"to {to} {tuple(target)}.") from None


def mask(where: Any, target: Sequence[int], fn: str) -> jax.Array | None:
  """Checks a ``where=`` mask and broadcasts it to ``target``."""
  if where is None:
    return None
  return broadcast_to(_boolean(where, fn), target, fn, "where")


def example_mask(where: Any, target: Sequence[int], batch: Sequence[int],
                 fn: str) -> tuple[jax.Array | None, jax.Array | None]:
  """A loss's ``where=``: ``(entries, rows)``, at most one of them not None.

  As in optax, ``where`` has either the per-example shape ``batch`` (one flag
  per example: returned as ``rows``) or a shape that broadcasts to the
  logits' shape ``target`` (one flag per logit: returned as ``entries``).
  """
  if where is None:
    return None, None
  where = _boolean(where, fn)
  if where.ndim != len(target):
    if tuple(where.shape) != tuple(batch):
      raise ValueError(
          f"jsoft.{fn}: where must have the logits' shape {tuple(target)} or "
          f"the per-example shape {tuple(batch)}, got {tuple(where.shape)}.")
    return None, where
  return mask(where, target, fn), None


# ---------------------------------------------------------------- options
#
# Loss options are compile-time constants: they select which terms a kernel
# contains, so they are validated once, here, as Python values.

REDUCTIONS = ("none", "sum", "mean")


def static_float(value: Any, fn: str, name: str, *, low: float | None = None,
                 high: float | None = None, open_low: bool = False) -> float:
  """A Python float from ``value``, or a clear error.

  Raises ``TypeError`` for a traced or non-numeric value (options are fixed
  at compile time) and ``ValueError`` outside ``[low, high]`` (``(low, high]``
  with ``open_low``) or when not finite.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"jsoft.{fn}: {name} must be a Python number (it is fixed at compile "
        f"time), got a traced value of shape {jnp.shape(value)}.")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"jsoft.{fn}: {name} must be a number, got "
                    f"{value!r}.") from None
  bad = not np.isfinite(number)
  if low is not None:
    bad |= number <= low if open_low else number < low
  if high is not None:
    bad |= number > high
  if bad:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if open_low or low is None else '['}{lo}, {hi}" + (
        "]" if high is not None else ")")
    raise ValueError(f"jsoft.{fn}: {name} must be finite and lie in "
                     f"{interval}, got {value!r}.")
  return number


def one_of(value: Any, choices: tuple[str, ...], fn: str, name: str) -> str:
  """Checks a string option is one of ``choices``."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"jsoft.{fn}: {name} must be one of "
                     f"{', '.join(map(repr, choices))}, got {value!r}.")
  return value


def reduction(value: Any, fn: str) -> str:
  """Checks ``reduction`` is one of "none", "sum", "mean"."""
  return one_of(value, REDUCTIONS, fn, "reduction")


def static_bool(value: Any, fn: str, name: str) -> bool:
  """A Python bool (a compile-time switch), or a ``TypeError``."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"jsoft.{fn}: {name} must be True or False, got "
                    f"{value!r}.")
  return bool(value)


def static_int(value: Any, fn: str, name: str) -> int | None:
  """None, or a Python int (e.g. ``ignore_index``)."""
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
    raise TypeError(f"jsoft.{fn}: {name} must be a Python int or None, got "
                    f"{value!r}.")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(f"jsoft.{fn}: {name} must be a Python int or None, got "
                    f"{value!r}.") from None


def chunk_size(value: Any, fn: str) -> int | None:
  """None (the default tile), or a Python int of at least 1."""
  value = static_int(value, fn, "chunk_size")
  if value is not None and value < 1:
    raise ValueError(f"jsoft.{fn}: chunk_size must be at least 1, got "
                     f"{value}.")
  return value


def axis_name(value: Any, fn: str) -> Any:
  """None, or a mesh axis name (a hashable, or a tuple of them)."""
  if value is None:
    return None
  if isinstance(value, list):  # a list of names, as a hashable tuple
    value = tuple(value)
  try:
    hash(value)
  except TypeError:
    raise TypeError(f"jsoft.{fn}: axis_name must be a mesh axis name (or a "
                    f"tuple of names), got {value!r}.") from None
  return value


def per_class(x: Any, num_classes: int, dtype: Any, fn: str,
              name: str) -> jax.Array | None:
  """Checks a per-class array (``class_weights``): real, shape ``[C]``."""
  if x is None:
    return None
  x = real(jnp.asarray(x), fn, name)
  shape(x, (num_classes,), fn, name, "one entry per class")
  return jax.lax.stop_gradient(x.astype(dtype))


def per_example(x: Any, batch: Sequence[int], dtype: Any, fn: str,
                name: str) -> jax.Array | None:
  """Checks a per-example array (``sample_weights``): real, of the labels'
  shape; a constant (no gradient)."""
  if x is None:
    return None
  x = real(jnp.asarray(x), fn, name)
  shape(x, batch, fn, name, "the labels' shape")
  return jax.lax.stop_gradient(x.astype(dtype))


# ------------------------------------------------------------------ value


def checks_enabled() -> bool:
  """True while tracing inside :func:`checked`."""
  return bool(_VALUE_CHECKS.value)


def finite(x: jax.Array, fn: str, what: str,
           where: jax.Array | None = None) -> None:
  """Under :func:`checked`: error if an unmasked entry of ``x`` is NaN/±inf."""
  if not checks_enabled():
    return
  if where is not None:
    x = jnp.where(where, x, 0)
  chex.assert_tree_all_finite(
      x, custom_message=f"jsoft.{fn}: {what} must be finite (NaN or ±inf "
      "found; mask entries with where= instead of -inf)")


def in_range(labels: jax.Array, num_classes: int, fn: str,
             exempt: jax.Array | None = None) -> None:
  """Under :func:`checked`: error if a label is outside ``[0, num_classes)``.

  Labels where ``exempt`` is True (rows masked out, ignored targets) are not
  checked. The assertion compares the (smallest, largest) label with itself
  clipped to the range, so the message shows the offending extremes.
  """
  if not checks_enabled():
    return
  if exempt is not None:
    labels = jnp.where(exempt, 0, labels)
  if labels.size:
    extremes = jnp.stack([labels.min(), labels.max()])
  else:
    extremes = jnp.zeros((2,), labels.dtype)
  chex.assert_trees_all_equal(
      extremes, jnp.clip(extremes, 0, max(num_classes - 1, 0)),
      custom_message=f"jsoft.{fn}: labels (smallest, largest) must lie in "
      f"[0, {num_classes})")
  if num_classes == 0 and labels.size:
    chex.assert_trees_all_equal(
        jnp.asarray(labels.size), 0,
        custom_message=f"jsoft.{fn}: there are no classes to label")


def _forget_wait_fn(chexified: Any) -> None:
  """Drops chexify's no-op barrier for a synchronous function.

  chex registers every chexified function's barrier to be inspected at exit
  and logs a warning about unchecked asynchronous results if any is left;
  a synchronous function has nothing pending, so its barrier only produces
  that misleading warning. Best effort: a chex without this registry is fine.
  """
  try:
    from chex._src import asserts_internal  # noqa: PLC0415
    asserts_internal.CHEXIFY_STORAGE.wait_fns.remove(chexified.wait_checks)
  except (ImportError, AttributeError, ValueError):
    pass


def checked(fn: F) -> F:
  """Runs ``fn`` with jsoft's value checks switched on.

  Inside ``fn`` (typically ``jax.jit(train_step)``), every jsoft function
  asserts that its logits are finite and its integer labels lie in
  ``[0, num_classes)``. A failed check raises ``AssertionError`` from the call
  of the returned function, naming the jsoft function and the problem.

  This is ``chex.chexify`` (synchronous) plus a JAX user context that is part
  of the jit cache key, so ``fn`` is traced with the checks even if it was
  already compiled without them. Without ``checked`` no checking code is
  traced: the compiled program is exactly the unchecked one.

  Args:
    fn: the function to check, usually already jitted. ``checked`` must be
      the outermost wrapper, as with ``chex.chexify``.

  Returns:
    A function with the signature of ``fn``.

  Examples:
    >>> import jax, jax.numpy as jnp, jsoft
    >>> step = jsoft.checked(jax.jit(
    ...     jsoft.softmax_cross_entropy_with_integer_labels))
    >>> print(step(jnp.zeros((2, 3)), jnp.array([0, 2])).round(4))
    [1.0986 1.0986]
    >>> step(jnp.zeros((2, 3)), jnp.array([0, 3]))
    Traceback (most recent call last):
    ...
    AssertionError: ...labels (smallest, largest) must lie in [0, 3)...
  """
  chexified = chex.chexify(fn, async_check=False)
  _forget_wait_fn(chexified)

  @functools.wraps(fn)
  def run_checked(*args, **kwargs):
    with _VALUE_CHECKS(True):
      return chexified(*args, **kwargs)

  return run_checked  # type: ignore[return-value]
