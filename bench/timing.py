"""Measurement: compile time, steady-state time, pairwise ratios, memory.

Every implementation of a case is compiled and warmed up outside the timed
samples, and every timed call waits for its result (``block_until_ready``).
Steady-state times come from ``rounds`` rounds; each round runs every
implementation once, in an order that rotates from round to round, so drift
on a shared machine hits all of them alike. The ratio of a peer to jsoft is
the median over rounds of the per-round ratio (interleaved, pairwise), not a
ratio of medians. A sample repeats a call as often as it takes to last at
least ``min_sample_s`` (the count from ``timeit.Timer.autorange``), so
dispatch-sized cases are not timer noise.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.cases import Impl, finite


def calibrated(fn: Callable[[], Any], min_sample_s: float) -> tuple[
    timeit.Timer, int]:
  """A timer for ``fn`` and the calls per sample that make a sample last at
  least ``min_sample_s``.

  ``Timer.autorange`` grows the count (1, 2, 5, 10, 20, ...) until the calls
  take 0.2 s by the timer's clock; timed on a clock that runs
  ``0.2 / min_sample_s`` times fast, it stops at ``min_sample_s``.
  """
  fast = 0.2 / min_sample_s
  number, _ = timeit.Timer(
      fn, timer=lambda: time.perf_counter() * fast).autorange()
  return timeit.Timer(fn), number


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


def _median_ratio(num: list[float], den: list[float]) -> float:
  return float(np.median(np.asarray(num) / np.asarray(den)))


def measure(impls: dict[str, Impl], rounds: int, min_sample_s: float,
            eager_samples: int) -> dict[str, dict[str, Any]]:
  """Times every implementation of one case (``floor`` included)."""
  results = {peer: compile_and_memory(impl) for peer, impl in impls.items()}
  # The calibration's calls (1, 2, 5, ... of them) also warm each
  # implementation up: none of them is a sample.
  timers = {peer: calibrated(impl.call, min_sample_s)
            for peer, impl in impls.items()}
  order = list(impls)
  times: dict[str, list[float]] = {peer: [] for peer in order}
  for r in range(rounds):
    k = r % len(order)
    for peer in order[k:] + order[:k]:
      timer, number = timers[peer]
      times[peer].append(timer.timeit(number) / number)
  for peer in order:
    results[peer].update(_stats(times[peer]))
    results[peer]["calls_per_sample"] = timers[peer][1]
    if "jsoft" in times and peer != "jsoft":
      results[peer]["ratio_to_jsoft"] = _median_ratio(times[peer],
                                                      times["jsoft"])
    if "floor" in times and peer != "floor":
      results[peer]["ratio_to_floor"] = _median_ratio(times[peer],
                                                      times["floor"])
  for peer, impl in impls.items():
    if impl.eager is not None and eager_samples:
      impl.eager()  # first eager call traces and compiles op by op
      timer, number = calibrated(impl.eager, min_sample_s)
      samples = timer.repeat(eager_samples, number)
      results[peer]["eager_ms"] = float(np.median(samples) / number * 1e3)
    if impl.extreme is not None:
      try:
        results[peer]["finite_on_extremes"] = finite(impl.extreme())
      except (FloatingPointError, OverflowError, ValueError):
        results[peer]["finite_on_extremes"] = False
  return results
