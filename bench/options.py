"""``python -m bench options``: what options cost, ignored tokens save.

Three sections (``--only NAME``, repeatable, runs some of them):

* ``options``: the integer-label CE's ``value_and_grad`` of the mean, at
  4096×32000 float32 (``--quick``: 1024×1000), with one option at a time
  and with all four (ignore 10% of the targets, label smoothing, z-loss,
  soft cap), timed in interleaved rounds against the plain call; XLA temp
  memory of each.
* ``head``: the fused head (``linear_cross_entropy``, ``value_and_grad`` of
  the mean w.r.t. ``h`` and ``W`` at N=8192, D=256, V=32768; ``--quick``:
  512×32×1024) with its own features: statistics unused and used, a
  temperature, and 75% of the tokens ignored.
* ``sweep``: what ignored tokens save. ``value_and_grad`` of the mean (the
  student's ``h`` and ``W``) of ``linear_cross_entropy`` over tiles of
  tokens and of classes, and of ``linear_distillation_loss``, all with
  ``ignore_index``, at kept fractions ``k`` of the tokens (the first
  ``k·N``, and a random ``k·N``), at N=8192, D=256, V=32768 and N=32768,
  D=128, V=8192 (``--quick``: 512×32×1024 and 1024×16×256). Each time is
  a ratio to the same call with no token ignored (``k = 1``); a cell meets
  the target at a ratio of at most ``k + 0.10``. Also per head and shape:
  the call with ``ignore_index`` and nothing ignored over the same call
  without ``ignore_index`` (target: at most 1.02), timed again as a pair
  alone (:data:`OVERHEAD_ROUNDS` rounds). Labels are data: one
  compiled step per head, shape and ``ignore_index`` serves every ``k``.
  ``--plot PATH`` draws the ratios against ``k``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

import jsoft
from bench import _plumbing, report, timing
from bench.cases import Impl, head_inputs

SECTIONS = ("options", "head", "sweep")

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
  h, w, y = map(jax.numpy.asarray,
                head_inputs(np.random.default_rng(1), n, d, v))
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
  """The table of each section that was measured."""
  rounds = result.get("rounds") or result.get("head", {}).get("rounds")
  caption = (f"median of {rounds} interleaved rounds; × plain: "
             "the median per-round ratio to the plain call")
  out = []
  if "results" in result:
    out.append(_plumbing.table(
        f"training options: integer-label CE, value_and_grad of the mean, "
        f"{result['n']}x{result['c']} float32",
        ["option", "ms", "× plain", "temp MiB"], _rows(result["results"]),
        caption=caption))
  head = result.get("head")
  if head:
    out.append(_plumbing.table(
        f"fused head: linear_cross_entropy, value_and_grad of the mean, "
        f"N={head['n']} D={head['d']} V={head['v']} float32",
        ["feature", "ms", "× plain", "temp MiB"], _rows(head["results"]),
        caption=caption))
  if result.get("sweep"):
    out += sweep_tables(result["sweep"])
  return out


# ------------------------------------------------------------ the sweep

KEPT = (0.05, 0.12, 0.26, 0.5, 0.6, 0.9, 1.0)
SWEEP_SHAPES = ((8192, 256, 32768), (32768, 128, 8192))
SWEEP_QUICK = ((512, 32, 1024), (1024, 16, 256))
# Which tokens are kept: the first k·N, or k·N of them at random.
PATTERNS = ("first", "random")
SLACK = 0.10  # a cell meets the target at a time ratio of k + SLACK or less
OVERHEAD = 1.02  # ignore_index with nothing ignored, over no ignore_index
# The overhead pair is timed again on its own, in this many interleaved
# rounds: a 2% target is finer than the spread of a handful of rounds of
# multi-second calls on a shared machine (measured on one cell, 5 rounds:
# medians from 0.97 to 1.07; 11 rounds: 0.98; 9 rounds in the sweep read
# 1.05 where the same pair alone in 15 rounds read 0.97, per-round ratios
# spanning 0.83-1.26).
OVERHEAD_ROUNDS = 15
MIN_SAMPLE_S = 0.02


class SweepHead(NamedTuple):
  """One head of the sweep: its name, the loop it tiles over, and its mean
  loss ``loss(h, w, teacher, labels, **kw)`` (``teacher``: the teacher's
  ``(h, W)``, unused by a cross-entropy head)."""

  name: str
  loop: str
  loss: Callable[..., jax.Array]

  @property
  def label(self) -> str:
    return f"{self.name}, {self.loop}"


def _cross_entropy(tile_by: str) -> Callable[..., jax.Array]:
  def loss(h, w, teacher, labels, **kw):
    del teacher
    return jsoft.linear_cross_entropy(h, w, labels, reduction="mean",
                                      tile_by=tile_by, **kw)
  return loss


def _distillation(h, w, teacher, labels, **kw):
  return jsoft.linear_distillation_loss(h, w, *teacher, labels=labels,
                                        reduction="mean", **kw)


SWEEP_HEADS = (
    SweepHead("linear_cross_entropy", "tokens", _cross_entropy("tokens")),
    SweepHead("linear_cross_entropy", "classes", _cross_entropy("classes")),
    SweepHead("linear_distillation_loss", "tokens", _distillation),
)


def kept_labels(y: np.ndarray, k: float, pattern: str,
                rng: np.random.Generator) -> np.ndarray:
  """``y`` with all but ``round(k·N)`` tokens set to ``IGNORE``: the
  first ones (``pattern="first"``) or a random subset (``"random"``)."""
  n = len(y)
  keep = np.zeros(n, bool)
  m = round(k * n)
  if pattern == "first":
    keep[:m] = True
  else:
    keep[rng.choice(n, size=m, replace=False)] = True
  return np.where(keep, y, IGNORE).astype(np.int32)


def _sweep_shape(head: SweepHead, inputs, all_kept, labels, rounds: int
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """One head at one shape: the rows (one per pattern) and the overhead
  of ``ignore_index`` with nothing ignored. ``all_kept``: the labels with
  none ignored; ``labels``: those of each ``(k, pattern)``, ``k < 1``."""
  h, w, teacher = inputs

  def step(**kw):
    return jax.jit(jax.value_and_grad(
        lambda h, w, t, y: head.loss(h, w, t, y, **kw), argnums=(0, 1)))

  with_ignore, without = step(ignore_index=IGNORE), step()

  def call(jitted, y):
    return lambda: jax.block_until_ready(jitted(h, w, teacher, y))

  # k = 1: no token ignored, ignore_index passed; the baseline of the rows.
  calls = {"all kept": call(with_ignore, all_kept),
           "no ignore_index": call(without, all_kept)}
  for (k, pattern), y in labels.items():
    calls[f"{pattern}, k={k:g}"] = call(with_ignore, y)
  times, _ = timing.interleaved(calls, rounds, MIN_SAMPLE_S)
  base = times["all kept"]
  pair, _ = timing.interleaved(
      {k: calls[k] for k in ("all kept", "no ignore_index")},
      max(rounds, OVERHEAD_ROUNDS), MIN_SAMPLE_S)
  rows = []
  for pattern in PATTERNS:
    ratios = {f"{k:g}": 1.0 if k == 1.0 else timing.median_ratio(
        times[f"{pattern}, k={k:g}"], base) for k in KEPT}
    rows.append({"head": head.name, "loop": head.loop, "kept": pattern,
                 "ratios": ratios,
                 "all_kept_ms": float(np.median(base) * 1e3)})
  overhead = {"head": head.name, "loop": head.loop,
              "with_ms": float(np.median(pair["all kept"]) * 1e3),
              "without_ms": float(np.median(pair["no ignore_index"]) * 1e3),
              "ratio": timing.median_ratio(pair["all kept"],
                                           pair["no ignore_index"]),
              "rounds": len(pair["all kept"])}
  return rows, overhead


def measure_sweep(quick: bool = False, rounds: int = 7) -> dict[str, Any]:
  """Every head of :data:`SWEEP_HEADS` at every kept fraction of
  :data:`KEPT`, both patterns, both shapes; see the module docstring."""
  shapes = SWEEP_QUICK if quick else SWEEP_SHAPES
  out: dict[str, Any] = {"kept": list(KEPT), "patterns": list(PATTERNS),
                         "slack": SLACK, "overhead_target": OVERHEAD,
                         "rounds": rounds, "shapes": [], "rows": [],
                         "overhead": []}
  for n, d, v in shapes:
    rng = np.random.default_rng(3)
    h, w, y = head_inputs(rng, n, d, v)
    teacher = tuple(map(jax.numpy.asarray,
                        head_inputs(rng, n, d, v, labels=False)))
    labels = {(k, pattern): jax.numpy.asarray(
        kept_labels(y, k, pattern, rng))
              for k in KEPT if k < 1 for pattern in PATTERNS}
    inputs = (jax.numpy.asarray(h), jax.numpy.asarray(w), teacher)
    shape = {"n": n, "d": d, "v": v}
    out["shapes"].append(shape)
    for head in _plumbing.tracked(SWEEP_HEADS, lambda s, n=n, d=d, v=v:
                                  f"{s.label} {n}x{d}x{v}"):
      rows, overhead = _sweep_shape(head, inputs, jax.numpy.asarray(y),
                                    labels, rounds)
      out["rows"] += [{**shape, **r} for r in rows]
      out["overhead"].append({**shape, **overhead})
  return out


def _dims(r: dict[str, Any]) -> str:
  return f"{r['n']}x{r['d']}x{r['v']}"


def sweep_tables(sweep: dict[str, Any]) -> list[Any]:
  """The time ratio per kept fraction (a star over ``k + SLACK``), and the
  cost of ``ignore_index`` with nothing ignored (a star over
  ``OVERHEAD``)."""
  rows: list[list[str] | None] = []
  last = None
  for r in sweep["rows"]:
    if _dims(r) != last:
      rows.append(None)
      last = _dims(r)
    cells = [f"{x:.2f}" + ("*" if x > float(k) + sweep["slack"] else "")
             for k, x in r["ratios"].items()]
    rows.append([f"{r['head']}, {r['loop']}", _dims(r), r["kept"], *cells])
  ratios = _plumbing.table(
      "kept-fraction sweep: value_and_grad of the mean with ignore_index, "
      "time ÷ the same call with every token kept, float32",
      ["head, loop", "NxDxV", "kept tokens",
       *(f"k={k:g}" for k in sweep["kept"])], rows, left=3,
      caption=(f"median of {sweep['rounds']} interleaved rounds of the "
               "per-round ratio; kept tokens: the first k·N or a random "
               f"k·N; *: over the target k + {sweep['slack']:.2f}"))
  rows, last = [], None
  for r in sweep["overhead"]:
    if _dims(r) != last:
      rows.append(None)
      last = _dims(r)
    flag = "*" if r["ratio"] > sweep["overhead_target"] else ""
    rows.append([f"{r['head']}, {r['loop']}", _dims(r),
                 f"{r['without_ms']:.1f}", f"{r['with_ms']:.1f}",
                 f"{r['ratio']:.3f}{flag}"])
  overhead = _plumbing.table(
      "ignore_index set, nothing ignored ÷ the same call without "
      "ignore_index",
      ["head, loop", "NxDxV", "ms without", "ms with", "with ÷ without"],
      rows, left=2,
      caption=(f"median per-round ratio over "
               f"{sweep['overhead'][0].get('rounds', sweep['rounds'])} "
               "interleaved rounds of the pair alone; *: over the target "
               f"{sweep['overhead_target']:.2f}"))
  return [ratios, overhead]


def write_sweep_plot(path: str, sweep: dict[str, Any],
                     info: dict[str, Any]) -> None:
  """One panel per shape: time ratio against the kept fraction, a line per
  head, loop and pattern, with the ideal ``y = k`` and the target band up
  to ``k + SLACK``. Raises :class:`bench._plumbing.Missing` without
  matplotlib."""
  plt = _plumbing.pyplot()
  shapes = sweep["shapes"]
  fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.6),
                           sharey=True, layout="constrained", squeeze=False)
  ks = np.asarray(sweep["kept"])
  heads = list(dict.fromkeys((r["head"], r["loop"]) for r in sweep["rows"]))
  colors = {hd: f"C{i}" for i, hd in enumerate(heads)}
  styles = {"first": ("-", "o"), "random": ("--", "s")}
  top = max([1.2, *(x for r in sweep["rows"] for x in r["ratios"].values())])
  for ax, shape in zip(axes[0], shapes, strict=True):
    ax.fill_between(ks, ks, ks + sweep["slack"], color="tab:green",
                    alpha=0.12, label=f"target: up to k + {sweep['slack']:g}")
    ax.plot(ks, ks, color="black", lw=1, label="ideal: y = k")
    for r in sweep["rows"]:
      if _dims(r) != _dims(shape):
        continue
      line, marker = styles[r["kept"]]
      ax.plot(ks, [r["ratios"][f"{k:g}"] for k in ks], line, marker=marker,
              ms=4, color=colors[(r["head"], r["loop"])],
              label=f"{r['head']}, {r['loop']}; {r['kept']} k·N kept")
    ax.set_xlim(0, 1.03)
    ax.set_ylim(0, 1.05 * top)
    ax.set_xlabel("kept fraction k of the tokens")
    ax.set_title(f"N={shape['n']} D={shape['d']} V={shape['v']}, float32",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
  axes[0][0].set_ylabel("time ÷ time with every token kept")
  handles, names = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, names, loc="outside lower center", ncol=3, fontsize=8,
             frameon=False)
  fig.suptitle(f"what ignored tokens save, value_and_grad of the mean — "
               f"{info['cpu']}, {info['cores']} cores, {info['backend']}",
               fontsize=10)
  _plumbing.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m bench options``: the sections asked for (all three by
  default), their tables, and the JSON and the sweep's chart on
  request."""
  p = _plumbing.command("options", __doc__, rounds=7, plot=True)
  p.add_argument("--only", action="append", choices=SECTIONS,
                 help="run only this section (repeatable; default: all)")
  args = p.parse_args(argv)
  only = args.only or SECTIONS
  info = report.machine()  # before measuring: its load is the start's
  result: dict[str, Any] = {}
  if "options" in only:
    result.update(measure(quick=args.quick, rounds=args.rounds))
  if "head" in only:
    result["head"] = measure_head(quick=args.quick, rounds=args.rounds)
  if "sweep" in only:
    result["sweep"] = measure_sweep(quick=args.quick, rounds=args.rounds)
  _plumbing.show(*tables(result))
  sweep = result.get("sweep")
  _plumbing.write_outputs(
      args.json, {"machine": info, "options": result},
      [(args.plot if sweep else None,
        lambda path: write_sweep_plot(path, sweep, info))])
  return result
