"""Measurement: compile time, steady-state time, pairwise ratios, memory.

Every implementation of a case is compiled and warmed up outside the timed
loop, and every timed call waits for its result (``block_until_ready``).
Steady-state times come from ``rounds`` rounds; each round runs every
implementation once, in an order that rotates from round to round, so drift
on a shared machine hits all of them alike. The ratio of a peer to jsoft is
the median over rounds of the per-round ratio (interleaved, pairwise), not a
ratio of medians. Calls much shorter than ``min_sample_s`` are repeated
within a sample and averaged, so dispatch-sized cases are not timer noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.cases import Impl, finite


def _time(fn: Callable[[], Any], repeat: int) -> float:
  start = time.perf_counter()
  for _ in range(repeat):
    fn()
  return (time.perf_counter() - start) / repeat


def _repeats(fn: Callable[[], Any], min_sample_s: float) -> int:
  """Calls per sample so that a sample lasts about ``min_sample_s``."""
  once = _time(fn, 1)
  return max(1, min(10_000, int(min_sample_s / max(once, 1e-7))))


def _stats(samples: list[float]) -> dict[str, float]:
  ms = np.asarray(samples) * 1e3
  return {
      "median_ms": float(np.median(ms)),
      "p25_ms": float(np.percentile(ms, 25)),
      "p75_ms": float(np.percentile(ms, 75)),
      "samples": len(ms),
  }


def compile_and_memory(impl: Impl) -> dict[str, Any]:
  """Compile time (trace + lower + compile) and XLA's memory analysis."""
  if impl.jitted is None:
    return {}
  start = time.perf_counter()
  compiled = impl.jitted.lower(*impl.args).compile()
  out: dict[str, Any] = {"compile_ms": (time.perf_counter() - start) * 1e3}
  mem = compiled.memory_analysis()
  if mem is not None:
    out["temp_bytes"] = int(mem.temp_size_in_bytes)
    out["output_bytes"] = int(mem.output_size_in_bytes)
  return out


def measure(impls: dict[str, Impl], rounds: int, min_sample_s: float,
            eager_samples: int) -> dict[str, dict[str, Any]]:
  """Times every implementation of one case (``floor`` included)."""
  results = {peer: compile_and_memory(impl) for peer, impl in impls.items()}
  repeats = {}
  for peer, impl in impls.items():
    impl.call()  # warm up (and compile for the call path)
    repeats[peer] = _repeats(impl.call, min_sample_s)
  order = list(impls)
  times: dict[str, list[float]] = {peer: [] for peer in order}
  for r in range(rounds):
    k = r % len(order)
    for peer in order[k:] + order[:k]:
      times[peer].append(_time(impls[peer].call, repeats[peer]))
  for peer in order:
    results[peer].update(_stats(times[peer]))
    results[peer]["calls_per_sample"] = repeats[peer]
    if "jsoft" in times and peer != "jsoft":
      ratios = np.asarray(times[peer]) / np.asarray(times["jsoft"])
      results[peer]["ratio_to_jsoft"] = float(np.median(ratios))
    if "floor" in times and peer != "floor":
      ratios = np.asarray(times[peer]) / np.asarray(times["floor"])
      results[peer]["ratio_to_floor"] = float(np.median(ratios))
  for peer, impl in impls.items():
    if impl.eager is not None and eager_samples:
      impl.eager()  # first eager call traces and compiles op by op
      reps = _repeats(impl.eager, min_sample_s)
      samples = [_time(impl.eager, reps) for _ in range(eager_samples)]
      results[peer]["eager_ms"] = float(np.median(samples) * 1e3)
    if impl.extreme is not None:
      try:
        results[peer]["finite_on_extremes"] = finite(impl.extreme())
      except (FloatingPointError, OverflowError, ValueError):
        results[peer]["finite_on_extremes"] = False
  return results
