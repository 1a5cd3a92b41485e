"""The README's headline table, generated from a committed results file.

``python docs/ext/headline.py`` rewrites the table between the README's
``headline`` markers from ``bench/results/default_cpu.json``;
``tests/test_docs.py`` fails when the README's table and the file differ,
so the README holds no figure typed by hand.
"""

from __future__ import annotations

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT / "bench" / "results" / "default_cpu.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- headline:begin -->", "<!-- headline:end -->"
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


def generated() -> str:
  return table(json.loads(SOURCE.read_text()))


def in_readme(text: str) -> str:
  """The README's table: the text between the markers."""
  return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> None:
  text = README.read_text()
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  README.write_text(f"{head}{BEGIN}\n{generated()}\n{END}{tail}")


if __name__ == "__main__":
  main()
