r"""ACDC cardiac cine MRI (Info.cfg + 4D cine + ED/ES frames + _gt masks) -> MRI slice records.

  python -m data_prep.acdc --input=ACDC_DIR --output=OUT_DIR --salt_file=SALT [--workers=N] [--n4=true]

Layout (any depth): ``patientNNN/Info.cfg`` (``ED: 1``, ``ES: 12``, ``Group: DCM``, ...),
``patientNNN_4d.nii.gz``, ``patientNNN_frameXX.nii.gz`` and ``patientNNN_frameXX_gt.nii.gz`` for the
ED and ES frames (1-based XX). A missing frame file is cut from the 4D cine; a missing ``_gt`` mask,
Info.cfg or group rejects the case. Cases under a ``testing`` folder go to the test split; the rest
are split by patient hash.

Per labelled frame (ED and ES) and short-axis slice, one record:

* ``image`` float16 (H, W, 3): the slice, N4-corrected (``--n4``) and instance-normalised per frame
  volume, **the same slice in all three channels**. The record's channels are T1, T2 and FLAIR
  contrasts; a bSSFP cine has a single contrast, and repeating it keeps the channel meaning "one
  contrast per channel" without inventing sequences (neighbouring time frames as channels would put
  motion where the encoder expects contrast), and keeps the mask aligned with every channel;
* ``mask`` uint8 (H, W): 0 background, 1 right ventricle, 2 myocardium, 3 left ventricle;
* ``label`` int32: the diagnostic group (NOR, MINF, DCM, HCM, RV -> 0..4).

Slices stay in the acquired short-axis plane (cardiac axes are oblique to the body, so reorienting to
axial would interpolate across 5-10 mm slices); in-plane they are resampled to 1 mm (linear image,
nearest mask). No MNI registration or skull stripping: both are brain-specific.
"""

from __future__ import annotations

import os
import re

import numpy as np

from data_prep import brats, runner
from data_prep import volume_common as vc

DATASET = 'acdc'
GROUPS = ('NOR', 'MINF', 'DCM', 'HCM', 'RV')
_CASE = re.compile(r'^patient\d+$')


def read_info(path: str) -> dict:
  """``Info.cfg`` as {key: value}; ED/ES as ints and Group checked (ValueError, one line)."""
  info = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      if ':' in line:
        key, value = line.split(':', 1)
        info[key.strip()] = value.strip()
  try:
    info['ED'], info['ES'] = int(info['ED']), int(info['ES'])
  except (KeyError, ValueError):
    raise ValueError('Info.cfg lacks integer ED/ES frame numbers') from None
  if info.get('Group') not in GROUPS:
    raise ValueError(f'Info.cfg group {info.get("Group")!r} is not one of {GROUPS}')
  return info


def list_items(root: str):
  items, rejects = [], []
  for folder, dirs, _ in os.walk(root):
    dirs.sort()
    for name in list(dirs):
      if not _CASE.match(name):
        continue
      case_dir = os.path.join(folder, name)
      key = os.path.relpath(case_dir, root)
      cfg = os.path.join(case_dir, 'Info.cfg')
      if not os.path.isfile(cfg):
        rejects.append((key, 'missing_label', 'no Info.cfg (ED/ES frames and group)'))
        continue
      try:
        info = read_info(cfg)
      except ValueError as e:
        rejects.append((key, 'unknown_label', str(e)))
        continue
      frames, missing = {}, []
      for phase in ('ED', 'ES'):
        stem = os.path.join(key, f'{name}_frame{info[phase]:02d}')
        image, gt = _find(root, stem), _find(root, stem + '_gt')
        if gt is None:
          missing.append(f'{phase} mask {os.path.basename(stem)}_gt.nii[.gz]')
        frames[phase] = {'frame': info[phase], 'image': image, 'gt': gt}
      cine = _find(root, os.path.join(key, f'{name}_4d'))
      if any(f['image'] is None for f in frames.values()) and cine is None:
        missing.append('frame image and 4D cine')
      if missing:
        rejects.append(
          (
            key,
            'missing_label' if 'mask' in missing[0] else 'missing_file',
            f'no {", ".join(missing)}',
          )
        )
        continue
      items.append(
        runner.Item(
          key=key,
          subject=name,
          modality='mri',
          payload={
            'frames': frames,
            'cine': cine,
            'group': GROUPS.index(info['Group']),
            'testing': 'testing' in key.lower().split(os.sep),
          },
        )
      )
  return items, rejects


