"""Reporting: the machine, the results table and the chart."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from typing import Any

import numpy as np

from bench import _plumbing
from bench.peers import PEERS

ORDER = ("jsoft", *[p for p in PEERS if p != "jsoft"], "floor",
         "floor, in place")
MIB = 2.0**20


def machine() -> dict[str, Any]:
  """What the figures were measured on."""
  import jax  # noqa: PLC0415

  def version(module: str) -> str | None:
    try:
      return __import__(module).__version__
    except ImportError:
      return None

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  device = jax.devices()[0]
  return {
      "cpu": cpu,
      "cores": os.cpu_count(),
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "python": platform.python_version(),
      "jax": version("jax"),
      "jaxlib": version("jaxlib"),
      "optax": version("optax"),
      "torch": version("torch"),
      "numpy": version("numpy"),
      "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
      # Runnable processes, averaged over 1, 5 and 15 minutes: above the
      # core count, other work shared the machine.
      "load_average": [round(x, 1) for x in os.getloadavg()],
  }


def header(info: dict[str, Any]) -> str:
  load = info.get("load_average")
  shared = ("" if not load else
            f"; load average {load[0]} at the start ({info['cores']} cores)")
  return (f"jsoft benchmark — {info['cpu']}, {info['cores']} cores, backend "
          f"{info['backend']} ({info['device']}); jax {info['jax']}, optax "
          f"{info['optax']}, torch {info['torch']}; {info['date']}{shared}")


# ------------------------------------------------------------------ table


def _num(value: float | None, spec: str) -> str | None:
  return None if value is None else format(value, spec)


def _mib(value: int | None) -> str | None:
  return None if value is None else f"{value / MIB:.2f}"


def _finite(value: bool | None) -> str | None:
  return None if value is None else ("yes" if value else "NO: NaN/inf")


def results_table(cases: list[dict[str, Any]], rounds: int) -> Any:
  """Every case's implementations, one section per case."""
  rows: list[list[Any] | None] = []
  for case in cases:
    rows.append(None)
    first = True
    for peer in ORDER:
      r = case["results"].get(peer)
      if r is None:
        continue
      spread = (f"{r['p25_ms']:.3g}–{r['p75_ms']:.3g}" if "p25_ms" in r
                else None)
      ratio = r.get("ratio_to_jsoft", 1.0 if peer == "jsoft" else None)
      rows.append([case["name"] if first else "", peer,
                   _num(r.get("median_ms"), ".4g"), spread,
                   _num(ratio, ".2f"), _num(r.get("ratio_to_floor"), ".2f"),
                   _mib(r.get("temp_bytes")), _num(r.get("compile_ms"), ".0f"),
                   _num(r.get("eager_ms"), ".4g"),
                   _finite(r.get("finite_on_extremes"))])
      first = False
  caption = (f"ms: median of {rounds} interleaved rounds (p25–p75). "
             "peer ÷ jsoft: the median per-round ratio of their times, > 1 "
             "where jsoft is faster. ÷ floor: time over a jitted read+write "
             "of the case's sizes (the floor rows). temp: XLA temp memory "
             "(compile-time). eager: one call outside jit. finite: output "
             "finite on logits ×1000.")
  return _plumbing.table(
      "jsoft and its peers",
      ["case", "peer", "ms", "p25–p75", "peer ÷ jsoft", "÷ floor",
       "temp MiB", "compile ms", "eager ms", "finite"],
      rows, left=2, caption=caption)


# ------------------------------------------------------------------ chart

# Marker and colour per peer; jsoft is black.
STYLE = {
    "jsoft": ("o", "black"),
    "jsoft-plain": ("P", "tab:gray"),
    "jax.nn": ("s", "tab:green"),
    "optax": ("D", "tab:red"),
    "naive-jnp": ("v", "tab:purple"),
    "naive-numpy": ("^", "tab:brown"),
    "torch": ("X", "tab:orange"),
}
LEGEND = {
    "jsoft-plain": "jsoft-plain (no options; lce, distill: unfused)",
    "naive-jnp": "naive formulas, jnp",
    "naive-numpy": "naive formulas, NumPy",
    "torch": "PyTorch",
}


def _label(case: dict[str, Any]) -> str:
  dims = "×".join(map(str, case["dims"]))
  dtype = {"float32": "f32", "bfloat16": "bf16"}.get(case["dtype"],
                                                     case["dtype"])
  return f"{case['fn']} {case['mode']}  {dims} {dtype}"


