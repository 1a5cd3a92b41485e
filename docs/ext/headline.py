"""The README's figures, generated from committed results files.

``python docs/ext/headline.py`` rewrites the tables between the README's
markers: ``headline`` from ``bench/results/default_cpu.json``, ``sweep``
(what ignored tokens cost in the fused heads) from
``bench/results/sweep_cpu.json``. ``tests/test_docs.py`` fails when a
README table and its file differ, so the README holds no figure typed by
hand.
"""

from __future__ import annotations

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
SOURCE = RESULTS / "default_cpu.json"
SWEEP = RESULTS / "sweep_cpu.json"
README = ROOT / "README.md"
PEERS = [("optax", "optax"), ("jax.nn", "jax.nn"), ("torch", "PyTorch")]


def _ratio(results: dict, peer: str) -> str:
  r = results.get(peer, {}).get("ratio_to_jsoft")
  return "—" if r is None else f"{r:.2f}"


def _mib(results: dict, peer: str) -> str:
  b = results.get(peer, {}).get("temp_bytes")
  return "—" if b is None else f"{b / 2**20:.3g}"


def table(data: dict) -> str:
  """Markdown: every case of the run above 8×10, peer time ÷ jsoft time and
  the XLA temp of jsoft and optax, under a line naming machine and date."""
  m = data["machine"]
  lines = [
      f"`python -m bench`, {m['date']}, {m['cpu']} ({m['cores']} cores, "
      f"{m['backend']}), jax {m['jax']}: a peer's time ÷ jsoft's (> 1: jsoft "
      "faster), median of per-round ratios; XLA temp in MiB.",
      "",
      "| case | " + " | ".join(f"{name} ÷ jsoft" for _, name in PEERS)
      + " | temp jsoft / optax |",
      "|---|" + "---|" * (len(PEERS) + 1),
  ]
  for case in data["cases"]:
    if "_8x10_" in case["name"]:
      continue
    res = case["results"]
    lines.append(
        f"| `{case['name']}` | "
        + " | ".join(_ratio(res, p) for p, _ in PEERS)
        + f" | {_mib(res, 'jsoft')} / {_mib(res, 'optax')} |")
  return "\n".join(lines)


def sweep_table(data: dict) -> str:
  """Markdown: per fused head, loop and shape, the time at each kept
  fraction ``k`` ÷ the time with every token kept (the slower of the two
  patterns, first ``k·N`` or random), and ``ignore_index`` with nothing
  ignored ÷ no ``ignore_index``."""
  m, sweep = data["machine"], data["options"]["sweep"]
  kept = [k for k in sweep["kept"] if k < 1]
  lines = [
      f"`python -m bench options --only sweep`, {m['date']}, {m['cpu']} "
      f"({m['cores']} cores, {m['backend']}), jax {m['jax']}, "
      "`value_and_grad` of the mean: time with a fraction `k` of the tokens "
      "kept ÷ time with all kept (the slower of the first `k·N` and a "
      f"random `k·N`; target `k + {sweep['slack']:.2f}`), and "
      "`ignore_index` with nothing ignored ÷ the call without it (target "
      f"{sweep['overhead_target']:.2f}).",
      "",
      "| head, loop | N×D×V | " + " | ".join(f"k={k:g}" for k in kept)
      + " | nothing ignored |",
      "|---|---|" + "---|" * (len(kept) + 1),
  ]
  for over in sweep["overhead"]:
    dims = (over["n"], over["d"], over["v"])
    rows = [r for r in sweep["rows"] if (r["n"], r["d"], r["v"]) == dims
            and r["head"] == over["head"] and r["loop"] == over["loop"]]
    cells = [f"{max(r['ratios'][f'{k:g}'] for r in rows):.2f}" for k in kept]
    lines.append(f"| `{over['head']}`, {over['loop']} | "
                 f"{'×'.join(map(str, dims))} | " + " | ".join(cells)
                 + f" | {over['ratio']:.3f} |")
  return "\n".join(lines)


BLOCKS = {  # marker name: (the generator of its text, its source)
    "headline": (table, SOURCE),
    "sweep": (sweep_table, SWEEP),
}


def _markers(name: str) -> tuple[str, str]:
  return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def generated(name: str = "headline") -> str:
  make, source = BLOCKS[name]
  return make(json.loads(source.read_text()))


def in_readme(text: str, name: str = "headline") -> str:
  """A README table: the text between its markers."""
  begin, end = _markers(name)
  return text.split(begin, 1)[1].split(end, 1)[0].strip()


def main() -> None:
  text = README.read_text()
  for name in BLOCKS:
    begin, end = _markers(name)
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    text = f"{head}{begin}\n{generated(name)}\n{end}{tail}"
  README.write_text(text)


if __name__ == "__main__":
  main()
