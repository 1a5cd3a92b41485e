"""One of the two JAX processes that ``tests/test_multiprocess.py`` starts.

Run as ``python -m tests.multiprocess_worker PORT PROCESS_ID DEVICES``: it
joins the other process through ``jax.distributed.initialize`` (gloo CPU
collectives), builds a 2×2 ("dp", "tp") mesh over the two processes' CPU
devices in which *both* axes cross the processes, and checks, in both
``shard_map`` modes, the vocabulary-parallel cross-entropies, the fused head
with its statistics and the fused distillation head: the values and the
gradients against float64 NumPy, written from the formulas below. Both
processes build the same global inputs from one seed; each compares the
shards it holds.

It prints one JSON line, ``{"skip": why}`` when this JAX cannot run
collectives across processes on CPU (a psum across them is tried first), or
``{"checked": [...], "failures": [...], "skipped": [...]}``.

Gradients, per row of logits ``x`` with ``p = softmax(x)`` (the textbook
ones, not JAX's autodiff): cross-entropy against a target ``t`` gives
``p·Σt − t`` (and ``−log p`` for ``t``); ``log p_y`` gives ``onehot(y) − p``;
``lse`` gives ``p``; the entropy ``H`` gives ``−p·(log p + H)``; the forward
KL at temperature ``T`` gives ``(softmax(x/T) − softmax(x_teacher/T))/T``.
A linear head ``x = h W + b`` turns ``G = ∂L/∂x`` into ``G Wᵀ``, ``hᵀ G`` and
``Σ_rows G``.
"""

from __future__ import annotations

import json
import sys
import traceback

import numpy as np
import scipy.special as sp

ROWS, C, D, IGNORE = 8, 16, 3, -100
TOL = dict(rtol=1e-10, atol=1e-12)


def _start(port: int, process_id: int, devices: int) -> None:
  """Joins the other process; raises where this JAX cannot."""
  import jax

  try:
    jax.config.update("jax_num_cpu_devices", devices)
  except AttributeError:  # jax < 0.5: XLA's flag, set by the parent
    pass
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=process_id,
                             initialization_timeout=60)


def _mesh():
  """A 2×2 ("dp", "tp") mesh whose every row and column holds one device
  of each process: every collective of either axis crosses them."""
  import jax
  from jax.sharding import Mesh

  mine = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
  if min(map(len, mine)) < 2:
    raise RuntimeError(f"needs 2 CPU devices per process, has "
                       f"{[len(m) for m in mine]}")
  grid = np.array([[mine[0][0], mine[1][0]], [mine[1][1], mine[0][1]]])
  return Mesh(grid, ("dp", "tp"))


def _put(mesh, value, spec):
  import jax
  from jax.sharding import NamedSharding

  value = np.asarray(value)
  return jax.make_array_from_callback(
      value.shape, NamedSharding(mesh, spec), lambda index: value[index])


def _probe(mesh) -> None:
  """A psum over both axes: raises where the CPU backend cannot run
  collectives across processes."""
  import jax
  from jax.sharding import PartitionSpec as P

  from tests import helpers

  f = jax.jit(helpers.shard_map(
      lambda x: jax.lax.psum(x, ("dp", "tp")), mesh=mesh,
      in_specs=P("dp", "tp"), out_specs=P(), check_vma=False))
  got = np.asarray(f(_put(mesh, np.arange(4.0).reshape(2, 2),
                          P("dp", "tp"))).addressable_data(0))
  if got.item() != 6.0:
    raise RuntimeError(f"a psum across the processes gave {got}, not 6")


# ------------------------------------------------------------ references


def _softmax_rows(x):
  return sp.softmax(x, axis=-1), sp.log_softmax(x, axis=-1)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, C, size=ROWS)
  y[[1, 6]] = IGNORE
  return dict(
      x=rng.normal(scale=2.0, size=(ROWS, C)),
      t=rng.dirichlet(np.ones(C), size=ROWS),
      y=y, h=rng.normal(size=(ROWS, D)), w=rng.normal(size=(D, C)),
      b=rng.normal(size=C), g=rng.normal(size=(ROWS, D + 1)),
      u=rng.normal(size=(D + 1, C)),
      ct=rng.uniform(0.5, 1.5, size=(4, ROWS)))


def _int_target(y, smoothing):
  from tests import helpers

  return helpers.ce_int_target(y, C, ignore_index=IGNORE,
                               label_smoothing=smoothing)


