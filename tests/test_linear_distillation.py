"""linear_distillation_loss against the textbook formula on materialised
logits (``helpers.jax_linear_distill``, float64, differentiated by JAX) and
against jsoft's own unfused composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoft
from jsoft import _compat
from tests import helpers

ld = jsoft.linear_distillation_loss
IGNORE = -100


def _problem(n=37, ds=5, dt=6, v=11, seed=0):
  r = np.random.default_rng(seed)
  hs, ws = r.normal(size=(n, ds)), r.normal(size=(ds, v))
  ht, wt = r.normal(size=(n, dt)), r.normal(size=(dt, v))
  bs, bt = r.normal(size=v), r.normal(size=v)
  y = r.integers(0, v, size=n)
  y[::4] = IGNORE
  return hs, ws, bs, ht, wt, bt, y


def _compare(kw, chunk, seed=0, n=37):
  hs, ws, bs, ht, wt, bt, y = _problem(n=n, seed=seed)

  def ours(hs, ws, bs):
    return ld(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=y,
              ignore_index=IGNORE, chunk_size=chunk, **kw)

  def ref(hs, ws, bs):
    return helpers.jax_linear_distill(hs, ws, ht, wt, bs, bt, y,
                                      ignore_index=IGNORE, **kw)

  helpers.assert_same_value_and_vjp(ours, ref, hs, ws, bs, rtol=1e-10,
                                    atol=1e-12, vjp_rtol=1e-10,
                                    vjp_atol=1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("hard", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_matches_textbook_formula_on_materialised_logits(kind, temp, hard,
                                                         reduction):
  # 8-token tiles: the last one overlaps the one before (37 tokens).
  _compare(dict(divergence=kind, beta=0.3, temperature=temp,
                hard_weight=hard, reduction=reduction), chunk=8)


@pytest.mark.parametrize("chunk", [1, 37, 64, None])
def test_any_tile_size(chunk):
  _compare(dict(divergence="jsd", hard_weight=0.5, reduction="sum"), chunk)


def test_equals_unfused_jsoft_composition_and_leading_axes():
  hs, ws, bs, ht, wt, bt, y = _problem(n=24)
  shape = (2, 12)
  got = ld(hs.reshape(*shape, -1), ws, ht.reshape(*shape, -1), wt,
           student_bias=bs, teacher_bias=bt, labels=y.reshape(shape),
           ignore_index=IGNORE, divergence="reverse_kl", temperature=1.5)
  s, t = hs @ ws + bs, ht @ wt + bt
  want = jsoft.distillation_loss(s, t, divergence="reverse_kl",
                                 temperature=1.5)
  want = np.where(y == IGNORE, 0, want).reshape(shape)
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_without_labels_every_token_counts():
  hs, ws, _, ht, wt, _, _ = _problem()
  got = ld(hs, ws, ht, wt, reduction="mean", chunk_size=8)
  want = jsoft.distillation_loss(hs @ ws, ht @ wt, reduction="mean")
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_check_grads_order_2(reduction, kind):
  hs, ws, bs, ht, wt, bt, y = _problem(n=10, v=7, seed=3)

  def f(hs, ws, bs):
    return ld(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=y,
              ignore_index=IGNORE, hard_weight=0.25, divergence=kind,
              temperature=2.0, chunk_size=4, reduction=reduction)

  check_grads(f, (hs, ws, bs), order=2, modes=["fwd", "rev"])


def test_teacher_gets_no_gradient():
  hs, ws, bs, ht, wt, bt, y = _problem()
  for reduction in ("none", "mean"):
    grads = jax.grad(lambda ht, wt, bt, r=reduction: jnp.sum(ld(
        hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=y,
        ignore_index=IGNORE, reduction=r)), argnums=(0, 1, 2))(
            ht, wt, bt)
    for g in grads:
      np.testing.assert_array_equal(g, 0)


def test_matmuls_per_tile():
  # Reduced: both heads' logits, dh and dW, all in the forward pass: four,
  # as many as the unfused loss's forward and backward. A call that is not
  # differentiated does two; per token, the backward pass recomputes both
  # tiles of logits: six. Never one for the teacher's gradients.
  hs, ws, _, ht, wt, _, y = _problem()

  def mean(hs, ws):
    return ld(hs, ws, ht, wt, labels=y, ignore_index=IGNORE, chunk_size=8,
              reduction="mean")

  def each(hs, ws):
    return ld(hs, ws, ht, wt, chunk_size=8).sum()

  dots = helpers.count_dots
  assert dots(jax.value_and_grad(mean, argnums=(0, 1)), hs, ws) == 4
  assert dots(mean, hs, ws) == 2
  if _compat.JAX_VERSION < (0, 7):
    pytest.skip("the rest held; needs jax >= 0.7, before which the jaxpr "
                "keeps the dead forward pass of the transpose fallback "
                f"(XLA drops it); this is jax {jax.__version__}")
  assert dots(jax.value_and_grad(each, argnums=(0, 1)), hs, ws) == 6


def test_all_tokens_ignored_gives_zero_loss_and_gradient():
  hs, ws, _, ht, wt, _, _ = _problem()
  y = np.full(hs.shape[0], IGNORE)
  v, g = jax.value_and_grad(lambda hs, ws: ld(
      hs, ws, ht, wt, labels=y, ignore_index=IGNORE, reduction="mean",
      hard_weight=0.5), argnums=(0, 1))(hs, ws)
  assert v == 0
  for x in g:
    np.testing.assert_array_equal(x, 0)


def test_ignored_tokens_keep_nan_features_out():
  hs, ws, _, ht, wt, _, y = _problem()
  hs = hs.copy()
  hs[0] = np.nan  # token 0 is ignored
  v, (gh, gw) = jax.value_and_grad(lambda hs, ws: ld(
      hs, ws, ht, wt, labels=y, ignore_index=IGNORE, reduction="mean"),
      argnums=(0, 1))(hs, ws)
  assert np.isfinite(v) and np.all(np.isfinite(gw))
  np.testing.assert_array_equal(gh[0], 0)


def test_hard_label_out_of_range_gives_nan():
  hs, ws, _, ht, wt, _, y = _problem()
  y = y.copy()
  y[1] = 11
  loss = ld(hs, ws, ht, wt, labels=y, ignore_index=IGNORE, hard_weight=0.5)
  assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(loss, 1)))
  # Without the hard loss the labels only mark ignored tokens.
  assert np.all(np.isfinite(ld(hs, ws, ht, wt, labels=y,
                               ignore_index=IGNORE)))


def test_16_bit_inputs():
  hs, ws, _, ht, wt, _, _ = _problem()
  b = [jnp.asarray(x, jnp.bfloat16) for x in (hs, ws, ht, wt)]
  got = ld(*b, temperature=2.0)
  assert got.dtype == jnp.float32
  want = helpers.np_distill(helpers.f64(b[0]) @ helpers.f64(b[1]),
                            helpers.f64(b[2]) @ helpers.f64(b[3]),
                            temperature=2.0)
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-3)


def test_vmap_and_jvp():
  hs, ws, _, ht, wt, _, _ = _problem(n=12)
  f = lambda hs, ht: ld(hs, ws, ht, wt, chunk_size=4)  # noqa: E731
  batched = jax.vmap(f)(np.stack([hs, 2 * hs]), np.stack([ht, ht]))
  np.testing.assert_allclose(batched[1], f(2 * hs, ht), rtol=1e-12)
  tangent = np.random.default_rng(1).normal(size=hs.shape)
  _, got = jax.jvp(lambda hs: f(hs, ht), (hs,), (tangent,))
  _, want = jax.jvp(lambda hs: helpers.jax_linear_distill(hs, ws, ht, wt),
                    (hs,), (tangent,))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kw,error,match", [
    (dict(hard_weight=0.5, labels=None), ValueError, "needs labels"),
    (dict(ignore_index=-1, labels=None), ValueError, "needs labels"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(hard_weight=1.5), ValueError, "hard_weight"),
    (dict(divergence="tvd"), ValueError, "divergence"),
    (dict(labels=np.zeros(37)), TypeError, "labels must be an integer"),
])
def test_argument_errors(kw, error, match):
  hs, ws, _, ht, wt, _, y = _problem()
  kw = dict(dict(labels=y), **kw)
  with pytest.raises(error, match=match):
    ld(hs, ws, ht, wt, **kw)


def test_shape_errors():
  hs, ws, _, ht, wt, _, _ = _problem()
  with pytest.raises(ValueError, match="vocabulary"):
    ld(hs, ws, ht, wt[:, :5])
  with pytest.raises(ValueError, match="student_hidden must have shape"):
    ld(hs[:, :3], ws, ht, wt)
  with pytest.raises(ValueError, match="teacher_hidden must have shape"):
    ld(hs, ws, ht[:5], wt)
