"""Sharded losses on 8 host CPU devices against the single-device results.

``conftest.py`` asks JAX for 8 CPU devices before it initialises. Inside
``shard_map`` the class axis (or the head weight's V axis) is split over
mesh axis "tp" and jsoft is told so with ``axis_name="tp"``; under plain
``jit`` the inputs carry ``NamedSharding``s and XLA partitions the program.
Either way the values and gradients must be the single-device ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoft

int_ce = jsoft.softmax_cross_entropy_with_integer_labels
prob_ce = jsoft.softmax_cross_entropy
lce = jsoft.linear_cross_entropy
IGNORE = -100

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (conftest asks JAX for "
    "8 CPU devices before it initialises)")


def _mesh(shape=(8,), names=("tp",)):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape),
              names)


rng = np.random.default_rng(3)
N, C = 6, 16
X = rng.normal(scale=3.0, size=(N, C))
Y = rng.integers(0, C, size=N)
Y[2] = IGNORE
W = rng.uniform(0.5, 2.0, size=C)
T = rng.dirichlet(np.ones(C), size=N)
ALL = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-2,
           logit_soft_cap=2.0)
OPTIONS = {
    "ignore": dict(ignore_index=IGNORE),
    "all_none": dict(ALL),
    "all_mean": dict(ALL, reduction="mean"),
    "all_sum": dict(ALL, reduction="sum"),
}


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _value_and_grads(f, *args):
  out = f(*args)
  ct = rng.normal(size=np.shape(out))
  _, pull = jax.vjp(f, *args)
  return out, pull(ct), ct


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_integer_labels_in_shard_map(name):
  kw = OPTIONS[name]

  def local(x, w):
    return int_ce(x, Y, class_weights=w, axis_name="tp", **kw)

  sharded = jax.jit(jax.shard_map(local, mesh=_mesh(),
                                  in_specs=(P(None, "tp"), P("tp")),
                                  out_specs=P()))
  out = sharded(X, W)
  _close(out, int_ce(X, Y, class_weights=W, **kw))
  ct = rng.normal(size=np.shape(out))
  (g,) = jax.vjp(lambda x: sharded(x, W), X)[1](ct)
  (g_ref,) = jax.vjp(lambda x: int_ce(x, Y, class_weights=W, **kw), X)[1](ct)
  _close(g, g_ref)


def test_integer_labels_forward_mode_and_hvp_in_shard_map():
  def local(x):
    return int_ce(x, Y, axis_name="tp", **ALL)

  sharded = jax.jit(jax.shard_map(local, mesh=_mesh(), in_specs=P(None, "tp"),
                                  out_specs=P()))
  v = rng.normal(size=X.shape)
  _close(jax.jvp(sharded, (X,), (v,))[1],
         jax.jvp(lambda x: int_ce(x, Y, **ALL), (X,), (v,))[1])
  hvp = jax.jvp(jax.grad(lambda x: sharded(x).sum()), (X,), (v,))[1]
  _close(hvp, jax.jvp(jax.grad(lambda x: int_ce(x, Y, **ALL).sum()), (X,),
                      (v,))[1])


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_probability_labels_in_shard_map(reduction):
  kw = dict(label_smoothing=0.2, z_loss=1e-2, logit_soft_cap=2.5,
            reduction=reduction)

  def local(x, t):
    return prob_ce(x, t, axis_name="tp", **kw)

  sharded = jax.jit(jax.shard_map(local, mesh=_mesh(),
                                  in_specs=(P(None, "tp"), P(None, "tp")),
                                  out_specs=P()))
  out, (gx, gt), ct = _value_and_grads(sharded, X, T)
  ref_out, pull = jax.vjp(lambda x, t: prob_ce(x, t, **kw), X, T)
  _close(out, ref_out)
  rx, rt = pull(ct)
  _close(gx, rx)
  _close(gt, rt)


# (N, D, V, chunk): token loops (N ≥ V/8) and vocabulary loops (N < V/8).
LCE_SHAPES = [(40, 3, 16, 8), (24, 4, 32, None), (3, 3, 64, 3),
              (4, 2, 72, None)]


@pytest.mark.parametrize("n,d,v,chunk", LCE_SHAPES)
def test_linear_cross_entropy_in_shard_map(n, d, v, chunk):
  h = rng.normal(size=(n, d))
  w = rng.normal(size=(d, v))
  b = rng.normal(size=v)
  cw = rng.uniform(0.5, 2.0, size=v)
  y = rng.integers(0, v, size=n)
  y[1] = IGNORE
  kw = dict(ALL, class_weights=cw, reduction="mean")

  def local(h, w, b, cw):
    return lce(h, w, y, bias=b, chunk_size=chunk, axis_name="tp",
               **dict(kw, class_weights=cw))

  sharded = jax.jit(jax.shard_map(
      local, mesh=_mesh(), in_specs=(P(), P(None, "tp"), P("tp"), P("tp")),
      out_specs=P()))

  def ref(h, w, b):
    return int_ce(h @ w + b, y, **kw)

  _close(sharded(h, w, b, cw), ref(h, w, b))
  grads = jax.grad(lambda h, w, b: sharded(h, w, b, cw), argnums=(0, 1, 2))(
      h, w, b)
  for got, want in zip(grads, jax.grad(ref, argnums=(0, 1, 2))(h, w, b),
                       strict=True):
    _close(got, want)


def test_data_and_vocab_parallel_mean_over_the_global_batch():
  # Batch over "dp", classes over "tp": each device sums its examples'
  # losses and counts them; one psum over "dp" gives the global mean.
  x = rng.normal(size=(8, C))
  y = rng.integers(0, C, size=8)
  y[[1, 6]] = IGNORE

  def local(x, y):
    total = int_ce(x, y, ignore_index=IGNORE, label_smoothing=0.1,
                   axis_name="tp", reduction="sum")
    kept = jnp.sum(y != IGNORE).astype(total.dtype)
    return jax.lax.psum(total, "dp") / jax.lax.psum(kept, "dp")

  step = jax.jit(jax.shard_map(
      local, mesh=_mesh((2, 4), ("dp", "tp")),
      in_specs=(P("dp", "tp"), P("dp")), out_specs=P()))
  ref = lambda x: int_ce(x, y, ignore_index=IGNORE,  # noqa: E731
                         label_smoothing=0.1, reduction="mean")
  _close(step(x, y), ref(x))
  _close(jax.grad(step)(x, y), jax.grad(ref)(x))


def test_plain_jit_with_named_shardings():
  mesh = _mesh((2, 4), ("dp", "tp"))
  x = jax.device_put(rng.normal(size=(8, C)),
                     NamedSharding(mesh, P("dp", "tp")))
  y = np.where(rng.uniform(size=8) < 0.3, IGNORE, rng.integers(0, C, 8))
  y = jax.device_put(y, NamedSharding(mesh, P("dp")))
  kw = dict(ALL, reduction="mean")
  f = jax.jit(jax.value_and_grad(lambda x, y: int_ce(x, y, **kw)))
  value, grad = f(x, y)
  ref_value, ref_grad = jax.value_and_grad(
      lambda x: int_ce(x, np.asarray(y), **kw))(np.asarray(x))
  _close(value, ref_value)
  _close(grad, ref_grad)
  t = jax.device_put(rng.dirichlet(np.ones(C), size=8),
                     NamedSharding(mesh, P("dp", "tp")))
  _close(jax.jit(lambda x, t: prob_ce(x, t, reduction="mean"))(x, t),
         prob_ce(np.asarray(x), np.asarray(t), reduction="mean"))


def test_plain_jit_linear_cross_entropy_with_named_shardings():
  mesh = _mesh((2, 4), ("dp", "tp"))
  h = jax.device_put(rng.normal(size=(16, 4)), NamedSharding(mesh, P("dp")))
  w = jax.device_put(rng.normal(size=(4, 32)),
                     NamedSharding(mesh, P(None, "tp")))
  y = rng.integers(0, 32, size=16)
  y[3] = IGNORE
  kw = dict(ignore_index=IGNORE, reduction="mean")
  f = jax.jit(jax.value_and_grad(
      lambda h, w: lce(h, w, y, chunk_size=4, **kw), argnums=(0, 1)))
  value, grads = f(h, w)
  ref = jax.value_and_grad(lambda h, w: int_ce(h @ w, y, **kw),
                           argnums=(0, 1))(np.asarray(h), np.asarray(w))
  _close(value, ref[0])
  for got, want in zip(grads, ref[1], strict=True):
    _close(got, want)


def test_axis_name_needs_one_class_axis_and_example_masks():
  def local(x):
    return int_ce(x, Y, where=np.ones((N, 2), bool), axis_name="tp")

  with pytest.raises(ValueError, match="per-example mask"):
    jax.jit(jax.shard_map(local, mesh=_mesh(), in_specs=P(None, "tp"),
                          out_specs=P()))(X)
