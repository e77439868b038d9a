r"""BraTS 2020 (per case: t1, t1ce, t2, flair, seg NIfTI) -> axial MRI slice records with tumour masks.

  python -m data_prep.brats --input=MICCAI_BraTS2020_TrainingData --output=OUT_DIR --salt_file=SALT
      [--workers=N] [--mni=true] [--mni_resolution=1] [--n4=true] [--require_seg=true]
      [--min_brain_fraction=0.25]

About 16 s per case per worker with the defaults on 2 lightly loaded cores (N4 and the MNI
registration dominate; `python -m data_prep.bench_prep --prep_source=brats`, docs/PERFORMANCE.md).

Layout: ``BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii[.gz]`` (any depth).
BraTS ships every case skull-stripped, co-registered and resampled to 1 mm in the SRI24 atlas space.
What we apply (paper 4.1.1 / Table 2):

* N4 bias-field correction of T1, T2 and FLAIR (the release is not bias-corrected);
* affine registration to nilearn's MNI152 template (``--mni``, default on): one transform estimated on
  T1 against the template's *brain* (a stripped brain matches a stripped template), applied to all three
  sequences and, by nearest neighbour, to the segmentation; a registration whose warped brain overlaps
  the template brain with Dice < 0.8 rejects the case (``geometry``) instead of writing misaligned
  data;
* no skull stripping (already done by the organisers); a T1 that still has its skull (under a
  quarter of its voxels 0, or a non-zero volume over 1.5x the template brain's) is rejected as
  ``unstripped`` before any work: registered, it would be shrunk onto the brain and written;
* instance normalisation per sequence over the brain (non-zero voxels), 0 outside;
* channels T1, T2, FLAIR (T1ce is not used: the record has three MRI channels).

Each kept axial slice (LPI: rows anterior->posterior, columns patient right->left, slices
superior->inferior) is one record: ``image`` float16 (H, W, 3), ``mask`` uint8 (H, W) with BraTS labels
0 background / 1 necrotic core / 2 oedema / 4 enhancing tumour, ``label`` int32 1 when the slice holds
tumour. Slices whose brain area is below ``--min_brain_fraction`` of the largest slice's are dropped
(skull caps and empty slices). A case without its seg file is rejected (``missing_label``) unless
``--require_seg=false`` (the validation release): then records carry no mask or label.
The one known misnamed training segmentation (a case folder holding a single ``*seg*.nii`` under
another name) is accepted when it is the only unmatched ``*seg*`` file of its folder.
"""

from __future__ import annotations

import os
import re

import numpy as np

from data_prep import runner
from data_prep import volume_common as vc

DATASET = 'brats2020'
LABEL_NAMES = ('no_tumour', 'tumour')
SEQUENCES = ('t1', 't2', 'flair')
_FILE = re.compile(r'^(.+)_(t1|t1ce|t2|flair|seg)\.nii(\.gz)?$', re.IGNORECASE)
SEG_VALUES = (0, 1, 2, 4)
# Affine registration on the 8x and 4x shrunk pyramid levels (ops.register bins both images to 2 mm
# once) with 5 % of the voxels: a BraTS-sized case moved by a known rigid motion comes back to 0.39 mm
# mean (0.58 mm max) over the brain in ~1.3 s; the full-resolution level (ops default) costs many
# times that for an affine fit of a brain that is already in an atlas space.
_REG_SHRINK, _REG_SAMPLING = (8, 4), 0.05
# N4 fitted on ~6 mm voxels (shrink 6 at 1 mm): the field's finest B-spline span is ~60 mm, so this
# loses nothing measurable (0.4 % rms against a 4 mm fit) at a third of the cost.
_N4_FIT_MM = 6.0
# A stripped brain registered to the template brain overlaps it with Dice ~0.95 (0.957 on real
# BraTS); under 0.8 the fit failed. Skull-strip guard (check_stripped): BraTS's brains fill ~16 %
# of the 240x240x155 grid, a tight brain box ~52 %; a 2 L brain is ~1.1x nilearn's 1.9 L MNI brain
# mask, a head with skull and scalp 2x or more.
_MIN_DICE = 0.8
_MIN_ZERO_FRACTION = 0.25
_MAX_BRAIN_RATIO = 1.5


