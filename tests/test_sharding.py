"""Mesh helpers: batch splitting rules and host-local -> global arrays."""

import jax
import numpy as np
import pytest

from aacp_jax import sharding


def test_per_modality_batch_splits_by_share():
  sizes = sharding.per_modality_batch(
    256,
    {'ct': 0.5, 'mri': 0.25, 'xray': 0.25},
    ('ct', 'mri', 'xray'),
    num_devices=8,
    num_processes=2,
  )
  assert sizes == {'ct': 128, 'mri': 64, 'xray': 64}


def test_indivisible_batch_names_config_key():
  with pytest.raises(
    ValueError, match=r'config.batch_size=36: the ct share \(18\) is not divisible by the 8 devices'
  ):
    sharding.per_modality_batch(
      36,
      {'ct': 0.5, 'mri': 0.25, 'xray': 0.25},
      ('ct', 'mri', 'xray'),
      num_devices=8,
      num_processes=1,
    )


def test_subset_of_modalities_renormalises_shares():
  sizes = sharding.per_modality_batch(
    48, {'ct': 0.5, 'mri': 0.25, 'xray': 0.25}, ('ct', 'xray'), num_devices=8, num_processes=1
  )
  assert sizes == {'ct': 32, 'xray': 16}


def test_to_global_shards_over_data_axis():
  mesh = sharding.make_mesh()
  assert mesh.size == jax.device_count() == 8
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = sharding.to_global({'a': x}, mesh)['a']
  assert g.shape == (16, 3)
  assert len(g.addressable_shards) == 8
  assert all(s.data.shape == (2, 3) for s in g.addressable_shards)
  np.testing.assert_array_equal(np.asarray(g), x)
