"""`python -m data_prep.bench_prep`: throughput and peak RSS of converting one CT series or MRI case.

  python -m data_prep.bench_prep [--prep_workers=N] [--prep_rows=512] [--prep_slices=400]
  python -m data_prep.bench_prep --prep_source=brats [--prep_workers=N]

``--prep_source=brats``: one BraTS-sized case (240 x 240 x 155 at 1 mm, T1/T1ce/T2/FLAIR and seg)
made from nilearn's shipped MNI152 brain moved by 6 deg / 9 mm under a smooth bias field, converted
with the real ``data_prep.brats`` command (N4, MNI registration, 1 mm output) in a child process.

Synthesises a 512x512x400 CT series (real DICOM files, written slice by slice with pydicom) in a
temporary directory, then converts it with the real `data_prep.dicom_ct` command in a child process,
so the synthesis never counts towards the measured peak RSS (``os.wait4`` returns that child's
rusage, which covers its own worker processes). Prints one JSON line:
volumes_per_s, seconds, records, peak_rss_bytes, plus the series geometry.

`write_dicom_series` is also what the prep tests use to build DICOM trees in miniature.
"""

from __future__ import annotations

import os

from absl import flags

_ROWS = flags.DEFINE_integer('prep_rows', 512, 'rows and columns of each slice.')
_SLICES = flags.DEFINE_integer('prep_slices', 400, 'slices in the series.')
_PIXEL_MM = flags.DEFINE_float('prep_pixel_mm', 0.7, 'in-plane pixel spacing (mm).')
_SLICE_MM = flags.DEFINE_float('prep_slice_mm', 1.0, 'slice spacing (mm).')
_PREP_WORKERS = flags.DEFINE_integer('prep_workers', 1, '--workers of the conversion.')
_SOURCE = flags.DEFINE_enum(
  'prep_source', 'dicom_ct', ['dicom_ct', 'brats'], 'What to convert (module docstring).'
)

CT_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.2'
MR_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.4'


