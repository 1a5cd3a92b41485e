"""jsoft across two JAX processes: the multi-controller runtime on CPU.

Starts ``tests/multiprocess_worker.py`` twice, as process 0 and 1 of one
``jax.distributed`` job on this machine (a free local port for the
coordinator, gloo CPU collectives, two CPU devices each), and reads each
one's JSON verdict: the vocabulary-parallel cross-entropies, the fused head
with its statistics and the fused distillation head, on a ("dp", "tp") mesh
whose axes both cross the processes, in both ``shard_map`` modes, against
float64 NumPy. One launch checks everything. Skips, with the worker's
reason, where this JAX's CPU backend cannot run collectives across
processes.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120


def _free_port() -> int:
  """A port no other process holds now (each xdist worker asks its own)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(devices: int = 2) -> list[dict]:
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  # jax < 0.5 reads the device count from XLA's flag only.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.multiprocess_worker", str(port), str(i),
       str(devices)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.communicate()
    pytest.fail(f"the two processes did not finish in {TIMEOUT_S} s")
  verdicts = []
  for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
      pytest.fail(f"process {i} exited with {p.returncode}:\n{err[-3000:]}")
    verdicts.append(json.loads(lines[-1]))
  return verdicts


def test_losses_across_two_processes_match_float64():
  verdicts = _launch()
  skips = [v["skip"] for v in verdicts if "skip" in v]
  if skips:
    pytest.skip(f"this JAX cannot run CPU collectives across processes: "
                f"{skips[0]}")
  for i, v in enumerate(verdicts):
    assert not v["failures"], f"process {i}:\n" + "\n".join(v["failures"])
    # Every loss was run: in both modes, or in the one this JAX has.
    assert len(v["checked"]) == 4 * (2 - len(v["skipped"])), v
