"""``python -m bench experiments post``: DPO and GRPO on the character LM,
the fused post-training losses against the same losses on materialised
logits.

The character LM of :mod:`bench.lm` (Flax NNX) is first trained briefly
with the fused cross-entropy head (SFT), then frozen as the reference, and
post-trained twice from it on the same batches, one step of each in turn:

* **fused**: ``jsoft.linear_preference_loss`` / ``jsoft.linear_policy_loss``
  on the model's last hidden states and head kernel; the ``[B, T, V]``
  logits are never formed;
* **materialised**: the model's logits, their log-softmax at the targets,
  into ``jsoft.preference_loss`` / ``jsoft.policy_loss``.

**DPO**: pairs of lines, the chosen the real line and the rejected the
same line with a window of its characters shuffled; training pairs from
the training lines, evaluation pairs from the held-out lines (neither seen
in the SFT's batches of pairs). Reported on the held-out pairs before and
after: the implicit-reward accuracy and margin (both zero before: the
policy is the reference) and how often the policy gives the real line the
higher log-probability.

**GRPO**: prompts are the first characters of training lines; groups of
completions are sampled from the fused run's policy (the sampler builds
the last position's ``[B, V]`` logits only), both runs take the same
completions, the reward is the share of vowels in a completion,
advantages are normalised within each group, and each batch gets two
updates (the second off-policy, so the ratio and its clip act), with a
``k3`` KL penalty to the reference. Reported: the mean reward of every
sampled batch, and of completions of held-out prompts before and after.

Loss curves are compared step by step: the largest difference between the
two runs' losses relative to the curve's largest magnitude.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import jsoft
from bench import _plumbing, flax_models, lm, post_report, report

# The model's size, then the SFT, DPO and GRPO runs.
QUICK = {"context": 32, "d_model": 32, "heads": 2, "layers": 1,
         "sft_steps": 20, "sft_lr": 1e-2, "batch": 8, "window": 6,
         "min_chars": 16, "beta": 0.1, "dpo_steps": 8, "dpo_lr": 1e-3,
         "prompt": 8, "completion": 8, "prompts": 2, "group": 4,
         "grpo_batches": 2, "updates": 2, "grpo_lr": 1e-3, "kl_coef": 0.04,
         "eval_prompts": 4}
FULL = {**QUICK, "context": 64, "d_model": 64, "heads": 4, "layers": 2,
        "sft_steps": 300, "batch": 32, "dpo_steps": 100, "dpo_lr": 1e-4,
        "completion": 24, "prompts": 8, "group": 8, "grpo_batches": 40,
        "eval_prompts": 32}
VOWELS = "aeiouAEIOU"
CLIP = {"clip_low": 0.2, "clip_high": 0.28}  # DAPO's clip-higher


# -------------------------------------------------------------------- data


def corrupt(x: np.ndarray, y: np.ndarray, window: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The rows ``x, y`` (as :func:`bench.lm.sequences` makes them) with the
  characters of one random window of each line shuffled; the framing
  newlines and the padding stay where they are."""
  x, y = x.copy(), y.copy()
  for r in range(len(y)):
    n = int(np.sum(y[r] != lm.PAD)) - 1  # the line's characters
    start = rng.integers(0, n - window + 1)
    line = y[r, :n].copy()
    line[start:start + window] = rng.permutation(line[start:start + window])
    y[r, :n] = line
    x[r, 1:n + 1] = line
  return x, y


def pairs(x: np.ndarray, y: np.ndarray, cfg, seed: int):
  """``[2, S, T]`` chosen (index 0) and rejected inputs and targets, from
  the rows of at least ``min_chars`` characters whose shuffled window
  changed the line."""
  keep = np.sum(y != lm.PAD, -1) - 1 >= cfg["min_chars"]
  x, y = x[keep], y[keep]
  xr, yr = corrupt(x, y, cfg["window"], np.random.default_rng(seed))
  changed = np.any(yr != y, -1)
  return (np.stack([x[changed], xr[changed]]),
          np.stack([y[changed], yr[changed]]))


def vowel_share(tokens: np.ndarray, vocab: list[str]) -> np.ndarray:
  """The reward: the share of vowels among each row's tokens."""
  vowel = np.array([c in VOWELS for c in vocab])
  return vowel[tokens].mean(-1)


def group_advantages(rewards: np.ndarray, group: int) -> np.ndarray:
  """GRPO's advantages: each reward less its group's mean, over the
  group's standard deviation (plus 1e-4, so an all-equal group gives 0)."""
  r = rewards.reshape(-1, group)
  a = (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + 1e-4)
  return a.reshape(-1).astype(np.float32)


