"""The training options against PyTorch, in float64, values and gradients.

``torch.nn.functional.cross_entropy`` and ``binary_cross_entropy_with_logits``
define what ``ignore_index``, ``label_smoothing``, ``class_weights`` (torch's
``weight``), ``pos_weight`` and ``reduction`` mean, alone and combined. The
z-loss and the logit soft cap have no torch option; their references are
written in torch from the formulas (``λ·logsumexp²``, ``a·tanh(x/a)``) and
differentiated by torch's autograd.
"""

import itertools

import jax
import numpy as np
import pytest

import jsoft

torch = pytest.importorskip(
    "torch", reason="PyTorch is the reference for the loss options; install "
    "it with: python -m pip install -e \".[test,torch]\"")
F = torch.nn.functional

TOL = dict(rtol=1e-10, atol=1e-12)
N, C = 9, 6
IGNORE = -100
rng = np.random.default_rng(0)
X = rng.normal(scale=3.0, size=(N, C))
Y = rng.integers(0, C, size=N)
Y[[2, 5]] = IGNORE
W = rng.uniform(0.2, 3.0, size=C)
P = rng.dirichlet(np.ones(C), size=N)
CT = rng.normal(size=N)  # cotangent for reduction="none"
int_ce = jsoft.softmax_cross_entropy_with_integer_labels


def _torch_value_and_grad(fn, x, ct):
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  out = fn(xt)
  out.backward(torch.tensor(ct, dtype=torch.float64).reshape(out.shape))
  return out.detach().numpy(), xt.grad.numpy()


def _jax_value_and_grad(fn, x, ct):
  out, pullback = jax.vjp(fn, x)
  (g,) = pullback(np.asarray(ct, out.dtype).reshape(out.shape))
  return np.asarray(out), np.asarray(g)


def _assert_same(ours, theirs, x, reduction):
  ct = CT if reduction == "none" else np.array(1.7)
  v, g = _jax_value_and_grad(ours, x, ct)
  tv, tg = _torch_value_and_grad(theirs, x, ct)
  np.testing.assert_allclose(v, tv, **TOL)
  np.testing.assert_allclose(g, tg, **TOL)


# ------------------------------------------------------- integer labels


INT_OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": IGNORE},
    "smoothing": {"label_smoothing": 0.15},
    "weights": {"class_weights": W},
    "ignore_smoothing": {"ignore_index": IGNORE, "label_smoothing": 0.3},
    "ignore_weights": {"ignore_index": IGNORE, "class_weights": W},
    "weights_smoothing": {"class_weights": W, "label_smoothing": 0.2},
    "all": {"ignore_index": IGNORE, "class_weights": W,
            "label_smoothing": 0.1},
}


def _labels_for(opts):
  # Without ignore_index every label must be a class.
  return Y if "ignore_index" in opts else np.where(Y == IGNORE, 1, Y)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("name", sorted(INT_OPTIONS))
def test_integer_labels_match_torch(name, reduction):
  opts = INT_OPTIONS[name]
  y = _labels_for(opts)

  def ours(x):
    return int_ce(x, y, reduction=reduction, **opts)

  def theirs(x):
    weight = opts.get("class_weights")
    return F.cross_entropy(
        x, torch.tensor(y), reduction=reduction,
        weight=None if weight is None else torch.tensor(weight),
        ignore_index=opts.get("ignore_index", IGNORE),
        label_smoothing=opts.get("label_smoothing", 0.0))

  _assert_same(ours, theirs, X, reduction)


def _torch_extras(x, y, weight, z_loss, cap, reduction, smoothing=0.0):
  """torch's cross-entropy on soft-capped logits plus λ·lse², reduced as
  jsoft documents: "mean" is the sum over the Σ w_y of kept targets."""
  z = x if cap is None else cap * torch.tanh(x / cap)
  y = torch.tensor(y)
  w = None if weight is None else torch.tensor(weight)
  per = F.cross_entropy(z, y, weight=w, ignore_index=IGNORE,
                        label_smoothing=smoothing, reduction="none")
  kept = y != IGNORE
  per = per + z_loss * torch.logsumexp(z, -1) ** 2 * kept
  if reduction == "none":
    return per
  if reduction == "sum":
    return per.sum()
  share = kept.double() if w is None else torch.where(
      kept, w[torch.where(kept, y, 0)], 0.0)
  return per.sum() / share.sum()


# (z_loss, logit_soft_cap, class weights, smoothing), at least one of the
# first two set: the others are covered by test_integer_labels_match_torch.
EXTRA = [combo for combo in itertools.product(
    [0.0, 1e-2], [None, 2.5], [None, W], [0.0, 0.1])
         if combo[0] or combo[1] is not None]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("z_loss,cap,weight,smoothing", EXTRA)
