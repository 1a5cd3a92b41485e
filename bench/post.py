"""``python -m bench post``: the post-training losses' step against the
fused cross-entropy head's, and against the same losses on materialised
logits.

Two sections (``--only NAME``, repeatable, runs some of them), each the
``value_and_grad`` w.r.t. ``h`` and ``W`` of a scalar loss, float32, at
8 sequences × 1024 tokens, D=256, V=32768 (``--quick``: 4 × 64, D=16,
V=256), every implementation timed in the same interleaved rounds:

* ``policy``: :func:`jsoft.linear_policy_loss` (PPO/GRPO clip, token
  ratio, token-mean; and with an entropy bonus), against
  :func:`jsoft.policy_loss` on ``jax.nn.log_softmax(h @ W)``
  (``jsoft-plain``) and the textbook clipped surrogate written with
  ``jax.nn`` (``jax.nn``);
* ``preference``: :func:`jsoft.linear_preference_loss` (sigmoid DPO with
  reference log-probabilities; the first 4 sequences chosen, the last 4
  rejected), against :func:`jsoft.preference_loss` of the sums of
  ``jax.nn.log_softmax(h @ W)`` (``jsoft-plain``) and the textbook DPO loss
  with ``jax.nn.log_sigmoid`` (``jax.nn``).

The reference row of both is the fused cross-entropy head,
:func:`jsoft.linear_cross_entropy` with ``reduction="mean"`` on the same
tokens and tiles (``ce_head``): ``÷ ce_head`` is the median per-round
ratio to it. ``max_rel_diff``: the fused loss and gradients against
``jsoft-plain``'s. Targets: the token-ratio policy step at most 1.10× the
CE head's, the preference step at most 1.40×, each fused XLA temp at most
1/16 of ``jsoft-plain``'s. ``--tile-by`` picks the loop of every fused
head (default: tokens, where the gradients are formed in the forward
pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsoft
from bench import _plumbing, report, timing
from bench.cases import Impl, head_inputs

SECTIONS = ("policy", "preference")
FULL, QUICK = (8, 1024, 256, 32768), (4, 64, 16, 256)
BETA, CLIP = 0.1, 0.2
TARGETS = {"policy": 1.10, "preference": 1.40}


def inputs(quick: bool) -> dict[str, Any]:
  """The batch: features ``h [S, T, D]``, ``W``, sampled tokens ``y``,
  old and reference log-probabilities near the policy's, one advantage
  per sequence."""
  s, t, d, v = QUICK if quick else FULL
  rng = np.random.default_rng(3)
  h, w, y = head_inputs(rng, s * t, d, v)
  near = lambda: (-np.log(v) + 0.1 * rng.standard_normal((s, t))  # noqa: E731
                  ).astype(np.float32)
  out = dict(h=h.reshape(s, t, d), w=w, y=y.reshape(s, t), old=near(),
             ref=near(), adv=rng.standard_normal(s).astype(np.float32))
  return {k: jnp.asarray(x) for k, x in out.items()}


def _logp(h, w, y):
  logp = jax.nn.log_softmax(h @ w)
  return jnp.take_along_axis(logp, y[..., None], -1)[..., 0]


def policy_losses(x: dict[str, Any], tile_by: str | None
                  ) -> dict[str, Callable[..., jax.Array]]:
  """name: loss of ``(h, w)``."""
  y, old, adv = x["y"], x["old"], x["adv"]

  def fused(**kw):
    return lambda h, w: jsoft.linear_policy_loss(
        h, w, y, old, adv, tile_by=tile_by, **kw)[0]

  def textbook(h, w):
    ratio = jnp.exp(_logp(h, w, y) - old)
    a = adv[:, None]
    return -jnp.mean(jnp.minimum(ratio * a,
                                 jnp.clip(ratio, 1 - CLIP, 1 + CLIP) * a))

  return {
      "jsoft": fused(),
      "jsoft, entropy bonus": fused(entropy_coef=0.01),
      "jsoft-plain": lambda h, w: jsoft.policy_loss(_logp(h, w, y), old,
                                                    adv)[0],
      "jax.nn": textbook,
  }


def preference_losses(x: dict[str, Any], tile_by: str | None
                      ) -> dict[str, Callable[..., jax.Array]]:
  """name: loss of ``(h, w)``: the first half of the sequences chosen,
  the second half rejected."""
  y, ref = x["y"], jnp.sum(x["ref"], -1)
  half = y.shape[0] // 2
  pairs = lambda a: a.reshape(2, half, *a.shape[1:])  # noqa: E731
  refs = dict(ref_chosen_logps=ref[:half], ref_rejected_logps=ref[half:])

  def fused(h, w):
    return jsoft.linear_preference_loss(
        pairs(h), w, pairs(y), where=jnp.ones(pairs(y).shape, bool),
        beta=BETA, tile_by=tile_by, **refs)[0]

  def plain(h, w):
    sums = jnp.sum(_logp(h, w, y), -1)
    return jsoft.preference_loss(sums[:half], sums[half:], beta=BETA,
                                 **refs)[0]

  def textbook(h, w):
    sums = jnp.sum(_logp(h, w, y), -1) - ref
    return -jnp.mean(jax.nn.log_sigmoid(BETA * (sums[:half] - sums[half:])))

  return {"jsoft": fused, "jsoft-plain": plain, "jax.nn": textbook}


def measure(section: str, quick: bool = False, rounds: int = 5,
            tile_by: str | None = "tokens") -> dict[str, Any]:
  """One section's implementations and the CE head, timed together."""
  x = inputs(quick)
  h, w, y = x["h"], x["w"], x["y"]
  losses = {"ce_head": lambda h, w: jsoft.linear_cross_entropy(
      h, w, y, reduction="mean", tile_by=tile_by)}
  make = policy_losses if section == "policy" else preference_losses
  losses.update(make(x, tile_by))
  impls, steps = {}, {}
  for name, loss in losses.items():
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    steps[name] = step
    impls[name] = Impl(name, lambda s=step: jax.block_until_ready(s(h, w)),
                       step, (h, w))
  results = timing.measure(impls, rounds, 0.02, 0, baseline="ce_head")
  s, t, d, v = x["h"].shape + x["w"].shape[1:]
  diff = _plumbing.rel_difference(steps["jsoft"](h, w),
                                  steps["jsoft-plain"](h, w))
  plain = results["jsoft-plain"]["temp_bytes"]
  return {"sequences": s, "tokens": t, "d": d, "v": v, "rounds": rounds,
          "tile_by": tile_by or "default", "max_rel_diff": diff,
          "results": results,
          "targets": [
              {"target": f"{section} step ÷ CE head's",
               "goal": f"≤ {TARGETS[section]:.2f}",
               "measured": results["jsoft"]["ratio_to_ce_head"],
               "met": results["jsoft"]["ratio_to_ce_head"]
               <= TARGETS[section]},
              {"target": f"{section}: fused temp ÷ materialised temp",
               "goal": "≤ 1/16",
               "measured": results["jsoft"]["temp_bytes"] / max(plain, 1),
               "met": results["jsoft"]["temp_bytes"] * 16 <= plain}]}


