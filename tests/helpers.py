"""float64 NumPy/SciPy references, written independently of jsoft.

Every reference computes in float64 on the (already rounded) input values, so
a test compares jsoft's arithmetic alone, not the rounding of its inputs.
The last section holds the tests' own shims for older JAX releases.
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


def ce_int_target(labels, num_classes, *, ignore_index=None,
                  label_smoothing=0.0, class_weights=None):
  """PyTorch's weighted, smoothed target over the last axis,
  ``t = (1 − ε)·w_y·onehot(y) + ε·w/C``; all zero for ignored labels."""
  y = np.asarray(labels)
  w = (np.ones(num_classes) if class_weights is None
       else f64(class_weights))
  kept = (np.ones(y.shape, bool) if ignore_index is None
          else y != ignore_index)
  safe = np.where(kept, y, 0)
  eps = label_smoothing
  # The one-hot by comparison with the class indices: no [C, C] identity
  # (100k classes would need 75 GiB).
  onehot = np.arange(num_classes) == safe[..., None]
  t = (1 - eps) * w[safe][..., None] * onehot + eps * w / num_classes
  return t * kept[..., None]


def ce_int(logits, labels, *, ignore_index=None, label_smoothing=0.0,
           z_loss=0.0, logit_soft_cap=None, class_weights=None,
           temperature=1.0):
  """``−Σ_c t_c log softmax(z)_c + λ·lse(z)²`` over the last axis, with
  ``z = a·tanh(x/a)/T``, ``t`` from :func:`ce_int_target` and
  ``0·log 0 = 0``; 0 for ignored labels. Without options,
  ``−log softmax(x)[label]``."""
  x = f64(logits)
  z = x if logit_soft_cap is None else (
      logit_soft_cap * np.tanh(x / logit_soft_cap))
  z = z / temperature
  t = ce_int_target(labels, x.shape[-1], ignore_index=ignore_index,
                    label_smoothing=label_smoothing,
                    class_weights=class_weights)
  logp = sp.log_softmax(z, axis=-1)
  loss = -np.sum(np.where(t == 0, 0.0, t * logp), axis=-1)
  if z_loss:
    loss = loss + z_loss * sp.logsumexp(z, axis=-1) ** 2
  if ignore_index is not None:
    loss = np.where(np.asarray(labels) != ignore_index, loss, 0.0)
  return loss


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


# ------------------------------------------------------------------------
# The textbook formulas in jax.numpy, for references that JAX's own autodiff
# differentiates (gradients, HVPs): written from the definitions, in the
# caller's (float64) dtype, sharing nothing with jsoft.


def jax_ce_int(x, y, *, ignore_index=None, label_smoothing=0.0, z_loss=0.0,
               logit_soft_cap=None, class_weights=None, reduction="none",
               temperature=1.0, where=None):
  """PyTorch's cross-entropy with its options, plus the z-loss:
  ``−Σ_c t_c log softmax(z)_c + λ·lse(z)²`` with ``z = a·tanh(x/a)/T`` and
  ``t = (1 − ε)·w_y·onehot(y) + ε·w/C``; ignored rows give 0; ``"mean"``
  divides by ``Σ w_y`` over kept rows. ``where`` leaves entries out of the
  softmax (without smoothing: ``ε/C`` would fall on them)."""
  import jax
  import jax.numpy as jnp

  assert where is None or not label_smoothing
  num_classes = x.shape[-1]
  z = x if logit_soft_cap is None else (
      logit_soft_cap * jnp.tanh(x / logit_soft_cap))
  z = z / temperature
  w = (jnp.ones(num_classes, x.dtype) if class_weights is None
       else jnp.asarray(class_weights, x.dtype))
  kept = (jnp.ones(y.shape, bool) if ignore_index is None
          else y != ignore_index)
  safe = jnp.where(kept, y, 0)
  eps = label_smoothing
  logp = jax.nn.log_softmax(z, where=where)
  picked = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  loss = -(1 - eps) * w[safe] * picked
  if eps:
    loss = loss - eps / num_classes * jnp.sum(w * logp, axis=-1)
  if z_loss:
    loss = loss + z_loss * jax.nn.logsumexp(z, axis=-1, where=where)**2
  loss = jnp.where(kept, loss, 0)
  if reduction == "sum":
    return jnp.sum(loss)
  if reduction == "mean":
    return jnp.sum(loss) / jnp.sum(jnp.where(kept, w[safe], 0))
  return loss


def jax_ce_prob(x, t, *, label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None,
                reduction="none", temperature=1.0):
  """``−Σ_c t'_c log softmax(z)_c + λ·lse(z)²``, ``t' = (1 − ε)·t + ε/C``,
  ``z = a·tanh(x/a)/T``."""
  import jax
  import jax.numpy as jnp

  z = x if logit_soft_cap is None else (
      logit_soft_cap * jnp.tanh(x / logit_soft_cap))
  z = z / temperature
  t = (1 - label_smoothing) * t + label_smoothing / x.shape[-1]
  lse = jax.nn.logsumexp(z, axis=-1)
  loss = -jnp.sum(t * jax.nn.log_softmax(z), axis=-1) + z_loss * lse**2
  return _reduce(loss, reduction)


def jax_bce(x, t, *, pos_weight=None, reduction="none"):
  """``−p·t·log σ(x) − (1 − t)·log σ(−x)``."""
  import jax

  p = 1.0 if pos_weight is None else pos_weight
  loss = -p * t * jax.nn.log_sigmoid(x) - (1 - t) * jax.nn.log_sigmoid(-x)
  return _reduce(loss, reduction)


def _reduce(loss, reduction):
  import jax.numpy as jnp

  if reduction == "sum":
    return jnp.sum(loss)
  if reduction == "mean":
    return jnp.mean(loss)
  return loss


def np_distill(s, t, divergence="forward_kl", beta=0.5, temperature=1.0,
               where=None):
  """The divergence per row in float64 NumPy, from the definitions, with
  ``0·log 0 = 0``: ``where=False`` entries and ``-inf`` logits have no mass;
  a row with no mass in a distribution has ``p = 0`` there."""
  s, t = f64(s) / temperature, f64(t) / temperature
  if where is not None:
    s, t = np.where(where, s, -np.inf), np.where(where, t, -np.inf)

  def log_probs(x):
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    total = np.sum(np.exp(x - m), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
      return x - m - np.log(np.where(total > 0, total, 1)), total > 0

  (ls, has_s), (lt, has_t) = log_probs(s), log_probs(t)
  ps = np.where(has_s, np.exp(ls), 0)
  pt = np.where(has_t, np.exp(lt), 0)

  def kl(p, log_p, log_q):  # Σ p (log p − log q), 0·log 0 = 0
    with np.errstate(invalid="ignore"):
      return np.sum(np.where(p > 0, p * (log_p - log_q), 0), axis=-1)

  if divergence == "forward_kl":
    return kl(pt, lt, ls)
  if divergence == "reverse_kl":
    return kl(ps, ls, lt)
  m = beta * pt + (1 - beta) * ps
  with np.errstate(divide="ignore"):
    lm = np.log(m)
  return beta * kl(pt, lt, lm) + (1 - beta) * kl(ps, ls, lm)


def jax_distill(s, t, *, divergence="forward_kl", beta=0.5, temperature=1.0,
                reduction="none"):
  """The divergence between ``softmax(t/T)`` and ``softmax(s/T)`` per row,
  the textbook formula for finite logits (the teacher a constant)."""
  import jax
  import jax.numpy as jnp

  ls = jax.nn.log_softmax(s / temperature)
  lt = jax.nn.log_softmax(jax.lax.stop_gradient(t) / temperature)
  ps, pt = jnp.exp(ls), jnp.exp(lt)
  if divergence == "forward_kl":
    d = jnp.sum(pt * (lt - ls), axis=-1)
  elif divergence == "reverse_kl":
    d = jnp.sum(ps * (ls - lt), axis=-1)
  else:
    lm = jnp.log(beta * pt + (1 - beta) * ps)
    d = jnp.sum(beta * pt * (lt - lm) + (1 - beta) * ps * (ls - lm), axis=-1)
  return _reduce(d, reduction)


def jax_linear_distill(hs, ws, ht, wt, bs=None, bt=None, labels=None, *,
                       ignore_index=None, hard_weight=0.0,
                       divergence="forward_kl", beta=0.5, temperature=1.0,
                       reduction="none"):
  """``α·CE(s, y) + (1 − α)·D`` per token of the two heads' logits, 0 for
  ignored tokens; "mean" over the kept ones."""
  import jax.numpy as jnp

  s = hs @ ws + (0 if bs is None else bs)
  t = ht @ wt + (0 if bt is None else bt)
  loss = (1 - hard_weight) * jax_distill(
      s, t, divergence=divergence, beta=beta, temperature=temperature)
  kept = jnp.ones(s.shape[:-1], bool)
  if labels is not None:
    if ignore_index is not None:
      kept = labels != ignore_index
    if hard_weight:
      ce = jax_ce_int(s, jnp.where(kept, labels, 0))
      loss = loss + hard_weight * ce
  loss = jnp.where(kept, loss, 0)
  if reduction == "sum":
    return jnp.sum(loss)
  if reduction == "mean":
    return jnp.sum(loss) / jnp.sum(kept).astype(loss.dtype)
  return loss


# ------------------------------------------------ fused against unfused


def assert_same_value_and_vjp(fused, unfused, *args, rtol=1e-13, atol=1e-14,
                              vjp_rtol=1e-12, vjp_atol=1e-14, seed=0):
  """``fused(*args)`` equals ``unfused(*args)``, and so do their VJPs with
  respect to every argument for one random cotangent.

  The outputs may be any pytree: floating leaves are compared within
  ``rtol``/``atol``, the others (integer, boolean) exactly, and take the
  zero (``float0``) cotangent. The VJPs are compared within
  ``vjp_rtol``/``vjp_atol``."""
  import jax

  got, pull_fused = jax.vjp(fused, *args)
  want, pull_unfused = jax.vjp(unfused, *args)
  got_leaves, got_tree = jax.tree.flatten(got)
  want_leaves, want_tree = jax.tree.flatten(want)
  assert got_tree == want_tree, (got_tree, want_tree)
  rng = np.random.default_rng(seed)
  cts = []
  for a, b in zip(got_leaves, want_leaves, strict=True):
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    if jax.numpy.issubdtype(np.asarray(b).dtype, jax.numpy.inexact):
      np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
      cts.append(rng.normal(size=np.shape(b)).astype(np.asarray(b).dtype))
    else:
      np.testing.assert_array_equal(a, b)
      cts.append(np.zeros(np.shape(b), jax.dtypes.float0))
  ct = jax.tree.unflatten(want_tree, cts)
  for a, b in zip(pull_fused(ct), pull_unfused(ct), strict=True):
    np.testing.assert_allclose(a, b, rtol=vjp_rtol, atol=vjp_atol)


# ------------------------------------------------------ older JAX releases


def needs_jax(version, why):
  """Skips a test on JAX releases before ``version``, saying why."""
  import jax
  import pytest

  from jsoft import _compat

  return pytest.mark.skipif(
      _compat.JAX_VERSION < version,
      reason=f"needs jax >= {'.'.join(map(str, version))} ({why}); this is "
      f"jax {jax.__version__}")


def jaxprs_in_params(params):
  """The jaxprs among an equation's params (``jax.extend.core`` from 0.10)."""
  import jax
  import jax.extend

  core = getattr(jax.extend.core, "jaxprs_in_params", None)
  return (core or jax.core.jaxprs_in_params)(params)


def shard_map(f, *, mesh, in_specs, out_specs, check_vma=True):
  """``jax.shard_map``; on jax < 0.6.1 ``jax.experimental``'s, whose
  ``check_rep=False`` is ``check_vma=False``. ``check_vma=True`` skips the
  test before jax 0.7."""
  import jax
  import pytest

  from jsoft import _compat

  if check_vma and _compat.JAX_VERSION < (0, 7):
    pytest.skip("needs jax >= 0.7 (jsoft's rules meet shard_map's varying-axis "
                f"types, check_vma=True, from there); this is jax "
                f"{jax.__version__}")
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)
  from jax.experimental.shard_map import shard_map as old_shard_map

  return old_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_rep=False)


def jaxpr_eqns(jaxpr):
  """Every equation of ``jaxpr``, inside loops and nested calls included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from jaxpr_eqns(sub)


def count_dots(f, *args):
  """How many ``dot_general`` (matmul) equations ``jax.make_jaxpr(f)`` holds."""
  import jax

  jaxpr = jax.make_jaxpr(f)(*args)
  return sum(e.primitive.name == "dot_general" for e in jaxpr_eqns(jaxpr.jaxpr))
