"""data_prep.ops MRI: NIfTI geometry, N4, MNI152 registration, skull stripping, normalisation, stacking."""

import os

import nibabel as nib
from nibabel.testing import data_path
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import ops


@pytest.fixture(scope='module')
def mni4():
  """nilearn's shipped MNI152 template, resampled to 4 mm (50 x 59 x 48) to keep registration fast."""
  template, mask = ops.mni_template(2)
  grid = ops.canonical_grid(template, 4.0)
  return ops.resample(template, grid=grid), ops.resample(mask, grid=grid, mask=True)


def _rigid(image, degrees, shift):
  t = sitk.Euler3DTransform()
  t.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
  t.SetRotation(*np.deg2rad(degrees))
  t.SetTranslation(shift)
  return t


def test_nibabel_image_converts_to_the_geometry_sitk_reads():
  """nibabel's shipped anatomical.nii: RAS affine → LPS image equal to SimpleITK's own reading."""
  path = os.path.join(data_path, 'anatomical.nii')
  ours, theirs = ops.nib_to_sitk(nib.load(path)), sitk.ReadImage(path)
  np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
  for get in ('GetSpacing', 'GetOrigin', 'GetDirection'):
    np.testing.assert_allclose(getattr(ours, get)(), getattr(theirs, get)(), atol=1e-5)
  canon = ops.to_canonical(ops.read_volume(path))
  np.testing.assert_allclose(canon.GetDirection(), np.diag([1.0, 1.0, -1.0]).ravel())
  # The same voxels: columns already ran toward L; rows ran toward A and slices toward S, so both flip.
  np.testing.assert_array_equal(
    sitk.GetArrayFromImage(canon), sitk.GetArrayFromImage(theirs)[::-1, ::-1, :]
  )
  cine = os.path.join(data_path, 'example4d.nii.gz')
  assert ops.read_volume(cine, ndim=4).GetSize() == (128, 96, 24, 2)
  with pytest.raises(ops.PrepError) as e:
    ops.read_volume(cine)
  assert e.value.kind == 'dimensions'


def test_mni_template_is_shipped_and_its_mask_covers_the_brain():
  template, mask = ops.mni_template(2)
  assert template.GetSize() == mask.GetSize() == (99, 117, 95)
  np.testing.assert_allclose(template.GetSpacing(), (2, 2, 2))
  t, m = sitk.GetArrayViewFromImage(template), sitk.GetArrayViewFromImage(mask)
  assert 0.15 < m.mean() < 0.3
  assert t[m > 0].mean() > 0.3 and (t[m > 0] > 0.05).mean() > 0.95  # the mask sits on the brain
  assert (t[m == 0] > 0.05).mean() < 0.05  # and the template is skull-stripped


def test_n4_removes_a_known_multiplicative_bias_field():
  n = 40
  z, y, x = np.mgrid[:n, :n, :n].astype(np.float32)
  r = np.sqrt((x - n / 2) ** 2 + (y - n / 2) ** 2 + (z - n / 2) ** 2)
  truth = np.where(r < 16, np.where(r < 8, 100.0, 60.0), 0.0).astype(np.float32)
  bias = np.exp(0.4 * (x - n / 2) / n + 0.3 * (y - n / 2) / n).astype(np.float32)
  corrected = sitk.GetArrayFromImage(ops.n4(sitk.GetImageFromArray(truth * bias), shrink=2))
  fg = truth > 0

  def spread(a):  # N4 recovers the field up to a global scale: measure the log ratio's spread
    return np.log(a[fg] / truth[fg]).std()

  assert spread(truth * bias) > 0.08
  assert spread(corrected) < 0.1 * spread(truth * bias)


def test_rigid_and_affine_registration_recover_a_known_motion(mni4):
  fixed, mask = mni4
  true = _rigid(fixed, (0.0, 3.0, 8.0), (6.0, -4.0, 5.0))
  moving = sitk.Resample(
    fixed, fixed, true.GetInverse(), sitk.sitkLinear, 0.0
  )  # moving(T p) = fixed(p)
  brain = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[::50, ::-1]  # (x, y, z) indices
  points = [fixed.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in brain]

  def error(transform):
    return max(
      np.linalg.norm(np.subtract(transform.TransformPoint(p), true.TransformPoint(p)))
      for p in points
    )

  assert error(sitk.Euler3DTransform()) > 10  # the motion is large enough to matter
  assert error(ops.register(moving, fixed, kind='rigid', shrink=(2, 1))) < 1.0  # a quarter voxel
  assert error(ops.register(moving, fixed, kind='affine', shrink=(2, 1))) < 2.0


