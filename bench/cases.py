"""Benchmark cases: what is measured, on which inputs, by whom.

A case is one function, one shape, one dtype and one mode, named
``{fn}_{shape}_{dtype}_{mode}`` (e.g. ``ce_int_4096x32000_float32_vg``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import peers, torch_peer

# name -> (N, C), or (N, D, V) for the LM head.
SHAPES = {
    "tiny": (4, 5),
    "small": (8, 10),
    "medium": (1024, 1000),
    "large": (4096, 32000),
}
# The heads' sizes, name -> (N, D, V) (see peers.SPECS).
LM_HEAD = peers.SPECS["lm_head"].sizes
LCE = peers.SPECS["lce"].sizes
DISTILL = peers.SPECS["distill"].sizes
DTYPES = ("float32", "bfloat16")
MODES = ("fwd", "vg")


@dataclasses.dataclass(frozen=True)
class Case:
  fn: str
  dims: tuple[int, ...]
  dtype: str
  mode: str

  @property
  def name(self) -> str:
    dims = "x".join(map(str, self.dims))
    return f"{self.fn}_{dims}_{self.dtype}_{self.mode}"

  @property
  def spec(self) -> peers.Fn:
    return peers.SPECS[self.fn]

  @property
  def shape_label(self) -> str:
    if self.spec.head:
      return self.fn
    return next((k for k, v in SHAPES.items() if v == self.dims), "custom")


def make_cases(fns, shapes, dtypes, lm_head: str | None,
               lce: str | None = None) -> list[Case]:
  """Every combination asked for; ``lm_head`` and ``lce`` pick the sizes of
  the head cases (None: not run)."""
  out = []
  for fn, shape, dtype, mode in itertools.product(
      [f for f in fns if not peers.SPECS[f].head], shapes, dtypes, MODES):
    out.append(Case(fn, SHAPES[shape], dtype, mode))
  size_of = {"lm_head": lm_head, "lce": lce}  # per size flag
  for fn in fns:
    spec = peers.SPECS[fn]
    size = size_of[spec.size_flag] if spec.head else None
    if size is None:
      continue
    for dtype in ("float32",) if spec.float32_only else dtypes:
      out.append(Case(fn, spec.sizes[size], dtype, "vg"))
  return out


def default_cases() -> list[Case]:
  """The default run, a few minutes on 2 CPU cores (float32): the
  integer-label CE and the softmax at a language model's size, the other
  losses and every training option at once at 1024×1000, the LM-head step,
  the fused head at its quick size, and the dispatch latency of the three
  losses."""
  small, medium, large = (SHAPES[k] for k in ("small", "medium", "large"))
  return [
      Case("ce_int", large, "float32", "fwd"),
      Case("ce_int", large, "float32", "vg"),
      Case("softmax", large, "float32", "fwd"),
      Case("ce_prob", medium, "float32", "vg"),
      Case("bce", medium, "float32", "vg"),
      Case("ce_opts", medium, "float32", "vg"),
      Case("lm_head", LM_HEAD["full"], "float32", "vg"),
      Case("lce", LCE["quick"], "float32", "vg"),
      Case("distill", DISTILL["quick"], "float32", "vg"),
      Case("ce_int", small, "float32", "fwd"),
      Case("ce_int", small, "float32", "vg"),
      Case("ce_prob", small, "float32", "fwd"),
      Case("bce", small, "float32", "fwd"),
  ]


# ----------------------------------------------------------------- inputs


def normal(rng: np.random.Generator, shape: tuple[int, ...],
           std: float) -> np.ndarray:
  """Normal draws of standard deviation ``std``, float32 throughout (no
  float64 copy of a large array)."""
  out = rng.standard_normal(shape, dtype=np.float32)
  out *= np.float32(std)
  return out


def head_inputs(rng: np.random.Generator, n: int, d: int, v: int, *,
                scale: float = 1.0, labels: bool = True
                ) -> tuple[np.ndarray, ...]:
  """Host inputs of a linear head: features ``h [n, d]`` (unit normal), a
  weight ``W [d, v]`` of standard deviation ``scale / sqrt(d)`` (logits of
  about ``scale``), and, with ``labels``, targets ``y [n]`` in ``[0, v)``
  (int32), drawn in that order from ``rng``."""
  h = normal(rng, (n, d), 1.0)
  w = normal(rng, (d, v), scale / np.sqrt(d))
  if not labels:
    return h, w
  return h, w, rng.integers(0, v, size=n).astype(np.int32)


def make_inputs(case: Case, scale: float = 1.0) -> tuple[np.ndarray, ...]:
  """Host (NumPy, float32/int32) inputs; ``scale`` multiplies the logits
  (or the head weights), 1000 for the overflow check."""
  rng = np.random.default_rng(0)
  if case.spec.head:
    n, d, v = case.dims
    if case.spec.teacher:  # a teacher head of the same sizes
      return (*head_inputs(rng, n, d, v, scale=scale, labels=False),
              *head_inputs(rng, n, d, v, scale=scale, labels=False))
    return head_inputs(rng, n, d, v, scale=scale)
  n, c = case.dims
  x = normal(rng, (n, c), 3 * scale)
  if case.fn == "ce_int":
    return x, rng.integers(0, c, size=n).astype(np.int32)
  if case.fn == "ce_opts":  # one target in ten ignored (padding)
    y = rng.integers(0, c, size=n).astype(np.int32)
    return x, np.where(rng.random(n) < 0.1, peers.IGNORE, y).astype(np.int32)
  if case.fn == "ce_prob":
    t = rng.random((n, c), dtype=np.float32)
    return x, t / t.sum(-1, keepdims=True)
  if case.fn == "bce":
    return x, (rng.random((n, c), dtype=np.float32) < 0.5).astype(np.float32)
  if case.mode == "vg":  # the activations' cotangent
    return x, normal(rng, (n,) if case.fn == "logsumexp" else (n, c), 1.0)
  return (x,)


def to_jax(case: Case, host: tuple[np.ndarray, ...]) -> tuple[jax.Array, ...]:
  dtype = jnp.dtype(case.dtype)
  return tuple(
      jnp.asarray(a, dtype) if i in case.spec.float_inputs else jnp.asarray(a)
      for i, a in enumerate(host))


def to_torch(case: Case, host: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
  import torch  # noqa: PLC0415
  dtype = getattr(torch, case.dtype)
  out = []
  for i, a in enumerate(host):
    # from_numpy shares the host buffer; .to copies only to another dtype.
    if i in case.spec.float_inputs:
      t = torch.from_numpy(a).to(dtype)
    else:
      t = torch.from_numpy(a).to(torch.int64 if a.dtype.kind == "i" else
                                 torch.float32)
    if case.mode == "vg" and i in case.spec.grad_inputs:
      t.requires_grad_(True)
    out.append(t)
  return tuple(out)


# ----------------------------------------------------------------- impls


@dataclasses.dataclass
class Impl:
  """One peer's implementation of one case, with its inputs bound."""

  peer: str
  call: Callable[[], Any]           # runs once and waits for the result
  jitted: Any = None                 # the jax.jit object (compile, memory)
  args: tuple[Any, ...] = ()
  eager: Callable[[], Any] | None = None   # the same work, not jitted
  extreme: Callable[[], Any] | None = None  # the same on inputs × 1000


