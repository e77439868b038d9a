"""Weights out: one modality's encoder of a pretraining (or fine-tuning) workdir, for the PyTorch
ecosystem or as a self-contained inference program.

  python -m aacp_jax.export --workdir=DIR --modality=ct --out=ct_resnet.safetensors
  python -m aacp_jax.export --workdir=DIR --modality=ct --format=stablehlo --out=ct_resnet.jax

- `--format=safetensors` (the default): the encoder (`restore.encoder_variables`) as a flat
  state dict in torchvision's ResNet key layout (`convert.flax_to_torchvision`: conv1 keeps the
  modality's own input channels, 64 for CT, 1 for X-ray; no `fc`, the encoder has none), written
  with NumPy (`convert.save_safetensors`). `__metadata__` holds strings: modality, in_channels,
  depth, width, num_features, method, the source workdir and step, code_version, preprocessing.
  Load it in torch with `safetensors.torch.load_file` into a torchvision-layout ResNet whose
  conv1 takes `in_channels` (`torchvision.models.resnet50(); model.conv1 = nn.Conv2d(64, 64, 7,
  2, 3, bias=False); model.fc = nn.Identity()` for CT), or back here with
  `convert.load_torchvision_encoder` / `init=imagenet:PATH`: the round trip is bitwise.
  A ViT encoder (`model.arch='vit'`, MAE's) goes out in timm's VisionTransformer layout instead
  (`convert.flax_to_timm_vit`: `patch_embed.proj`, `cls_token`, `pos_embed` (1, 1 + N, D) for the
  workdir's image size, the fixed sin-cos one written as a tensor, `blocks.i.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`; no head); `__metadata__['timm_kwargs']` holds the
  JSON arguments of the timm `VisionTransformer` that computes our `pooled` (the mean of the patch
  tokens after the final norm: `global_pool='avg', fc_norm=False`); back here with
  `convert.load_timm_vit`, bitwise.
- A fine-tuning workdir's (`experiment='finetune'`) fine-tuned encoder exports the same way, its
  task head left out (`restore.encoder_variables`).
- `--format=stablehlo`: the encoder's eval-mode forward, float32, weights inside, serialized with
  `jax.export` for a symbolic batch `b`: preprocessed images (b, S, S, C) float32 NHWC -> `pooled`
  (b, F) (`--outputs=all`: the dict c2..c5, pooled; a ViT's latent, tokens, grid, pooled). S is
  --image_size (default the workdir's; a ViT with learned positions takes only that one).
  `OUT.json` beside it records the input shape, dtype, outputs, modality, preprocessing and
  platforms (`--platforms`, default the current backend). Call it with
  `jax.export.deserialize(open(OUT, 'rb').read()).call(x)`; no aacp_jax or flax needed.

Bad input (no such workdir, a modality the workdir has no encoder for, an unwritable output) ends
in one line on stderr, exit status 2, before anything is restored or compiled.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

FORMATS = ('safetensors', 'stablehlo')
OUTPUTS = ('pooled', 'all')


def check_output(path: str) -> None:
  """One-line error when `path` cannot be written (missing or read-only folder, a folder)."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f'--out={path}: is a folder')
  if not os.path.isdir(folder):
    raise ValueError(f'--out={path}: no folder {folder}')
  if not os.access(folder, os.W_OK):
    raise ValueError(f'--out={path}: folder {folder} is not writable')


ARCHS = ('resnet', 'vit')


def arch_of(config) -> str:
  return config.get('model', {}).get('arch', 'resnet') or 'resnet'


def check_workdir(workdir: str, modality: str):
  """The workdir's config, after checking it is a pretraining or fine-tuning run with
  `modality`'s encoder."""
  from aacp_jax import workdir as workdir_lib

  if not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir}: no such folder')
  config = workdir_lib.read_config(workdir)
  experiment = config.get('experiment', 'pretrain')
  if experiment not in ('pretrain', 'finetune'):
    # The landmark detector's encoder is no fine-tuning init and has no torch counterpart.
    raise ValueError(
      f'--workdir={workdir}: a {experiment} workdir; export reads pretraining and fine-tuning ones'
    )
  arch = arch_of(config)
  if arch not in ARCHS:
    raise ValueError(f'--workdir={workdir}: config.model.arch={arch!r}; export knows {ARCHS}')
  have = list(config.get('modalities', ()))
  if modality not in have:
    raise ValueError(f'--modality={modality}: the workdir {workdir} has encoders for {have} only')
  return config


