"""Benchmark tables generated at build time from ``bench/results/*.json``.

``{bench-results} NAME.json`` in a page renders that results file: a line
with the machine and date it records, then a table for each group of
results in it. The layout is read from the JSON, not written per file:

* ``cases`` (``python -m bench``): one row per case, one column per
  implementation, the median per-round ratio of the peer's time to jsoft's,
  then the XLA temp memory of each;
* ``targets``: goal, measured, met;
* any other mapping of mappings, or list of mappings: one row each, a column
  per number it holds (``temp_bytes`` shown in MiB);
* a mapping of equal-length lists: the lists side by side (``over_n``
  beside the sibling list ``n``);
* numbers beside them (shapes, rounds): a line above the table.

``:bytes: KEY, ...`` names keys whose numbers are byte counts though their
names do not say so; byte counts are shown in MiB.

Lists of numbers (loss curves) are left to the charts. Every results file
must be rendered on some page, or be named in ``bench_results_unrendered``
(with the reason), else the build warns: adding a file is one directive.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from sphinx.util import logging

logger = logging.getLogger(__name__)

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results"

# Per-measurement fields that are plumbing, not results.
HIDDEN = {"compile_ms", "output_bytes", "samples", "calls_per_sample",
          "p25_ms", "p75_ms", "load_average", "load_average_at_end",
          "seconds"}
SKIPPED_KEYS = {"machine", "config", "load_average_at_end"}
HEADERS = {"median_ms": "ms (median)", "ratio_to_jsoft": "÷ reference",
           "ratio_to_plain": "× plain",
           "ratio_to_floor": "÷ floor", "temp_bytes": "XLA temp MiB",
           "finite_on_extremes": "finite on ×1000", "eager_ms": "eager ms"}


def _scalar(v: Any) -> bool:
  return v is None or isinstance(v, (bool, int, float, str))


def fmt(key: str, v: Any) -> str:
  """One cell: bytes in MiB, floats to 3–4 significant digits."""
  if v is None:
    return "—"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if "bytes" in key:
    mib = v / 2**20
    return f"{mib:.3g}" if mib < 100 else f"{mib:.0f}"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"
  return str(v)


def label(key: str) -> str:
  """A column's name: the JSON key, bytes said to be MiB."""
  return HEADERS.get(key, f"{key} (MiB)" if "bytes" in key else key)


def machine_line(data: dict[str, Any], name: str) -> str:
  """Where and when: the file's machine and date, or that it has none."""
  m = data.get("machine")
  if not isinstance(m, dict):
    return (f"{name}: the file records no machine or date (see its "
            "description on this page).")
  parts = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
           f"{m.get('backend', '?')} backend"]
  parts.append(", ".join(f"{k} {m[k]}" for k in ("jax", "optax", "torch")
                         if m.get(k)))
  if m.get("load_average"):
    parts.append("load average " + " ".join(f"{x:.1f}"
                                            for x in m["load_average"]))
  return f"{name}: measured {m.get('date', 'on an unrecorded date')} on " + \
      "; ".join(parts) + "."


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """The scalar leaves of a mapping, nested keys joined with a dot."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if k in HIDDEN:
      continue
    if _scalar(v):
      out[key] = v
    elif isinstance(v, dict):
      out.update(flat(v, key + "."))
  return out


def table(header: list[str], rows: list[list[str]]) -> nodes.table:
  tab = nodes.table(classes=["bench-table"])
  group = nodes.tgroup(cols=len(header))
  tab += group
  for _ in header:
    group += nodes.colspec(colwidth=1)
  head = nodes.thead()
  group += head
  body = nodes.tbody()
  group += body
  for cells, part in [(header, head)] + [(r, body) for r in rows]:
    row = nodes.row()
    for c in cells:
      entry = nodes.entry()
      entry += nodes.paragraph(text=c)
      row += entry
    part += row
  return tab


def records_table(records: list[tuple[str, dict[str, Any]]],
                  first: str) -> nodes.table:
  """One row per record, one column per scalar leaf any record has."""
  cols: list[str] = []
  for _, rec in records:
    for k in flat(rec):
      if k not in cols:
        cols.append(k)
  header = [first] + [label(c) for c in cols]
  rows = []
  for name, rec in records:
    f = flat(rec)
    rows.append([name] + [fmt(c, f.get(c)) for c in cols])
  return table(header, rows)


def cases_tables(cases: list[dict[str, Any]]) -> list[nodes.Node]:
  """``python -m bench`` cases: time ratios, then jsoft's time and every
  implementation's XLA temp."""
  peers: list[str] = []
  for case in cases:
    for p in case["results"]:
      if p not in peers:
        peers.append(p)
  ratio_rows, temp_rows = [], []
  for case in cases:
    res = case["results"]
    jsoft = res.get("jsoft", {})
    ratio_rows.append(
        [case["name"], fmt("ms", jsoft.get("median_ms"))]
        + [fmt("r", res[p].get("ratio_to_jsoft")) if p in res else "—"
           for p in peers if p != "jsoft"])
    temp_rows.append([case["name"]] + [
        fmt("temp_bytes", res[p].get("temp_bytes")) if p in res else "—"
        for p in peers])
  others = [p for p in peers if p != "jsoft"]
  return [
      nodes.paragraph(text="Time: jsoft's median in ms, then each peer's "
                      "time ÷ jsoft's (the median of per-round ratios; > 1 "
                      "where jsoft is faster; — not run)."),
      table(["case", "jsoft ms"] + others, ratio_rows),
      nodes.paragraph(text="XLA temp memory, MiB (compile-time; — where "
                      "the implementation has none to report)."),
      table(["case"] + peers, temp_rows),
  ]


