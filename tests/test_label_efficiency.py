"""The label-efficiency sweep: shared phantoms, resumable cells, seed aggregation and its table."""

import json
import os

import numpy as np
import pytest

from aacp_jax import task_specs
from aacp_jax.eval import metrics
from aacp_jax.train import finetune
from aacp_jax.train import label_efficiency as le
from configs import finetune as finetune_config


def write_cell(workdir, init, task, fraction, seed, scores, truth, subjects, auroc):
  path = le.cell_dir(workdir, init, task, fraction, seed)
  os.makedirs(path)
  with open(os.path.join(path, 'eval.json'), 'w') as f:
    json.dump({'metrics': {'auroc': {'estimate': auroc}}}, f)
  finetune.save_test_arrays(path, task_specs.get(task), scores, truth, subjects)


def test_summary_is_the_mean_and_std_over_seeds_with_a_patient_ci(tmp_path):
  rng = np.random.default_rng(0)
  truth = np.array([0, 1] * 10)
  subjects = np.repeat([f's{i}' for i in range(10)], 2)
  per_seed = []
  for seed in (0, 1, 2):
    p1 = np.clip(truth * 0.3 + rng.uniform(0, 0.7, 20), 0, 1)
    scores = np.stack([1 - p1, p1], 1)
    auroc = metrics.auroc(truth, p1)
    per_seed.append(auroc)
    write_cell(tmp_path, 'random', 'phantom_ct_cls', 10, seed, scores, truth, subjects, auroc)
  row = le.summarise(str(tmp_path), 'random', 'phantom_ct_cls', 10, [0, 1, 2], n_bootstrap=50)
  assert row['metric'] == 'auroc' and row['per_seed'] == per_seed
  assert row['mean'] == pytest.approx(np.mean(per_seed), abs=1e-12)
  assert row['std'] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
  # Scores are stored as float32; the CI is of the seed mean, so it brackets the mean.
  assert row['low'] <= row['mean'] + 1e-6 and row['mean'] - 1e-6 <= row['high']
  text = le.table([row])
  assert '| phantom_ct_cls | random | 10 % | auroc |' in text
  assert f'{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f} (3)' in text
  png = tmp_path / 'le.png'
  le.plot([row, {**row, 'init': 'pretrained', 'fraction': 100.0}], str(png), note='test')
  assert png.stat().st_size > 0


def test_cells_share_one_phantom_root_and_done_cells_are_read(tmp_path, monkeypatch):
  seen = []

  class Out:
    def __init__(self, config):
      self.results = {'root': config.data.root, 'seed': config.seed}

  def fake_run(config, path):
    seen.append(config.data.root)
    return Out(config)

  monkeypatch.setattr(finetune, 'run', fake_run)
  base = finetune_config.get_config('demo')
  base.data.image_size = 32
  base.data.phantoms.train, base.data.phantoms.test = 4, 4
  for task, seed in (('phantom_ct_cls', 0), ('phantom_ct_seg', 1)):
    le.run_cell(base, str(tmp_path), 'random', 'random', task, 10, seed)
  # Both CT tasks read one phantom set inside the sweep's workdir, not one per cell.
  assert len(set(seen)) == 1 and seen[0].startswith(str(tmp_path))
  assert not base.data.root  # the caller's config is left as it was
  done = le.cell_dir(str(tmp_path), 'random', 'phantom_ct_cls', 10, 2)
  os.makedirs(done)
  with open(os.path.join(done, 'eval.json'), 'w') as f:
    json.dump({'from': 'disk'}, f)
  assert le.run_cell(base, str(tmp_path), 'random', 'random', 'phantom_ct_cls', 10, 2) == {
    'from': 'disk'
  }
  assert len(seen) == 2


@pytest.mark.parametrize(
  'task,init,fraction,message',
  [
    ('phantom_ct_nope', 'random', 10, "config.task='phantom_ct_nope'"),
    ('phantom_ct_cls', '/nonexistent/workdir', 10, '/nonexistent/workdir'),
    ('phantom_ct_cls', 'random', 0, 'config.data.fraction'),
  ],
)
def test_a_bad_cell_fails_before_any_training(task, init, fraction, message):
  base = finetune_config.get_config('demo')
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    le.check_cells(base, {'a': 'random', 'b': init}, ['phantom_ct_seg', task], [100, fraction])
