"""torchvision -> Flax ResNet import: key mapping, conv1 adaptation, file loaders, torch oracle."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from aacp_jax.models import convert
from aacp_jax.models.encoders import AACPModel
from aacp_jax.models.resnet import DEPTHS, ResNet
from tests import torch_resnet


def _target(model, channels, size=32):
  """Model variables as ShapeDtypeStructs: the import needs shapes only, so nothing is initialised."""
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _torch_keys(depth, num_classes=None):
  """torchvision's state-dict key names for resnet{depth}, written out independently of convert."""
  kind, blocks = DEPTHS[depth]
  convs = ('conv1', 'conv2') if kind == 'basic' else ('conv1', 'conv2', 'conv3')
  bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
  keys = ['conv1.weight'] + [f'bn1.{b}' for b in bn]
  for s, n in enumerate(blocks):
    for i in range(n):
      p = f'layer{s + 1}.{i}'
      for j, c in enumerate(convs):
        keys += [f'{p}.{c}.weight'] + [f'{p}.bn{j + 1}.{b}' for b in bn]
      if i == 0 and (s > 0 or kind == 'bottleneck'):
        keys += [f'{p}.downsample.0.weight'] + [f'{p}.downsample.1.{b}' for b in bn]
  if num_classes:
    keys += ['fc.weight', 'fc.bias']
  return keys


def _fake_state_dict(depth, width, num_classes, rng, in_channels=3):
  """A torchvision-layout state dict with random values, shapes derived from the Flax target."""
  target = _target(ResNet(depth=depth, width=width, num_classes=num_classes), in_channels)
  flat = {}
  for key in _torch_keys(depth, num_classes):
    *mods, leaf = key.split('.')
    path = []
    for m in mods:
      if m.isdigit() and path and path[-1].startswith('layer'):
        path[-1] = f'{path[-1]}_{m}'
      elif m.isdigit():
        path[-1] = {'0': 'downsample_conv', '1': 'downsample_bn'}[m]
      else:
        path.append(m)
    if leaf == 'num_batches_tracked':
      flat[key] = np.array(7, np.int64)
      continue
    coll = 'batch_stats' if leaf.startswith('running') else 'params'
    node = target[coll]
    for p in path:
      node = node[p]
    name = {'running_mean': 'mean', 'running_var': 'var'}.get(leaf)
    if name is None:
      name = ('kernel' if 'kernel' in node else 'scale') if leaf == 'weight' else 'bias'
    shape = node[name].shape
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
      if key == 'conv1.weight':
        shape = (shape[0], 3, shape[2], shape[3])
    elif len(shape) == 2:
      shape = shape[::-1]
    value = rng.standard_normal(shape).astype(np.float32)
    flat[key] = np.abs(value) + 0.5 if leaf == 'running_var' else value
  return flat


def test_torchvision_key_counts():
  # len(torchvision.models.resnet{18,50}().state_dict()), num_batches_tracked included.
  assert len(_torch_keys(18, 1000)) == 122
  assert len(_torch_keys(50, 1000)) == 320