def cells_tables(cells: list[dict[str, Any]]) -> list[nodes.Node]:
  """``python -m bench sizes`` cells: per peer, a kernel and dtype a row, a
  shape a column, the ratio peer ÷ jsoft in each cell, and the geometric
  mean of the row."""
  out: list[nodes.Node] = []
  peers: list[str] = []
  shapes: list[str] = []
  for c in cells:
    shape = "×".join(str(x) for x in c["dims"])
    if shape not in shapes:
      shapes.append(shape)
    peers += [p for p in c.get("ratio", {}) if p not in peers]
  for peer in peers:
    rows: dict[str, dict[str, float]] = {}
    for c in cells:
      r = c.get("ratio", {}).get(peer)
      if r is not None:
        rows.setdefault(f"{c['kernel']}, {c['dtype']}", {})[
            "×".join(str(x) for x in c["dims"])] = r
    cols = [s for s in shapes if any(s in row for row in rows.values())]
    body = []
    for name, row in rows.items():
      mean = math.exp(sum(math.log(x) for x in row.values()) / len(row))
      body.append([name] + [fmt("r", row.get(s)) for s in cols]
                  + [fmt("r", mean)])
    out.append(nodes.rubric(text=f"{peer} ÷ jsoft"))
    out.append(table(["kernel, dtype"] + cols + ["geometric mean"], body))
  return out


def is_record(d: Any) -> bool:
  """A mapping that fits one table row: scalars, lists of numbers (curves,
  left to the charts) and mappings of the same."""
  return isinstance(d, dict) and all(
      _scalar(v) or is_record(v)
      or (isinstance(v, list) and all(_scalar(x) for x in v))
      for v in d.values())


def columns(data: dict[str, Any], key: str, v: dict[str, list[Any]],
            in_bytes: bool) -> nodes.table:
  """Equal-length lists side by side; the first column is the sibling list
  that ``over_X`` names (``X``), if there is one of that length."""
  n = len(next(iter(v.values())))
  axis_key = key.removeprefix("over_")
  axis = data.get(axis_key)
  if not (isinstance(axis, list) and len(axis) == n):
    axis_key, axis = "#", list(range(1, n + 1))
  unit = "bytes" if in_bytes else key
  header = [axis_key] + [f"{c} (MiB)" if in_bytes else label(c) for c in v]
  rows = [[str(axis[i])] + [fmt(unit, col[i]) for col in v.values()]
          for i in range(n)]
  return table(header, rows)


