"""``python -m bench lm``: the fused head in a language model (Flax NNX).

A character-level transformer LM (:class:`bench.flax_models.CharLM`) on
text that ships with the project — the README and the docstrings of
``jsoft/*.py`` — trained twice from the same initialisation on the same
batches, one step of each in turn:

* **jsoft**: the head is ``jsoft.linear_cross_entropy(h, W, y,
  z_loss=1e-4, ignore_index=PAD, reduction="mean", return_stats=True)``,
  with per-token accuracy and entropy read from the returned
  :class:`jsoft.TokenStats`; the ``[B, T, V]`` logits are never formed;
* **optax**: the same model's logits ``h @ W``, materialised, into
  ``optax.softmax_cross_entropy_with_integer_labels``, with the same
  masking and the z-loss ``λ·logsumexp²`` written out, and accuracy and
  entropy computed from the logits.

Each line of the text is one sequence (lines longer than the context are
cut into pieces), framed by newlines and padded at the end to the context
with ``PAD``, whose targets the losses ignore. Reports the loss curves, the
median step time of each (the steps interleave, so machine noise hits both
alike), XLA's temp bytes of each jitted training step, and the held-out
loss and accuracy.
"""

from __future__ import annotations

import ast
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsoft
from bench import _plumbing, _train

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAD = 0  # token 0: padding, never a target the losses count
Z_LOSS = 1e-4
HELD_OUT = 0.1  # share of the sequences kept out of training

QUICK = {"context": 64, "d_model": 64, "heads": 4, "layers": 1, "batch": 16,
         "steps": 80, "lr": 1e-2, "warmup": 10, "eval_every": 40,
         "wide_vocabs": (), "wide_timed": 0}
FULL = {"context": 96, "d_model": 128, "heads": 4, "layers": 2, "batch": 32,
        "steps": 500, "lr": 3e-3, "warmup": 50, "eval_every": 25,
        "wide_vocabs": (4096, 32768), "wide_timed": 5}


# -------------------------------------------------------------------- data


def corpus(root: pathlib.Path = ROOT) -> str:
  """The README, then every docstring (module, class, function) of
  ``jsoft/*.py`` in file order."""
  parts = [(root / "README.md").read_text(encoding="utf-8")]
  for path in sorted((root / "jsoft").glob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
        doc = ast.get_docstring(node)
        if doc:
          parts.append(doc)
  return "\n\n".join(parts)


def vocabulary(text: str) -> list[str]:
  """``PAD`` (id 0), then the text's characters in code-point order."""
  return ["<pad>", *sorted(set(text))]


def sequences(text: str, vocab: list[str],
              context: int) -> tuple[np.ndarray, np.ndarray]:
  """Inputs and targets ``[S, context]`` (int32), one row per non-empty
  line (or piece of at most ``context - 1`` characters of a longer line):
  inputs ``"\\n" + line``, targets ``line + "\\n"``, both padded with
  ``PAD`` at the end."""
  ids = {c: i for i, c in enumerate(vocab)}
  rows = []
  for line in text.split("\n"):
    line = line.rstrip()
    for start in range(0, len(line), context - 1):
      rows.append([ids["\n"], *(ids[c] for c in line[start:start
                                                      + context - 1]),
                   ids["\n"]])
  inputs = np.full((len(rows), context), PAD, np.int32)
  targets = np.full((len(rows), context), PAD, np.int32)
  for r, row in enumerate(rows):
    inputs[r, :len(row) - 1] = row[:-1]
    targets[r, :len(row) - 1] = row[1:]
  return inputs, targets


def split(inputs, targets, seed: int = 0):
  """A random ``1 - HELD_OUT`` / ``HELD_OUT`` split of the rows."""
  order = np.random.default_rng(seed).permutation(len(inputs))
  cut = int(round((1 - HELD_OUT) * len(inputs)))
  train, test = order[:cut], order[cut:]
  return (inputs[train], targets[train]), (inputs[test], targets[test])


def batches(rows: int, batch: int, steps: int, seed: int = 1) -> np.ndarray:
  """``[steps, batch]`` row indices: epochs of a fixed random order."""
  rng = np.random.default_rng(seed)
  per_epoch = rows // batch
  epochs = -(-steps // per_epoch)
  order = np.concatenate([rng.permutation(rows)[:per_epoch * batch]
                          for _ in range(epochs)])
  return order.reshape(-1, batch)[:steps]


def unigram_entropy(targets: np.ndarray) -> float:
  """Entropy (nats) of the targets' character frequencies, ``PAD`` left
  out: the loss of the best model that ignores the context."""
  _, counts = np.unique(targets[targets != PAD], return_counts=True)
  p = counts / counts.sum()
  return float(-np.sum(p * np.log(p)))


# ------------------------------------------------------------------ losses


def _share(kept, values):
  """The mean of ``values`` over the kept tokens, in float32."""
  n = jnp.maximum(jnp.sum(kept), 1).astype(jnp.float32)
  return jnp.sum(jnp.where(kept, values, 0)).astype(jnp.float32) / n


def jsoft_loss(model, x, y):
  """The fused head: loss and statistics without the ``[B, T, V]``
  logits."""
  loss, stats = jsoft.linear_cross_entropy(
      model.features(x), model.head.kernel[...], y, z_loss=Z_LOSS,
      ignore_index=PAD, reduction="mean", return_stats=True)
  kept = y != PAD
  return loss, {"accuracy": _share(kept, stats.correct),
                "entropy": _share(kept, stats.entropy)}


def optax_loss(model, x, y):
  """The materialised logits, optax's loss, the z-loss and the same
  mask written out."""
  import optax  # noqa: PLC0415
  logits = model(x)
  kept = y != PAD
  lse = jax.nn.logsumexp(logits, axis=-1)
  per_token = (optax.softmax_cross_entropy_with_integer_labels(logits, y)
               + Z_LOSS * lse**2)
  logp = jax.nn.log_softmax(logits)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return _share(kept, per_token), {
      "accuracy": _share(kept, jnp.argmax(logits, -1) == y),
      "entropy": _share(kept, entropy)}


LOSSES = {"jsoft": jsoft_loss, "optax": optax_loss}


def _evaluate(model, x, y):
  """Held-out mean CE (no z-loss) and accuracy, from the logits."""
  logits = model(x)
  kept = y != PAD
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None],
                             axis=-1)[..., 0]
  return (_share(kept, -logp),
          _share(kept, jnp.argmax(logits, -1) == y))