def test_warp_keeps_mask_labels_and_skull_strip_zeroes_outside(mni4):
  fixed, mask = mni4
  shift = _rigid(fixed, (0, 0, 0), (4.0, 0.0, 0.0))
  moved = ops.warp(mask, fixed, shift, mask=True)
  assert moved.GetPixelID() == sitk.sitkUInt8 and set(
    np.unique(sitk.GetArrayViewFromImage(moved))
  ) == {0, 1}
  # A 4 mm shift along x is one voxel column: the label moves by exactly one index.
  np.testing.assert_array_equal(
    sitk.GetArrayViewFromImage(moved)[:, :, :-1], sitk.GetArrayViewFromImage(mask)[:, :, 1:]
  )
  stripped = sitk.GetArrayFromImage(ops.skull_strip(fixed, mask))
  m, t = sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(fixed)
  assert (stripped[m == 0] == 0).all()
  np.testing.assert_array_equal(stripped[m > 0], t[m > 0])
  with pytest.raises(ops.PrepError) as e:
    ops.skull_strip(fixed, sitk.Image(3, 3, 3, sitk.sitkUInt8))
  assert e.value.kind == 'dimensions'


def test_instance_normalise_matches_numpy_inside_the_mask():
  rng = np.random.default_rng(0)
  x = rng.normal(300.0, 40.0, (6, 7, 8)).astype(np.float32)
  mask = np.zeros(x.shape, bool)
  mask[1:5, 2:6, 1:7] = True
  got = ops.instance_normalise(x, mask)
  want = np.where(mask, (x - x[mask].mean()) / x[mask].std(), 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert abs(got[mask].mean()) < 1e-5 and abs(got[mask].std() - 1) < 1e-5
  # Without a mask, the non-zero voxels are the foreground (background excluded from the statistics).
  y = np.where(mask, x, 0)
  np.testing.assert_allclose(ops.instance_normalise(y), want, rtol=1e-5, atol=1e-5)
  for bad, kind in (
    (np.full((4, 4, 4), 7.0), 'empty'),
    (np.zeros((4, 4, 4)), 'empty'),
    (np.where(mask, np.nan, x), 'nan'),
  ):
    with pytest.raises(ops.PrepError) as e:
      ops.instance_normalise(bad)
    assert e.value.kind == kind


def test_stack_sequences_orders_t1_t2_flair_as_float16():
  t1, t2, flair = (np.full((2, 3, 4), v, np.float32) for v in (1.0, 2.0, 3.0))
  out = ops.stack_sequences(t1, t2, flair)
  assert out.dtype == np.float16 and out.shape == (2, 3, 4, 3)
  np.testing.assert_array_equal(out[0, 0, 0], [1, 2, 3])
  with pytest.raises(ops.PrepError) as e:
    ops.stack_sequences(t1, t2, flair[:1])
  assert e.value.kind == 'dimensions'


def test_brain_to_mni_aligns_every_sequence_with_one_transform():
  """A moved, coarser copy of the template with a bright skull shell around the brain as T1 and an
  inverted-contrast copy as T2 come back on the MNI grid, aligned with the template, skull-stripped
  and normalised."""
  template, brain_mask = ops.mni_template(2)
  shell = sitk.BinaryDilate(brain_mask, [4] * 3) - sitk.BinaryDilate(brain_mask, [2] * 3)
  head = template + 0.9 * sitk.Cast(shell, sitk.sitkFloat32)
  true = _rigid(template, (3.0, 0.0, 6.0), (5.0, -3.0, 4.0))
  t1 = sitk.Resample(
    head, ops.resample(template, spacing=3.0), true.GetInverse(), sitk.sitkLinear, 0.0
  )
  t2 = sitk.Mask(1.0 - t1, sitk.Cast(t1 > 0.05, sitk.sitkUInt8))
  out, brain = ops.brain_to_mni(
    {'t1': t1, 't2': t2},
    resolution=2,
    kind='rigid',
    iterations=50,
    shrink=(4, 2),
    bias_correct=False,
  )
  assert (
    brain.shape == out['t1'].shape == out['t2'].shape == (95, 117, 99)
  )  # canonical (slice, row, col)
  inside = brain > 0
  reference = sitk.GetArrayFromImage(ops.to_canonical(template))[inside]
  assert np.corrcoef(out['t1'][inside], reference)[0, 1] > 0.85
  assert np.corrcoef(out['t2'][inside], reference)[0, 1] < -0.85
  for name in ('t1', 't2'):
    assert (out[name][~inside] == 0).all()
    assert abs(out[name][inside].mean()) < 1e-4 and abs(out[name][inside].std() - 1) < 1e-4
  with pytest.raises(ops.PrepError) as e:
    ops.brain_to_mni({'t2': t2})
  assert e.value.kind == 'missing_file' and "'t1'" in str(e.value)