def list_items(root: str, *, require_seg: bool = True):
  """Items (one per case folder) and listing rejects."""
  cases = {}
  for rel in vc.list_files(root):
    m = _FILE.match(os.path.basename(rel))
    if m:
      case = cases.setdefault(os.path.dirname(rel), {})
      kind = m.group(2).lower()
      if kind in case:
        case.setdefault('_duplicates', []).append(rel)
      else:
        case[kind] = rel
  items, rejects = [], []
  for folder, case in sorted(cases.items()):
    key = folder or '.'
    if case.get('_duplicates'):
      rejects.append(
        (
          key,
          'duplicate',
          f'{len(case["_duplicates"])} sequence file(s) listed twice (.nii and .nii.gz?)',
        )
      )
      continue
    missing = [s for s in SEQUENCES if s not in case]
    if missing:
      rejects.append((key, 'missing_file', f'no {", ".join(missing)} file'))
      continue
    if 'seg' not in case:
      others = [
        n
        for n in sorted(os.listdir(os.path.join(root, folder)))
        if 'seg' in n.lower() and n.lower().endswith(('.nii', '.nii.gz'))
      ]
      if len(others) == 1:
        case['seg'] = os.path.join(folder, others[0])
    if 'seg' not in case and require_seg:
      rejects.append(
        (key, 'missing_label', 'no _seg file (pass --require_seg=false for the validation release)')
      )
      continue
    payload = {s: case[s] for s in SEQUENCES + ('seg',) if s in case}
    items.append(
      runner.Item(key=key, subject=os.path.basename(folder) or key, modality='mri', payload=payload)
    )
  return items, rejects


def _dice(a: np.ndarray, b: np.ndarray) -> float:
  return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def check_stripped(t1, where: str, brain_mm3: float | None = None) -> None:
  """Reject (``unstripped``) a T1 that still has its skull: BraTS-style data is promised brain-only.

  Two signs that need no registration: a stripped volume is exactly 0 outside the brain, so at least
  ``_MIN_ZERO_FRACTION`` of a whole-head field of view is 0 (an MRI background is noise, rarely 0);
  and its non-zero volume is a brain's, at most ``_MAX_BRAIN_RATIO`` times the template brain
  (``brain_mm3``, when registering), where a head with skull, scalp and face is twice that or more.
  The registration Dice alone let a head through: an affine fit shrinks the head onto the brain.
  """
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  nonzero = sitk.GetArrayViewFromImage(t1) != 0
  zero_fraction = 1.0 - float(nonzero.mean())
  if zero_fraction < _MIN_ZERO_FRACTION:
    raise runner.Reject(
      'unstripped',
      f'{where}: only {zero_fraction:.0%} of the T1 voxels are 0; '
      'a skull-stripped volume is 0 outside the brain, as BraTS ships it',
    )
  if brain_mm3:
    ratio = float(nonzero.sum()) * float(np.prod(t1.GetSpacing())) / brain_mm3
    if ratio > _MAX_BRAIN_RATIO:
      raise runner.Reject(
        'unstripped',
        f'{where}: the non-zero T1 volume is {ratio:.1f}x the '
        f'template brain (> {_MAX_BRAIN_RATIO}): a head with its skull, not a '
        'stripped brain as BraTS ships it',
      )


def to_standard_space(volumes: dict, seg, extra: dict, where: str):
  """(float32 {name: (Z, H, W)} canonical arrays, uint8 seg (Z, H, W) or None, spacing (row, col, slice))."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  from data_prep import ops  # pylint: disable=g-import-not-at-top

  brain_mm3 = None
  if extra.get('mni', True):
    _, brain = ops.mni_template(extra.get('mni_resolution', 1))
    voxel_mm3 = float(np.prod(brain.GetSpacing()))
    brain_mm3 = float((sitk.GetArrayViewFromImage(brain) > 0).sum()) * voxel_mm3
  check_stripped(volumes['t1'], where, brain_mm3)
  if extra.get('n4', True):
    volumes = {k: ops.n4(v, fit_mm=_N4_FIT_MM) for k, v in volumes.items()}
  else:
    volumes = {k: sitk.Cast(v, sitk.sitkFloat32) for k, v in volumes.items()}
  if extra.get('mni', True):
    template, brain = ops.mni_template(extra.get('mni_resolution', 1))
    fixed = ops.skull_strip(template, brain)
    transform = ops.register(
      volumes['t1'],
      fixed,
      kind='affine',
      iterations=extra.get('mni_iterations', 100),
      shrink=_REG_SHRINK,
      sampling=_REG_SAMPLING,
    )
    volumes = {k: ops.warp(v, template, transform) for k, v in volumes.items()}
    seg = ops.warp(seg, template, transform, mask=True) if seg is not None else None
    dice = _dice(
      sitk.GetArrayViewFromImage(volumes['t1']) > 0, sitk.GetArrayViewFromImage(brain) > 0
    )
    if dice < _MIN_DICE:
      raise runner.Reject(
        'geometry', f'{where}: MNI registration failed (brain Dice {dice:.2f} < {_MIN_DICE})'
      )
  arrays = {k: sitk.GetArrayFromImage(ops.to_canonical(v)) for k, v in volumes.items()}
  reference = ops.to_canonical(volumes['t1'])
  sx, sy, sz = reference.GetSpacing()
  seg_array = sitk.GetArrayFromImage(ops.to_canonical(seg)) if seg is not None else None
  return arrays, seg_array, np.array([sy, sx, sz], np.float32)


def read_case(root: str, payload: dict):
  """The three sequences (and seg) as SimpleITK images on one grid; PrepError / Reject otherwise."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  from data_prep import ops  # pylint: disable=g-import-not-at-top

  volumes = {s: ops.read_volume(os.path.join(root, payload[s])) for s in SEQUENCES}
  seg = None
  if 'seg' in payload:
    seg = ops.read_volume(os.path.join(root, payload['seg']))
    values = np.unique(sitk.GetArrayViewFromImage(seg))
    if not np.isin(values, SEG_VALUES).all():
      raise runner.Reject(
        'unknown_label',
        f'{payload["seg"]}: labels {values.tolist()[:6]}, expected a subset of {list(SEG_VALUES)}',
      )
    seg = sitk.Cast(seg, sitk.sitkUInt8)
  sizes = {k: v.GetSize() for k, v in volumes.items()}
  if seg is not None:
    sizes['seg'] = seg.GetSize()
  if len(set(sizes.values())) != 1:
    raise runner.Reject('dimensions', f'sequences of different sizes {sizes}')
  # Co-registered on one grid by the organisers; a file whose header puts it elsewhere (shifted,
  # or re-saved in another orientation) is turned onto T1's grid or rejected, never relabelled.
  for name in SEQUENCES[1:]:
    volumes[name] = ops.align_to(volumes[name], volumes['t1'], payload[name])
  if seg is not None:
    seg = ops.align_to(seg, volumes['t1'], payload['seg'])
  return volumes, seg


