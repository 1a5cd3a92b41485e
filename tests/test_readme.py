"""The README's Python examples run as written, in order, in one namespace."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 4
  namespace: dict = {}
  # Users run with JAX's default (standard) promotion; optax's optimisers
  # mix Python floats and int32 counters, which the suite's strict mode
  # rejects.
  with jax.numpy_dtype_promotion("standard"):
    for block in blocks:
      exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
  # The last example's Hessian of CE is diag(p) − p pᵀ: rows sum to 0.
  assert abs(float(namespace["H"].sum())) < 1e-5