# ------------------------------------------------------------------ losses


def _token_logprobs(model, x, y):
  """``log softmax(logits)`` at the targets, from the materialised
  ``[B, T, V]`` logits."""
  logp = jax.nn.log_softmax(model(x))
  return jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]


def _fused_logprobs(model, x, y):
  """The same from the fused head's statistics, without the logits."""
  _, stats = jsoft.linear_cross_entropy(model.features(x),
                                        model.head.kernel[...], y,
                                        return_stats=True)
  return stats.logprob


def dpo_fused(model, x, y, ref, beta):
  b, t = x.shape[1:]
  hidden = model.features(x.reshape(2 * b, t)).reshape(2, b, t, -1)
  loss, stats = jsoft.linear_preference_loss(
      hidden, model.head.kernel[...], y,
      where=y != lm.PAD, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
      beta=beta)
  return loss, stats._replace(chosen_rewards=None, rejected_rewards=None)


def dpo_materialised(model, x, y, ref, beta):
  b, t = x.shape[1:]
  logp = _token_logprobs(model, x.reshape(2 * b, t), y.reshape(2 * b, t))
  sums = jnp.sum(jnp.where(y != lm.PAD, logp.reshape(2, b, t), 0), -1)
  loss, stats = jsoft.preference_loss(sums[0], sums[1],
                                      ref_chosen_logps=ref[0],
                                      ref_rejected_logps=ref[1], beta=beta)
  return loss, stats._replace(chosen_rewards=None, rejected_rewards=None)


def grpo_fused(model, x, y, where, old, adv, ref, kl_coef):
  return jsoft.linear_policy_loss(
      model.features(x), model.head.kernel[...], y, old, adv, where=where,
      ref_logprobs=ref, kl_coef=kl_coef, aggregation="sequence_mean", **CLIP)


def grpo_materialised(model, x, y, where, old, adv, ref, kl_coef):
  return jsoft.policy_loss(_token_logprobs(model, x, y), old, adv,
                           where=where, ref_logprobs=ref, kl_coef=kl_coef,
                           aggregation="sequence_mean", **CLIP)


DPO = {"fused": dpo_fused, "materialised": dpo_materialised}
GRPO = {"fused": grpo_fused, "materialised": grpo_materialised}
LOGPROBS = {"fused": _fused_logprobs, "materialised": _token_logprobs}


def _sequence_logps(model, x, y):
  """Each sequence's summed log-probability of its non-``PAD`` targets
  (the fused head)."""
  return jnp.sum(jnp.where(y != lm.PAD, _fused_logprobs(model, x, y), 0), -1)


def _sample(model, buf, start, key):
  """Fills ``buf[:, start:]`` one token at a time from the model's softmax
  (temperature 1): each step builds only the ``[B, V]`` logits of the
  position before it."""
  def body(t, carry):
    buf, key = carry
    key, sub = jax.random.split(key)
    h = model.features(buf)
    logits = jax.lax.dynamic_index_in_dim(h, t - 1, 1, keepdims=False) @ (
        model.head.kernel[...])
    token = jax.random.categorical(sub, logits).astype(buf.dtype)
    return jax.lax.dynamic_update_index_in_dim(buf, token, t, 1), key

  return jax.lax.fori_loop(start, buf.shape[1], body, (buf, key))[0]


def _prompts(x: np.ndarray, y: np.ndarray, length: int) -> np.ndarray:
  """``"\\n"`` and the first ``length`` characters of every row that has
  that many."""
  keep = np.sum(y != lm.PAD, -1) - 1 >= length
  return x[keep, :length + 1]


def _runs(model, tx, losses, **options):
  """One jitted training step per loss, each from ``model``'s state and a
  fresh ``tx`` state; ``options`` are passed to every loss."""

  steps, states = {}, {}
  for name, loss in losses.items():
    steps[name], graphdef, states[name] = flax_models.train_step(
        model, tx, functools.partial(loss, **options), has_aux=True)
  return steps, graphdef, states


def _model(graphdef, state):
  return nnx.merge(graphdef, state)[0]


def _param_difference(graphdef, states) -> float:
  """The two runs' parameters' largest difference, relative to the fused
  run's largest parameter magnitude."""
  a, b = (ravel_pytree(nnx.state(_model(graphdef, states[n]), nnx.Param))[0]
          for n in ("fused", "materialised"))
  return _plumbing.rel_difference(b, a)


