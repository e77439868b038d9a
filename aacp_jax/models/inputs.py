"""Dummy encoder inputs for `init` and shape inference: zeros with each modality's channels."""

import jax.numpy as jnp

from aacp_jax.modalities import IN_CHANNELS


def dummy_inputs(modalities, image_size: int, batch: int = 2, dtype=jnp.float32):
  """{m: zeros (batch, image_size, image_size, IN_CHANNELS[m])} for every modality in order.

  Parameter shapes depend only on the channels, and the models cast their input to the compute
  dtype, so zeros of any float dtype initialise the same parameters.
  """
  return {m: jnp.zeros((batch, image_size, image_size, IN_CHANNELS[m]), dtype) for m in modalities}
