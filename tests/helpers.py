"""float64 NumPy/SciPy references, written independently of jsoft.

Every reference computes in float64 on the (already rounded) input values, so
a test compares jsoft's arithmetic alone, not the rounding of its inputs.
"""

from __future__ import annotations

import numpy as np
import scipy.special as sp


def f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def logsumexp(x, axis=-1, where=None):
  x = f64(x)
  if where is not None:
    x = np.where(where, x, -np.inf)
  return sp.logsumexp(x, axis=axis)


def softmax(x, axis=-1):
  return sp.softmax(f64(x), axis=axis)


def log_softmax(x, axis=-1):
  return sp.log_softmax(f64(x), axis=axis)


def sigmoid(x):
  return sp.expit(f64(x))


def log_sigmoid(x):
  return sp.log_expit(f64(x))


def ce_int(logits, labels):
  """-log softmax(x)[label] over the last axis."""
  x = f64(logits)
  lab = np.asarray(labels)[..., None]
  return -np.take_along_axis(sp.log_softmax(x, axis=-1), lab, -1)[..., 0]


def ce_int_grad(logits, labels):
  """softmax(x) - onehot(label) over the last axis."""
  x = f64(logits)
  return sp.softmax(x, axis=-1) - np.eye(x.shape[-1])[np.asarray(labels)]


def ce_prob(logits, labels):
  """-Σ t·log softmax(x) over the last axis, with 0·log 0 = 0."""
  t = f64(labels)
  logp = sp.log_softmax(f64(logits), axis=-1)
  return -np.sum(np.where(t == 0, 0.0, t * logp), axis=-1)


def ce_prob_grad(logits, labels):
  t = f64(labels)
  return sp.softmax(f64(logits), -1) * t.sum(-1, keepdims=True) - t


def bce(logits, labels):
  """-t log σ(x) - (1 - t) log σ(-x), with 0·log 0 = 0."""
  x, t = np.broadcast_arrays(f64(logits), f64(labels))
  a = np.where(t == 0, 0.0, -t * sp.log_expit(x))
  b = np.where(t == 1, 0.0, -(1 - t) * sp.log_expit(-x))
  return a + b


def rel_err(actual, expected) -> float:
  actual, expected = f64(actual), f64(expected)
  scale = np.maximum(np.abs(expected), np.finfo(np.float64).tiny)
  return float(np.max(np.abs(actual - expected) / scale, initial=0.0))
