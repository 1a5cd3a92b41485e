r"""Distillation: the seed post's ``y − t`` with a teacher's softmax as ``t``.

With student logits ``s``, teacher logits ``t``, temperature ``T`` and the
log-probabilities ``ℓ_s = log softmax(s/T)``, ``ℓ_t = log softmax(t/T)``
(``p = e^ℓ``), every divergence is a sum over the classes of a term
``φ(ℓ_s, ℓ_t)`` per entry:

.. math::
  \text{forward KL}(p_t\,\|\,p_s):\ \varphi = p_t(\ell_t - \ell_s),\qquad
  \text{reverse KL}(p_s\,\|\,p_t):\ \varphi = p_s(\ell_s - \ell_t),

  \text{JSD}_\beta:\ \varphi = \beta\,p_t(\ell_t - \ell_m)
    + (1-\beta)\,p_s(\ell_s - \ell_m),\quad
    \ell_m = \log(\beta p_t + (1-\beta) p_s),

each term exactly 0 where its probability is 0 (``0·log 0 = 0``: a
``-inf`` or masked logit), and ``+inf`` where the other distribution has no
mass (forward KL: a student ``-inf`` logit where the teacher has mass).
With ``φ₁ = ∂φ/∂ℓ_s`` — ``−p_t``, ``p_s(ℓ_s − ℓ_t + 1)`` and
``(1 − β)·p_s(ℓ_s − ℓ_m)`` — and ``∂ℓ_s/∂s = (I − 1 p_sᵀ)/T``, the
gradient is one elementwise pass from one number per row:

.. math::
  \frac{\partial D}{\partial s} = \frac{1}{T}\Bigl(\varphi_1
    - p_s \textstyle\sum_c \varphi_{1,c}\Bigr), \qquad
  \text{forward KL: } \frac{p_s - p_t}{T}.

:func:`row_stats` computes a row's divergence and the numbers its gradient
needs (:class:`RowStats`); :func:`row_grad` is that gradient. The teacher
is a constant: nothing flows back to it. The distillation losses call
these: :func:`distillation_loss` on whole rows, and the fused head of
:mod:`jsoft._linear_distillation` on tiles of tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks, _collectives, _rules
from jsoft._cross_entropy import _class_layout, _classes_last
from jsoft._options import reduce
from jsoft._softmax import masked, mass, row_shift

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class Divergence(NamedTuple):
  """Which divergence, fixed at compile time (hashable)."""
  kind: str  # one of DIVERGENCES
  beta: float  # the JSD's teacher weight β in (0, 1)
  temperature: float  # T > 0


def config(fn: str, kind: Any, beta: Any, temperature: Any) -> Divergence:
  """Checks the divergence arguments (once per trace)."""
  kind = _checks.one_of(kind, DIVERGENCES, fn, "divergence")
  beta = _checks.static_float(beta, fn, "beta", low=0.0, high=1.0,
                              open_low=True)
  if beta == 1.0:
    raise ValueError(f"jsoft.{fn}: beta must lie in (0, 1), got {beta!r}.")
  temperature = _checks.static_float(temperature, fn, "temperature",
                                     low=0.0, open_low=True)
  return Divergence(kind, beta if kind == "jsd" else 0.5, temperature)


class RowStats(NamedTuple):
  """What a row's gradient needs, one number per row each."""
  lse_s: jax.Array  # logsumexp(s/T), masked
  lse_t: jax.Array  # logsumexp(t/T), masked
  slope: jax.Array  # Σ_c φ₁: the gradient is (φ₁ − p_s·slope)/T


def scaled(x: jax.Array, valid: jax.Array | None, temperature: float,
           dtype: Any) -> jax.Array:
  """``x/T`` in the compute dtype, ``-inf`` where not ``valid``."""
  x = x.astype(dtype)
  if temperature != 1.0:
    x = x * (1.0 / temperature)
  return masked(x, valid)