def _block(out):
  return jax.block_until_ready(out)


def floor_impl(case: Case, args: tuple[jax.Array, ...], out_avals) -> Impl:
  """A jitted read + write of fresh buffers of the case's sizes.

  Reads the largest float input once and writes an array of the largest
  output's shape (``x + 1`` when the shapes agree, a row sum otherwise):
  the least work any implementation of the case can do.
  """
  big_out = max(jax.tree.leaves(out_avals), key=lambda a: a.size)
  x_index = max((i for i, a in enumerate(args)
                 if jnp.issubdtype(a.dtype, jnp.floating)),
                key=lambda i: args[i].size)

  def floor(*a):
    x = a[x_index]
    if x.shape == big_out.shape:
      return (x + 1).astype(big_out.dtype)
    flat = x.reshape(big_out.shape + (-1,)) if big_out.shape else x.ravel()
    return jnp.sum(flat, axis=-1).astype(big_out.dtype)

  jitted = jax.jit(floor)
  return Impl("floor", lambda: _block(jitted(*args)), jitted, args)


def inplace_floor_impl(case: Case, args: tuple[jax.Array, ...],
                       out_avals) -> Impl | None:
  """``x + 1`` into the buffer it reads (donated): the floor without the
  cost of a fresh output buffer (on CPU, mostly page faults). Only where
  the largest output has the largest input's shape; a diagnostic."""
  big_out = max(jax.tree.leaves(out_avals), key=lambda a: a.size)
  x = max((a for a in args if jnp.issubdtype(a.dtype, jnp.floating)),
          key=lambda a: a.size)
  if x.shape != big_out.shape:
    return None
  step = jax.jit(lambda x: x + 1, donate_argnums=0)
  state = [x + 0]

  def call():
    state[0] = _block(step(state[0]))

  return Impl("floor, in place", call)


