"""Per-token statistics (return_stats=True): TokenStats of the integer-label
loss and of the fused head, against float64 SciPy and autodiff of the
formulas; sharded statistics against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jsoft
from tests import helpers

int_ce = jsoft.softmax_cross_entropy_with_integer_labels
lce = jsoft.linear_cross_entropy
IGNORE = -100
N, C = 6, 7
rng = np.random.default_rng(21)
X = rng.normal(scale=2.0, size=(N, C))
Y = rng.integers(0, C, size=N)
Y[1] = IGNORE
Y[3] = int(np.argmax(X[3]))  # a correct prediction
Y[4] = 2
X[4, [2, 5]] = X[4].max() + 1.0  # a tie at the label and a later class
X[5, [0, 6]] = X[5].max() + 1.0  # a tie before the label
Y[5] = 6


def _reference(x, y, cap=None, temperature=1.0, where=None):
  """float64 statistics of the rows whose label is kept."""
  z = x if cap is None else cap * np.tanh(x / cap)
  z = z / temperature
  if where is not None:
    z = np.where(where, z, -np.inf)
  kept = y != IGNORE
  safe = np.where(kept, y, 0)
  logp = sp.log_softmax(z, -1)
  p = np.exp(logp)
  with np.errstate(invalid="ignore"):
    entropy = -np.sum(np.where(p > 0, p * logp, 0), -1)
  return (np.where(kept, logp[np.arange(len(y)), safe], 0),
          np.where(kept, sp.logsumexp(z, -1), 0), np.where(kept, entropy, 0),
          kept & (np.argmax(z, -1) == safe))


@pytest.mark.parametrize("cap,temperature", [(None, 1.0), (None, 0.6),
                                             (2.5, 1.0), (2.5, 1.7)])
def test_statistics_match_float64_reference(cap, temperature):
  _, stats = int_ce(X, Y, ignore_index=IGNORE, logit_soft_cap=cap,
                    temperature=temperature, return_stats=True)
  assert isinstance(stats, jsoft.TokenStats)
  want = _reference(X, Y, cap, temperature)
  for got, ref in zip(stats[:3], want[:3], strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-15)
  np.testing.assert_array_equal(stats.correct, want[3])
  assert stats.correct.dtype == jnp.bool_


@helpers.needs_jax((0, 8), "older XLA:CPU compiles the loss with and without "
                   "the statistics into sums that round apart by ulps")
@pytest.mark.parametrize("cap,temperature", [(None, 1.0), (None, 0.6),
                                             (2.5, 1.0), (2.5, 1.7)])
def test_statistics_change_nothing_about_the_loss(cap, temperature):
  kw = dict(ignore_index=IGNORE, logit_soft_cap=cap, temperature=temperature)
  loss, _ = int_ce(X, Y, return_stats=True, **kw)
  np.testing.assert_array_equal(loss, int_ce(X, Y, **kw))


def test_ties_go_to_the_lowest_index_as_argmax():
  _, stats = int_ce(X, Y, ignore_index=IGNORE, return_stats=True)
  assert stats.correct[3]            # the argmax
  assert stats.correct[4]            # tied with a later class: the label
  assert not stats.correct[5]        # tied with an earlier class
  np.testing.assert_array_equal(stats.correct,
                                (jnp.argmax(X, -1) == Y) & (Y != IGNORE))


def test_statistics_ignore_smoothing_z_loss_and_weights():
  kw = dict(ignore_index=IGNORE, return_stats=True)
  _, plain = int_ce(X, Y, **kw)
  _, with_options = int_ce(X, Y, label_smoothing=0.2, z_loss=1e-2,
                           class_weights=rng.uniform(0.5, 2, C),
                           sample_weights=rng.uniform(0.5, 2, N),
                           reduction="mean", **kw)
  for a, b in zip(plain, with_options, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-14)


def test_masked_and_out_of_range_tokens():
  where = np.ones((N, C), bool)
  where[0, :3] = False
  rows = np.array([True, True, True, False, True, True])
  y = Y.copy()
  y[2] = C + 4  # out of range
  _, stats = int_ce(X, y, where=where, ignore_index=IGNORE,
                    return_stats=True)
  want = _reference(X, np.where(np.arange(N) == 2, 0, y), where=where)
  np.testing.assert_allclose(stats.entropy[0], want[2][0], rtol=1e-13)
  assert np.isnan(stats.logprob[2]) and not stats.correct[2]
  assert np.isfinite(stats.entropy[2]) and np.isfinite(stats.logsumexp[2])
  _, stats = int_ce(X, Y, where=rows, ignore_index=IGNORE,
                    return_stats=True)
  for i in (1, 3):  # ignored, masked
    assert (stats.logprob[i], stats.logsumexp[i], stats.entropy[i],
            bool(stats.correct[i])) == (0, 0, 0, False)


def _softmax_parts(x):
  p = sp.softmax(x, -1)
  logp = sp.log_softmax(x, -1)
  entropy = -np.sum(p * logp, -1, keepdims=True)
  return p, logp, entropy


def test_gradients_are_softmax_times_row_numbers_minus_onehot():
  kept = (Y != IGNORE)[:, None]
  onehot = np.eye(C)[np.where(Y == IGNORE, 0, Y)]
  p, logp, entropy = _softmax_parts(X)

  def grad_of(field):
    return jax.grad(lambda x: jnp.sum(getattr(int_ce(
        x, Y, ignore_index=IGNORE, return_stats=True)[1], field)))(X)

  np.testing.assert_allclose(grad_of("logprob"), (onehot - p) * kept,
                             rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(grad_of("logsumexp"), p * kept, rtol=1e-12,
                             atol=1e-15)
  np.testing.assert_allclose(grad_of("entropy"), -p * (logp + entropy) * kept,
                             rtol=1e-12, atol=1e-15)


def _mixed(x):
  # The loss and every differentiable statistic, with distinct weights.
  loss, st = int_ce(x, Y, ignore_index=IGNORE, label_smoothing=0.1,
                    logit_soft_cap=3.0, temperature=1.4, return_stats=True)
  return loss + 0.3 * st.logprob + 0.7 * st.logsumexp - 1.1 * st.entropy


def _mixed_reference(x):
  loss = helpers.jax_ce_int(x, jnp.asarray(Y), ignore_index=IGNORE,
                            label_smoothing=0.1, logit_soft_cap=3.0,
                            temperature=1.4)
  z = 3.0 * jnp.tanh(x / 3.0) / 1.4
  kept = jnp.asarray(Y != IGNORE)
  safe = jnp.where(kept, jnp.asarray(Y), 0)
  logp = jax.nn.log_softmax(z)
  lp = jnp.take_along_axis(logp, safe[:, None], -1)[:, 0]
  lse = jax.nn.logsumexp(z, -1)
  ent = -jnp.sum(jnp.exp(logp) * logp, -1)
  return loss + jnp.where(kept, 0.3 * lp + 0.7 * lse - 1.1 * ent, 0)


def test_every_autodiff_mode_through_the_statistics():
  np.testing.assert_allclose(_mixed(X), _mixed_reference(X), rtol=1e-13)
  f = lambda x: jnp.sum(_mixed(x))  # noqa: E731
  ref = lambda x: jnp.sum(_mixed_reference(x))  # noqa: E731
  np.testing.assert_allclose(jax.hessian(f)(X), jax.hessian(ref)(X),
                             rtol=1e-9, atol=1e-12)
  check_grads(_mixed, (X,), order=2, modes=("fwd", "rev"))


# --------------------------------------------------------- the fused head

# (N, D, V, chunk): the token loop and the class loop, tiles that do and do
# not divide the axis.
LCE_SHAPES = [(13, 3, 5, 5), (12, 3, 6, 4), (5, 3, 11, 4), (4, 3, 16, 4)]


@pytest.mark.parametrize("n,d,v,chunk", LCE_SHAPES)
def test_fused_statistics_equal_the_unfused_ones(n, d, v, chunk):
  r = np.random.default_rng(n * v)
  h, w = r.normal(size=(n, d)), r.normal(scale=2.0, size=(d, v))
  y = r.integers(0, v, size=n)
  y[0] = IGNORE
  y[1] = int(np.argmax((h @ w)[1]))
  kw = dict(ignore_index=IGNORE, logit_soft_cap=3.0, temperature=0.8,
            return_stats=True, reduction="mean")

  def fused(h, w):
    return lce(h, w, y, chunk_size=chunk, **kw)

  def unfused(h, w):
    return int_ce(h @ w, y, **kw)

  assert fused(h, w)[1].correct[1]
  helpers.assert_same_value_and_vjp(fused, unfused, h, w, atol=1e-15)


def test_fused_statistics_every_autodiff_mode():
  r = np.random.default_rng(5)
  h, w = r.normal(size=(5, 3)), r.normal(size=(3, 9))
  y = r.integers(0, 9, size=5)

  def f(h, w):
    loss, st = lce(h, w, y, chunk_size=4, temperature=1.3,
                   return_stats=True)
    return loss + 0.5 * st.entropy - st.logprob

  check_grads(f, (h, w), order=2, modes=("fwd", "rev"))


# ---------------------------------------------------------------- sharded

pytestmark_sharded = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices")


@pytestmark_sharded
@pytest.mark.parametrize("vma", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_sharded_statistics_equal_one_device(vma, fused):
  mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
  r = np.random.default_rng(9)
  h, w = r.normal(size=(6, 3)), r.normal(scale=2.0, size=(3, 16))
  y = r.integers(0, 16, size=6)
  y[2] = IGNORE
  y[3] = int(np.argmax((h @ w)[3]))
  kw = dict(ignore_index=IGNORE, temperature=0.9, return_stats=True)

  def local(h, w):
    if fused:
      return lce(h, w, y, chunk_size=3, axis_name="tp", **kw)
    return int_ce(h @ w, y, axis_name="tp", **kw)

  sharded = helpers.shard_map(local, mesh=mesh,
                              in_specs=(P(), P(None, "tp")), out_specs=P(),
                              check_vma=vma)

  assert jax.jit(sharded)(h, w)[1].correct[3]
  helpers.assert_same_value_and_vjp(
      jax.jit(sharded), lambda h, w: int_ce(h @ w, y, **kw), h, w,
      rtol=1e-12)
