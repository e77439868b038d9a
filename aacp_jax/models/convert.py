"""Import torchvision (or timm, same key layout) ResNet weights into `aacp_jax.models.resnet.ResNet`.

Weights arrive as a flat `{torch key: np.ndarray}` state dict read from `.npz` or `.safetensors`
(no pickle, no torch at run time). To produce one from a torchvision checkpoint, once, offline:

    sd = torchvision.models.resnet50(weights="IMAGENET1K_V2").state_dict()
    np.savez("resnet50.npz", **{k: v.numpy() for k, v in sd.items()})

Key mapping (torch -> flax): `layer1.0.conv1.weight` -> params/layer1_0/conv1/kernel with OIHW ->
HWIO; `*.downsample.0` -> `downsample_conv`, `*.downsample.1` -> `downsample_bn`; BN weight/bias ->
scale/bias, running_mean/var -> batch_stats mean/var; `fc.weight` (out, in) -> fc/kernel (in, out).

Inputs with C != 3 channels (CT 2.5D stacks 64, X-ray 1): conv1 becomes the mean of its RGB filters
repeated C times and scaled by 3 / C. The sum over input channels is then the sum of the RGB
filters, so an input whose channels all equal a grey image g gives exactly the pretrained response
to the RGB image (g, g, g), and activation scale is preserved for any C (the usual trick, e.g. timm's
`adapt_input_conv`, which sums for C = 1; identical there).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

StateDict = Mapping[str, np.ndarray]

_BN_LEAVES = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Flat state dict from an `.npz` (allow_pickle=False: object arrays are refused)."""
  with np.load(path, allow_pickle=False) as data:
    return {k: np.asarray(data[k]) for k in data.files}


_ST_DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """Flat state dict from a `.safetensors` file, read with NumPy alone.

  Format: u64 little-endian header length, JSON header {name: {dtype, shape, data_offsets}},
  then the raw little-endian buffer. Avoids a dependency for one simple format.
  """
  with open(path, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(n))
    buf = f.read()
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] == 'BF16':
      import ml_dtypes  # shipped with jax

      dtype = np.dtype(ml_dtypes.bfloat16)
    elif info['dtype'] in _ST_DTYPES:
      dtype = np.dtype(_ST_DTYPES[info['dtype']]).newbyteorder('<')
    else:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    start, end = info['data_offsets']
    out[name] = np.frombuffer(buf[start:end], dtype=dtype).reshape(info['shape']).copy()
  return out


def adapt_conv1(weight: np.ndarray, in_channels: int) -> np.ndarray:
  """(O, 3, kh, kw) RGB filters -> (O, in_channels, kh, kw); see the module docstring."""
  if weight.shape[1] == in_channels:
    return weight
  if weight.shape[1] != 3:
    raise ValueError(f'conv1 adaptation expects RGB filters, got shape {weight.shape}')
  mean = weight.mean(axis=1, keepdims=True)
  return np.repeat(mean, in_channels, axis=1) * (3.0 / in_channels)


def _flax_path(key: str) -> tuple[str, tuple[str, ...]] | None:
  """torch key -> (collection, flax path), or None for keys with no flax counterpart."""
  *mods, leaf = key.split('.')
  if leaf == 'num_batches_tracked':
    return None
  path: list[str] = []
  i = 0
  while i < len(mods):
    m = mods[i]
    if m.startswith('layer') and i + 1 < len(mods) and mods[i + 1].isdigit():
      path.append(f'{m}_{mods[i + 1]}')
      i += 2
    elif m == 'downsample' and i + 1 < len(mods):
      path.append({'0': 'downsample_conv', '1': 'downsample_bn'}[mods[i + 1]])
      i += 2
    else:
      path.append(m)
      i += 1
  name = path[-1] if path else ''
  if name.startswith('bn') or name == 'downsample_bn':
    if leaf not in _BN_LEAVES:
      raise ValueError(f'unexpected BatchNorm entry {key!r}')
    collection, flax_leaf = _BN_LEAVES[leaf]
  elif leaf == 'weight':
    collection, flax_leaf = 'params', 'kernel'
  elif leaf == 'bias':
    collection, flax_leaf = 'params', 'bias'
  else:
    raise ValueError(f'unexpected state-dict entry {key!r}')
  return collection, tuple(path) + (flax_leaf,)


def torchvision_to_flax(
  state_dict: StateDict, *, in_channels: int = 3, include_fc: bool = True, prefix: str = ''
) -> dict[str, Any]:
  """Convert a torchvision ResNet state dict -> {'params': ..., 'batch_stats': ...} (float32 NumPy).

  `prefix` (e.g. 'module.' from DDP) is stripped; keys without it are ignored.
  """
  out: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    key = key[len(prefix) :]
    if key.startswith('fc.') and not include_fc:
      continue
    mapped = _flax_path(key)
    if mapped is None:
      continue
    collection, path = mapped
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 4:  # conv OIHW -> HWIO
      if key == 'conv1.weight':
        value = adapt_conv1(value, in_channels)
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:  # linear (out, in) -> (in, out)
      value = value.T
    node = out[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def load_torchvision_resnet(
  variables: Mapping[str, Any], state_dict: StateDict, *, prefix: str = ''
) -> dict[str, Any]:
  """Return `variables` (a ResNet's {'params', 'batch_stats'}) with every leaf from `state_dict`.

  Input channels come from the target's conv1 kernel; the `fc` head is loaded only if the target
  has one (a different class count is an error: drop it via a headless target). Every target leaf
  must be covered and every source tensor used, with matching shapes; errors name the key, so a
  ResNet-50 checkpoint cannot half-load into a ResNet-18.
  """
  target = {c: _flatten(variables[c]) for c in ('params', 'batch_stats')}
  in_channels = target['params'][('conv1', 'kernel')].shape[2]
  has_fc = ('fc', 'kernel') in target['params']
  source = torchvision_to_flax(
    state_dict, in_channels=in_channels, include_fc=has_fc, prefix=prefix
  )
  result = {}
  for c in ('params', 'batch_stats'):
    src = _flatten(source[c])
    missing = sorted('/'.join(p) for p in set(target[c]) - set(src))
    extra = sorted('/'.join(p) for p in set(src) - set(target[c]))
    if missing or extra:
      raise ValueError(
        f'{c}: state dict does not fit the model; missing {missing[:5]} '
        f'({len(missing)}), unexpected {extra[:5]} ({len(extra)})'
      )
    for path, t in target[c].items():
      if tuple(src[path].shape) != tuple(t.shape):
        raise ValueError(
          f'{c}/{"/".join(path)}: shape {src[path].shape} from the state '
          f'dict, model expects {tuple(t.shape)}'
        )
      src[path] = src[path].astype(t.dtype)
    result[c] = _unflatten(src)
  return {**variables, **result}


def load_torchvision_encoder(
  variables: Mapping[str, Any], state_dict: StateDict, modality: str, *, prefix: str = ''
) -> dict[str, Any]:
  """AACPModel variables with `encoder_<modality>` replaced by the imported backbone."""
  name = f'encoder_{modality}'
  sub = {c: variables[c][name] for c in ('params', 'batch_stats')}
  loaded = load_torchvision_resnet(sub, state_dict, prefix=prefix)
  return {**variables, **{c: {**variables[c], name: loaded[c]} for c in ('params', 'batch_stats')}}
