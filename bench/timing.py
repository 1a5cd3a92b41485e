"""Measurement: compile time, steady-state time, pairwise ratios, memory.

Every implementation of a case is compiled and warmed up outside the timed
samples, and every timed call waits for its result (``block_until_ready``).
Steady-state times come from ``rounds`` rounds; each round runs every
implementation once, in an order that rotates from round to round, so drift
on a shared machine hits all of them alike. The ratio of an implementation
to the baseline (``measure(..., baseline=NAME)``, jsoft by default) is the
median over rounds of the per-round ratio (interleaved, pairwise), not a
ratio of medians; it is stored as ``ratio_to_NAME`` (``ratio_to_jsoft``,
``ratio_to_plain``, ...), and the ratio to the read+write floor, where a
case has one, as ``ratio_to_floor``. A sample repeats a call as often as
it takes to last at least ``min_sample_s`` (the count from
``timeit.Timer.autorange``), so dispatch-sized cases are not timer noise.
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
  ``0.2 / min_sample_s`` times fast, it stops at ``min_sample_s``. ``fn`` is
  called once first, untimed: a jitted call's first call compiles, and
  counted, that one call outlasted the minimum, so every sample of a
  sub-millisecond call was one call (its dispatch noise, not its time).
  """
  fn()
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


def median_ratio(num: list[float], den: list[float]) -> float:
  """The median over rounds of the per-round ratio ``num / den``."""
  return float(np.median(np.asarray(num) / np.asarray(den)))


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int,
                min_sample_s: float) -> tuple[dict[str, list[float]],
                                              dict[str, int]]:
  """Seconds per call of each of ``calls``, one sample per round, the
  order rotating from round to round; and the calls per sample of each.

  The calibration's calls (1, 2, 5, ... of them) also warm each call up:
  none of them is a sample.
  """
  timers = {name: calibrated(call, min_sample_s)
            for name, call in calls.items()}
  order = list(calls)
  times: dict[str, list[float]] = {name: [] for name in order}
  for r in range(rounds):
    k = r % len(order)
    for name in order[k:] + order[:k]:
      timer, number = timers[name]
      times[name].append(timer.timeit(number) / number)
  return times, {name: timers[name][1] for name in order}


def measure(impls: dict[str, Impl], rounds: int, min_sample_s: float,
            eager_samples: int, baseline: str = "jsoft"
            ) -> dict[str, dict[str, Any]]:
  """Times every implementation of one case (``floor`` included); each
  other one's ratio to ``baseline`` (when it is one of ``impls``) is its
  ``ratio_to_<baseline>``."""
  results = {peer: compile_and_memory(impl) for peer, impl in impls.items()}
  times, numbers = interleaved(
      {peer: impl.call for peer, impl in impls.items()}, rounds,
      min_sample_s)
  for peer in impls:
    results[peer].update(_stats(times[peer]))
    results[peer]["calls_per_sample"] = numbers[peer]
    for ref in dict.fromkeys((baseline, "floor")):
      if ref in times and peer != ref:
        results[peer][f"ratio_to_{ref}"] = median_ratio(times[peer],
                                                        times[ref])
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
