"""Phantoms: determinism, physically plausible intensities, landmark geometry, labels, build cache."""

import os

import numpy as np
import pytest

from aacp_jax.data import landmarks as lm
from aacp_jax.data import phantoms as ph
from aacp_jax.data import records as rec
from aacp_jax.data import shards

S = 32
T = ph.TISSUES


def truth(modality, index, split='train', size=S):
  return ph.make_record_with_truth(modality, index, seed=3, image_size=size, split=split)


@pytest.fixture(scope='module')
def samples():
  return {m: [truth(m, i) for i in range(16)] for m in ph.MODALITIES}


@pytest.mark.parametrize('modality', ph.MODALITIES)
def test_deterministic(modality):
  a = rec.encode(ph.make_record(modality, 5, seed=1, image_size=S, split='train'))
  assert a == rec.encode(ph.make_record(modality, 5, seed=1, image_size=S, split='train'))
  assert a != rec.encode(ph.make_record(modality, 6, seed=1, image_size=S, split='train'))
  assert a != rec.encode(ph.make_record(modality, 5, seed=2, image_size=S, split='train'))
  assert a != rec.encode(ph.make_record(modality, 5, seed=1, image_size=S, split='test'))


@pytest.mark.parametrize('modality', ph.MODALITIES)
def test_schema(samples, modality):
  for r, _ in samples[modality]:
    rec.validate(r)
    dtype, channels = rec.IMAGE_SPEC[modality]
    assert r['image'].shape == (S, S, channels) and r['image'].dtype == dtype
    assert r['source'] == 'phantom' and len(r['subject']) == 16


def test_ct_hounsfield_units(samples):
  lung, bone, fat, air = [], [], [], []
  for r, lab in samples['ct']:
    hu = r['image'].astype(np.float32)
    lung += [hu[lab == T['lung']]]
    bone += [hu[lab == T['bone']]]
    fat += [hu[lab == T['fat']]]
    air += [hu[lab == T['air']]]
  lung, bone, fat, air = (np.concatenate(v) for v in (lung, bone, fat, air))
  assert lung.size and lung.mean() < -600
  assert bone.mean() > 300 and bone.max() > 600
  assert -150 < fat.mean() < -50
  assert air.mean() < -950
  assert all(r['image'].min() >= -1024 for r, _ in samples['ct'])


def test_xray_bone_bright_lungs_dark(samples):
  for r, lab in samples['xray'][:6]:
    img = r['image'][..., 0].astype(np.float32)
    lung = (lab == T['lung']).mean(axis=2) > 0.25
    solid = ((lab == T['bone']).mean(axis=2) > 0.05) & ((lab == T['lung']).mean(axis=2) == 0)
    outside = (lab == 0).all(axis=2)
    assert img[outside].mean() < img[lung].mean() < img[solid].mean()


def test_mri_contrasts(samples):
  t1, t2, flair = 0, 1, 2
  for r, lab in samples['mri']:
    img = r['image'].astype(np.float32)
    csf, wm, gm = (img[lab == T[k]] for k in ('csf', 'white_matter', 'grey_matter'))
    if min(len(csf), len(wm), len(gm)) < 3:
      continue
    assert csf[:, t2].mean() > wm[:, t2].mean()  # T2: fluid bright
    assert csf[:, t1].mean() < gm[:, t1].mean() < wm[:, t1].mean()  # T1: WM > GM > CSF
    assert csf[:, flair].mean() < wm[:, flair].mean()  # FLAIR: fluid suppressed
    if r['label']:
      lesion = img[lab == T['oedema']]
      assert (
        lesion[:, flair].mean() > wm[:, flair].mean() and lesion[:, t2].mean() > wm[:, t2].mean()
      )


def test_labels_and_masks(samples):
  for modality, items in samples.items():
    labels = [int(r['label']) for r, _ in items]
    assert 0 in labels and 1 in labels, modality
    for r, lab in items:
      assert r['mask'].shape == (S, S)
      assert bool(r['mask'].any()) == bool(r['label']), modality
      if r['label'] and modality != 'mri':
        assert (lab == T['lesion']).any()


def test_landmarks(samples):
  for modality, items in samples.items():
    seen = np.zeros(len(lm.LANDMARKS), bool)
    for r, _ in items:
      vis = r['landmark_visible']
      seen |= vis
      region = set(lm.REGION_LANDMARKS[r['region']])
      assert {lm.LANDMARKS[k] for k in np.flatnonzero(vis)} <= region | set(lm.LANDMARKS[:12])
      for key in ('landmarks', 'landmarks_canonical'):
        assert ((r[key][vis] >= 0) & (r[key][vis] <= 1)).all()
    assert seen.any(), modality
  # A frontal radiograph shows every chest landmark, in anatomical order.
  ix = lm.landmark_index
  for r, _ in samples['xray']:
    assert r['landmark_visible'][:8].all()
    for key in ('landmarks', 'landmarks_canonical'):
      p = r[key]
      assert (
        p[ix('lung_apex_right'), 0]
        < p[ix('tracheal_bifurcation'), 0]
        < p[ix('costophrenic_angle_right'), 0]
      )
      assert (
        p[ix('costophrenic_angle_right'), 1]
        < p[ix('cardiac_apex'), 1]
        < p[ix('costophrenic_angle_left'), 1]
      )  # patient right on the viewer's left


def test_ct_landmark_lies_on_its_anatomy():
  # The carina's in-image position falls in airway or its wall on some slice of the slab.
  ix = lm.landmark_index('tracheal_bifurcation')
  hits = 0
  for i in range(40):
    r, lab = truth('ct', i, size=64)
    if r['landmark_visible'][ix]:
      y, x = (r['landmarks'][ix] * 64).astype(int)
      hits += 1
      assert (lab[max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3] == T['airway']).any()
  assert hits


def test_build_is_cached(tmp_path):
  counts = {'train': {'ct': 3, 'mri': 2}, 'test': {'xray': 2}}
  root = ph.default_root(str(tmp_path), 0, 16, counts)
  assert root != ph.default_root(str(tmp_path), 1, 16, counts)
  assert root != ph.default_root(str(tmp_path), 0, 16, {'train': {'ct': 4, 'mri': 2}})
  ph.build(root, seed=0, image_size=16, counts=counts, progress=False)
  mpath = os.path.join(root, 'train', 'manifest.json')
  before = os.stat(mpath).st_mtime_ns
  ph.build(root, seed=0, image_size=16, counts=counts, progress=False)
  assert os.stat(mpath).st_mtime_ns == before
  m = shards.read_manifest(root, 'train')
  assert m['modalities']['ct']['count'] == 3 and m['label_names']['ct'] == ph.LABEL_NAMES['ct']
  src = shards.open_source(root, 'test', 'xray')
  assert rec.encode(src[1]) == rec.encode(
    ph.make_record('xray', 1, seed=0, image_size=16, split='test')
  )
  ph.build(root, seed=0, image_size=16, counts={'train': {'ct': 4}}, progress=False)
  assert shards.read_manifest(root, 'train')['modalities']['ct']['count'] == 4