def write_dicom_series(
  directory,
  slices,
  *,
  spacing=(1.0, 1.0, 1.0),
  origin=(0.0, 0.0, 0.0),
  header=None,
  modality='CT',
  slope=1.0,
  intercept=-1024.0,
  image_type=('ORIGINAL', 'PRIMARY', 'AXIAL'),
  series_uid=None,
  study_uid=None,
  transfer_syntax=None,
  name_fn=None,
):
  """Writes one axial series, one file per slice; returns the file paths.

  ``slices`` yields 2D arrays in the stored physical unit (HU for CT): slice k lies at
  ``origin + k * spacing[2]`` along +z (patient superior) with rows along +y (posterior) and columns
  along +x (patient left), i.e. the identity ImageOrientationPatient. Stored values are
  ``(value - intercept) / slope`` as int16. ``header`` adds or overrides DICOM keywords (the privacy
  tests plant identifiers there). ``name_fn(k)`` names file k (default ``slice_KKKK.dcm``).
  """
  # pydicom imports stay here: importing this module (the tests do) stays cheap.
  import numpy as np
  import pydicom
  from pydicom import encaps
  from pydicom import uid as dcm_uid
  from pydicom.dataset import FileDataset, FileMetaDataset

  os.makedirs(directory, exist_ok=True)
  series_uid = series_uid or dcm_uid.generate_uid()
  study_uid = study_uid or dcm_uid.generate_uid()
  frame_uid = dcm_uid.generate_uid()
  sop_class = CT_IMAGE_STORAGE if modality == 'CT' else MR_IMAGE_STORAGE
  paths = []
  for k, values in enumerate(slices):
    values = np.asarray(values, np.float64)
    stored = np.round((values - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
      raise ValueError(
        f'slice {k}: values do not fit int16 with slope {slope}, intercept {intercept}'
      )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = dcm_uid.generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or dcm_uid.ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b'\0' * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
      study_uid,
      series_uid,
      frame_uid,
    )
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.PatientID = 'ANON'
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.ImagePositionPatient = [
      float(origin[0]),
      float(origin[1]),
      float(origin[2] + k * spacing[2]),
    ]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = float(spacing[2])
    ds.SliceLocation = float(origin[2] + k * spacing[2])
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for key, value in (header or {}).items():
      setattr(ds, key, value)
    ds.PixelData = stored.astype('<i2').tobytes()
    if not meta.TransferSyntaxUID.is_little_endian or meta.TransferSyntaxUID.is_compressed:
      # Only for tests of unsupported syntaxes: the bytes stay raw, wrapped as one fragment.
      ds.PixelData = encaps.encapsulate([ds.PixelData])
      ds['PixelData'].VR = 'OB'
    path = os.path.join(directory, name_fn(k) if name_fn else f'slice_{k:04d}.dcm')
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    paths.append(path)
  return paths


def _phantom_slices(rows: int, slices: int):
  """Chest-like HU slices (body, two lungs, spine, a nodule every 50 slices), one at a time."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  y, x = np.mgrid[0:rows, 0:rows] / rows - 0.5
  body = (x / 0.45) ** 2 + (y / 0.35) ** 2 <= 1
  spine = (x / 0.05) ** 2 + ((y - 0.25) / 0.05) ** 2 <= 1
  base = np.where(body, 40.0, -1000.0)
  base[spine] = 700
  rng = np.random.default_rng(0)
  noise = rng.normal(0, 10, (8, rows, rows)).astype(np.float32)
  for k in range(slices):
    s = 0.8 + 0.2 * np.sin(np.pi * k / slices)  # lungs widen toward the middle of the scan
    lungs = (((np.abs(x) - 0.2) / (0.15 * s)) ** 2 + (y / (0.25 * s)) ** 2) <= 1
    hu = np.where(lungs, -850.0, base)
    if k % 50 == 25:
      hu[(x - 0.2) ** 2 + y**2 <= 0.01**2] = 30
    yield hu + noise[k % 8]


def write_brats_case(directory, name='BraTS20_Training_001'):
  """One synthetic BraTS case in the release's layout and geometry; returns the case folder."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  from data_prep import ops  # pylint: disable=g-import-not-at-top

  template, _ = ops.mni_template(1)
  centre = template.TransformContinuousIndexToPhysicalPoint(
    [(s - 1) / 2 for s in template.GetSize()]
  )
  motion = sitk.Euler3DTransform()
  motion.SetCenter(centre)
  motion.SetRotation(*np.deg2rad((4.0, -3.0, 6.0)))
  motion.SetTranslation((5.0, -7.0, 4.0))
  grid = sitk.Image(240, 240, 155, sitk.sitkFloat32)
  grid.SetOrigin((centre[0] - 119.5, centre[1] - 119.5, centre[2] - 77.0))
  t1 = sitk.GetArrayFromImage(sitk.Resample(template, grid, motion, sitk.sitkLinear, 0.0)) * 1000
  z, y, x = np.mgrid[:155, :240, :240].astype(np.float32)
  bias = np.exp(0.3 * (x - 120) / 240 + 0.2 * (z - 77) / 155)
  brain = t1 > 50
  rng = np.random.default_rng(0)
  seqs = {'t1': t1, 't1ce': t1, 't2': 1300 - t1, 'flair': 200 + 0.5 * t1}
  out = {k: np.where(brain, v * bias + rng.normal(0, 3, v.shape), 0) for k, v in seqs.items()}
  r2 = (z - 90) ** 2 + (y - 100) ** 2 + (x - 140) ** 2
  out['seg'] = np.where(brain, np.where(r2 < 50, 1, np.where(r2 < 200, 2, 0)), 0)
  # BraTS's own affine: RAS x = -i, y = 239 - j (LPS-like storage, 1 mm).
  affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
  folder = os.path.join(directory, name)
  os.makedirs(folder, exist_ok=True)
  for seq, v in out.items():
    data = v.astype(np.uint8 if seq == 'seg' else np.float32).transpose(2, 1, 0)
    nib.save(nib.Nifti1Image(data, affine), os.path.join(folder, f'{name}_{seq}.nii.gz'))
  return folder


def _emit(**row):
  """Prints one JSON line with the backend fields `aacp_jax.bench` rows carry (comparable rows)."""
  import json  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top  # only for the backend fields, after the run.

  row.setdefault('backend', jax.default_backend())
  row.setdefault('devices', jax.device_count())
  row.setdefault('device_kind', jax.devices()[0].device_kind)
  print(json.dumps(row), flush=True)


def run(emit=_emit):
  """Synthesises the series, converts it in a child process, emits one JSON line."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  rows, slices = _ROWS.value, _SLICES.value
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory(prefix='aacp_bench_prep_') as tmp:
    raw, out = os.path.join(tmp, 'raw'), os.path.join(tmp, 'out')
    t0 = time.perf_counter()
    source = _SOURCE.value
    if source == 'brats':
      write_brats_case(raw)
    else:
      write_dicom_series(
        os.path.join(raw, 'series'),
        _phantom_slices(rows, slices),
        spacing=(_PIXEL_MM.value, _PIXEL_MM.value, _SLICE_MM.value),
        header={'PatientID': 'BENCH'},
      )
    synth_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # A child process, so the peak RSS is the conversion's alone (not the synthesis, not this
    # process's imports); os.wait4 reports that child's rusage, which includes its own workers.
    with open(os.path.join(tmp, 'log'), 'w+', encoding='utf-8') as log:
      proc = subprocess.Popen(
        [
          sys.executable,
          '-m',
          f'data_prep.{source}',
          f'--input={raw}',
          f'--output={out}',
          '--salt=bench-prep-salt-not-secret',
          f'--workers={_PREP_WORKERS.value}',
          '--progress=false',
          *(['--val_fraction=0', '--test_fraction=0'] if source == 'brats' else []),
        ],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
      _, status, usage = os.wait4(proc.pid, 0)
      proc.returncode = os.waitstatus_to_exitcode(status)
      seconds = time.perf_counter() - t0
      log.seek(0)
      if proc.returncode != 0:
        raise RuntimeError(
          f'bench_prep: data_prep.{source} exited {proc.returncode}: '
          f'{" ".join(log.read().split()[-40:])}'
        )
    peak_kib = usage.ru_maxrss  # KiB on Linux
    with open(os.path.join(out, 'train', 'manifest.json'), encoding='utf-8') as f:
      records = sum(m['count'] for m in json.load(f)['modalities'].values())
  peak = int(peak_kib) * 1024
  if source == 'brats':
    shape, spacing = [240, 240, 155], [1.0, 1.0, 1.0]
  else:
    shape, spacing = [rows, rows, slices], [_PIXEL_MM.value, _PIXEL_MM.value, _SLICE_MM.value]
  emit(
    bench='prep',
    source=source,
    series_shape=shape,
    spacing_mm=spacing,
    workers=_PREP_WORKERS.value,
    synth_s=round(synth_s, 2),
    seconds=round(seconds, 2),
    volumes_per_s=round(1 / seconds, 4),
    records=records,
    peak_rss_bytes=peak,
    peak_rss_under_2gb=peak < 2 * 1024**3,
    load_average=round(os.getloadavg()[0], 2),
  )


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run()


if __name__ == '__main__':
  from absl import app as _app

  _app.run(main)
