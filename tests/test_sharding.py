"""Sharded losses on 8 host CPU devices against single-device references.

``conftest.py`` asks JAX for 8 CPU devices before it initialises. The
matrix runs every loss in both ``shard_map`` modes (``check_vma=True`` and
``False``) and in every placement a user can pick on a 2×4 ("dp", "tp")
mesh, with and without the training options, and compares the value, the
gradient and a Hessian-vector product with the textbook formula on one
device in float64, differentiated by JAX's own autodiff
(``tests/helpers.py``). Under plain ``jit`` the inputs carry
``NamedSharding``s instead and XLA partitions the program.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoft
from tests import helpers

int_ce = jsoft.softmax_cross_entropy_with_integer_labels
prob_ce = jsoft.softmax_cross_entropy
bce = jsoft.sigmoid_binary_cross_entropy
lce = jsoft.linear_cross_entropy
distill = jsoft.distillation_loss
ld = jsoft.linear_distillation_loss
IGNORE = -100

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (conftest asks JAX for "
    "8 CPU devices before it initialises)")


def _mesh(shape=(8,), names=("tp",)):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape),
              names)


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ the matrix
#
# Arguments by role: x logits [rows, C]; t dense labels [rows, C] (the
# probability CE's targets, BCE's labels); y integer labels [rows]; h hidden
# [rows, D]; w head weight [D, C]; b bias [C]; cw class weights [C]; s
# teacher logits [rows, C]; g, u, c the teacher's hidden, weight and bias.


class Placement(NamedTuple):
  axis_name: str | None  # the mesh axis the classes are split over
  split: str | None      # None, "batch" (rows over dp), "labels" (only the
                         # labels over dp: inputs replicated)
  specs: dict


PLACEMENTS = {
    # Classes split over tp, replicated over dp.
    "classes": Placement("tp", None, dict(
        x=P(None, "tp"), t=P(None, "tp"), y=P(), h=P(), w=P(None, "tp"),
        b=P("tp"), cw=P("tp"), s=P(None, "tp"), g=P(), u=P(None, "tp"),
        c=P("tp"))),
    # Rows over dp, classes over tp.
    "dp_tp": Placement("tp", "batch", dict(
        x=P("dp", "tp"), t=P("dp", "tp"), y=P("dp"), h=P("dp"),
        w=P(None, "tp"), b=P("tp"), cw=P("tp"), s=P("dp", "tp"), g=P("dp"),
        u=P(None, "tp"), c=P("tp"))),
    # Rows over dp; the head weight replicated.
    "batch": Placement(None, "batch", dict(
        x=P("dp"), t=P("dp"), y=P("dp"), h=P("dp"), w=P(), b=P(), cw=P(),
        s=P("dp"), g=P("dp"), u=P(), c=P())),
    # Every input replicated, the labels split over dp.
    "replicated": Placement(None, "labels", dict(
        x=P(), t=P("dp"), y=P("dp"), h=P(), w=P(), b=P(), cw=P(), s=P("dp"),
        g=P(), u=P(), c=P())),
    # Inputs replicated over dp with classes over tp, labels split over dp.
    "replicated_tp": Placement("tp", "labels", dict(
        x=P(None, "tp"), t=P("dp", "tp"), y=P("dp"), h=P(), w=P(None, "tp"),
        b=P("tp"), cw=P("tp"), s=P("dp", "tp"), g=P(), u=P(None, "tp"),
        c=P("tp"))),
}


class Loss(NamedTuple):
  args: tuple[str, ...]
  diff: tuple[str, ...]   # the arguments differentiated
  labels: tuple[str, ...]  # split with the labels
  call: object            # (arrays, axis_name, options) -> loss
  ref: object             # (arrays, options) -> loss, textbook formula
  options: dict           # name -> keyword arguments


ALL_INT = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-2,
               logit_soft_cap=2.0, class_weights=True, temperature=0.7)
ALL_PROB = dict(label_smoothing=0.1, z_loss=1e-2, logit_soft_cap=2.0,
                temperature=1.5)


def _int_kw(a, kw):
  kw = dict(kw)
  if kw.pop("class_weights", False):
    kw["class_weights"] = a["cw"]
  return kw


LOSSES = {
    "int": Loss(
        ("x", "y", "cw"), ("x",), ("y",),
        lambda a, ax, kw: int_ce(a["x"], a["y"], axis_name=ax,
                                 **_int_kw(a, kw)),
        lambda a, kw: helpers.jax_ce_int(a["x"], a["y"], **_int_kw(a, kw)),
        dict(plain={}, all=ALL_INT)),
    "prob": Loss(
        ("x", "t"), ("x", "t"), ("t",),
        lambda a, ax, kw: prob_ce(a["x"], a["t"], axis_name=ax, **kw),
        lambda a, kw: helpers.jax_ce_prob(a["x"], a["t"], **kw),
        dict(plain={}, all=ALL_PROB)),
    "lce": Loss(
        ("h", "w", "b", "y", "cw"), ("h", "w", "b"), ("y",),
        lambda a, ax, kw: lce(a["h"], a["w"], a["y"], bias=a["b"],
                              chunk_size=3, axis_name=ax, **_int_kw(a, kw)),
        lambda a, kw: helpers.jax_ce_int(a["h"] @ a["w"] + a["b"], a["y"],
                                         **_int_kw(a, kw)),
        dict(plain={}, all=ALL_INT)),
    "bce": Loss(
        ("x", "t"), ("x", "t"), ("t",),
        lambda a, ax, kw: bce(a["x"], a["t"], **kw),
        lambda a, kw: helpers.jax_bce(a["x"], a["t"], **kw),
        dict(plain={}, all=dict(pos_weight=1.5))),
    # The student's logits x against the teacher's s (split with the labels
    # when only the labels are).
    "distill": Loss(
        ("x", "s"), ("x",), ("s",),
        lambda a, ax, kw: distill(a["x"], a["s"], **kw),
        lambda a, kw: helpers.jax_distill(a["x"], a["s"], **kw),
        dict(plain={}, all=dict(divergence="jsd", beta=0.3, temperature=1.5),
             reverse=dict(divergence="reverse_kl", temperature=0.7))),
    "ld": Loss(
        ("h", "w", "b", "g", "u", "c", "y"), ("h", "w", "b"), ("y",),
        lambda a, ax, kw: ld(a["h"], a["w"], a["g"], a["u"],
                             student_bias=a["b"], teacher_bias=a["c"],
                             labels=a["y"], chunk_size=3, axis_name=ax, **kw),
        lambda a, kw: helpers.jax_linear_distill(
            a["h"], a["w"], a["g"], a["u"], a["b"], a["c"], a["y"], **kw),
        dict(plain={}, all=dict(ignore_index=IGNORE, hard_weight=0.3,
                                divergence="jsd", beta=0.3, temperature=1.5),
             reverse=dict(ignore_index=IGNORE, divergence="reverse_kl",
                          temperature=0.7))),
}
# Losses without axis_name: only the placements that keep the classes whole.
WHOLE_ROWS = ("bce", "distill")

ROWS, C, D = 8, 16, 3  # 8 rows: 4 per dp device; 16 classes: 4 per tp one


def _data(loss, split, with_ignored, seed):
  """Global float64 arrays: inputs have half the labels' rows when only the
  labels are split."""
  rng = np.random.default_rng(seed)
  rows_in = ROWS // 2 if split == "labels" else ROWS
  y = rng.integers(0, C, size=ROWS)
  if with_ignored:
    y[[1, 6]] = IGNORE
  t = (rng.uniform(size=(ROWS, C)) if loss == "bce"
       else rng.dirichlet(np.ones(C), size=ROWS))
  made = dict(x=rng.normal(scale=2.0, size=(rows_in, C)), t=t, y=y,
              h=rng.normal(size=(rows_in, D)), w=rng.normal(size=(D, C)),
              b=rng.normal(size=C), cw=rng.uniform(0.5, 2.0, size=C),
              s=rng.normal(scale=2.0, size=(ROWS, C)),
              g=rng.normal(size=(rows_in, D + 1)),
              u=rng.normal(size=(D + 1, C)), c=rng.normal(size=C))
  return {k: made[k] for k in LOSSES[loss].args}


def _reduction(place, option):
  if option == "plain":
    return "none"
  return "mean" if place.split is None else "sum"


def _sharded(loss, place, kw, reduction, vma):
  spec = LOSSES[loss]

  def local(*arrays):
    out = spec.call(dict(zip(spec.args, arrays, strict=True)),
                    place.axis_name, dict(kw, reduction=reduction))
    if place.split is not None and reduction == "sum":
      out = jax.lax.psum(out, "dp")
    return out

  out_spec = P("dp") if place.split and reduction == "none" else P()
  return helpers.shard_map(local, mesh=_mesh((2, 4), ("dp", "tp")),
                           in_specs=tuple(place.specs[n] for n in spec.args),
                           out_specs=out_spec, check_vma=vma)


def _reference(loss, place, kw, reduction):
  spec = LOSSES[loss]

  def ref(*arrays):
    a = dict(zip(spec.args, arrays, strict=True))
    if place.split != "labels":
      return spec.ref(a, dict(kw, reduction=reduction))
    halves = []
    for part in (slice(0, ROWS // 2), slice(ROWS // 2, ROWS)):
      one = dict(a, **{n: a[n][part] for n in spec.labels})
      halves.append(spec.ref(one, dict(kw, reduction=reduction)))
    return (jnp.concatenate(halves) if reduction == "none"
            else halves[0] + halves[1])

  return ref


def _value_grad_hvp(f, names, diff, args, ct, tangents):
  """The value, the VJP of ``ct`` and the HVP of ``⟨ct, f⟩`` along
  ``tangents``, with respect to the arguments ``diff``."""
  def scalar(*d):
    full = dict(zip(names, args, strict=True))
    full.update(zip(diff, d, strict=True))
    return jnp.sum(f(*(full[n] for n in names)) * ct)

  primal = tuple(args[names.index(n)] for n in diff)
  grad = jax.grad(scalar, argnums=tuple(range(len(diff))))
  return f(*args), grad(*primal), jax.jvp(grad, primal, tangents)[1]


CASES = [(loss, place, option, vma)
         for loss in LOSSES for place in PLACEMENTS
         for option in LOSSES[loss].options for vma in (True, False)
         if not (loss in WHOLE_ROWS and PLACEMENTS[place].axis_name)]


@pytest.mark.parametrize("loss,place,option,vma", CASES)
def test_shard_map_matches_one_device(loss, place, option, vma):
  spec, placement = LOSSES[loss], PLACEMENTS[place]
  kw = spec.options[option]
  reduction = _reduction(placement, option)
  data = _data(loss, placement.split, "ignore_index" in kw, seed=len(CASES))
  args = tuple(data[n] for n in spec.args)
  ref_f = _reference(loss, placement, kw, reduction)
  ref_out = ref_f(*args)
  rng = np.random.default_rng(7)
  ct = rng.uniform(0.5, 1.5, size=np.shape(ref_out))
  tangents = tuple(rng.normal(size=data[n].shape) for n in spec.diff)

  got = jax.jit(lambda a, ct, v: _value_grad_hvp(
      _sharded(loss, placement, kw, reduction, vma), spec.args, spec.diff, a,
      ct, v))(args, ct, tangents)
  want = _value_grad_hvp(ref_f, spec.args, spec.diff, args, ct, tangents)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _close(g, w)


# ------------------------------------------------- plain jit, NamedSharding

JIT_LAYOUTS = {
    "int": [dict(x=P("dp", "tp"), y=P("dp")), dict(x=P(None, "tp"), y=P()),
            dict(x=P("dp"), y=P("dp"))],
    "prob": [dict(x=P("dp", "tp"), t=P("dp", "tp")),
             dict(x=P(None, "tp"), t=P("dp"))],
    "bce": [dict(x=P("dp", "tp"), t=P("dp", "tp")), dict(x=P("dp"), t=P())],
    "lce": [dict(h=P("dp"), w=P(None, "tp"), b=P("tp")),
            dict(h=P("dp"), w=P(), b=P()),
            dict(h=P(), w=P(None, "tp"), b=P("tp"), y=P())],
    "distill": [dict(x=P("dp", "tp"), s=P("dp", "tp")),
                dict(x=P("dp"), s=P(None, "tp"))],
    "ld": [dict(h=P("dp"), w=P(None, "tp"), b=P("tp"), g=P("dp"),
                u=P(None, "tp"), c=P("tp")),
           dict(h=P("dp"), w=P(), g=P(), u=P(None, "tp"), y=P("dp"))],
}


# XLA's SPMD partitioner before jax 0.6 breaks the gather of integer labels.
OLD_GATHER = helpers.needs_jax((0, 6), "the HLO verifier rejects the "
                               "partitioned label gather before")
# jax 0.4.38's partitioner rejects the fused distillation head's label
# gather, and without it gives a wrong value (4x: the tp axis); 0.7.2 is
# the oldest release tested correct.
OLD_PARTITIONER = helpers.needs_jax((0, 7, 2), "XLA's SPMD partitioner "
                                    "mis-partitions the fused distillation "
                                    "head's token loop before (tested on "
                                    "0.4.38; 0.7.2 is right)")
JIT_MARKS = {"int": OLD_GATHER, "ld": OLD_PARTITIONER}


@pytest.mark.parametrize("loss,layout,option", [
    pytest.param(loss, i, option, marks=JIT_MARKS.get(loss, ()))
    for loss in JIT_LAYOUTS
    for i in range(len(JIT_LAYOUTS[loss])) for option in LOSSES[loss].options])
def test_jit_with_named_shardings_matches_one_device(loss, layout, option):
  spec = LOSSES[loss]
  kw = dict(spec.options[option], reduction="none" if option == "plain"
            else "mean")
  data = _data(loss, None, "ignore_index" in kw, seed=layout)
  mesh = _mesh((2, 4), ("dp", "tp"))
  placed = tuple(
      jax.device_put(data[n], NamedSharding(mesh, JIT_LAYOUTS[loss][layout]
                                            .get(n, P())))
      for n in spec.args)
  args = tuple(data[n] for n in spec.args)

  def f(*arrays):
    return spec.call(dict(zip(spec.args, arrays, strict=True)), None, kw)

  def ref(*arrays):
    return spec.ref(dict(zip(spec.args, arrays, strict=True)), kw)

  rng = np.random.default_rng(11)
  ct = rng.uniform(0.5, 1.5, size=np.shape(ref(*args)))
  tangents = tuple(rng.normal(size=data[n].shape) for n in spec.diff)
  got = jax.jit(lambda a, ct, v: _value_grad_hvp(
      f, spec.args, spec.diff, a, ct, v))(placed, ct, tangents)
  want = _value_grad_hvp(ref, spec.args, spec.diff, args, ct, tangents)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _close(g, w)


# ------------------------------------------------------ fused-head loops

rng = np.random.default_rng(3)
ALL = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-2,
           logit_soft_cap=2.0)
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

  sharded = jax.jit(helpers.shard_map(
      local, mesh=_mesh(), in_specs=(P(), P(None, "tp"), P("tp"), P("tp")),
      out_specs=P()))

  def ref(h, w, b):
    return int_ce(h @ w + b, y, **kw)

  helpers.assert_same_value_and_vjp(
      lambda h, w, b: sharded(h, w, b, cw), ref, h, w, b, rtol=1e-10,
      atol=1e-12, vjp_rtol=1e-10, vjp_atol=1e-12)


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

  step = jax.jit(helpers.shard_map(
      local, mesh=_mesh((2, 4), ("dp", "tp")),
      in_specs=(P("dp", "tp"), P("dp")), out_specs=P()))
  ref = lambda x: int_ce(x, y, ignore_index=IGNORE,  # noqa: E731
                         label_smoothing=0.1, reduction="mean")
  _close(step(x, y), ref(x))
  _close(jax.grad(step)(x, y), jax.grad(ref)(x))


def test_axis_name_needs_one_class_axis_and_example_masks():
  x, y = rng.normal(size=(6, C)), rng.integers(0, C, size=6)

  def local(x):
    return int_ce(x, y, where=np.ones((6, 2), bool), axis_name="tp")

  with pytest.raises(ValueError, match="per-example mask"):
    jax.jit(helpers.shard_map(local, mesh=_mesh(), in_specs=P(None, "tp"),
                              out_specs=P()))(x)


@pytest.mark.parametrize("vma", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_fused_head_over_token_tiles_data_parallel(vma, reduction):
  # At least as many tokens per device as classes, reduced: the gradients
  # are formed in the forward pass (jsoft._drivers.reduced). Each device's
  # are its tokens' share, summed once for the replicated weight. Raised
  # a type error under check_vma=True before.
  n, d, v = 32, 3, 8
  h, w = rng.normal(size=(n, d)), rng.normal(size=(d, v))
  y = rng.integers(0, v, size=n)
  y[3] = IGNORE

  def local(h, w, y):
    total = lce(h, w, y, ignore_index=IGNORE, chunk_size=5, reduction="sum")
    if reduction == "sum":
      return jax.lax.psum(total, "dp")
    kept = jnp.sum(y != IGNORE).astype(total.dtype)
    return jax.lax.psum(total, "dp") / jax.lax.psum(kept, "dp")

  step = jax.jit(jax.value_and_grad(helpers.shard_map(
      local, mesh=_mesh((2,), ("dp",)), in_specs=(P("dp"), P(), P("dp")),
      out_specs=P(), check_vma=vma), argnums=(0, 1)))
  ref = jax.value_and_grad(lambda h, w: helpers.jax_ce_int(
      h @ w, y, ignore_index=IGNORE, reduction=reduction), argnums=(0, 1))
  for got, want in zip(jax.tree.leaves(step(h, w, y)),
                       jax.tree.leaves(ref(h, w)), strict=True):
    _close(got, want)


@pytest.mark.parametrize("vma", [True, False])
@pytest.mark.parametrize("head", ["tokens", "classes", "distillation"])
def test_gathered_out_ignored_tokens_on_a_dp_tp_mesh(vma, head):
  # From 1024 tokens on, ignored tokens are gathered behind the kept ones
  # and the tiles past them skipped (a cond per tile): with the tokens
  # split over dp and the classes over tp, the value and the gradients of
  # h and W equal the float64 reference, in both shard_map modes.
  n, d, v, chunk = 2 * 1100, 3, 8, 96
  h, w = rng.normal(size=(n, d)), rng.normal(size=(d, v))
  ht, wt = rng.normal(size=(n, 2)), rng.normal(size=(2, v))
  y = rng.integers(0, v, size=n)
  y[rng.random(n) < 0.6] = IGNORE
  kept = y != IGNORE

  def local(h, w, ht, wt, y):
    if head == "distillation":
      per = jsoft.linear_distillation_loss(
          h, w, ht, wt, labels=y, ignore_index=IGNORE, hard_weight=0.3,
          chunk_size=chunk, axis_name="tp")
    else:
      per = lce(h, w, y, ignore_index=IGNORE, chunk_size=chunk,
                tile_by=head, axis_name="tp")
    return jax.lax.psum(jnp.sum(per), "dp")

  spec = P(None, "tp")
  step = jax.jit(jax.value_and_grad(helpers.shard_map(
      local, mesh=_mesh((2, 2), ("dp", "tp")),
      in_specs=(P("dp"), spec, P("dp"), spec, P("dp")), out_specs=P(),
      check_vma=vma), argnums=(0, 1)))

  def ref(h, w):
    s = h @ w
    ce = helpers.jax_ce_int(s, np.where(kept, y, 0))
    if head == "distillation":
      soft = helpers.jax_distill(s, ht @ wt)
      ce = 0.7 * soft + 0.3 * ce
    return jnp.sum(jnp.where(kept, ce, 0))

  for got, want in zip(jax.tree.leaves(step(h, w, ht, wt, y)),
                       jax.tree.leaves(jax.value_and_grad(ref, (0, 1))(h, w)),
                       strict=True):
    _close(got, want)
