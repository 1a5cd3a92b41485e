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


# ------------------------------------------------------ several processes
#
# --processes K: K JAX processes on this machine, joined by
# jax.distributed (gloo CPU collectives, a free local port), DEVICES // K
# CPU devices each, as K hosts would run. Each process runs and times the
# fused head's value_and_grad step on a ("dp", "tp") mesh, in two layouts:
# the vocabulary split within a process and the tokens across processes
# ("tp within"), and the vocabulary split across the processes ("tp
# across": jsoft's per-token sums and dh then cross them).


def _free_port() -> int:
  import socket  # noqa: PLC0415

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(processes: int, sizes: tuple[int, int, int], rounds: int,
           timeout_s: float = 600) -> list[dict]:
  """Starts the processes and returns each one's report."""
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  port, local = _free_port(), DEVICES // processes
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={local}")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "bench.sharding", "--worker", str(port), str(i),
       str(processes), str(rounds), *map(str, sizes)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  reports = []
  for i, p in enumerate(procs):
    out, err = p.communicate(timeout=timeout_s)
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
      raise SystemExit(f"process {i} failed ({p.returncode}):\n{err[-2000:]}")
    reports.append(json.loads(lines[-1]))
  return reports


def _worker(port: int, process_id: int, processes: int, rounds: int,
            n: int, d: int, v: int) -> dict:
  """One process of ``--processes``: its step time, memory and collectives
  per layout."""
  import time  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  from jax.sharding import Mesh, NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import jsoft  # noqa: PLC0415

  local = DEVICES // processes
  try:
    jax.config.update("jax_num_cpu_devices", local)
  except AttributeError:
    pass  # jax < 0.5: XLA's flag, set by the parent
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=processes, process_id=process_id)
  by_host = np.array(sorted(jax.devices(),
                            key=lambda x: (x.process_index, x.id))
                     ).reshape(processes, local)
  meshes = {"tp within": Mesh(by_host, ("dp", "tp")),
            "tp across": Mesh(by_host.T, ("dp", "tp"))}
  rng = np.random.default_rng(0)
  host = (rng.standard_normal((n, d), dtype=np.float32),
          rng.standard_normal((d, v), dtype=np.float32) / np.sqrt(d),
          rng.integers(0, v, size=n).astype(np.int32))
  specs = (P("dp"), P(None, "tp"), P("dp"))

  def local_loss(h, w, y):
    total = jsoft.linear_cross_entropy(h, w, y, axis_name="tp",
                                       reduction="sum")
    return jax.lax.psum(total, "dp") / n

  out = {"process": process_id, "devices": local, "layouts": {}}
  for name, mesh in meshes.items():
    args = [jax.make_array_from_callback(
        a.shape, NamedSharding(mesh, spec), lambda i, a=a: a[i])
        for a, spec in zip(host, specs, strict=True)]
    step = jax.jit(jax.value_and_grad(jax.shard_map(
        local_loss, mesh=mesh, in_specs=specs, out_specs=P()),
        argnums=(0, 1)))
    compiled = step.lower(*args).compile()
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times.append(time.perf_counter() - start)
    out["layouts"][name] = {
        "step_ms": float(np.median(times)) * 1e3,
        "temp_bytes_per_device":
            compiled.memory_analysis().temp_size_in_bytes,
        "collectives": collective_bytes(compiled.as_text())}
  jax.distributed.shutdown()
  return out


def processes_table(reports: list[dict], sizes: tuple[int, int, int]
                    ) -> object:
  mib = 2.0**20
  rows = []
  for r in reports:
    for layout, m in r["layouts"].items():
      sent = sum(e["bytes"] for e in m["collectives"].values())
      rows.append([f"process {r['process']}", layout,
                   f"{m['step_ms']:.1f}",
                   f"{m['temp_bytes_per_device'] / mib:.2f}",
                   f"{sent / mib:.3f}"])
  n, d, v = sizes
  return _plumbing.table(
      f"fused head value_and_grad over {len(reports)} processes × "
      f"{reports[0]['devices']} CPU devices, N={n} D={d} V={v}",
      ["", "layout", "step ms", "XLA temp MiB / device",
       "all-reduced MiB / device"], rows,
      caption="tp within: the vocabulary split inside a process, tokens "
      "across; tp across: the vocabulary split across the processes; the "
      f"logits would be {4 * n * v / mib:.0f} MiB")


def main(argv: list[str] | None = None) -> dict:
  if argv and argv[0] == "--worker":
    import json  # noqa: PLC0415

    print(json.dumps(_worker(*map(int, argv[1:]))), flush=True)
    return {}
  p = _plumbing.command("sharding", __doc__,
                        quick=f"N=512, D=32, V=2048 (the default: N={N}, "
                        f"D={D}, V={V})")
  p.add_argument("--chunk", type=int, default=None,
                 help="tile size (default: jsoft's own choice)")
  p.add_argument("--processes", type=int, default=1,
                 help="run the step in this many JAX processes (gloo CPU "
                 "collectives), as on that many hosts: per-process time, "
                 "memory and collectives")
  p.add_argument("--rounds", type=int, default=5,
                 help="timed steps per process (with --processes)")
  args = p.parse_args(argv)
  if args.processes > 1:
    sizes = QUICK if args.quick else (N, D, V)
    reports = launch(args.processes, sizes, args.rounds)
    _plumbing.show(processes_table(reports, sizes))
    result = {"processes": args.processes, "n": sizes[0], "d": sizes[1],
              "v": sizes[2], "reports": reports}
    _plumbing.write_outputs(args.json, result, [])
    return result
  use_host_devices()
  result = measure(*(QUICK if args.quick else (N, D, V)), chunk=args.chunk)
  _plumbing.show(table(result))
  _plumbing.write_outputs(args.json, result, [])
  return result


if __name__ == "__main__":  # python -m bench.sharding (and its workers)
  import sys

  main(sys.argv[1:])
