"""linear_cross_entropy: the fused head loss equals the unfused one.

The reference is jsoft's unfused loss of ``h @ W + b`` in float64, whose
values and gradients are themselves checked against float64 NumPy and
PyTorch elsewhere; here the fused loss must agree with it in value and in
the gradients with respect to ``hidden``, ``weight`` and ``bias``, for both
loop orders (over tokens when N ≥ V, over the vocabulary when N < V), tiles
that do not divide the axis, every option, and every autodiff mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoft
from jsoft import _compat
from tests import helpers

lce = jsoft.linear_cross_entropy
int_ce = jsoft.softmax_cross_entropy_with_integer_labels
rng = np.random.default_rng(7)
IGNORE = -100

# name: (N, D, V, chunk_size): tokens-first and vocabulary-first loops,
# tiles that divide the axis and tiles that need padding.
SHAPES = {
    "tokens": (12, 4, 5, 4),
    "tokens_padded": (13, 4, 5, 5),
    "vocab": (5, 4, 12, 4),
    "vocab_padded": (5, 3, 11, 4),
    "auto_chunk": (6, 3, 20, None),
}
OPTIONS = {
    "plain": {},
    "all": dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-2,
                logit_soft_cap=2.0, reduction="mean"),
    "weights_smoothing_sum": dict(ignore_index=IGNORE, label_smoothing=0.2,
                                  reduction="sum"),
    "temperature": dict(temperature=1.5),
    "all_temperature": dict(ignore_index=IGNORE, label_smoothing=0.1,
                            z_loss=1e-2, logit_soft_cap=2.0, temperature=0.6,
                            reduction="mean"),
}


def _problem(n, d, v, seed=0):
  r = np.random.default_rng(seed)
  h = r.normal(size=(n, d))
  w = r.normal(size=(d, v))
  b = r.normal(size=v)
  y = r.integers(0, v, size=n)
  y[1] = IGNORE
  return h, w, b, y


def _pair(opts, y, chunk, weights=None, tile_by=None):
  kw = dict(opts)
  if weights is not None:
    kw["class_weights"] = weights
  if "ignore_index" not in kw:
    y = np.where(y == IGNORE, 0, y)

  def fused(h, w, b):
    return lce(h, w, y, bias=b, chunk_size=chunk, tile_by=tile_by, **kw)

  def unfused(h, w, b):
    return int_ce(h @ w + b, y, **kw)

  return fused, unfused


CASES = [(shape, "plain") for shape in SHAPES] + [
    ("tokens_padded", "all"), ("vocab_padded", "all"), ("auto_chunk", "all"),
    ("tokens", "weights_smoothing_sum"), ("vocab", "weights_smoothing_sum"),
    ("tokens_padded", "temperature"), ("vocab_padded", "temperature"),
    ("tokens", "all_temperature"), ("vocab_padded", "all_temperature")]


@pytest.mark.parametrize("shape_name,opt_name", CASES)
def test_value_and_gradients_equal_the_unfused_loss(shape_name, opt_name):
  n, d, v, chunk = SHAPES[shape_name]
  h, w, b, y = _problem(n, d, v)
  weights = rng.uniform(0.5, 2.0, size=v) if opt_name != "plain" else None
  helpers.assert_same_value_and_vjp(
      *_pair(OPTIONS[opt_name], y, chunk, weights), h, w, b)


@pytest.mark.parametrize("shape_name,opt_name", [
    ("tokens_padded", "all"), ("vocab_padded", "all_temperature")])
def test_check_grads_every_mode(shape_name, opt_name):
  n, d, v, chunk = SHAPES[shape_name]
  h, w, b, y = _problem(n, d, v, seed=1)
  fused, _ = _pair(OPTIONS[opt_name], y, chunk,
                   rng.uniform(0.5, 2.0, size=v))
  check_grads(fused, (h, w, b), order=2, modes=("fwd", "rev"))


def test_hvp_and_hessian_match_the_unfused_loss():
  h, w, b, y = _problem(5, 3, 8, seed=2)
  fused, unfused = _pair(OPTIONS["all"], y, 3)
  v = rng.normal(size=w.shape)

  def hvp(f):
    grad_w = jax.grad(lambda w: f(h, w, b))
    return jax.jvp(grad_w, (w,), (v,))[1]

  np.testing.assert_allclose(hvp(fused), hvp(unfused), rtol=1e-11, atol=1e-13)
  hess = jax.hessian(lambda h: fused(h, w, b))(h)
  np.testing.assert_allclose(
      hess, jax.hessian(lambda h: unfused(h, w, b))(h), rtol=1e-11,
      atol=1e-13)


def test_batch_dimensions_jit_and_vmap():
  h = rng.normal(size=(2, 3, 4))
  w = rng.normal(size=(4, 6))
  y = rng.integers(0, 6, size=(2, 3))
  out = jax.jit(lambda h: lce(h, w, y, chunk_size=2))(h)
  assert out.shape == (2, 3)
  np.testing.assert_allclose(out, int_ce(h @ w, y), rtol=1e-13)
  per_row = jax.vmap(lambda h, y: lce(h, w, y, reduction="mean"))(h, y)
  np.testing.assert_allclose(per_row, int_ce(h @ w, y).mean(-1), rtol=1e-13)


def test_all_ignored_mean_is_zero_with_zero_gradients():
  h, w, b, _ = _problem(6, 3, 4)
  y = np.full(6, IGNORE)
  value, grads = jax.value_and_grad(
      lambda h, w, b: lce(h, w, y, bias=b, ignore_index=IGNORE,
                          reduction="mean", chunk_size=4),
      argnums=(0, 1, 2))(h, w, b)
  assert value == 0
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_ignored_rows_contribute_nothing_even_when_non_finite():
  h, w, b, y = _problem(6, 3, 4)
  h[1] = np.nan  # y[1] is ignored
  value, (gh, gw) = jax.value_and_grad(
      lambda h, w: lce(h, w, y, bias=b, ignore_index=IGNORE, reduction="sum",
                       chunk_size=4), argnums=(0, 1))(h, w)
  assert np.isfinite(value) and np.all(np.isfinite(gw))
  assert np.all(np.asarray(gh)[1] == 0)


def test_out_of_range_labels_give_nan():
  h, w, _, _ = _problem(4, 3, 5)
  loss = np.asarray(lce(h, w, np.array([0, 5, -1, 2])))
  assert np.isnan(loss[1]) and np.isnan(loss[2])
  assert np.all(np.isfinite(loss[[0, 3]]))


@pytest.mark.parametrize("n,v", [(16, 8), (4, 24)])
def test_bfloat16_inputs_accumulate_in_float32(n, v):
  # Its own draws: the module's generator hands each test different inputs
  # depending on which tests ran before it on the same worker.
  rng = np.random.default_rng(n * v)
  h32 = rng.normal(size=(n, 8)).astype(np.float32)
  w32 = rng.normal(size=(8, v)).astype(np.float32)
  y = rng.integers(0, v, size=n)
  h, w = jnp.asarray(h32, jnp.bfloat16), jnp.asarray(w32, jnp.bfloat16)
  loss = lce(h, w, y, chunk_size=4)
  assert loss.dtype == jnp.float32
  # float64 on the same rounded inputs: the logits are exact products summed
  # in float32, so the loss keeps float32 accuracy.
  ref = helpers.ce_int(np.asarray(h, np.float64) @ np.asarray(w, np.float64),
                       y)
  assert helpers.rel_err(loss, ref) < 1e-5
  gh, gw = jax.grad(lambda h, w: lce(h, w, y, reduction="mean",
                                     chunk_size=4), argnums=(0, 1))(h, w)
  assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  p = helpers.softmax(np.asarray(h, np.float64) @ np.asarray(w, np.float64))
  g = (p - np.eye(v)[y]) / n
  np.testing.assert_allclose(np.asarray(gw, np.float64),
                             np.asarray(h, np.float64).T @ g, rtol=2e-2,
                             atol=2e-3)


def test_tied_embeddings_pass_the_transpose():
  emb = rng.normal(size=(7, 4))  # [V, D]
  h = rng.normal(size=(9, 4))
  y = rng.integers(0, 7, size=9)
  g = jax.grad(lambda e: lce(h, e.T, y, reduction="mean", chunk_size=4))(emb)
  np.testing.assert_allclose(
      g, jax.grad(lambda e: int_ce(h @ e.T, y).mean())(emb), rtol=1e-12)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weight=np.ones((4, 5, 1))), ValueError, r"weight must have shape"),
    (dict(weight=np.ones((3, 5))), ValueError, r"hidden must have shape"),
    (dict(chunk_size=0), ValueError, "chunk_size must be at least 1"),
    (dict(bias=np.ones(4)), ValueError, r"bias must have shape \(5,\)"),
    (dict(labels=np.ones(6)), TypeError, "labels must be an integer"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(tile_by="rows"), ValueError, "tile_by must be one of"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
  args = dict(hidden=np.ones((6, 4)), weight=np.ones((4, 5)),
              labels=np.zeros(6, int))
  args.update(kwargs)
  with pytest.raises(error, match=match):
    lce(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize("shape_name", ["tokens_padded", "vocab_padded"])
def test_sample_weights_and_where_equal_the_unfused_loss(shape_name):
  n, d, v, chunk = SHAPES[shape_name]
  h, w, b, y = _problem(n, d, v, seed=3)
  s = rng.uniform(0.5, 2.0, size=n)
  mask = rng.uniform(size=n) > 0.3
  kw = dict(ignore_index=IGNORE, label_smoothing=0.1, temperature=0.8,
            class_weights=rng.uniform(0.5, 2.0, size=v), sample_weights=s,
            reduction="mean")

  def fused(h, w, b):
    return lce(h, w, y, bias=b, chunk_size=chunk, where=mask, **kw)

  def unfused(h, w, b):
    return int_ce(h @ w + b, y, where=mask, **kw)

  helpers.assert_same_value_and_vjp(fused, unfused, h, w, b, atol=0)


def test_where_is_ignore_index_per_token():
  h, w, b, y = _problem(7, 3, 5, seed=4)
  y = np.where(y == IGNORE, 0, y)
  mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
  h = h.copy()
  h[1] = np.nan  # a masked token's features never reach the gradients
  by_mask = lce(h, w, y, where=mask, reduction="mean")
  by_index = lce(h, w, np.where(mask, y, IGNORE), ignore_index=IGNORE,
                 reduction="mean")
  np.testing.assert_array_equal(by_mask, by_index)
  g = jax.grad(lambda w: lce(h, w, y, where=mask, reduction="sum"))(w)
  assert np.isfinite(g).all()
  with pytest.raises(ValueError, match="where"):
    lce(h, w, y, where=np.ones(8, bool))


# From 1024 tokens on, ignored tokens are gathered out of the loop and the
# tiles past the kept ones skipped: kept counts that end inside a tile, on
# none, and at every token, against the unfused loss.
COMPACT = {"tokens": (1024, 2, 6, 100), "classes": (1024, 2, 1500, 400)}


@pytest.mark.parametrize("loop", COMPACT)
@pytest.mark.parametrize("kept", [1.0, 0.6, 0.3, 0.1, 0.0])
def test_ignored_tokens_gathered_out_equal_the_unfused_loss(loop, kept):
  n, d, v, chunk = COMPACT[loop]
  r = np.random.default_rng(int(kept * 10))
  h, w = r.normal(size=(n, d)), r.normal(size=(d, v))
  y = r.integers(0, v, size=n)
  y[r.permutation(n)[:int(round((1 - kept) * n))]] = IGNORE
  h[y == IGNORE] = np.nan  # ignored features never reach a gradient
  kw = dict(ignore_index=IGNORE, label_smoothing=0.1, return_stats=True,
            reduction="mean")

  def total(f):
    def run(h, w):
      loss, st = f(h, w)
      return loss + jnp.mean(st.entropy) + jnp.mean(st.logprob)
    return run

  fused = lambda h, w: lce(h, w, y, chunk_size=chunk, **kw)  # noqa: E731
  safe = np.where(np.isnan(h), 0, h)
  unfused = lambda h, w: int_ce(  # noqa: E731
      jnp.where(jnp.asarray(y == IGNORE)[:, None], 0, h) @ w, y, **kw)
  got, want = fused(h, w), unfused(safe, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float),
                               rtol=1e-12, atol=1e-14)
  grads = jax.grad(total(fused), (0, 1))(h, w)
  for a, b in zip(grads, jax.grad(total(unfused), (0, 1))(safe, w),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
  assert np.isfinite(grads[0]).all()


@pytest.mark.parametrize("loop", COMPACT)
def test_gathered_out_tokens_under_vmap(loop):
  # Two sequences, one mostly ignored and one with nothing ignored: under
  # vmap the kept count differs per sequence, so every skip becomes a
  # select, and each sequence's dW still adds up tile by tile.
  n, d, v, chunk = COMPACT[loop]
  r = np.random.default_rng(3)
  h, w = r.normal(size=(2, n, d)), r.normal(size=(d, v))
  y = r.integers(0, v, size=(2, n))
  y[0, r.random(n) < 0.7] = IGNORE
  kw = dict(ignore_index=IGNORE, reduction="mean")

  def step(loss):
    return jax.vmap(jax.value_and_grad(loss, argnums=(0, 2)),
                    in_axes=(0, 0, None))

  got = step(lambda h, y, w: lce(h, w, y, chunk_size=chunk, **kw))(h, y, w)
  want = step(lambda h, y, w: int_ce(h @ w, y, **kw))(h, y, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("loop", COMPACT)
def test_gathered_out_tokens_in_forward_mode_and_hvp(loop):
  n, d, v, chunk = COMPACT[loop]
  r = np.random.default_rng(2)
  h, w = r.normal(size=(n, d)), r.normal(size=(d, v))
  y = np.where(r.random(n) < 0.8, IGNORE, r.integers(0, v, size=n))
  kw = dict(ignore_index=IGNORE, reduction="sum")
  fused = lambda w: lce(h, w, y, chunk_size=chunk, **kw)  # noqa: E731
  unfused = lambda w: int_ce(h @ w, y, **kw)  # noqa: E731
  t = r.normal(size=w.shape)
  np.testing.assert_allclose(jax.jvp(fused, (w,), (t,))[1],
                             jax.jvp(unfused, (w,), (t,))[1], rtol=1e-11)
  np.testing.assert_allclose(
      jax.jvp(jax.grad(fused), (w,), (t,))[1],
      jax.jvp(jax.grad(unfused), (w,), (t,))[1], rtol=1e-10, atol=1e-12)


def test_reduced_loss_over_token_tiles_forms_gradients_in_the_forward_pass():
  # Three matmuls per tile (logits, dh, dW), none recomputed in the
  # backward pass; a call that is not differentiated does one.
  n, d, v, chunk = SHAPES["tokens_padded"]
  h, w, b, y = _problem(n, d, v, seed=6)
  y = np.where(y == IGNORE, 0, y)

  def loss(h, w):
    return lce(h, w, y, chunk_size=chunk, reduction="mean")

  assert helpers.count_dots(jax.value_and_grad(loss, argnums=(0, 1)), h, w) == 3
  assert helpers.count_dots(loss, h, w) == 1
  if _compat.JAX_VERSION < (0, 7):
    pytest.skip("the rest held; needs jax >= 0.7, before which the jaxpr "
                "keeps the dead forward pass of the transpose fallback "
                f"(XLA drops it); this is jax {jax.__version__}")
  # Unreduced, the backward pass recomputes the logits: four.
  assert helpers.count_dots(jax.value_and_grad(
      lambda h, w: lce(h, w, y, chunk_size=chunk).sum(), argnums=(0, 1)),
      h, w) == 4


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_over_token_tiles_in_every_mode(reduction):
  n, d, v, chunk = SHAPES["tokens_padded"]
  h, w, b, y = _problem(n, d, v, seed=7)
  kw = dict(ignore_index=IGNORE, logit_soft_cap=2.0, z_loss=1e-2,
            temperature=0.9, sample_weights=rng.uniform(0.5, 2.0, size=n),
            reduction=reduction)
  fused = lambda h, w, b: lce(h, w, y, bias=b, chunk_size=chunk,  # noqa: E731
                              **kw)
  unfused = lambda h, w, b: int_ce(h @ w + b, y, **kw)  # noqa: E731
  t = tuple(rng.normal(size=x.shape) for x in (h, w, b))
  np.testing.assert_allclose(jax.jvp(fused, (h, w, b), t)[1],
                             jax.jvp(unfused, (h, w, b), t)[1], rtol=1e-12)
  hvp = jax.jvp(jax.grad(fused, (0, 1, 2)), (h, w, b), t)[1]
  want = jax.jvp(jax.grad(unfused, (0, 1, 2)), (h, w, b), t)[1]
  for a, c in zip(hvp, want, strict=True):
    np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)
  check_grads(lambda h, w: fused(h, w, b), (h, w), order=2,
              modes=("fwd", "rev"))


# tile_by turns the loop order around: each shape in the loop it would not
# get by default (token tiles at N < V, the last one overlapping; class
# tiles at N ≥ V), unreduced (a recompute pass) and reduced (over tokens,
# the gradients formed in the forward pass).
TILE_BY_CASES = [("tokens_padded", "classes"), ("vocab_padded", "tokens"),
                 ("vocab", "tokens")]


@pytest.mark.parametrize("shape_name,tile_by", TILE_BY_CASES)
@pytest.mark.parametrize("opt_name", ["plain", "all_temperature"])
def test_tile_by_either_loop_equals_the_unfused_loss(shape_name, tile_by,
                                                     opt_name):
  n, d, v, chunk = SHAPES[shape_name]
  h, w, b, y = _problem(n, d, v, seed=8)
  weights = rng.uniform(0.5, 2.0, size=v) if opt_name != "plain" else None
  helpers.assert_same_value_and_vjp(
      *_pair(OPTIONS[opt_name], y, chunk, weights, tile_by), h, w, b)


def test_token_tiles_at_fewer_tokens_than_classes_in_every_mode():
  n, d, v, chunk = SHAPES["vocab_padded"]
  h, w, b, y = _problem(n, d, v, seed=9)
  fused, _ = _pair(OPTIONS["all"], y, chunk, rng.uniform(0.5, 2.0, size=v),
                   "tokens")
  check_grads(fused, (h, w, b), order=2, modes=("fwd", "rev"))


def test_tile_by_picks_the_loop():
  # Reduced and differentiated, token tiles need three matmuls per tile
  # (the gradients formed in the forward pass), class tiles four (the
  # backward pass recomputes the logits), whatever the shape's default.
  def dots(shape_name, tile_by):
    n, d, v, chunk = SHAPES[shape_name]
    h, w, _, y = _problem(n, d, v, seed=10)
    y = np.where(y == IGNORE, 0, y)
    step = jax.value_and_grad(
        lambda h, w: lce(h, w, y, chunk_size=chunk, tile_by=tile_by,
                         reduction="mean"), argnums=(0, 1))
    return helpers.count_dots(step, h, w)

  assert dots("vocab_padded", "tokens") == 3
  assert dots("tokens_padded", "tokens") == 3
  if _compat.JAX_VERSION < (0, 7):
    pytest.skip("the rest held; needs jax >= 0.7, before which the jaxpr "
                "keeps the dead forward pass of the transpose fallback "
                f"(XLA drops it); this is jax {jax.__version__}")
  assert dots("vocab_padded", None) == 4
  assert dots("tokens_padded", "classes") == 4
