"""The report of ``python -m bench experiments post``
(:mod:`bench.post_experiments`): its tables and its chart."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text

from bench import _plumbing

# ------------------------------------------------------------------ report


def _target(what: str, goal: str, measured: float, met: bool):
  return {"target": what, "goal": goal, "measured": float(measured),
          "met": bool(met)}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
  """What the run sets out to show, each with its goal, the measured value
  and whether it was met (the docs render them as a table)."""
  d, g = result["dpo"], result["grpo"]
  return [
      _target("DPO loss curves, fused vs materialised", "≤ 1e-5",
              d["max_curve_difference"], d["max_curve_difference"] <= 1e-5),
      _target("GRPO loss curves, fused vs materialised", "≤ 1e-3",
              g["max_curve_difference"], g["max_curve_difference"] <= 1e-3),
      _target("DPO held-out margin after", "> 0",
              d["held_out"]["after, fused"]["margin"],
              d["held_out"]["after, fused"]["margin"] > 0),
      _target("GRPO mean reward, last five batches ÷ first", "> 1",
              g["reward_first_last"][1] / g["reward_first_last"][0],
              g["reward_first_last"][1] > g["reward_first_last"][0])]


def table(result: dict[str, Any]) -> Any:
  """The run as the benchmark's one table style (:mod:`bench._plumbing`)."""
  cfg, s, d, g = (result[k] for k in ("config", "sft", "dpo", "grpo"))
  dpo_rows = [[name, f"{r['loss']:.4f}", f"{r['reward_accuracy']:.3f}",
               f"{r['margin']:.4f}", f"{r['logp_accuracy']:.3f}"]
              for name, r in d["held_out"].items()]
  dpo_table = _plumbing.table(
      f"DPO (beta {d['beta']:g}, {d['steps']} steps of {cfg['batch']} "
      f"pairs) from the SFT model ({s['params']:,} parameters, "
      f"{s['steps']} steps, final loss {s['final_loss']:.3f}); "
      f"{d['pairs']['held_out']} held-out pairs",
      ["held-out pairs", "loss", "reward acc", "margin", "log p acc"],
      dpo_rows, caption=(
          "loss curves, fused vs materialised: largest difference "
          f"{d['max_curve_difference']:.2e} of the curve's largest value; "
          f"parameters at the end: {d['max_param_difference']:.2e}"))
  rewards = g["reward_curve"]
  grpo_rows = [[name, f"{r:.3f}"] for name, r in g["held_out_reward"].items()]
  grpo_table = _plumbing.table(
      f"GRPO ({len(rewards)} batches of {cfg['prompts']} prompts × "
      f"{cfg['group']} completions of {cfg['completion']} characters, "
      f"{g['updates_per_batch']} updates each; reward: {g['reward']})",
      ["held-out prompts", "mean reward"], grpo_rows, caption=(
          f"mean reward of the sampled batches: {rewards[0]:.3f} first, "
          f"{g['reward_first_last'][1]:.3f} over the last five; loss curves,"
          f" fused vs materialised: {g['max_curve_difference']:.2e} of the "
          f"curve's largest value; parameters: "
          f"{g['max_param_difference']:.2e}"))
  return Group(dpo_table, Text(""), grpo_table)


def write_plot(path: str, result: dict[str, Any]) -> None:
  """The DPO and GRPO loss curves of both runs, DPO's batch accuracy and
  margin, GRPO's mean reward. Raises :class:`bench._plumbing.Missing`
  without matplotlib."""
  plt = _plumbing.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(18, 4))
  styles = {"fused": "-", "materialised": "--"}
  d, g = result["dpo"], result["grpo"]
  for name, style in styles.items():
    axes[0].plot(d["runs"][name]["curve"], style, label=name)
    axes[1].plot(d["runs"][name]["accuracy"], style, color="C2",
                 label=f"reward accuracy, {name}")
    axes[1].plot(d["runs"][name]["margin"], style, color="C3",
                 label=f"margin, {name}")
    axes[3].plot(g["runs"][name]["curve"], style, label=name)
  axes[2].plot(g["reward_curve"], marker="o", ms=3)
  for ax, title, y in (
      (axes[0], "DPO loss (fused and materialised overlap)", "loss"),
      (axes[1], "DPO on the training batch", "accuracy, margin"),
      (axes[2], "GRPO: mean reward of each sampled batch", "vowel share"),
      (axes[3], "GRPO loss (fused and materialised overlap)", "loss")):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("batch" if ax is axes[2] else "step")
    ax.set_ylabel(y)
    if ax is not axes[2]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  _plumbing.save_figure(fig, path)
