"""Test configuration shared by every test module.

float64 is enabled so references and gradient checks can run in double
precision; tests of float32/16-bit behaviour create their arrays with an
explicit dtype. Strict dtype promotion makes any silent mixed-precision
arithmetic inside jsoft an error. JAX is given 8 CPU devices for
test_sharding.py.
"""

import os

import jax

# Eight host CPU devices for the sharding tests, set before JAX initialises
# its backends. Every other test runs on the default (first) device.
try:
  jax.config.update("jax_num_cpu_devices", 8)
except AttributeError:  # jax < 0.5: only XLA's flag, read at backend start
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
