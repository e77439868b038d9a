r"""DICOM radiographs (MIMIC-CXR DICOM, institutional CR/DX) -> X-ray shards, labels from a CSV.

  python -m data_prep.dicom_xray --input=RAW_DIR --output=OUT_DIR --salt_file=SALT \
      [--labels=labels.csv] [--label_columns=A,B,...] [--region=chest] [--workers=N] [--locate=KEY]

Every file under ``--input`` is read as DICOM (headers only at listing: ``data_prep.ops.dicom``);
CR, DX and RG images become records through ``ops.read_dicom_xray`` (modality LUT, VOI LUT or window,
MONOCHROME1 inverted so bone is bright) and the X-ray ops every X-ray dataset shares (uint8,
``--image_size``, CLAHE: ``data_prep.xray_common``). Spacing is PixelSpacing / ImagerPixelSpacing
(0 when absent). The subject is the salted hash of PatientID; the split is patient-level.

``--labels`` (optional; without it records carry no label): a CSV with a ``path`` column (relative
to ``--input``) and

* ``--label_columns=A,B,...`` (or, by default, the 14 CheXpert observations when the CSV has them):
  ``labels`` int8, 1 positive / 0 negative or blank / -1 uncertain, as CheXpert;
* otherwise a ``label`` column of class names: ``label`` int32 over the names in sorted order;
* optionally ``split`` (train, val or validate, test): an official split.

A file with no CSV row, a row whose file is missing, a value outside the vocabulary, a short row,
non-radiograph modalities (CT, MR, SR, ...), colour or multi-frame images and unsupported transfer
syntaxes are rejects. Privacy as ``data_prep.dicom_ct``: file names are often SOPInstanceUIDs and
folders patient ids, so items and rejects are named ``file-<salted hash>``, reasons are scrubbed of
paths, and ``--locate=KEY`` prints (to the terminal only) which file a key stands for. No header
field but pixel format, geometry, modality and PatientID (hashed) is ever read.
"""

from __future__ import annotations

import os

from data_prep import runner
from data_prep import volume_common as vc
from data_prep import xray_common as xc

DATASET = 'dicom_xray'
REGIONS = ('chest', 'hand')
# Projection radiography: computed (CR), digital (DX) and the retired RG. CT, MR, MG, US... are not.
MODALITIES = ('CR', 'DX', 'RG')
_SPLITS = {'train': 'train', 'val': 'val', 'validate': 'val', 'test': 'test'}


def read_labels(path: str, label_columns=()):
  """``({relpath: payload or None if rejected}, rejects, label names)`` (see the docstring)."""
  rows, rejects = {}, []
  table = list(xc.read_csv(path))
  header = set(table[0][1]) if table else set()
  columns = list(label_columns) or (
    list(xc.CHEXPERT_LABELS) if set(xc.CHEXPERT_LABELS) <= header else []
  )
  if 'path' not in header and table:
    raise ValueError(f'{path}: no "path" column (the file path relative to --input)')
  missing = [c for c in columns if c not in header]
  if missing:
    raise ValueError(f'{path}: no column {missing[0]!r} (--label_columns)')
  classes = (
    None
    if columns or 'label' not in header
    else sorted({(r.get('label') or '').strip() for _, r in table} - {''})
  )
  name = os.path.basename(path)
  for line, row in table:
    where = f'{name} line {line}'
    rel = os.path.normpath((row.get('path') or '').strip()) if row.get('path') else ''
    try:
      xc.check_row(row, where)
      if not rel or rel.startswith('..'):
        raise runner.Reject('missing_label', f'{where}: no path under --input')
      if rel in rows:
        raise runner.Reject('duplicate', f'{where}: file listed again')
      payload = {}
      split = (row.get('split') or '').strip()
      if split:
        if split not in _SPLITS:
          raise runner.Reject(
            'unknown_label', f'{where}: split {split!r} is not one of {sorted(_SPLITS)}'
          )
        payload['split'] = _SPLITS[split]
      if columns:
        payload['labels'] = _multi(row, columns, where)
      elif classes is not None:
        value = row['label'].strip()
        if not value:
          raise runner.Reject('missing_label', f'{where}: blank label')
        payload['label'] = classes.index(value)
    except runner.Reject as e:
      # Keyed by CSV line: the row's path may hold identifiers and has no hashed key yet.
      rejects.append((where, e.kind, e.reason))
      if rel and e.kind != 'duplicate':
        rows.setdefault(rel, None)  # listed (not "missing_label"), but not converted
      continue
    rows[rel] = payload
  names = columns or classes
  return rows, rejects, names


def _multi(row, columns, where):
  if columns == list(xc.CHEXPERT_LABELS):
    return xc.chexpert_labels(row, where)
  out = []
  for name in columns:
    value = row[name].strip()
    if value not in xc.LABEL_VALUES:
      raise runner.Reject(
        'unknown_label', f'{where}: {name!r} is {value!r}, expected 1, 0, -1 or blank'
      )
    out.append(xc.LABEL_VALUES[value])
  return out