def slice_records(
  stack, seg, spacing, *, region: str, min_fraction: float, label: int | None = None
):
  """Records of the axial slices of a (Z, H, W, 3) float16 stack whose foreground is large enough."""
  area = (stack != 0).any(axis=-1).sum(axis=(1, 2))
  if area.max() == 0:
    raise runner.Reject('empty', 'no foreground voxels')
  for z in np.flatnonzero(area >= min_fraction * area.max()):
    record = {
      'image': np.ascontiguousarray(stack[z]),
      'modality': 'mri',
      'region': region,
      'spacing': spacing,
    }
    if seg is not None:
      record['mask'] = np.ascontiguousarray(seg[z], dtype=np.uint8)
      record['label'] = np.array(label if label is not None else (seg[z] > 0).any(), np.int32)
    yield record


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash
  from data_prep import ops  # pylint: disable=g-import-not-at-top

  try:
    volumes, seg = read_case(options.input, item.payload)
    arrays, seg_array, spacing = to_standard_space(volumes, seg, dict(options.extra), item.key)
    brain = np.logical_or.reduce([arrays[s] != 0 for s in SEQUENCES])
    normalised = [ops.instance_normalise(arrays[s], brain) for s in SEQUENCES]
    stack = ops.stack_sequences(*normalised)
    return list(
      slice_records(
        stack,
        seg_array,
        spacing,
        region='brain',
        min_fraction=options.extra.get('min_brain_fraction', 0.25),
      )
    )
  except Exception as e:  # pylint: disable=broad-except  # reasons name files relative to --input
    raise vc.convert_reject(e, vc.relative_names(options.input)) from None


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.mni_resolution not in (1, 2):
    raise app.UsageError(f'--mni_resolution={f.mni_resolution}: nilearn ships 1 or 2 mm')
  if not 0 <= f.min_brain_fraction <= 1:
    raise app.UsageError(f'--min_brain_fraction={f.min_brain_fraction}: must be in [0, 1]')
  extra = {
    'n4': f.n4,
    'mni': f.mni,
    'mni_resolution': f.mni_resolution,
    'mni_iterations': f.mni_iterations,
    'min_brain_fraction': f.min_brain_fraction,
  }
  options = runner.options_from_flags(**extra)
  items, rejects = list_items(options.input, require_seg=f.require_seg)
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    label_names=LABEL_NAMES,
    meta={
      **extra,
      'channels': list(SEQUENCES),
      'mask_values': {
        '0': 'background',
        '1': 'necrotic_core',
        '2': 'oedema',
        '4': 'enhancing_tumour',
      },
    },
  )


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top

  runner.define_flags()
  flags.DEFINE_bool('n4', True, 'N4 bias-field correction of each sequence.')
  flags.DEFINE_bool(
    'mni', True, 'Affine registration to the MNI152 template (one transform per case).'
  )
  flags.DEFINE_integer('mni_resolution', 1, 'Template resolution in mm (1 or 2).')
  flags.DEFINE_integer('mni_iterations', 100, 'Optimiser iterations per registration stage.')
  flags.DEFINE_bool('require_seg', True, 'Reject cases without a segmentation.')
  flags.DEFINE_float(
    'min_brain_fraction',
    0.25,
    "Keep slices whose brain area is at least this fraction of the largest slice's.",
  )


if __name__ == '__main__':
  from absl import app as _app

  define_flags()
  _app.run(main)