def load_encoder(workdir: str, modality: str, step: int | None = None):
  """(restored, ResNet or ViT module, its variables) of `modality`'s encoder in `workdir`."""
  from aacp_jax import restore

  check_workdir(workdir, modality)
  restored = restore.load_variables(workdir, step=step)
  encoder, variables = restore.encoder_variables(restored, modality)
  return restored, encoder, variables


def preprocessing_note(config, modality: str, side: str = 'divisible by 32') -> str:
  """What the encoder expects of its input, in words (`aacp_jax.augment.preprocess`)."""
  from aacp_jax.augment import config as augment_config

  how = {
    'ct': 'HU of 64 consecutive 1 mm axial slices as channels, clip((hu - lo) / (hi - lo), 0, 1)'
    ' with the window [lo, hi] = [{}, {}]',
    'xray': 'one-channel 8-bit radiograph times {}',
    'mri': 'T1, T2, FLAIR as channels, each instance-normalised (as stored), unchanged',
  }[modality]
  if modality == 'ct':
    how = how.format(*augment_config.ct_window(config.augment))
  elif modality == 'xray':
    scale = float(config.augment.xray_scale)
    inverse = 1.0 / scale if scale else 0.0
    how = how.format(f'1/{inverse:g}' if inverse and inverse == round(inverse) else f'{scale:g}')
  return f'{how}; NHWC float32, side {side} (aacp_jax.augment.preprocess)'


def _is_vit(encoder) -> bool:
  from aacp_jax.models import vit

  return isinstance(encoder, vit.ViT)


def vit_pos_embed(encoder, image_size: int):
  """A fixed (sin-cos) ViT's position embedding at `image_size`, (1 + N, D) in the parameters'
  dtype, the class token's zero row first, as `vit.ViT` adds it; None for learned ones (a
  parameter, exported as such)."""
  import numpy as np

  from aacp_jax.models import vit

  s = encoder.spec
  if s.pos_embed == 'learned':
    return None
  g = image_size // s.patch_size
  pos = np.concatenate([np.zeros((1, s.width)), vit.sincos_2d(s.width, g, g)])
  return pos.astype(vit.param_dtype(encoder.dtype))


def timm_kwargs(encoder, image_size: int, channels: int) -> dict:
  """The timm `VisionTransformer(**kwargs)` computing `vit.ViT`'s `pooled`: pre-norm blocks with
  qkv bias, LayerNorm eps 1e-6 and exact GELU (timm's defaults), no layer scale, a class token,
  the final norm on every token, then the mean of the patch tokens (no fc_norm), no head."""
  s = encoder.spec
  return {
    'img_size': image_size,
    'patch_size': s.patch_size,
    'in_chans': channels,
    'embed_dim': s.width,
    'depth': s.depth,
    'num_heads': s.heads,
    'mlp_ratio': s.mlp_dim / s.width,
    'qkv_bias': True,
    'class_token': True,
    'global_pool': 'avg',
    'fc_norm': False,
    'num_classes': 0,
  }


def _channels(encoder, variables) -> int:
  conv = 'patch_embed' if _is_vit(encoder) else 'conv1'
  return int(variables['params'][conv]['kernel'].shape[2])


