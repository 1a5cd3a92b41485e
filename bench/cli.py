"""``python -m bench``: jsoft against its peers, side by side, one process;
``python -m bench COMMAND`` for the other runs."""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np

from bench import _plumbing, report, timing
from bench import cases as cases_mod
from bench.peers import FNS

# The default run: a fixed set of cases (cases.default_cases); only its
# "detail" shapes (8x10) run every peer, the eager call and the overflow
# check. --quick and --full: the grid of functions × shapes × dtypes ×
# modes, and the heads, all in detail.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"rounds": 5, "min_sample_s": 0.02, "eager_samples": 5,
                "detail_shapes": ["small"],
                "skip": {p: "runs at 8x10 only (--full: at every size)"
                         for p in ("naive-jnp", "naive-numpy")}},
    "quick": {"shapes": ["small", "medium"], "lm_head": "quick",
              "lce": "quick", "rounds": 5, "min_sample_s": 0.002,
              "eager_samples": 3},
    "full": {"shapes": ["small", "medium", "large"], "lm_head": "full",
             "lce": "full", "rounds": 9, "min_sample_s": 0.02,
             "eager_samples": 5},
}
# python -m bench COMMAND ...: the module whose main(argv) runs it.
COMMANDS = {
    "options": ("bench.options", "what each training option and each fused-"
                "head feature costs, and what ignored tokens save"),
    "tiles": ("bench.tiles", "the fused head's time against its memory, "
              "per tile_by and chunk_size"),
    "memory": ("bench.memory", "the fused head's XLA temp memory over N and "
               "V (compile only)"),
    "sharding": ("bench.sharding", "the vocabulary-parallel head on 8 host "
                 "CPU devices: memory and collectives (compile only)"),
    "experiments": ("bench.experiments", "jsoft inside real models "
                    "(digits, a language model): loss curves, accuracy, "
                    "curvature, distillation"),
    "lm": ("bench.lm", "the character language model alone (Flax NNX): "
           "the fused head against optax's loss"),
    "sizes": ("bench.sizes", "every kernel against its peer over a grid "
              "of shapes from 8x10 to a language model's: a heat map"),
    "post": ("bench.post", "the policy-gradient and preference losses' step "
             "against the fused CE head's and the materialised logits'"),
    "plot": ("bench.report", "draw the chart of a saved --json result"),
}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m bench",
      usage="python -m bench [flags]\n       python -m bench COMMAND [flags]",
      description="Time jsoft against jax.nn, optax, the naive formulas and "
      "PyTorch: steady-state time and its ratio to each peer, the "
      "read+write floor, XLA memory, compile and eager-call time. Without "
      "a size flag: a representative set of cases (a few minutes on 2 CPU "
      "cores).")
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true",
                    help="every case on small and medium shapes, a smaller "
                    "LM head, fewer rounds (a smoke test, ~2 minutes)")
  size.add_argument("--full", action="store_true",
                    help="every function, shape, dtype and mode, and both "
                    "heads at full size (about an hour on 2 CPU cores)")
  p.add_argument("--json", metavar="PATH", help="write results as JSON")
  p.add_argument("--plot", metavar="PATH", help="write a PNG chart")
  p.add_argument("--only", metavar="NAME", action="append", default=[],
                 help="run only cases whose name contains NAME (repeatable, "
                 "or comma-separated), e.g. ce_int or 4096x32000_float32_vg")
  grid = p.add_argument_group(
      "the grid", "pick from the full suite (as with --full, or --quick's "
      "sizes with --quick)")
  grid.add_argument("--dtype", default=None,
                    help="comma-separated dtypes (default: float32,bfloat16)")
  grid.add_argument("--shapes", default=None,
                    help="comma-separated of " + ",".join(cases_mod.SHAPES))
  grid.add_argument("--lm-head", default=None,
                    choices=[*cases_mod.LM_HEAD, "none"], help="LM-head size")
  grid.add_argument("--lce", default=None,
                    choices=[*cases_mod.LCE, "none"],
                    help="fused linear cross-entropy size")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per case")
  p.add_argument("--no-eager", action="store_true",
                 help="skip the eager-call timings")
  sub = p.add_subparsers(title="commands (python -m bench COMMAND --help)",
                         metavar="COMMAND", dest="command")
  for name, (_, text) in COMMANDS.items():
    sub.add_parser(name, help=text, add_help=False)
  return p


def peers_available() -> dict[str, str | None]:
  """None for a usable peer, else why it is not (reported, not an error)."""
  out: dict[str, str | None] = {
      p: None for p in ("jsoft", "jsoft-plain", "jax.nn", "naive-jnp",
                        "naive-numpy")}
  out["optax"] = _plumbing.why_missing("optax")
  out["torch"] = _plumbing.why_missing("torch")
  if out["torch"] is None:
    import torch  # noqa: PLC0415
    torch.set_num_threads(os.cpu_count() or 1)
  return out


