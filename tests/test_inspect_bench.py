"""`aacp_jax.inspect` counts and FLOPs, and `aacp_jax.bench` JSON lines."""

import json
import os
import subprocess
import sys

import pytest

from aacp_jax import inspect as inspect_lib
from configs import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_model_parameter_counts():
  config = pretrain.get_config()
  # Parameter counts do not depend on the image size; 32² traces the three ResNet-50s faster.
  config.data.image_size = 32
  counts = inspect_lib.parameter_counts(config)
  # torchvision ResNet-50 without its fc: 23,508,032 at 3 input channels; conv1 with 64 input
  # channels adds 61 * 64 * 49 = 191,296; with 1 channel it loses 2 * 64 * 49 = 6,272.
  assert counts['encoder_mri'] == 23_508_032
  assert counts['encoder_ct'] == 23_508_032 + 191_296
  assert counts['encoder_xray'] == 23_508_032 - 6_272
  # Projector [2048, 2048, 512]: two bias-free Dense + BN (scale, bias), then Dense with bias.
  assert counts['projector'] == 2 * (2048 * 2048 + 2 * 2048) + 2048 * 512 + 512
  assert counts['total'] == sum(v for k, v in counts.items() if k not in ('total', 'batch_stats'))
  # FPN at the paper's widths (64, 128, 256, 512) on c2..c5 (256, 512, 1024, 2048 channels):
  # bias-free 1x1 laterals, 1x1 top-down width changes, 3x3 smoothing, BN (scale, bias).
  w, c = (64, 128, 256, 512), (256, 512, 1024, 2048)
  fpn = (
    sum(a * b for a, b in zip(w, c))
    + sum(w[i] * w[i + 1] for i in range(3))
    + 9 * sum(x * x for x in w)
    + 2 * sum(w)
  )
  assert counts['fpn_ct'] == fpn
  # Level projections GAP -> Dense(256, no bias) -> BN -> Dense(128).
  assert counts['levels_mri'] == sum(x * 256 + 2 * 256 + 256 * 128 + 128 for x in w)
  # ROI attention on c4 (1024 channels): 3x3 conv to 64, BN, 1x1 conv to one score (+ bias).
  assert counts['roi_xray'] == 9 * 1024 * 64 + 2 * 64 + 64 + 1
  comp = inspect_lib.component_counts(counts)
  assert comp['fpn'] == 3 * (fpn + counts['levels_mri'])
  assert comp['roi_attention'] == 3 * counts['roi_xray']
  assert comp['landmark_head'] == 3 * counts['landmarks_ct'] > 0
  assert sum(comp.values()) == counts['total']
  minimal = inspect_lib.component_counts(
    inspect_lib.parameter_counts(pretrain.get_config('minimal'))
  )
  assert minimal['fpn'] == minimal['roi_attention'] == 0 and minimal['landmark_head'] > 0


def test_flops_see_the_wider_ct_conv1():
  c = pretrain.get_config('demo')
  c.data.image_size = 32
  c.model.width = 4
  c.model.projector = (16, 16, 8)
  flops = inspect_lib.flops_per_example(c)
  # conv1 (7x7, stride 2, pad 3, 4 filters) on 32 pixels: XLA counts the taps that fall inside
  # the image, sum over the 16 output positions of a row = 4 + 6 + 13 * 7 + 5 = 106 per axis.
  valid_taps = sum(len([k for k in range(2 * i - 3, 2 * i + 4) if 0 <= k < 32]) for i in range(16))
  assert valid_taps == 106
  conv1_extra = 2 * (64 - 1) * 4 * valid_taps**2  # 2 FLOPs per multiply-add
  assert flops['ct'] - flops['xray'] == pytest.approx(conv1_extra, rel=1e-3)
  assert flops['mri'] > flops['xray'] > 0


def run_bench(command, config='demo', extra=(), config_args=None):
  """`python -m aacp_jax.bench COMMAND` on a tiny one-modality config (or `config_args`) over
  2 CPU devices; returns every JSON row."""
  config_args = config_args or [
    f'--config=configs/pretrain.py:{config}',
    "--config.modalities=('mri',)",
    '--config.data.image_size=32',
    '--config.model.width=4',
    '--config.batch_size=16',
    '--config.model.projector=(16,16,8)',
  ]
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0',
  )
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'aacp_jax.bench',
      command,
      *config_args,
      '--steps=2',
      '--warmup=1',
      *extra,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert all(row['devices'] == 2 for row in rows)
  return rows


