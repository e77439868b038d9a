"""`python -m aacp_jax.bench infer`: eval-mode inference per image, the variants side by side.

For each variant config (`bench --variants`, default full,minimal): the pretraining model at its
own initialisation (the values do not change the time), and per modality the jitted eval-mode
forward of every output (backbone, projector and, in the full model, FPN levels, ROI attention,
landmarks: what the model computes for one image) on preprocessed random images, on ONE device, as
a deployed model serves: at batch 1 (`latency_ms_<m>`, the median milliseconds per call, i.e. per
image) and at the configured batch, `config.batch_size` images of that modality
(`images_per_s_<m>`). Variants and modalities are timed in turn (round robin), so a load change
on a shared machine hits them alike and the ratio stays meaningful.

Rows: one `infer` row per variant (`latency_ms_per_image`: the mean over modalities at batch 1;
`images_per_s`: all modalities' images over their summed time at the configured batch), then one
`infer_ratio` row, the first variant over the last: `latency_ratio` at batch 1 (the paper: 23 ms
vs 18 ms per image, 1.28x) and `batch_time_ratio`, per-image time at the configured batch.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from aacp_jax.modalities import IN_CHANNELS, RAW_DTYPES


def _images(config, modality: str, batch: int, seed: int = 0):
  """Preprocessed images as evaluation feeds them: raw random values -> augment.preprocess."""
  from aacp_jax import augment

  rng = np.random.default_rng(seed)
  s = config.data.image_size
  raw = rng.normal(0, 100, (batch, s, s, IN_CHANNELS[modality])).astype(RAW_DTYPES[modality])
  return augment.preprocess(jnp.asarray(raw, jnp.float32), modality, config.augment)


def compile_variant(config, device=None) -> dict:
  """{'config', 'compile_s', 'calls': {(modality, batch): (compiled fn, variables, images)}}."""
  from aacp_jax import methods
  from aacp_jax.models import inputs
  from aacp_jax.train import pretrain

  pretrain.check_config(config)
  device = device or jax.devices()[0]
  model = methods.get(config.method).build_model(config)
  dummy = inputs.dummy_inputs(config.modalities, config.data.image_size)
  init = jax.jit(lambda x: model.init(jax.random.key(config.seed), x, train=False))
  variables = jax.device_put(jax.device_get(init(dummy)), device)
  calls, compile_s = {}, 0.0
  for m in config.modalities:
    for batch in sorted({1, int(config.batch_size)}):
      x = jax.device_put(_images(config, m, batch), device)
      fwd = jax.jit(lambda v, x, m=m: model.apply(v, {m: x}, train=False))
      t0 = time.perf_counter()
      compiled = fwd.lower(variables, x).compile()
      compile_s += time.perf_counter() - t0
      calls[(m, batch)] = (compiled, variables, x)
  return {'config': config, 'compile_s': compile_s, 'calls': calls}


def _time(call) -> float:
  fn, variables, x = call
  t0 = time.perf_counter()
  jax.block_until_ready(fn(variables, x))
  return time.perf_counter() - t0


def bench(configs, *, steps: int, warmup: int) -> list[dict]:
  """The rows for `configs` (one per variant, in order; see the module docstring)."""
  runs = [compile_variant(c) for c in configs]
  for run in runs:
    for call in run['calls'].values():
      for _ in range(warmup):
        _time(call)
  times = [{key: [] for key in run['calls']} for run in runs]
  for _ in range(steps):
    for run, t in zip(runs, times):
      for key, call in run['calls'].items():
        t[key].append(_time(call))
  rows = []
  for run, t in zip(runs, times):
    c = run['config']
    med = {key: statistics.median(v) for key, v in t.items()}
    b = int(c.batch_size)
    row = dict(
      bench='infer',
      variant=c.get('variant', ''),
      modalities=list(c.modalities),
      image_size=c.data.image_size,
      depth=c.model.depth,
      width=c.model.width,
      dtype=c.model.dtype,
      batch_size=b,
      infer_devices=1,
      compile_s=round(run['compile_s'], 3),
    )
    for m in c.modalities:
      row[f'latency_ms_{m}'] = round(1000 * med[(m, 1)], 4)
      row[f'images_per_s_{m}'] = round(b / med[(m, b)], 2)
    row['latency_ms_per_image'] = round(
      1000 * statistics.mean(med[(m, 1)] for m in c.modalities), 4
    )
    row['images_per_s'] = round(b * len(c.modalities) / sum(med[(m, b)] for m in c.modalities), 2)
    rows.append(row)
  if len(rows) > 1:
    first, last = rows[0], rows[-1]
    rows.append(
      dict(
        bench='infer_ratio',
        variants=f'{first["variant"]}/{last["variant"]}',
        image_size=first['image_size'],
        depth=first['depth'],
        batch_size=first['batch_size'],
        latency_ratio=round(first['latency_ms_per_image'] / last['latency_ms_per_image'], 3),
        batch_time_ratio=round(last['images_per_s'] / first['images_per_s'], 3),
      )
    )
  return rows
