"""Every implementation the benchmark compares, by peer and function.

Functions (``fn``) and their inputs:

=============  ==================  =========================================
fn             inputs              forward output
=============  ==================  =========================================
softmax        x [N, C]            [N, C]
log_softmax    x [N, C]            [N, C]
logsumexp      x [N, C]            [N]
sigmoid        x [N, C]            [N, C]
ce_int         x [N, C], y [N]     per-example integer-label cross-entropy
ce_prob        x [N, C], t [N, C]  per-example probability-label CE
ce_opts        x [N, C], y [N]     integer-label CE with training options
bce            x [N, C], t [N, C]  element-wise sigmoid binary CE
lm_head        h [N, D], W [D, V], y [N]   mean CE of ``h @ W`` (a step)
lce            h [N, D], W [D, V], y [N]   the same, fused vs unfused
distill        h, W, h_t, W_t      mean forward KL of a teacher head's
                                   softmax from a student head's
=============  ==================  =========================================

``ce_opts`` is the loss of a language-model trainer: ``OPTIONS`` (targets
labelled -100 ignored, label smoothing, z-loss, logit soft cap, mean over
the kept targets). Each peer computes the same number its own way: jsoft
with keywords, ``jax.nn``/optax/torch composed from their primitives, and
``jsoft-plain`` is jsoft's plain call (mean, no options) on the same
inputs, to show what the options cost.

``lce`` is the LM-head step with gradients for both ``h`` and ``W``: jsoft
runs :func:`jsoft.linear_cross_entropy` (fused: no ``[N, V]`` logits), and
``jsoft-plain``, optax and torch the unfused ``CE(h @ W)``.

``distill`` is a distillation step with gradients for the student's ``h``
and ``W``: jsoft runs :func:`jsoft.linear_distillation_loss` (both heads
fused), ``jsoft-plain`` :func:`jsoft.distillation_loss` of the two heads'
logits, optax its ``kl_divergence`` of their (log-)softmaxes.

Mode ``fwd`` computes the output; mode ``vg`` computes a scalar and its
gradient: ``Σ out·ct`` for the activations (``ct`` a fixed random cotangent,
passed as an input), the mean loss for the losses, both with respect to
``x`` (``W`` for ``lm_head``, which has only mode ``vg``).

Peers: ``jsoft``; ``jax.nn`` (the activations, and the losses composed from
``jax.nn.log_softmax``/``log_sigmoid``); ``optax`` (the losses);
``naive-jnp`` and ``naive-numpy``, the seed post's formulas (see
docs/design/y_minus_t.md: ``exp(x)/Σexp(x)``, ``1/(1+exp(-x))``,
``-log softmax``) which overflow, the NumPy one with the hand-derived
gradients (``y - t``); ``torch`` on the CPU (:mod:`bench.torch_peer`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsoft

ACTIVATIONS = ("softmax", "log_softmax", "logsumexp", "sigmoid")
LOSSES = ("ce_int", "ce_prob", "bce", "ce_opts")
PEERS = ("jsoft", "jsoft-plain", "jax.nn", "optax", "naive-jnp",
         "naive-numpy", "torch")
# (The heads, HEADS, and every function, FNS, follow from SPECS below.)

IGNORE = -100
OPTIONS = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-4,
               logit_soft_cap=30.0, reduction="mean")


# -------------------------------------------------------------------- JAX


def _take(logp, y):
  return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def _naive_softmax(x):
  e = jnp.exp(x)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _naive_sigmoid(x):
  return 1 / (1 + jnp.exp(-x))


def _composed_options(log_softmax, smoothed_ce=None):
  """``ce_opts`` composed from a library's primitives, as its users write
  it: soft cap, (smoothed) CE, z-loss, then a mean over the kept targets."""
  eps, lam = OPTIONS["label_smoothing"], OPTIONS["z_loss"]
  cap = OPTIONS["logit_soft_cap"]

  def loss(x, y):
    z = cap * jnp.tanh(x.astype(jnp.float32) / cap)
    keep = y != IGNORE
    y = jnp.where(keep, y, 0)
    if smoothed_ce is None:
      logp = log_softmax(z)
      per = -(1 - eps) * _take(logp, y) - eps * jnp.mean(logp, -1)
    else:
      per = smoothed_ce(z, y, eps)
    per = per + lam * jnp.square(jax.nn.logsumexp(z, -1))
    kept = jnp.sum(keep).astype(per.dtype)
    return jnp.sum(jnp.where(keep, per, 0)) / jnp.maximum(kept, 1)

  return loss


def _jax_forwards(peer: str) -> dict[str, Callable[..., jax.Array]]:
  """Forward functions of the JAX-based peers (``lm_head`` excluded)."""
  if peer == "jsoft-plain":
    ce = jsoft.softmax_cross_entropy_with_integer_labels
    return {"ce_opts": lambda x, y: jnp.mean(ce(x, jnp.maximum(y, 0)))}
  if peer == "jsoft":
    return {
        "softmax": jsoft.softmax,
        "log_softmax": jsoft.log_softmax,
        "logsumexp": functools.partial(jsoft.logsumexp, axis=-1),
        "sigmoid": jsoft.sigmoid,
        "ce_int": jsoft.softmax_cross_entropy_with_integer_labels,
        "ce_prob": jsoft.softmax_cross_entropy,
        "bce": jsoft.sigmoid_binary_cross_entropy,
        "ce_opts": functools.partial(
            jsoft.softmax_cross_entropy_with_integer_labels, **OPTIONS),
    }
  if peer == "jax.nn":
    ls = jax.nn.log_sigmoid
    return {
        "softmax": jax.nn.softmax,
        "log_softmax": jax.nn.log_softmax,
        "logsumexp": functools.partial(jax.nn.logsumexp, axis=-1),
        "sigmoid": jax.nn.sigmoid,
        "ce_int": lambda x, y: -_take(jax.nn.log_softmax(x), y),
        "ce_prob": lambda x, t: -jnp.sum(t * jax.nn.log_softmax(x), -1),
        "bce": lambda x, t: -(t * ls(x) + (1 - t) * ls(-x)),
        "ce_opts": _composed_options(jax.nn.log_softmax),
    }
  if peer == "optax":
    import optax  # noqa: PLC0415

    def smoothed_ce(z, y, eps):
      onehot = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
      return optax.softmax_cross_entropy(z, optax.smooth_labels(onehot, eps))

    return {
        "ce_int": optax.softmax_cross_entropy_with_integer_labels,
        "ce_prob": optax.softmax_cross_entropy,
        "bce": optax.sigmoid_binary_cross_entropy,
        "ce_opts": _composed_options(None, smoothed_ce),
    }
  if peer == "naive-jnp":
    def bce(x, t):
      s = _naive_sigmoid(x)
      return -(t * jnp.log(s) + (1 - t) * jnp.log(1 - s))
    return {
        "softmax": _naive_softmax,
        "log_softmax": lambda x: jnp.log(_naive_softmax(x)),
        "logsumexp": lambda x: jnp.log(jnp.sum(jnp.exp(x), -1)),
        "sigmoid": _naive_sigmoid,
        "ce_int": lambda x, y: -jnp.log(_take(_naive_softmax(x), y)),
        "ce_prob": lambda x, t: -jnp.sum(t * jnp.log(_naive_softmax(x)), -1),
        "bce": bce,
    }
  raise ValueError(peer)


def _lm_head_loss(peer: str) -> Callable[..., jax.Array] | None:
  ce = _jax_forwards(peer).get("ce_int")
  if ce is None:
    return None
  return lambda h, w, y: jnp.mean(ce(h @ w, y).astype(jnp.float32))


def _fused_head_loss(peer: str) -> Callable[..., jax.Array] | None:
  if peer == "jsoft":
    return lambda h, w, y: jsoft.linear_cross_entropy(h, w, y,
                                                      reduction="mean")
  if peer == "jsoft-plain":
    return _lm_head_loss("jsoft")
  if peer == "optax":
    return _lm_head_loss("optax")
  return None


def _distill_loss(peer: str) -> Callable[..., jax.Array] | None:
  if peer == "jsoft":
    return lambda hs, ws, ht, wt: jsoft.linear_distillation_loss(
        hs, ws, ht, wt, reduction="mean")
  if peer == "jsoft-plain":
    return lambda hs, ws, ht, wt: jsoft.distillation_loss(
        hs @ ws, ht @ wt, reduction="mean")
  if peer == "optax":
    import optax  # noqa: PLC0415

    def loss(hs, ws, ht, wt):
      teacher = jax.lax.stop_gradient(ht @ wt)
      return jnp.mean(optax.losses.kl_divergence(
          jax.nn.log_softmax(hs @ ws), jax.nn.softmax(teacher)))

    return loss
  return None


# ------------------------------------------------------------------ specs


@dataclasses.dataclass(frozen=True)
class Fn:
  """One function of the benchmark, described once: which of its inputs
  carry the case's dtype, which mode ``vg`` differentiates, and for a
  linear head its sizes and its JAX peers' losses."""

  name: str
  float_inputs: tuple[int, ...] = (0,)
  grad_inputs: tuple[int, ...] = (0,)
  # A head only: size name -> (N, D, V), the command-line flag that picks
  # the size (--lm-head, --lce), and peer -> its loss (or None).
  sizes: Mapping[str, tuple[int, int, int]] | None = None
  size_flag: str | None = None
  loss: Callable[[str], Callable[..., jax.Array] | None] | None = None
  float32_only: bool = False
  # jsoft's call is fused: "jsoft-plain" is the unfused loss it is checked
  # against, and its eager call (no different from its jitted one) is not
  # timed.
  fused: bool = False
  teacher: bool = False  # inputs h, W, h_t, W_t (no labels)

  @property
  def head(self) -> bool:
    return self.sizes is not None