def _find(root: str, stem: str) -> str | None:
  for ext in ('.nii.gz', '.nii'):
    if os.path.isfile(os.path.join(root, stem + ext)):
      return stem + ext
  return None


def _frame_image(root: str, frame: dict, cine: str | None):
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  from data_prep import ops  # pylint: disable=g-import-not-at-top

  if frame['image'] is not None:
    return ops.read_volume(os.path.join(root, frame['image']))
  movie = ops.read_volume(os.path.join(root, cine), ndim=4)
  t = frame['frame'] - 1
  if not 0 <= t < movie.GetSize()[3]:
    raise runner.Reject(
      'dimensions', f'{cine}: frame {frame["frame"]} outside its {movie.GetSize()[3]} frames'
    )
  return sitk.Extract(movie, list(movie.GetSize()[:3]) + [0], [0, 0, 0, t])


def resample_in_plane(image, *, mask: bool, spacing: float = 1.0):
  """``image`` at ``spacing`` mm in-plane, slices untouched, same orientation (SimpleITK)."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  old, size = np.array(image.GetSpacing()), np.array(image.GetSize())
  new = np.array([spacing, spacing, old[2]])
  out_size = np.maximum(np.round(size * old / new), 1).astype(int)
  # Keep the field of view centred: voxel 0's centre moves by half the spacing change.
  direction = np.array(image.GetDirection()).reshape(3, 3)
  origin = np.array(image.GetOrigin()) + direction @ ((new - old) / 2 * np.array([1, 1, 0]))
  kind = sitk.sitkNearestNeighbor if mask else sitk.sitkLinear
  pixel = sitk.sitkUInt8 if mask else sitk.sitkFloat32
  return sitk.Resample(
    image,
    [int(s) for s in out_size],
    sitk.Transform(),
    kind,
    origin.tolist(),
    new.tolist(),
    image.GetDirection(),
    0,
    pixel,
  )


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  from data_prep import ops  # pylint: disable=g-import-not-at-top

  root, payload = options.input, item.payload
  records = []
  try:
    for phase, frame in sorted(payload['frames'].items()):
      image = _frame_image(root, frame, payload['cine'])
      gt = ops.read_volume(os.path.join(root, frame['gt']))
      if gt.GetSize() != image.GetSize():
        raise runner.Reject(
          'dimensions',
          f"{frame['gt']}: size {gt.GetSize()} differs from the {phase} frame's {image.GetSize()}",
        )
      values = np.unique(sitk.GetArrayViewFromImage(gt))
      if not np.isin(values, (0, 1, 2, 3)).all():
        raise runner.Reject(
          'unknown_label', f'{frame["gt"]}: labels {values.tolist()[:6]}, expected 0-3'
        )
      # A mask on other voxels than its frame would be misaligned by a copied header: see align_to.
      gt = ops.align_to(sitk.Cast(gt, sitk.sitkUInt8), image, frame['gt'])
      if options.extra.get('n4', True):
        image = ops.n4(image, shrink=2)
      image = resample_in_plane(image, mask=False)
      gt = sitk.GetArrayFromImage(resample_in_plane(gt, mask=True))
      pixels = ops.instance_normalise(sitk.GetArrayFromImage(image))
      stack = ops.stack_sequences(pixels, pixels, pixels)
      sx, sy, sz = image.GetSpacing()
      records += brats.slice_records(
        stack,
        gt,
        np.array([sy, sx, sz], np.float32),
        region='cardiac',
        min_fraction=0.0,
        label=payload['group'],
      )
  except Exception as e:  # pylint: disable=broad-except  # reasons name files relative to --input
    raise vc.convert_reject(e, vc.relative_names(root)) from None
  return records


def split_of(item: runner.Item):
  return 'test' if item.payload.get('testing') else None


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  options = runner.options_from_flags(n4=flags.FLAGS.n4)
  items, rejects = list_items(options.input)
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    label_names=GROUPS,
    split_of=split_of,
    meta={
      'n4': flags.FLAGS.n4,
      'channels': 'cine x3',
      'mask_values': {'0': 'background', '1': 'rv', '2': 'myocardium', '3': 'lv'},
    },
  )


if __name__ == '__main__':
  from absl import app as _app
  from absl import flags as _flags

  runner.define_flags()
  _flags.DEFINE_bool('n4', True, 'N4 bias-field correction of each frame volume.')
  _app.run(main)
