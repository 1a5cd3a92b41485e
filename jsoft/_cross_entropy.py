r"""The two softmax cross-entropies: argument handling and the public API.

Both losses are the one rule of :mod:`jsoft._loss_rule` on whole rows of
logits (:mod:`jsoft._plain`); this module checks the arguments, moves the
class axes last, builds the target (:mod:`jsoft._targets`) and reduces.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsoft import _checks, _collectives, _plain, _targets
from jsoft._options import ignore, options, reduce
from jsoft._stats import TokenStats

Axis = int | tuple[int, ...] | None


def _class_layout(fn: str, logits: jax.Array, axis: Any, allow_none: bool):
  """Resolves ``axis`` into (class axes, batch axes, batch shape)."""
  axes = _checks.axes(axis, logits.ndim, fn, allow_none=allow_none)
  batch_axes = tuple(i for i in range(logits.ndim) if i not in axes)
  return axes, batch_axes, tuple(logits.shape[i] for i in batch_axes)


def _classes_last(x: jax.Array, axes: tuple[int, ...],
                  batch_axes: tuple[int, ...]) -> jax.Array:
  """Moves the class axes last and flattens them into one (C order)."""
  perm = batch_axes + axes
  if perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, perm)
  batch = x.shape[:len(batch_axes)]
  return x.reshape(batch + (int(np.prod(x.shape[len(batch_axes):])),))


def _check_mask(x, entries, rows):
  """The entries the value checks look at: those that both the entry mask
  and the per-example mask (``where``, ``ignore_index``) keep."""
  if rows is None:
    return entries
  rows = jnp.broadcast_to(rows[..., None], x.shape)
  return rows if entries is None else rows & entries


def _static_axis(axis: Any) -> Any:
  return tuple(axis) if isinstance(axis, list) else axis


def _sharded_layout(fn, opts, axes, entries):
  """With ``axis_name``: one class axis, and masks per example only."""
  if opts.axis_name is None:
    return
  if len(axes) != 1:
    raise ValueError(f"jsoft.{fn}: with axis_name the classes must lie on "
                     f"one axis (the sharded one), got axis={axes}.")
  if entries is not None:
    raise ValueError(f"jsoft.{fn}: with axis_name, where= must be a "
                     "per-example mask (the labels' shape), not per class.")


@functools.partial(jax.jit, static_argnames=("axis", "opts", "ignore_index",
                                             "reduction", "return_stats"))
def _int_ce_jit(logits, labels, axis, where, class_weights, sample_weights,
                opts, ignore_index, reduction, return_stats):
  fn = "softmax_cross_entropy_with_integer_labels"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _checks.floating(logits, fn, "logits")
  _checks.integer(labels, fn, "labels")
  axes, batch_axes, batch = _class_layout(fn, logits, axis, allow_none=False)
  _checks.shape(labels, batch, fn, "labels",
                f"the logits' shape {logits.shape} without the class axes "
                f"{axes}")
  entries, rows = _checks.example_mask(where, logits.shape, batch, fn)
  _sharded_layout(fn, opts, axes, entries)
  x = _classes_last(logits, axes, batch_axes)
  num_classes = x.shape[-1]
  weights = _checks.per_class(class_weights, num_classes,
                              _checks.compute_dtype(x.dtype), fn,
                              "class_weights")
  if entries is not None:
    entries = _classes_last(entries, axes, batch_axes)
  labels, rows = ignore(labels, rows, ignore_index)
  _checks.finite(x, fn, "logits", _check_mask(x, entries, rows))
  live = _targets.live(entries, rows)
  _checks.in_range(labels, num_classes * _collectives.num_shards(
      opts.axis_name), fn, None if live is None else ~live)
  target, scale = _targets.integer(opts, labels, entries, rows, weights,
                                   num_classes, _checks.compute_dtype(x.dtype))
  dense = _targets.smoothing(scale, weights, entries)
  samples = _checks.per_example(sample_weights, batch,
                                _checks.compute_dtype(x.dtype), fn,
                                "sample_weights")
  if samples is not None:
    _checks.finite(samples, fn, "sample_weights")
  stats = None
  if return_stats:
    loss, stats = _plain.loss_and_stats(opts, x, entries, target, dense)
  else:
    loss = _plain.loss(opts, x, entries, target, dense)
  loss = _targets.reduced(loss, target, reduction, weights is not None
                          or entries is not None or rows is not None, samples)
  return loss if stats is None else (loss, stats)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None, *,
    ignore_index: int | None = None, label_smoothing: float = 0.0,
    z_loss: float = 0.0, logit_soft_cap: float | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none", axis_name: Any = None,
    temperature: float = 1.0,
    sample_weights: jax.typing.ArrayLike | None = None,
    return_stats: bool = False) -> jax.Array | tuple[jax.Array, TokenStats]:
  r"""Softmax cross-entropy against integer class labels: a drop-in for
  :func:`optax.softmax_cross_entropy_with_integer_labels`, with the options
  of :func:`torch.nn.functional.cross_entropy`.

  .. math::
    L = \log \sum_c e^{x_c - m} - (x_y - m), \quad m = \max_c x_c .

  Computed from the shifted logits ``x - m``, so ``[-1000, -1000, -1000]``
  gives ``log 3`` to full precision. Labels outside ``[0, C)`` (other than
  ``ignore_index``) give NaN, never a wrapped class.

  With options, for class weights ``w`` (1 without), smoothing ``ε`` over
  the ``C`` (unmasked) classes, z-loss ``λ``, soft cap ``a`` and
  temperature ``T``:

  .. math::
    \tilde x = a\tanh(x/a)\,/\,T, \quad
    t = (1-\varepsilon)\,w_y\,\mathrm{onehot}(y) + \varepsilon\,w/C, \quad
    L = -\sum_c t_c \log\operatorname{softmax}(\tilde x)_c
        + \lambda \operatorname{lse}(\tilde x)^2 .

  Gradient (the VJP rule, one pass, no one-hot array): predicted minus
  target, :math:`\partial L/\partial\tilde x = \operatorname{softmax}(\tilde
  x)\,(\textstyle\sum_c t_c + 2\lambda\operatorname{lse}) - t` — plainly
  ``softmax − onehot(y)`` without options — times :math:`(1 -
  \tanh^2(x/a))/T` (``1/T`` without the cap) and the incoming cotangent. Every
  autodiff mode works (``jvp``, ``jacfwd``, ``hessian``, HVPs).

  Args:
    logits: floating array ``[..., C]`` (or with the classes on ``axis``);
      16-bit floats are computed in float32.
    labels: integer array of the logits' shape without the class axes.
    axis: the class axis, or a tuple of axes (a label is then a flat C-order
      index into the slice over those axes).
    where: optional boolean mask, of the logits' shape (entries) or the
      labels' shape (examples). ``False`` entries are left out of both the
      softmax and the target; a label on a masked entry, or an example with
      nothing unmasked, gives loss 0 and zero gradient.
    ignore_index: a label value whose examples get loss 0, zero gradient and
      no share in "mean" (torch's ``ignore_index``; torch ignores ``-100`` by
      default, jsoft nothing).
    label_smoothing: ``ε`` in ``[0, 1]``, as in torch.
    z_loss: ``λ ≥ 0``: adds ``λ·logsumexp(logits)²`` per example (PaLM).
    logit_soft_cap: ``a > 0``: the logits become ``a·tanh(logits/a)`` before
      everything else (Gemma 2).
    temperature: ``T > 0``, a Python number (compile-time): the softmax
      sees ``x̃/T``, after the soft cap. The loss is not rescaled (no
      ``T²``).
    class_weights: ``[C]`` per-class weights, as torch's ``weight``
      (constants: no gradient flows to them).
    sample_weights: optional floats of the labels' shape: each example's
      loss (and its gradient) times its weight; constants (no gradient
      flows to them).
    reduction: "none" (per example), "sum", or "mean": the sum divided by
      the total weight ``Σ s·w_y`` (sample weight × class weight) of the
      examples that count (not masked, not ignored), as in torch; 0 when
      none count.
    return_stats: also return each example's :class:`jsoft.TokenStats`
      (``logprob``, ``logsumexp``, ``entropy``, ``correct``), from the same
      pass as the loss; differentiable in every mode.
    axis_name: inside ``shard_map``, the mesh axis the class axis is
      sharded over: each device passes its slice of the classes (and of
      ``class_weights``) and gets the global per-example loss. Only a max,
      a sum, the label's logit and the target sums per example cross
      devices (``pmax``/``psum``); each device's gradient is its slice's.
      Labels are global class indices. "sum"/"mean" reduce over the
      examples this call sees (reduce over data-parallel axes yourself).

  Returns:
    The per-example loss, of the labels' shape, or a scalar; float32 for
    16-bit logits, else the logits' dtype; with ``return_stats``, the pair
    ``(loss, stats)``.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logits = jnp.array([[-1000.0, -1000.0, -1000.0], [2.0, 3.0, 5.0]])
    >>> labels = jnp.array([1, 2])
    >>> loss = jsoft.softmax_cross_entropy_with_integer_labels(logits, labels)
    >>> print(loss.round(4))  # log 3, and -log softmax([2, 3, 5])[2]
    [1.0986 0.1698]
    >>> labels = jnp.array([1, -100])  # torch-style padding
    >>> print(jsoft.softmax_cross_entropy_with_integer_labels(
    ...     logits, labels, ignore_index=-100, reduction="mean").round(4))
    1.0986
  """
  fn = "softmax_cross_entropy_with_integer_labels"
  return _int_ce_jit(
      _checks.asarray(logits), _checks.asarray(labels), _static_axis(axis),
      _checks.asarray(where), _checks.asarray(class_weights),
      _checks.asarray(sample_weights),
      options(fn, label_smoothing, z_loss, logit_soft_cap, axis_name,
              temperature),
      _checks.static_int(ignore_index, fn, "ignore_index"),
      _checks.reduction(reduction, fn),
      _checks.static_bool(return_stats, fn, "return_stats"))


@functools.partial(jax.jit, static_argnames=("axis", "opts", "reduction"))
def _ce_jit(logits, labels, axis, where, opts, reduction):
  fn = "softmax_cross_entropy"
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _checks.floating(logits, fn, "logits")
  labels = _checks.real(labels, fn, "labels")
  _checks.shape(labels, logits.shape, fn, "labels", "the logits' shape")
  axes, batch_axes, batch = _class_layout(fn, logits, axis, allow_none=True)
  entries, rows = _checks.example_mask(where, logits.shape, batch, fn)
  _sharded_layout(fn, opts, axes, entries)
  x = _classes_last(logits, axes, batch_axes)
  t = _classes_last(labels, axes, batch_axes)
  if entries is not None:
    entries = _classes_last(entries, axes, batch_axes)
  checked_entries = _check_mask(x, entries, rows)
  _checks.finite(x, fn, "logits", checked_entries)
  _checks.finite(t, fn, "labels", checked_entries)
  target, dense = _targets.probability(opts, t, entries, rows,
                                       _checks.compute_dtype(x.dtype))
  loss = _plain.loss(opts, x, entries, target, dense)
  return reduce(loss, reduction, target.has_loss)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None, *,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
    logit_soft_cap: float | None = None,
    reduction: str = "none", axis_name: Any = None,
    temperature: float = 1.0) -> jax.Array:
  r"""Softmax cross-entropy against target distributions: a drop-in for
  :func:`optax.softmax_cross_entropy`, with the options of
  :func:`torch.nn.functional.cross_entropy` for probability targets.

  .. math::
    L = -\sum_c t_c \log\operatorname{softmax}(x)_c
      = \sum_c t_c \Bigl(\log \sum_k e^{x_k - m} - (x_c - m)\Bigr).

  Uses the max shift, and a target entry of 0 contributes nothing even where
  the logit is ``-inf`` (optax returns NaN there). With options the logits
  are first soft-capped and divided by the temperature,
  ``x̃ = a·tanh(x/a)/T``, the target smoothed,
  ``t̃ = (1 − ε)·t + ε/C``, and ``λ·lse(x̃)²`` added.

  Gradient (the VJP rule): predicted minus target,
  :math:`\partial L/\partial\tilde x = \operatorname{softmax}(\tilde x)
  \,(\textstyle\sum_c \tilde t_c + 2\lambda\operatorname{lse}) - \tilde t`
  (``y - t`` for normalised targets without options), times :math:`(1 -
  \tanh^2(x/a))/T` (``1/T`` without the cap); and :math:`\partial L/\partial t =
  -(1 - \varepsilon)\log\operatorname{softmax}(\tilde x)`; both scaled by
  the incoming cotangent. Every autodiff mode works.

  Args:
    logits: floating array; 16-bit floats are computed in float32.
    labels: target probabilities, of the logits' shape.
    axis: the class axis, a tuple of axes, or None (all axes).
    where: optional boolean mask, of the logits' shape or the per-example
      shape; ``False`` entries are left out of the softmax and the target.
    label_smoothing: ``ε`` in ``[0, 1]``, as in torch.
    z_loss: ``λ ≥ 0``: adds ``λ·logsumexp(logits)²`` per example.
    logit_soft_cap: ``a > 0``: soft-caps the logits first.
    temperature: ``T > 0``, a Python number (compile-time): the softmax
      sees ``x̃/T``, after the soft cap. The loss is not rescaled (no
      ``T²``).
    reduction: "none", "sum", or "mean" (over the examples not masked out;
      0 when there are none).
    axis_name: inside ``shard_map``, the mesh axis the class axis is
      sharded over (logits and labels sliced alike): the global loss, from
      a max and sums per example; each device's gradients are its slice's.

  Returns:
    The per-example loss (the logits' shape without ``axis``) or a scalar;
    float32 for 16-bit logits, else the logits' dtype.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> logits = jnp.array([0.0, 1.0, -jnp.inf])
    >>> labels = jnp.array([0.5, 0.5, 0.0])
    >>> print(f"{jsoft.softmax_cross_entropy(logits, labels):.4f}")
    0.8133
  """
  fn = "softmax_cross_entropy"
  return _ce_jit(_checks.asarray(logits), _checks.asarray(labels),
                 _static_axis(axis), _checks.asarray(where),
                 options(fn, label_smoothing, z_loss, logit_soft_cap,
                         axis_name, temperature),
                 _checks.reduction(reduction, fn))
