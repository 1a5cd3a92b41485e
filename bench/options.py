"""What each training option costs: ``python -m bench --options``.

The integer-label CE's ``value_and_grad`` of the mean, at 4096×32000
float32 (``--quick``: 1024×1000), with one option at a time and with all
four (ignore 10% of the targets, label smoothing, z-loss, soft cap), timed
in interleaved rounds against the plain call; XLA temp memory of each.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import jsoft
from bench import timing
from bench.cases import Impl

IGNORE = -100
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "ignore_index": dict(ignore_index=IGNORE),
    "class_weights": {},  # filled in with the shape's weights
    "z_loss": dict(z_loss=1e-4),
    "label_smoothing": dict(label_smoothing=0.1),
    "logit_soft_cap": dict(logit_soft_cap=30.0),
    "all four": dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-4,
                     logit_soft_cap=30.0),
}


def measure(quick: bool = False, rounds: int = 7) -> dict[str, Any]:
  n, c = (1024, 1000) if quick else (4096, 32000)
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray((3 * rng.normal(size=(n, c))).astype(np.float32))
  y = rng.integers(0, c, size=n).astype(np.int32)
  y = jax.numpy.asarray(np.where(rng.random(n) < 0.1, IGNORE, y))
  weights = jax.numpy.asarray(rng.uniform(0.5, 2.0, c).astype(np.float32))
  impls = {}
  for name, kw in OPTIONS.items():
    if name == "class_weights":
      kw = dict(class_weights=weights)
    if "ignore_index" not in kw:  # labels must then be in range
      kw = dict(kw)
      labels = jax.numpy.where(y == IGNORE, 0, y)
    else:
      labels = y

    def loss(x, kw=kw, labels=labels):
      return jsoft.softmax_cross_entropy_with_integer_labels(
          x, labels, reduction="mean", **kw)

    jitted = jax.jit(jax.value_and_grad(loss))
    impls[name] = Impl(name, lambda j=jitted: jax.block_until_ready(j(x)),
                       jitted, (x,))
  # timing.measure reports ratios to the peer named "jsoft": the plain call.
  impls["jsoft"] = impls.pop("plain")
  results = timing.measure(impls, rounds, 0.02, 0)
  results["plain"] = results.pop("jsoft")
  return {"n": n, "c": c, "rounds": rounds, "results": results}


def table(result: dict[str, Any]) -> str:
  lines = [f"training options: integer-label CE value_and_grad of the mean, "
           f"{result['n']}x{result['c']} float32 (median of "
           f"{result['rounds']} interleaved rounds)",
           f"  {'option':<16} {'ms':>9} {'× plain':>8} {'temp MB':>9}"]
  for name, r in result["results"].items():
    ratio = 1.0 if name == "plain" else r["ratio_to_jsoft"]
    lines.append(f"  {name:<16} {r['median_ms']:9.1f} {ratio:8.2f} "
                 f"{r['temp_bytes'] / 1e6:9.2f}")
  return "\n".join(lines)
