"""Flax NNX models for the experiments: the digits MLP and the character LM.

Both call jsoft's losses on what the modules return, with no adapter: the
MLP's logits go to ``jsoft.softmax_cross_entropy_with_integer_labels`` as
they would to optax's, and the LM hands its last hidden states and its
head's Dense kernel to ``jsoft.linear_cross_entropy``.

Training steps are pure functions of the split state (``nnx.split`` outside,
``nnx.merge`` inside ``jax.jit``): the lowest per-step overhead in NNX, and
a step XLA can report the memory of.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jsoft
from bench import _train

# ------------------------------------------------------------------ modules


class MLP(nnx.Module):
  """``Linear → ReLU → Linear``: the digits MLP (64 → 64 → 10)."""

  def __init__(self, d_in: int, width: int, d_out: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(d_in, width, rngs=rngs)
    self.out = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.hidden(x)))


class Block(nnx.Module):
  """A pre-norm transformer block: causal self-attention, then a GELU MLP
  four times as wide, each added to the residual stream."""

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.norm_attn = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.norm_mlp = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm_attn(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.norm_mlp(x))))


class CharLM(nnx.Module):
  """A decoder-only character LM: token and learned position embeddings,
  ``layers`` blocks, a final LayerNorm and a bias-free Dense head."""

  def __init__(self, vocab: int, context: int, d: int, heads: int,
               layers: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.position = nnx.Embed(context, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, heads, rngs=rngs)
                            for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

  def features(self, tokens: jax.Array) -> jax.Array:
    """The last hidden states ``[B, T, D]`` of tokens ``[B, T]``. Padding
    sits at the end of each row, so the causal mask alone keeps it out of
    every real token's context."""
    mask = nnx.make_causal_mask(tokens)
    x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x, mask)
    return self.norm(x)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """The logits ``[B, T, V]``."""
    return self.head(self.features(tokens))


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(p.shape))
             for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------ training step


def train_step(model: nnx.Module, tx, loss_fn: Callable, *,
               has_aux: bool = False):
  """A jitted step of the optimiser ``tx`` on ``model``'s parameters for
  ``loss_fn(model, *batch)`` (``-> loss``, or ``-> (loss, aux)`` with
  ``has_aux``), pure in the split state of the model and its optimiser.

  Returns ``(step, graphdef, state)``: ``step(state, *batch) -> (state,
  loss)`` or ``(state, loss, aux)``, and the graph and initial state of
  ``(model, optimizer)``; ``nnx.merge(graphdef, state)`` gives them back.
  """
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, *batch):
    model, optimizer = nnx.merge(graphdef, state)
    out, grads = nnx.value_and_grad(loss_fn, has_aux=has_aux)(model, *batch)
    optimizer.update(model, grads)
    return (nnx.state((model, optimizer)),
            *(out if has_aux else (out,)))

  return jax.jit(step), graphdef, state


# ------------------------------------------------------------------- digits


def _digits_jsoft(model, x, y):
  return jnp.mean(jsoft.softmax_cross_entropy_with_integer_labels(model(x), y))


def _digits_optax(model, x, y):
  import optax  # noqa: PLC0415
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))


DIGITS_LOSSES = {"jsoft": _digits_jsoft, "optax": _digits_optax}


def train_digits_mlp(loss_name: str, data, steps: int, timing_steps: int,
                     lr: float = 1e-2, width: int = 64) -> dict[str, Any]:
  """The NNX MLP trained full-batch with Adam from a fixed initialisation;
  the loss curve, held-out accuracy and median step time."""
  import optax  # noqa: PLC0415
  model = MLP(64, width, 10, rngs=nnx.Rngs(0))
  step, graphdef, state = train_step(model, optax.adam(lr),
                                     DIGITS_LOSSES[loss_name])
  x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
  state, curve, step_ms = _train.fit(step, state, steps, x, y,
                                     timing_steps=timing_steps)
  model, _ = nnx.merge(graphdef, state)
  accuracy = _train.accuracy(model(jnp.asarray(data["x_test"])),
                             data["y_test"])
  return {"curve": curve, "accuracy": accuracy, "step_ms": step_ms}


def digits_mlp(data, steps: int, timing_steps: int) -> dict[str, Any]:
  """Both losses on the NNX MLP, as ``bench.experiments`` reports a model."""
  runs = {name: train_digits_mlp(name, data, steps, timing_steps)
          for name in DIGITS_LOSSES}
  diff = _train.curve_difference(runs["jsoft"]["curve"],
                                 runs["optax"]["curve"])
  return {"steps": steps, "max_curve_difference": diff, **runs}
