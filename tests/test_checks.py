"""Trace-time argument checks and the opt-in value checks of jsoft.checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoft
from jsoft import _checks
from tests import helpers

F32 = jnp.float32
X = jnp.zeros((4, 3), F32)
Y = jnp.asarray([0, 1, 2, 0])
int_ce = jsoft.softmax_cross_entropy_with_integer_labels


def _primitive_names(jaxpr):
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in helpers.jaxprs_in_params(eqn.params):
      names |= _primitive_names(sub)
  return names


class TestStaticChecks:

  @pytest.mark.parametrize("jit", [False, True])
  def test_integer_logits_rejected(self, jit):
    fn = jax.jit(int_ce) if jit else int_ce
    with pytest.raises(TypeError, match="softmax_cross_entropy_with_integer_"
                       "labels: logits must be a floating-point array, got "
                       "dtype int"):
      fn(jnp.zeros((4, 3), jnp.int32), Y)

  def test_float_integer_labels_rejected(self):
    with pytest.raises(TypeError, match="labels must be an integer array, got "
                       "dtype float32"):
      int_ce(X, Y.astype(F32))

  @pytest.mark.parametrize("jit", [False, True])
  def test_integer_label_shape(self, jit):
    fn = jax.jit(int_ce) if jit else int_ce
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\) "
                       r"\(the logits' shape \(4, 3\) without the class axes "
                       r"\(1,\)\), got \(4, 1\)"):
      fn(X, Y[:, None])

  def test_probability_label_shape(self):
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels must "
                       r"have shape \(4, 3\)"):
      jsoft.softmax_cross_entropy(X, jnp.zeros((4, 2), F32))

  def test_bce_shapes_must_broadcast(self):
    with pytest.raises(ValueError, match=r"sigmoid_binary_cross_entropy: "
                       r"logits and labels have shapes \(4, 3\), \(2,\)"):
      jsoft.sigmoid_binary_cross_entropy(X, jnp.zeros((2,), F32))

  def test_axis_name_list_becomes_a_tuple(self):
    # A list of mesh axis names is accepted (as a tuple, hashable for jit);
    # anything else unhashable is refused by name.
    assert _checks.axis_name(["dp", "tp"], "f") == ("dp", "tp")
    assert _checks.axis_name("tp", "f") == "tp"
    with pytest.raises(TypeError, match="jsoft.f: axis_name must be a mesh "
                       "axis name"):
      _checks.axis_name({"tp": 1}, "f")

  def test_axis_out_of_range(self):
    with pytest.raises(ValueError, match="softmax: axis 2 is out of range for "
                       "an array of rank 2"):
      jsoft.softmax(X, axis=2)

  def test_axis_type(self):
    with pytest.raises(TypeError, match="axis must be an int or a tuple"):
      jsoft.log_softmax(X, axis="last")
    with pytest.raises(TypeError, match="got None"):
      int_ce(X, Y, axis=None)

  def test_repeated_axis(self):
    with pytest.raises(ValueError, match="repeats an axis"):
      jsoft.logsumexp(X, axis=(1, -1))

  def test_where_must_be_boolean(self):
    with pytest.raises(TypeError, match="where must be a boolean array"):
      jsoft.softmax(X, where=jnp.ones((4, 3)))

  def test_where_shape(self):
    with pytest.raises(ValueError, match=r"where must have the logits' shape "
                       r"\(4, 3\) or the per-example shape \(4,\), got \(3,\)"):
      int_ce(X, Y, where=jnp.ones((3,), bool))

  def test_complex_rejected(self):
    with pytest.raises(TypeError, match="must be real"):
      jsoft.sigmoid(jnp.zeros(2, jnp.complex64))


class TestChecked:

  def test_passes_clean_input_through(self):
    out = jsoft.checked(jax.jit(int_ce))(X, Y)
    np.testing.assert_allclose(out, np.full(4, np.log(3)), rtol=1e-6)

  @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
  def test_non_finite_logits_raise_naming_the_function(self, bad):
    x = X.at[1, 2].set(bad)
    with pytest.raises(AssertionError, match="jsoft.softmax_cross_entropy_"
                       "with_integer_labels: logits must be finite"):
      jsoft.checked(jax.jit(int_ce))(x, Y)

  @pytest.mark.parametrize("label", [-1, 3, -100])
  def test_out_of_range_labels_raise(self, label):
    with pytest.raises(AssertionError, match=r"labels \(smallest, largest\) "
                       r"must lie in \[0, 3\)"):
      jsoft.checked(int_ce)(X, Y.at[2].set(label))

  def test_masked_examples_are_not_checked(self):
    y = Y.at[0].set(-100)
    x = X.at[0, 0].set(np.nan)
    where = jnp.asarray([False, True, True, True])
    out = jsoft.checked(int_ce)(x, y, where=where)
    assert out[0] == 0.0

  @pytest.mark.parametrize("fn, args, what", [
      (jsoft.softmax, (X.at[0, 0].set(np.nan),), "softmax: x"),
      (jsoft.log_softmax, (X.at[0, 0].set(np.inf),), "log_softmax: x"),
      (jsoft.logsumexp, (X.at[0, 0].set(np.nan),), "logsumexp: a"),
      (jsoft.sigmoid, (X.at[0, 0].set(np.nan),), "sigmoid: x"),
      (jsoft.log_sigmoid, (X.at[0, 0].set(np.nan),), "log_sigmoid: x"),
      (jsoft.softmax_cross_entropy, (X, X.at[0, 0].set(np.nan)),
       "softmax_cross_entropy: labels"),
      (jsoft.sigmoid_binary_cross_entropy, (X.at[0, 0].set(np.inf), X),
       "sigmoid_binary_cross_entropy: logits"),
  ])
  def test_every_function_checks_its_inputs(self, fn, args, what):
    with pytest.raises(AssertionError, match=f"jsoft.{what} must be finite"):
      jsoft.checked(fn)(*args)

  def test_inside_a_jitted_training_step(self):
    w = jnp.ones((3, 3), F32)

    @jax.jit
    def step(w, x, y):
      loss, grad = jax.value_and_grad(
          lambda w: jnp.mean(int_ce(x @ w, y)))(w)
      return loss, w - 0.1 * grad

    checked_step = jsoft.checked(step)
    loss, _ = checked_step(w, X, Y)
    np.testing.assert_allclose(loss, np.log(3), rtol=1e-6)
    with pytest.raises(AssertionError, match="labels"):
      checked_step(w, X, Y.at[0].set(7))
    with pytest.raises(AssertionError, match="logits must be finite"):
      checked_step(w, X.at[0, 0].set(np.nan), Y)

  def test_checks_a_function_already_compiled_without_them(self):
    step = jax.jit(lambda x, y: int_ce(x, y).sum())
    y = Y.at[0].set(9)
    assert np.isnan(step(X, y))  # compiled and cached, unchecked
    with pytest.raises(AssertionError, match="labels"):
      jsoft.checked(step)(X, y)
    assert np.isnan(step(X, y))  # the unchecked version is still unchecked

  def test_under_vmap(self):
    fn = jsoft.checked(jax.jit(jax.vmap(int_ce)))
    with pytest.raises(AssertionError, match="logits must be finite"):
      fn(X.at[0, 0].set(np.nan)[None], Y[None])

  def test_unchecked_program_has_no_checking_code(self):
    def step(x, y):
      return jax.grad(lambda x: int_ce(x, y).sum())(x)

    plain = _primitive_names(jax.make_jaxpr(step)(X, Y).jaxpr)
    assert "check" not in plain
    # The same program traced inside `checked` (whatever ran before this
    # test): the value checks exist, and only `checked` turns them on.
    seen = {}

    def probe(x, y):
      seen["names"] = _primitive_names(jax.make_jaxpr(step)(x, y).jaxpr)
      return step(x, y)

    jsoft.checked(probe)(X, Y)
    assert seen["names"] - plain

  def test_unchecked_hlo_is_unchanged_by_the_check_machinery(self):
    lowered = jax.jit(lambda x, y: int_ce(x, y)).lower(X, Y).as_text()
    assert "check" not in lowered.lower().replace("is_finite", "")
