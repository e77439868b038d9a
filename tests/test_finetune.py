"""Stage two on tiny phantoms: fine-tuning runs of each head kind on the shared loop, inits, label
fractions, and one-line errors for bad input."""

import json

import jax
import numpy as np
import pytest

from aacp_jax import task_specs
from aacp_jax.data import labelled, phantoms
from aacp_jax.train import finetune
from configs import finetune as finetune_config
from tests import workdirs


def tiny(task, **overrides):
  c = finetune_config.get_config(f'demo,task={task}')
  c.data.image_size = 32
  c.model.width = 4
  c.model.decoder_features = (8, 8, 8, 8)
  c.batch_size = 8
  c.total_steps = 6
  c.log_every_steps = 2
  c.checkpoint_every_steps = 6
  c.eval.bootstrap = 20
  return workdirs.override(c, **overrides)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """Phantoms of every modality at 32², shared by the runs (`data.root`)."""
  path = str(tmp_path_factory.mktemp('ft_phantoms'))
  counts = {'train': {m: 32 for m in ('ct', 'mri', 'xray')}, 'test': {'xray': 16, 'mri': 16}}
  counts['test']['ct'] = 16
  return phantoms.build(path, seed=2, image_size=32, counts=counts, progress=False)


def test_phantom_task_names_are_the_phantoms_labels():
  for m, names in phantoms.LABEL_NAMES.items():
    assert task_specs.get(f'phantom_{m}_cls').class_names == tuple(names)
  with pytest.raises(ValueError, match='config.task=.nope.: expected one of'):
    task_specs.get('nope')


def test_labels_are_read_and_bad_records_named(root):
  table = labelled.read_labels(root, 'train', task_specs.get('phantom_xray_cls'))
  assert len(table.subjects) == 32 and set(np.unique(table.values)) <= {0, 1}
  area = labelled.read_labels(root, 'train', task_specs.get('phantom_mri_area'))
  assert area.values.dtype == np.float32 and (area.values > 0).any() and (area.values == 0).any()
  record = phantoms.make_record('xray', 0, seed=2, image_size=32, split='train')
  with pytest.raises(ValueError, match="rec 7: task chexpert needs 'labels'"):
    labelled.record_value(record, task_specs.get('chexpert'), 'rec 7')
  brats = task_specs.get('brats')
  mask = np.array([[0, 1], [2, 4]], np.uint8)
  np.testing.assert_array_equal(labelled.record_value({'mask': mask}, brats, 'r'), [[0, 1], [2, 3]])
  with pytest.raises(ValueError, match=r'r: mask values \[3\] are not among task brats'):
    labelled.record_value({'mask': np.array([[3]], np.uint8)}, brats, 'r')
  with pytest.raises(ValueError, match='label 3 outside the 2 classes'):
    labelled.record_value({'label': 3}, task_specs.get('lidc'), 'r')


def test_classification_trains_evaluates_and_a_rerun_resumes(root, tmp_path):
  config = tiny('phantom_xray_cls', **{'data.root': root})
  out = finetune.run(config, str(tmp_path))
  m = out.results['metrics']
  assert {'accuracy', 'balanced_accuracy', 'auroc', 'auprc', 'sensitivity', 'specificity'} <= set(m)
  assert all(0 <= v['low'] <= v['estimate'] <= v['high'] <= 1 for v in m.values())
  assert out.results['fit_patients'] == 32 and out.results['test_examples'] == 16
  assert json.load(open(tmp_path / 'eval.json'))['metrics'] == m
  # The predictor is a function of raw images; the scores are class probabilities.
  scores = out.evaluation.scores
  assert scores.shape == (16, 2) and np.allclose(scores.sum(1), 1)
  with pytest.raises(ValueError, match=r'images of shape \(N, H, W, 1\) expected'):
    out.predictor(np.zeros((2, 32, 32, 3), np.uint8))
  # The workdir records the resolved run: the task's modality, its window.
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['modalities'] == ['xray'] and saved['augment']['ct_window'] == 'pretrain'
  again = finetune.run(config, str(tmp_path))  # nothing left to train: the same model
  assert again.results['metrics'] == m


def test_regression_on_a_fraction_of_patients(root, tmp_path):
  config = tiny('phantom_mri_area', **{'data.root': root, 'data.fraction': 50.0})
  out = finetune.run(config, str(tmp_path))
  assert out.results['fit_patients'] == 16 and set(out.results['metrics']) == {'mae', 'rmse'}
  assert out.evaluation.scores.shape == (16,) and np.isfinite(out.evaluation.scores).all()


def test_segmentation_from_a_pretraining_workdir_keeps_the_frozen_encoder(root, tmp_path):
  from aacp_jax import restore

  pre_dir = workdirs.pretraining_workdir(str(tmp_path / 'pretrain'), root)
  # The pretrained encoder has width 4 and depth 18; the fine-tuning config says 16: the
  # workdir's settings win.
  config = tiny('phantom_xray_seg', **{'data.root': root, 'init': pre_dir, 'protocol': 'linear'})
  config.model.width = 16
  out = finetune.run(config, str(tmp_path / 'ft'))
  assert out.config.model.width == 4 and set(out.results['metrics']) == {'dice_lesion', 'dice'}
  assert out.evaluation.scores.shape == (16, 32, 32, 2)
  _, want = restore.encoder_variables(restore.load_variables(pre_dir), 'xray')
  got = {c: out.predictor.variables[c]['encoder'] for c in ('params', 'batch_stats')}
  jax.tree.map(np.testing.assert_array_equal, got, want)  # linear: the encoder never moved
  # A task of another modality has no encoder in that workdir.
  bad = tiny('phantom_ct_cls', **{'data.root': root, 'init': pre_dir})
  with pytest.raises(
    ValueError, match=r"the workdir has encoders for \['xray'\], the task needs 'ct'"
  ):
    finetune.run(bad, str(tmp_path / 'bad'))


@pytest.mark.parametrize(
  'task,overrides,message',
  [
    ('phantom_ct_cls', {'init': '/no/such/dir'}, "config.init=/no/such/dir: not 'random'"),
    ('phantom_ct_cls', {'init': 'imagenet:/no/w.npz'}, 'config.init=imagenet:/no/w.npz: no such'),
    ('phantom_ct_cls', {'data.fraction': 1.0}, r'label fraction 1 %: class \d has no example'),
    ('phantom_ct_seg', {'data.image_size': 48}, 'config.data.image_size=48: segmentation'),
    ('phantom_ct_area', {'data.shots': 5}, 'config.data.shots=5: few-shot draws need class'),
    ('phantom_ct_cls', {'protocol': 'probe'}, "config.protocol='probe': expected one of"),
    ('phantom_ct_cls', {'data.fraction': 0.0}, 'config.data.fraction=0.0'),
  ],
)
def test_bad_input_is_one_line_naming_the_key(root, tmp_path, task, overrides, message):
  config = tiny(task, **{'data.root': root, **overrides})
  with pytest.raises(ValueError, match=message) as err:
    finetune.run(config, str(tmp_path))
  assert '\n' not in str(err.value)


def test_the_task_window_is_resolved_and_recorded():
  config = finetune.resolve(finetune_config.get_config('task=lidc'))
  assert config.augment.ct_window == 'lung' and config.modalities == ('ct',)
  assert tuple(config.data.shares) == ('ct',)
  assert finetune.resolve(finetune_config.get_config('task=lits')).augment.ct_window == 'liver'