def _split(values: str | None, known, what: str) -> list[str] | None:
  if values is None:
    return None
  out = values.split(",")
  for v in out:
    if v not in known:
      raise SystemExit(f"unknown {what} {v!r}; choose from {', '.join(known)}")
  return out


def select(args: argparse.Namespace) -> tuple[list[cases_mod.Case],
                                              dict[str, Any]]:
  """The cases to run and the run's settings."""
  shapes = _split(args.shapes, cases_mod.SHAPES, "shape")
  dtypes = _split(args.dtype, cases_mod.DTYPES, "dtype")
  grid = (args.full or args.quick or shapes or dtypes or args.lm_head
          or args.lce)
  preset = "quick" if args.quick else "full" if grid else "default"
  base = PRESETS[preset]
  config: dict[str, Any] = {"preset": preset}
  if grid:
    config.update(shapes=shapes or base["shapes"],
                  dtypes=dtypes or list(cases_mod.DTYPES),
                  lm_head=args.lm_head or base["lm_head"],
                  lce=args.lce or base["lce"])
    cases = cases_mod.make_cases(
        FNS, config["shapes"], config["dtypes"],
        None if config["lm_head"] == "none" else config["lm_head"],
        None if config["lce"] == "none" else config["lce"])
  else:
    cases = cases_mod.default_cases()
  only = [o for arg in args.only for o in arg.split(",") if o]
  if only:
    cases = [c for c in cases if any(o in c.name for o in only)]
  config.update(
      rounds=args.rounds or base["rounds"],
      min_sample_s=base["min_sample_s"],
      eager_samples=0 if args.no_eager else base["eager_samples"],
      detail_shapes=base.get("detail_shapes"), skip=base.get("skip", {}),
      only=only)
  return cases, config


def run_case(case: cases_mod.Case, available: dict[str, str | None],
             config: dict[str, Any]) -> dict[str, Any]:
  start = time.perf_counter()
  detail = (config["detail_shapes"] is None
            or case.shape_label in config["detail_shapes"])
  if not detail:
    available = {**available, **config["skip"]}
  impls, missing = cases_mod.build(case, available, extremes=detail)
  jsoft_impl = impls["jsoft"]
  out_avals = jax.eval_shape(jsoft_impl.jitted, *jsoft_impl.args)
  impls["floor"] = cases_mod.floor_impl(case, jsoft_impl.args, out_avals)
  inplace = cases_mod.inplace_floor_impl(case, jsoft_impl.args, out_avals)
  if inplace is not None:
    impls[inplace.peer] = inplace
  eager = config["eager_samples"] if detail else 0
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore")
    results = timing.measure(impls, config["rounds"], config["min_sample_s"],
                             eager)
  out = {"name": case.name, "fn": case.fn, "dims": list(case.dims),
         "dtype": case.dtype, "mode": case.mode,
         "shape_label": case.shape_label, "results": results,
         "missing": missing}
  if case.spec.fused and "jsoft-plain" in impls:
    fused, unfused = impls["jsoft"], impls["jsoft-plain"]
    # The fused loss and gradients against the unfused ones.
    out["max_rel_diff"] = _plumbing.rel_difference(
        fused.jitted(*fused.args), unfused.jitted(*unfused.args))
  out["seconds"] = round(time.perf_counter() - start, 1)
  return out


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
  """The run: every selected case, a progress bar, one table at the end."""
  cases, config = select(args)
  if not cases:
    raise SystemExit("no case matches --only " + ",".join(config["only"]))
  available = peers_available()
  info = report.machine()
  lines = [report.header(info),
           f"{len(cases)} cases ({config['preset']} run), "
           f"{config['rounds']} rounds each"]
  lines += [f"note: {peer} not run: {why}"
            for peer, why in available.items() if why]
  lines += [f"note: {peer} {why}" for peer, why in config["skip"].items()]
  _plumbing.say(*lines)
  start = time.perf_counter()
  done = []
  for case in _plumbing.tracked(cases, lambda c: c.name):
    done.append(run_case(case, available, config))
    gc.collect()
  seconds = round(time.perf_counter() - start, 1)
  _plumbing.show(report.results_table(done, config["rounds"]))
  load = [round(x, 1) for x in os.getloadavg()]
  payload = {"machine": info, "config": config, "cases": done,
             "seconds": seconds, "load_average_at_end": load}
  _plumbing.say("", f"{len(done)} cases in {seconds:.0f} s (load average "
                f"{load[0]} at the end)")
  _plumbing.write_outputs(args.json, payload, [
      (args.plot, lambda path: report.write_plot(path, payload))])
  return payload


def main(argv: list[str] | None = None) -> Any:
  """``python -m bench [flags]`` or ``python -m bench COMMAND [flags]``."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in COMMANDS:
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])
  p = parser()
  args = p.parse_args(argv)
  if args.command:
    p.error(f"flags go after the command: python -m bench {args.command} ...")
  return benchmark(args)
