"""PyTorch's implementations of the benchmark's functions (see
:mod:`bench.peers` for the functions, their inputs and modes), on the CPU;
``vg`` through ``torch.autograd.grad``. torch is imported on first use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.peers import ACTIVATIONS, IGNORE, OPTIONS


def torch_impl(fn: str, mode: str) -> Callable[..., Any] | None:
  """PyTorch on the CPU; ``vg`` through ``torch.autograd.grad``."""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: N812, PLC0415

  fwd = {
      "softmax": lambda x: torch.softmax(x, -1),
      "log_softmax": lambda x: torch.log_softmax(x, -1),
      "logsumexp": lambda x: torch.logsumexp(x, -1),
      "sigmoid": torch.sigmoid,
      "ce_int": lambda x, y: F.cross_entropy(x, y, reduction="none"),
      "ce_prob": lambda x, t: F.cross_entropy(x, t, reduction="none"),
      "bce": lambda x, t: F.binary_cross_entropy_with_logits(
          x, t, reduction="none"),
      "ce_opts": _torch_options,
  }
  if fn == "lm_head":
    if mode != "vg":
      return None

    def step(h, w, y):
      loss = F.cross_entropy((h @ w).float(), y)
      return loss, torch.autograd.grad(loss, w)[0]

    return step
  if fn == "distill":
    return None
  if fn == "lce":
    if mode != "vg":
      return None

    def both(h, w, y):
      loss = F.cross_entropy((h @ w).float(), y)
      return (loss, *torch.autograd.grad(loss, (h, w)))

    return both
  f = fwd[fn]
  if mode == "fwd":
    def run(*args):
      with torch.no_grad():
        return f(*args)
    return run

  def vg(x, other):
    out = f(x) if fn in ACTIVATIONS else f(x, other)
    if fn in ACTIVATIONS:
      value = (out.float() * other).sum()
    else:
      value = out.float().mean()
    return value, torch.autograd.grad(value, x)[0]

  return vg


def _torch_options(x, y):
  """``ce_opts`` in torch: its own ignore_index and label_smoothing, the
  soft cap and z-loss composed (torch has neither)."""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: N812, PLC0415
  cap, lam = OPTIONS["logit_soft_cap"], OPTIONS["z_loss"]
  z = cap * torch.tanh(x.float() / cap)
  keep = y != IGNORE
  per = F.cross_entropy(z, y, ignore_index=IGNORE, reduction="none",
                        label_smoothing=OPTIONS["label_smoothing"])
  per = per + lam * torch.logsumexp(z, -1).square() * keep
  return per.sum() / keep.sum().clamp(min=1)
