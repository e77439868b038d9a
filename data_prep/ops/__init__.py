"""Shared preprocessing ops for ``data_prep.<dataset>`` (API: docs/INTERFACES.md, "Prep ops").

Pure functions and readers; nothing here writes files or reads flags. Every failure is a
``PrepError`` with a runner reject ``kind`` and a one-line reason naming the input.
"""

from data_prep.ops.dicom import (
  SITK_SYNTAXES,
  DicomHeader,
  check_transfer_syntax,
  group_series,
  pydicom_syntaxes,
  read_header,
)
from data_prep.ops.errors import KINDS, PrepError
from data_prep.ops.mri import (
  brain_to_mni,
  instance_normalise,
  mni_template,
  n4,
  nib_to_sitk,
  register,
  skull_strip,
  stack_sequences,
  warp,
)
from data_prep.ops.volume import (
  CANONICAL,
  HU_RANGE,
  Grid,
  Slab,
  align_to,
  canonical_grid,
  check_finite,
  ct_slabs,
  read_dicom_series,
  read_volume,
  resample,
  slab_starts,
  to_canonical,
  to_hu,
)
from data_prep.ops.xray import (
  clahe,
  pad_square,
  prepare_xray,
  read_dicom_xray,
  read_image_file,
  resize_long_side,
  to_uint8,
)
