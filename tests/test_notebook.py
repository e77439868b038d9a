"""notebooks/evaluation.ipynb runs top to bottom (its own tiny pretraining included) and writes
every figure. The kernel is this interpreter's (the venv's ipykernel), never a user-wide one."""

import json
import os
import sys

import pytest

from tests import workdirs

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'evaluation.ipynb')
PNGS = ('label_efficiency.png', 'embeddings.png', 'attention_overlay.png', 'roc_curves.png')


def test_saved_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and (c.outputs or
           c.execution_count)]  # fmt: skip
  assert not dirty, f'cells {dirty} carry outputs: clear them before saving'


def test_notebook_runs_and_writes_figures(tmp_path, monkeypatch):
  out = tmp_path / 'out'
  monkeypatch.setenv('AACP_NOTEBOOK_OUT', str(out))
  # The workdir a 10-step pretraining run leaves (config.json, a checkpoint, its phantoms), made
  # here without compiling a pretraining step: the notebook then skips its own run (~95 s here),
  # which the analysis does not depend on. Run by hand, the notebook trains one.
  from aacp_jax.data import phantoms

  run = str(tmp_path / 'run')
  counts = {split: {'ct': 32, 'xray': 32} for split in ('train', 'test')}
  root = phantoms.build(
    os.path.join(run, 'phantoms-test'), seed=0, image_size=32, counts=counts, progress=False
  )
  workdirs.pretraining_workdir(run, root, modalities=('ct', 'xray'))
  monkeypatch.setenv('AACP_NOTEBOOK_WORKDIR', run)
  # The kernel and its pretraining process inherit this environment: CPU, and one device, not
  # conftest's eight (the run's per-modality batches of 11 and 5 would not split over eight).
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  # A 'python3' kernel spec that starts this interpreter (the venv's ipykernel): JUPYTER_PATH is
  # searched first, so a user-wide python3 spec cannot take over, and nothing is installed.
  spec = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec.mkdir(parents=True)
  argv = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
  (spec / 'kernel.json').write_text(
    json.dumps({'argv': argv, 'display_name': 'aacp venv', 'language': 'python'})
  )
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Per-cell timeout generous: the test checks behaviour, not machine speed.
  client = nbclient.NotebookClient(
    nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': ROOT}}
  )
  client.execute()  # Raises CellExecutionError naming the failing cell.
  python = ''.join(
    o.get('text', '') for o in nb.cells[1].outputs if o.get('output_type') == 'stream'
  )
  assert f'python {sys.executable}' in python, python
  for name in PNGS:
    path = out / name
    assert path.exists(), f'{name} missing; {sorted(os.listdir(out))}'
    assert path.stat().st_size > 5000, f'{name}: only {path.stat().st_size} bytes'
