r"""CT DICOM series in any folder layout (institutional data) -> 64-slice 2.5D CT slab records.

  python -m data_prep.dicom_ct --input=RAW_DIR --output=OUT_DIR --salt_file=SALT [--region=chest]
      [--workers=N] [--slab_stride=64]

About 9 s and 0.8 GB peak RSS per 512x512x400 series per worker (``python -m aacp_jax.bench prep``).

Every file under ``--input`` is read as DICOM (headers only, geometry and pixel fields: see
``data_prep.ops.dicom``) and files are grouped into series by SeriesInstanceUID, whatever the folders.
A CT series becomes slabs: HU int16, oriented LPI (rows anterior->posterior, columns patient
right->left, slices superior->inferior), 1 mm isotropic, 64 slices per slab every ``--slab_stride``
slices (the last slab is shifted back to end on the last slice), full field of view in-plane.
Non-CT series (MR, CR, SR, ...), localizers (ImageType LOCALIZER), files that are not DICOM, exact
duplicate files, unsupported transfer syntaxes and broken geometry are listed in rejects.jsonl.

Privacy: institutional folder and file names often hold patient names, ids or dates, and file names
are often SOPInstanceUIDs, so nothing path-like is written. Items and rejected files are named by a
salted hash of their relative path or series UID (``file-...``, ``series-...``), error messages are
scrubbed of paths, and the subject is the salted hash of PatientID. ``--locate=KEY`` prints (to the
terminal only) which files a key stands for.
"""
from __future__ import annotations

import hashlib
import os

from data_prep import privacy
from data_prep import runner

DATASET = 'dicom_ct'
REGIONS = ('chest', 'abdomen', 'brain')


def hashed_key(salt: bytes, dataset: str, kind: str, raw: str) -> str:
  """``kind-<16 hex>``: a stable, salted name for a path or UID that must not be written."""
  return f'{kind}-{privacy.subject_hash(salt, dataset, f"{kind}:{raw}")[:16]}'


def scrub(text: str, names: dict[str, str]) -> str:
  """``text`` with every raw string in ``names`` replaced by its safe name (longest first)."""
  for raw in sorted(names, key=len, reverse=True):
    if raw:
      text = text.replace(raw, names[raw])
  return text


def list_files(root: str, *, skip_ext=()) -> list[str]:
  """Every regular, non-hidden file under ``root`` (sorted relative paths)."""
  out = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(names):
      if not name.startswith('.') and not name.lower().endswith(tuple(skip_ext)):
        out.append(os.path.relpath(os.path.join(folder, name), root))
  return out


def _image_type(path: str) -> tuple[str, ...]:
  import pydicom  # pylint: disable=g-import-not-at-top
  ds = pydicom.dcmread(path, specific_tags=['ImageType'], stop_before_pixels=True)
  return tuple(str(v).upper() for v in (ds.get('ImageType') or ()))


def _file_digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def scan_tree(root: str, dataset: str, salt: bytes, *, skip_ext=()):
  """Groups a DICOM tree into CT series.

  Returns ``(series, rejects, names)``: ``series`` is a list of ``(key, subject_id, series_uid,
  [(relpath, file_key), ...], headers)`` for CT series (subject_id and series_uid are raw: hash or group only,
  never write), ``rejects`` holds ``(key, kind, reason)`` rows already free of paths and UIDs, and
  ``names`` maps every raw path / UID seen to its safe name (for ``scrub`` and ``--locate``).
  """
  from data_prep import ops  # pylint: disable=g-import-not-at-top  # heavy: SimpleITK.

  rels = list_files(root, skip_ext=skip_ext)
  names = {}
  for rel in rels:
    key = hashed_key(salt, dataset, 'file', rel)
    names[os.path.join(root, rel)] = key
    names[rel] = key
  groups, bad = ops.group_series(os.path.join(root, rel) for rel in rels)
  rejects = [(names[path], kind, scrub(reason, names)) for path, kind, reason in bad]
  series = []
  for uid, headers in sorted(groups.items(), key=lambda kv: names[kv[1][0].path]):
    key = hashed_key(salt, dataset, 'series', uid)
    names[uid] = key
    for h in headers:
      names.setdefault(os.path.dirname(h.path), f'{key}/')
    first = headers[0]
    n = len(headers)
    if first.modality != 'CT':
      rejects.append((key, 'unsupported', f'{n} {first.modality or "unknown-modality"} file(s): '
                      'not a CT series'))
      continue
    try:
      kinds = _image_type(first.path)
    except Exception:  # pylint: disable=broad-except  # the header read just succeeded; be safe.
      kinds = ()
    if 'LOCALIZER' in kinds:
      rejects.append((key, 'unsupported', f'{n} file(s): a localizer (scout) series, not a volume'))
      continue
    try:
      ops.check_transfer_syntax(first, decoder='sitk')
    except ops.PrepError as e:
      rejects.append((key, e.kind, scrub(e.reason, names)))
      continue
    if not first.subject_id:
      rejects.append((key, 'empty', 'no PatientID: a patient-level split needs one'))
      continue
    kept, seen = [], {}
    for h in headers:
      # An exact copy of a slice (same position, same bytes) is dropped; anything else at one
      # position is left for the geometry check, which rejects the series.
      if h.position is not None and h.position in seen and \
          _file_digest(seen[h.position].path) == _file_digest(h.path):
        rejects.append((names[h.path], 'duplicate', f'an exact copy of another slice of {key}'))
        continue
      seen.setdefault(h.position, h)
      kept.append(h)
    files = [(os.path.relpath(h.path, root), names[h.path]) for h in kept]
    series.append((key, first.subject_id, uid, files, kept))
  return series, rejects, names