@pytest.mark.parametrize('depth', [18, 50])
def test_import_places_every_tensor(depth):
  sd = _fake_state_dict(depth, 8, 10, np.random.default_rng(0))
  target = _target(ResNet(depth=depth, width=8, num_classes=10), 3)
  loaded = convert.load_torchvision_resnet(target, sd)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(target)
  p, bs = loaded['params'], loaded['batch_stats']
  block = 'layer2_0'
  np.testing.assert_array_equal(p['conv1']['kernel'], sd['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
    p[block]['conv2']['kernel'], sd['layer2.0.conv2.weight'].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    p[block]['downsample_conv']['kernel'][0, 0], sd['layer2.0.downsample.0.weight'][:, :, 0, 0].T
  )
  np.testing.assert_array_equal(
    p[block]['downsample_bn']['scale'], sd['layer2.0.downsample.1.weight']
  )
  np.testing.assert_array_equal(bs[block]['bn1']['mean'], sd['layer2.0.bn1.running_mean'])
  np.testing.assert_array_equal(bs[block]['bn1']['var'], sd['layer2.0.bn1.running_var'])
  np.testing.assert_array_equal(p['fc']['kernel'], sd['fc.weight'].T)
  np.testing.assert_array_equal(p['fc']['bias'], sd['fc.bias'])


def test_import_checks_fit():
  sd = _fake_state_dict(18, 8, 10, np.random.default_rng(0))
  # Headless target: fc is dropped, everything else must fit.
  headless = convert.load_torchvision_resnet(_target(ResNet(depth=18, width=8), 3), sd)
  assert 'fc' not in headless['params']
  broken = dict(sd)
  del broken['layer3.1.bn2.running_var']
  with pytest.raises(ValueError, match='layer3_1/bn2/var'):
    convert.load_torchvision_resnet(_target(ResNet(depth=18, width=8), 3), broken)
  with pytest.raises(ValueError, match='missing'):  # a ResNet-18 checkpoint into a ResNet-34
    convert.load_torchvision_resnet(_target(ResNet(depth=34, width=8), 3), sd)
  with pytest.raises(ValueError, match='params/fc/'):  # 10-class checkpoint, 5-class model
    convert.load_torchvision_resnet(_target(ResNet(depth=18, width=8, num_classes=5), 3), sd)
  with pytest.raises(ValueError, match='shape'):  # width 8 checkpoint, width 16 model
    convert.load_torchvision_resnet(_target(ResNet(depth=18, width=16), 3), sd)
  prefixed = {f'module.{k}': v for k, v in sd.items()}
  loaded = convert.load_torchvision_resnet(
    _target(ResNet(depth=18, width=8), 3), prefixed, prefix='module.'
  )
  np.testing.assert_array_equal(loaded['params']['bn1']['bias'], sd['bn1.bias'])


def test_adapt_conv1():
  w = np.random.default_rng(0).standard_normal((8, 3, 7, 7)).astype(np.float32)
  assert convert.adapt_conv1(w, 3) is w
  for c in (1, 64):
    a = convert.adapt_conv1(w, c)
    assert a.shape == (8, c, 7, 7)
    # Total filter mass per output channel is preserved: a grey image repeated over C channels
    # gives exactly the RGB response to (g, g, g).
    np.testing.assert_allclose(a.sum(axis=1), w.sum(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[:, 0], a[:, -1])
  np.testing.assert_allclose(convert.adapt_conv1(w, 1)[:, 0], w.sum(axis=1), rtol=1e-5, atol=1e-6)


def test_encoder_import_for_ct():
  model = AACPModel(modalities=('ct', 'xray'), depth=18, width=8, projector=(16, 8))
  images = {
    'ct': jax.ShapeDtypeStruct((2, 32, 32, 64), jnp.float32),
    'xray': jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32),
  }
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  sd = _fake_state_dict(18, 8, 1000, np.random.default_rng(1))
  loaded = convert.load_torchvision_encoder(variables, sd, 'ct')
  kernel = loaded['params']['encoder_ct']['conv1']['kernel']
  assert kernel.shape == (7, 7, 64, 8)
  expected = convert.adapt_conv1(sd['conv1.weight'], 64).transpose(2, 3, 1, 0)
  np.testing.assert_allclose(kernel, expected)
  assert loaded['params']['encoder_xray'] is variables['params']['encoder_xray']
  assert loaded['params']['projector'] is variables['params']['projector']


def test_file_loaders(tmp_path):
  sd = {
    'conv1.weight': np.arange(6, dtype=np.float32).reshape(1, 2, 3),
    'bn1.num_batches_tracked': np.array(3, np.int64),
    'fc.bias': np.array([1.5, -2.0], ml_dtypes.bfloat16),
  }
  np.savez(tmp_path / 'w.npz', **{k: v for k, v in sd.items() if k != 'fc.bias'})
  npz = convert.load_npz(str(tmp_path / 'w.npz'))
  np.testing.assert_array_equal(npz['conv1.weight'], sd['conv1.weight'])
  np.savez(tmp_path / 'bad.npz', x=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError):  # object arrays would need pickle
    convert.load_npz(str(tmp_path / 'bad.npz'))

  # A .safetensors file written by hand to the published format.
  names = {
    np.dtype(np.float32): 'F32',
    np.dtype(np.int64): 'I64',
    np.dtype(ml_dtypes.bfloat16): 'BF16',
  }
  header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for k, v in sd.items():
    b = v.tobytes()
    header[k] = {
      'dtype': names[v.dtype],
      'shape': list(v.shape),
      'data_offsets': [offset, offset + len(b)],
    }
    blobs.append(b)
    offset += len(b)
  h = json.dumps(header).encode()
  (tmp_path / 'w.safetensors').write_bytes(len(h).to_bytes(8, 'little') + h + b''.join(blobs))
  st = convert.load_safetensors(str(tmp_path / 'w.safetensors'))
  assert set(st) == set(sd)
  for k in sd:
    assert st[k].dtype == sd[k].dtype and st[k].shape == sd[k].shape
    np.testing.assert_array_equal(st[k].astype(np.float32), sd[k].astype(np.float32))


# ---- torch oracle: a torchvision-layout ResNet built from torch.nn (torchvision is not installed) ----


# The builder lives in tests/torch_resnet.py, shared with tests/test_export.py.
_torch_resnet, _randomise_bn = torch_resnet.torch_resnet, torch_resnet.randomise_bn


@pytest.mark.parametrize('depth', [18, 50])
def test_matches_torch(depth):
  torch = pytest.importorskip('torch')
  torch.manual_seed(depth)
  net = _torch_resnet(torch, depth, num_classes=10)
  assert set(net.state_dict()) == set(_torch_keys(depth, 10))
  x = torch.randn(2, 3, 32, 32)
  net = _randomise_bn(torch, net)
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  model = ResNet(depth=depth, num_classes=10)
  variables = convert.load_torchvision_resnet(_target(model, 3), sd)
  xf = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  with torch.no_grad():
    expected = net(x).numpy()
  # "highest": on GPUs float32 convs may otherwise run in TF32 and miss 1e-4 for reasons not ours.
  with jax.default_matmul_precision('highest'):
    got = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])(variables, xf)
  diff = float(np.max(np.abs(np.asarray(got) - expected)))
  print(
    f'resnet{depth} eval max|logits diff| = {diff:.2e} (|logits| max {np.abs(expected).max():.2f})'
  )
  assert diff < 1e-4

  if depth == 18:
    # Train mode: both normalise with the batch's own (biased) statistics. A larger batch, as at
    # 2 x 32 x 32 layer4 normalises over 2 numbers and float32 rounding is amplified.
    xt = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
      expected_train = net.train()(xt).numpy()
    with jax.default_matmul_precision('highest'):
      got_train, updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])
      )(variables, jnp.asarray(xt.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got_train['logits'], expected_train, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
      updates['batch_stats']['bn1']['mean'], net.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-5
    )
    # Single-channel input through the adapted conv1 == RGB net on the grey image repeated.
    grey = x[:, :1]
    with torch.no_grad():
      expected_grey = net.eval()(grey.repeat(1, 3, 1, 1)).numpy()
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}  # stats moved in train
    variables1 = convert.load_torchvision_resnet(_target(model, 1), sd)
    with jax.default_matmul_precision('highest'):
      got_grey = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])(
        variables1, jnp.asarray(grey.numpy().transpose(0, 2, 3, 1))
      )
    np.testing.assert_allclose(got_grey, expected_grey, rtol=1e-4, atol=1e-4)
