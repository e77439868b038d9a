"""Import torchvision (or timm, same key layout) ResNet weights into `aacp_jax.models.resnet.ResNet`,
and export them back; the same both ways for the ViT (`models.vit.ViT`) in timm's VisionTransformer
layout (`flax_to_timm_vit`, `load_timm_vit`, at the end).

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
import os
import re
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


# ---- the other way: Flax ResNet -> torchvision state dict -> .safetensors ----

_BN_TORCH = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias'}
_BN_TORCH.update({('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'})


# The modules of a torchvision ResNet as flax names: stem, blocks, classifier.
_RESNET_MODULE = re.compile(
  r'(conv1|bn1|fc|layer[1-4]_\d+/(conv[1-3]|bn[1-3]|downsample_(conv|bn)))'
)


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  """(collection, flax path) -> torch key: the inverse of `_flax_path`."""
  *mods, leaf = path
  if not _RESNET_MODULE.fullmatch('/'.join(mods)):
    raise ValueError(f'{collection}/{"/".join(path)}: not a leaf of a torchvision ResNet')
  parts: list[str] = []
  for m in mods:
    stage, _, block = m.partition('_')
    if stage.startswith('layer') and block.isdigit():
      parts += [stage, block]
    elif m in ('downsample_conv', 'downsample_bn'):
      parts += ['downsample', '0' if m == 'downsample_conv' else '1']
    else:
      parts.append(m)
  name = mods[-1] if mods else ''
  if name.startswith('bn') or name == 'downsample_bn':
    torch_leaf = _BN_TORCH.get((collection, leaf))
  elif collection == 'params':
    torch_leaf = {'kernel': 'weight', 'bias': 'bias'}.get(leaf)
  else:
    torch_leaf = None
  if torch_leaf is None:
    raise ValueError(f'{collection}/{"/".join(path)}: not a leaf of a torchvision ResNet')
  return '.'.join(parts + [torch_leaf])


def flax_to_torchvision(
  variables: Mapping[str, Any], *, num_batches_tracked: int = 0
) -> dict[str, np.ndarray]:
  """A `resnet.ResNet`'s {'params', 'batch_stats'} -> torchvision's flat state dict (NumPy).

  The inverse of `torchvision_to_flax`: conv HWIO -> OIHW, `fc` (in, out) -> (out, in), BN
  scale/bias -> weight/bias, mean/var -> running_mean/running_var, plus the
  `num_batches_tracked` counter torch keeps per BN (int64; torch's eval ignores it). conv1 keeps
  its own input channels (64 for CT, 1 for X-ray): nothing is adapted on the way out. Values keep
  their dtype and bits, so export -> `load_torchvision_resnet` is the identity.
  """
  out: dict[str, np.ndarray] = {}
  for collection in ('params', 'batch_stats'):
    for path, value in sorted(_flatten(variables.get(collection, {})).items()):
      key = _torch_key(collection, path)
      value = np.asarray(value)
      if value.ndim == 4:  # conv HWIO -> OIHW
        value = value.transpose(3, 2, 0, 1)
      elif value.ndim == 2:  # linear (in, out) -> (out, in)
        value = value.T
      out[key] = np.ascontiguousarray(value)
      if key.endswith('.running_mean'):
        counter = key[: -len('running_mean')] + 'num_batches_tracked'
        out[counter] = np.array(num_batches_tracked, np.int64)
  return out


_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def _st_dtype(name: str, value: np.ndarray) -> str:
  if value.dtype.name == 'bfloat16':
    return 'BF16'
  if value.dtype.newbyteorder('=') not in _ST_NAMES:
    raise ValueError(f'tensor {name!r}: dtype {value.dtype} has no safetensors name')
  return _ST_NAMES[value.dtype.newbyteorder('=')]


def save_safetensors(
  path: str, state_dict: StateDict, metadata: Mapping[str, str] | None = None
) -> None:
  """Writes a flat state dict as `.safetensors` (the format `load_safetensors` reads), NumPy only.

  Tensors are laid out in key order, little-endian; `metadata` (strings only, as the format
  requires) goes to `__metadata__`. The header is padded with spaces to a multiple of 8 bytes, as
  the reference writer does, so every tensor starts 8-byte aligned. The file appears whole or not
  at all (written beside it, then renamed).
  """
  metadata = dict(metadata or {})
  for k, v in metadata.items():
    if not isinstance(k, str) or not isinstance(v, str):
      raise ValueError(f'{path}: safetensors metadata must be strings, got {k!r}: {v!r}')
  header: dict[str, Any] = {'__metadata__': metadata} if metadata else {}
  blobs, offset = [], 0
  for name in sorted(state_dict):
    value = np.asarray(state_dict[name])
    dtype = _st_dtype(name, value)
    if value.dtype.byteorder == '>':
      value = value.astype(value.dtype.newbyteorder('<'))
    blob = np.ascontiguousarray(value).tobytes()
    header[name] = {
      'dtype': dtype,
      'shape': list(value.shape),
      'data_offsets': [offset, offset + len(blob)],
    }
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-(8 + len(text)) % 8)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(len(text).to_bytes(8, 'little'))
      f.write(text)
      for blob in blobs:
        f.write(blob)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_safetensors_metadata(path: str) -> dict[str, str]:
  """The `__metadata__` strings of a `.safetensors` file ({} when it has none)."""
  with open(path, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    return dict(json.loads(f.read(n)).get('__metadata__', {}))


# ---- ViT (`models.vit.ViT`) <-> timm's VisionTransformer key layout ----

# flax module path -> timm module, and back; a block's attention and MLP are one level deeper in
# timm (`blocks.3.attn.qkv`, `blocks.3.mlp.fc1`) than in our Block (`block3/attn/qkv`, `block3/fc1`).
_VIT_TO_TIMM = (
  (re.compile(r'patch_embed'), 'patch_embed.proj'),
  (re.compile(r'block(\d+)/(norm1|norm2)'), r'blocks.\1.\2'),
  (re.compile(r'block(\d+)/attn/(qkv|proj)'), r'blocks.\1.attn.\2'),
  (re.compile(r'block(\d+)/(fc1|fc2)'), r'blocks.\1.mlp.\2'),
  (re.compile(r'norm'), 'norm'),
)
_TIMM_TO_VIT = (
  (re.compile(r'patch_embed\.proj'), 'patch_embed'),
  (re.compile(r'blocks\.(\d+)\.(norm1|norm2)'), r'block\1/\2'),
  (re.compile(r'blocks\.(\d+)\.attn\.(qkv|proj)'), r'block\1/attn/\2'),
  (re.compile(r'blocks\.(\d+)\.mlp\.(fc1|fc2)'), r'block\1/\2'),
  (re.compile(r'norm'), 'norm'),
)
_VIT_TOKENS = ('cls_token', 'pos_embed')


def _sub(table, name: str) -> str | None:
  for pattern, replacement in table:
    if pattern.fullmatch(name):
      return pattern.sub(replacement, name)
  return None


def flax_to_timm_vit(params: Mapping[str, Any], *, pos_embed=None) -> dict[str, np.ndarray]:
  """A `vit.ViT`'s params -> timm's VisionTransformer state dict (NumPy), no head.

  Conv HWIO -> OIHW (`patch_embed.proj.weight` (D, C, p, p)); Dense (in, out) -> torch Linear
  (out, in) (`blocks.i.attn.qkv.weight` (3D, D), rows q, k, v as our qkv Dense's outputs and
  timm's reshape(B, N, 3, heads, D/heads) both read them); LayerNorm scale -> weight;
  `cls_token` (D,) -> (1, 1, D); `pos_embed` (1 + N, D) -> (1, 1 + N, D), class token's row first.
  A fixed (sin-cos) position embedding is no parameter: pass it as `pos_embed` ((1 + N, D), the
  class token's zero row first, `vit.sincos_2d`), since timm's layout has it as a tensor. Values
  keep their dtype and bits, so export -> `load_timm_vit` is the identity.
  """
  flat = _flatten(params)
  if ('pos_embed',) in flat and pos_embed is not None:
    raise ValueError('pos_embed: the ViT learned its own; pass no fixed one')
  if ('pos_embed',) not in flat:
    if pos_embed is None:
      raise ValueError('pos_embed: a fixed (sin-cos) ViT needs its position embedding passed')
    flat[('pos_embed',)] = pos_embed
  out: dict[str, np.ndarray] = {}
  for path, value in sorted(flat.items()):
    value = np.asarray(value)
    if len(path) == 1 and path[0] in _VIT_TOKENS:
      out[path[0]] = np.ascontiguousarray(value.reshape((1,) * (3 - value.ndim) + value.shape))
      continue
    *mods, leaf = path
    module = _sub(_VIT_TO_TIMM, '/'.join(mods))
    norm = bool(mods) and mods[-1].startswith('norm')
    if leaf == 'bias':
      torch_leaf = 'bias'
    else:
      torch_leaf = 'weight' if leaf == ('scale' if norm else 'kernel') else None
    if module is None or torch_leaf is None:
      raise ValueError(f'params/{"/".join(path)}: not a leaf of a timm VisionTransformer')
    if value.ndim == 4:  # conv HWIO -> OIHW
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:  # Dense (in, out) -> Linear (out, in)
      value = value.T
    out[f'{module}.{torch_leaf}'] = np.ascontiguousarray(value)
  return out


def timm_vit_to_flax(state_dict: StateDict, *, prefix: str = '') -> dict[str, Any]:
  """timm VisionTransformer state dict -> {'params': ...} of `vit.ViT` (the inverse of
  `flax_to_timm_vit`; `pos_embed` comes back as (1 + N, D) whatever its kind, the classifier
  `head.*` is dropped). `prefix` is stripped; keys without it are ignored. Values keep their
  dtype. Keys with no place in our ViT (timm's `fc_norm`, register tokens, layer scale, ...)
  are errors naming the key: such a model computes something else."""
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    key = key[len(prefix) :]
    value = np.asarray(value)
    if key.startswith('head.'):
      continue
    if key in _VIT_TOKENS:
      if value.ndim != 3 or value.shape[0] != 1 or (key == 'cls_token' and value.shape[1] != 1):
        raise ValueError(f'{key}: shape {value.shape}, expected (1, 1, D) / (1, 1 + N, D)')
      flat[(key,)] = value[0, 0] if key == 'cls_token' else value[0]
      continue
    module, _, leaf = key.rpartition('.')
    path = _sub(_TIMM_TO_VIT, module)
    norm = path is not None and path.split('/')[-1].startswith('norm')
    flax_leaf = {'weight': 'scale' if norm else 'kernel', 'bias': 'bias'}.get(leaf)
    if path is None or flax_leaf is None:
      raise ValueError(f'{prefix}{key}: not a leaf of our ViT (models/vit.py)')
    if value.ndim == 4:  # conv OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
      value = value.T
    flat[tuple(path.split('/')) + (flax_leaf,)] = np.ascontiguousarray(value)
  return {'params': _unflatten(flat)}


def load_timm_vit(
  params: Mapping[str, Any], state_dict: StateDict, *, fixed_pos_embed=None, prefix: str = ''
) -> dict[str, Any]:
  """`params` (a `vit.ViT`'s) with every leaf from a timm-layout `state_dict`.

  Every target leaf must be covered and every source tensor used, with matching shapes, errors
  naming the key. A fixed (sin-cos) target has no `pos_embed` parameter: the file's must then
  equal `fixed_pos_embed` ((1 + N, D)) bit for bit after the cast to its dtype, since a learned
  one silently dropped would change the model (import it into `pos_embed='learned'` instead).
  """
  target = _flatten(params)
  source = _flatten(timm_vit_to_flax(state_dict, prefix=prefix)['params'])
  if ('pos_embed',) not in target and ('pos_embed',) in source:
    got = source.pop(('pos_embed',))
    want = None if fixed_pos_embed is None else np.asarray(fixed_pos_embed)
    if want is None or got.shape != want.shape or not np.array_equal(got.astype(want.dtype), want):
      raise ValueError(
        "pos_embed: the state dict holds a position embedding other than the model's fixed "
        "sin-cos one; use model.vit.pos_embed='learned' to load it"
      )
  missing = sorted('/'.join(p) for p in set(target) - set(source))
  extra = sorted('/'.join(p) for p in set(source) - set(target))
  if missing or extra:
    raise ValueError(
      f'params: state dict does not fit the ViT; missing {missing[:5]} ({len(missing)}), '
      f'unexpected {extra[:5]} ({len(extra)})'
    )
  for path, t in target.items():
    if tuple(source[path].shape) != tuple(t.shape):
      raise ValueError(
        f'params/{"/".join(path)}: shape {source[path].shape} from the state dict, model '
        f'expects {tuple(t.shape)}'
      )
    source[path] = source[path].astype(t.dtype)
  return _unflatten(source)
