"""``python -m bench sharding``: memory of the vocabulary-parallel head loss.

Runs with 8 host CPU devices (set before JAX initialises its backend) and
compares, compile-only (``memory_analysis()``), the XLA
temp memory per device of the fused loss sharded over the vocabulary
(``shard_map``, ``axis_name="tp"``) with the single-device unfused loss,
for ``value_and_grad`` of the mean loss with respect to ``h`` and ``W``.
"""

from __future__ import annotations

import math
import re

import jax

from bench import _plumbing

DEVICES = 8
N, D, V = 4096, 128, 16384
QUICK = (512, 32, 2048)


def measure(n: int = N, d: int = D, v: int = V,
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
  compiled = fused.lower(h, w, y).compile()
  per_device = compiled.memory_analysis()
  single = unfused.lower(h, w, y).compile().memory_analysis()
  v_local = v // DEVICES
  return {
      "n": n, "d": d, "v": v, "devices": DEVICES, "chunk": chunk,
      "loop": "tokens" if n >= v_local else "vocabulary",
      "sharded_fused_temp_bytes_per_device": per_device.temp_size_in_bytes,
      "single_device_unfused_temp_bytes": single.temp_size_in_bytes,
      "ratio": per_device.temp_size_in_bytes / single.temp_size_in_bytes,
      # Read off the compiled program: what each device sends into the
      # collectives of one value_and_grad step.
      "collectives": collective_bytes(compiled.as_text()),
      "logits_bytes": 4 * n * v,
      "weight_bytes": 4 * d * v,
  }


_DTYPE_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "pred": 1, "s64": 8}


def _shape_bytes(text: str) -> int:
  """Bytes of the HLO result type(s) in ``text`` (``f32[4096]{0}``, or a
  tuple of them)."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(
          int(x) for x in dims.split(",") if x)
  return total


def collective_bytes(hlo: str) -> dict[str, dict[str, int]]:
  """Per collective kind (all-reduce, all-gather, ...): how many ops the
  optimised HLO runs and the bytes of their results."""
  out: dict[str, dict[str, int]] = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*%?[\w.\-]+ = (.+?) (all-reduce|all-gather|"
                 r"reduce-scatter|all-to-all|collective-permute)(-start)?\(",
                 line)
    if m:
      entry = out.setdefault(m.group(2), {"ops": 0, "bytes": 0})
      entry["ops"] += 1
      entry["bytes"] += _shape_bytes(m.group(1))
  return out


def use_host_devices() -> None:
  """Asks JAX for ``DEVICES`` host CPU devices; too late once its backend
  has started, unless it already has them."""
  try:
    jax.config.update("jax_num_cpu_devices", DEVICES)
  except RuntimeError:
    pass  # the backend is up: it must already have enough devices
  if len(jax.devices()) < DEVICES:
    raise SystemExit(f"the sharded head needs {DEVICES} devices, JAX has "
                     f"{len(jax.devices())}: run python -m bench sharding in "
                     "a fresh process")


def table(result: dict) -> object:
  mib = 2.0**20
  rows = [
      ["XLA temp per device, fused, sharded over the vocabulary",
       f"{result['sharded_fused_temp_bytes_per_device'] / mib:.2f}"],
      ["XLA temp, one device, unfused",
       f"{result['single_device_unfused_temp_bytes'] / mib:.2f}"],
      *([f"{kind} ({entry['ops']} ops), per device per step",
         f"{entry['bytes'] / mib:.3f}"]
        for kind, entry in result["collectives"].items()),
      ["the logits (never sent)", f"{result['logits_bytes'] / mib:.0f}"],
      ["the weight W (never sent)", f"{result['weight_bytes'] / mib:.0f}"],
  ]
  return _plumbing.table(
      f"vocabulary-parallel fused head, N={result['n']} D={result['d']} "
      f"V={result['v']} over {result['devices']} CPU devices "
      f"({result['loop']} loop)", ["", "MiB"], rows,
      caption=f"per-device temp ÷ unfused temp: {result['ratio']:.4f}")


def main(argv: list[str] | None = None) -> dict:
  p = _plumbing.command("sharding", __doc__,
                        quick=f"N=512, D=32, V=2048 (the default: N={N}, "
                        f"D={D}, V={V})")
  p.add_argument("--chunk", type=int, default=None,
                 help="tile size (default: jsoft's own choice)")
  args = p.parse_args(argv)
  use_host_devices()
  result = measure(*(QUICK if args.quick else (N, D, V)), chunk=args.chunk)
  _plumbing.show(table(result))
  _plumbing.write_outputs(args.json, result, [])
  return result


if __name__ == "__main__":  # the old entry point: python -m bench.sharding
  main()
