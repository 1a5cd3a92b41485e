"""Smoke test: ``python -m bench experiments --quick`` end to end.

Trains the three models with both losses on the digits, and the character
LM with both heads (under a minute), and checks what the experiment
claims: the same loss curves, held-out accuracy of at least 0.9, curvature
through jsoft that matches float64, and an LM that learns more than the
text's character frequencies.
"""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the experiments need scikit-learn: "
                    "python -m pip install -e \".[experiments]\"")
pytest.importorskip("equinox", reason="the experiments need Equinox: "
                    "python -m pip install -e \".[experiments]\"")
pytest.importorskip("flax", reason="the experiments need Flax: "
                    "python -m pip install -e \".[experiments]\"")

from bench import cli  # noqa: E402
from bench import lm as lm_bench  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("experiments")
  # Users run with JAX's default promotion (optax mixes Python floats and
  # int32 counters, which the suite's strict mode rejects).
  with jax.numpy_dtype_promotion("standard"):
    result = cli.main(["experiments", "--quick", "--json",
                       str(out / "e.json"), "--plot", str(out / "e.png"),
                       "--lm-plot", str(out / "lm.png")])
  return result, out


def test_jsoft_and_optax_train_the_same_model(run):
  result, _ = run
  for name, model in result["models"].items():
    jsoft_curve = np.asarray(model["jsoft"]["curve"])
    optax_curve = np.asarray(model["optax"]["curve"])
    assert jsoft_curve[-1] < 0.5 * jsoft_curve[0], name
    np.testing.assert_allclose(jsoft_curve, optax_curve, rtol=1e-4, atol=1e-6)


def test_held_out_accuracy(run):
  result, _ = run
  for name, model in result["models"].items():
    for loss in ("jsoft", "optax"):
      assert model[loss]["accuracy"] >= 0.9, (name, loss)


def test_flax_mlp_trains_with_jsoft(run):
  result, _ = run
  model = result["models"]["MLP (Flax NNX)"]
  assert model["jsoft"]["accuracy"] >= 0.9
  assert model["jsoft"]["curve"][-1] < 0.1 * model["jsoft"]["curve"][0]


def _unigram_entropy(text):
  """Entropy (nats) of the characters of the text's non-empty lines, each
  ended by a newline, in float64: the loss of the best model that ignores
  the context."""
  chars = "".join(line.rstrip() + "\n" for line in text.split("\n")
                  if line.strip())
  _, counts = np.unique(np.frombuffer(chars.encode("utf-32-le"), np.uint32),
                        return_counts=True)
  p = counts.astype(np.float64) / counts.sum()
  return float(-np.sum(p * np.log(p)))


def test_lm_learns_more_than_character_frequencies(run):
  result, _ = run
  lm = result["lm"]
  bar = _unigram_entropy(lm_bench.corpus())
  assert 3.0 < bar < 4.0  # English prose and code: about 3.5 nats
  for head in ("jsoft", "optax"):
    assert lm[head]["final_loss"] < bar, head
    assert lm[head]["held_out_loss"] < bar, head


def test_lm_heads_agree(run):
  result, _ = run
  lm = result["lm"]
  jsoft_run, optax_run = lm["jsoft"], lm["optax"]
  # Both steps ignore the padding: a third or more of the targets.
  assert lm["padding_share"] > 0.3
  np.testing.assert_allclose(jsoft_run["curve"], optax_run["curve"],
                             rtol=1e-4)
  # jsoft's statistics (return_stats) against those of optax's logits.
  np.testing.assert_allclose(jsoft_run["entropy"], optax_run["entropy"],
                             rtol=1e-4)
  np.testing.assert_allclose(jsoft_run["accuracy"], optax_run["accuracy"],
                             atol=5e-3)
  assert 0.1 < jsoft_run["accuracy"][-1] < 1
  for head in (jsoft_run, optax_run):
    assert head["temp_bytes"] > 0 and head["step_ms"] > 0


def test_curvature_matches_float64(run):
  result, _ = run
  hess = result["regression_hessian"]
  assert hess["max_rel_error"] < 1e-6
  np.testing.assert_allclose(hess["top_eigenvalues_jsoft"],
                             hess["top_eigenvalues"], rtol=1e-6)
  hvp = result["mlp_hvp"]
  assert hvp["max_rel_error_float64"] < 1e-10
  assert hvp["max_rel_error_float32"] < 1e-4
  assert hvp["top_eigenvalue"] > 0


def test_distilled_student(run):
  # The softmax regression distilled from the MLP through the fused
  # distillation head: a working student, no worse than hard labels alone
  # by more than two points, below its teacher.
  k = run[0]["distillation"]
  assert k["teacher_accuracy"] >= 0.95
  assert k["distilled"] >= 0.9 and k["hard labels"] >= 0.9
  assert k["distilled"] >= k["hard labels"] - 0.02
  assert 0 < k["hard_weight"] < k["alpha"]


def test_outputs_written(run):
  result, out = run
  on_disk = json.loads((out / "e.json").read_text())
  assert set(on_disk["models"]) == set(result["models"])
  assert (out / "e.png").read_bytes()[:4] == b"\x89PNG"
  assert (out / "lm.png").read_bytes()[:4] == b"\x89PNG"
  assert on_disk["lm"]["jsoft"]["curve"] == result["lm"]["jsoft"]["curve"]
