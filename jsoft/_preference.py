r"""Preference losses on per-sequence log-probabilities:
:func:`preference_loss`.

Each pair's loss is a function of four numbers, the sequence
log-probabilities of the chosen and the rejected completion under the
policy and (for the DPO family) under a frozen reference, and is built on
:func:`jsoft.log_sigmoid`, exact in both tails: a margin of ±1000 gives a
loss of 0 or 1000 and a gradient of 0 or ``±β``, never NaN.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoft import _checks
from jsoft._sigmoid import _log_sigmoid

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo")
NO_REFERENCE = ("simpo", "orpo")  # length-normalised, reference-free


class PreferenceStats(NamedTuple):
  """Diagnostics of :func:`jsoft.preference_loss` (no gradient):

  * ``chosen_rewards``: per pair, ``β(log π(y_w) − log π_ref(y_w))``, or
    for SimPO and ORPO ``β`` times the chosen average log-probability
    (0 for masked pairs);
  * ``rejected_rewards``: the same for the rejected completion;
  * ``accuracy``: the share of kept pairs whose chosen reward is the
    larger (a scalar);
  * ``margin``: the mean chosen minus rejected reward over kept pairs
    (a scalar).
  """
  chosen_rewards: jax.Array
  rejected_rewards: jax.Array
  accuracy: jax.Array
  margin: jax.Array


class Preference(NamedTuple):
  """The options of :func:`jsoft.preference_loss`, fixed at compile
  time."""
  loss_type: str
  beta: float
  label_smoothing: float
  gamma: float
  orpo_lambda: float
  reduction: str


def preference(fn: str, loss_type, beta, label_smoothing, gamma, orpo_lambda,
               reduction) -> Preference:
  """Checks the options of a preference loss (trace-time errors naming
  ``fn``)."""
  loss_type = _checks.one_of(loss_type, LOSS_TYPES, fn, "loss_type")
  smoothing = _checks.static_float(label_smoothing, fn, "label_smoothing",
                                   low=0.0, high=1.0)
  if loss_type == "robust" and smoothing >= 0.5:
    raise ValueError(f"jsoft.{fn}: the robust loss divides by "
                     f"1 − 2·label_smoothing, so label_smoothing must be "
                     f"below 0.5, got {label_smoothing!r}.")
  return Preference(
      loss_type,
      _checks.static_float(beta, fn, "beta", low=0.0, open_low=True),
      smoothing, _checks.static_float(gamma, fn, "gamma"),
      _checks.static_float(orpo_lambda, fn, "orpo_lambda", low=0.0),
      _checks.reduction(reduction, fn))


def _log1mexp(a: jax.Array) -> jax.Array:
  """``log(1 − e^a)`` for ``a < 0``: ``log(−expm1(a))`` above ``−log 2``,
  ``log1p(−e^a)`` below (Mächler, 2012), each branch fed a safe value
  where the other is taken (the double where)."""
  near = a > -math.log(2)
  return jnp.where(near, jnp.log(-jnp.expm1(jnp.where(near, a, -1.0))),
                   jnp.log1p(-jnp.exp(jnp.where(near, -1.0, a))))


def _smoothed(u: jax.Array, eps: float) -> jax.Array:
  """``−(1−ε)·log σ(u) − ε·log σ(−u)`` (cDPO's smoothed labels)."""
  loss = -_log_sigmoid(u)
  return loss if not eps else (1 - eps) * loss - eps * _log_sigmoid(-u)


def pair_losses(opts: Preference, chosen, rejected, ref_chosen, ref_rejected):
  """Each pair's loss and its ``(chosen_rewards, rejected_rewards)``.

  ``chosen`` and ``rejected`` are sequence sums (DPO family, with their
  references) or averages over the completion's tokens (SimPO, ORPO)."""
  kind, beta, eps = opts.loss_type, opts.beta, opts.label_smoothing
  if kind in NO_REFERENCE:
    rewards = (beta * chosen, beta * rejected)
    if kind == "simpo":
      return _smoothed(beta * (chosen - rejected) - opts.gamma, eps), rewards
    # ORPO: log odds(p) = log p − log(1 − p) of the average probabilities,
    # each kept below 1 (odds of a certain completion would be infinite).
    tiny = jnp.finfo(chosen.dtype).tiny
    c, r = jnp.minimum(chosen, -tiny), jnp.minimum(rejected, -tiny)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -chosen - opts.orpo_lambda * _log_sigmoid(log_odds), rewards
  h_chosen, h_rejected = chosen - ref_chosen, rejected - ref_rejected
  h = h_chosen - h_rejected
  rewards = (beta * h_chosen, beta * h_rejected)
  u = beta * h
  if kind == "sigmoid":
    return _smoothed(u, eps), rewards
  if kind == "robust":
    loss = (-(1 - eps) * _log_sigmoid(u) + eps * _log_sigmoid(-u))
    return loss / (1 - 2 * eps), rewards
  if kind == "ipo":
    return (h - 1 / (2 * beta)) ** 2, rewards
  return jnp.maximum(1 - u, 0), rewards  # hinge


def reduce_pairs(opts: Preference, loss, rewards, mask):
  """The reduced loss and the :class:`PreferenceStats`; masked pairs
  count nowhere (an all-masked batch: mean loss 0)."""
  keep = mask > 0
  loss = jnp.where(keep, loss, 0)
  n = jnp.maximum(jnp.sum(mask), 1)
  if opts.reduction == "sum":
    loss = jnp.sum(loss)
  elif opts.reduction == "mean":
    loss = jnp.sum(loss) / n
  chosen, rejected = (jnp.where(keep, x, 0) for x in rewards)
  won = jnp.where(keep, chosen > rejected, False).astype(mask.dtype)
  stats = PreferenceStats(chosen, rejected, jnp.sum(won) / n,
                          jnp.sum(chosen - rejected) / n)
  return loss, lax.stop_gradient(stats)


def _per_pair(fn, x, shape, dtype, what):
  x = jnp.asarray(x)
  _checks.floating(x, fn, what)
  _checks.shape(x, shape, fn, what, "one per pair, like chosen_logps")
  return x.astype(dtype)


def operands(fn, opts, chosen, rejected, ref_chosen, ref_rejected,
             chosen_lengths, rejected_lengths, where):
  """The checked, cast operands ``(chosen, rejected, ref_chosen,
  ref_rejected, mask)``: averages for SimPO and ORPO, references
  (zeros when reference-free) under ``stop_gradient``."""
  chosen = jnp.asarray(chosen)
  _checks.floating(chosen, fn, "chosen_logps")
  shape, dtype = chosen.shape, _checks.compute_dtype(chosen.dtype)
  chosen = chosen.astype(dtype)
  rejected = _per_pair(fn, rejected, shape, dtype, "rejected_logps")
  mask = _checks.mask(where, shape, fn)
  mask = jnp.ones(shape, dtype) if mask is None else mask.astype(dtype)
  if (ref_chosen is None) != (ref_rejected is None):
    raise ValueError(f"jsoft.{fn}: pass both ref_chosen_logps and "
                     "ref_rejected_logps, or neither (reference-free).")
  if opts.loss_type in NO_REFERENCE:
    if ref_chosen is not None:
      raise ValueError(f"jsoft.{fn}: loss_type={opts.loss_type!r} takes no "
                       "reference log-probabilities.")
    lengths = (chosen_lengths, rejected_lengths)
    if (lengths[0] is None) != (lengths[1] is None):
      raise ValueError(f"jsoft.{fn}: pass both chosen_lengths and "
                       "rejected_lengths, or neither (averages given).")
    if lengths[0] is not None:
      chosen, rejected = (
          x / jnp.where(mask > 0, jnp.maximum(
              _per_pair(fn, n, shape, dtype, what), 1), 1)
          for x, n, what in zip((chosen, rejected), lengths,
                                ("chosen_lengths", "rejected_lengths"),
                                strict=True))
  elif chosen_lengths is not None or rejected_lengths is not None:
    raise ValueError(f"jsoft.{fn}: chosen_lengths and rejected_lengths are "
                     "for the length-normalised losses 'simpo' and 'orpo'.")
  refs = (jnp.zeros(shape, dtype),) * 2
  if ref_chosen is not None:
    refs = tuple(lax.stop_gradient(_per_pair(fn, x, shape, dtype, what))
                 for x, what in ((ref_chosen, "ref_chosen_logps"),
                                 (ref_rejected, "ref_rejected_logps")))
  # Masked pairs see −1 (a finite log-probability for every loss type):
  # whatever they hold never reaches a gradient.
  chosen, rejected, *refs = (jnp.where(mask > 0, x, -1.0)
                             for x in (chosen, rejected, *refs))
  return chosen, rejected, *refs, mask


@functools.partial(jax.jit, static_argnames=("opts",))
def _preference_jit(chosen, rejected, ref_chosen, ref_rejected,
                    chosen_lengths, rejected_lengths, where, opts):
  c, r, rc, rr, mask = operands(
      "preference_loss", opts, chosen, rejected, ref_chosen, ref_rejected,
      chosen_lengths, rejected_lengths, where)
  loss, rewards = pair_losses(opts, c, r, rc, rr)
  return reduce_pairs(opts, loss, rewards, mask)


def preference_loss(
    chosen_logps: jax.typing.ArrayLike, rejected_logps: jax.typing.ArrayLike,
    *, ref_chosen_logps: jax.typing.ArrayLike | None = None,
    ref_rejected_logps: jax.typing.ArrayLike | None = None,
    loss_type: str = "sigmoid", beta: float = 0.1,
    label_smoothing: float = 0.0, gamma: float = 0.0,
    orpo_lambda: float = 0.1,
    chosen_lengths: jax.typing.ArrayLike | None = None,
    rejected_lengths: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "mean") -> tuple[jax.Array, PreferenceStats]:
  r"""Pairwise preference losses (DPO, cDPO, robust DPO, IPO, hinge/SLiC,
  SimPO, ORPO) on per-sequence log-probabilities.

  With ``π_w, π_l`` the chosen and rejected log-probabilities (sums over
  each completion's tokens), ``ρ_w, ρ_l`` the reference's (0 when
  reference-free), ``h = (π_w − ρ_w) − (π_l − ρ_l)``, ``u = βh``,
  ``ε = label_smoothing``, and for the length-normalised losses
  ``π̄ = π/|y|``:

  .. math::
    \text{sigmoid (DPO, cDPO):}\ -(1-\varepsilon)\log\sigma(u)
      - \varepsilon\log\sigma(-u),
    \qquad \text{robust:}\ \frac{-(1-\varepsilon)\log\sigma(u)
      + \varepsilon\log\sigma(-u)}{1 - 2\varepsilon},

    \text{IPO:}\ \Bigl(h - \frac{1}{2\beta}\Bigr)^2, \qquad
    \text{hinge:}\ \max(0,\ 1 - u),

    \text{SimPO:}\ -(1-\varepsilon)\log\sigma(v)
      - \varepsilon\log\sigma(-v),\ \ v = \beta(\bar\pi_w - \bar\pi_l)
      - \gamma,

    \text{ORPO:}\ -\bar\pi_w - \lambda\log\sigma\Bigl(
      \log\frac{e^{\bar\pi_w}}{1 - e^{\bar\pi_w}}
      - \log\frac{e^{\bar\pi_l}}{1 - e^{\bar\pi_l}}\Bigr).

  Sources: DPO (Rafailov et al., 2023), cDPO (Mitchell, 2023), robust DPO
  (Chowdhury et al., 2024), IPO (Azar et al., 2023), hinge (SLiC, Zhao et
  al., 2023), SimPO (Meng et al., 2024), ORPO (Hong et al., 2024). The
  formulas are TRL's, except that IPO takes the log-probabilities as given
  (the paper's sums; TRL averages them over tokens: pass averages for
  that), and ORPO's NLL is the chosen average log-probability per pair
  (TRL: the token mean over the batch's chosen tokens).

  Stability: every ``log σ`` is :func:`jsoft.log_sigmoid`, exact in both
  tails; ``log(1 − e^a)`` is ``log(−expm1 a)`` or ``log1p(−e^a)`` by
  Mächler's switch, with ``a`` kept below ``−tiny``.

  Derivative: ``∂/∂π_w = −∂/∂π_l = β·g(u)`` with
  ``g = −(1−ε)σ(−u) + εσ(u)`` (sigmoid) and ``−1`` where ``u < 1``
  (hinge); IPO's is ``±2(h − 1/(2β))``; SimPO's and ORPO's go through
  ``1/|y|``. No gradient flows to the references or
  lengths.

  Args:
    chosen_logps: ``[...]`` the chosen completions' log-probabilities
      under the policy (sums over tokens; averages for ``"simpo"`` and
      ``"orpo"`` unless lengths are given).
    rejected_logps: ``[...]`` the same for the rejected completions.
    ref_chosen_logps, ref_rejected_logps: optional ``[...]`` sums under the
      frozen reference (no gradient); both or neither (reference-free);
      not for ``"simpo"``, ``"orpo"``.
    loss_type: ``"sigmoid"``, ``"robust"``, ``"ipo"``, ``"hinge"``,
      ``"simpo"`` or ``"orpo"``.
    beta: ``β > 0``, the inverse temperature (IPO: the regulariser
      ``1/(2β)`` is the target margin).
    label_smoothing: ``ε``: the assumed share of flipped labels
      (``"sigmoid"``, ``"simpo"``: ``[0, 1]``; ``"robust"``: below 0.5).
    gamma: SimPO's target reward margin ``γ``.
    orpo_lambda: ORPO's weight ``λ ≥ 0`` of the odds-ratio term.
    chosen_lengths, rejected_lengths: optional ``[...]`` completion lengths
      in tokens for ``"simpo"`` and ``"orpo"``: then ``chosen_logps`` and
      ``rejected_logps`` are sums, divided by these (at least 1).
    where: optional boolean ``[...]`` mask of pairs; False pairs take no
      part (zero loss, gradient and rewards; not counted in means).
    reduction: ``"mean"`` over kept pairs (the default), ``"sum"`` or
      ``"none"``.

  Returns:
    ``(loss, stats)``: the reduced loss (or per pair with ``"none"``) and
    a :class:`jsoft.PreferenceStats`.

  Examples:
    >>> import jax.numpy as jnp, jsoft
    >>> loss, stats = jsoft.preference_loss(
    ...     jnp.array([-5.0]), jnp.array([-5.0]),
    ...     ref_chosen_logps=jnp.array([-6.0]),
    ...     ref_rejected_logps=jnp.array([-4.0]), beta=0.5)
    >>> print(f"{loss:.4f} {stats.margin:.1f}")  # −log σ(0.5·2)
    0.3133 1.0
  """
  fn = "preference_loss"
  opts = preference(fn, loss_type, beta, label_smoothing, gamma, orpo_lambda,
                    reduction)
  a = _checks.asarray
  return _preference_jit(
      a(chosen_logps), a(rejected_logps), a(ref_chosen_logps),
      a(ref_rejected_logps), a(chosen_lengths), a(rejected_lengths),
      a(where), opts)
