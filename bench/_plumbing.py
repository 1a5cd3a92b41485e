"""What every part of the benchmark shares: tables, progress, optional
imports, JSON and chart files, the command line's common flags, and how
far two results differ.

Tables and the progress bar are ``rich``'s; the helpers here only fix the
house look (one table style, plain text when the output is a file) and the
messages for a missing optional dependency.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from rich import box
from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

T = TypeVar("T")

# Where each optional dependency comes from.
EXTRAS = {
    "optax": "bench",
    "matplotlib": "bench",
    "torch": "torch",
    "sklearn": "experiments",
    "equinox": "experiments",
}
# Wide enough for the benchmark's table when stdout is a file or a pipe
# (rich would otherwise fold it to 80 columns).
FILE_WIDTH = 160


class Missing(ImportError):
  """An optional dependency is not installed; the message says how to get
  it."""


def optional(module: str) -> Any:
  """Imports ``module``, or raises :class:`Missing` naming the extra that
  installs it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    top = module.split(".")[0]
    extra = EXTRAS.get(top, "bench")
    raise Missing(f"{top} is not installed "
                  f"(python -m pip install -e '.[{extra}]')") from e


def why_missing(module: str) -> str | None:
  """None if ``module`` imports, else why not (for a peer that is
  reported as not run rather than failing the run)."""
  try:
    optional(module)
  except Missing as e:
    return str(e)
  return None


def pyplot() -> Any:
  """``matplotlib.pyplot`` on the Agg backend (files only), or
  :class:`Missing`."""
  matplotlib = optional("matplotlib")
  matplotlib.use("Agg")
  return optional("matplotlib.pyplot")


def save_figure(fig: Any, path: str) -> None:
  """Writes ``fig`` to ``path`` (folders made as needed) and closes it."""
  _make_parent(path)
  fig.savefig(path, dpi=100)
  pyplot().close(fig)


def write_json(path: str, payload: Any) -> None:
  """``payload`` as indented JSON, folders made as needed."""
  _make_parent(path)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)
    f.write("\n")


def write_outputs(json_path: str | None, payload: Any,
                  charts: Sequence[tuple[str | None, Callable[[str], Any]]]
                  ) -> None:
  """A command's files: ``payload`` as JSON at ``json_path``, and each
  ``(path, draw)`` chart with ``draw(path)``; None paths are skipped, and a
  chart whose plotting library is missing is reported, not raised."""
  if json_path:
    write_json(json_path, payload)
    say(f"wrote {json_path}")
  for path, draw in charts:
    if not path:
      continue
    try:
      draw(path)
      say(f"wrote {path}")
    except Missing as e:
      say(f"chart not written: {e}")


def rel_difference(got: Any, want: Any) -> float:
  """The largest difference between two results (arrays, or trees of them
  alike in structure), relative to each ``want`` leaf's largest magnitude,
  in float64: the worst over the leaves."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                  strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), np.finfo(np.float64).tiny)
    worst = max(worst, float(np.max(np.abs(a - b))) / scale)
  return worst


def _make_parent(path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


# ------------------------------------------------------------ console


def console(stderr: bool = False) -> Console:
  """A console for stdout (or stderr) that prints text as given (no markup,
  no highlighting) and, into a file, at a fixed wide width."""
  stream = sys.stderr if stderr else sys.stdout
  width = None if stream.isatty() else FILE_WIDTH
  return Console(stderr=stderr, width=width, markup=False, highlight=False)


def say(*lines: str) -> None:
  """Prints lines of plain text on stdout."""
  out = console()
  for line in lines:
    out.print(line, soft_wrap=True)


def table(title: str, columns: Sequence[str],
          rows: Iterable[Sequence[Any] | None], *, left: int = 1,
          caption: str | None = None) -> Group:
  """The benchmark's one table style: a title line, the table, a caption.

  Args:
    title: printed above the table.
    columns: the header; the first ``left`` columns are left-aligned (names),
      the rest right-aligned (numbers).
    rows: cells, already formatted (``None`` cells print as ``—``); a
      ``None`` row starts a new section (a rule across the table).
    left: how many leading columns hold names.
    caption: printed below the table (units, what a ratio means).
  """
  t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
  for i, name in enumerate(columns):
    t.add_column(name, justify="left" if i < left else "right", no_wrap=True)
  for row in rows:
    if row is None:
      if t.row_count:
        t.add_section()
      continue
    t.add_row(*(Text("—" if c is None else str(c)) for c in row))
  parts = [Text(title), t] + ([Text(caption)] if caption else [])
  return Group(*parts)


def show(*renderables: Any) -> None:
  """Prints tables (or text) on stdout, a blank line before each."""
  out = console()
  for r in renderables:
    out.print()
    out.print(r)


def tracked(items: Sequence[T], label: Callable[[T], str]) -> Iterator[T]:
  """Yields ``items`` under a progress bar on stderr that names the item
  being worked on (``label(item)``) and estimates the time left."""
  bar = Progress(TextColumn("{task.description:<40.40}"), BarColumn(),
                 MofNCompleteColumn(), TimeElapsedColumn(),
                 TextColumn("left"), TimeRemainingColumn(),
                 console=console(stderr=True))
  with bar:
    task = bar.add_task("", total=len(items))
    for item in items:
      bar.update(task, description=label(item))
      yield item
      bar.advance(task)
    bar.update(task, description="done")


def command(name: str, description: str | None, *,
            quick: str = "small shapes (a smoke test, seconds)",
            rounds: int | None = None,
            plot: bool = False) -> argparse.ArgumentParser:
  """The command line of ``python -m bench NAME``: ``--quick`` (``quick``
  says what it does), ``--rounds`` for a timed one (default ``rounds``),
  ``--json``, and ``--plot`` for one that draws; ``description``: its
  first line is the help's (a module's docstring will do)."""
  p = argparse.ArgumentParser(prog=f"python -m bench {name}",
                              description=(description or "").splitlines()[0])
  p.add_argument("--quick", action="store_true", help=quick)
  if rounds is not None:
    p.add_argument("--rounds", type=int, default=rounds,
                   help=f"timed rounds (default {rounds})")
  p.add_argument("--json", metavar="PATH", help="write results as JSON")
  if plot:
    p.add_argument("--plot", metavar="PATH", help="write a PNG")
  return p
