"""Helpers every volumetric converter shares (dicom_ct, lits, luna16, lidc_idri, brats, acdc).

Listing (``list_files``), safe names for paths and UIDs that must never be written (``hashed_key``,
``scrub``, ``payload_names``, ``relative_names``, ``locate``), path-free rejects
(``convert_reject``), CT series of a DICOM tree (``scan_tree``, ``read_series``), CT slab records
(``slab_records``: HU int16, LPI, 1 mm isotropic, 64 slices; see ``data_prep.dicom_ct``) and the
``--slab_stride`` flag of every command that writes CT slabs. They live here, not in a command's
module, so that no converter imports another command.
"""

from __future__ import annotations

import hashlib
import os

from data_prep import privacy, runner


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
  [(relpath, file_key), ...], headers)`` for CT series (subject_id and series_uid are raw: hash or
  group only, never write), ``rejects`` holds ``(key, kind, reason)`` rows already free of paths
  and UIDs, and ``names`` maps every raw path / UID seen to its safe name (for ``scrub`` and
  ``--locate``).
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
      rejects.append(
        (key, 'unsupported', f'{n} {first.modality or "unknown-modality"} file(s): not a CT series')
      )
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
      if (
        h.position is not None
        and h.position in seen
        and _file_digest(seen[h.position].path) == _file_digest(h.path)
      ):
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


def locate(names: dict[str, str], root: str, key: str) -> list[str]:
  """What a safe key stands for: files, series folders or the series UID (terminal only)."""
  return sorted(
    {
      os.path.relpath(raw, root) if os.path.isabs(raw) else raw
      for raw, safe in names.items()
      if safe in (key, key + '/') and raw != root
    }
  )


def define_slab_flags():
  """The runner's flags plus --slab_stride: every command that writes CT slabs (dicom_ct, lits,
  luna16)."""
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
