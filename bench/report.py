"""Reporting: the machine, the table, the targets, the JSON and the chart."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any

from bench.peers import PEERS

ORDER = ("jsoft", *[p for p in PEERS if p != "jsoft"], "floor",
         "floor, in place")


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
  }


# ------------------------------------------------------------------ table


def _fmt(value: Any, spec: str, missing: str = "—") -> str:
  return missing if value is None else format(value, spec)


def _mb(value: int | None) -> str:
  return "—" if value is None else f"{value / 2**20:.2f}"


def case_table(case: dict[str, Any]) -> str:
  """One case as a block of text."""
  rows = [f"{case['name']}"]
  header = (f"  {'peer':<12}{'median ms':>11}{'p25–p75 ms':>18}{'÷jsoft':>8}"
            f"{'÷floor':>8}{'compile ms':>12}{'temp MB':>10}{'out MB':>9}"
            f"{'eager ms':>10}  finite@×1000")
  rows.append(header)
  results = case["results"]
  for peer in ORDER:
    r = results.get(peer)
    if r is None:
      continue
    spread = (f"{r['p25_ms']:.3g}–{r['p75_ms']:.3g}" if "p25_ms" in r
              else "—")
    finite = r.get("finite_on_extremes")
    ratio = r.get("ratio_to_jsoft", 1.0 if peer == "jsoft" else None)
    rows.append(
        f"  {peer:<12}{_fmt(r.get('median_ms'), '.4g'):>11}{spread:>18}"
        f"{_fmt(ratio, '.2f'):>8}"
        f"{_fmt(r.get('ratio_to_floor'), '.2f'):>8}"
        f"{_fmt(r.get('compile_ms'), '.0f'):>12}"
        f"{_mb(r.get('temp_bytes')):>10}{_mb(r.get('output_bytes')):>9}"
        f"{_fmt(r.get('eager_ms'), '.4g'):>10}  "
        f"{'—' if finite is None else ('yes' if finite else 'NO: NaN/inf')}")
  for peer, why in case.get("missing", {}).items():
    rows.append(f"  {peer:<12}not run: {why}")
  return "\n".join(rows)


def header(info: dict[str, Any], config: dict[str, Any]) -> str:
  return (f"jsoft benchmark — {info['cpu']}, {info['cores']} cores, backend "
          f"{info['backend']} ({info['device']}); jax {info['jax']}, optax "
          f"{info['optax']}, torch {info['torch']}; {info['date']}\n"
          f"rounds={config['rounds']}; times are medians; ÷jsoft is the "
          "median per-round ratio peer/jsoft (>1: jsoft faster); ÷floor is "
          "time over a jitted read+write of the case's sizes.")


# ---------------------------------------------------------------- targets


def _get(cases: dict[str, dict[str, Any]], name: str, peer: str, key: str):
  return cases.get(name, {}).get("results", {}).get(peer, {}).get(key)


def targets(cases_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The issue's CPU targets, each with the figure measured (if run)."""
  cases = {c["name"]: c for c in cases_list}
  ce = "ce_int_4096x32000_float32_vg"
  sm = "softmax_4096x32000_float32_fwd"
  lm = "lm_head_2048x256x32000_float32_vg"
  out = []

  def add(name, measured, goal, op):
    if measured is None:
      return
    met = measured >= goal if op == ">=" else measured <= goal
    out.append({"target": name, "measured": float(f"{float(measured):.4g}"),
                "goal": f"{op} {goal}", "met": bool(met)})

  add(f"{ce}: optax time / jsoft time", _get(cases, ce, "optax",
                                             "ratio_to_jsoft"), 1.3, ">=")
  add(f"{ce}: torch time / jsoft time", _get(cases, ce, "torch",
                                             "ratio_to_jsoft"), 2.0, ">=")
  add(f"{ce}: jsoft time / floor", _get(cases, ce, "jsoft",
                                        "ratio_to_floor"), 1.15, "<=")
  add(f"{sm}: jax.nn time / jsoft time", _get(cases, sm, "jax.nn",
                                              "ratio_to_jsoft"), 1.0, ">=")
  add(f"{lm}: optax time / jsoft time", _get(cases, lm, "optax",
                                             "ratio_to_jsoft"), 1.1, ">=")
  ours, theirs = (_get(cases, lm, p, "temp_bytes") for p in ("jsoft", "optax"))
  if ours is not None and theirs:
    add(f"{lm}: jsoft XLA temp / optax XLA temp", ours / theirs, 0.55, "<=")
  lce = next((c for c in cases_list if c["fn"] == "lce"
              and c["dims"] == [8192, 256, 32768]), None)
  if lce is not None:
    name = lce["name"]
    fused = lce["results"].get("jsoft", {})
    unfused = lce["results"].get("jsoft-plain", {})
    if fused.get("temp_bytes") and unfused.get("temp_bytes"):
      add(f"{name}: jsoft fused XLA temp / unfused XLA temp",
          fused["temp_bytes"] / unfused["temp_bytes"], 1 / 16, "<=")
    if unfused.get("ratio_to_jsoft"):
      add(f"{name}: jsoft fused time / unfused time",
          1 / unfused["ratio_to_jsoft"], 1.35, "<=")
    if lce.get("max_rel_diff") is not None:
      add(f"{name}: fused vs unfused, loss and gradients (max rel. diff)",
          lce["max_rel_diff"], 1e-4, "<=")
  small = [c for c in cases_list if c["fn"] in ("ce_int", "ce_prob", "bce")
           and c["dims"] == [8, 10] and c["dtype"] == "float32"]
  for c in small:
    ours = c["results"].get("jsoft", {}).get("eager_ms")
    theirs = c["results"].get("optax", {}).get("eager_ms")
    if ours and theirs:
      add(f"{c['name']}: eager optax / eager jsoft", theirs / ours, 10.0, ">=")
  return out


