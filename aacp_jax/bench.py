"""Benchmarks, one JSON line per measurement:
`python -m aacp_jax.bench {step,input,augment,soak,finetune,infer}`.

  step   for each of --variants (default full,minimal, applied on top of --config): compile
         seconds, median train-step seconds, examples/s, median inference seconds (eval-mode
         forward of every output) and peak memory, on random inputs of the configured shapes (no
         data needed), the variants timed in turn (round robin); then one `step_ratio` row, the
         first variant over the last (the paper's Table 6 note: full / minimal = 1.68x per
         epoch, 1.28x at inference). Peak memory is the process's, so cumulative over variants.
  input  host input pipeline per modality: records/s, MiB/s, records per CPU second (= per core)
         and the host-to-device bytes per step, beside the demand of the configured step (the
         per-host batch x --step_rate, default the goal of 4,000 samples/s over the global batch)
         and their ratio. Reads config.data.root; without one it builds shards of synthetic
         records at real sizes (--input_sizes: CT 358x358x64 int16 slabs, 1024x1024 X-rays,
         233x197 MRI slices) under --workdir with the codec and shard writer
         (--input_compression, default uncompressed as the writer's; e.g. zstd:3; images of 1 MiB
         and more in array files unless --noinput_arrays).
  augment
         median seconds of the jitted two-view augmentation of the configured global batch, of the
         jitted encoder forward+backward on pre-augmented views (the step without augmentation),
         and augment_fraction = augment / (augment + forward_backward).

  soak   N cycles (--soak_cycles, default 10) of "train, kill -9 at a random moment, resume"
         with `python -m aacp_jax.main` and the --config arguments given here, against one
         uninterrupted run: per kill the steps, checkpoints and seconds lost and whether the
         resumed losses are bitwise the reference's; then a summary row (aacp_jax/soak.py).
         Needs --config.total_steps; --workdir holds both runs (default: a temp dir).

  finetune
         with --config=configs/finetune.py[:variants]: per task of --tasks (default one per head
         kind: binary, multi-class, multi-label, regression, segmentation), compile seconds,
         median train-step seconds and images/s, and the fitted predictor's images/s on host
         images, on random inputs of the configured shapes (aacp_jax/finetune_bench.py).

  infer  for each of --variants (as `step`): the eval-mode forward of every output on one device,
         per modality, at batch 1 (latency ms per image) and at config.batch_size (images/s),
         then an `infer_ratio` row, first variant over last (the paper: 23 vs 18 ms per image)
         (aacp_jax/infer_bench.py).

CT data preparation has its own command, `python -m data_prep.bench_prep` (flags --prep_*): the
library never imports data_prep.

Speed targets live here, never in timed tests.
"""

import copy
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from aacp_jax import sharding
from aacp_jax.modalities import IN_CHANNELS, RAW_DTYPES

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', 'configs/pretrain.py', 'Config file[:variants].', lock_config=False
)
flags.DEFINE_integer('steps', 10, 'Timed iterations after warm-up.')
flags.DEFINE_integer('warmup', 2, 'Untimed iterations after compilation.')
flags.DEFINE_string('workdir', None, 'Where `input` builds phantoms (default: a temp dir).')
flags.DEFINE_list(
  'input_sizes',
  ['ct:358x358', 'xray:1024x1024', 'mri:233x197'],
  '`input` without config.data.root: record (h, w) per modality of the synthetic shards.',
)
flags.DEFINE_integer('input_records', 48, '`input`: synthetic records per modality.')
flags.DEFINE_string(
  'input_compression',
  'uncompressed',
  "`input`: ArrayRecord compression of the synthetic shards ('uncompressed', 'zstd:3', ...).",
)
flags.DEFINE_bool(
  'input_arrays',
  True,
  "`input`: write the synthetic shards with array files for large images (the writer's "
  'default); --noinput_arrays keeps each record whole in its shard (the layout before).',
)
flags.DEFINE_integer(
  'input_virtual',
  65536,
  '`input` on synthetic shards: the split length the pipeline sees (records cycled).',
)
flags.DEFINE_float(
  'step_rate', 0.0, '`input`: steps/s the demand is computed at (0: 4,000 samples/s / batch).'
)
flags.DEFINE_list('tasks', None, '`finetune`: task names (default: one per head kind).')
flags.DEFINE_integer('soak_cycles', 10, '`soak`: kill -9 / resume cycles.')
flags.DEFINE_integer('soak_seed', 0, '`soak`: seed of the kill moments.')
flags.DEFINE_list(
  'variants',
  ['full', 'minimal'],
  '`step`, `infer`: configs/pretrain.py variants applied on top of --config, timed in turn.',
)