def _ce(x, t):
  """``−Σ t log p`` per row and its gradients for ``x`` and ``t``."""
  p, logp = _softmax_rows(x)
  loss = -np.sum(t * logp, axis=-1)
  return loss, p * t.sum(-1, keepdims=True) - t, -logp


def ref_int(a):
  loss, dx, _ = _ce(a["x"], _int_target(a["y"], 0.1))
  ct = a["ct"][0]
  return dict(loss=loss, value=np.sum(ct * loss), dx=ct[:, None] * dx)


def ref_prob(a):
  loss, dx, dt = _ce(a["x"], a["t"])
  ct = a["ct"][0]
  return dict(loss=loss, value=np.sum(ct * loss), dx=ct[:, None] * dx,
              dt=ct[:, None] * dt)


def _head_grads(a, g):
  return dict(dh=g @ a["w"].T, dw=a["h"].T @ g, db=g.sum(0))


def ref_head(a):
  """The fused head's loss and statistics; the value is
  ``Σ c₀·loss + c₁·logprob + c₂·lse + c₃·entropy``."""
  x, y = a["h"] @ a["w"] + a["b"], a["y"]
  kept = y != IGNORE
  loss, dloss, _ = _ce(x, _int_target(y, 0.1))
  p, logp = _softmax_rows(x)
  onehot = np.arange(C) == np.where(kept, y, 0)[:, None]
  stats = dict(
      logprob=np.where(kept, np.sum(onehot * logp, -1), 0),
      logsumexp=np.where(kept, sp.logsumexp(x, axis=-1), 0),
      entropy=np.where(kept, -np.sum(p * logp, -1), 0),
      correct=kept & (np.argmax(x, -1) == y))
  c = a["ct"] * kept
  entropy = -np.sum(p * logp, -1, keepdims=True)
  g = (c[0][:, None] * dloss + c[1][:, None] * (onehot - p)
       + c[2][:, None] * p - c[3][:, None] * p * (logp + entropy))
  value = (np.sum(c[0] * loss) + np.sum(c[1] * stats["logprob"])
           + np.sum(c[2] * stats["logsumexp"])
           + np.sum(c[3] * stats["entropy"]))
  return dict(loss=loss, value=value, **stats, **_head_grads(a, g))


HARD, TEMP = 0.3, 1.5


def ref_distill(a):
  """``α·CE(s, y) + (1 − α)·KL(softmax(t/T) ‖ softmax(s/T))`` per kept
  token, with student logits ``s = h W + b`` and teacher ``t = g u``."""
  s, t, y = a["h"] @ a["w"] + a["b"], a["g"] @ a["u"], a["y"]
  kept = y != IGNORE
  ce, dce, _ = _ce(s, _int_target(y, 0.0))
  ps, lps = _softmax_rows(s / TEMP)
  pt, lpt = _softmax_rows(t / TEMP)
  kl = np.sum(pt * (lpt - lps), -1)
  loss = np.where(kept, HARD * ce + (1 - HARD) * kl, 0)
  c = a["ct"][0] * kept
  g = c[:, None] * (HARD * dce + (1 - HARD) * (ps - pt) / TEMP)
  return dict(loss=loss, value=np.sum(c * loss), **_head_grads(a, g))


# ------------------------------------------------------------ under test


