"""``python -m bench``: jsoft against its peers, side by side, one process."""

from __future__ import annotations

import argparse
import gc
import os
import time
import warnings
from typing import Any

import jax
import numpy as np

from bench import cases as cases_mod
from bench import report, timing
from bench.peers import FNS

QUICK = {"shapes": ["small", "medium"], "lm_head": "quick", "lce": "quick",
         "rounds": 5,
         "min_sample_s": 0.002, "eager_samples": 3}
FULL = {"shapes": ["small", "medium", "large"], "lm_head": "full",
        "lce": "full",
        "rounds": 9, "min_sample_s": 0.02, "eager_samples": 5}


def parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m bench",
      description="Time jsoft against jax.nn, optax, the naive formulas and "
      "PyTorch: compile time, steady-state time, pairwise ratios, the "
      "read+write floor, XLA memory and eager-call time.")
  p.add_argument("--quick", action="store_true",
                 help="small and medium shapes, a smaller LM head, fewer "
                 "rounds: the whole suite in under two minutes")
  p.add_argument("--json", metavar="PATH", help="write results as JSON")
  p.add_argument("--plot", metavar="PATH", help="write a PNG chart")
  p.add_argument("--only", metavar="NAME", action="append", default=[],
                 help="run only cases whose name contains NAME (repeatable, "
                 "or comma-separated), e.g. ce_int or 4096x32000_float32_vg")
  p.add_argument("--dtype", default="float32,bfloat16",
                 help="comma-separated dtypes (default: float32,bfloat16)")
  p.add_argument("--shapes", default=None,
                 help="comma-separated of " + ",".join(cases_mod.SHAPES))
  p.add_argument("--lm-head", default=None,
                 choices=[*cases_mod.LM_HEAD, "none"],
                 help="LM-head size (default: full, or quick with --quick)")
  p.add_argument("--lce", default=None, choices=[*cases_mod.LCE, "none"],
                 help="fused linear cross-entropy size (default: full, or "
                 "quick with --quick)")
  p.add_argument("--memory-plot", metavar="PATH",
                 help="also sweep N and V (compile only, no timing) and "
                 "chart the XLA temp memory of the fused and unfused heads")
  p.add_argument("--options", action="store_true",
                 help="instead of the cases, time the integer-label CE's "
                 "value_and_grad with each training option against the "
                 "plain call (and its XLA temp memory)")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per case")
  p.add_argument("--no-eager", action="store_true",
                 help="skip the eager-call timings")
  return p.parse_args(argv)


def peers_available() -> dict[str, str | None]:
  """None for a usable peer, else why it is not (reported, not an error)."""
  out: dict[str, str | None] = {p: None for p in
                                ("jsoft", "jsoft-plain", "jax.nn", "naive-jnp",
                                 "naive-numpy")}
  try:
    import optax  # noqa: F401, PLC0415
    out["optax"] = None
  except ImportError:
    out["optax"] = "optax is not installed (pip install -e '.[bench]')"
  try:
    import torch  # noqa: PLC0415
    torch.set_num_threads(os.cpu_count() or 1)
    out["torch"] = None
  except ImportError:
    out["torch"] = ("PyTorch is not installed (pip install -e "
                    "'.[bench,torch]')")
  return out


def select(argv: argparse.Namespace) -> tuple[list[cases_mod.Case],
                                              dict[str, Any]]:
  base = dict(QUICK if argv.quick else FULL)
  shapes = argv.shapes.split(",") if argv.shapes else base["shapes"]
  for s in shapes:
    if s not in cases_mod.SHAPES:
      raise SystemExit(f"unknown shape {s!r}; choose from "
                       f"{', '.join(cases_mod.SHAPES)}")
  dtypes = argv.dtype.split(",")
  for d in dtypes:
    if d not in cases_mod.DTYPES:
      raise SystemExit(f"unknown dtype {d!r}; choose from "
                       f"{', '.join(cases_mod.DTYPES)}")
  lm = argv.lm_head or base["lm_head"]
  lce = argv.lce or base["lce"]
  cases = cases_mod.make_cases(FNS, shapes, dtypes,
                               None if lm == "none" else lm,
                               None if lce == "none" else lce)
  only = [o for arg in argv.only for o in arg.split(",") if o]
  if only:
    cases = [c for c in cases if any(o in c.name for o in only)]
  config = {
      "quick": argv.quick, "shapes": shapes, "dtypes": dtypes, "lm_head": lm,
      "lce": lce,
      "rounds": argv.rounds or base["rounds"],
      "min_sample_s": base["min_sample_s"],
      "eager_samples": 0 if argv.no_eager else base["eager_samples"],
      "only": only,
  }
  return cases, config


