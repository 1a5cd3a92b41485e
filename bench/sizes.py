"""jsoft's speed against its peer at every size: ``python -m bench sizes``.

Every kernel — the integer- and probability-label cross-entropies and the
sigmoid BCE (forward, and ``value_and_grad`` of the mean), softmax,
log_softmax and logsumexp (forward, and ``value_and_grad`` of ``Σ out·ct``),
in float32 and bfloat16 — against its peer (optax for the losses,
``jax.nn`` for the activations) over a grid of shapes from 8×10 to a
language model's; and the fused head (:func:`jsoft.linear_cross_entropy`,
``value_and_grad`` for ``h`` and ``W``, float32) against optax's unfused
``CE(h @ W)`` and, where it is installed, tokamax's
``linear_softmax_cross_entropy_loss`` (its XLA implementation).

Each cell is the median over interleaved rounds of the per-round ratio
``peer time ÷ jsoft time`` (above 1: jsoft is faster), both jitted, their
inputs on the device. A cell that reads outside ``[0.95, 1/0.95]`` (either
side, so the second look cannot only lift cells) is measured again in as
many rounds once the grid is done, and its ratio is the median of both
runs' rounds together; the first run's ratio stays in the JSON
(``first_ratio``). On a shared machine a slower stretch of a few seconds
moves the few cells measured in it; a second look, minutes later, tells
such a cell from a real difference. Results: a table per dtype (and the
geometric mean per kernel; a cell looked at twice is marked ``*``), JSON,
and a heat map with a diverging colour scale centred at 1.
"""

from __future__ import annotations

import gc
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import _plumbing, cases, peers, report, timing

# kernel -> (fn in bench.peers, mode, peer)
KERNELS = {
    "int fwd": ("ce_int", "fwd", "optax"),
    "int vg": ("ce_int", "vg", "optax"),
    "prob fwd": ("ce_prob", "fwd", "optax"),
    "prob vg": ("ce_prob", "vg", "optax"),
    "bce fwd": ("bce", "fwd", "optax"),
    "bce vg": ("bce", "vg", "optax"),
    "softmax fwd": ("softmax", "fwd", "jax.nn"),
    "softmax vg": ("softmax", "vg", "jax.nn"),
    "log_softmax fwd": ("log_softmax", "fwd", "jax.nn"),
    "log_softmax vg": ("log_softmax", "vg", "jax.nn"),
    "logsumexp fwd": ("logsumexp", "fwd", "jax.nn"),
    "logsumexp vg": ("logsumexp", "vg", "jax.nn"),
}
# [N, C] logits; the fused head's (N, D, V).
GRIDS = {
    "full": [(8, 10), (256, 100), (1024, 1000), (4096, 4096), (2048, 32000)],
    "tiny": [(4, 5), (8, 10)],
}
HEAD_GRIDS = {
    "full": [(256, 64, 1000), (1024, 128, 8192), (2048, 256, 32000)],
    "tiny": [(6, 3, 5)],
}
HEAD_PEERS = ("optax", "tokamax")
# Cells whose ratio reads outside [SECOND_LOOK, 1 / SECOND_LOOK] are
# measured again (see the module's docstring).
SECOND_LOOK = 0.95


def _tokamax_loss():
  """tokamax's fused-head loss (XLA implementation), mean over tokens."""
  tokamax = _plumbing.optional("tokamax")
  from absl import flags  # noqa: PLC0415 - tokamax's dependency

  if not flags.FLAGS.is_parsed():
    # tokamax reads its settings from absl flags, parsed from sys.argv on
    # first use: which holds this command's flags, not absl's.
    flags.FLAGS(sys.argv[:1])

  def loss(h, w, y):
    return tokamax.linear_softmax_cross_entropy_loss(
        h, y, w, reduction="mean", implementation="xla")

  return loss


def _head_impls(dims: tuple[int, int, int], missing: dict[str, str]):
  """The fused head's ``value_and_grad`` for ``h`` and ``W`` per peer, and
  its inputs (float32)."""
  n, d, v = dims
  h, w, y = cases.head_inputs(np.random.default_rng(0), n, d, v)
  args = (jnp.asarray(h), jnp.asarray(w), jnp.asarray(y))
  losses = {"jsoft": peers.SPECS["lce"].loss("jsoft"),
            "optax": peers.SPECS["lce"].loss("optax")}
  if "tokamax" not in missing:
    losses["tokamax"] = _tokamax_loss()
  return {name: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
          for name, f in losses.items()}, args


def _cell_impls(kernel: str, dims: tuple[int, int], dtype: str):
  fn, mode, peer = KERNELS[kernel]
  case = cases.Case(fn, dims, dtype, mode)
  args = cases.to_jax(case, cases.make_inputs(case))
  return {"jsoft": peers.jax_impl("jsoft", fn, mode),
          peer: peers.jax_impl(peer, fn, mode)}, args


