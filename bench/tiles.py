"""The fused head's time against its memory: ``python -m bench tiles``.

``linear_cross_entropy``'s ``value_and_grad`` of the mean with respect to
``h`` and ``W`` at N=8192, D=256, V=32768 float32 (``--quick``:
1024×64×4096), over tiles of classes (the default there, four matmuls per
tile: the backward pass recomputes the logits) and over tiles of tokens
(``tile_by="tokens"``: the gradients are formed in the forward pass, three
matmuls per tile, at the price of the float32 ``[D, V]`` ``dW`` and of
tiles of whole rows), for several ``chunk_size``. Each is timed in
interleaved rounds against the unfused jsoft loss of ``h @ W``; XLA temp
memory of each, and its largest relative difference from the unfused
loss and gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsoft
from bench import _plumbing, report, timing
from bench.cases import Impl, head_inputs

# (tile_by, chunk_size); None: the default tile at that shape.
FULL = [("classes", 256), ("classes", None), ("classes", 1024),
        ("classes", 2048), ("classes", 4096), ("tokens", 128),
        ("tokens", 256), ("tokens", 512), ("tokens", 1024)]
QUICK = [("classes", None), ("classes", 1024), ("tokens", 64),
         ("tokens", 128)]


def _name(tile_by: str, chunk: int | None) -> str:
  return f"{tile_by}, {'default' if chunk is None else chunk}"


def measure(quick: bool = False, rounds: int = 5) -> dict[str, Any]:
  n, d, v = (1024, 64, 4096) if quick else (8192, 256, 32768)
  h, w, y = map(jnp.asarray, head_inputs(np.random.default_rng(2), n, d, v))

  def unfused(h, w):
    return jsoft.softmax_cross_entropy_with_integer_labels(
        h @ w, y, reduction="mean")

  def step(loss):
    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return jitted, Impl("", lambda: jax.block_until_ready(jitted(h, w)),
                        jitted, (h, w))

  reference, impl = step(unfused)
  want = reference(h, w)
  impls, chunks, differences = {"unfused": impl}, {}, {}
  for tile_by, chunk in QUICK if quick else FULL:
    name = _name(tile_by, chunk)

    def fused(h, w, tile_by=tile_by, chunk=chunk):
      return jsoft.linear_cross_entropy(h, w, y, reduction="mean",
                                        tile_by=tile_by, chunk_size=chunk)

    jitted, impls[name] = step(fused)
    differences[name] = _plumbing.rel_difference(jitted(h, w), want)
    chunks[name] = chunk
  results = timing.measure(impls, rounds, 0.02, 0, baseline="unfused")
  results["unfused"] = results.pop("unfused")  # listed last
  unfused_temp = results["unfused"]["temp_bytes"]
  for name, r in results.items():
    r["temp_share"] = r["temp_bytes"] / unfused_temp
    if name != "unfused":
      r["chunk_size"] = chunks[name]
      r["max_rel_difference"] = differences[name]
  return {"n": n, "d": d, "v": v, "rounds": rounds, "results": results}


def table(result: dict[str, Any]) -> Any:
  rows = []
  for name, r in result["results"].items():
    fused = name != "unfused"
    rows.append([
        "unfused (jsoft CE of h @ W)" if not fused else name,
        f"{r['median_ms']:.0f}",
        f"{r['ratio_to_unfused']:.2f}" if fused else "1.00",
        f"{r['temp_bytes'] / report.MIB:.1f}",
        f"1/{1 / r['temp_share']:.1f}" if fused else "1",
        f"{r['max_rel_difference']:.1e}" if fused else ""])
  return _plumbing.table(
      f"fused head, time against memory: value_and_grad of the mean, "
      f"N={result['n']} D={result['d']} V={result['v']} float32",
      ["tile_by, chunk_size", "ms", "× unfused", "temp MiB", "share",
       "max rel diff"], rows,
      caption=(f"median of {result['rounds']} interleaved rounds; "
               "× unfused: the median per-round ratio; share: XLA temp "
               "over the unfused loss's"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m bench tiles``: the measurement, its table, and the JSON
  on request."""
  args = _plumbing.command("tiles", __doc__, rounds=5).parse_args(argv)
  result = measure(quick=args.quick, rounds=args.rounds)
  _plumbing.show(table(result))
  _plumbing.write_outputs(
      args.json, {"machine": report.machine(), "tiles": result}, [])
  return result
