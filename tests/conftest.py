"""Test configuration shared by every test module.

float64 is enabled so references and gradient checks can run in double
precision; tests of float32/16-bit behaviour create their arrays with an
explicit dtype. Strict dtype promotion makes any silent mixed-precision
arithmetic inside jsoft an error.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