def render(data: Any, title: str | None = None,
           byte_keys: frozenset[str] = frozenset()) -> list[nodes.Node]:
  """The tables of one JSON value (see the module docstring). Keys in
  ``byte_keys`` hold byte counts though their names do not say so."""
  out: list[nodes.Node] = []
  if title:
    out.append(nodes.rubric(text=title))
  if isinstance(data, list):
    if data and all(isinstance(r, dict) for r in data):
      out.append(records_table([(str(i + 1), r) for i, r in enumerate(data)],
                               "#"))
    return out
  if not isinstance(data, dict):
    return out
  scalars = {k: v for k, v in data.items()
             if _scalar(v) and k not in HIDDEN}
  scalars.update({k: ", ".join(fmt(k, x) for x in v)
                  for k, v in data.items()
                  if k not in HIDDEN and isinstance(v, list)
                  and 0 < len(v) <= 12 and all(_scalar(x) for x in v)})
  if scalars:
    out.append(nodes.paragraph(text="; ".join(
        f"{label(k)}: {fmt(k, v) if not isinstance(v, str) else v}"
        for k, v in scalars.items())))
  for k, v in data.items():
    if k in SKIPPED_KEYS:
      continue
    if k == "cases" and isinstance(v, list):
      out.extend(cases_tables(v))
    elif k == "cells" and isinstance(v, list):
      out.extend(cells_tables(v))
    elif k == "targets" and isinstance(v, list):
      out.append(nodes.rubric(text="targets"))
      out.append(table(["target", "goal", "measured", "met"], [
          [t["target"], t["goal"], fmt("m", t["measured"]),
           "met" if t["met"] else "missed"] for t in v]))
    elif (isinstance(v, dict) and v
          and all(isinstance(x, list) and x and all(_scalar(y) for y in x)
                  for x in v.values())
          and len({len(x) for x in v.values()}) == 1):
      out.append(nodes.rubric(text=k))
      out.append(columns(data, k, v, k in byte_keys))
    elif isinstance(v, dict) and v and all(is_record(x) for x in v.values()):
      out.append(nodes.rubric(text=k))
      out.append(records_table(list(v.items()), ""))
    elif isinstance(v, dict) and v:  # an empty mapping: nothing to show
      out.extend(render(v, k, byte_keys))
    elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
      out.extend(render(v, k, byte_keys))
  return out


class BenchResults(Directive):
  """``{bench-results} NAME.json``: the tables of ``bench/results/NAME``."""

  required_arguments = 1
  option_spec = {"bytes": directives.unchanged}

  def run(self) -> list[nodes.Node]:
    name = self.arguments[0]
    path = RESULTS / name
    env = self.state.document.settings.env
    env.note_dependency(str(path))
    if not path.exists():
      return [self.state.document.reporter.warning(
          f"bench-results: no such file bench/results/{name}",
          line=self.lineno)]
    data = json.loads(path.read_text())
    if not hasattr(env, "jsoft_bench_rendered"):
      env.jsoft_bench_rendered = {}
    env.jsoft_bench_rendered.setdefault(env.docname, set()).add(name)
    box = nodes.container(classes=["bench-results"])
    box += nodes.paragraph(text=machine_line(data, f"bench/results/{name}"))
    byte_keys = frozenset(k.strip() for k in
                          self.options.get("bytes", "").split(",") if k)
    box.extend(render(data, byte_keys=byte_keys))
    return [box]


def _purge(app: Any, env: Any, docname: str) -> None:
  del app
  getattr(env, "jsoft_bench_rendered", {}).pop(docname, None)


def _merge(app: Any, env: Any, docnames: Any, other: Any) -> None:
  del app, docnames
  if not hasattr(env, "jsoft_bench_rendered"):
    env.jsoft_bench_rendered = {}
  env.jsoft_bench_rendered.update(getattr(other, "jsoft_bench_rendered", {}))


def _check(app: Any, env: Any) -> None:
  rendered = set().union(*getattr(env, "jsoft_bench_rendered", {}).values())
  skipped = set(app.config.bench_results_unrendered)
  for path in sorted(RESULTS.glob("*.json")):
    if path.name not in rendered | skipped:
      logger.warning("bench/results/%s is on no page: add "
                     "```{bench-results} %s``` to a page under "
                     "docs/benchmarks/", path.name, path.name,
                     type="jsoft", subtype="bench")


def setup(app: Any) -> dict[str, Any]:
  app.add_config_value("bench_results_unrendered", {}, "env")
  app.add_directive("bench-results", BenchResults)
  app.connect("env-purge-doc", _purge)
  app.connect("env-merge-info", _merge)
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