SPECS: dict[str, Fn] = {f.name: f for f in (
    *(Fn(name) for name in ACTIVATIONS),
    Fn("ce_int"),
    Fn("ce_prob", float_inputs=(0, 1)),
    Fn("bce", float_inputs=(0, 1)),
    Fn("ce_opts"),
    Fn("lm_head", float_inputs=(0, 1), grad_inputs=(1,),
       sizes={"tiny": (4, 3, 5), "quick": (512, 128, 8192),
              "full": (2048, 256, 32000)},
       size_flag="lm_head", loss=_lm_head_loss),
    # The fused linear cross-entropy; float32 only.
    Fn("lce", float_inputs=(0, 1), grad_inputs=(0, 1),
       sizes={"tiny": (6, 3, 5), "quick": (1024, 128, 8192),
              "full": (8192, 256, 32768)},
       size_flag="lce", loss=_fused_head_loss, float32_only=True,
       fused=True),
    # Distillation between two heads, both D wide, sized with the fused
    # head (--lce); float32 only.
    Fn("distill", float_inputs=(0, 1, 2, 3), grad_inputs=(0, 1),
       sizes={"tiny": (6, 3, 5), "quick": (1024, 128, 8192),
              "full": (4096, 256, 32768)},
       size_flag="lce", loss=_distill_loss, float32_only=True, fused=True,
       teacher=True),
)}
HEADS = tuple(name for name, f in SPECS.items() if f.head)
FNS = ACTIVATIONS + LOSSES + HEADS
# Peers that exist only for some functions (absent elsewhere, unreported).
ONLY_FOR = {"jsoft-plain": ("ce_opts", *(name for name, f in SPECS.items()
                                         if f.fused))}


