"""ArrayRecord shards of encoded records, plus the manifest that describes (and checksums) them.

Layout::

    ROOT/<split>/<modality>-NNNNN-of-NNNNN.array_record
    ROOT/<split>/<modality>-NNNNN-of-NNNNN.arrays      (when records have arrays >= 1 MiB)
    ROOT/<split>/manifest.json

An ``.arrays`` file holds its shard's large images and masks as raw bytes at 4 KiB-aligned offsets
(the records keep their offsets and CRC32Cs, ``records.externalize``): ArrayRecord copies a record
about four times on a read (~1.1 ns/byte), a ``preadv`` into the batch once (docs/DESIGN.md).

The manifest is written last, so its presence marks a complete split; every shard lands by rename
from a temporary file, so a crash never leaves a half-written file under a final name. Readers trust
the manifest for record counts and checksums: a missing, truncated or corrupt shard fails at open
time with a one-line ``ShardError`` naming the file instead of deep inside a training step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import ctypes
import datetime
import functools
import json
import os
import re
import threading
from typing import Any

from array_record.python import array_record_module
import numpy as np

from aacp_jax import digest, version
from aacp_jax.data import records as rec
from aacp_jax.errors import one_line

MANIFEST = 'manifest.json'
FORMAT_VERSION = 1
RECORDS_PER_SHARD = 256
# Shards are written uncompressed: ArrayRecord's default is zstd:3, whose decompression costs
# more than the bytes it saves on a local disk (a 16 MiB CT slab read in 42 ms compressed, 17 ms
# uncompressed; a 1 MiB radiograph 2.1 vs 0.4 ms; docs/PERFORMANCE.md). Pass e.g. 'zstd:3' to the
# writers for a network filesystem where bytes cost more than CPU. Readers read either kind: the
# compression is in each chunk's header.
COMPRESSION = 'uncompressed'
_COMPRESSION = re.compile(r'uncompressed|snappy|(zstd|brotli)(:-?\d+)?')
# Random access as the ArrayRecord reader's docs advise: no readahead buffer, no thread pool (the
# read runs in the calling Grain thread; a pool of its own only added copies and contention here).
_READER_OPTIONS = 'readahead_buffer_size:0,max_parallelism:0'
# Images and masks this large go to the shard's array file (a 358² x 64 CT slab is 16 MiB, a 1024²
# radiograph 1 MiB); smaller ones (phantoms, 224² MRI) stay inline, where one read fetches all.
ARRAY_FILE_MIN_BYTES = 1 << 20
_ARRAY_ALIGN = 4096  # page-aligned offsets: the kernel copies whole pages into the batch


class ShardError(RuntimeError):
  """A shard or manifest that is missing, truncated or corrupt; the message is one line."""


def shard_name(modality: str, index: int, count: int) -> str:
  return f'{modality}-{index:05d}-of-{count:05d}.array_record'


def auto_num_shards(num_records: int) -> int:
  return max(1, round(num_records / RECORDS_PER_SHARD))


class _Summary:
  """Shapes, dtypes and label counts of one modality's records, gathered while writing."""

  def __init__(self):
    self.shapes: dict[str, Any] = {}
    self.dtypes: dict[str, str] = {}
    self.labels: dict[str, int] = {}
    # The largest image (h, w): readers pad batches of mixed sizes to it (pipeline.pad_hw).
    self.max_hw: list[int] | None = None

  def add(self, record: dict) -> None:
    if np.ndim(record.get('image')) >= 2:  # a bad record fails in encode, with its message
      hw = [int(v) for v in np.shape(record['image'])[:2]]
      self.max_hw = hw if self.max_hw is None else [max(a, b) for a, b in zip(self.max_hw, hw)]
    for key, value in record.items():
      if isinstance(value, str):
        continue
      shape = list(np.shape(value))
      # Real datasets may mix sizes; the manifest then says so instead of guessing one.
      self.shapes[key] = shape if self.shapes.get(key, shape) == shape else 'variable'
      self.dtypes[key] = str(np.asarray(value).dtype)
    if 'label' in record:
      label = str(int(record['label']))
      self.labels[label] = self.labels.get(label, 0) + 1