def targets_table(rows: list[dict[str, Any]]) -> str:
  lines = ["targets (CPU):"]
  for t in rows:
    lines.append(f"  [{'met ' if t['met'] else 'MISS'}] {t['target']}: "
                 f"{t['measured']} (goal {t['goal']})")
  return "\n".join(lines)


# ------------------------------------------------------------ JSON, chart


def write_json(path: str, payload: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, sort_keys=False)
    f.write("\n")


def write_plot(path: str, payload: dict[str, Any]) -> str | None:
  """A grouped bar chart of time ÷ floor per peer; None, or why not."""
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return "matplotlib is not installed (pip install -e '.[bench]')"
  cases = payload["cases"]
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for c in cases:
    groups.setdefault((c["shape_label"], c["dtype"]), []).append(c)
  keys = sorted(groups)
  fig, axes = plt.subplots(len(keys), 1, figsize=(14, 3.2 * len(keys)),
                           squeeze=False)
  peers = [p for p in ORDER if not p.startswith("floor")]
  colors = dict(zip(peers, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                    strict=False))
  for ax, key in zip(axes[:, 0], keys, strict=True):
    group = groups[key]
    width = 0.8 / len(peers)
    for j, peer in enumerate(peers):
      xs, ys, hatches = [], [], []
      for i, c in enumerate(group):
        r = c["results"].get(peer, {})
        if r.get("ratio_to_floor") is not None:
          xs.append(i + (j - len(peers) / 2 + 0.5) * width)
          ys.append(r["ratio_to_floor"])
          hatches.append("" if r.get("finite_on_extremes", True) else "///")
      if xs:
        bars = ax.bar(xs, ys, width, label=peer, color=colors[peer])
        for bar, hatch in zip(bars, hatches, strict=True):
          bar.set_hatch(hatch)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(group)))
    ax.set_xticklabels([f"{c['fn']}\n{c['mode']}" for c in group], fontsize=8)
    dims = "x".join(map(str, group[0]["dims"]))
    ax.set_title(f"{key[0]} ({dims}), {key[1]}: time ÷ floor (lower is "
                 "better; 1 = a read+write of the same sizes; hatched = NaN "
                 "or inf on logits ×1000)", fontsize=10)
    ax.legend(fontsize=7, ncol=len(peers), loc="upper left")
  info = payload["machine"]
  fig.suptitle(f"jsoft benchmark — {info['cpu']}, {info['cores']} cores, "
               f"{info['backend']}", fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return None


def progress(done: int, total: int, label: str, start: float,
             now: float) -> None:
  """A one-line progress bar on stderr."""
  width = 30
  filled = int(width * done / max(total, 1))
  eta = (now - start) / done * (total - done) if done else 0.0
  sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
                   f" eta {eta:5.0f}s  {label[:60]:<60}")
  sys.stderr.flush()
  if done == total:
    sys.stderr.write("\n")
