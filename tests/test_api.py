"""The public surface: names, signatures, and jitted entry points."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoft

PEERS = {
    "logsumexp": jax.nn.logsumexp,
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "sigmoid": jax.nn.sigmoid,
    "log_sigmoid": jax.nn.log_sigmoid,
    "softmax_cross_entropy": optax.softmax_cross_entropy,
    "softmax_cross_entropy_with_integer_labels":
        optax.softmax_cross_entropy_with_integer_labels,
    "sigmoid_binary_cross_entropy": optax.sigmoid_binary_cross_entropy,
    "kl_divergence": optax.losses.kl_divergence,
    "kl_divergence_with_log_targets":
        optax.losses.kl_divergence_with_log_targets,
}


# jsoft's own additions: no peer to match.
NEW = ("checked", "linear_cross_entropy", "TokenStats", "distillation_loss",
       "linear_distillation_loss", "policy_loss", "PolicyStats",
       "preference_loss", "PreferenceStats", "linear_policy_loss",
       "linear_preference_loss")
STATS = ("TokenStats", "PolicyStats", "PreferenceStats")


def test_exports():
  assert sorted(jsoft.__all__) == sorted([*PEERS, *NEW])
  for name in jsoft.__all__:
    assert callable(getattr(jsoft, name))
  assert jsoft.TokenStats._fields == ("logprob", "logsumexp", "entropy",
                                      "correct")


@pytest.mark.parametrize("name", sorted(PEERS))
def test_same_parameters_as_the_peer(name):
  ours = inspect.signature(getattr(jsoft, name)).parameters
  theirs = dict(inspect.signature(PEERS[name]).parameters)
  # jax < 0.6: jax.nn's softmax and log_softmax still list their deprecated
  # ``initial``, which jsoft never took.
  deprecated = theirs.pop("initial", None)
  # The peer's parameters, in order, with its defaults and kinds; anything
  # more (the training options) is keyword-only, so every call written for
  # the peer means the same thing here.
  assert list(ours)[:len(theirs)] == list(theirs)
  for p in theirs:
    assert ours[p].default == theirs[p].default, p
    assert ours[p].kind == theirs[p].kind, p
  for p in list(ours)[len(theirs):]:
    assert ours[p].kind == inspect.Parameter.KEYWORD_ONLY, p
  if deprecated is not None:
    pytest.skip("the rest matched; needs jax >= 0.6, where jax.nn dropped "
                f"the deprecated `initial`; this is jax {jax.__version__}")


@pytest.mark.parametrize("name", sorted([
    *PEERS, "linear_cross_entropy", "distillation_loss",
    "linear_distillation_loss", "policy_loss", "preference_loss",
    "linear_policy_loss", "linear_preference_loss"]))
def test_documented_with_formula_and_derivative(name):
  doc = getattr(jsoft, name).__doc__
  assert ".. math::" in doc
  assert "Derivative" in doc or "Gradient" in doc
  assert "Examples:" in doc


ARGS = {
    "logsumexp": (jnp.ones((2, 3)),),
    "softmax": (jnp.ones((2, 3)),),
    "log_softmax": (jnp.ones((2, 3)),),
    "sigmoid": (jnp.ones((2, 3)),),
    "log_sigmoid": (jnp.ones((2, 3)),),
    "softmax_cross_entropy": (jnp.ones((2, 3)), jnp.ones((2, 3)) / 3),
    "softmax_cross_entropy_with_integer_labels": (jnp.ones((2, 3)),
                                                  jnp.array([0, 2])),
    "sigmoid_binary_cross_entropy": (jnp.ones((2, 3)), jnp.zeros((2, 3))),
    "kl_divergence": (jnp.zeros((2, 3)), jnp.ones((2, 3)) / 3),
    "kl_divergence_with_log_targets": (jnp.zeros((2, 3)), jnp.zeros((2, 3))),
}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_eager_call_is_one_jitted_computation(name):
  # The whole function is a single jit call (static axis), so an eager call
  # dispatches one compiled program instead of running op by op.
  jaxpr = jax.make_jaxpr(getattr(jsoft, name))(*ARGS[name]).jaxpr
  assert len(jaxpr.eqns) == 1
  assert jaxpr.eqns[0].primitive.name in ("pjit", "jit")


@pytest.mark.parametrize("name", sorted(PEERS))
def test_same_answers_as_the_peer_on_ordinary_inputs(name):
  args = [np.asarray(a, np.float64) if a.dtype.kind == "f" else np.asarray(a)
          for a in ARGS[name]]
  args[0] = args[0] * np.array([[0.5, -1.0, 2.0]])
  np.testing.assert_allclose(getattr(jsoft, name)(*args),
                             PEERS[name](*map(jnp.asarray, args)),
                             rtol=1e-14)


def _documented_args(doc):
  """The names the docstring's ``Args:`` section describes: each entry is
  a line at the section's indent (with its deeper continuation lines), and
  names one or more parameters, comma-separated, before its first colon."""
  section = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
  lines = [line for line in section.splitlines() if line.strip()]
  indent = len(lines[0]) - len(lines[0].lstrip())
  entries = []
  for line in lines:
    if len(line) - len(line.lstrip()) == indent:
      entries.append(line.strip())
    else:
      entries[-1] += " " + line.strip()
  return {name.strip() for entry in entries
          for name in entry.split(":", 1)[0].split(",")}


@pytest.mark.parametrize("name", sorted(set(jsoft.__all__) - set(STATS)))
def test_every_parameter_documented_under_args_and_a_returns_section(name):
  fn = getattr(jsoft, name)
  doc = inspect.getdoc(fn)
  assert "Args:" in doc and "Returns:" in doc, name
  assert doc.index("Args:") < doc.index("Returns:"), name
  assert _documented_args(doc) == set(inspect.signature(fn).parameters)


@pytest.mark.parametrize("name", STATS)
def test_stats_document_every_field(name):
  stats = getattr(jsoft, name)
  for field in stats._fields:
    assert f"``{field}``:" in stats.__doc__, field
