"""What each training option costs: ``python -m bench options``.

The integer-label CE's ``value_and_grad`` of the mean, at 4096×32000
float32 (``--quick``: 1024×1000), with one option at a time and with all
four (ignore 10% of the targets, label smoothing, z-loss, soft cap), timed
in interleaved rounds against the plain call; XLA temp memory of each.
Then the fused head (``linear_cross_entropy``, ``value_and_grad`` of the
mean w.r.t. ``h`` and ``W`` at N=8192, D=256, V=32768; ``--quick``:
512×32×1024) with its own features: statistics unused and used, a
temperature, and 75% of the tokens ignored.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import jsoft
from bench import _plumbing, report, timing
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
  return {"n": n, "c": c, "rounds": rounds,
          "results": _against_plain(impls, rounds)}


def _against_plain(impls: dict[str, Impl], rounds: int) -> dict[str, Any]:
  """Every option timed against the plain call, which is timed last in the
  first round and listed last."""
  impls["plain"] = impls.pop("plain")
  return timing.measure(impls, rounds, 0.02, 0, baseline="plain")


HEAD_IGNORED = 0.75


def _head_features(y, ignored) -> dict[str, tuple[dict[str, Any], Any]]:
  """name: (keyword arguments, how the loss is read from the output)."""
  loss_only = lambda out: out[0]  # noqa: E731
  with_entropy = lambda out: out[0] + out[1].entropy.mean()  # noqa: E731
  return {
      "plain": ({}, None),
      "stats, unused": (dict(return_stats=True), loss_only),
      "stats, entropy in the loss": (dict(return_stats=True), with_entropy),
      "temperature": (dict(temperature=0.7), None),
      f"{HEAD_IGNORED:.0%} ignored": (dict(ignore_index=IGNORE), None),
  }


def measure_head(quick: bool = False, rounds: int = 7) -> dict[str, Any]:
  n, d, v = (512, 32, 1024) if quick else (8192, 256, 32768)
  rng = np.random.default_rng(1)
  h = jax.numpy.asarray(rng.normal(size=(n, d)).astype(np.float32))
  w = jax.numpy.asarray((rng.normal(size=(d, v)) / np.sqrt(d)).astype(
      np.float32))
  y = jax.numpy.asarray(rng.integers(0, v, size=n).astype(np.int32))
  ignored = jax.numpy.where(jax.numpy.arange(n) % 4 != 0, IGNORE, y)
  impls = {}
  for name, (kw, read) in _head_features(y, ignored).items():
    labels = ignored if "ignore_index" in kw else y

    def loss(h, w, kw=kw, read=read, labels=labels):
      out = jsoft.linear_cross_entropy(h, w, labels, reduction="mean", **kw)
      return out if read is None else read(out)

    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    impls[name] = Impl(name, lambda j=jitted: jax.block_until_ready(
        j(h, w)), jitted, (h, w))
  return {"n": n, "d": d, "v": v, "rounds": rounds,
          "results": _against_plain(impls, rounds)}


def _rows(results: dict[str, Any]) -> list[list[str]]:
  return [[name, f"{r['median_ms']:.1f}",
           "1.00" if name == "plain" else f"{r['ratio_to_plain']:.2f}",
           f"{r['temp_bytes'] / report.MIB:.2f}"]
          for name, r in results.items()]


def tables(result: dict[str, Any]) -> list[Any]:
  """The options' table, and the fused head's when it was measured."""
  caption = (f"median of {result['rounds']} interleaved rounds; × plain: "
             "the median per-round ratio to the plain call")
  out = [_plumbing.table(
      f"training options: integer-label CE, value_and_grad of the mean, "
      f"{result['n']}x{result['c']} float32",
      ["option", "ms", "× plain", "temp MiB"], _rows(result["results"]),
      caption=caption)]
  head = result.get("head")
  if head:
    out.append(_plumbing.table(
        f"fused head: linear_cross_entropy, value_and_grad of the mean, "
        f"N={head['n']} D={head['d']} V={head['v']} float32",
        ["feature", "ms", "× plain", "temp MiB"], _rows(head["results"]),
        caption=caption))
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m bench options``: both measurements, their tables, and
  the JSON on request."""
  args = _plumbing.command("options", __doc__, rounds=7).parse_args(argv)
  result = measure(quick=args.quick, rounds=args.rounds)
  result["head"] = measure_head(quick=args.quick, rounds=args.rounds)
  _plumbing.show(*tables(result))
  _plumbing.write_outputs(
      args.json, {"machine": report.machine(), "options": result}, [])
  return result