def run_case(case: cases_mod.Case, available: dict[str, str | None],
             config: dict[str, Any]) -> dict[str, Any]:
  impls, missing = cases_mod.build(case, available)
  jsoft_impl = impls["jsoft"]
  out_avals = jax.eval_shape(jsoft_impl.jitted, *jsoft_impl.args)
  impls["floor"] = cases_mod.floor_impl(case, jsoft_impl.args, out_avals)
  inplace = cases_mod.inplace_floor_impl(case, jsoft_impl.args, out_avals)
  if inplace is not None:
    impls[inplace.peer] = inplace
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore")
    results = timing.measure(impls, config["rounds"], config["min_sample_s"],
                             config["eager_samples"])
  out = {"name": case.name, "fn": case.fn, "dims": list(case.dims),
         "dtype": case.dtype, "mode": case.mode,
         "shape_label": case.shape_label, "results": results,
         "missing": missing}
  if case.fn == "lce" and "jsoft-plain" in impls:
    out["max_rel_diff"] = _agreement(impls["jsoft"], impls["jsoft-plain"])
  return out


def _agreement(fused: cases_mod.Impl, unfused: cases_mod.Impl) -> float:
  """Largest difference between the fused and unfused loss and gradients,
  relative to each output's largest magnitude."""
  a = jax.tree.leaves(fused.jitted(*fused.args))
  b = jax.tree.leaves(unfused.jitted(*unfused.args))
  worst = 0.0
  for x, y in zip(a, b, strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(float(np.max(np.abs(y))), np.finfo(np.float64).tiny)
    worst = max(worst, float(np.max(np.abs(x - y))) / scale)
  return worst


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse(argv)
  if args.options:
    from bench import options  # noqa: PLC0415
    result = options.measure(quick=args.quick, rounds=args.rounds or 7)
    result["head"] = options.measure_head(quick=args.quick,
                                          rounds=args.rounds or 7)
    print(options.table(result))
    if args.json:
      report.write_json(args.json, {"machine": report.machine(),
                                    "options": result})
    return result
  cases, config = select(args)
  if not cases:
    raise SystemExit("no case matches --only " + ",".join(config["only"]))
  available = peers_available()
  info = report.machine()
  print(report.header(info, config), flush=True)
  for peer, why in available.items():
    if why:
      print(f"note: {peer} not run: {why}", flush=True)
  done: list[dict[str, Any]] = []
  start = time.perf_counter()
  for i, case in enumerate(cases):
    report.progress(i, len(cases), case.name, start, time.perf_counter())
    done.append(run_case(case, available, config))
    gc.collect()
  report.progress(len(cases), len(cases), "done", start, time.perf_counter())
  for c in done:
    print("\n" + report.case_table(c))
  goals = report.targets(done)
  if goals:
    print("\n" + report.targets_table(goals))
  payload = {"machine": info, "config": config, "cases": done,
             "targets": goals,
             "seconds": round(time.perf_counter() - start, 1)}
  if args.json:
    report.write_json(args.json, payload)
    print(f"\nwrote {args.json}")
  if args.plot:
    why = report.write_plot(args.plot, payload)
    print(f"plot not written: {why}" if why else f"wrote {args.plot}")
  if args.memory_plot:
    from bench import memory  # noqa: PLC0415
    sweep = memory.sweep(quick=args.quick)
    print("\n" + memory.table(sweep))
    payload["memory_sweep"] = sweep
    if args.json:
      report.write_json(args.json, payload)
    why = memory.write_plot(args.memory_plot, sweep)
    print(f"plot not written: {why}" if why else f"wrote {args.memory_plot}")
  return payload