def writer_options(compression: str | None = None) -> str:
  """ArrayRecord writer options of a shard: ``group_size:1`` (every record its own chunk, so a
  random read reads exactly one record) and ``compression`` (default ``COMPRESSION``; also
  'snappy', 'zstd[:level]', 'brotli[:level]')."""
  compression = COMPRESSION if compression is None else compression
  match = isinstance(compression, str) and _COMPRESSION.fullmatch(compression)
  level = int(match.group(2)[1:]) if match and match.group(2) else None
  # ArrayRecord's ranges: zstd -131072..22, brotli 0..11 (checked here, before files are touched).
  if level is not None and not (
    -131072 <= level <= 22 if match.group(1) == 'zstd' else 0 <= level <= 11
  ):
    match = None
  if not match:
    raise ValueError(
      f"compression {compression!r}: expected 'uncompressed', 'snappy', 'zstd[:level]' or "
      "'brotli[:level]'"
    )
  return f'group_size:1,{compression}'


def array_file_path(shard_path: str) -> str:
  """The array file beside a shard: ``ct-00000-of-00001.array_record`` -> ``...-00001.arrays``."""
  stem = shard_path[: -len('.array_record')] if shard_path.endswith('.array_record') else shard_path
  return stem + '.arrays'


class _ArrayFile:
  """Appends arrays at aligned offsets to ``<path>.tmp-PID``, created on the first one."""

  def __init__(self, path: str):
    self.path, self.tmp, self.f, self.size = path, f'{path}.tmp-{os.getpid()}', None, 0

  def place(self, block: memoryview) -> int:
    if self.f is None:
      self.f = open(self.tmp, 'wb')  # pylint: disable=consider-using-with  # closed in finish()
    pad = -self.size % _ARRAY_ALIGN
    self.f.write(bytes(pad))
    offset = self.size + pad
    self.f.write(block)
    self.size = offset + len(block)
    return offset

  def finish(self, keep: bool) -> dict | None:
    """Closes; ``keep``: lands it under its final name and returns its manifest entry."""
    if self.f is None:
      if keep and os.path.exists(self.path):
        os.remove(self.path)  # an older write of this shard had one; these records do not
      return None
    self.f.close()
    if not keep:
      os.remove(self.tmp)
      return None
    os.replace(self.tmp, self.path)
    return {
      'name': os.path.basename(self.path),
      'bytes': os.path.getsize(self.path),
      'sha256': digest.sha256_file(self.path),
    }


def _write_shard(
  path: str, payloads: Iterable[bytes], compression: str | None = None, arrays: bool = True
) -> dict:
  options = writer_options(compression)  # a bad value fails before any file exists
  tmp = f'{path}.tmp-{os.getpid()}'
  writer = array_record_module.ArrayRecordWriter(tmp, options)
  array_file = _ArrayFile(array_file_path(path))
  count = 0
  try:
    for payload in payloads:
      if arrays:
        payload = rec.externalize(payload, array_file.place, min_bytes=ARRAY_FILE_MIN_BYTES)
      writer.write(payload)
      count += 1
  except BaseException:
    writer.close()
    os.remove(tmp)
    array_file.finish(keep=False)
    raise
  writer.close()
  # The array file lands first: a shard under its final name always has its arrays beside it.
  arrays_entry = array_file.finish(keep=True)
  os.replace(tmp, path)
  entry = {
    'name': os.path.basename(path),
    'count': count,
    'bytes': os.path.getsize(path),
    'sha256': digest.sha256_file(path),
  }
  if arrays_entry:
    entry['arrays'] = arrays_entry
  return entry


