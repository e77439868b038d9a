"""What every model shares: compute dtypes, the parameter dtype and the BatchNorm settings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax import precision

# config.model.dtype -> compute dtype. 'float64' is for equivalence tests (sharded == unsharded
# to 1e-9) and needs jax_enable_x64.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


def compute_dtype(name: str):
  """The compute dtype of config.model.dtype; a one-line error for an unknown or unusable name."""
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype={name!r}: expected one of {sorted(DTYPES)}')
  if name == 'float64' and not jax.config.jax_enable_x64:
    # Without x64 JAX would quietly compute in float32 and the run would not be what it says.
    raise ValueError(
      "config.model.dtype='float64' needs "
      "jax.config.update('jax_enable_x64', True) before anything runs"
    )
  return DTYPES[name]


def param_dtype(dtype: Any):
  """float32 parameters for float32 and bfloat16 compute (mixed precision keeps float32 master
  weights and optimiser moments), float64 for float64 compute."""
  return precision.at_least_float32(dtype)


def batch_norm(
  train: bool, dtype: Any, name: str | None = None, zero_scale: bool = False
) -> nn.BatchNorm:
  """BatchNorm as torchvision (momentum 0.1 in torch's convention, epsilon 1e-5), for every model.

  Reducing over every non-feature axis of the global (possibly sharded) array gives global-batch
  statistics under jit without an axis_name. Note torch updates running_var with the unbiased
  batch variance and flax with the biased one; eval-mode outputs are unaffected.
  Two-pass variance (not E[x²] - E[x]²): activations with a large mean, e.g. conv1 on a mostly
  bright radiograph, otherwise lose most of their float32 digits to cancellation.
  zero_scale: zero-initialised scale (torchvision's zero_init_residual).
  """
  # flax keeps running statistics in float32 unless force_float32_reductions is off; off for
  # float64 compute, whose statistics are float64 (its reductions are float64 either way).
  float64 = param_dtype(dtype) == jnp.float64
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=param_dtype(dtype),
    use_fast_variance=False,
    force_float32_reductions=not float64,
    scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
    name=name,
  )