def _emit(**row):
  row.setdefault('backend', jax.default_backend())
  row.setdefault('devices', jax.device_count())
  row.setdefault('device_kind', jax.devices()[0].device_kind)
  print(json.dumps(row), flush=True)


def peak_memory_bytes():
  """Peak device memory where the backend reports it (GPU/TPU), else the host's peak RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'peak_device_bytes': int(stats['peak_bytes_in_use'])}
  return {'peak_host_rss_bytes': int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def random_batch(config, batches, seed=0):
  """Raw-valued host batch of the configured shapes, as the input pipeline would deliver it."""
  from aacp_jax.data import landmarks as lm

  rng = np.random.default_rng(seed)
  s = config.data.image_size
  out = {}
  for m, b in batches.items():
    image = rng.normal(0, 100, (b, s, s, IN_CHANNELS[m])).astype(RAW_DTYPES[m])
    k = len(lm.LANDMARKS)
    out[m] = {
      'image': image,
      'landmarks': rng.uniform(0.2, 0.8, (b, k, 2)).astype(np.float32),
      'landmark_visible': rng.uniform(size=(b, k)) < 0.7,
      'landmarks_canonical': rng.uniform(0.2, 0.8, (b, k, 2)).astype(np.float32),
      'organs': (rng.uniform(size=(b, len(lm.ORGANS))) < 0.5).astype(np.uint8),
    }
  return out


def _setup(config):
  """Model, replicated train state and a random global batch of the configured shapes."""
  from aacp_jax import methods
  from aacp_jax.models import inputs
  from aacp_jax.train import pretrain
  from aacp_jax.train import state as state_lib

  pretrain.check_config(config)
  method = methods.get(config.method)
  mesh = sharding.make_mesh()
  batches = sharding.per_modality_batch(
    config.batch_size, config.data.shares, config.modalities, mesh.size, jax.process_count()
  )
  model = method.build_model(config)
  tx, schedule = state_lib.make_optimizer(config.optim, 1000)
  state, shardings = state_lib.create_state(
    model,
    tx,
    mesh,
    inputs.dummy_inputs(config.modalities, config.data.image_size),
    config.seed,
    # A method's own state (MoCo's key encoder and queues): its loss reads it.
    lambda variables: method.init_extra(config, variables),
  )
  batch = sharding.to_global(random_batch(config, batches), mesh)
  return types.SimpleNamespace(
    mesh=mesh,
    model=model,
    tx=tx,
    schedule=schedule,
    state=state,
    shardings=shardings,
    batch=batch,
    method=method,
  )


def _config_fields(config):
  return dict(
    variant=config.get('variant', ''),
    image_size=config.data.image_size,
    depth=config.model.depth,
    dtype=config.model.dtype,
    batch_size=config.batch_size,
  )


def _config_module():
  """The --config file as a module (its VARIANTS), loaded by path: the library imports no
  configs package."""
  import importlib.util

  path = config_flags.get_config_filename(FLAGS['config']).split(':')[0]
  spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variant_config(config, variant):
  """--config with one more variant of its config file applied (a copy; --config stays as is)."""
  variants = _config_module().VARIANTS
  if variant not in variants:
    raise app.UsageError(
      f'--variants: unknown variant {variant!r}; known: {", ".join(sorted(variants))}'
    )
  c = copy.deepcopy(config)
  variants[variant](c)
  c.variant = ','.join(v for v in (config.get('variant', ''), variant) if v)
  return c


def _compile_variant(config):
  """Setup, compiled train step (state donated) and compiled eval-mode forward of one config."""
  from aacp_jax import augment
  from aacp_jax.methods.base import RunInfo
  from aacp_jax.train.step import train_step

  s = _setup(config)
  s.config = config
  # The cross-modal term at its full weight from the first step (a curriculum that has ended):
  # the benchmark times the whole loss.
  timed = copy.deepcopy(config)
  if 'cross_start_epoch' in timed.loss:
    timed.loss.cross_start_epoch = timed.loss.cross_end_epoch = 0.0
  run = RunInfo(steps_per_epoch=1, total_steps=1)
  loss_fn = s.method.make_loss(timed, s.model, run)
  step = jax.jit(
    functools.partial(
      train_step,
      loss_fn=loss_fn,
      tx=s.tx,
      schedule=s.schedule,
      seed=config.seed,
      schedules=s.method.make_schedules(timed, run),
      after_update=s.method.after_update,
    ),
    in_shardings=(s.shardings, sharding.batch_sharded(s.mesh)),
    out_shardings=(s.shardings, sharding.replicated(s.mesh)),
    donate_argnums=0,
  )
  t0 = time.perf_counter()
  s.step = step.lower(s.state, s.batch).compile()
  s.compile_s = time.perf_counter() - t0
  # Inference = every head's output in eval mode, on preprocessed images (no augmentation).
  s.images = {
    m: augment.preprocess(s.batch[m]['image'].astype(jnp.float32), m, config.augment)
    for m in config.modalities
  }
  fwd = jax.jit(
    lambda v, x: s.model.apply(v, x, train=False),
    in_shardings=(sharding.replicated(s.mesh), sharding.batch_sharded(s.mesh)),
  )
  s.forward = fwd.lower(s.state.variables, s.images).compile()
  return s


def _run_step(s):
  # The state is donated, so each call takes the previous call's output.
  s.state, metrics = s.step(s.state, s.batch)
  jax.block_until_ready(metrics)


def _run_forward(s):
  jax.block_until_ready(s.forward(s.state.variables, s.images))


def bench_step(config):
  runs = {v: _compile_variant(_variant_config(config, v)) for v in FLAGS.variants}
  for s in runs.values():
    for _ in range(FLAGS.warmup):
      _run_step(s)
      _run_forward(s)
  # Round robin: on a shared machine a load change then hits every variant alike, so the ratio
  # stays meaningful even when the absolute times drift.
  times = {v: {'step': [], 'forward': []} for v in runs}
  for _ in range(FLAGS.steps):
    for v, s in runs.items():
      for kind, fn in (('step', _run_step), ('forward', _run_forward)):
        t0 = time.perf_counter()
        fn(s)
        times[v][kind].append(time.perf_counter() - t0)
  medians = {v: {k: statistics.median(t) for k, t in ts.items()} for v, ts in times.items()}
  for v, s in runs.items():
    c, med = s.config, medians[v]
    _emit(
      bench='step',
      **_config_fields(c),
      compile_s=round(s.compile_s, 3),
      median_step_s=round(med['step'], 5),
      examples_per_s=round(c.batch_size / med['step'], 2),
      median_inference_s=round(med['forward'], 5),
      **peak_memory_bytes(),
    )
  if len(runs) > 1:
    first, last = FLAGS.variants[0], FLAGS.variants[-1]
    _emit(
      bench='step_ratio',
      variants=f'{first}/{last}',
      **{k: v for k, v in _config_fields(config).items() if k != 'variant'},
      train_step_ratio=round(medians[first]['step'] / medians[last]['step'], 3),
      inference_ratio=round(medians[first]['forward'] / medians[last]['forward'], 3),
    )


def _median_time(fn, *args):
  """Median seconds per call of a compiled fn after FLAGS.warmup untimed calls."""
  out = None
  for _ in range(FLAGS.warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_augment(config):
  from aacp_jax.methods.aacp import make_views, views_loss

  s = _setup(config)
  data = sharding.batch_sharded(s.mesh)
  repl = sharding.replicated(s.mesh)
  key = jax.random.key(config.seed)
  augment_fn = jax.jit(
    functools.partial(make_views, config=config), in_shardings=(None, data), out_shardings=data
  )
  grad_fn = jax.jit(
    jax.value_and_grad(functools.partial(views_loss, model=s.model, config=config), has_aux=True),
    in_shardings=(s.shardings.params, s.shardings.batch_stats, data, data),
    out_shardings=((repl, (s.shardings.batch_stats, repl)), s.shardings.params),
  )
  augment_c = augment_fn.lower(key, s.batch).compile()
  views = augment_c(key, s.batch)
  grad_c = grad_fn.lower(s.state.params, s.state.batch_stats, s.batch, views).compile()
  augment_s = _median_time(augment_c, key, s.batch)
  fwd_bwd_s = _median_time(grad_c, s.state.params, s.state.batch_stats, s.batch, views)
  _emit(
    bench='augment',
    **_config_fields(config),
    median_augment_s=round(augment_s, 5),
    median_forward_backward_s=round(fwd_bwd_s, 5),
    augment_fraction=round(augment_s / (augment_s + fwd_bwd_s), 4),
  )


GOAL_SAMPLES_PER_S = 4000.0  # two-view samples/s on one H200 (the performance goal)


def real_size_shards(root, sizes, count, seed=0, compression=None, arrays=True):
  """Writes `count` synthetic records per modality at `sizes` ({m: (h, w)}) as split 'train'
  (codec + shard writer, as data_prep writes them); the content is noise, the bytes are real.
  `compression`: of the shards (shards.writer_options; default uncompressed); `arrays`: large
  images in array files (shards.write_split)."""
  from aacp_jax.data import landmarks as lm
  from aacp_jax.data import shards

  rng = np.random.default_rng(seed)

  def records(m, h, w):
    dtype, c = RAW_DTYPES[m], IN_CHANNELS[m]
    base = rng.normal(0, 300 if m == 'ct' else 1, (h, w, c))
    if m == 'xray':
      base = base * 40 + 120
    base = np.clip(base, *(-1024, 3071) if m == 'ct' else (0, 255)).astype(dtype)
    for i in range(count):
      pts, vis, can = lm.empty_landmarks()
      pts[:4] = can[:4] = rng.uniform(0.2, 0.8, (4, 2))
      vis[:4] = True
      yield dict(
        image=np.roll(base, i, axis=0),
        modality=m,
        region='brain' if m == 'mri' else 'chest',
        source='bench',
        subject=f'{m}{i:05d}',
        spacing=np.ones(3, np.float32),
        landmarks=pts,
        landmark_visible=vis,
        landmarks_canonical=can,
        organs=lm.organ_multi_hot(['brain'] if m == 'mri' else ['lungs', 'heart']),
      )

  streams = {m: _Sized(records(m, *hw), count) for m, hw in sizes.items()}
  shards.write_split(
    root,
    'train',
    streams,
    seed=seed,
    num_shards=max(1, count // 32),
    compression=compression,
    arrays=arrays,
  )
  return root


class Tiled:
  """A source of `length` records cycling over `source`'s: the bench's few distinct records
  read as a split of realistic size (Grain's shuffle cost falls with the split's length)."""

  def __init__(self, source, length):
    self.source, self.length = source, int(length)

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    return self.source[int(index) % len(self.source)]


def _tiled_source(length, root, split, modality, **kwargs):
  return Tiled(_open_source(root, split, modality, **kwargs), length)


def _open_source(*args, **kwargs):
  from aacp_jax.data import shards

  return shards.open_source(*args, **kwargs)


class _Sized:
  def __init__(self, it, n):
    self.it, self.n = it, n

  def __len__(self):
    return self.n

  def __iter__(self):
    return self.it


def _parse_sizes(items):
  sizes = {}
  for item in items:
    m, _, hw = item.partition(':')
    try:
      h, w = (int(v) for v in hw.split('x'))
    except ValueError:
      raise app.UsageError(f'--input_sizes: {item!r} is not modality:HxW') from None
    sizes[m] = (h, w)
  return sizes


def bench_input(config):
  from aacp_jax.data import pipeline, shards

  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='aacp_bench_')
  batches = sharding.per_modality_batch(
    config.batch_size,
    config.data.shares,
    config.modalities,
    jax.device_count(),
    jax.process_count(),
  )
  if config.data.root:
    root, split, source = config.data.root, config.data.split, config.data.root
    opener, compression = shards.open_source, None  # whatever the shards were written with
    layout = 'as written'
  else:
    sizes = {m: hw for m, hw in _parse_sizes(FLAGS.input_sizes).items() if m in batches}
    if not sizes:
      raise app.UsageError(f"--input_sizes: none of the config's modalities {sorted(batches)}")
    batches = {m: b for m, b in batches.items() if m in sizes}  # only the modalities sized
    tag = '_'.join(f'{m}{h}x{w}' for m, (h, w) in sorted(sizes.items()))
    compression = FLAGS.input_compression
    shards.writer_options(compression)  # a bad flag fails before anything is written
    # The compression is in the name: a cache written with other options is never read instead.
    layout = 'arrays' if FLAGS.input_arrays else 'inline'
    root = (
      f'{workdir}/real_size_{tag}_{FLAGS.input_records}_{compression.replace(":", "")}_{layout}'
    )
    try:
      shards.read_manifest(root, 'train')
    except shards.ShardError:
      real_size_shards(
        root, sizes, FLAGS.input_records, compression=compression, arrays=FLAGS.input_arrays
      )
    split, source = 'train', 'synthetic'
    opener = functools.partial(_tiled_source, FLAGS.input_virtual)
  step_rate = FLAGS.step_rate or GOAL_SAMPLES_PER_S / config.batch_size
  for m, b in batches.items():
    records = len(opener(root, split, m, verify=False))
    host_batch = min(b, records)  # the configured batch when the shards hold enough records
    it = pipeline.pretrain_loader(
      root,
      split,
      {m: host_batch},
      seed=config.seed,
      image_size=config.data.image_size,
      worker_count=config.data.worker_count,
      open_source=opener,
    )
    item = next(it)  # Opening files and the first decode are start-up, not throughput.
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(FLAGS.steps):
      item = next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = FLAGS.steps * host_batch
    per_record = sum(a.nbytes for a in item[m].values()) / host_batch
    image = item[m]['image']
    supply = n / dt
    demand = b * step_rate
    row = dict(
      bench='input',
      modality=m,
      source=source,
      compression=compression,
      layout=layout,
      record_hw=list(image.shape[1:3]),
      channels=image.shape[3],
      dtype=str(image.dtype),
      image_size=config.data.image_size,
      host_batch=host_batch,
      records_per_s=round(supply, 1),
      mib_per_s=round(n * image[0].nbytes / dt / 2**20, 1),
      worker_count=config.data.worker_count,
      # Grain's read threads and this process together; workers' CPU is not in it.
      records_per_cpu_s=round(n / cpu, 1) if cpu > 0 and not config.data.worker_count else None,
      h2d_bytes_per_step=int(per_record * b),
      step_rate=round(step_rate, 3),
      demand_records_per_s=round(demand, 1),
      supply_over_demand=round(supply / demand, 3),
      demand_h2d_gib_per_s=round(per_record * b * step_rate / 2**30, 2),
      load_average=round(os.getloadavg()[0], 2),
    )
    _emit(**row)


def bench_soak(config):
  from aacp_jax import soak

  # The children get this command's own --config arguments (file, variants, overrides).
  config_argv = [a for a in sys.argv[1:] if a.startswith('--config')]
  if not any(a.startswith('--config=') for a in config_argv):
    config_argv.insert(0, '--config=configs/pretrain.py')
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='aacp_soak_')
  soak.run(config, config_argv, workdir, FLAGS.soak_cycles, FLAGS.soak_seed, _emit_host)


def bench_finetune(config):
  from aacp_jax import finetune_bench

  if config.get('experiment') != 'finetune':
    raise app.UsageError('bench finetune: --config must be configs/finetune.py[:variants]')
  for task in FLAGS.tasks or finetune_bench.DEFAULT_TASKS:
    row = finetune_bench.bench_task(config, task, steps=FLAGS.steps, warmup=FLAGS.warmup)
    _emit(**row, **peak_memory_bytes())


def bench_infer(config):
  from aacp_jax import infer_bench

  configs = [_variant_config(config, v) for v in FLAGS.variants]
  for row in infer_bench.bench(configs, steps=FLAGS.steps, warmup=FLAGS.warmup):
    _emit(**row, **({} if row['bench'] == 'infer_ratio' else peak_memory_bytes()))


def _emit_host(**row):
  print(json.dumps(row), flush=True)


def main(argv):
  commands = {
    'step': bench_step,
    'input': bench_input,
    'augment': bench_augment,
    'soak': bench_soak,
    'finetune': bench_finetune,
    'infer': bench_infer,
  }
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f'usage: python -m aacp_jax.bench {{{",".join(commands)}}} --config=...')
  commands[argv[1]](FLAGS.config)


if __name__ == '__main__':
  app.run(main)