def convert_reject(e: Exception, names: dict[str, str]) -> runner.Reject:
  """A Reject whose reason carries no raw path or UID (ops name files in their messages)."""
  kind = getattr(e, 'kind', None) or 'error'
  reason = getattr(e, 'reason', None) or f'{type(e).__name__}: {e}'
  return runner.Reject(kind, scrub(' '.join(str(reason).split()), names))


def relative_names(root: str) -> dict[str, str]:
  """``scrub`` table that turns absolute paths under ``root`` into paths relative to it."""
  return {os.path.join(root, ''): '', root: '<input>'}


def payload_names(root: str, files, series_key: str) -> dict[str, str]:
  """The raw-to-safe name table ``scrub`` needs inside a worker (which has no salt)."""
  names = {}
  for rel, key in files:
    path = os.path.join(root, rel)
    names[path], names[rel] = key, key
    names.setdefault(os.path.dirname(path), f'{series_key}/')
  names[root] = '<input>'
  return names


def read_series(root: str, files, series_key: str):
  """The int16 HU volume of a listed series; failures become path-free Rejects."""
  from data_prep import ops  # pylint: disable=g-import-not-at-top
  names = payload_names(root, files, series_key)
  try:
    headers = [ops.read_header(os.path.join(root, rel)) for rel, _ in files]
    return ops.read_dicom_series(headers)
  except Exception as e:  # pylint: disable=broad-except  # every failure becomes one clean reject.
    raise convert_reject(e, names) from None


def slab_records(image, *, region: str, stride: int = 64, mask=None, where: str = 'volume'):
  """CT slab records (image, modality, region, spacing) of an HU volume; ``mask`` slabs are returned
  beside each record as ``(record, slab)`` so callers can derive their own mask/label."""
  from data_prep import ops  # pylint: disable=g-import-not-at-top
  for slab in ops.ct_slabs(image, mask=mask, stride=stride, where=where):
    yield {'image': slab.image, 'modality': 'ct', 'region': region, 'spacing': slab.spacing}, slab


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash  # the runner sets 'subject'
  image = read_series(options.input, item.payload['files'], item.key)
  region = options.extra.get('region', 'chest')
  try:
    for record, _ in slab_records(image, region=region, stride=options.extra.get('slab_stride', 64),
                                  where=item.key):
      yield record
  except Exception as e:  # pylint: disable=broad-except
    raise convert_reject(e, payload_names(options.input, item.payload['files'], item.key)) from None


def list_items(root: str, salt: bytes, dataset: str = DATASET):
  """Items (one per CT series), listing-time rejects and the safe-name table."""
  series, rejects, names = scan_tree(root, dataset, salt)
  items = [runner.Item(key=key, subject=subject, modality='ct', payload={'files': files})
           for key, subject, _, files, _ in series]
  return items, rejects, names


def locate(names: dict[str, str], root: str, key: str) -> list[str]:
  """What a safe key stands for: files, series folders or the series UID (terminal only)."""
  return sorted({os.path.relpath(raw, root) if os.path.isabs(raw) else raw
                 for raw, safe in names.items() if safe in (key, key + '/') and raw != root})


def define_slab_flags():
  """The runner's flags plus --slab_stride: every command that writes CT slabs (dicom_ct, lits, luna16)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  runner.define_flags()
  flags.DEFINE_integer('slab_stride', 64, 'Slices between slab starts (64: no overlap).')


def slab_options(argv, **extra):
  """Runner options with the checked --slab_stride; a one-line usage error for bad arguments."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  stride = flags.FLAGS.slab_stride
  if stride < 1:
    raise app.UsageError(f'--slab_stride={stride}: must be >= 1')
  return runner.options_from_flags(slab_stride=stride, **extra)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  flags = absl_flags.FLAGS
  if flags.region not in REGIONS:
    raise app.UsageError(f'--region={flags.region}: expected one of {REGIONS}')
  options = slab_options(argv, region=flags.region)
  items, rejects, names = list_items(options.input, options.salt)
  if flags.locate:
    print('\n'.join(locate(names, options.input, flags.locate)) or f'{flags.locate}: no such key')
    return 0
  return runner.run(DATASET, items, convert, options, rejects=rejects,
                    meta={'region': flags.region, 'slab_stride': flags.slab_stride})


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  define_slab_flags()
  flags.DEFINE_enum('region', 'chest', list(REGIONS), 'Body region of every series (sets organs).')
  flags.DEFINE_string('locate', None, 'Print the relative paths behind a rejects.jsonl key and exit.')
  return flags.FLAGS


if __name__ == '__main__':
  from absl import app as _app
  define_flags()
  _app.run(main)