def _metadata(restored, encoder, variables, modality: str, workdir: str) -> dict[str, str]:
  from aacp_jax import version

  channels = _channels(encoder, variables)
  size = int(restored.config.data.image_size)
  if _is_vit(encoder):
    s = encoder.spec
    arch = {
      'layout': 'timm.models.vision_transformer.VisionTransformer, no head',
      'timm_kwargs': json.dumps(timm_kwargs(encoder, size, channels), sort_keys=True),
      'patch_size': str(s.patch_size),
      'depth': str(s.depth),
      'width': str(s.width),
      'heads': str(s.heads),
      'mlp_dim': str(s.mlp_dim),
      'pos_embed': s.pos_embed,
      'num_features': str(s.width),
    }
    side = f"{size} (the stored pos_embed's)"
  else:
    arch = {
      'layout': 'torchvision.models.resnet (v1.5), no fc',
      'depth': str(encoder.depth),
      'width': str(encoder.width),
      'num_features': str(encoder.num_features),
    }
    side = 'divisible by 32'
  return {
    'format': 'pt',  # what torch-side readers (transformers, timm) look for
    'modality': modality,
    'in_channels': str(channels),
    **arch,
    'experiment': str(restored.config.get('experiment', 'pretrain')),
    # A fine-tuned encoder: what it was fine-tuned on, and from.
    **{k: str(restored.config[k]) for k in ('task', 'init') if k in restored.config},
    'method': str(restored.config.get('method', '')),
    'train_dtype': str(restored.config.model.get('dtype', '')),
    'image_size': str(restored.config.data.image_size),
    'source_workdir': os.path.abspath(workdir),
    'source_step': str(restored.step),
    'code_version': version.code_version(),
    'preprocessing': preprocessing_note(restored.config, modality, side),
  }


def export_safetensors(workdir: str, modality: str, out: str, *, step: int | None = None) -> dict:
  """Writes `modality`'s encoder of `workdir` to `out` (.safetensors); returns its metadata."""
  from aacp_jax.models import convert

  check_output(out)
  restored, encoder, variables = load_encoder(workdir, modality, step)
  metadata = _metadata(restored, encoder, variables, modality, workdir)
  if _is_vit(encoder):
    pos = vit_pos_embed(encoder, int(restored.config.data.image_size))
    state_dict = convert.flax_to_timm_vit(variables['params'], pos_embed=pos)
  else:
    # torch counts BN updates; the checkpoint step is the closest thing this run has.
    state_dict = convert.flax_to_torchvision(variables, num_batches_tracked=restored.step)
  try:
    convert.save_safetensors(out, state_dict, metadata)
  except OSError as e:
    raise ValueError(f'--out={out}: {e.strerror or e}') from None
  return metadata


