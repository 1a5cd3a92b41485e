"""``python -m bench experiments``: jsoft inside real models, end to end.

On scikit-learn's bundled digits (1797 8×8 images, 10 classes; no
download), with optax's Adam:

* a softmax regression (plain JAX) and a one-hidden-layer MLP (Equinox,
  and the same MLP in Flax NNX: :mod:`bench.flax_models`), each trained
  twice from the same initialisation — once with jsoft's loss, once with
  optax's — to show the same loss curve, the held-out accuracy, and the
  step time of each;
* curvature: the Hessian of the softmax regression's mean CE, through
  jsoft's VJP rule (``jax.hessian``), against the closed form
  ``(1/N) Σ (diag p − p pᵀ) ⊗ x xᵀ`` in float64 NumPy, with its top
  eigenvalues; and Hessian-vector products through the MLP, against the
  textbook loss (``jax.nn.log_softmax``) differentiated by JAX, with the
  top eigenvalue by power iteration;
* a character-level transformer LM (Flax NNX) whose head is
  ``jsoft.linear_cross_entropy``, against optax's loss on materialised
  logits (:mod:`bench.lm`);
* ``python -m bench experiments post``, a run of its own: DPO and GRPO on
  that LM, the fused post-training losses against the same losses on
  materialised logits (:mod:`bench.post_experiments`).

Writes a table to stdout and, on request, JSON and a PNG (loss curves,
accuracy, step time).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Group
from rich.text import Text

import jsoft
from bench import _plumbing, _train
from jsoft import _compat

QUICK = {"steps_regression": 150, "steps_mlp": 300, "timing_steps": 20,
         "power_iterations": 15}
FULL = {"steps_regression": 500, "steps_mlp": 1500, "timing_steps": 100,
        "power_iterations": 40}
HIDDEN = 64


# ------------------------------------------------------------------- data


def digits(seed: int = 0) -> dict[str, np.ndarray]:
  """The digits, scaled to [0, 1], split 80/20 (train/test) at random."""
  data = _plumbing.optional("sklearn.datasets").load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(y))
  cut = int(0.8 * len(y))
  train, test = order[:cut], order[cut:]
  return {"x_train": x[train], "y_train": y[train], "x_test": x[test],
          "y_test": y[test]}


def _jsoft_ce(logits, y):
  return jnp.mean(jsoft.softmax_cross_entropy_with_integer_labels(logits, y))


def _optax_ce(logits, y):
  optax = _plumbing.optional("optax")
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


LOSSES = {"jsoft": _jsoft_ce, "optax": _optax_ce}


# ------------------------------------------------------------------ models


def regression_model(key):
  """Softmax regression: ``x @ W + b`` (plain JAX, a dict of arrays)."""
  del key
  params = {"w": jnp.zeros((64, 10), jnp.float32),
            "b": jnp.zeros((10,), jnp.float32)}

  def apply(params, x):
    return x @ params["w"] + params["b"]

  return params, apply


def mlp_model(key):
  """A one-hidden-layer MLP written in Equinox (64 → 64 → 10, ReLU)."""
  eqx = _plumbing.optional("equinox")
  mlp = eqx.nn.MLP(in_size=64, out_size=10, width_size=HIDDEN, depth=1,
                   activation=jax.nn.relu, dtype=jnp.float32, key=key)
  params, static = eqx.partition(mlp, eqx.is_array)

  def apply(params, x):
    return jax.vmap(eqx.combine(params, static))(x)

  return params, apply


MODELS = {"softmax regression": (regression_model, 1e-1),
          "MLP (Equinox)": (mlp_model, 1e-2)}


# ---------------------------------------------------------------- training


def train(make_model, lr: float, loss_name: str, data, steps: int,
          timing_steps: int) -> dict[str, Any]:
  """Full-batch Adam from a fixed initialisation; the loss curve, held-out
  accuracy and median step time."""
  optax = _plumbing.optional("optax")
  params, apply = make_model(jax.random.key(0))
  ce = LOSSES[loss_name]
  opt = optax.adam(lr)
  x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
  step = _train.optax_step(lambda p: ce(apply(p, x), y), opt)
  (params, _), curve, step_ms = _train.fit(
      step, (params, opt.init(params)), steps, timing_steps=timing_steps)
  accuracy = _train.accuracy(apply(params, jnp.asarray(data["x_test"])),
                             data["y_test"])
  return {"curve": curve, "accuracy": accuracy, "step_ms": step_ms,
          "params": params, "apply": apply}


# ------------------------------------------------------------ distillation

DISTILL = {"temperature": 4.0, "alpha": 0.5}


def distill_student(teacher_params, data, steps: int) -> dict[str, Any]:
  """The softmax regression trained on the hard labels alone, and the same
  student distilled from the trained MLP through
  ``jsoft.linear_distillation_loss``: the student's head ``x @ W + b``
  against the teacher's last layer (its hidden ReLU features and output
  weights), fused, with the hard labels mixed in. Hinton et al.'s loss
  ``α·CE + (1 − α)·T²·KL`` is that call's ``α'·CE + (1 − α')·KL`` up to a
  constant factor (Adam does not see it), with
  ``α' = α / (α + (1 − α)·T²)``. Same initialisation, optimiser and steps;
  the held-out accuracy of each."""
  import optax  # noqa: PLC0415
  temp, alpha = DISTILL["temperature"], DISTILL["alpha"]
  hard_weight = alpha / (alpha + (1 - alpha) * temp**2)
  layers = teacher_params.layers
  x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
  # The teacher's features and head, fixed: eqx's Linear is W·h + b.
  feats = jax.nn.relu(x @ layers[0].weight.T + layers[0].bias)
  w_t, b_t = layers[1].weight.T, layers[1].bias

  def hard(p):
    return _jsoft_ce(x @ p["w"] + p["b"], y)

  def soft(p):
    return jsoft.linear_distillation_loss(
        x, p["w"], feats, w_t, student_bias=p["b"], teacher_bias=b_t,
        labels=y, hard_weight=hard_weight, temperature=temp,
        reduction="mean")

  out = {"temperature": temp, "alpha": alpha, "hard_weight": hard_weight,
         "steps": steps}
  x_test = jnp.asarray(data["x_test"])
  teacher = jax.nn.relu(x_test @ layers[0].weight.T + layers[0].bias)
  out["teacher_accuracy"] = _train.accuracy(teacher @ w_t + b_t,
                                            data["y_test"])
  for name, loss in (("hard labels", hard), ("distilled", soft)):
    params, _ = regression_model(None)
    opt = optax.adam(MODELS["softmax regression"][1])
    (params, _), _, _ = _train.fit(_train.optax_step(loss, opt),
                                   (params, opt.init(params)), steps)
    out[name] = _train.accuracy(x_test @ params["w"] + params["b"],
                                data["y_test"])
  return out


# --------------------------------------------------------------- curvature


def regression_hessian(params, data) -> dict[str, Any]:
  """The Hessian of the mean CE w.r.t. ``W`` through jsoft (in the params'
  dtype), against the closed form in float64 NumPy; its top eigenvalues."""
  x = np.asarray(data["x_train"], np.float64)
  y = np.asarray(data["y_train"])
  b = params["b"]

  def loss(w):
    logits = jnp.asarray(x, w.dtype) @ w + b.astype(w.dtype)
    return _jsoft_ce(logits, y)

  w = params["w"]
  hess = np.asarray(jax.hessian(loss)(w), np.float64).reshape(640, 640)
  logits = x @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  # H[(i,a),(j,b)] = (1/N) Σ_n x_ni x_nj (p_na δ_ab − p_na p_nb).
  cov = np.einsum("na,ab->nab", p, np.eye(10)) - np.einsum("na,nb->nab", p, p)
  ref = np.einsum("ni,nj,nab->iajb", x, x, cov).reshape(640, 640) / len(y)
  err = _plumbing.rel_difference(hess, ref)
  eig = np.linalg.eigvalsh(ref)[::-1]
  eig_jsoft = np.linalg.eigvalsh((hess + hess.T) / 2)[::-1]
  return {"max_rel_error": err, "top_eigenvalues": eig[:5].tolist(),
          "top_eigenvalues_jsoft": eig_jsoft[:5].tolist()}


def mlp_hvp(params, apply, data, iterations: int) -> dict[str, Any]:
  """Hessian-vector products through the trained MLP with jsoft's loss,
  against a float64 reference (the textbook loss, ``jax.nn.log_softmax``,
  differentiated by JAX in float64); the top eigenvalue by power iteration
  on jsoft's HVPs."""
  from jax.flatten_util import ravel_pytree  # noqa: PLC0415

  def hvp_fn(params, loss_of_logits, dtype):
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    flat, unravel = ravel_pytree(params)
    x = jnp.asarray(data["x_train"], dtype)
    y = jnp.asarray(data["y_train"])

    def loss(v):
      return loss_of_logits(apply(unravel(v), x), y)

    return flat, jax.jit(lambda v: jax.jvp(jax.grad(loss), (flat,), (v,))[1])

  def textbook(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

  flat, hvp32 = hvp_fn(params, _jsoft_ce, jnp.float32)
  v = np.asarray(jax.random.normal(jax.random.key(1), flat.shape), np.float64)
  with _compat.enable_x64(True):
    _, ref64 = hvp_fn(params, textbook, jnp.float64)
    _, jsoft64 = hvp_fn(params, _jsoft_ce, jnp.float64)
    ref = np.asarray(ref64(jnp.asarray(v)))
    ours64 = np.asarray(jsoft64(jnp.asarray(v)))
  _, textbook32 = hvp_fn(params, textbook, jnp.float32)
  v32 = jnp.asarray(v, jnp.float32)

  def rel(a):
    return _plumbing.rel_difference(a, ref)

  out = {"params": int(flat.size), "max_rel_error_float64": rel(ours64),
         "max_rel_error_float32": rel(hvp32(v32)),
         "textbook_float32_max_rel_error": rel(textbook32(v32))}
  u, eigenvalue = v32, 0.0
  for _ in range(iterations):
    w = hvp32(u)
    eigenvalue = float(jnp.vdot(u, w) / jnp.vdot(u, u))
    u = w / jnp.linalg.norm(w)
  out["top_eigenvalue"] = eigenvalue
  return out


# ------------------------------------------------------------------ report


def run(quick: bool = False) -> dict[str, Any]:
  from bench import flax_models, lm  # noqa: PLC0415
  cfg = QUICK if quick else FULL
  data = digits()
  out: dict[str, Any] = {"config": cfg, "models": {}}
  trained = {}
  for name, (make, lr) in MODELS.items():
    steps = cfg["steps_regression" if "regression" in name else "steps_mlp"]
    runs = {loss: train(make, lr, loss, data, steps, cfg["timing_steps"])
            for loss in LOSSES}
    diff = _train.curve_difference(runs["jsoft"]["curve"],
                                   runs["optax"]["curve"])
    out["models"][name] = {
        "steps": steps, "max_curve_difference": diff,
        **{loss: {k: r[k] for k in ("curve", "accuracy", "step_ms")}
           for loss, r in runs.items()}}
    trained[name] = runs["jsoft"]
  out["models"]["MLP (Flax NNX)"] = flax_models.digits_mlp(
      data, cfg["steps_mlp"], cfg["timing_steps"])
  reg = trained["softmax regression"]
  with _compat.enable_x64(True):
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                            reg["params"])
    out["regression_hessian"] = regression_hessian(params64, data)
  mlp = trained["MLP (Equinox)"]
  out["mlp_hvp"] = mlp_hvp(mlp["params"], mlp["apply"], data,
                           cfg["power_iterations"])
  out["distillation"] = distill_student(mlp["params"], data,
                                        cfg["steps_regression"])
  out["lm"] = lm.run(quick)
  return out


def table(result: dict[str, Any]) -> Any:
  rows: list[list[str] | None] = []
  for name, m in result["models"].items():
    rows.append(None)
    for loss in LOSSES:
      r = m[loss]
      rows.append([name, loss, f"{r['curve'][-1]:.5f}",
                   f"{r['accuracy']:.3f}", f"{r['step_ms']:.3f}",
                   f"{m['max_curve_difference']:.2e}"])
  h = result["regression_hessian"]
  v = result["mlp_hvp"]
  caption = (
      "softmax-regression Hessian (640×640) through jsoft vs the float64 "
      f"closed form: max rel. error {h['max_rel_error']:.2e}; top "
      "eigenvalues " + ", ".join(f"{e:.4f}" for e in h["top_eigenvalues"])
      + f"\nMLP HVP ({v['params']} parameters) through jsoft vs a float64 "
      f"reference: max rel. error {v['max_rel_error_float64']:.2e} in "
      f"float64, {v['max_rel_error_float32']:.2e} in float32 (textbook loss "
      f"in float32: {v['textbook_float32_max_rel_error']:.2e}); top "
      f"eigenvalue (power iteration) {v['top_eigenvalue']:.4f}")
  k = result["distillation"]
  caption += (
      f"\ndistillation into the softmax regression ({k['steps']} steps): "
      f"held-out accuracy {k['hard labels']:.3f} with hard labels only, "
      f"{k['distilled']:.3f} distilled from the MLP (teacher "
      f"{k['teacher_accuracy']:.3f}; fused linear_distillation_loss, "
      f"T={k['temperature']:g}, alpha={k['alpha']:g})")
  from bench import lm  # noqa: PLC0415
  digits_table = _plumbing.table(
      "digits (1437 train / 360 test), full-batch Adam, float32",
      ["model", "loss", "final loss", "test acc", "step ms",
       "curves differ by"], rows, left=2, caption=caption)
  return Group(digits_table, Text(""), lm.table(result["lm"]))


def write_plot(path: str, result: dict[str, Any]) -> None:
  """Loss curves, accuracy and step time. Raises
  :class:`bench._plumbing.Missing` without matplotlib."""
  plt = _plumbing.pyplot()
  fig, (ax_loss, ax_acc, ax_time) = plt.subplots(1, 3, figsize=(15, 4))
  names = list(result["models"])
  styles = {"jsoft": "-", "optax": "--"}
  for name in names:
    for loss in LOSSES:
      ax_loss.plot(result["models"][name][loss]["curve"], styles[loss],
                   label=f"{name}, {loss}")
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("training loss (mean CE)")
  ax_loss.set_title("loss curves (jsoft and optax overlap)", fontsize=10)
  ax_loss.legend(fontsize=7)
  xs = np.arange(len(names))
  for i, loss in enumerate(LOSSES):
    acc = [result["models"][n][loss]["accuracy"] for n in names]
    ms = [result["models"][n][loss]["step_ms"] for n in names]
    ax_acc.bar(xs + (i - 0.5) * 0.4, acc, 0.4, label=loss)
    ax_time.bar(xs + (i - 0.5) * 0.4, ms, 0.4, label=loss)
  for ax, title in ((ax_acc, "held-out accuracy"),
                    (ax_time, "step time (ms, median)")):
    ax.set_xticks(xs)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
  ax_acc.set_ylim(0.8, 1.0)
  fig.tight_layout()
  _plumbing.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "post":  # python -m bench experiments post ...
    from bench import post_experiments  # noqa: PLC0415
    return post_experiments.main(argv[1:])
  p = _plumbing.command("experiments", __doc__, plot=True,
                        quick="fewer steps: under a minute on 2 CPU cores")
  p.epilog = ("python -m bench experiments post [--quick] [--json PATH] "
              "[--plot PATH]: DPO and GRPO on the character LM, the fused "
              "post-training losses against materialised logits")
  p.add_argument("--lm-plot", metavar="PATH",
                 help="write the language model's PNG")
  args = p.parse_args(argv)
  result = run(quick=args.quick)
  _plumbing.show(table(result))
  from bench import lm  # noqa: PLC0415
  _plumbing.write_outputs(args.json, result, [
      (args.plot, lambda path: write_plot(path, result)),
      (args.lm_plot, lambda path: lm.write_plot(path, result["lm"]))])
  return result


if __name__ == "__main__":  # the old entry point: python -m bench experiments
  main()
