"""The floating dtype of the math around the models: float32 at least, float64 when given float64.

Losses, pooling, augmentation and parameters compute in float32 for float32 and bfloat16 runs
(mixed precision keeps its reductions and master weights in float32). A float64 run
(`jax.config.update('jax_enable_x64', True)`, config.model.dtype 'float64' and float64 inputs)
keeps float64 throughout, so that sharded and unsharded steps can be compared to 1e-9 rather
than to float32's summation-order noise. One rule instead of written-out float32: the float32 and
bfloat16 paths compute the same ops in the same dtypes as before.
"""

import jax
import jax.numpy as jnp
import numpy as np


def at_least_float32(dtype) -> np.dtype:
  """float64 for float64, float32 for every other dtype (bfloat16, float16, float32, ints, bool).

  float64 becomes float32 when jax_enable_x64 is off: JAX could not hold it anyway, and asking
  for it would only add a warning.
  """
  if np.dtype(dtype) == np.float64:
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
  return np.dtype(np.float32)


def upcast(x) -> jax.Array:
  """x (array, NumPy array or Python scalar) as a JAX array of dtype `at_least_float32`.

  A Python float counts as float64, so it is float64 exactly when x64 is on.
  """
  dtype = x.dtype if hasattr(x, 'dtype') else np.result_type(x)  # tracers have no __array__
  return jnp.asarray(x, at_least_float32(dtype))


def real():
  """The floating dtype of the losses' and the augmentation's own math: float32, or float64 in an
  x64 process (`jax_enable_x64`, which only equivalence tests turn on).

  Read at trace time, so a normal (x64-off) run is exactly the float32 program it always was;
  under x64 the whole step, augmentation included, is float64 and sharded == unsharded holds to
  ~1e-12 instead of float32's summation-order noise.
  """
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
