"""data_prep.ops X-ray: DICOM photometric/VOI, PNG/JPG reading, uint8 rescale, CLAHE, resize and pad."""

import copy
import os

import numpy as np
from PIL import Image
import pydicom
from pydicom.data import get_testdata_file
import pytest

from data_prep import ops
from data_prep.ops import dicom

RADIOGRAPHS = os.path.join(os.path.dirname(__import__('data_store').__file__), 'data')


def _write_xray(path, stored, photometric, *, spacing=(0.2, 0.3)):
  """A greyscale radiograph on CT_small's header (16-bit unsigned, no VOI)."""
  ds = copy.deepcopy(pydicom.dcmread(get_testdata_file('CT_small.dcm')))
  ds.Modality = 'CR'
  ds.PhotometricInterpretation = photometric
  ds.Rows, ds.Columns = stored.shape
  ds.PixelRepresentation = 0
  ds.RescaleSlope, ds.RescaleIntercept = 1, 0
  ds.PixelSpacing = list(spacing)
  ds.PixelData = np.ascontiguousarray(stored, np.uint16).tobytes()
  ds.save_as(path)
  return path


def test_monochrome1_is_inverted_and_monochrome2_kept(tmp_path):
  stored = np.tile(
    np.arange(0, 4000, 100, dtype=np.uint16), (8, 1)
  )  # dark left, bright right as stored
  m2, s2 = ops.read_dicom_xray(_write_xray(str(tmp_path / 'm2.dcm'), stored, 'MONOCHROME2'))
  m1, s1 = ops.read_dicom_xray(_write_xray(str(tmp_path / 'm1.dcm'), stored, 'MONOCHROME1'))
  np.testing.assert_array_equal(m2, stored)
  np.testing.assert_array_equal(m1, 3900 - stored.astype(np.float32))  # low stored value = white
  np.testing.assert_allclose(s1, (0.2, 0.3))


def test_shipped_radiographs_read_with_photometric_fix_and_lossless_j2k_equal():
  """pydicom-data's RG1 (MONOCHROME1 CR): without VOI the result is the reflected stored pixels; the
  JPEG 2000 lossless copy decodes to the same values; RG3 (no spacing) reads with spacing (0, 0)."""
  raw = pydicom.dcmread(os.path.join(RADIOGRAPHS, 'RG1_UNCR.dcm')).pixel_array.astype(np.float32)
  plain, spacing = ops.read_dicom_xray(os.path.join(RADIOGRAPHS, 'RG1_UNCR.dcm'), voi=False)
  np.testing.assert_array_equal(plain, raw.max() + raw.min() - raw)
  np.testing.assert_array_equal(spacing, (0, 0))  # RG1 stores PixelSpacing 0\0: unknown, not 0 mm
  j2k, _ = ops.read_dicom_xray(os.path.join(RADIOGRAPHS, 'RG1_J2KR.dcm'), voi=False)
  np.testing.assert_array_equal(j2k, plain)
  rg3, _ = ops.read_dicom_xray(os.path.join(RADIOGRAPHS, 'RG3_UNCR.dcm'))
  image, out_spacing = ops.prepare_xray(rg3, size=128)
  assert image.shape == (128, 128, 1) and image.dtype == np.uint8 and image.std() > 20
  np.testing.assert_array_equal(out_spacing, (0, 0, 0))


def test_jpeg_lossless_without_a_decoder_is_unsupported():
  path = os.path.join(RADIOGRAPHS, 'JPEG-LL.dcm')
  if '1.2.840.10008.1.2.4.70' in dicom.pydicom_syntaxes():
    pytest.skip('a JPEG lossless decoder (pylibjpeg/gdcm) is installed here')
  with pytest.raises(ops.PrepError) as e:
    ops.read_dicom_xray(path)
  assert (
    e.value.kind == 'unsupported'
    and 'JPEG Lossless' in str(e.value)
    and 'JPEG-LL.dcm' in str(e.value)
  )


def test_colour_and_truncated_dicom_are_rejected(tmp_path):
  with pytest.raises(ops.PrepError) as e:
    ops.read_dicom_xray(os.path.join(RADIOGRAPHS, 'SC_rgb.dcm'))
  assert e.value.kind == 'unsupported' and 'RGB' in str(e.value)
  cut = tmp_path / 'cut.dcm'
  cut.write_bytes(open(os.path.join(RADIOGRAPHS, 'RG3_UNCR.dcm'), 'rb').read()[:-1000])
  with pytest.raises(ops.PrepError) as e:
    ops.read_dicom_xray(str(cut))
  assert e.value.kind == 'truncated'