def measure_cell(impls: dict[str, Any], args: tuple[Any, ...], rounds: int,
                 min_sample_s: float) -> dict[str, Any]:
  """Each implementation's median time and each peer's ratio to jsoft."""
  calls = {name: (lambda f=f: jax.block_until_ready(f(*args)))
           for name, f in impls.items()}
  # One more round than asked, the first dropped: right after the
  # calibration it runs well off the steady state (measured: up to 2.5x
  # on whichever implementation goes first).
  times, _ = timing.interleaved(calls, rounds + 1, min_sample_s)
  times = {k: t[1:] for k, t in times.items()}
  return summary({k: [float(x) for x in t] for k, t in times.items()})


def summary(times: dict[str, list[float]]) -> dict[str, Any]:
  """A cell's figures from each implementation's per-round seconds: the
  median ms, each peer's median per-round ratio, and the seconds."""
  return {"ms": {k: float(np.median(t)) * 1e3 for k, t in times.items()},
          "ratio": {k: timing.median_ratio(t, times["jsoft"])
                    for k, t in times.items() if k != "jsoft"},
          "seconds": times}


def looks_off(cell: dict[str, Any]) -> bool:
  """Whether a cell's ratio (any peer) reads outside the band that a
  second look settles."""
  return any(not SECOND_LOOK <= r <= 1 / SECOND_LOOK
             for r in cell["ratio"].values())


def second_look(cell: dict[str, Any], again: dict[str, Any]) -> dict[str, Any]:
  """``cell`` with the rounds of ``again`` (the same cell measured later)
  pooled into its figures; its first ratio kept as ``first_ratio``."""
  pooled = {k: t + again["seconds"][k] for k, t in cell["seconds"].items()}
  return {**cell, **summary(pooled), "first_ratio": cell["ratio"]}


def plan(grid: str, dtypes: list[str], only: list[str]) -> list[dict]:
  """The cells to measure, in order: kernels × shapes × dtypes, then the
  fused head per shape."""
  out = []
  for dtype in dtypes:
    for dims in GRIDS[grid]:
      for kernel in KERNELS:
        out.append({"kernel": kernel, "dims": dims, "dtype": dtype})
  for dims in HEAD_GRIDS[grid]:
    out.append({"kernel": "fused head vg", "dims": dims, "dtype": "float32"})
  if only:
    out = [c for c in out if any(o in c["kernel"] for o in only)]
  return out


def run(grid: str = "full", dtypes: list[str] | None = None,
        rounds: int = 5, min_sample_s: float = 0.02,
        only: list[str] | None = None,
        look_again: bool = True) -> dict[str, Any]:
  """Every cell of the grid, and a second look at each cell that reads
  outside the band (``look_again``); the payload written as JSON."""
  missing = {}
  why = _plumbing.why_missing("tokamax")
  if why:
    missing["tokamax"] = why
  cells = plan(grid, dtypes or list(cases.DTYPES), only or [])
  machine = report.machine()  # before measuring: its load is the start's

  def measure(cell):
    if cell["kernel"] == "fused head vg":
      impls, args = _head_impls(tuple(cell["dims"]), missing)
    else:
      impls, args = _cell_impls(cell["kernel"], tuple(cell["dims"]),
                                cell["dtype"])
    out = measure_cell(impls, args, rounds, min_sample_s)
    del impls, args
    gc.collect()
    return out

  done = [{**cell, "dims": list(cell["dims"]), **measure(cell)}
          for cell in _plumbing.tracked(cells, _name)]
  if look_again:
    again = [i for i, cell in enumerate(done) if looks_off(cell)]
    for i in _plumbing.tracked(again, lambda i: f"again: {_name(done[i])}"):
      done[i] = second_look(done[i], measure(done[i]))
  return {"machine": machine,
          "config": {"grid": grid, "rounds": rounds,
                     "min_sample_s": min_sample_s,
                     "dtypes": dtypes or list(cases.DTYPES),
                     "second_look": SECOND_LOOK if look_again else None},
          "missing": missing, "cells": done}


def _name(cell: dict[str, Any]) -> str:
  return (f"{cell['kernel']} {'x'.join(map(str, cell['dims']))} "
          f"{cell['dtype']}")


def _shape(dims) -> str:
  return "×".join(map(str, dims))


def geomean(values: list[float]) -> float:
  return float(math.exp(np.mean(np.log(values)))) if values else math.nan


def grid_of(payload: dict[str, Any], dtype: str) -> tuple[
    list[str], list[str], np.ndarray]:
  """The (shapes, kernels, ratios) matrix of one dtype (NaN: not run)."""
  cells = [c for c in payload["cells"]
           if c["dtype"] == dtype and c["kernel"] in KERNELS]
  shapes = list(dict.fromkeys(_shape(c["dims"]) for c in cells))
  kernels = [k for k in KERNELS if any(c["kernel"] == k for c in cells)]
  ratios = np.full((len(shapes), len(kernels)), np.nan)
  for c in cells:
    (ratio,) = c["ratio"].values()
    ratios[shapes.index(_shape(c["dims"])),
           kernels.index(c["kernel"])] = ratio
  return shapes, kernels, ratios


