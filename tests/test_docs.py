"""The documentation's Python examples run as written: each page's blocks in
order, in one namespace per page (as tests/test_readme.py does for the
README)."""

import pathlib
import re

import jax
import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def python_blocks(path: pathlib.Path) -> list[str]:
  # Fenced ```python blocks run; a block that cannot run in a test process
  # (the multi-host guide's jax.distributed.initialize) is a
  # ```{code-block} python directive instead, shown but not run.
  return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_pages_have_examples():
  # The getting-started page holds a quickstart for each use.
  assert len(python_blocks(DOCS / "getting_started.md")) >= 4


@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p)],
    ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page):
  blocks = python_blocks(page)
  # jax < 0.6.1 has no jax.shard_map: the page's other blocks still run.
  left_out = [] if hasattr(jax, "shard_map") else [
      b for b in blocks if "jax.shard_map" in b]
  namespace: dict = {}
  # Users run with JAX's default (standard) promotion.
  with jax.numpy_dtype_promotion("standard"):
    for block in blocks:
      if block not in left_out:
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102
  if left_out:
    pytest.skip(f"the other blocks ran; {len(left_out)} calling jax.shard_map "
                f"need jax >= 0.6.1, this is jax {jax.__version__}")


def test_readme_headline_table_is_the_results_file():
  # The README's headline figures are generated from bench/results/
  # (python docs/ext/headline.py), never typed: they must match the file.
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "headline", DOCS / "ext" / "headline.py")
  headline = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(headline)
  text = headline.README.read_text()
  readme = headline.in_readme(text)
  assert readme == headline.generated()
  assert "| `ce_int_4096x32000_float32_vg` |" in readme
  sweep = headline.in_readme(text, "sweep")
  assert sweep == headline.generated("sweep")
  assert "| `linear_cross_entropy`, classes | 32768×128×8192 |" in sweep
