"""Bad input to the full model's step and configs: one-line errors listing what is expected.

(The sum of the logged terms is checked on the real step in test_step_sharded.)
"""

import jax
import pytest

from aacp_jax.methods.aacp import loss_fn
from configs import pretrain
from tests.test_spatial_training import host_batch, tiny_config


def test_missing_modality_is_a_one_line_error_listing_what_is_expected():
  config = tiny_config('demo')
  # The batch is checked before anything is traced, so no model is needed to see the error.
  call = lambda batch: loss_fn(None, None, batch, jax.random.key(0), model=None, config=config)
  batch = host_batch(config)
  del batch['mri']
  with pytest.raises(ValueError, match=r"missing \['mri'\].*'image'.*'organs'") as e:
    call(batch)
  assert '\n' not in str(e.value)
  batch = host_batch(config)
  del batch['xray']['organs']
  with pytest.raises(ValueError, match=r"batch\['xray'\] lacks keys \['organs'\]"):
    call(batch)


def test_unknown_variant_lists_every_variant():
  with pytest.raises(ValueError, match=r"unknown variant 'no_fpn'") as e:
    pretrain.get_config('demo,no_fpn')
  for name in pretrain.TABLE6:
    assert name in str(e.value)
