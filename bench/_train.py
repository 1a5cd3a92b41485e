"""What the experiments share: the training loop, the held-out accuracy,
and how far two loss curves lie apart.

A training step here is a jitted function ``step(carry, *batch) -> (carry,
loss, ...)``: ``carry`` holds whatever the step updates (parameters and
optimiser state, or an NNX model's split state), and anything after the
loss (metrics) is passed through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import _plumbing


def optax_step(loss: Callable[..., jax.Array], opt: Any) -> Callable:
  """A jitted step of the optax optimiser ``opt`` on ``loss(params,
  *batch)``, with ``carry = (params, opt_state)``; start it from
  ``(params, opt.init(params))``."""
  optax = _plumbing.optional("optax")

  @jax.jit
  def step(carry, *batch):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params, *batch)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), value

  return step


def fit(step: Callable, carry: Any, steps: int, *batch: Any,
        timing_steps: int = 0) -> tuple[Any, list[float], float | None]:
  """``steps`` steps of ``step`` on the same ``batch`` (full-batch
  training) from ``carry``; then, from the trained ``carry``,
  ``timing_steps`` more, each timed to its result, whose updates are
  dropped. Returns the trained ``carry``, the loss of every training step,
  and the median timed step in ms (None without timed steps)."""
  curve = []
  for _ in range(steps):
    carry, loss, *_ = step(carry, *batch)
    curve.append(float(loss))
  times = []
  timed = carry
  for _ in range(timing_steps):
    start = time.perf_counter()
    timed, loss, *_ = step(timed, *batch)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  step_ms = float(np.median(times) * 1e3) if times else None
  return carry, curve, step_ms


def accuracy(logits: jax.Array, labels: Any) -> float:
  """The share of rows whose largest logit is at the label."""
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels)))


def curve_difference(a: list[float], b: list[float]) -> float:
  """The largest difference between two loss curves, step by step."""
  return float(np.max(np.abs(np.subtract(a, b))))