# ---------------------------------------------------------------- training


def _compiled(cfg, vocab_size: int, tx, name: str, x, y):
  """The LM's training step with ``name``'s loss, compiled for batches
  like ``x, y``; its graph, its initial state (the same for every
  ``name``), and the compile time, XLA temp bytes and parameter count."""
  from flax import nnx  # noqa: PLC0415

  from bench import flax_models  # noqa: PLC0415
  model = flax_models.CharLM(vocab_size, cfg["context"], cfg["d_model"],
                             cfg["heads"], cfg["layers"], rngs=nnx.Rngs(0))
  params = flax_models.count_params(model)
  step, graphdef, state = flax_models.train_step(model, tx, LOSSES[name],
                                                 has_aux=True)
  start = time.perf_counter()
  compiled = step.lower(state, x, y).compile()
  info = {"compile_s": time.perf_counter() - start,
          "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
          "params": params}
  return compiled, graphdef, state, info


def wide_heads(cfg, tx, x, y, vocabs, timed: int) -> list[dict[str, Any]]:
  """The same step with the head (and embedding) widened to each of
  ``vocabs`` classes, the extra ones never a target: XLA temp bytes, and
  the median of ``timed`` steps of each loss in turn after one warm-up."""
  rows = []
  for vocab in vocabs:
    steps, states, row = {}, {}, {"vocab": vocab}
    for name in LOSSES:
      steps[name], _, states[name], info = _compiled(cfg, vocab, tx, name,
                                                     x, y)
      row[name] = {"temp_bytes": info["temp_bytes"], "step_s": []}
    for i in range(timed + 1):
      for name in LOSSES if i % 2 == 0 else list(LOSSES)[::-1]:
        start = time.perf_counter()
        states[name], loss, _ = steps[name](states[name], x, y)
        jax.block_until_ready(loss)
        if i:
          row[name]["step_s"].append(time.perf_counter() - start)
    for name in LOSSES:
      row[name]["step_ms"] = float(
          np.median(row[name].pop("step_s")) * 1e3)
    rows.append(row)
  return rows


