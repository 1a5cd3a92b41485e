"""XLA temp memory of an LM-head step, fused against unfused, over N and V:
``python -m bench memory``.

Compile only (``jax.jit(...).lower(...).compile().memory_analysis()`` on
shape-only arguments): nothing runs and no [N, V] array is ever allocated,
so the sweep reaches sizes the machine could not hold. Each point is the
``value_and_grad`` of the mean loss with respect to ``h`` and ``W``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import jsoft
from bench import _plumbing, report

D = 256
FIXED_V, FIXED_N = 32768, 8192
SWEEP_N = (1024, 2048, 4096, 8192, 16384, 32768)
SWEEP_V = (8192, 16384, 32768, 65536, 131072, 262144)


def _losses() -> dict[str, Any]:
  out = {
      "jsoft fused": lambda h, w, y: jsoft.linear_cross_entropy(
          h, w, y, reduction="mean"),
      "jsoft unfused": lambda h, w, y: jnp.mean(
          jsoft.softmax_cross_entropy_with_integer_labels(h @ w, y)),
  }
  try:
    optax = _plumbing.optional("optax")
  except _plumbing.Missing:
    return out
  out["optax"] = lambda h, w, y: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(h @ w, y))
  return out


def temp_bytes(loss, n: int, d: int, v: int) -> int:
  """XLA temp bytes of the compiled ``value_and_grad`` step."""
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return int(step.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def sweep(quick: bool = False) -> dict[str, Any]:
  """Temp bytes per implementation along N (V fixed) and V (N fixed)."""
  ns = SWEEP_N[:3] if quick else SWEEP_N
  vs = SWEEP_V[:3] if quick else SWEEP_V
  out: dict[str, Any] = {"d": D, "fixed_v": FIXED_V, "fixed_n": FIXED_N,
                         "n": list(ns), "v": list(vs), "over_n": {},
                         "over_v": {}}
  for name, loss in _losses().items():
    out["over_n"][name] = [temp_bytes(loss, n, D, FIXED_V) for n in ns]
    out["over_v"][name] = [temp_bytes(loss, FIXED_N, D, v) for v in vs]
  return out


def tables(result: dict[str, Any]) -> list[Any]:
  """The sweep as two tables (MiB), along N and along V."""
  out = []
  for axis, fixed in (("n", f"V={result['fixed_v']}"),
                      ("v", f"N={result['fixed_n']}")):
    rows = [[name, *(f"{b / report.MIB:.1f}" for b in values)]
            for name, values in result[f"over_{axis}"].items()]
    out.append(_plumbing.table(
        f"XLA temp memory (MiB) of value_and_grad w.r.t. h and W, over "
        f"{axis.upper()} ({fixed}, D={result['d']}, float32)",
        [f"{axis.upper()} =", *map(str, result[axis])], rows))
  return out


def write_plot(path: str, result: dict[str, Any]) -> None:
  """Two log-log panels (temp memory against N, against V). Raises
  :class:`bench._plumbing.Missing` without matplotlib."""
  plt = _plumbing.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
  for ax, axis, fixed in ((axes[0], "n", f"V={result['fixed_v']}"),
                          (axes[1], "v", f"N={result['fixed_n']}")):
    for name, values in result[f"over_{axis}"].items():
      ax.plot(result[axis], [max(b, 1) / report.MIB for b in values],
              marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N" if axis == "n" else "vocabulary V")
    ax.set_ylabel("XLA temp memory (MiB)")
    ax.set_title(f"{fixed}, D={result['d']}, float32", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("LM-head value_and_grad: temp memory, fused vs unfused",
               fontsize=11)
  _plumbing.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m bench memory``: the sweep, its tables, JSON and chart."""
  args = _plumbing.command(
      "memory", "XLA temp memory of the fused head's value_and_grad against "
      "the unfused loss's and optax's, over N and V (compile only).",
      quick="the three smallest N and V only", plot=True).parse_args(argv)
  result = sweep(quick=args.quick)
  _plumbing.show(*tables(result))
  _plumbing.write_outputs(
      args.json, {"machine": report.machine(), "memory_sweep": result},
      [(args.plot, lambda path: write_plot(path, result))])
  return result