def export_forward(
  encoder, variables, *, image_size: int, channels: int, outputs='pooled', platforms=None
):
  """`jax.export.Exported` of the eval-mode float32 forward, weights as constants, batch `b`."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  if outputs not in OUTPUTS:
    raise ValueError(f'--outputs={outputs}: expected one of {OUTPUTS}')
  # float32 whatever the run trained in: the artefact is for inference anywhere, and a bf16
  # forward is a choice its user can still make by casting around it.
  consts = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)
  if _is_vit(encoder):
    model = dataclasses.replace(encoder, dtype=jnp.float32)
    apply = lambda x: model.apply({'params': consts['params']}, x)
  else:
    model = dataclasses.replace(encoder, dtype=jnp.float32, in_channels=channels)
    apply = lambda x: model.apply(consts, x, train=False)

  def forward(x):
    out = apply(x)
    return out['pooled'] if outputs == 'pooled' else out

  (b,) = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((b, image_size, image_size, channels), jnp.float32)
  kwargs = {} if not platforms else {'platforms': tuple(platforms)}
  return jax.export.export(jax.jit(forward), **kwargs)(spec)


def _shape(aval) -> list:
  return [d if isinstance(d, int) else str(d) for d in aval.shape]


def export_stablehlo(
  workdir: str,
  modality: str,
  out: str,
  *,
  step: int | None = None,
  outputs: str = 'pooled',
  image_size: int | None = None,
  platforms=None,
) -> dict:
  """Writes the serialized forward to `out` and its description to `out`.json; returns that."""
  import jax

  check_output(out)
  restored, encoder, variables = load_encoder(workdir, modality, step)
  size = int(image_size or restored.config.data.image_size)
  vit_encoder = _is_vit(encoder)
  if vit_encoder:
    p, trained = encoder.spec.patch_size, int(restored.config.data.image_size)
    if size <= 0 or size % p:
      raise ValueError(f'--image_size={size}: must be a positive multiple of the patch size {p}')
    if encoder.spec.pos_embed == 'learned' and size != trained:
      raise ValueError(
        f'--image_size={size}: the ViT learned positions for {trained} px; export at {trained}'
      )
    function = f'ViT encoder (patch {p}, {encoder.spec.depth} blocks of {encoder.spec.width})'
  else:
    if size <= 0 or size % 32:
      raise ValueError(f'--image_size={size}: must be a positive multiple of 32')
    function = f'ResNet-{encoder.depth} encoder, eval mode (BatchNorm running statistics)'
  channels = _channels(encoder, variables)
  exported = export_forward(
    encoder, variables, image_size=size, channels=channels, outputs=outputs, platforms=platforms
  )
  out_tree = jax.tree_util.tree_unflatten(
    exported.out_tree, [_shape(a) for a in exported.out_avals]
  )
  sidecar = {
    'format': 'jax.export',
    'file': os.path.basename(out),
    'call': "jax.export.deserialize(open(file, 'rb').read()).call(x)",
    'function': function,
    'input': {'shape': ['b', size, size, channels], 'dtype': 'float32', 'layout': 'NHWC'},
    'outputs': out_tree if outputs == 'all' else {'pooled': out_tree},
    'output_dtype': 'float32',
    'platforms': list(exported.platforms),
    'calling_convention_version': int(exported.calling_convention_version),
    'jax_version': jax.__version__,
    **{
      k: v
      for k, v in _metadata(restored, encoder, variables, modality, workdir).items()
      if k not in ('format', 'layout', 'timm_kwargs')
    },
  }
  try:
    blob = bytes(exported.serialize())
  except ImportError as e:  # jax.export's serializer needs the flatbuffers package
    raise ValueError(f'--format=stablehlo: {e}') from None
  try:
    _write_atomic(out, blob)
    _write_atomic(f'{out}.json', (json.dumps(sidecar, indent=1) + '\n').encode())
  except OSError as e:
    raise ValueError(f'--out={out}: {e.strerror or e}') from None
  return sidecar


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def define_flags():
  flags.DEFINE_string(
    'workdir', None, 'Pretraining or fine-tuning workdir (config.json + checkpoints/).'
  )
  flags.DEFINE_string('modality', None, 'Whose encoder: ct, mri or xray.')
  flags.DEFINE_string('out', None, 'Output file.')
  flags.DEFINE_enum(
    'format', 'safetensors', FORMATS, 'torchvision (ResNet) or timm (ViT) weights, or StableHLO.'
  )
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest that verifies).')
  flags.DEFINE_enum('outputs', 'pooled', OUTPUTS, '`stablehlo`: pooled features or every output.')
  flags.DEFINE_integer('image_size', None, "`stablehlo`: input side (default: the workdir's).")
  flags.DEFINE_list('platforms', None, '`stablehlo`: e.g. cpu,cuda (default: the current one).')


def main(argv):
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f'unexpected argument(s) {" ".join(argv[1:])!r}; every option is a --flag')
  for name in ('workdir', 'modality', 'out'):
    if not FLAGS[name].value:
      raise ValueError(f'--{name} is required')
  if FLAGS.format == 'safetensors':
    info = export_safetensors(FLAGS.workdir, FLAGS.modality, FLAGS.out, step=FLAGS.step)
  else:
    info = export_stablehlo(
      FLAGS.workdir,
      FLAGS.modality,
      FLAGS.out,
      step=FLAGS.step,
      outputs=FLAGS.outputs,
      image_size=FLAGS.image_size,
      platforms=FLAGS.platforms,
    )
  print(json.dumps({'out': FLAGS.out, 'format': FLAGS.format, **info}))


def run():
  from aacp_jax import errors

  define_flags()
  try:
    argv = flags.FLAGS(sys.argv)
    main(argv)
  except (flags.Error, ValueError, OSError) as e:
    if os.environ.get('AACP_TRACEBACK'):
      raise
    sys.stderr.write(f'error: {errors.one_line(e, limit=2000)}\n')
    sys.exit(2)


if __name__ == '__main__':
  run()
