"""ArrayRecord shards of encoded records, plus the manifest that describes (and checksums) them.

Layout::

    ROOT/<split>/<modality>-NNNNN-of-NNNNN.array_record
    ROOT/<split>/manifest.json

The manifest is written last, so its presence marks a complete split; every shard lands by rename
from a temporary file, so a crash never leaves a half-written file under a final name. Readers trust
the manifest for record counts and checksums: a missing, truncated or corrupt shard fails at open
time with a one-line ``ShardError`` naming the file instead of deep inside a training step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import ctypes
import datetime
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


def _write_shard(path: str, payloads: Iterable[bytes], compression: str | None = None) -> dict:
  options = writer_options(compression)  # a bad value fails before any file exists
  tmp = f'{path}.tmp-{os.getpid()}'
  writer = array_record_module.ArrayRecordWriter(tmp, options)
  count = 0
  try:
    for payload in payloads:
      writer.write(payload)
      count += 1
  except BaseException:
    writer.close()
    os.remove(tmp)
    raise
  writer.close()
  os.replace(tmp, path)
  return {
    'name': os.path.basename(path),
    'count': count,
    'bytes': os.path.getsize(path),
    'sha256': digest.sha256_file(path),
  }


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
) -> dict:
  """Encodes and writes every modality's records; returns the manifest it wrote.

  ``num_shards`` (an int, or per modality) None picks ~256 records per shard. Shards need the record
  count up front: pass iterables with ``len()``; a plain generator is first held in memory encoded.
  ``meta`` is stored verbatim (e.g. generator parameters a cache compares against).
  ``compression``: of the ArrayRecord chunks (``writer_options``; default uncompressed).
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
      if old.startswith(f'{modality}-') and old.endswith('.array_record'):
        os.remove(os.path.join(split_dir, old))
    files = []
    for s in range(n_shards):
      path = os.path.join(split_dir, shard_name(modality, s, n_shards))
      # Contiguous blocks: neighbouring records share a file, as a sequential reader expects.
      chunk = _take(stream, (s + 1) * total // n_shards - s * total // n_shards)
      files.append(_write_shard(path, chunk, compression))
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


def write_shard(path: str, payloads: Iterable[bytes], *, compression: str | None = None) -> dict:
  """One shard from already encoded records (tmp file + rename); returns its manifest ``files`` entry.

  For writers that produce shards one at a time (``data_prep.runner``: one shard per worker task).
  ``compression`` as in ``writer_options`` (default uncompressed).
  """
  return _write_shard(path, payloads, compression)


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


class ShardSource:
  """Random-access source of decoded, validated records (``len`` + ``__getitem__``) for Grain.

  Readers open lazily per process: Grain worker processes receive this object by pickling, and
  native reader handles must not cross that boundary.
  """

  def __init__(self, root: str, split: str, modality: str, *, verify: bool = True):
    self.split, self.modality = split, modality
    files = _modality_entry(root, split, modality)['files']
    self._paths = [os.path.join(root, split, f['name']) for f in files]
    self._counts = [int(f['count']) for f in files]
    self._starts = np.cumsum([0] + self._counts)
    for path, f in zip(self._paths, files):
      if not os.path.exists(path):
        raise ShardError(f'{path}: shard missing')
      size = os.path.getsize(path)
      if size != f['bytes']:
        raise ShardError(f'{path}: size {size} bytes, manifest says {f["bytes"]} (truncated?)')
      if verify and digest.sha256_file(path) != f['sha256']:
        raise ShardError(f'{path}: sha256 mismatch with manifest (corrupt)')
    self._readers: list[Any] = [None] * len(self._paths)
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
    try:
      return rec.decode(data, where=f'shard {name} record {pos}')
    except rec.RecordError as e:
      raise ShardError(str(e)) from None

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_readers'] = [None] * len(self._paths)
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    _reuse_large_allocations()  # in a Grain worker process too

  def __repr__(self) -> str:
    return f'ShardSource({self.split}/{self.modality}, {len(self)} records)'


def open_source(root: str, split: str, modality: str, *, verify: bool = True) -> ShardSource:
  """Checked source of one modality's records; ``verify`` also hashes every file (sha256)."""
  return ShardSource(root, split, modality, verify=verify)