def write_plot(path: str, payload: dict[str, Any]) -> None:
  """Per case, two dot plots side by side: each peer's time over jsoft's
  (log scale, parity at 1, right of it jsoft is faster) and each
  implementation's XLA temp memory. A hollow marker: NaN or inf on logits
  ×1000. Raises :class:`bench._plumbing.Missing` without matplotlib."""
  plt = _plumbing.pyplot()
  cases = [c for c in payload["cases"] if "jsoft" in c["results"]]
  present = {p for c in cases for p in c["results"]}
  peers = [p for p in STYLE if p in present]
  n = len(cases)
  fig, (ax_t, ax_m) = plt.subplots(
      1, 2, sharey=True, figsize=(10, 1.9 + 0.3 * n), layout="constrained",
      gridspec_kw={"width_ratios": (1.4, 1)})
  ys = np.arange(n)[::-1]
  step = 0.7 / max(len(peers), 1)
  for j, peer in enumerate(peers):
    marker, color = STYLE[peer]
    offset = (len(peers) / 2 - j - 0.5) * step
    for ax, key in ((ax_t, "ratio_to_jsoft"), (ax_m, "temp_bytes")):
      pts = [(c["results"][peer].get(key), y + offset,
              c["results"][peer].get("finite_on_extremes", True))
             for c, y in zip(cases, ys, strict=True) if peer in c["results"]]
      if key == "temp_bytes":
        pts = [(x / MIB, y, f) for x, y, f in pts if x is not None]
      else:
        pts = [p for p in pts if p[0] is not None]
      if not pts:
        continue
      xs, yy, fin = zip(*pts, strict=True)
      ax.scatter(xs, yy, s=30, marker=marker, linewidths=1.2,
                 edgecolors=color,
                 facecolors=[color if f else "none" for f in fin],
                 label=LEGEND.get(peer, peer), zorder=3)
  for ax in (ax_t, ax_m):
    for y in ys[:-1]:
      ax.axhline(y - 0.5, color="0.85", linewidth=0.6)
    ax.grid(axis="x", which="major", color="0.9")
    ax.set_ylim(-0.5, n - 0.5)
  ax_t.set_yticks(ys, [_label(c) for c in cases], fontsize=10)
  ax_t.tick_params(axis="y", length=0)
  ax_t.set_xscale("log")
  lo, hi = ax_t.get_xlim()
  lo, hi = min(lo, 0.5), max(hi, 2.0)
  ax_t.set_xlim(lo, hi)
  ax_t.axvspan(1, hi, color="tab:green", alpha=0.07, zorder=0)
  ax_t.axvline(1, color="black", linewidth=1.2, zorder=2)
  ax_t.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}×"))
  ax_t.set_xlabel("peer time ÷ jsoft time  (right of 1: jsoft faster)")
  ax_t.set_title("speed-up of jsoft over each peer", fontsize=11)
  ax_m.set_xscale("symlog", linthresh=0.1)
  ax_m.set_xlim(0, max(1.0, 2 * ax_m.dataLim.x1))
  ax_m.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
  ax_m.set_xlabel("XLA temp memory, MiB (0–0.1 linear)")
  ax_m.set_title("XLA temp memory (left: leaner)", fontsize=11)
  legend = {}
  for ax in (ax_m, ax_t):
    for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
      legend.setdefault(label, h)
  fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=4,
             fontsize=9, frameon=False)
  info = payload["machine"]
  load = info.get("load_average")
  shared = f" (load {load[0]})" if load else ""
  fig.suptitle(f"jsoft vs its peers — {info['cpu']}, {info['cores']} cores"
               f"{shared}, {info['backend']}; hollow marker: NaN/inf on "
               "logits ×1000", fontsize=10)
  _plumbing.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m bench plot RESULTS.json OUT.png``: the chart again, from a
  saved run."""
  p = argparse.ArgumentParser(
      prog="python -m bench plot",
      description="Draw the chart of a run saved with python -m bench "
      "--json PATH.")
  p.add_argument("results", help="the JSON file of a run")
  p.add_argument("out", help="the PNG to write")
  args = p.parse_args(argv)
  with open(args.results) as f:
    payload = json.load(f)
  try:
    write_plot(args.out, payload)
  except _plumbing.Missing as e:
    raise SystemExit(f"chart not written: {e}") from e
  _plumbing.say(f"wrote {args.out}")
  return payload