def test_read_image_file_png_jpg_and_bad_files(tmp_path):
  grey = (np.arange(40 * 30) % 251).astype(np.uint8).reshape(40, 30)
  Image.fromarray(grey).save(tmp_path / 'g.png')
  np.testing.assert_array_equal(ops.read_image_file(str(tmp_path / 'g.png')), grey)
  deep = (np.arange(40 * 30) * 50).astype(np.uint16).reshape(40, 30)
  Image.fromarray(deep).save(tmp_path / 'd.png')
  got = ops.read_image_file(str(tmp_path / 'd.png'))
  np.testing.assert_array_equal(got, deep)
  rgb = np.stack([grey] * 3, -1)
  Image.fromarray(rgb).save(tmp_path / 'c.jpg', quality=95)
  got = ops.read_image_file(str(tmp_path / 'c.jpg'))
  assert (
    got.shape == (40, 30) and got.dtype == np.uint8 and np.abs(got.astype(int) - grey).mean() < 8
  )
  blob = (tmp_path / 'c.jpg').read_bytes()
  (tmp_path / 'cut.jpg').write_bytes(blob[: len(blob) // 2])
  (tmp_path / 'junk.png').write_bytes(b'not an image' * 10)
  for name, kind in (
    ('cut.jpg', 'truncated'),
    ('junk.png', 'corrupt'),
    ('gone.png', 'missing_file'),
  ):
    with pytest.raises(ops.PrepError) as e:
      ops.read_image_file(str(tmp_path / name))
    assert e.value.kind == kind and name in str(e.value)


def test_to_uint8_maps_percentiles_to_the_ends():
  x = np.linspace(0, 1000, 1001, dtype=np.float32)
  out = ops.to_uint8(x, percentiles=(10, 90))
  np.testing.assert_array_equal(out[:101], 0)
  np.testing.assert_array_equal(out[900:], 255)
  np.testing.assert_array_equal(out[501], 128)  # (501 - 100) / 800 * 255 = 127.8
  u8 = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(ops.to_uint8(u8), u8)
  for bad, kind in ((np.full((5, 5), 3.0), 'empty'), (np.array([[1.0, np.nan]]), 'nan')):
    with pytest.raises(ops.PrepError) as e:
      ops.to_uint8(bad)
    assert e.value.kind == kind


def test_clahe_raises_local_contrast_of_a_known_image():
  """Two flat halves 8 grey levels apart, with a faint texture: CLAHE spreads them far apart."""
  rng = np.random.default_rng(0)
  image = np.where(np.arange(64)[None, :] < 32, 100, 108) + rng.integers(0, 3, (64, 64))
  image = image.astype(np.uint8)
  out = ops.clahe(image)
  assert out.dtype == np.uint8 and out.shape == image.shape
  gap_before = image[:, 32:].mean() - image[:, :32].mean()
  gap_after = out[:, 32:].mean() - out[:, :32].mean()
  assert gap_after > 4 * gap_before
  assert np.corrcoef(out.ravel(), image.ravel())[0, 1] > 0.7  # monotone-ish: order kept


def test_resize_keeps_aspect_pads_centred_and_rescales_spacing():
  image = np.zeros((300, 150), np.uint8)
  image[100:200, 50:100] = 255  # a block in the middle third
  resized, scale = ops.resize_long_side(image, 64)
  assert resized.shape == (64, 32)
  np.testing.assert_allclose(scale, (64 / 300, 32 / 150))
  padded, (top, left) = ops.pad_square(resized, 64)
  assert (top, left) == (0, 16) and (padded[:, :16] == 0).all() and (padded[:, 48:] == 0).all()
  out, spacing = ops.prepare_xray(image, (0.5, 0.5), size=64, use_clahe=False)
  assert out.shape == (64, 64, 1) and out.dtype == np.uint8
  np.testing.assert_allclose(spacing, (0.5 * 300 / 64, 0.5 * 150 / 32, 0))
  rows, cols = np.nonzero(out[..., 0] > 127)
  # The block's centre (row 150 of 300, col 75 of 150) lands at the centre of the square.
  assert abs(rows.mean() - 31.5) < 1 and abs(cols.mean() - 31.5) < 1