def build(case: Case, available: dict[str, str | None],
          extremes: bool = True) -> tuple[dict[str, Impl], dict[str, str]]:
  """The implementations of ``case``, and why the others are missing.

  ``available`` maps each peer to None (usable) or the reason it is not;
  ``extremes``: also bind each to the inputs × 1000 (the overflow check).
  """
  host = make_inputs(case)
  extreme_host = make_inputs(case, scale=1000.0) if extremes else None
  # The JAX peers share one copy of the inputs on the device.
  args = to_jax(case, host)
  xargs = to_jax(case, extreme_host) if extremes else None
  impls: dict[str, Impl] = {}
  missing: dict[str, str] = {}
  for peer in peers.PEERS:
    if case.fn not in peers.ONLY_FOR.get(peer, (case.fn,)):
      continue
    if available.get(peer):
      missing[peer] = str(available[peer])
      continue
    if peer == "naive-numpy":
      fn = peers.numpy_impl(case.fn, case.mode)
      if fn is None:
        missing[peer] = "no such case"
        continue
      if case.dtype != "float32":
        missing[peer] = "NumPy has no bfloat16 arithmetic"
        continue
      impls[peer] = Impl(peer, _bind(fn, host),
                         extreme=_bind(fn, extreme_host) if extremes else None)
    elif peer == "torch":
      fn = torch_peer.torch_impl(case.fn, case.mode)
      if fn is None:
        missing[peer] = "no such case"
        continue
      targs = to_torch(case, host)
      txargs = to_torch(case, extreme_host) if extremes else None
      impls[peer] = Impl(peer, _bind(fn, targs),
                         extreme=_bind(fn, txargs) if extremes else None)
    else:
      jitted = peers.jax_impl(peer, case.fn, case.mode)
      if jitted is None:
        missing[peer] = f"{peer} has no {case.fn}"
        continue
      eager = jitted.__wrapped__
      impls[peer] = Impl(
          peer, lambda j=jitted, a=args: _block(j(*a)), jitted, args,
          eager=None if case.spec.fused else (
              lambda e=eager, a=args: _block(e(*a))),
          extreme=(lambda j=jitted, a=xargs: _block(j(*a))) if extremes
          else None)
  return impls, missing


def _bind(fn, args):
  return lambda: fn(*args)


def finite(out: Any) -> bool:
  """True if every float in ``out`` (arrays of any library) is finite."""
  if isinstance(out, (tuple, list)):
    return all(finite(leaf) for leaf in out)
  for leaf in (out,):
    if hasattr(leaf, "detach"):
      leaf = leaf.detach().float().numpy()
    arr = np.asarray(leaf, dtype=np.float64)
    if not np.isfinite(arr).all():
      return False
  return True