def _floats(d: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in d.items()}


def _curves(logs) -> float:
  """The two runs' loss curves' largest difference, relative to the fused
  curve's largest magnitude."""
  return _plumbing.rel_difference(np.asarray(logs["materialised"]["curve"]),
                                  np.asarray(logs["fused"]["curve"]))


# ---------------------------------------------------------------- training


def sft(cfg, vocab_size: int, x, y):
  """The SFT model: the LM trained briefly with the fused CE head."""
  model = flax_models.CharLM(vocab_size, cfg["context"], cfg["d_model"],
                             cfg["heads"], cfg["layers"], rngs=nnx.Rngs(0))
  tx = optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, cfg["sft_lr"], cfg["sft_steps"] // 10, cfg["sft_steps"],
      cfg["sft_lr"] / 10))
  step, graphdef, state = flax_models.train_step(model, tx, lm.jsoft_loss,
                                                 has_aux=True)
  curve = []
  for rows in lm.batches(len(x), cfg["batch"], cfg["sft_steps"]):
    state, loss, _ = step(state, jnp.asarray(x[rows]), jnp.asarray(y[rows]))
    curve.append(float(loss))
  return _model(graphdef, state), {
      "params": flax_models.count_params(model), "steps": cfg["sft_steps"],
      "first_loss": curve[0], "final_loss": float(np.mean(curve[-10:]))}


def _dpo_eval(model, x, y, ref, beta):
  """Held-out pairs: the loss, the implicit-reward accuracy and margin,
  and the share of pairs whose real line has the higher log-probability."""
  b, t = x.shape[1:]
  logps = _sequence_logps(model, x.reshape(2 * b, t),
                          y.reshape(2 * b, t)).reshape(2, b)
  loss, stats = jsoft.preference_loss(logps[0], logps[1],
                                      ref_chosen_logps=ref[0],
                                      ref_rejected_logps=ref[1], beta=beta)
  return {"loss": loss, "reward_accuracy": stats.accuracy,
          "margin": stats.margin,
          "logp_accuracy": jnp.mean(logps[0] > logps[1])}


def dpo(cfg, reference, train, held_out) -> dict[str, Any]:
  """DPO from the reference, fused and materialised on the same batches."""
  seq_logps, evaluate = nnx.jit(_sequence_logps), nnx.jit(
      _dpo_eval, static_argnames="beta")

  def ref_logps(x, y):
    b, t = x.shape[1:]
    return seq_logps(reference, x.reshape(2 * b, t),
                     y.reshape(2 * b, t)).reshape(2, b)

  steps, graphdef, states = _runs(reference, optax.adam(cfg["dpo_lr"]), DPO,
                                  beta=cfg["beta"])
  xe, ye = map(jnp.asarray, held_out)
  ref_e = ref_logps(xe, ye)
  out: dict[str, Any] = {
      "beta": cfg["beta"], "steps": cfg["dpo_steps"],
      "pairs": {"train": train[0].shape[1], "held_out": held_out[0].shape[1]},
      "held_out": {"before": _floats(evaluate(reference, xe, ye, ref_e,
                                              cfg["beta"]))}}
  logs = {n: {"curve": [], "accuracy": [], "margin": []} for n in DPO}
  for rows in lm.batches(train[0].shape[1], cfg["batch"], cfg["dpo_steps"],
                         seed=2):
    x, y = jnp.asarray(train[0][:, rows]), jnp.asarray(train[1][:, rows])
    ref = ref_logps(x, y)
    for name in DPO:
      states[name], loss, stats = steps[name](states[name], x, y, ref)
      for key, value in (("curve", loss), ("accuracy", stats.accuracy),
                         ("margin", stats.margin)):
        logs[name][key].append(float(value))
  for name in DPO:
    out["held_out"][f"after, {name}"] = _floats(evaluate(
        _model(graphdef, states[name]), xe, ye, ref_e, cfg["beta"]))
    logs[name]["final_loss"] = float(np.mean(logs[name]["curve"][-5:]))
  out["max_curve_difference"] = _curves(logs)
  out["max_param_difference"] = _param_difference(graphdef, states)
  out["runs"] = logs
  return out


