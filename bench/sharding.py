"""``python -m bench.sharding``: memory of the vocabulary-parallel head loss.

Runs in its own process with 8 host CPU devices (set before JAX
initialises) and compares, compile-only (``memory_analysis()``), the XLA
temp memory per device of the fused loss sharded over the vocabulary
(``shard_map``, ``axis_name="tp"``) with the single-device unfused loss,
for ``value_and_grad`` of the mean loss with respect to ``h`` and ``W``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

DEVICES = 8


def measure(n: int = 4096, d: int = 128, v: int = 16384,
            chunk: int | None = None) -> dict:
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import Mesh  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import jsoft  # noqa: PLC0415

  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("tp",))
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)

  def local(h, w, y):
    return jsoft.linear_cross_entropy(h, w, y, chunk_size=chunk,
                                      axis_name="tp", reduction="mean")

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "tp"), P()),
                          out_specs=P())
  fused = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))

  def unfused_loss(h, w, y):
    return jnp.mean(jsoft.softmax_cross_entropy_with_integer_labels(h @ w, y))

  unfused = jax.jit(jax.value_and_grad(unfused_loss, argnums=(0, 1)))
  per_device = fused.lower(h, w, y).compile().memory_analysis()
  single = unfused.lower(h, w, y).compile().memory_analysis()
  ratio = per_device.temp_size_in_bytes / single.temp_size_in_bytes
  v_local = v // DEVICES
  return {
      "n": n, "d": d, "v": v, "devices": DEVICES, "chunk": chunk,
      "loop": "tokens" if n >= v_local else "vocabulary",
      "sharded_fused_temp_bytes_per_device": per_device.temp_size_in_bytes,
      "single_device_unfused_temp_bytes": single.temp_size_in_bytes,
      "ratio": ratio,
      "target": "<= 1/32",
      "met": ratio <= 1 / 32,
      # What crosses devices per step (float32), besides the loss itself:
      # forward, per token, the max (pmax) and the sum of exponentials and
      # the label's logit (psum); backward, the partial dh (psum of N x D).
      "forward_floats_per_token": 3,
      "backward_bytes_dh": 4 * n * d,
      "avoided_all_gather_bytes_logits": 4 * n * v,
      "avoided_all_gather_bytes_weight": 4 * d * v,
  }


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog="python -m bench.sharding",
                              description=__doc__.splitlines()[0])
  p.add_argument("--json", metavar="PATH", help="write the result as JSON")
  p.add_argument("--chunk", type=int, default=None,
                 help="tile size (default: jsoft's own choice)")
  args = p.parse_args(argv)
  result = measure(chunk=args.chunk)
  mib = 2.0**20
  print(f"vocabulary-parallel fused head, N={result['n']} D={result['d']} "
        f"V={result['v']} over {DEVICES} CPU devices ({result['loop']} loop)")
  print(f"  per-device XLA temp, sharded fused:  "
        f"{result['sharded_fused_temp_bytes_per_device'] / mib:8.2f} MiB")
  print(f"  XLA temp, one device, unfused:       "
        f"{result['single_device_unfused_temp_bytes'] / mib:8.2f} MiB")
  print(f"  ratio {result['ratio']:.4f} (target <= 1/32 = {1 / 32:.4f}): "
        f"{'met' if result['met'] else 'MISSED'}")
  print(f"  communicated per step: {result['forward_floats_per_token']} "
        f"floats per token forward, dh ({result['backward_bytes_dh'] / mib:.2f}"
        f" MiB) backward; never the logits "
        f"({result['avoided_all_gather_bytes_logits'] / mib:.0f} MiB) or W "
        f"({result['avoided_all_gather_bytes_weight'] / mib:.0f} MiB)")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
      f.write("\n")
  return result


if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", DEVICES)
  main()