def test_z_loss_and_soft_cap_match_torch_formulas(z_loss, cap, weight,
                                                  smoothing, reduction):
  def ours(x):
    return int_ce(x, Y, ignore_index=IGNORE, z_loss=z_loss,
                  logit_soft_cap=cap, class_weights=weight,
                  label_smoothing=smoothing, reduction=reduction)

  def theirs(x):
    return _torch_extras(x, Y, weight, z_loss, cap, reduction, smoothing)

  _assert_same(ours, theirs, X * 4, reduction)


def test_class_axes_other_than_last_match_torch():
  # torch puts the classes on axis 1 of [B, C, T]; jsoft takes axis=1 too.
  x = rng.normal(size=(3, C, 4))
  y = rng.integers(0, C, size=(3, 4))
  y[0, 1] = IGNORE

  def ours(x):
    return int_ce(x, y, axis=1, ignore_index=IGNORE, class_weights=W,
                  label_smoothing=0.2, reduction="mean")

  def theirs(x):
    return F.cross_entropy(x, torch.tensor(y), weight=torch.tensor(W),
                           label_smoothing=0.2, reduction="mean")

  _assert_same(ours, theirs, x, "mean")


def test_example_mask_means_over_selected_examples():
  # where=False drops an example exactly as an ignored target does.
  keep = Y != IGNORE
  y = np.where(keep, Y, 0)

  def ours(x):
    return int_ce(x, y, where=keep, class_weights=W, label_smoothing=0.1,
                  reduction="mean")

  def theirs(x):
    return F.cross_entropy(x, torch.tensor(Y), weight=torch.tensor(W),
                           label_smoothing=0.1, reduction="mean")

  _assert_same(ours, theirs, X, "mean")


# ------------------------------------------------------ probability labels


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_probability_labels_match_torch(smoothing, reduction):
  def ours(x):
    return jsoft.softmax_cross_entropy(x, P, label_smoothing=smoothing,
                                       reduction=reduction)

  def theirs(x):
    return F.cross_entropy(x, torch.tensor(P), label_smoothing=smoothing,
                           reduction=reduction)

  _assert_same(ours, theirs, X, reduction)


@pytest.mark.parametrize("z_loss,cap", [(1e-2, None), (0.0, 2.0), (3e-3, 1.5)])
def test_probability_labels_z_loss_and_soft_cap(z_loss, cap):
  def ours(x):
    return jsoft.softmax_cross_entropy(x, P, label_smoothing=0.1,
                                       z_loss=z_loss, logit_soft_cap=cap,
                                       reduction="mean")

  def theirs(x):
    z = x if cap is None else cap * torch.tanh(x / cap)
    per = F.cross_entropy(z, torch.tensor(P), label_smoothing=0.1,
                          reduction="none")
    return (per + z_loss * torch.logsumexp(z, -1) ** 2).mean()

  _assert_same(ours, theirs, X * 3, "mean")


# ------------------------------------------------------------ binary


BIN_T = rng.uniform(size=(N, C))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("pos_weight", [None, W, np.float64(3.0)])
def test_binary_matches_torch(pos_weight, reduction):
  def ours(x):
    return jsoft.sigmoid_binary_cross_entropy(x, BIN_T, pos_weight=pos_weight,
                                              reduction=reduction)

  def theirs(x):
    pw = None if pos_weight is None else torch.tensor(pos_weight)
    return F.binary_cross_entropy_with_logits(
        x, torch.tensor(BIN_T), pos_weight=pw, reduction=reduction)

  ct = rng.normal(size=(N, C)) if reduction == "none" else np.array(0.9)
  v, g = _jax_value_and_grad(ours, X, ct)
  tv, tg = _torch_value_and_grad(theirs, X, ct)
  np.testing.assert_allclose(v, tv, **TOL)
  np.testing.assert_allclose(g, tg, **TOL)


def test_binary_where_means_over_selected_entries():
  mask = rng.uniform(size=(N, C)) < 0.7

  def ours(x):
    return jsoft.sigmoid_binary_cross_entropy(x, BIN_T, pos_weight=W,
                                              where=mask, reduction="mean")

  def theirs(x):
    per = F.binary_cross_entropy_with_logits(
        x, torch.tensor(BIN_T), pos_weight=torch.tensor(W), reduction="none")
    m = torch.tensor(mask)
    return torch.where(m, per, 0.0).sum() / m.sum()

  v, g = _jax_value_and_grad(ours, X, np.array(1.0))
  tv, tg = _torch_value_and_grad(theirs, X, np.array(1.0))
  np.testing.assert_allclose(v, tv, **TOL)
  np.testing.assert_allclose(g, tg, **TOL)


# ----------------------------------------------- where torch gives NaN


def test_all_ignored_mean_is_zero_where_torch_is_nan():
  y = np.full(N, IGNORE)
  xt = torch.tensor(X)
  assert torch.isnan(F.cross_entropy(xt, torch.tensor(y), reduction="mean"))
  value, grad = jax.value_and_grad(
      lambda x: int_ce(x, y, ignore_index=IGNORE, class_weights=W,
                       label_smoothing=0.1, z_loss=1e-3,
                       reduction="mean"))(X)
  assert value == 0.0
  assert np.all(np.asarray(grad) == 0.0)
