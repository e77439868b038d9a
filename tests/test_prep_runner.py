"""data_prep.runner and data_prep.privacy: splits, rejects, resume, workers, crashes, manifest, salt."""

import ast
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from aacp_jax.data import landmarks as lm
from aacp_jax.data import shards
from data_prep import privacy, runner

SALT = b'test-salt-0123456789'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = []  # keys converted in this process (workers=0): what a resumed run must not redo


class _KindError(ValueError):
  """Stands in for data_prep.ops.PrepError: an exception that carries its own kind and reason."""

  def __init__(self, kind, reason):
    super().__init__(reason)
    self.kind, self.reason = kind, reason


def convert(item, subject, options):
  """Module level, so spawned workers import it as tests.test_prep_runner:convert."""
  del subject
  CALLS.append(item.key)
  p = item.payload
  if p.get('reject'):
    raise runner.Reject(p['reject'], f'{item.key}: planted')
  if p.get('boom'):
    raise ZeroDivisionError('planted\nover two lines')
  if p.get('kind_error'):
    raise _KindError('geometry', f'{item.key}: slices not evenly spaced')
  if p.get('crash'):
    if multiprocessing.parent_process() is None:
      raise runner.Reject('crash', 'inline stand-in for a worker crash')
    os._exit(7)  # a native crash: the worker process dies without an exception
  for j in range(p.get('n', 1)):
    v = (p['v'] * 7 + j) % 251
    yield {
      'image': np.full((6, 5, 1), v, np.uint8),
      'modality': 'xray',
      'region': 'chest',
      'spacing': np.array([0.5, 0.25, 0.0], np.float32),
      'label': np.array(v % 2, np.int32),
      'target': np.array(v, np.float32),
    }


def _items(n=24, **planted):
  out = []
  for i in range(n):
    payload = {'v': i, 'n': 1 + i % 2}
    for name, index in planted.items():
      if i == index:
        payload[name] = 'corrupt' if name == 'reject' else True
    out.append(
      runner.Item(key=f'img/{i:03d}.png', subject=f'PAT{i // 3}', modality='xray', payload=payload)
    )
  return out


def _options(out, **kw):
  kw = {
    'items_per_shard': 5,
    'progress': False,
    'workers': 0,
    'val_fraction': 0.2,
    'test_fraction': 0.2,
    **kw,
  }
  return runner.Options(input='/nonexistent', output=str(out), salt=SALT, **kw)


