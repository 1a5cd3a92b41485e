"""The fallbacks of jsoft/_compat.py, run on every JAX release.

Each fallback is tested directly here, whichever path this release takes,
against a value worked out by hand or in NumPy.
"""

import importlib.metadata
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoft import _compat

A = np.arange(12.0).reshape(3, 4) - 5.0


def _linear(x):
  """``x ↦ (A·x, cumsum(x))``, the cumsum through ``lax.scan`` (what the
  fused head's VJP holds, and what jax < 0.10 cannot transpose)."""
  def step(total, xi):
    return total + xi, total + xi
  return jnp.asarray(A) @ x, lax.scan(step, jnp.zeros(()), x)[1]


def test_vjp_transpose_through_scan():
  ct = (np.array([1.0, -2.0, 0.5]), np.array([3.0, 0.0, -1.0, 2.0]))
  (got,) = jax.jit(lambda ct: _compat.vjp_transpose(_linear, jnp.zeros(4))(
      ct))(ct)
  # Aᵀ·ct₁ plus the cumsum's transpose, the reversed cumsum of ct₂.
  want = A.T @ ct[0] + np.cumsum(ct[1][::-1])[::-1]
  np.testing.assert_allclose(got, want, rtol=1e-15)


def test_linear_transpose_through_scan():
  ct = (np.array([0.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0]))
  (got,) = _compat.linear_transpose(_linear, jnp.zeros(4))(ct)
  np.testing.assert_allclose(got, A[1] + np.array([4.0, 3.0, 2.0, 1.0]),
                             rtol=1e-15)


def test_metadata_context_retraces_a_compiled_function():
  ctx = _compat.MetadataContext(False)
  f = jax.jit(lambda x: x + 1 if ctx.value else x)
  g = jax.jit(lambda x: 2 * f(x))
  assert (f(1.0), g(1.0)) == (1.0, 2.0)  # compiled without the flag
  with ctx(True):
    assert ctx.value is True
    assert (f(1.0), g(1.0)) == (2.0, 4.0)  # traced again, with it
  assert ctx.value is False
  assert (f(1.0), g(1.0)) == (1.0, 2.0)


def test_make_user_context_sets_and_restores():
  ctx = _compat.make_user_context(0)
  with ctx(3):
    with ctx(5):
      assert ctx.value == 5
    assert ctx.value == 3
  assert ctx.value == 0


def test_matmul_of_bfloat16_tiles_in_a_loop():
  # What the fused head does: a bfloat16 matmul per tile of w inside a scan
  # (jaxlib 0.7.1 to 0.10.0 cannot compile it as it is on CPU).
  # 1 + 2⁻⁷ is a bfloat16; its square, 1 + 2⁻⁶ + 2⁻¹⁴, is a float32 only.
  h = jnp.full((4, 8), 1 + 2.0**-7, jnp.bfloat16)
  w = jnp.full((8, 8), 1 + 2.0**-7, jnp.bfloat16)

  def tiles(h, w):
    def tile(carry, j):
      w_j = lax.dynamic_slice_in_dim(w, 4 * j, 4, 1)
      return carry, _compat.matmul(h, w_j, jnp.float32)
    return lax.scan(tile, 0, jnp.arange(2))[1]

  out = jax.jit(tiles)(h, w)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, np.full((2, 4, 4),
                                             8 * (1 + 2.0**-6 + 2.0**-14)))


def _release(distribution):
  """The first three numbers of an installed distribution's version, from
  its package metadata: ``"0.4.38"`` → ``(0, 4, 38)``, ``"0.8.1.dev20"``
  → ``(0, 8, 1)``."""
  fields = importlib.metadata.version(distribution).split(".")[:3]
  return tuple(int(re.match(r"\d+", f).group()) for f in fields)


def test_versions_are_the_installed_releases():
  assert _compat.JAX_VERSION == _release("jax")
  assert _compat.JAXLIB_VERSION == _release("jaxlib")
  # The floor pyproject.toml declares, which the fallbacks are written for.
  assert _compat.JAX_VERSION >= (0, 4, 38)
  assert _compat.JAXLIB_VERSION >= (0, 4, 38)


def test_matmul_accumulates_bfloat16_products_in_float32():
  r = np.random.default_rng(0)
  a = jnp.asarray(r.normal(size=(5, 33)), jnp.bfloat16)
  b = jnp.asarray(r.normal(size=(33, 3)), jnp.bfloat16)
  out = jax.jit(lambda a, b: _compat.matmul(a, b, jnp.float32))(a, b)
  assert out.dtype == jnp.float32
  # Each product of two bfloat16s (8-bit significands) is exact in float32;
  # 33 float32 additions err by at most 33·ε₃₂·Σ|aᵢ·bᵢ| (NumPy, float64).
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  bound = 33 * np.finfo(np.float32).eps * (np.abs(a64) @ np.abs(b64))
  assert np.all(np.abs(np.asarray(out, np.float64) - a64 @ b64) <= bound)


def test_barrier_keeps_values_and_gradients():
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(_compat.barrier(x.T), x.T)
  # Differentiable in both modes wherever the barrier is used (it is the
  # identity where this JAX cannot differentiate it).
  f = lambda x: jnp.sum(_compat.barrier(x.T) ** 2)  # noqa: E731
  np.testing.assert_allclose(jax.grad(f)(x), 2 * x)
  np.testing.assert_allclose(jax.jvp(f, (x,), (jnp.ones_like(x),))[1],
                             2 * jnp.sum(x))