def run(quick: bool = False, root: pathlib.Path = ROOT) -> dict[str, Any]:
  """Train both variants, one step of each in turn; see the module
  docstring for what is reported."""
  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  cfg = QUICK if quick else FULL
  text = corpus(root)
  vocab = vocabulary(text)
  inputs, targets = sequences(text, vocab, cfg["context"])
  (x_train, y_train), (x_test, y_test) = split(inputs, targets)
  order = batches(len(x_train), cfg["batch"], cfg["steps"])
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg["lr"], cfg["warmup"], cfg["steps"], cfg["lr"] / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

  out: dict[str, Any] = {
      "config": {**cfg, "z_loss": Z_LOSS, "held_out": HELD_OUT},
      "corpus_chars": len(text), "vocab": len(vocab),
      "sequences": {"train": len(x_train), "held_out": len(x_test)},
      "padding_share": float(np.mean(y_train == PAD)),
      "unigram_entropy": unigram_entropy(y_train)}
  x0, y0 = jnp.asarray(x_train[order[0]]), jnp.asarray(y_train[order[0]])
  steps, graphdefs, states, logs = {}, {}, {}, {}
  for name in LOSSES:
    steps[name], graphdefs[name], states[name], logs[name] = _compiled(
        cfg, len(vocab), tx, name, x0, y0)
    logs[name].update(curve=[], accuracy=[], entropy=[], step_s=[],
                      held_out_curve=[])
  out["params"] = logs["jsoft"].pop("params")
  logs["optax"].pop("params")

  names = list(LOSSES)
  xt, yt = jnp.asarray(x_test), jnp.asarray(y_test)
  evaluate = nnx.jit(_evaluate)
  for i, rows in enumerate(order):
    if i % cfg["eval_every"] == 0 or i == len(order) - 1:
      for name in names:  # held-out loss (untimed)
        model, _ = nnx.merge(graphdefs[name], states[name])
        logs[name]["held_out_curve"].append([i, float(evaluate(model, xt,
                                                               yt)[0])])
    x, y = jnp.asarray(x_train[rows]), jnp.asarray(y_train[rows])
    for name in names if i % 2 == 0 else names[::-1]:
      start = time.perf_counter()
      states[name], loss, metrics = steps[name](states[name], x, y)
      jax.block_until_ready(loss)
      log = logs[name]
      log["step_s"].append(time.perf_counter() - start)
      log["curve"].append(float(loss))
      log["accuracy"].append(float(metrics["accuracy"]))
      log["entropy"].append(float(metrics["entropy"]))

  steady = slice(len(order) // 10, None)  # warm caches and clocks first
  # Steps i of both heads ran back to back: their ratio sees the same load.
  out["step_ratio"] = float(np.median(
      np.divide(logs["optax"]["step_s"], logs["jsoft"]["step_s"])[steady]))
  for name in names:
    log = logs[name]
    times = np.asarray(log.pop("step_s"))
    log["step_ms"] = float(np.median(times[steady]) * 1e3)
    log["step_ms_p25_p75"] = [float(q * 1e3) for q in
                              np.percentile(times[steady], [25, 75])]
    log["train_s"] = float(times.sum())
    log["final_loss"] = float(np.mean(log["curve"][-10:]))
    model, _ = nnx.merge(graphdefs[name], states[name])
    held_loss, held_acc = evaluate(model, xt, yt)
    log["held_out_loss"], log["held_out_accuracy"] = (float(held_loss),
                                                      float(held_acc))
  out["max_curve_difference"] = _train.curve_difference(
      logs["jsoft"]["curve"], logs["optax"]["curve"])
  out.update(logs)
  out["wide_heads"] = wide_heads(cfg, tx, x0, y0, cfg["wide_vocabs"],
                                 cfg["wide_timed"])
  return out


# ------------------------------------------------------------------ report


def table(result: dict[str, Any]) -> Any:
  """The run as the benchmark's one table style (:mod:`bench._plumbing`)."""
  cfg = result["config"]
  title = (
      f"character LM (Flax NNX, {result['params']:,} parameters: "
      f"{cfg['layers']} blocks, d_model {cfg['d_model']}, {cfg['heads']} "
      f"heads, context {cfg['context']}; vocabulary {result['vocab']}), "
      f"{result['corpus_chars']:,} characters of the README and jsoft's "
      f"docstrings; {result['sequences']['train']} train / "
      f"{result['sequences']['held_out']} held-out lines, "
      f"{result['padding_share']:.0%} of target slots padding; "
      f"{cfg['steps']} steps of {cfg['batch']} lines, z-loss {cfg['z_loss']}")
  rows = []
  for name in LOSSES:
    r = result[name]
    rows.append([name, f"{r['final_loss']:.4f}",
                 f"{np.mean(r['accuracy'][-10:]):.3f}",
                 f"{np.mean(r['entropy'][-10:]):.3f}",
                 f"{r['held_out_loss']:.4f}", f"{r['held_out_accuracy']:.3f}",
                 f"{r['step_ms']:.2f}", f"{r['temp_bytes'] / 1e6:.2f}",
                 f"{r['train_s']:.1f}"])
  for row in result["wide_heads"]:
    rows.append(None)
    for name in LOSSES:
      r = row[name]
      rows.append([f"{name}, V = {row['vocab']:,}", None, None, None, None,
                   None, f"{r['step_ms']:.1f}", f"{r['temp_bytes'] / 1e6:.1f}",
                   None])
  caption = (
      f"optax step time ÷ jsoft step time, median over steps: "
      f"{result['step_ratio']:.2f}; loss curves differ by at most "
      f"{result['max_curve_difference']:.2e}; unigram entropy of the "
      f"training targets {result['unigram_entropy']:.4f} nats; final values "
      "are means of the last 10 steps. V = ...: the same step with the head "
      "widened (the extra classes never targets).")
  return _plumbing.table(
      title, ["head", "final loss", "acc", "entropy", "held-out loss",
              "acc", "step ms", "XLA temp MB", "train s"], rows,
      caption=caption)


def write_plot(path: str, result: dict[str, Any]) -> None:
  """Loss curves, statistics, step time and memory. Raises
  :class:`bench._plumbing.Missing` without matplotlib."""
  plt = _plumbing.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(18, 4),
                           gridspec_kw={"width_ratios": [3, 3, 2, 2]})
  ax_loss, ax_stats, ax_time, ax_mem = axes
  styles = {"jsoft": "-", "optax": "--"}
  colors = {"jsoft": "C0", "optax": "C1"}
  ax_entropy = ax_stats.twinx()
  for name in LOSSES:
    r = result[name]
    ax_loss.plot(r["curve"], styles[name], color=colors[name], lw=0.8,
                 label=f"{name}, training batch")
    ax_loss.plot(*np.transpose(r["held_out_curve"]), styles[name],
                 color=colors[name], marker="o", ms=3, lw=1.2,
                 label=f"{name}, held out (no z-loss)")
    ax_stats.plot(r["accuracy"], styles[name], color="C2", lw=1,
                  label=f"accuracy, {name}")
    ax_entropy.plot(r["entropy"], styles[name], color="C3", lw=1,
                    label=f"entropy, {name}")
  ax_loss.axhline(result["unigram_entropy"], color="gray", lw=0.8, ls=":",
                  label="unigram entropy")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("mean CE + z-loss (nats)")
  ax_loss.set_title("loss curves (jsoft and optax overlap)", fontsize=10)
  ax_loss.set_ylim(0, None)
  ax_loss.legend(fontsize=8)
  ax_stats.set_xlabel("step")
  ax_stats.set_ylabel("per-token accuracy", color="C2")
  ax_entropy.set_ylabel("mean entropy (nats)", color="C3")
  ax_stats.set_title("accuracy and entropy (jsoft: from return_stats)",
                     fontsize=10)
  handles = [h for ax in (ax_stats, ax_entropy)
             for h in ax.get_legend_handles_labels()[0]]
  ax_stats.legend(handles=handles, fontsize=7, loc="center right")
  rows = [{"vocab": result["vocab"], **{n: result[n] for n in LOSSES}},
          *result["wide_heads"]]
  xs = np.arange(len(rows))
  for i, name in enumerate(LOSSES):
    for ax, values in ((ax_time, [r[name]["step_ms"] for r in rows]),
                       (ax_mem, [r[name]["temp_bytes"] / 1e6 for r in rows])):
      bars = ax.bar(xs + (i - 0.5) * 0.4, values, 0.4, label=name)
      ax.bar_label(bars, fmt="%.0f", fontsize=7)
  for ax, title in ((ax_time, "step time (ms, median)"),
                    (ax_mem, "XLA temp of the step (MB)")):
    ax.set_xticks(xs)
    ax.set_xticklabels([f"V={r['vocab']:,}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
  fig.tight_layout()
  _plumbing.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = _plumbing.command(
      "lm", __doc__, plot=True,
      quick="a smaller model, fewer steps: seconds on 2 CPU cores",
  ).parse_args(argv)
  result = run(quick=args.quick)
  _plumbing.show(table(result))
  _plumbing.write_outputs(args.json, result, [
      (args.plot, lambda path: write_plot(path, result))])
  return result


if __name__ == "__main__":
  main()
