"""Weights out (aacp_jax.export, convert.flax_to_torchvision / save_safetensors): the bitwise round
trip, a torch oracle, the jax.export artefact, the command, and `init=imagenet:PATH` in a run."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacp_jax import export, restore
from aacp_jax.data import phantoms
from aacp_jax.models import convert
from aacp_jax.models.encoders import AACPModel
from aacp_jax.models.resnet import ResNet
from aacp_jax.train import finetune
from tests import torch_resnet, workdirs
from tests.test_convert import _torch_keys
from tests.test_finetune import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_variables(abstract, seed=0):
  """Concrete random values for abstract ResNet variables, with nothing compiled: He-scaled
  kernels (activations stay O(1) through 50 layers), non-trivial BN affine and statistics."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return (0.5 + rng.uniform(size=a.shape)).astype(a.dtype)
    if "'scale'" in name:
      return (1 + 0.2 * rng.standard_normal(a.shape)).astype(a.dtype)
    if "'kernel'" in name:
      fan_in = int(np.prod(a.shape[:-1]))
      return (rng.standard_normal(a.shape) * np.sqrt(1.0 / fan_in)).astype(a.dtype)
    return (0.2 * rng.standard_normal(a.shape)).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _resnet_variables(model, channels, seed=0):
  x = jax.ShapeDtypeStruct((2, 32, 32, channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return _random_variables(abstract, seed)


def _assert_bitwise(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)

  def same(path, a, b):
    a, b = np.asarray(a), np.asarray(b)
    where = jax.tree_util.keystr(path)
    assert a.dtype == b.dtype and a.shape == b.shape, where
    assert a.tobytes() == b.tobytes(), where

  jax.tree_util.tree_map_with_path(same, got, want)


@pytest.mark.parametrize('depth', [18, 50])
def test_export_import_round_trip_is_bitwise(depth, tmp_path):
  # A CT encoder inside the pretraining model: conv1 keeps its 64 input channels on the way out.
  model = AACPModel(modalities=('ct',), depth=depth, width=4, projector=(16, 8))
  images = {'ct': jax.ShapeDtypeStruct((2, 32, 32, 64), jnp.float32)}
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  variables = _random_variables(abstract, seed=depth)
  encoder = {c: variables[c]['encoder_ct'] for c in ('params', 'batch_stats')}
  sd = convert.flax_to_torchvision(encoder, num_batches_tracked=5)
  assert set(sd) == set(_torch_keys(depth))  # torchvision's names, no fc
  assert sd['conv1.weight'].shape == (4, 64, 7, 7)
  assert sd['bn1.num_batches_tracked'].dtype == np.int64 and int(sd['bn1.num_batches_tracked']) == 5
  path = str(tmp_path / 'ct.safetensors')
  convert.save_safetensors(path, sd, {'modality': 'ct'})
  with open(path, 'rb') as f:  # the reference writer's alignment: tensors start 8-byte aligned
    assert (8 + int.from_bytes(f.read(8), 'little')) % 8 == 0
  assert convert.read_safetensors_metadata(path) == {'modality': 'ct'}
  loaded = convert.load_safetensors(path)
  _assert_bitwise(loaded, sd)
  back = convert.load_torchvision_encoder(abstract, loaded, 'ct')
  _assert_bitwise({c: back[c]['encoder_ct'] for c in ('params', 'batch_stats')}, encoder)
  flat = convert.torchvision_to_flax(loaded, in_channels=64)
  _assert_bitwise(flat, encoder)
  # With a classifier, fc goes out as torch's (out, in) and comes back.
  head = ResNet(depth=depth, width=4, num_classes=3)
  with_fc = _resnet_variables(head, 3, seed=1)
  sd_fc = convert.flax_to_torchvision(with_fc)
  assert sd_fc['fc.weight'].shape == (3, head.num_features) and set(sd_fc) == set(
    _torch_keys(depth, 3)
  )
  _assert_bitwise(convert.torchvision_to_flax(sd_fc), with_fc)


def test_save_safetensors_refuses_what_the_format_cannot_hold(tmp_path):
  with pytest.raises(ValueError, match='metadata must be strings'):
    convert.save_safetensors(str(tmp_path / 'a.safetensors'), {}, {'step': 3})
  with pytest.raises(ValueError, match="tensor 'x': dtype complex64"):
    convert.save_safetensors(str(tmp_path / 'a.safetensors'), {'x': np.zeros(2, np.complex64)})
  with pytest.raises(ValueError, match='params/head/kernel: not a leaf of a torchvision ResNet'):
    convert.flax_to_torchvision({'params': {'head': {'kernel': np.zeros((2, 2))}}})
  assert not os.listdir(tmp_path)  # nothing half-written


@pytest.mark.parametrize('depth,channels', [(18, 1), (50, 64)])
def test_torch_loads_the_export_and_matches_the_flax_forward(depth, channels, tmp_path):
  torch = pytest.importorskip('torch')
  model = ResNet(depth=depth, width=8)
  variables = _resnet_variables(model, channels, seed=depth)
  path = str(tmp_path / 'enc.safetensors')
  convert.save_safetensors(path, convert.flax_to_torchvision(variables))
  net = torch_resnet.torch_resnet(torch, depth, None, width=8, in_channels=channels)
  state = {k: torch.from_numpy(v) for k, v in convert.load_safetensors(path).items()}
  net.load_state_dict(state, strict=True)  # every key present, none left over
  x = np.random.default_rng(0).standard_normal((2, 32, 32, channels)).astype(np.float32)
  with torch.no_grad():
    want = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  with jax.default_matmul_precision('highest'):  # no TF32 on GPUs
    got = jax.jit(lambda v, x: model.apply(v, x, train=False)['pooled'])(variables, x)
  rel = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
  print(f'resnet{depth} ({channels} ch) pooled max rel diff vs torch = {rel:.2e}')
  assert want.shape == (2, model.num_features) and rel <= 1e-4


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny X-ray pretraining workdir (ResNet-18, width 4, step 2), nothing compiled."""
  base = tmp_path_factory.mktemp('export')
  return workdirs.pretraining_workdir(str(base / 'pre'), str(base / 'data'), modalities=('xray',))


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-m', 'aacp_jax.export', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_cli_writes_torchvision_weights_the_import_reads_back(workdir, tmp_path):
  out = str(tmp_path / 'xray_resnet.safetensors')
  done = _cli(f'--workdir={workdir}', '--modality=xray', f'--out={out}')
  assert done.returncode == 0, done.stderr[-2000:]
  meta = convert.read_safetensors_metadata(out)
  assert json.loads(done.stdout.strip().splitlines()[-1])['modality'] == 'xray'
  assert {k: meta[k] for k in ('modality', 'in_channels', 'depth', 'width', 'source_step')} == {
    'modality': 'xray',
    'in_channels': '1',
    'depth': '18',
    'width': '4',
    'source_step': '2',
  }
  assert meta['source_workdir'] == os.path.abspath(workdir) and meta['code_version']
  r = restore.load_variables(workdir)
  back = convert.load_torchvision_encoder(r.variables, convert.load_safetensors(out), 'xray')
  _assert_bitwise(back, r.variables)


def test_cli_stablehlo_equals_model_apply_at_two_batch_sizes(workdir, tmp_path):
  out = str(tmp_path / 'xray_resnet.jax')
  done = _cli(f'--workdir={workdir}', '--modality=xray', '--format=stablehlo', f'--out={out}')
  assert done.returncode == 0, done.stderr[-2000:]
  sidecar = json.load(open(f'{out}.json'))
  assert sidecar['input'] == {'shape': ['b', 32, 32, 1], 'dtype': 'float32', 'layout': 'NHWC'}
  assert sidecar['outputs'] == {'pooled': ['b', 32]} and sidecar['modality'] == 'xray'
  assert sidecar['platforms'] == ['cpu'] and '255' in sidecar['preprocessing']
  exported = jax.export.deserialize(bytearray(open(out, 'rb').read()))
  encoder, variables = restore.encoder_variables(restore.load_variables(workdir), 'xray')
  apply = jax.jit(lambda v, x: encoder.apply(v, x, train=False)['pooled'])
  rng = np.random.default_rng(0)
  for b in (1, 3):
    x = rng.uniform(0, 1, (b, 32, 32, 1)).astype(np.float32)
    got, want = np.asarray(exported.call(x)), np.asarray(apply(variables, x))
    assert got.shape == (b, 32) and got.dtype == np.float32
    # The same program on the same backend: equal up to XLA folding the constant weights.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_export_all_outputs_in_process(workdir, tmp_path):
  out = str(tmp_path / 'all.jax')
  sidecar = export.export_stablehlo(workdir, 'xray', out, outputs='all')
  assert sidecar['outputs']['c5'] == ['b', 1, 1, 32] and sidecar['outputs']['pooled'] == ['b', 32]
  got = jax.export.deserialize(bytearray(open(out, 'rb').read())).call(np.zeros((2, 32, 32, 1)))
  assert set(got) == {'c2', 'c3', 'c4', 'c5', 'pooled'} and got['c2'].shape == (2, 8, 8, 4)


def test_cli_bad_input_is_one_line(workdir, tmp_path):
  done = _cli(f'--workdir={workdir}', '--modality=ct', f'--out={tmp_path}/ct.safetensors')
  # Library import chatter (an absl warning of orbax) may precede it; the error is the last line.
  errors = [line for line in done.stderr.splitlines() if line.startswith('error:')]
  assert done.returncode == 2 and 'Traceback' not in done.stderr, done.stderr[-2000:]
  assert errors == [done.stderr.strip().splitlines()[-1]]
  assert '--modality=ct: the workdir' in errors[0] and "['xray']" in errors[0]
  with pytest.raises(ValueError, match='--out=/no/such/dir/x.safetensors: no folder'):
    export.export_safetensors(workdir, 'xray', '/no/such/dir/x.safetensors')
  with pytest.raises(ValueError, match='no config.json'):
    export.export_safetensors(str(tmp_path), 'xray', str(tmp_path / 'x.safetensors'))
  assert not os.listdir(tmp_path)


# ---- init=imagenet:PATH in a fine-tuning run ----


@pytest.fixture(scope='module')
def xray_root(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('export_phantoms'))
  counts = {'train': {'xray': 32}, 'test': {'xray': 16}}
  return phantoms.build(path, seed=2, image_size=32, counts=counts, progress=False)


def _imagenet_file(path, depth=18, width=4, seed=7):
  """A torchvision-layout file with 3-channel conv1 and a 1000-class fc, as ImageNet weights are."""
  variables = _resnet_variables(ResNet(depth=depth, width=width, num_classes=1000), 3, seed)
  convert.save_safetensors(path, convert.flax_to_torchvision(variables), {'format': 'pt'})
  return path


def test_imagenet_init_is_where_a_fine_tuning_run_starts(xray_root, tmp_path):
  path = _imagenet_file(str(tmp_path / 'resnet18_imagenet.safetensors'))
  # Linear protocol: the encoder gets zero updates and BN runs on its statistics, so the fitted
  # encoder is the run's initial one, bit for bit.
  config = tiny(
    'phantom_xray_cls',
    **{'data.root': xray_root, 'init': f'imagenet:{path}', 'protocol': 'linear', 'total_steps': 1},
  )
  config.model.depth = 18
  out = finetune.run(config, str(tmp_path / 'ft'), evaluate_test=False)
  got = {c: out.predictor.variables[c]['encoder'] for c in ('params', 'batch_stats')}
  target = {c: {'encoder_xray': v} for c, v in got.items()}
  want = convert.load_torchvision_encoder(target, convert.load_safetensors(path), 'xray')
  _assert_bitwise(got, {c: want[c]['encoder_xray'] for c in ('params', 'batch_stats')})
  # ... which are the file's tensors, conv1's RGB filters adapted to one channel.
  sd = convert.load_safetensors(path)
  np.testing.assert_array_equal(
    got['params']['conv1']['kernel'],
    convert.adapt_conv1(sd['conv1.weight'], 1).transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    got['batch_stats']['layer4_1']['bn2']['var'], sd['layer4.1.bn2.running_var']
  )
  assert 'fc' not in got['params']  # the ImageNet classifier is dropped, the task head is new


def test_imagenet_init_of_the_wrong_shape_is_one_line_naming_the_file(xray_root, tmp_path):
  path = _imagenet_file(str(tmp_path / 'resnet18_w8.safetensors'), width=8)
  config = tiny('phantom_xray_cls', **{'data.root': xray_root, 'init': f'imagenet:{path}'})
  config.model.depth = 18
  with pytest.raises(ValueError, match=re.escape(f'config.init=imagenet:{path}: params/')) as err:
    finetune.run(config, str(tmp_path / 'ft'), evaluate_test=False)
  assert 'shape' in str(err.value) and '\n' not in str(err.value)


# ---- ViT encoders (MAE's) in timm's VisionTransformer layout ----

VIT = dict(patch_size=16, depth=2, width=32, heads=2, mlp_dim=64)


def _vit_variables(pos_embed, channels, seed=0, size=32):
  from aacp_jax.models import vit

  model = vit.ViT(vit.Spec(**VIT, pos_embed=pos_embed))
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return model, _random_variables(abstract, seed)


def _timm_keys(depth):
  keys = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
  keys |= {'norm.weight', 'norm.bias'}
  for i in range(depth):
    for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
      keys |= {f'blocks.{i}.{m}.weight', f'blocks.{i}.{m}.bias'}
  return keys


@pytest.mark.parametrize('pos_embed', ['sincos', 'learned'])
def test_vit_export_import_round_trip_is_bitwise(pos_embed, tmp_path):
  model, variables = _vit_variables(pos_embed, channels=64, seed=1)
  fixed = export.vit_pos_embed(model, 32)
  sd = convert.flax_to_timm_vit(variables['params'], pos_embed=fixed)
  assert set(sd) == _timm_keys(2)
  d, n = VIT['width'], (32 // 16) ** 2
  shapes = {
    'patch_embed.proj.weight': (d, 64, 16, 16),
    'cls_token': (1, 1, d),
    'pos_embed': (1, 1 + n, d),
    'blocks.1.attn.qkv.weight': (3 * d, d),
    'blocks.1.attn.qkv.bias': (3 * d,),
    'blocks.0.mlp.fc1.weight': (VIT['mlp_dim'], d),
    'norm.weight': (d,),
  }
  assert {k: sd[k].shape for k in shapes} == shapes
  # torch Linear (out, in) is the Flax kernel transposed; q, k, v rows in that order.
  qkv = variables['params']['block0']['attn']['qkv']['kernel']
  np.testing.assert_array_equal(sd['blocks.0.attn.qkv.weight'][d : 2 * d], qkv[:, d : 2 * d].T)
  if pos_embed == 'sincos':  # the fixed table, as the model adds it (class token's row 0)
    np.testing.assert_array_equal(sd['pos_embed'][0], fixed)
    assert not sd['pos_embed'][0, 0].any()
  path = str(tmp_path / 'vit.safetensors')
  convert.save_safetensors(path, sd, {'modality': 'ct'})
  loaded = convert.load_safetensors(path)
  _assert_bitwise(loaded, sd)
  back = convert.load_timm_vit(variables['params'], loaded, fixed_pos_embed=fixed)
  _assert_bitwise(back, variables['params'])
  # What does not fit is one line naming the key.
  with pytest.raises(
    ValueError, match=r"^params: state dict does not fit the ViT; missing \['norm/"
  ):
    convert.load_timm_vit(
      variables['params'],
      {k: v for k, v in loaded.items() if 'norm.' != k[:5]},
      fixed_pos_embed=fixed,
    )
  with pytest.raises(ValueError, match=r'^blocks.0.ls1.gamma: not a leaf of our ViT'):
    convert.load_timm_vit(
      variables['params'], {**loaded, 'blocks.0.ls1.gamma': np.ones(d)}, fixed_pos_embed=fixed
    )
  if pos_embed == 'sincos':
    other = {**loaded, 'pos_embed': loaded['pos_embed'] + 1}
    with pytest.raises(ValueError, match=r"^pos_embed: .*pos_embed='learned'"):
      convert.load_timm_vit(variables['params'], other, fixed_pos_embed=fixed)


def _torch_vit_pooled(torch, sd, x, spec):
  """timm's VisionTransformer forward (global_pool='avg', fc_norm=False), by hand: a stride-p
  patch conv, class token and positions added, pre-norm blocks with fused qkv attention and an
  exact-GELU MLP, the final LayerNorm (eps 1e-6) on every token, the mean of the patch tokens."""
  F = torch.nn.functional
  t = {k: torch.from_numpy(v) for k, v in sd.items()}
  d, heads, eps = spec['width'], spec['heads'], 1e-6
  y = F.conv2d(
    torch.from_numpy(x.transpose(0, 3, 1, 2)),
    t['patch_embed.proj.weight'],
    t['patch_embed.proj.bias'],
    stride=spec['patch_size'],
  )
  y = y.flatten(2).transpose(1, 2)
  b, n = y.shape[0], y.shape[1] + 1
  y = torch.cat([t['cls_token'].expand(b, -1, -1), y], 1) + t['pos_embed']
  for i in range(spec['depth']):
    w = lambda name: (t[f'blocks.{i}.{name}.weight'], t[f'blocks.{i}.{name}.bias'])
    h = F.layer_norm(y, (d,), *w('norm1'), eps)
    q, k, v = F.linear(h, *w('attn.qkv')).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1) @ v
    y = y + F.linear(a.transpose(1, 2).reshape(b, n, d), *w('attn.proj'))
    h = F.layer_norm(y, (d,), *w('norm2'), eps)
    y = y + F.linear(F.gelu(F.linear(h, *w('mlp.fc1'))), *w('mlp.fc2'))
  y = F.layer_norm(y, (d,), t['norm.weight'], t['norm.bias'], eps)
  return y[:, 1:].mean(1)


@pytest.mark.parametrize('pos_embed,channels', [('sincos', 3), ('learned', 1)])
def test_torch_vit_from_the_export_matches_the_flax_forward(pos_embed, channels, tmp_path):
  torch = pytest.importorskip('torch')
  model, variables = _vit_variables(pos_embed, channels, seed=2)
  path = str(tmp_path / 'vit.safetensors')
  sd = convert.flax_to_timm_vit(variables['params'], pos_embed=export.vit_pos_embed(model, 32))
  convert.save_safetensors(path, sd)
  x = np.random.default_rng(0).standard_normal((2, 32, 32, channels)).astype(np.float32)
  with torch.no_grad():
    want = _torch_vit_pooled(torch, convert.load_safetensors(path), x, VIT).numpy()
  with jax.default_matmul_precision('highest'):
    got = jax.jit(lambda v, x: model.apply(v, x)['pooled'])(variables, x)
  rel = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
  print(f'vit ({pos_embed}, {channels} ch) pooled max rel diff vs torch = {rel:.2e}')
  assert want.shape == (2, VIT['width']) and rel <= 1e-4


@pytest.fixture(scope='module')
def mae_workdir(tmp_path_factory):
  """A tiny X-ray MAE workdir (ViT of 1 block of 16, patch 8, 32 px), nothing compiled."""
  from tests.test_mae import mae_workdir as make

  base = tmp_path_factory.mktemp('export_mae')
  return make(str(base / 'mae'), str(base / 'data'))


def test_cli_exports_an_mae_vit_both_ways(mae_workdir, tmp_path):
  out = str(tmp_path / 'xray_vit.safetensors')
  done = _cli(f'--workdir={mae_workdir}', '--modality=xray', f'--out={out}')
  assert done.returncode == 0, done.stderr[-2000:]
  meta = convert.read_safetensors_metadata(out)
  assert meta['layout'].startswith('timm.models.vision_transformer') and meta['method'] == 'mae'
  kwargs = json.loads(meta['timm_kwargs'])
  assert {k: kwargs[k] for k in ('img_size', 'patch_size', 'in_chans', 'embed_dim', 'depth')} == {
    'img_size': 32,
    'patch_size': 8,
    'in_chans': 1,
    'embed_dim': 16,
    'depth': 1,
  }
  assert (kwargs['global_pool'], kwargs['fc_norm'], kwargs['num_classes']) == ('avg', False, 0)
  encoder, variables = restore.encoder_variables(restore.load_variables(mae_workdir), 'xray')
  back = convert.load_timm_vit(
    variables['params'],
    convert.load_safetensors(out),
    fixed_pos_embed=export.vit_pos_embed(encoder, 32),
  )
  _assert_bitwise(back, variables['params'])

  jax_out = str(tmp_path / 'xray_vit.jax')
  sidecar = export.export_stablehlo(mae_workdir, 'xray', jax_out)
  assert sidecar['outputs'] == {'pooled': ['b', 16]} and sidecar['function'].startswith('ViT')
  exported = jax.export.deserialize(bytearray(open(jax_out, 'rb').read()))
  x = np.random.default_rng(0).uniform(0, 1, (3, 32, 32, 1)).astype(np.float32)
  want = jax.jit(lambda v, x: encoder.apply(v, x)['pooled'])({'params': variables['params']}, x)
  np.testing.assert_allclose(np.asarray(exported.call(x)), want, rtol=1e-6, atol=1e-6)
  with pytest.raises(
    ValueError, match=r'^--image_size=36: must be a positive multiple of the patch'
  ):
    export.export_stablehlo(mae_workdir, 'xray', jax_out, image_size=36)


def test_a_finetuned_encoder_exports_without_its_head(tmp_path):
  from aacp_jax import checkpoint, experiments, sharding
  from aacp_jax import workdir as workdir_lib
  from aacp_jax.train import state as state_lib

  # A fine-tuning workdir as a run leaves it (config.json, a checkpoint), ResNet-18 width 4.
  c = tiny('phantom_xray_cls', **{'data.root': str(tmp_path / 'data')})
  c.model.depth, c.model.width = 18, 4
  c.modalities, c.data.shares = ('xray',), {'xray': 1.0}
  experiment = experiments.get('finetune')
  model = experiment.build_model(c)
  tx, _ = finetune.make_optimizer(c, 2)
  state, _ = state_lib.create_state(
    model, tx, sharding.make_mesh(), experiment.dummy_inputs(c), seed=3
  )
  path = str(tmp_path / 'ft')
  os.makedirs(path)
  workdir_lib.write_config(c, path)
  ckpt = checkpoint.Checkpointer(os.path.join(path, 'checkpoints'), every_steps=1, keep=1)
  ckpt.save(2, state, force=True)
  ckpt.close()
  out = str(tmp_path / 'ft.safetensors')
  meta = export.export_safetensors(path, 'xray', out)
  assert (meta['experiment'], meta['task'], meta['depth']) == ('finetune', 'phantom_xray_cls', '18')
  sd = convert.load_safetensors(out)
  assert set(sd) == set(_torch_keys(18)) and 'fc.weight' not in sd  # no task head
  r = restore.load_variables(path)
  encoder, variables = restore.encoder_variables(r, 'xray')
  _assert_bitwise(convert.torchvision_to_flax(sd, in_channels=1), variables)
  with pytest.raises(ValueError, match=r'^--modality=ct: the workdir'):
    export.export_safetensors(path, 'ct', out)
