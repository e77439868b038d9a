r"""Brain MRI with its skull (IXI, ADNI, clinical T1/T2/FLAIR NIfTI) -> axial slice records in MNI space.

  python -m data_prep.brain_mri --input=RAW_DIR --output=OUT_DIR --salt_file=SALT \
      [--sequences=t1,t2,flair] [--workers=N] [--mni_resolution=1] [--n4=true] [--locate=KEY]

One item per session: the NIfTI files (``.nii``, ``.nii.gz``) of one folder, or, for IXI's flat
layout (``IXI002-Guys-0828-T1.nii.gz``), the files of one IXI subject. The sequence comes from the file
name: ``flair``; ``t2``/``t2w``; ``t1``/``t1w``/``mprage``/``spgr``/``bravo``. Other sequences (PD,
MRA, DTI, T1ce, ...) are counted in the manifest (``skipped_files``), not converted; a NIfTI whose name
says no sequence is ``unsupported``. The subject is the IXI id, else the first folder under
``--input`` (``ADNI/002_S_0295/MPRAGE/<date>/<image>/*.nii``: 002_S_0295); hashed, patient-level split.

``--sequences`` (default ``t1,t2,flair``) must all be present (``missing_file`` otherwise); T1 is
always required, it is the registration's reference. A sequence left out of ``--sequences`` is
converted when present and its channel is 0 otherwise (0 is the normalised mean: no contrast
invented; IXI has no FLAIR: ``--sequences=t1,t2``, ADNI often T1 only: ``--sequences=t1``).

Each session goes through ``ops.brain_to_mni`` with ``stripped=False``: N4 per sequence, one affine
registration of T1 to nilearn's MNI152 2009 template with the metric inside the template brain
dilated by 8 mm (skull and neck cannot pull the fit), every sequence moved with that one transform,
the template's brain mask applied on the MNI grid (a template skull strip), instance normalisation
over the brain. A fit whose T1 correlates with the template inside the brain below ``_MIN_CORR`` is
a ``geometry`` reject (a good fit is ~0.9, a failed one 0.3-0.6), not misaligned data.
Out: one record per axial slice (LPI, as ``data_prep.brats``) with a brain area of at least
``--min_brain_fraction`` of the largest: ``image`` float16 (H, W, 3) T1, T2, FLAIR, no mask or label.

Privacy as ``data_prep.dicom_ct``: folder and file names of clinical exports (and dcm2niix's default
``%f_%p_%t_%s``) hold patient names and dates, so sessions and files are named ``session-<hash>`` /
``file-<hash>`` in every output, reasons are scrubbed of paths, and ``--locate=KEY`` prints (to the
terminal only) what a key stands for. Only voxels and geometry are read from a NIfTI: its header
strings (descrip, aux_file, db_name, intent_name) never reach a record.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np

from data_prep import runner
from data_prep import volume_common as vc

DATASET = 'brain_mri'
SEQUENCES = ('t1', 't2', 'flair')
_NIFTI = ('.nii', '.nii.gz')
_IXI = re.compile(r'^(IXI\d+)-', re.IGNORECASE)
# Tokens of a file name (split on anything but letters and digits) that say its sequence.
_TOKENS = {
  't1': {'t1', 't1w', 'mprage', 'spgr', 'bravo', 'mpr'},
  't2': {'t2', 't2w'},
}
_SKIPPED = {
  'pd',
  'pdw',
  'mra',
  'tof',
  'dti',
  'dwi',
  'adc',
  'bold',
  'swi',
  't1ce',
  't1c',
  't1gd',
  't2star',
  'gre',
  'asl',
  'seg',
  'mask',
}
# Affine fit on 8 and 4 mm pyramid levels (the 1 mm template shrunk 8x and 4x, binned once to 2 mm),
# 5 % of the voxels, as BraTS: an affine fit of a whole head needs no full-resolution level. N4 on ~6 mm voxels (--n4_fit_mm).
_REG_SHRINK, _REG_SAMPLING, _N4_FIT_MM = (8, 4), 0.05, 6.0
# Pearson correlation of the registered, N4-corrected T1 with the template inside the template brain:
# ~0.9 for a good fit of a real or synthetic head, 0.3-0.6 when the fit lands on skull or air.
_MIN_CORR = 0.7


def sequence_of(name: str) -> str | None:
  """'t1', 't2', 'flair', 'skip' (a sequence we do not use) or None (the name does not say)."""
  stem = name.lower()
  for ext in _NIFTI:
    if stem.endswith(ext):
      stem = stem[: -len(ext)]
  tokens = set(re.split(r'[^a-z0-9]+', stem)) - {''}
  if any('flair' in t for t in tokens):
    return 'flair'
  if tokens & _SKIPPED:
    return 'skip'
  for seq, names in _TOKENS.items():
    if tokens & names:
      return seq
  return None


def list_items(root: str, salt: bytes, required=SEQUENCES):
  """Items (one per session), listing rejects (no paths), the safe-name table and skip counts."""
  names = {root: '<input>'}
  sessions = collections.defaultdict(dict)
  rejects, skipped = [], collections.Counter()
  for rel in vc.list_files(root):
    if not rel.lower().endswith(_NIFTI):
      continue  # sidecars (BIDS .json, .bval), notes: not images
    key = vc.hashed_key(salt, DATASET, 'file', rel)
    names[os.path.join(root, rel)], names[rel] = key, key
    folder, base = os.path.split(rel)
    seq = sequence_of(base)
    if seq == 'skip':
      skipped['other_sequence'] += 1
      continue
    if seq is None:
      rejects.append(
        (key, 'unsupported', 'the file name names no T1, T2 or FLAIR sequence (module docstring)')
      )
      continue
    ixi = _IXI.match(base)
    if ixi:
      group, subject = (folder, ixi.group(1).upper()), ixi.group(1).upper()
    elif folder:
      group, subject = (folder, ''), folder.split(os.sep)[0]
    else:
      rejects.append((key, 'format', 'a file directly under --input: put each session in a folder'))
      continue
    session = sessions[group]
    session.setdefault('_subject', subject)
    session.setdefault(seq, []).append(rel)
  items = []
  for (folder, ixi), session in sorted(sessions.items()):
    raw = f'{folder}:{ixi}'
    key = vc.hashed_key(salt, DATASET, 'session', raw)
    names.setdefault(os.path.join(root, folder), f'{key}/')
    names.setdefault(folder, f'{key}/')
    doubled = [s for s in SEQUENCES if len(session.get(s, ())) > 1]
    if doubled:
      rejects.append(
        (key, 'duplicate', f'{len(session[doubled[0]])} {doubled[0]} files in one session')
      )
      continue
    missing = [s for s in dict.fromkeys(('t1', *required)) if s not in session]
    if missing:
      rejects.append((key, 'missing_file', f'no {", ".join(missing)} file in the session'))
      continue
    payload = {s: (session[s][0], names[session[s][0]]) for s in SEQUENCES if s in session}
    items.append(runner.Item(key=key, subject=session['_subject'], modality='mri', payload=payload))
  return items, rejects, names, dict(skipped)


def slice_records(stack, brain, spacing, min_fraction: float):
  """Records of the axial slices whose brain area is at least ``min_fraction`` of the largest."""
  area = brain.sum(axis=(1, 2))
  for z in np.flatnonzero(area >= min_fraction * area.max()):
    yield {
      'image': np.ascontiguousarray(stack[z]),
      'modality': 'mri',
      'region': 'brain',
      'spacing': spacing,
    }


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash  # the runner sets 'subject'
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  from data_prep import ops  # pylint: disable=g-import-not-at-top

  extra = options.extra
  names = {options.input: '<input>'}
  for rel, key in item.payload.values():
    names[os.path.join(options.input, rel)], names[rel] = key, key
    names.setdefault(os.path.dirname(os.path.join(options.input, rel)), f'{item.key}/')
  try:
    volumes = {
      s: ops.read_volume(os.path.join(options.input, rel)) for s, (rel, _) in item.payload.items()
    }
    resolution = extra.get('mni_resolution', 1)
    out, brain = ops.brain_to_mni(
      volumes,
      stripped=False,
      resolution=resolution,
      kind='affine',
      bias_correct=extra.get('n4', True),
      iterations=extra.get('mni_iterations', 100),
      shrink=tuple(max(1, s // resolution) for s in _REG_SHRINK),
      sampling=_REG_SAMPLING,
      n4_fit_mm=extra.get('n4_fit_mm', _N4_FIT_MM),
    )
    template, _ = ops.mni_template(resolution)
    inside = brain > 0
    reference = sitk.GetArrayFromImage(ops.to_canonical(template))[inside]
    corr = float(np.corrcoef(out['t1'][inside], reference)[0, 1])
    if not corr >= _MIN_CORR:  # NaN included
      raise runner.Reject(
        'geometry',
        f'{item.key}: MNI registration failed (T1 correlates {corr:.2f} with the template '
        f'inside the brain, < {_MIN_CORR})',
      )
    zero = np.zeros_like(out['t1'])
    stack = ops.stack_sequences(*(out.get(s, zero) for s in SEQUENCES))
    spacing = np.full(3, float(resolution), np.float32)
    return list(slice_records(stack, inside, spacing, extra.get('min_brain_fraction', 0.25)))
  except Exception as e:  # pylint: disable=broad-except  # every failure: one path-free reject
    raise vc.convert_reject(e, names) from None


def build(options: runner.Options) -> int:
  extra = options.extra
  sequences = extra.get('sequences') or ','.join(SEQUENCES)
  required = [s.strip().lower() for s in sequences.split(',') if s.strip()]
  unknown = sorted(set(required) - set(SEQUENCES))
  if unknown:
    raise ValueError(f'--sequences: {unknown[0]!r} is not one of {", ".join(SEQUENCES)}')
  if extra.get('mni_resolution', 1) not in (1, 2):
    raise ValueError(f'--mni_resolution={extra.get("mni_resolution")}: nilearn ships 1 or 2 mm')
  if not 0 <= extra.get('min_brain_fraction', 0.25) <= 1:
    raise ValueError(f'--min_brain_fraction={extra.get("min_brain_fraction")}: must be in [0, 1]')
  items, rejects, names, skipped = list_items(options.input, options.salt, required)
  if extra.get('locate'):
    print(
      '\n'.join(vc.locate(names, options.input, extra['locate']))
      or f'{extra["locate"]}: no such key'
    )
    return 0
  meta = {
    'n4': extra.get('n4', True),
    'n4_fit_mm': extra.get('n4_fit_mm', _N4_FIT_MM),
    'mni_resolution': extra.get('mni_resolution', 1),
    'mni_iterations': extra.get('mni_iterations', 100),
    'min_brain_fraction': extra.get('min_brain_fraction', 0.25),
  }
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    meta={
      **meta,
      'channels': list(SEQUENCES),
      'required_sequences': required,
      'skipped_files': skipped,
    },
  )


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  extra = {
    'sequences': f.sequences,
    'n4': f.n4,
    'n4_fit_mm': f.n4_fit_mm,
    'mni_resolution': f.mni_resolution,
    'mni_iterations': f.mni_iterations,
    'min_brain_fraction': f.min_brain_fraction,
    'locate': f.locate,
  }
  options = runner.options_from_flags(**extra)
  try:
    return build(options)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top

  runner.define_flags()
  flags.DEFINE_string('sequences', 't1,t2,flair', 'Sequences every session must have (T1 always).')
  flags.DEFINE_bool('n4', True, 'N4 bias-field correction of each sequence.')
  flags.DEFINE_float(
    'n4_fit_mm', _N4_FIT_MM, 'Voxel size (mm) N4 fits its bias field on (larger: faster, coarser).'
  )
  flags.DEFINE_integer('mni_resolution', 1, 'Template resolution in mm (1 or 2).')
  flags.DEFINE_integer('mni_iterations', 100, 'Optimiser iterations per registration stage.')
  flags.DEFINE_float(
    'min_brain_fraction',
    0.25,
    "Keep slices whose brain area is at least this fraction of the largest slice's.",
  )
  flags.DEFINE_string('locate', None, 'Print the files behind a rejects.jsonl key and exit.')


if __name__ == '__main__':
  from absl import app as _app

  define_flags()
  _app.run(main)