def lse(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The row logsumexp of ``x`` (classes last), by the max shift, and
  whether the row has mass. A row with no mass gets a finite floor, so its
  ``x − lse`` stays ``-inf``."""
  c = row_shift(x, (-1,))[..., 0]
  s = jnp.sum(jnp.exp(x - c[..., None]), axis=-1)
  return c + jnp.log(mass(s)), s >= 1


def kl_terms(p: jax.Array, log_p: jax.Array, log_q: jax.Array,
              zero: jax.Array) -> jax.Array:
  """``p·(log p − log q)``, exactly 0 where ``zero`` (no mass), with
  every derivative finite there: the other branch never sees a ``-inf``
  (``0·inf`` would make the derivatives NaN through ``jnp.where``)."""
  return jnp.where(zero, 0, p * (jnp.where(zero, 0, log_p)
                                 - jnp.where(zero, 0, log_q)))


def _entropy_part(p: jax.Array, log_p: jax.Array,
                  log_q: jax.Array) -> jax.Array:
  """``p·(log p − log q)``, exactly 0 where ``p = 0``."""
  return kl_terms(p, log_p, log_q, ~(p > 0))


def _log_mixture(div: Divergence, ls: jax.Array, lt: jax.Array) -> jax.Array:
  """``log(β p_t + (1 − β) p_s)``; where both are 0 it is only ever read
  through a term that is exactly 0, and is computed from 0s instead (the
  derivatives of ``logaddexp(-inf, -inf)`` are NaN)."""
  none = (ls == -jnp.inf) & (lt == -jnp.inf)
  return jnp.logaddexp(jnp.where(none, 0, lt) + math.log(div.beta),
                       jnp.where(none, 0, ls) + math.log1p(-div.beta))


def terms(div: Divergence, ls: jax.Array, lt: jax.Array) -> jax.Array:
  """The divergence's term ``φ`` per entry, from the log-probabilities."""
  ps, pt = jnp.exp(ls), jnp.exp(lt)
  if div.kind == "forward_kl":
    return _entropy_part(pt, lt, ls)
  if div.kind == "reverse_kl":
    return _entropy_part(ps, ls, lt)
  lm = _log_mixture(div, ls, lt)
  return (div.beta * _entropy_part(pt, lt, lm)
          + (1 - div.beta) * _entropy_part(ps, ls, lm))


def slopes(div: Divergence, ls: jax.Array, lt: jax.Array) -> jax.Array:
  """``φ₁ = ∂φ/∂ℓ_s`` per entry (ℓ_t held fixed)."""
  ps, pt = jnp.exp(ls), jnp.exp(lt)
  if div.kind == "forward_kl":
    return -pt
  if div.kind == "reverse_kl":
    return _entropy_part(ps, ls, lt) + ps
  return (1 - div.beta) * _entropy_part(ps, ls, _log_mixture(div, ls, lt))


def row_stats(div: Divergence, s: jax.Array, t: jax.Array
              ) -> tuple[jax.Array, RowStats]:
  """A row's divergence and :class:`RowStats`, from the scaled, masked
  logits ``s/T`` and ``t/T`` (classes last)."""
  (lse_s, has_s), (lse_t, has_t) = lse(s), lse(t)
  ls, lt = s - lse_s[..., None], t - lse_t[..., None]
  d = jnp.sum(terms(div, ls, lt), axis=-1)
  if div.kind == "forward_kl":
    # Σ φ₁ = −Σ p_t: exactly −1 (or 0 for a teacher with no mass), so the
    # gradient is exactly p_s − p_t.
    slope = -has_t.astype(d.dtype)
  elif div.kind == "reverse_kl":  # Σ φ₁ = D + Σ p_s
    slope = d + has_s.astype(d.dtype)
  else:
    slope = jnp.sum(slopes(div, ls, lt), axis=-1)
  return d, RowStats(lse_s, lse_t, slope)


def row_grad(div: Divergence, s: jax.Array, t: jax.Array,
             stats: RowStats, ct: jax.Array) -> jax.Array:
  """``∂(ct·D)/∂s`` for the raw student logits: ``ct·(φ₁ − p_s·Σφ₁)/T``,
  one elementwise pass over the scaled, masked logits."""
  ls = s - stats.lse_s[..., None]
  lt = t - stats.lse_t[..., None]
  g = slopes(div, ls, lt) - jnp.exp(ls) * stats.slope[..., None]
  return g * (ct / div.temperature)[..., None]


# --------------------------------------------------------- whole rows


class Residuals(NamedTuple):
  student: jax.Array  # [..., C] raw logits
  teacher: jax.Array  # [..., C] raw logits (a constant)
  valid: jax.Array | None  # [..., C] entries taking part
  stats: RowStats


def _rows(div, s, t, valid):
  acc = _checks.compute_dtype(s.dtype)
  return (scaled(s, valid, div.temperature, acc),
          scaled(lax.stop_gradient(t), valid, div.temperature, acc))


def _loss_fwd(div, s, t, valid):
  d, stats = row_stats(div, *_rows(div, s, t, valid))
  # Typed to vary like the inputs (see jsoft._collectives).
  d = _collectives.varying_like(d, s, t, valid)
  return d, Residuals(s, t, valid, stats)


def _loss_bwd(div, res: Residuals, ct):
  g = row_grad(div, *_rows(div, res.student, res.teacher, res.valid),
               res.stats, ct)
  if res.valid is not None:
    g = jnp.where(res.valid, g, 0)
  g = _collectives.summed_like(g, res.student).astype(res.student.dtype)
  return g, None, None


def _loss_fun(div, s, t, valid):
  return _loss_fwd(div, s, t, valid)[0]


_loss = _rules.vjp_rule(_loss_fun, _loss_fwd, _loss_bwd)


def row_loss(div: Divergence, student: jax.Array, teacher: jax.Array,
             valid: jax.Array | None) -> jax.Array:
  """The divergence per row (classes last), with the ``y − t`` VJP rule for
  the student and no gradient for the teacher, in every autodiff mode."""
  return _loss(div, student, teacher, valid)


@functools.partial(jax.jit, static_argnames=("axis", "div", "reduction"))
def _distillation_jit(student, teacher, axis, where, div, reduction):
  fn = "distillation_loss"
  s, t = jnp.asarray(student), jnp.asarray(teacher)
  _checks.floating(s, fn, "student_logits")
  _checks.floating(t, fn, "teacher_logits")
  _checks.shape(t, s.shape, fn, "teacher_logits", "the student's shape")
  axes, batch_axes, batch = _class_layout(fn, s, axis, allow_none=True)
  entries, rows = _checks.example_mask(where, s.shape, batch, fn)
  s, t = _classes_last(s, axes, batch_axes), _classes_last(t, axes, batch_axes)
  if entries is not None:
    entries = _classes_last(entries, axes, batch_axes)
  if rows is not None:
    entries = jnp.broadcast_to(rows[..., None], s.shape)
  _checks.finite(s, fn, "student_logits", entries)
  _checks.finite(t, fn, "teacher_logits", entries)
  loss = row_loss(div, s, t, entries)
  return reduce(loss, reduction, rows)


def distillation_loss(student_logits: jax.typing.ArrayLike,
                      teacher_logits: jax.typing.ArrayLike, *,
                      divergence: str = "forward_kl", beta: float = 0.5,
                      temperature: float = 1.0, axis: Any = -1,
                      where: jax.typing.ArrayLike | None = None,
                      reduction: str = "none") -> jax.Array:
  r"""The divergence between a teacher's and a student's softmax, per
  example, for knowledge distillation.

  With ``p_s = softmax(s/T)`` and ``p_t = softmax(t/T)``, a sum over the
  classes of one term per entry,

  .. math::
    D = \sum_c \varphi(\log p_{s,c}, \log p_{t,c}), \qquad
    \log p_s = s/T - \operatorname{logsumexp}(s/T),

  with, for each ``divergence``:

  * ``"forward_kl"``: :math:`\mathrm{KL}(p_t\,\|\,p_s) = \sum_c p_{t,c}
    (\log p_{t,c} - \log p_{s,c})` (Hinton et al.'s soft loss);
  * ``"reverse_kl"``: :math:`\mathrm{KL}(p_s\,\|\,p_t)` (mode seeking);
  * ``"jsd"``: :math:`\beta\,\mathrm{KL}(p_t\,\|\,m) + (1 - \beta)\,
    \mathrm{KL}(p_s\,\|\,m)` with :math:`m = \beta p_t + (1 - \beta) p_s`
    (the generalised Jensen–Shannon divergence; ``β = 0.5`` is the usual
    one, bounded by ``log 2``).

  Computed from the max-shifted log-probabilities, with ``0·log 0 = 0``:
  a teacher ``-inf`` (or masked) logit contributes nothing; a student
  ``-inf`` logit where the teacher has mass gives ``+inf`` (forward KL),
  as does reverse KL where the teacher has no mass but the student has.

  The loss is **not** multiplied by ``T²``. Hinton et al. scale the soft
  loss by ``T²`` so that its gradient keeps its size as ``T`` grows;
  multiply the result by ``temperature**2`` for that.

  The teacher is a constant: no gradient flows to ``teacher_logits`` (wrap
  nothing in ``stop_gradient``; a gradient with respect to it is zero).
  Gradient (the VJP rule, one pass): the seed post's ``y − t`` with the
  teacher as the target, for forward KL exactly :math:`(p_s - p_t)/T`; in
  general :math:`(\varphi_1 - p_s\sum_c \varphi_{1,c})/T` with
  :math:`\varphi_1 = p_s(\log p_s - \log p_t + 1)` (reverse KL) or
  :math:`(1-\beta)\,p_s(\log p_s - \log m)` (JSD). Every autodiff mode
  works (``jvp``, ``jacfwd``, ``hessian``, HVPs).

  Args:
    student_logits: floating array ``[..., C]`` (16-bit floats are computed
      in float32).
    teacher_logits: the teacher's logits, of the same shape (a constant).
    divergence: "forward_kl", "reverse_kl" or "jsd".
    beta: the JSD's weight ``β`` of the teacher, in ``(0, 1)`` (only used
      by "jsd").
    temperature: ``T > 0``, a Python number (compile-time): both softmaxes
      see the logits divided by ``T``.
    axis: the class axis, a tuple of axes, or None (all axes).
    where: optional boolean mask, of the logits' shape (entries left out of
      both softmaxes) or the per-example shape (examples with loss 0 and no
      share in "mean").
    reduction: "none" (per example), "sum", or "mean" (over the examples
      not masked out; 0 when there are none).

  Returns:
    The per-example divergence (the logits' shape without ``axis``) or a
    scalar: float32 for 16-bit logits, else the logits' dtype.

  Examples:
    >>> import jax, jax.numpy as jnp, jsoft
    >>> s = jnp.array([1.0, 2.0, 3.0])
    >>> t = jnp.array([3.0, 2.0, -jnp.inf])
    >>> print(f"{jsoft.distillation_loss(s, t):.4f}")  # KL(p_t || p_s)
    1.5565
    >>> g = jax.grad(jsoft.distillation_loss)(s, t)  # p_s - p_t
    >>> print(jnp.allclose(g, jax.nn.softmax(s) - jax.nn.softmax(t)))
    True
  """
  fn = "distillation_loss"
  axis = tuple(axis) if isinstance(axis, list) else axis
  return _distillation_jit(
      _checks.asarray(student_logits), _checks.asarray(teacher_logits),
      axis, _checks.asarray(where),
      config(fn, divergence, beta, temperature),
      _checks.reduction(reduction, fn))