def grpo(cfg, reference, vocab, prompts, held_out_prompts) -> dict[str, Any]:
  """GRPO from the reference, fused and materialised on the same
  completions (sampled from the fused run's policy)."""
  p, g = cfg["prompt"], cfg["group"]
  sample = nnx.jit(_sample, static_argnames="start")
  logprobs = {n: nnx.jit(f) for n, f in LOGPROBS.items()}
  steps, graphdef, states = _runs(reference, optax.adam(cfg["grpo_lr"]),
                                  GRPO, kl_coef=cfg["kl_coef"])

  def completions(model, rows, key):
    buf = np.zeros((len(rows) * g, p + 1 + cfg["completion"]), np.int32)
    buf[:, :p + 1] = np.repeat(rows, g, axis=0)
    return np.asarray(sample(model, jnp.asarray(buf), p + 1, key))

  def held_out_reward(model):
    done = completions(model, held_out_prompts, jax.random.key(1))
    return float(vowel_share(done[:, p + 1:], vocab).mean())

  out: dict[str, Any] = {
      "reward": f"share of vowels ({VOWELS}) in the completion",
      "kl_coef": cfg["kl_coef"], **CLIP, "aggregation": "sequence_mean",
      "updates_per_batch": cfg["updates"],
      "held_out_reward": {"before": held_out_reward(reference)}}
  logs = {n: {"curve": [], "ratio": [], "clipped": [], "kl": []}
          for n in GRPO}
  rewards = []
  rng = np.random.default_rng(4)
  for b in range(cfg["grpo_batches"]):
    rows = prompts[rng.choice(len(prompts), cfg["prompts"], replace=False)]
    done = completions(_model(graphdef, states["fused"]), rows,
                       jax.random.fold_in(jax.random.key(0), b))
    reward = vowel_share(done[:, p + 1:], vocab)
    rewards.append(float(reward.mean()))
    adv = jnp.asarray(group_advantages(reward, g))
    x, y = jnp.asarray(done[:, :-1]), jnp.asarray(done[:, 1:])
    where = jnp.broadcast_to(jnp.arange(x.shape[1]) >= p, x.shape)
    ref = logprobs["fused"](reference, x, y)
    old = {n: logprobs[n](_model(graphdef, states[n]), x, y) for n in GRPO}
    for _ in range(cfg["updates"]):
      for name in GRPO:
        states[name], loss, stats = steps[name](states[name], x, y, where,
                                                old[name], adv, ref)
        log = logs[name]
        log["curve"].append(float(loss))
        log["ratio"].append(float(stats.ratio))
        log["clipped"].append(float(stats.low_clipped + stats.high_clipped))
        log["kl"].append(float(stats.kl))
  for name in GRPO:
    out["held_out_reward"][f"after, {name}"] = held_out_reward(
        _model(graphdef, states[name]))
    logs[name]["mean_clipped"] = float(np.mean(logs[name]["clipped"]))
    logs[name]["final_kl"] = logs[name]["kl"][-1]
  out["reward_curve"] = rewards
  out["reward_first_last"] = [rewards[0], float(np.mean(rewards[-5:]))]
  out["max_curve_difference"] = _curves(logs)
  out["max_param_difference"] = _param_difference(graphdef, states)
  out["runs"] = logs
  return out


def run(quick: bool = False) -> dict[str, Any]:
  """SFT, then DPO and GRPO (see the module docstring)."""
  start = time.perf_counter()
  cfg = QUICK if quick else FULL
  text = lm.corpus()
  vocab = lm.vocabulary(text)
  inputs, targets = lm.sequences(text, vocab, cfg["context"])
  (x_train, y_train), (x_test, y_test) = lm.split(inputs, targets)
  reference, sft_log = sft(cfg, len(vocab), x_train, y_train)
  held_out_prompts = _prompts(x_test, y_test, cfg["prompt"])
  out = {
      "machine": report.machine(), "config": cfg,
      "sft": {"vocab": len(vocab), **sft_log},
      "dpo": dpo(cfg, reference, pairs(x_train, y_train, cfg, seed=2),
                 pairs(x_test, y_test, cfg, seed=3)),
      "grpo": grpo(cfg, reference, vocab,
                   _prompts(x_train, y_train, cfg["prompt"]),
                   held_out_prompts[:cfg["eval_prompts"]])}
  out["targets"] = post_report.targets(out)
  out["seconds"] = round(time.perf_counter() - start, 1)
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = _plumbing.command(
      "experiments post", __doc__, plot=True,
      quick="a smaller model, a few steps: under a minute on 2 CPU cores, "
      "mostly compiling",
  ).parse_args(argv)
  result = run(quick=args.quick)
  _plumbing.show(post_report.table(result))
  _plumbing.write_outputs(args.json, result, [
      (args.plot, lambda path: post_report.write_plot(path, result))])
  return result