def test_bench_step_full_and_minimal_side_by_side():
  full, minimal, ratio = run_bench('step')  # default --variants=full,minimal
  for row, variant in ((full, 'demo,full'), (minimal, 'demo,minimal')):
    assert row['bench'] == 'step' and row['variant'] == variant
    assert row['compile_s'] > 0 and row['median_step_s'] > 0 and row['median_inference_s'] > 0
    assert row['examples_per_s'] == pytest.approx(16 / row['median_step_s'], rel=0.01)
    assert row.get('peak_host_rss_bytes', row.get('peak_device_bytes', 0)) > 0
  assert ratio['bench'] == 'step_ratio' and ratio['variants'] == 'full/minimal'
  assert ratio['train_step_ratio'] == pytest.approx(
    full['median_step_s'] / minimal['median_step_s'], rel=0.01
  )
  assert ratio['inference_ratio'] == pytest.approx(
    full['median_inference_s'] / minimal['median_inference_s'], rel=0.01
  )


def test_bench_finetune_one_row_per_task_head():
  tiny = [
    '--config=configs/finetune.py:demo',
    '--config.data.image_size=32',
    '--config.model.width=4',
    '--config.batch_size=8',
    '--config.eval.batch_size=4',
    '--config.model.decoder_features=(16,8,8,8)',
  ]
  rows = run_bench(
    'finetune', config_args=tiny, extra=('--tasks=phantom_xray_cls,phantom_xray_seg',)
  )
  assert [(r['task'], r['head']) for r in rows] == [
    ('phantom_xray_cls', 'classify'),
    ('phantom_xray_seg', 'segment'),
  ]
  for row in rows:
    assert row['bench'] == 'finetune' and row['modality'] == 'xray' and row['image_size'] == 32
    assert row['compile_s'] > 0 and row['inference_batch'] == 4
    assert row['train_images_per_s'] == pytest.approx(8 / row['median_step_s'], rel=0.01)
    assert row['inference_images_per_s'] == pytest.approx(4 / row['median_inference_s'], rel=0.01)


def test_bench_finetune_needs_a_finetune_config():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run(
    [sys.executable, '-m', 'aacp_jax.bench', 'finetune', '--config=configs/pretrain.py:demo'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode != 0 and 'configs/finetune.py' in out.stderr


def test_bench_augment_prints_json():
  # The augmentation does not depend on the heads: the minimal model compiles faster.
  (row,) = run_bench('augment', config='demo,minimal')
  assert row['bench'] == 'augment'
  assert row['median_augment_s'] > 0 and row['median_forward_backward_s'] > 0
  assert 0 < row['augment_fraction'] < 1


def test_bench_input_real_size_shards_beside_the_demand(tmp_path):
  # Records of another size than the training one (real shards are): the host only pads.
  extra = (f'--workdir={tmp_path}', '--input_sizes=mri:40x30', '--input_records=8')
  (row,) = run_bench('input', extra=extra)
  assert row['bench'] == 'input' and row['modality'] == 'mri' and row['source'] == 'synthetic'
  assert row['record_hw'] == [40, 30] and row['dtype'] == 'float16' and row['image_size'] == 32
  assert row['layout'] == 'arrays'  # the writer's default (these small records stay inline)
  assert row['records_per_s'] > 0 and row['records_per_cpu_s'] > 0
  # Demand = the per-host batch (16) x the goal's step rate (4,000 samples/s / batch 16).
  assert row['step_rate'] == 250.0 and row['demand_records_per_s'] == 4000.0
  assert row['supply_over_demand'] == pytest.approx(row['records_per_s'] / 4000, rel=0.01)
  assert row['h2d_bytes_per_step'] >= 16 * 40 * 30 * 3 * 2


def test_bench_infer_full_and_minimal_per_image():
  full, minimal, ratio = run_bench('infer')  # default --variants=full,minimal
  for row, variant in ((full, 'demo,full'), (minimal, 'demo,minimal')):
    assert row['bench'] == 'infer' and row['variant'] == variant and row['modalities'] == ['mri']
    assert row['infer_devices'] == 1 and row['batch_size'] == 16 and row['compile_s'] > 0
    assert row['latency_ms_per_image'] == row['latency_ms_mri'] > 0
    assert row['images_per_s'] == row['images_per_s_mri'] > 0
  assert ratio['bench'] == 'infer_ratio' and ratio['variants'] == 'demo,full/demo,minimal'
  assert ratio['latency_ratio'] == pytest.approx(
    full['latency_ms_per_image'] / minimal['latency_ms_per_image'], rel=0.01
  )
  assert ratio['batch_time_ratio'] == pytest.approx(
    minimal['images_per_s'] / full['images_per_s'], rel=0.01
  )


def test_bench_step_times_the_baselines_side_by_side():
  # The named method variants on top of --config (demo): MoCo-v2 (key encoder, queue) and MAE
  # (ViT, AdamW) compile and time as any variant does.
  moco, mae, ratio = run_bench('step', extra=['--variants=moco_v2,mae'])
  assert (moco['variant'], mae['variant']) == ('demo,moco_v2', 'demo,mae')
  assert all(r['median_step_s'] > 0 and r['median_inference_s'] > 0 for r in (moco, mae))
  assert ratio['variants'] == 'moco_v2/mae'
