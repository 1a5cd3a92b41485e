"""The README's Python examples run as written, in order, in one namespace."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 4
  # jax < 0.6.1 has no jax.shard_map: every other block still runs.
  left_out = [] if hasattr(jax, "shard_map") else [
      b for b in blocks if "jax.shard_map" in b]
  namespace: dict = {}
  # Users run with JAX's default (standard) promotion; optax's optimisers
  # mix Python floats and int32 counters, which the suite's strict mode
  # rejects.
  with jax.numpy_dtype_promotion("standard"):
    for block in blocks:
      if block not in left_out:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
  # The last example's Hessian of CE is diag(p) − p pᵀ: rows sum to 0.
  assert abs(float(namespace["H"].sum())) < 1e-5
  if left_out:
    pytest.skip(f"the other blocks ran; {len(left_out)} calling jax.shard_map "
                f"need jax >= 0.6.1, this is jax {jax.__version__}")