def table(section: str, result: dict[str, Any]) -> Any:
  rows = [[name, f"{r['median_ms']:.1f}",
           "1.00" if name == "ce_head" else f"{r['ratio_to_ce_head']:.2f}",
           f"{r['temp_bytes'] / report.MIB:.1f}"]
          for name, r in result["results"].items()]
  dims = "×".join(str(result[k]) for k in ("sequences", "tokens", "d", "v"))
  return _plumbing.table(
      f"{section}: value_and_grad w.r.t. h and W, float32, S×T×D×V = "
      f"{dims}, tile_by={result['tile_by']}",
      ["implementation", "ms", "÷ ce_head", "XLA temp MiB"], rows,
      caption=f"median of {result['rounds']} interleaved rounds; max rel. "
      f"difference fused vs jsoft-plain {result['max_rel_diff']:.1e}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m bench post``: the sections asked for (both by default),
  their tables, and the JSON on request."""
  p = _plumbing.command("post", __doc__, rounds=5)
  p.add_argument("--only", action="append", choices=SECTIONS,
                 help="run only this section (repeatable; default: both)")
  p.add_argument("--tile-by", choices=("tokens", "classes", "default"),
                 default="tokens", help="the fused heads' loop")
  args = p.parse_args(argv)
  tile_by = None if args.tile_by == "default" else args.tile_by
  result = {name: measure(name, args.quick, args.rounds, tile_by)
            for name in args.only or SECTIONS}
  _plumbing.show(*(table(k, v) for k, v in result.items()))
  _plumbing.write_outputs(args.json, {"machine": report.machine(), **result},
                          [])
  return result
