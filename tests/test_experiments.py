"""Smoke test: ``python -m bench experiments --quick`` end to end.

Trains both models with both losses on the digits (under a minute) and
checks what the experiment claims: the same loss curves, held-out accuracy
of at least 0.9, and curvature through jsoft that matches float64.
"""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the experiments need scikit-learn: "
                    "python -m pip install -e \".[experiments]\"")
pytest.importorskip("equinox", reason="the experiments need Equinox: "
                    "python -m pip install -e \".[experiments]\"")

from bench import cli  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("experiments")
  # Users run with JAX's default promotion (optax mixes Python floats and
  # int32 counters, which the suite's strict mode rejects).
  with jax.numpy_dtype_promotion("standard"):
    result = cli.main(["experiments", "--quick", "--json",
                       str(out / "e.json"), "--plot", str(out / "e.png")])
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