def jax_impl(peer: str, fn: str, mode: str) -> Callable[..., Any] | None:
  """The jitted case function of a JAX peer, or None if it has none."""
  spec = SPECS[fn]
  if spec.head:
    loss = spec.loss(peer)
    if loss is None or mode != "vg":
      return None
    grads = spec.grad_inputs
    return jax.jit(jax.value_and_grad(
        loss, argnums=grads if len(grads) > 1 else grads[0]))
  f = _jax_forwards(peer).get(fn)
  if f is None:
    return None
  if mode == "fwd":
    return jax.jit(f)
  if fn in ACTIVATIONS:
    def scalar(x, ct):
      return jnp.sum(f(x).astype(jnp.float32) * ct)
  else:
    def scalar(x, other):
      return jnp.mean(f(x, other).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(scalar))


# ------------------------------------------------------------------ NumPy


def _np_softmax(x):
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def numpy_impl(fn: str, mode: str) -> Callable[..., Any] | None:
  """The seed post's NumPy formulas, with the hand-derived gradients."""
  if fn == "ce_opts" or SPECS[fn].fused:
    return None

  def onehot_minus(p, y):
    g = p.copy()
    g[np.arange(len(y)), y] -= 1
    return g

  fwd = {
      "softmax": _np_softmax,
      "log_softmax": lambda x: np.log(_np_softmax(x)),
      "logsumexp": lambda x: np.log(np.exp(x).sum(-1)),
      "sigmoid": _np_sigmoid,
      "ce_int": lambda x, y: -np.log(_np_softmax(x)[np.arange(len(y)), y]),
      "ce_prob": lambda x, t: -(t * np.log(_np_softmax(x))).sum(-1),
      "bce": lambda x, t: -(t * np.log(_np_sigmoid(x))
                            + (1 - t) * np.log(1 - _np_sigmoid(x))),
  }

  def vg(x, other):
    if fn == "softmax":
      y = _np_softmax(x)
      return (y * other).sum(), y * (other - (y * other).sum(-1, keepdims=True))
    if fn == "log_softmax":
      y = _np_softmax(x)
      return ((np.log(y) * other).sum(),
              other - y * other.sum(-1, keepdims=True))
    if fn == "logsumexp":
      return ((np.log(np.exp(x).sum(-1)) * other).sum(),
              _np_softmax(x) * other[:, None])
    if fn == "sigmoid":
      s = _np_sigmoid(x)
      return (s * other).sum(), s * (1 - s) * other
    n = x.shape[0] if fn != "bce" else x.size
    loss = fwd[fn](x, other).mean()
    if fn == "ce_int":  # the seed post's y − t
      return loss, onehot_minus(_np_softmax(x), other) / n
    if fn == "ce_prob":
      return loss, (_np_softmax(x) - other) / n
    return loss, (_np_sigmoid(x) - other) / n  # bce

  def lm_head(h, w, y):
    p = _np_softmax(h @ w)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    return loss, h.T @ (onehot_minus(p, y) / len(y))

  if fn == "lm_head":
    return lm_head if mode == "vg" else None
  return fwd[fn] if mode == "fwd" else vg