def _checks(mesh, vma):
  """name -> (jitted function of the placed inputs, its inputs' names,
  reference); each function gives ``(value, grads), per_row``."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jsoft
  from tests import helpers

  def sharded(local, names, out_rows):
    specs = dict(x=P("dp", "tp"), t=P("dp", "tp"), y=P("dp"), h=P("dp"),
                 w=P(None, "tp"), b=P("tp"), g=P("dp"), u=P(None, "tp"),
                 ct=P(None, "dp"))

    def scalar_and_rows(*arrays):
      value, rows = local(*arrays)
      return jax.lax.psum(value, "dp"), rows

    return helpers.shard_map(
        scalar_and_rows, mesh=mesh, in_specs=tuple(specs[n] for n in names),
        out_specs=(P(), jax.tree.map(lambda _: P("dp"), out_rows)),
        check_vma=vma)

  def vg(f, diff):
    return jax.jit(jax.value_and_grad(f, argnums=diff, has_aux=True))

  def int_local(x, y, ct):
    loss = jsoft.softmax_cross_entropy_with_integer_labels(
        x, y, ignore_index=IGNORE, label_smoothing=0.1, axis_name="tp")
    return jnp.sum(ct[0] * loss), dict(loss=loss)

  def prob_local(x, t, ct):
    loss = jsoft.softmax_cross_entropy(x, t, axis_name="tp")
    return jnp.sum(ct[0] * loss), dict(loss=loss)

  def head_local(h, w, b, y, ct):
    loss, st = jsoft.linear_cross_entropy(
        h, w, y, bias=b, ignore_index=IGNORE, label_smoothing=0.1,
        chunk_size=3, axis_name="tp", return_stats=True)
    value = (jnp.sum(ct[0] * loss) + jnp.sum(ct[1] * st.logprob)
             + jnp.sum(ct[2] * st.logsumexp) + jnp.sum(ct[3] * st.entropy))
    return value, dict(loss=loss, **st._asdict())

  def distill_local(h, w, b, g, u, y, ct):
    loss = jsoft.linear_distillation_loss(
        h, w, g, u, student_bias=b, labels=y, ignore_index=IGNORE,
        hard_weight=HARD, temperature=TEMP, chunk_size=3, axis_name="tp")
    return jnp.sum(ct[0] * loss), dict(loss=loss)

  rows = dict(loss=0)
  stats = dict(loss=0, logprob=0, logsumexp=0, entropy=0, correct=0)
  return {
      "int_ce": (vg(sharded(int_local, ("x", "y", "ct"), rows), 0),
                 ("x", "y", "ct"), ("dx",), ref_int),
      "prob_ce": (vg(sharded(prob_local, ("x", "t", "ct"), rows), (0, 1)),
                  ("x", "t", "ct"), ("dx", "dt"), ref_prob),
      "linear_cross_entropy": (
          vg(sharded(head_local, ("h", "w", "b", "y", "ct"), stats),
             (0, 1, 2)),
          ("h", "w", "b", "y", "ct"), ("dh", "dw", "db"), ref_head),
      "linear_distillation_loss": (
          vg(sharded(distill_local, ("h", "w", "b", "g", "u", "y", "ct"),
                     rows), (0, 1, 2)),
          ("h", "w", "b", "g", "u", "y", "ct"), ("dh", "dw", "db"),
          ref_distill),
  }


def _compare(name, got, want, failures):
  """Each shard this process holds against the reference's slice."""
  for shard in got.addressable_shards:
    g, w = np.asarray(shard.data), np.asarray(want)[shard.index]
    try:
      if w.dtype == bool:
        np.testing.assert_array_equal(g, w)
      else:
        np.testing.assert_allclose(g, w, **TOL)
    except AssertionError as e:
      failures.append(f"{name} {shard.index}: {str(e)[:800]}")


def run(mesh):
  from jax.sharding import PartitionSpec as P

  from jsoft import _compat

  specs = dict(x=P("dp", "tp"), t=P("dp", "tp"), y=P("dp"), h=P("dp"),
               w=P(None, "tp"), b=P("tp"), g=P("dp"), u=P(None, "tp"),
               ct=P(None, "dp"))
  data = _data()
  placed = {k: _put(mesh, v, specs[k]) for k, v in data.items()}
  checked, failures, skipped = [], [], []
  for vma in (True, False):
    if vma and _compat.JAX_VERSION < (0, 7):
      skipped.append("check_vma=True needs jax >= 0.7")
      continue
    for name, (f, names, grads, ref) in _checks(mesh, vma).items():
      label = f"{name}[check_vma={vma}]"
      want = ref(data)
      try:
        (value, per_row), got_grads = f(*(placed[n] for n in names))
      except Exception:  # noqa: BLE001 - reported, and the test fails
        failures.append(f"{label}: {traceback.format_exc(limit=3)}")
        continue
      _compare(f"{label} value", value, want["value"], failures)
      got_grads = got_grads if isinstance(got_grads, tuple) else (got_grads,)
      for g, n in zip(got_grads, grads, strict=True):
        _compare(f"{label} {n}", g, want[n], failures)
      for n, v in per_row.items():
        _compare(f"{label} {n}", v, want[n], failures)
      checked.append(label)
  return dict(checked=checked, failures=failures, skipped=skipped)


def main(argv):
  import jax

  port, process_id, devices = map(int, argv)
  try:
    _start(port, process_id, devices)
    mesh = _mesh()
    _probe(mesh)
  except Exception as e:  # noqa: BLE001 - this JAX cannot: the test skips
    print(json.dumps(dict(skip=f"{type(e).__name__}: {e}"[:500])), flush=True)
    return 0
  print(json.dumps(run(mesh)), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