def tables(payload: dict[str, Any]) -> list[Any]:
  """One table per dtype, a kernel a row, a shape a column, and the
  geometric mean per kernel; and the fused head's."""
  out = []
  band = payload["config"].get("second_look")
  note = (f"; *: read outside [{band:g}, 1/{band:g}] in the grid, measured "
          "again, both runs' rounds pooled") if band else ""
  for dtype in payload["config"]["dtypes"]:
    shapes, kernels, ratios = grid_of(payload, dtype)
    if not shapes:
      continue
    twice = {(_shape(c["dims"]), c["kernel"]) for c in payload["cells"]
             if c["dtype"] == dtype and "first_ratio" in c}

    def text(r, shape, kernel, twice=twice):
      if np.isnan(r):
        return None
      return f"{r:.2f}" + ("*" if (shape, kernel) in twice else "")

    rows = [[k, *(text(r, s, k) for r, s in zip(col, shapes, strict=True)),
             f"{geomean([r for r in col if not np.isnan(r)]):.2f}"]
            for k, col in zip(kernels, ratios.T, strict=True)]
    out.append(_plumbing.table(
        f"peer time ÷ jsoft time, {dtype} (above 1: jsoft is faster)",
        ["kernel", *shapes, "geomean"], rows,
        caption="peers: optax for the losses, jax.nn for the activations; "
        "median of the per-round ratios" + note))
  heads = [c for c in payload["cells"] if c["kernel"] == "fused head vg"]
  if heads:
    mark = lambda c: "*" if "first_ratio" in c else ""  # noqa: E731
    rows = [[_shape(c["dims"]), f"{c['ms']['jsoft']:.2f}",
             *(f"{c['ratio'][p]:.2f}{mark(c)}" if p in c["ratio"] else None
               for p in HEAD_PEERS)] for c in heads]
    out.append(_plumbing.table(
        "the fused head, value_and_grad for h and W, float32",
        ["N×D×V", "jsoft ms", *(f"{p} ÷ jsoft" for p in HEAD_PEERS)], rows,
        caption="optax: the unfused CE(h @ W); tokamax: "
        "linear_softmax_cross_entropy_loss, implementation='xla'" + note))
  return out


def write_plot(path: str, payload: dict[str, Any]) -> None:
  """One heat map per dtype: shapes × kernels, coloured by the ratio on a
  log scale centred at 1 (blue: jsoft faster, red: slower)."""
  plt = _plumbing.pyplot()
  from matplotlib.colors import LogNorm  # noqa: PLC0415

  dtypes = [d for d in payload["config"]["dtypes"]
            if grid_of(payload, d)[0]]
  fig, axes = plt.subplots(len(dtypes), 1, squeeze=False,
                           figsize=(12, 1.2 + 0.55 * len(dtypes) * 6),
                           layout="constrained")
  norm = LogNorm(vmin=0.5, vmax=2.0)  # symmetric in log: 1 in the middle
  image = None
  for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
    shapes, kernels, ratios = grid_of(payload, dtype)
    image = ax.imshow(np.clip(ratios, 0.5, 2.0), cmap="RdBu", norm=norm,
                      aspect="auto")
    ax.set_xticks(range(len(kernels)), kernels, rotation=30, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(shapes)), shapes, fontsize=8)
    for (i, j), r in np.ndenumerate(ratios):
      if not np.isnan(r):
        dark = not 0.7 < r < 1.4  # white on the deep colours
        ax.text(j, i, f"{r:.2f}", ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
    ax.set_title(dtype, fontsize=10)
  if image is not None:
    bar = fig.colorbar(image, ax=axes[:, 0], label="peer time ÷ jsoft time")
    ticks = [0.5, 0.71, 0.95, 1.0, 1.05, 1.41, 2.0]
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.minorticks_off()
  info = payload["machine"]
  fig.suptitle(f"jsoft against its peer at every size ({info['cpu']}, "
               f"{info['cores']} cores, jax {info['jax']}, {info['date']})",
               fontsize=10)
  _plumbing.save_figure(fig, path)


def show(payload: dict[str, Any]) -> None:
  """The machine, the peers not run, and the tables, on stdout."""
  _plumbing.say(report.header(payload["machine"]),
                *(f"note: {peer} not run: {why}"
                  for peer, why in payload["missing"].items()))
  _plumbing.show(*tables(payload))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m bench sizes``: the grid, its tables, JSON and chart (the
text results are its standard output)."""
  p = _plumbing.command("sizes", __doc__, rounds=5, plot=True,
                        quick="the tiny grid (a smoke test, seconds)")
  p.add_argument("--dtype", default=None,
                 help="comma-separated dtypes (default: float32,bfloat16)")
  p.add_argument("--only", action="append", default=[],
                 help="kernels whose name contains this (repeatable)")
  p.add_argument("--one-look", action="store_true",
                 help="no second look at the cells outside the band")
  args = p.parse_args(argv)
  dtypes = args.dtype.split(",") if args.dtype else None
  payload = run("tiny" if args.quick else "full", dtypes, args.rounds,
                0.002 if args.quick else 0.02, args.only,
                look_again=not args.one_look)
  show(payload)
  _plumbing.write_outputs(args.json, payload,
                          [(args.plot, lambda path: write_plot(path, payload))])
  return payload