def list_items(root: str, salt: bytes, labels: str | None = None, label_columns=()):
  """Items (one per radiograph), listing rejects (no paths, no UIDs), the safe-name table and the
  label names (None without ``labels``)."""
  from data_prep import ops  # pylint: disable=g-import-not-at-top  # heavy: SimpleITK.

  rows, rejects, names_out = read_labels(labels, label_columns) if labels else ({}, [], None)
  rels = vc.list_files(root)
  if labels:  # the CSV may sit beside the images: it is no DICOM to reject
    rels = [r for r in rels if os.path.abspath(os.path.join(root, r)) != os.path.abspath(labels)]
  names = {}
  for rel in set(rels) | set(rows):
    key = vc.hashed_key(salt, DATASET, 'file', rel)
    names[os.path.join(root, rel)], names[rel] = key, key
  names[root] = '<input>'
  items = []
  on_disk = set(rels)
  for rel in sorted(set(rels) | set(rows)):
    key = names[rel]
    if labels and rel not in rows:
      rejects.append((key, 'missing_label', f'file has no row in {os.path.basename(labels)}'))
      continue
    if labels and rows[rel] is None:
      continue  # its row was rejected above
    if rel not in on_disk:
      path = os.path.join(root, rel)
      kind = 'not_a_file' if os.path.lexists(path) else 'missing_file'
      rejects.append(
        (
          key,
          kind,
          'listed in the labels CSV, but no such file under --input'
          if kind == 'missing_file'
          else 'listed in the labels CSV: a directory',
        )
      )
      continue
    try:
      header = ops.read_header(os.path.join(root, rel))
      ops.check_transfer_syntax(header, decoder='pydicom')
    except ops.PrepError as e:
      rejects.append((key, e.kind, vc.scrub(e.reason, names)))
      continue
    if header.modality not in MODALITIES:
      rejects.append(
        (
          key,
          'unsupported',
          f'modality {header.modality or "unknown"}: not a '
          f'radiograph ({", ".join(MODALITIES)}); CT series: '
          'python -m data_prep.dicom_ct',
        )
      )
      continue
    if not header.subject_id:
      rejects.append((key, 'empty', 'no PatientID: a patient-level split needs one'))
      continue
    items.append(
      runner.Item(
        key=key,
        subject=header.subject_id,
        modality='xray',
        payload={'file': rel, **(rows.get(rel) or {})},
      )
    )
  return items, rejects, names, names_out


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash  # the runner sets 'subject'
  from data_prep import ops  # pylint: disable=g-import-not-at-top

  rel = item.payload['file']
  path = os.path.join(options.input, rel)
  # Reasons name the file: replace it by its key (workers have no salt to rebuild the table).
  names = {path: item.key, rel: item.key, options.input: '<input>'}
  try:
    pixels, spacing = ops.read_dicom_xray(path)
    pixels = xc.check_pixels(pixels, item.key)
    yield xc.xray_record(
      pixels,
      options,
      region=options.extra.get('region', 'chest'),
      spacing=spacing,
      label=item.payload.get('label'),
      labels=item.payload.get('labels'),
    )
  except Exception as e:  # pylint: disable=broad-except  # every failure: one path-free reject
    raise vc.convert_reject(e, names) from None


def build(options: runner.Options) -> int:
  extra = options.extra
  if extra.get('region', 'chest') not in REGIONS:
    raise ValueError(f'--region={extra.get("region")}: expected one of {REGIONS}')
  columns = [c.strip() for c in (extra.get('label_columns') or '').split(',') if c.strip()]
  items, rejects, names, label_names = list_items(
    options.input, options.salt, extra.get('labels'), columns
  )
  if extra.get('locate'):
    print(
      '\n'.join(vc.locate(names, options.input, extra['locate']))
      or f'{extra["locate"]}: no such key'
    )
    return 0
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    label_names=label_names,
    split_of=lambda item: item.payload.get('split'),
    meta={'region': extra.get('region', 'chest')},
  )


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top

  xc.define_xray_flags()
  flags.DEFINE_string('labels', None, 'CSV with a path column and labels (module docstring).')
  flags.DEFINE_string(
    'label_columns',
    None,
    'Comma-separated multi-label columns of --labels '
    '(default: the CheXpert observations when present, else a label column).',
  )
  flags.DEFINE_enum('region', 'chest', list(REGIONS), 'Body region of every image (sets organs).')
  flags.DEFINE_string('locate', None, 'Print the file behind a rejects.jsonl key and exit.')


if __name__ == '__main__':
  define_flags()
  xc.run_command(build, 'labels', 'label_columns', 'region', 'locate')