def _tree(root):
  """{relative path: bytes} of every file under root (manifests without their timestamp)."""
  out = {}
  for base, _, names in os.walk(root):
    for n in names:
      path = os.path.join(base, n)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _rejects(out):
  with open(os.path.join(out, 'rejects.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_salt_loading_and_hashes(tmp_path):
  with pytest.raises(ValueError, match='exactly one of --salt or --salt_file'):
    privacy.load_salt()
  with pytest.raises(ValueError, match='exactly one'):
    privacy.load_salt('a' * 20, 'f')
  with pytest.raises(ValueError, match=r'--salt: salt has 5 bytes, need >= 16') as e:
    privacy.load_salt('short')
  assert 'short' not in str(e.value)  # the message never echoes the secret
  with pytest.raises(ValueError, match='unreadable'):
    privacy.load_salt(salt_file=str(tmp_path / 'missing'))
  (tmp_path / 'salt').write_text(SALT.decode() + '\n')
  assert privacy.load_salt(salt_file=str(tmp_path / 'salt')) == SALT
  h = privacy.subject_hash(SALT, 'ds', 'PAT1')
  assert len(h) == 20 and h == privacy.subject_hash(SALT, 'ds', 'PAT1')
  assert h != privacy.subject_hash(SALT + b'x', 'ds', 'PAT1')  # keyed: no salt, no lookup table
  assert h != privacy.subject_hash(SALT, 'other', 'PAT1')  # same id in two datasets: two subjects
  assert privacy.salt_fingerprint(SALT) != privacy.salt_fingerprint(SALT + b'x')
  # The split draw depends on seed and id, not on the salt (teams with different salts agree).
  u = [privacy.split_unit(0, 'ds', f'P{i}') for i in range(2000)]
  assert 0 <= min(u) and max(u) < 1 and abs(np.mean(u) - 0.5) < 0.03
  assert privacy.split_unit(1, 'ds', 'P1') != privacy.split_unit(0, 'ds', 'P1')


def test_run_splits_rejects_manifest(tmp_path):
  out = tmp_path / 'out'
  items = _items(reject=3, boom=4, kind_error=5)
  listing = [('img/999.png', 'missing_label', 'no row in labels.csv')]
  status = runner.run(
    'toy', items + items[:1], convert, _options(out), rejects=listing, label_names=['a']
  )
  assert status == 1
  rows = {r['key']: r for r in _rejects(out)}
  assert rows['img/003.png']['kind'] == 'corrupt' and 'planted' in rows['img/003.png']['reason']
  assert rows['img/004.png'] == {
    'key': 'img/004.png',
    'kind': 'error',
    'reason': 'ZeroDivisionError: planted over two lines',
  }
  assert rows['img/005.png']['kind'] == 'geometry'
  assert rows['img/999.png']['kind'] == 'missing_label'
  assert [r['kind'] for r in _rejects(out) if r['key'] == 'img/000.png'] == ['duplicate']
  seen, subjects = {}, {}
  for split in ('train', 'val', 'test'):
    manifest = shards.read_manifest(str(out), split)
    assert manifest['label_names'] == {'xray': ['a']}
    assert manifest['meta']['salt_fingerprint'] == privacy.salt_fingerprint(SALT)
    assert manifest['meta']['rejected_in_run'] == {
      'corrupt': 1,
      'duplicate': 1,
      'error': 1,
      'geometry': 1,
      'missing_label': 1,
    }
    stats = manifest['meta']['stats']['xray']
    assert stats['spacing_mm']['min'] == [0.5, 0.25, 0.0] and stats['image_hw']['max'] == [6, 5]
    src = shards.open_source(str(out), split, 'xray')
    for i in range(len(src)):
      r = src[i]
      v = int(r['image'][0, 0, 0])
      seen[v] = split
      subjects.setdefault(r['subject'], set()).add(split)
      assert r['source'] == 'toy' and r['target'] == v and r['label'] == v % 2
      assert not r['landmark_visible'].any() and (r['landmarks'] == 0).all()
      np.testing.assert_array_equal(r['organs'], lm.organ_multi_hot(lm.REGION_ORGANS['chest']))
    # Imported here: it pulls in jax, and spawned workers import this module (keep them light).
    from aacp_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    arrays = pipeline.load_split_arrays(str(out), split, 'xray', 8)
    assert len(arrays['label']) == len(src)
  # Every good item is there with all its records; every subject sits in exactly one split.
  good = [i for i in range(24) if i not in (3, 4, 5)]
  assert sorted(seen) == sorted({(i * 7 + j) % 251 for i in good for j in range(1 + i % 2)})
  assert all(len(s) == 1 for s in subjects.values()) and len(subjects) == 7  # PAT1: all rejected
  assert {s for v in subjects.values() for s in v} == {'train', 'val', 'test'}
  # Neither raw subject ids nor the salt reach any output byte.
  blob = b''.join(_tree(out).values())
  assert b'PAT' not in blob and SALT not in blob


def test_split_of_and_leaks(tmp_path):
  items = _items(n=9)
  # Subject PAT0 (items 0-2) has one image in test: all of it stays in test, the rest are leaks.
  official = {'img/000.png': 'train', 'img/001.png': 'test', 'img/002.png': 'val'}
  status = runner.run(
    'toy', items, convert, _options(tmp_path), split_of=lambda it: official.get(it.key, 'train')
  )
  assert status == 1
  assert {(r['key'], r['kind']) for r in _rejects(tmp_path)} == {
    ('img/000.png', 'split_leak'),
    ('img/002.png', 'split_leak'),
  }
  assert shards.read_manifest(str(tmp_path), 'test')['modalities']['xray']['count'] == 2
  assert shards.read_manifest(str(tmp_path), 'train')['meta']['items'] == 6
  with pytest.raises(ValueError, match="returned 'dev'"):
    runner.run('toy', items, convert, _options(tmp_path / 'x'), split_of=lambda it: 'dev')


def test_resume_skips_finished_shards_byte_identical(tmp_path):
  items = _items(reject=2)
  assert runner.run('toy', items, convert, _options(tmp_path)) == 1
  first = _tree(tmp_path)
  CALLS.clear()
  assert runner.run('toy', items, convert, _options(tmp_path)) == 1
  assert CALLS == [] and _tree(tmp_path) == first  # nothing converted, not one byte changed
  # A crash mid-run: the shard file of one shard is lost; only that shard is redone.
  victim = sorted(p for p in first if p.startswith('train/xray-'))[0]
  os.remove(tmp_path / victim)
  assert runner.run('toy', items, convert, _options(tmp_path)) == 1
  assert 0 < len(CALLS) <= 5 and _tree(tmp_path) == first
  # Changed input (one payload) redoes exactly the shard holding it.
  CALLS.clear()
  changed = [
    runner.Item(it.key, it.subject, it.modality, {**it.payload, 'v': 200})
    if it.key == 'img/010.png'
    else it
    for it in items
  ]
  runner.run('toy', changed, convert, _options(tmp_path))
  assert 'img/010.png' in CALLS and len(CALLS) <= 5
  # Fewer inputs renumber the shards; files of the old plan go, split folders hold only the new one.
  runner.run('toy', items[:8], convert, _options(tmp_path, test_fraction=0))
  assert not os.listdir(tmp_path / 'test')
  for split in ('train', 'val'):
    files = shards.read_manifest(str(tmp_path), split)['modalities']['xray']['files']
    listed = {f['name'] for f in files}
    assert set(os.listdir(tmp_path / split)) == listed | {'manifest.json'}


def test_workers_match_inline_and_survive_a_crash(tmp_path):
  items = _items(crash=7)
  assert runner.run('toy', items, convert, _options(tmp_path / 'w0')) == 1
  assert runner.run('toy', items, convert, _options(tmp_path / 'w2', workers=2)) == 1
  a, b = _tree(tmp_path / 'w0'), _tree(tmp_path / 'w2')
  for path in a:
    if path.endswith('.array_record'):
      assert a[path] == b[path], path
    if path.endswith('manifest.json'):
      strip = lambda m: {k: v for k, v in json.loads(m).items() if k != 'created'}
      assert strip(a[path]) == strip(b[path]), path
  crash = [r for r in _rejects(tmp_path / 'w2') if r['kind'] == 'crash']
  assert [r['key'] for r in crash] == ['img/007.png'] and 'worker process died' in crash[0][
    'reason'
  ]


def test_bad_options_and_converters(tmp_path):
  with pytest.raises(ValueError, match='val_fraction'):
    runner.run('toy', [], convert, _options(tmp_path, val_fraction=0.6, test_fraction=0.5))
  with pytest.raises(ValueError, match='salt has 3 bytes'):
    runner.run('toy', [], convert, runner.Options(input='i', output=str(tmp_path), salt=b'abc'))
  with pytest.raises(ValueError, match='module-level function'):
    runner.run('toy', _items(2), lambda item, s, o: [], _options(tmp_path))
  assert 'salt' not in repr(_options(tmp_path)).split('output')[1].split(',')[1]
  assert SALT.decode() not in repr(_options(tmp_path))


def _imports(path):
  """Every module a file imports, at any depth (lazy imports inside functions included)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return out


def test_imports_point_one_way():
  # runner imports runner_shard (the worker side), never the reverse; the library never imports
  # data_prep (converters depend on aacp_jax, not the other way round).
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert 'data_prep.runner' not in _imports(os.path.join(root, 'data_prep', 'runner_shard.py'))
  for folder, _, names in os.walk(os.path.join(root, 'aacp_jax')):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        assert not any(m.split('.')[0] == 'data_prep' for m in _imports(path)), path


def gated_convert(item, subject, options):
  """``convert``, except that items marked ``gated`` wait until the file named by $AACP_TEST_GATE
  exists: a run can be caught mid-shard whatever the machine's speed."""
  if item.payload.get('gated'):
    while not os.path.exists(os.environ['AACP_TEST_GATE']):
      time.sleep(0.05)
  return list(convert(item, subject, options))


def _gated_items():
  return [
    runner.Item(it.key, it.subject, it.modality, {**it.payload, 'gated': int(it.key[4:7]) >= 5})
    for it in _items(15, reject=12)
  ]


def drive_gated(out):
  """The child of the kill test: a two-worker run whose second and third shards wait at the gate."""
  return runner.run(
    'toy', _gated_items(), gated_convert, _options(out, workers=2, val_fraction=0, test_fraction=0)
  )


def _tagged(tag):
  """Pids of live processes whose environment holds ``tag`` (the child and anything it started)."""
  found = []
  for pid in os.listdir('/proc'):
    try:
      with open(f'/proc/{pid}/environ', 'rb') as f:
        if tag.encode() in f.read():
          found.append(int(pid))
    except (OSError, ValueError):
      continue
  return found


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_kill_9_mid_run_leaves_no_process_no_temporary_file_and_resumes_identically(
  tmp_path, monkeypatch
):
  out, reference, gate = tmp_path / 'out', tmp_path / 'reference', tmp_path / 'gate'
  tag = f'aacp-kill-test-{uuid.uuid4().hex}'
  env = {**os.environ, 'AACP_TEST_GATE': str(gate), 'AACP_KILL_TEST': tag}
  child = subprocess.Popen(
    [
      sys.executable,
      '-c',
      f'from tests.test_prep_runner import drive_gated; drive_gated({str(out)!r})',
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  try:
    # The first shard has no gated item: once its file is there, both workers wait at the gate.
    deadline = time.monotonic() + 1800
    while not (out / 'train' / 'xray-00000-of-00003.array_record').exists():
      assert child.poll() is None, child.stderr.read().decode()[-3000:]
      assert time.monotonic() < deadline, 'the first shard never appeared'
      time.sleep(0.05)
    assert len(_tagged(tag)) >= 3  # the parent and its two workers
    child.kill()  # SIGKILL: no handler, no cleanup in the parent
    child.wait(timeout=1800)
    deadline = time.monotonic() + 60
    while _tagged(tag) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert _tagged(tag) == [], 'a worker outlived its killed parent'
  finally:
    for pid in _tagged(tag):
      os.kill(pid, signal.SIGKILL)
  left = [n for n in os.listdir(out / 'train') if '.tmp-' in n]
  assert left, 'the killed workers were writing shards 2 and 3'
  gate.write_text('open')
  monkeypatch.setenv('AACP_TEST_GATE', str(gate))
  items = _gated_items()
  assert (
    runner.run(
      'toy', items, gated_convert, _options(out, workers=2, val_fraction=0, test_fraction=0)
    )
    == 1
  )
  assert (
    runner.run('toy', items, gated_convert, _options(reference, val_fraction=0, test_fraction=0))
    == 1
  )
  resumed, whole = _tree(out), _tree(reference)
  assert not [p for p in resumed if '.tmp-' in p]
  strip = lambda m: {k: v for k, v in json.loads(m).items() if k != 'created'}
  assert sorted(resumed) == sorted(whole)
  for path in whole:
    if path.endswith('manifest.json'):
      assert strip(resumed[path]) == strip(whole[path]), path
    else:
      assert resumed[path] == whole[path], path


def test_a_shard_or_split_without_records_writes_no_file(tmp_path):
  items = [
    runner.Item(it.key, it.subject, it.modality, {**it.payload, 'reject': 'corrupt'})
    if int(it.key[4:7]) >= 5
    else it
    for it in _items(12)
  ]
  split_of = lambda it: 'test' if int(it.key[4:7]) >= 10 else 'train'
  assert runner.run('toy', items, convert, _options(tmp_path), split_of=split_of) == 1
  # train: shard 0 holds items 0-4, shard 1 (5-9) only rejects; test (10, 11) only rejects.
  files = shards.read_manifest(str(tmp_path), 'train')['modalities']['xray']['files']
  assert [f['name'] for f in files] == ['xray-00000-of-00002.array_record']
  assert sorted(os.listdir(tmp_path / 'train')) == ['manifest.json', files[0]['name']]
  assert not os.path.exists(tmp_path / 'test' / 'manifest.json')
  assert not [n for n in os.listdir(tmp_path / 'test') if n.endswith('.array_record')]
  first = _tree(tmp_path)
  CALLS.clear()
  assert runner.run('toy', items, convert, _options(tmp_path), split_of=split_of) == 1
  assert CALLS == [] and _tree(tmp_path) == first  # the empty shards count as finished
  assert len(_rejects(tmp_path)) == 7


def test_code_version_covers_only_what_decides_a_datasets_bytes(tmp_path):
  from data_prep import code_version as cv  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for top in ('aacp_jax', 'data_prep'):
    shutil.copytree(
      os.path.join(root, top), tmp_path / top, ignore=shutil.ignore_patterns('__pycache__')
    )
  modules = cv.modules_for('data_prep.brats', str(tmp_path))
  for needed in (
    'data_prep.runner',
    'data_prep.runner_shard',
    'data_prep.ops.mri',
    'data_prep.volume_common',
    'aacp_jax.data.records',
    'aacp_jax.data.shards',
  ):
    assert needed in modules, needed
  assert 'data_prep.chexpert' not in modules and 'aacp_jax.data.pipeline' not in modules
  before = {m: cv.digest(m, str(tmp_path)) for m in ('data_prep.brats', 'data_prep.chexpert')}
  assert before['data_prep.brats'] == cv.code_version('data_prep.brats')  # the copy is the tree

  def edit(rel):
    with open(tmp_path / rel, 'a', encoding='utf-8') as f:
      f.write('\n# an edit\n')
    return {m: cv.digest(m, str(tmp_path)) for m in before}

  after = edit('data_prep/chexpert.py')  # another converter: BraTS keeps its fingerprint
  assert after['data_prep.brats'] == before['data_prep.brats']
  assert after['data_prep.chexpert'] != before['data_prep.chexpert']
  again = edit('data_prep/brats.py')  # its own module: a new fingerprint
  assert again['data_prep.brats'] != after['data_prep.brats']
  assert again['data_prep.chexpert'] == after['data_prep.chexpert']
  last = edit('data_prep/ops/volume.py')  # shared code: both change
  assert all(last[m] != again[m] for m in before)
