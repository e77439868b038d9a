"""`python -m aacp_jax.bench finetune`: fine-tuning throughput per task head, on random inputs.

For each task of --tasks (default: one per head kind, see DEFAULT_TASKS), the fine-tuning model
of --config (configs/finetune.py[:variants]) with that task, resolved as a run would resolve it
(modality, window, a pretraining init's encoder settings; the weights themselves stay random:
they do not change the time). Times, on one random global batch of the configured shape in stored
units, the jitted train step (augmentation with the mask warped alongside, forward, loss, backward,
Adam, the non-finite guard) and one call of the fitted `Predictor` on `eval.batch_size` host
images (preprocessing, eval-mode forward, scores back on the host). One JSON row per task:
compile_s, median_step_s, train_images_per_s, median_inference_s, inference_batch,
inference_images_per_s and peak memory (the process's, so cumulative over tasks).
"""

from __future__ import annotations

import copy
import functools
import statistics
import time

import jax
import ml_collections
import numpy as np

from aacp_jax import sharding, task_specs
from aacp_jax.data import landmarks as lm
from aacp_jax.modalities import IN_CHANNELS, RAW_DTYPES

# One task per head: binary and multi-class classification, multi-label (CheXpert's 14 findings),
# regression, and segmentation through the U-Net decoder.
DEFAULT_TASKS = ('phantom_ct_cls', 'covidx', 'chexpert', 'phantom_ct_area', 'phantom_ct_seg')


def random_batch(task, batch_size: int, image_size: int, seed: int = 0) -> dict:
  """A host batch as `labelled.finetune_loader` delivers it, with random values."""
  rng = np.random.default_rng(seed)
  m, b, s, k = task.modality, batch_size, image_size, len(lm.LANDMARKS)
  out = {
    'image': rng.normal(0, 100, (b, s, s, IN_CHANNELS[m])).astype(RAW_DTYPES[m]),
    'landmarks': rng.uniform(0.2, 0.8, (b, k, 2)).astype(np.float32),
    'landmark_visible': rng.uniform(size=(b, k)) < 0.7,
  }
  if task.kind == 'segmentation':
    out['mask'] = rng.integers(0, task.num_outputs, (b, s, s)).astype(np.uint8)
  elif task.kind == 'multilabel':
    out['y'] = rng.integers(-1, 2, (b, task.num_outputs)).astype(np.int8)
  elif task.kind == 'regression':
    out['y'] = rng.normal(size=b).astype(np.float32)
  else:
    out['y'] = rng.integers(0, task.num_outputs, b).astype(np.int32)
  return out


def _median_seconds(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_task(base, task_name: str, *, steps: int, warmup: int) -> dict:
  """The row of one task (see the module docstring)."""
  from aacp_jax.train import finetune
  from aacp_jax.train import state as state_lib
  from aacp_jax.train.step import train_step

  config = copy.deepcopy(base)
  config.task = task_name
  config = finetune.resolve(config)
  finetune.check_config(config)
  task = task_specs.get(task_name)
  mesh = sharding.make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(
      f'config.batch_size={config.batch_size}: not divisible by the {mesh.size} devices'
    )
  size = config.data.image_size
  host = random_batch(task, config.batch_size, size, seed=config.seed)
  data = finetune.LabelledData(
    root='',
    batches={task.modality: config.batch_size},
    iterator=None,
    steps_per_epoch=1,
    fit_indices=np.arange(config.batch_size),
    fit_patients=config.batch_size,
    target_mean=0.0,
    target_std=1.0,
  )
  spec = finetune.make_task(config, data)
  state, shardings = state_lib.create_state(
    spec.model, spec.tx, mesh, spec.dummy_inputs, config.seed, spec.init_extra
  )
  batch = sharding.to_global(host, mesh)
  step = jax.jit(
    functools.partial(
      train_step,
      loss_fn=spec.loss_fn,
      tx=spec.tx,
      schedule=spec.schedule,
      seed=config.seed,
      schedules=spec.schedules,
      after_update=spec.after_update,
    ),
    in_shardings=(shardings, sharding.batch_sharded(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def run_step():
    # The state is donated: each call takes the previous call's output.
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready(metrics)

  step_s = _median_seconds(run_step, steps, warmup)
  predictor = finetune.Predictor(
    model=spec.model,
    variables=holder['state'].variables,
    task=task,
    aug_cfg=ml_collections.FrozenConfigDict(config.augment),
    batch_size=config.eval.batch_size,
  )
  # Host images in, host scores out, as a notebook calls it, one `eval.batch_size` chunk (the
  # predictor pads a smaller one to it); the first call compiles.
  n_eval = config.eval.batch_size
  images = random_batch(task, n_eval, size, seed=config.seed + 1)['image']
  forward_s = _median_seconds(lambda: predictor(images), steps, max(1, warmup))
  return dict(
    bench='finetune',
    task=task.name,
    kind=task.kind,
    head=task.head,
    modality=task.modality,
    protocol=config.protocol,
    image_size=size,
    depth=config.model.depth,
    width=config.model.width,
    dtype=config.model.dtype,
    batch_size=config.batch_size,
    compile_s=round(compile_s, 3),
    median_step_s=round(step_s, 5),
    train_images_per_s=round(config.batch_size / step_s, 2),
    median_inference_s=round(forward_s, 5),
    inference_batch=n_eval,
    inference_images_per_s=round(n_eval / forward_s, 2),
  )