def write_split(
  root: str,
  split: str,
  records_by_modality: Mapping[str, Iterable[dict]],
  *,
  seed: int,
  num_shards: int | Mapping[str, int] | None = None,
  code_version: str | None = None,
  label_names: Mapping[str, list[str]] | None = None,
  meta: Mapping[str, Any] | None = None,
  compression: str | None = None,
  arrays: bool = True,
) -> dict:
  """Encodes and writes every modality's records; returns the manifest it wrote.

  ``num_shards`` (an int, or per modality) None picks ~256 records per shard. Shards need the record
  count up front: pass iterables with ``len()``; a plain generator is first held in memory encoded.
  ``meta`` is stored verbatim (e.g. generator parameters a cache compares against).
  ``compression``: of the ArrayRecord chunks (``writer_options``; default uncompressed).
  ``arrays``: images and masks of ``ARRAY_FILE_MIN_BYTES`` or more go to each shard's array file
  (False keeps every record whole inside its shard, the layout before array files).
  """
  writer_options(compression)  # a bad value fails before anything is written or removed
  split_dir = os.path.join(root, split)
  os.makedirs(split_dir, exist_ok=True)
  manifest_path = os.path.join(split_dir, MANIFEST)
  # Drop the old manifest first: until the new one lands, the split reads as incomplete.
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  modalities = {}
  for modality, records in records_by_modality.items():
    if modality not in rec.IMAGE_SPEC:
      raise ValueError(f'unknown modality {modality!r}; expected one of {rec.MODALITIES}')
    summary = _Summary()

    def payloads(items, modality=modality, summary=summary):
      for i, record in enumerate(items):
        if record.get('modality') != modality:
          raise rec.RecordError(
            f"{split}/{modality} record {i}: 'modality' is "
            f'{record.get("modality")!r}, written under {modality!r}'
          )
        summary.add(record)
        yield rec.encode(record)

    if hasattr(records, '__len__'):
      total, stream = len(records), payloads(records)
    else:
      encoded = list(payloads(records))
      total, stream = len(encoded), iter(encoded)
    n_shards = num_shards.get(modality) if isinstance(num_shards, Mapping) else num_shards
    n_shards = n_shards or auto_num_shards(total)
    for old in os.listdir(split_dir):
      if old.startswith(f'{modality}-') and old.endswith(('.array_record', '.arrays')):
        os.remove(os.path.join(split_dir, old))
    files = []
    for s in range(n_shards):
      path = os.path.join(split_dir, shard_name(modality, s, n_shards))
      # Contiguous blocks: neighbouring records share a file, as a sequential reader expects.
      chunk = _take(stream, (s + 1) * total // n_shards - s * total // n_shards)
      files.append(_write_shard(path, chunk, compression, arrays))
    if next(stream, None) is not None:
      raise ValueError(f'{split}/{modality}: the records yielded more items than their len()')
    modalities[modality] = {
      'count': sum(f['count'] for f in files),
      'files': files,
      'shapes': summary.shapes,
      'dtypes': summary.dtypes,
      'label_counts': summary.labels or None,
      'max_hw': summary.max_hw,
    }

  return write_manifest(
    root,
    split,
    modalities,
    seed=seed,
    code_version=code_version,
    label_names=label_names,
    meta=meta,
  )


def write_shard(
  path: str, payloads: Iterable[bytes], *, compression: str | None = None, arrays: bool = True
) -> dict:
  """One shard from already encoded records (tmp file + rename); returns its manifest ``files`` entry.

  For writers that produce shards one at a time (``data_prep.runner``: one shard per worker task).
  ``compression`` as in ``writer_options`` (default uncompressed). Images and masks of at least
  ``ARRAY_FILE_MIN_BYTES`` go to ``array_file_path(path)``, listed in the entry's ``arrays``.
  """
  return _write_shard(path, payloads, compression, arrays)


def check_files(split_dir: str, entry: dict, *, verify: bool = True) -> str | None:
  """Why a manifest ``files`` entry (shard and array file) is not intact on disk, or None."""
  for f in (entry, entry.get('arrays')):
    if f is None:
      continue
    path = os.path.join(split_dir, f['name'])
    if not os.path.exists(path):
      return f'{path}: {"array file" if f is not entry else "shard"} missing'
    size = os.path.getsize(path)
    if size != f['bytes']:
      return f'{path}: size {size} bytes, manifest says {f["bytes"]} (truncated?)'
    if verify and digest.sha256_file(path) != f['sha256']:
      return f'{path}: sha256 mismatch with manifest (corrupt)'
  return None


def write_manifest(
  root: str,
  split: str,
  modalities: Mapping[str, dict],
  *,
  seed: int,
  code_version: str | None = None,
  label_names: Mapping[str, list[str]] | None = None,
  meta: Mapping[str, Any] | None = None,
) -> dict:
  """Writes ``ROOT/<split>/manifest.json`` for shards already on disk; returns the manifest.

  ``modalities``: per modality ``{count, files, shapes, dtypes, label_counts}`` as ``write_split``
  builds them. An existing manifest that differs only in ``created`` is left untouched, so an
  unchanged re-run of a converter leaves every output byte as it was.
  """
  manifest_path = os.path.join(root, split, MANIFEST)
  manifest = {
    'format_version': FORMAT_VERSION,
    'record_version': rec.VERSION,
    'split': split,
    'seed': seed,
    'code_version': code_version or version.code_version(),
    'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'label_names': dict(label_names) if label_names else None,
    'meta': dict(meta) if meta else None,
    'modalities': dict(modalities),
  }
  # Round-trip through JSON so tuples and lists compare equal to what a reader sees.
  manifest = json.loads(json.dumps(manifest))
  try:
    with open(manifest_path, encoding='utf-8') as f:
      old = json.load(f)
    if {**old, 'created': None} == {**manifest, 'created': None}:
      return old
  except (OSError, ValueError):
    pass
  tmp = f'{manifest_path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, manifest_path)
  return manifest


def _take(it, n):
  for _ in range(n):
    try:
      yield next(it)
    except StopIteration:
      return


def read_manifest(root: str, split: str) -> dict:
  path = os.path.join(root, split, MANIFEST)
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise ShardError(f'{path}: manifest missing (split not written or incomplete)') from None
  except (OSError, ValueError) as e:
    raise ShardError(f'{path}: unreadable manifest ({one_line(e)})') from None
  if manifest.get('format_version') != FORMAT_VERSION:
    raise ShardError(
      f'{path}: format_version {manifest.get("format_version")}, expected {FORMAT_VERSION}'
    )
  return manifest


def _modality_entry(root: str, split: str, modality: str) -> dict:
  manifest = read_manifest(root, split)
  if modality not in manifest['modalities']:
    raise ShardError(
      f'{os.path.join(root, split, MANIFEST)}: no modality {modality!r} '
      f'(has {sorted(manifest["modalities"])})'
    )
  return manifest['modalities'][modality]


def shard_paths(root: str, split: str, modality: str) -> list[str]:
  return [
    os.path.join(root, split, f['name']) for f in _modality_entry(root, split, modality)['files']
  ]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_malloc_tuned = False


def _reuse_large_allocations() -> None:
  """Lets glibc keep record-sized buffers instead of mmap-ing (and page-faulting) fresh ones.

  ArrayRecord returns each record through a few buffers of its size; above glibc's mmap
  threshold every one is a fresh mapping whose pages the kernel zeroes on first touch. For a
  16 MiB CT slab that was 2/3 of the read (63 -> 21 ms per record, measured; 53 -> 21 ms on an
  uncompressed shard, one core, 2026-12-02). Process-wide and
  harmless elsewhere (memory stays with the process for reuse); a no-op without glibc.
  """
  global _malloc_tuned
  if _malloc_tuned:
    return
  _malloc_tuned = True
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: HEAP_MAX_SIZE / 2
    libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
  except (OSError, AttributeError):
    pass


class _OpenFile:
  """A read-only descriptor closed with its last reference (copies of a source share it)."""

  def __init__(self, path: str):
    try:
      self.fd = os.open(path, os.O_RDONLY)
    except OSError as e:
      raise ShardError(f'{path}: cannot open ({e.strerror or e})') from None

  def fileno(self) -> int:
    return self.fd

  def __del__(self):
    os.close(self.fd)


class ShardSource:
  """Random-access source of decoded, validated records (``len`` + ``__getitem__``) for Grain.

  Readers open lazily per process: Grain worker processes receive this object by pickling, and
  native reader handles must not cross that boundary.
  """

  def __init__(
    self, root: str, split: str, modality: str, *, verify: bool = True, lazy: bool = False
  ):
    self.split, self.modality, self.lazy = split, modality, bool(lazy)
    files = _modality_entry(root, split, modality)['files']
    split_dir = os.path.join(root, split)
    self._paths = [os.path.join(split_dir, f['name']) for f in files]
    self._array_paths = [
      os.path.join(split_dir, f['arrays']['name']) if f.get('arrays') else None for f in files
    ]
    self._counts = [int(f['count']) for f in files]
    self._starts = np.cumsum([0] + self._counts)
    for f in files:
      problem = check_files(split_dir, f, verify=verify)
      if problem:
        raise ShardError(problem)
    self._readers: list[Any] = [None] * len(self._paths)
    self._fds: list[_OpenFile | None] = [None] * len(self._paths)
    self._lock = threading.Lock()
    _reuse_large_allocations()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _reader(self, s: int):
    if self._readers[s] is None:
      with self._lock:
        if self._readers[s] is None:
          path = self._paths[s]
          try:
            reader = array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
            n = reader.num_records()
          except Exception as e:  # pylint: disable=broad-except  # native errors have no common type.
            raise ShardError(f'{path}: unreadable array_record ({one_line(e)})') from None
          if n != self._counts[s]:
            raise ShardError(f'{path}: {n} records, manifest says {self._counts[s]}')
          self._readers[s] = reader
    return self._readers[s]

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'{self.split}/{self.modality}: index {index} out of range [0, {len(self)})')
    s = int(np.searchsorted(self._starts, index, side='right') - 1)
    pos = index - int(self._starts[s])
    name = f'{self.split}/{os.path.basename(self._paths[s])}'
    try:
      data = self._reader(s).read([pos])[0]
    except ShardError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ShardError(f'shard {name} record {pos}: read failed ({one_line(e)})') from None
    where = f'shard {name} record {pos}'
    try:
      return rec.decode(data, where=where, external=functools.partial(self._external, s, where))
    except rec.RecordError as e:
      raise ShardError(str(e)) from None

  def _external(self, s, where, key, dtype, shape, offset, crc):
    """An array of record ``where`` kept in shard ``s``'s array file: unread when ``lazy`` (the
    batch reads it into its slot, ``pipeline.PadBatch``), else read and checked now."""
    if self._array_paths[s] is None:
      raise ShardError(f'{where}: {key!r} lives in an array file the manifest does not list')
    if self._fds[s] is None:
      with self._lock:
        if self._fds[s] is None:
          self._fds[s] = _OpenFile(self._array_paths[s])
    where = f'{where} ({os.path.basename(self._array_paths[s])})'
    array = rec.External(dtype, shape, offset, crc, self._fds[s], where, key)
    return array if self.lazy else array.materialise()

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_readers'] = [None] * len(self._paths)
    state['_fds'] = [None] * len(self._paths)  # descriptors are this process's own
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    _reuse_large_allocations()  # in a Grain worker process too

  def __repr__(self) -> str:
    return f'ShardSource({self.split}/{self.modality}, {len(self)} records)'


def open_source(
  root: str, split: str, modality: str, *, verify: bool = True, lazy: bool = False
) -> ShardSource:
  """Checked source of one modality's records; ``verify`` also hashes every file (sha256).

  ``lazy``: images and masks kept in array files come back as unread ``records.External`` (for
  ``pipeline.PadBatch``, which reads each into its batch slot); otherwise every array is read.
  """
  return ShardSource(root, split, modality, verify=verify, lazy=lazy)
