"""MoCo-v2 (He et al. 2020; Chen et al. 2020), the paper's baseline, one MoCo per modality.

Per modality m: a query encoder (ResNet `encoder_m` + 2-layer MLP `head_m` to `moco.dim`), a
momentum key encoder of the same architecture (an EMA of the query's parameters, with its own
BatchNorm statistics) and a FIFO queue of `moco.queue_size` keys of modality m (negatives of the
same modality, as the project's within-modality InfoNCE). The loss of modality m, on the query
q_i of view 1 and the key k_i of view 2 of sample i (both unit norm), with the queue n_1..n_K
(keys of earlier steps) and temperature tau:

  L_m = 1/B_m sum_i -log exp(q_i.k_i / tau) / (exp(q_i.k_i / tau) + sum_j exp(q_i.n_j / tau))

and L = sum_m share_m L_m (share_m: the modality's fraction of the global batch, as AACP).
Asymmetric, as MoCo-v2: view 1 is the query and view 2 the key only (MoCo v3's symmetrised
loss would run both encoders on both views, twice the compute). Keys are not differentiated; after
the loss the B_m keys of the step (global batch) replace the oldest B_m queue entries.

Train-state `extra` (saved, restored and kept only on finite steps with the parameters):
  key_params, key_batch_stats: the key encoder; queue {m: (K, dim)}; queue_ptr {m: int32}: the
  next slot to overwrite (oldest entry); momentum: m of the EMA, from config.moco.momentum
  (`after_update` sees only the state, so the value travels in it).
EMA (`after_update`, after the optimiser step, so the keys of step t use the query parameters
after step t-1, as MoCo's update at the start of step t):  key <- m key + (1 - m) query.

BatchNorm leakage (docs/DESIGN.md, "MoCo-v2"): BN statistics are those of `moco.bn_groups`
groups of each modality's global batch (MoCo's per-GPU BN of 8 GPUs), and the key encoder's
groups are a random permutation of the batch (shuffle-BN), un-permuted after the forward pass;
the groups are cut from the global batch, so the step is the same on 1 or 8 devices.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from aacp_jax import config_checks, precision
from aacp_jax.methods import aacp
from aacp_jax.methods.base import Method, RunInfo
from aacp_jax.modalities import MODALITY_IDS
from aacp_jax.models import heads, layers, resnet

AUGMENTS = ('moco_v2', 'config')
BATCH_KEYS = ('image', 'landmarks', 'landmark_visible')
# MoCo-v2's blur sigma range is in pixels of a 224² crop; other sizes scale it.
BLUR_REFERENCE_SIZE = 224


class MLPHead(nn.Module):
  """MoCo-v2's head: Dense(hidden) - ReLU - Dense(dim), unit L2 norm (no BatchNorm)."""

  hidden: int
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pd = layers.param_dtype(self.dtype)
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=pd, name='dense0')(x.astype(self.dtype))
    x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=pd, name='dense1')(nn.relu(x))
    return heads.l2_normalize(x)


class MoCoModel(nn.Module):
  """One encoder per modality: ResNet `encoder_<m>` and MLP `head_<m>` (hidden 0 = the ResNet's
  feature width, MoCo-v2's 2048 for ResNet-50). The key encoder is a second set of variables
  of this same module (train state `extra`).

  `__call__(images, train)` -> {m: {'features': (B, F) pooled, 'z': (B, dim) unit norm}} for the
  modalities present, as `AACPModel` (so probes, `restore.encoder_variables` and fine-tuning
  read it the same way).
  """

  modalities: Sequence[str] = ('ct', 'mri', 'xray')
  depth: int = 50
  width: int = 64
  hidden: int = 0
  dim: int = 128
  dtype: Any = jnp.float32
  in_channels: Mapping[str, int] | None = None
  zero_init_residual: bool = False

  def setup(self):
    for m in self.modalities:
      setattr(
        self,
        f'encoder_{m}',
        resnet.ResNet(
          depth=self.depth,
          width=self.width,
          dtype=self.dtype,
          zero_init_residual=self.zero_init_residual,
        ),
      )
      setattr(self, f'head_{m}', MLPHead(self.hidden or self.num_features, self.dim, self.dtype))

  def __call__(self, images: Mapping[str, jax.Array], train: bool):
    present = [m for m in self.modalities if m in images]
    if not present or set(images) - set(self.modalities):
      raise ValueError(
        f'images keys {sorted(images)} must be a non-empty subset of {tuple(self.modalities)}'
      )
    return {m: self.embed(images[m], m, train) for m in present}

  def embed(self, x, modality: str, train: bool = False):
    features = getattr(self, f'encoder_{modality}')(x, train)['pooled']
    return {'features': features, 'z': getattr(self, f'head_{modality}')(features)}

  @property
  def num_features(self) -> int:
    return resnet.ResNet(depth=self.depth, width=self.width).num_features


def build_model(config) -> MoCoModel:
  return MoCoModel(
    modalities=tuple(config.modalities),
    depth=resnet.check_depth(int(config.model.depth), 'config.model.depth'),
    width=int(config.model.width),
    hidden=int(config.moco.mlp_hidden),
    dim=int(config.moco.dim),
    dtype=layers.compute_dtype(config.model.dtype),
    zero_init_residual=bool(config.model.get('zero_init_residual', False)),
  )


def moco_info_nce(q, k, queue, temperature):
  """L = 1/B sum_i -log exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.n_j/tau)).

  q, k (B, D) unit norm (row i's positive is k_i), queue (K, D) the negatives n_j. Returns
  (loss, accuracy): accuracy = fraction of rows whose positive beats every negative.
  """
  real = precision.real()
  q, k, queue = (jnp.asarray(a, real) for a in (q, k, queue))
  pos = jnp.sum(q * k, axis=-1) / temperature
  neg = q @ queue.T / temperature
  logits = jnp.concatenate([pos[:, None], neg], axis=1)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)
  accuracy = jnp.mean((pos > jnp.max(neg, axis=1)).astype(real))
  return loss, accuracy


def enqueue(queue, ptr, keys):
  """FIFO: `keys` (B, D) overwrite the B oldest entries, from slot `ptr`; -> (queue, ptr').

  K % B == 0 (checked in `check_config`), so a step's keys never straddle the end: the pointer
  wraps to 0 exactly when the queue has been filled once more.
  """
  n, size = keys.shape[0], queue.shape[0]
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.int32(0)))
  return queue, ((ptr + n) % size).astype(ptr.dtype)


def ema(key_params, params, momentum):
  """key <- momentum key + (1 - momentum) query, leaf by leaf."""
  return jax.tree.map(lambda k, q: momentum * k + (1 - momentum) * q, key_params, params)


def after_update(state):
  """The key encoder's EMA towards the query parameters just updated (train.step)."""
  extra = dict(state.extra)
  extra['key_params'] = ema(extra['key_params'], state.params, extra['momentum'])
  return state.replace(extra=extra)


def init_extra(config, variables):
  """Key encoder = a copy of the query encoder (MoCo), queues of random unit keys, pointers 0."""
  real = precision.real()
  dim, size = int(config.moco.dim), int(config.moco.queue_size)
  # Its own stream, fixed by the seed: the queue is part of the run's deterministic state.
  base = jax.random.fold_in(jax.random.key(config.seed), 0x6D6F636F)
  queue = {
    m: heads.l2_normalize(
      jax.random.normal(jax.random.fold_in(base, MODALITY_IDS[m]), (size, dim), real)
    ).astype(real)
    for m in config.modalities
  }
  return {
    'key_params': jax.tree.map(jnp.copy, variables['params']),
    'key_batch_stats': jax.tree.map(jnp.copy, variables.get('batch_stats', {})),
    'queue': queue,
    'queue_ptr': {m: jnp.zeros((), jnp.int32) for m in config.modalities},
    'momentum': jnp.asarray(config.moco.momentum, real),
  }


def augment_config(config):
  """The views' augmentation: MoCo-v2's (`moco.augment='moco_v2'`) mapped onto the on-device
  augmentation (random resized crop of `crop_area`, flip, brightness/contrast jitter with
  probability `jitter_p`; no noise, no cutout; blur is added by `blur`), or config.augment as
  it is (`'config'`, e.g. MoCo with the anatomy-aware augmentation)."""
  mc = config.moco
  if mc.augment == 'config':
    return config.augment
  c = ml_collections.ConfigDict(copy.deepcopy(config.augment.to_dict()))
  c.anatomy_aware = False
  c.simclr.area = tuple(mc.crop_area)
  c.simclr.flip_p = float(mc.flip_p)
  c.brightness = dict(p=float(mc.jitter_p), max_delta=float(mc.brightness))
  c.contrast = dict(p=float(mc.jitter_p), range=tuple(mc.contrast))
  c.noise.p = 0.0
  c.cutout.p = 0.0
  return c


def blur(key, images, p, sigma_range, reference=BLUR_REFERENCE_SIZE):
  """Per-sample separable Gaussian blur with probability p, sigma ~ U(sigma_range) pixels of a
  `reference`² image, scaled to the images' size (B, H, W, C); edge padding."""
  b, h, w = images.shape[:3]
  scale = max(h, w) / reference
  lo, hi = (float(s) * scale for s in sigma_range)
  if p <= 0 or hi <= 0:
    return images
  radius = max(1, int(math.ceil(3 * hi)))
  real = images.dtype
  k_fire, k_sigma = jax.random.split(key)
  fire = jax.random.uniform(k_fire, (b,), real) < p
  sigma = jax.random.uniform(k_sigma, (b,), real, lo, hi)
  offsets = jnp.arange(-radius, radius + 1, dtype=real)
  weights = jnp.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
  weights = weights / jnp.sum(weights, axis=1, keepdims=True)
  delta = (offsets == 0).astype(real)[None, :]
  weights = jnp.where(fire[:, None], weights, delta)  # (B, 2r + 1)

  def along(x, axis):
    n = x.shape[axis]
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    xp = jnp.pad(x, pad, mode='edge')
    out = 0.0
    for j in range(2 * radius + 1):
      part = jax.lax.slice_in_dim(xp, j, j + n, axis=axis)
      out = out + weights[:, j, None, None, None] * part
    return out

  return along(along(images, 1), 2)


def grouped_apply(model, variables, images, groups, perms=None):
  """The model in train mode with BatchNorm statistics per group: each modality's batch is cut
  into `groups` equal groups (after `perms[m]`, a permutation of its rows, when given), the
  groups run under vmap (BN reduces within a group), and the outputs are put back in the
  original row order. Returns ({m: z (B_m, D)}, batch_stats averaged over the groups: the EMA
  of the mean of the group means)."""
  perms = perms or {}

  def cut(m, x):
    if m in perms:
      x = x[perms[m]]
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])

  xs = {m: cut(m, x) for m, x in images.items()}

  def forward(x):
    out, new = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return {m: out[m]['z'] for m in out}, new['batch_stats']

  z, stats = jax.vmap(forward)(xs)
  stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
  out = {}
  for m, zm in z.items():
    zm = zm.reshape(-1, zm.shape[-1])
    if m in perms:
      zm = zm[jnp.argsort(perms[m])]
    out[m] = zm
  return out, stats


def check_batch(batch, config):
  have = sorted(batch) if hasattr(batch, 'keys') else type(batch).__name__
  for m in config.modalities:
    if m not in batch:
      raise ValueError(
        f'batch has modalities {have} but config.modalities enables {tuple(config.modalities)}'
      )
    lacking = [k for k in BATCH_KEYS if k not in batch[m]]
    if lacking:
      raise ValueError(f'batch[{m!r}] lacks keys {lacking}; expected {BATCH_KEYS}')


def make_loss(config, model, run: RunInfo):
  """The loop's loss: per modality `moco_info_nce` of the query on view 1 against the key on
  view 2 and the queue, weighted by the batch shares; returns the enqueued queues and the key
  encoder's new BN statistics in `extra`. Metrics: moco_<m>, pos_acc_<m> (the positive beats
  every queued negative), loss."""
  del run
  mc = config.moco
  aug_cfg = augment_config(config)
  groups, temperature = int(mc.bn_groups), float(mc.temperature)

  def loss_fn(params, batch_stats, extra, batch, key, scheduled):
    del scheduled
    check_batch(batch, config)
    if 'queue' not in extra:
      raise ValueError(
        'moco_v2: the train state has no queue; create it with Method.init_extra '
        '(state.create_state(..., init_extra))'
      )
    k_views, k_blur, k_shuffle = jax.random.split(key, 3)
    queries, keys, perms = {}, {}, {}
    for m in config.modalities:
      views = aacp.two_views(
        jax.random.fold_in(k_views, MODALITY_IDS[m]),
        batch[m],
        m,
        aug_cfg,
        out_size=config.data.image_size,
      )['image']
      views = blur(jax.random.fold_in(k_blur, MODALITY_IDS[m]), views, mc.blur_p, mc.blur_sigma)
      queries[m], keys[m] = jnp.split(views, 2, axis=0)
      n = queries[m].shape[0]
      if int(mc.queue_size) % n or n % groups:
        raise ValueError(
          f'config.moco.queue_size={mc.queue_size}, config.moco.bn_groups={groups}: the {m} '
          f'batch ({n}) must divide the queue and split into the groups'
        )
      perms[m] = jax.random.permutation(jax.random.fold_in(k_shuffle, MODALITY_IDS[m]), n)
    q, new_stats = grouped_apply(
      model, {'params': params, 'batch_stats': batch_stats}, queries, groups
    )
    key_vars = jax.lax.stop_gradient(
      {'params': extra['key_params'], 'batch_stats': extra['key_batch_stats']}
    )
    k, key_stats = grouped_apply(model, key_vars, keys, groups, perms)
    total = sum(queries[m].shape[0] for m in config.modalities)
    loss, metrics = 0.0, {}
    queue, ptr = dict(extra['queue']), dict(extra['queue_ptr'])
    for m in config.modalities:
      k_m = jax.lax.stop_gradient(k[m])
      l_m, acc_m = moco_info_nce(q[m], k_m, queue[m], temperature)
      loss = loss + queries[m].shape[0] / total * l_m
      metrics.update({f'moco_{m}': l_m, f'pos_acc_{m}': acc_m})
      queue[m], ptr[m] = enqueue(queue[m], ptr[m], k_m)
    metrics['loss'] = loss
    new_extra = dict(
      extra, key_batch_stats=jax.lax.stop_gradient(key_stats), queue=queue, queue_ptr=ptr
    )
    return loss, (new_stats, new_extra, metrics)

  return loss_fn


def modality_batches(config) -> dict:
  """Each modality's global batch, as `sharding.per_modality_batch` computes it."""
  shares = {m: float(config.data.shares[m]) for m in config.modalities}
  total = sum(shares.values())
  return {m: int(round(config.batch_size * s / total)) for m, s in shares.items()}


RULES = (
  ('data.image_size', config_checks.Number(lo=32, integer=True)),
  ('model.width', config_checks.COUNT),
  ('moco.queue_size', config_checks.COUNT),
  ('moco.momentum', config_checks.UNIT),
  ('moco.temperature', config_checks.POSITIVE),
  ('moco.dim', config_checks.COUNT),
  ('moco.mlp_hidden', config_checks.INDEX),  # 0 = the encoder's feature width
  ('moco.bn_groups', config_checks.COUNT),
  ('moco.crop_area', config_checks.Number(lo=0, hi=1, open_lo=True)),
  ('moco.flip_p', config_checks.UNIT),
  ('moco.jitter_p', config_checks.UNIT),
  ('moco.brightness', config_checks.NON_NEGATIVE),
  ('moco.contrast', config_checks.POSITIVE),
  ('moco.blur_p', config_checks.UNIT),
  ('moco.blur_sigma', config_checks.POSITIVE),
  ('eval.batch_size', config_checks.COUNT),
  ('eval.bootstrap', config_checks.COUNT),
  ('eval.l2', config_checks.NON_NEGATIVE),
)


def check_arch(config) -> None:
  """model.arch must be 'resnet' ('' = the method's own, the ResNet): the query and key
  encoders are ResNets, their BatchNorm shuffled (shuffle-BN); a ViT MoCo is MoCo-v3."""
  arch = config.model.get('arch', '') or 'resnet'
  if arch != 'resnet':
    raise ValueError(
      f"config.model.arch={arch!r}: method 'moco_v2' trains ResNet query and key encoders; "
      "set model.arch='resnet'"
    )


def check_config(config) -> None:
  """One-line errors naming the config key, before anything compiles."""
  check_arch(config)
  config_checks.check(config, RULES)
  resnet.check_depth(config.model.depth)
  mc = config.moco
  if mc.augment not in AUGMENTS:
    raise ValueError(f'config.moco.augment={mc.augment!r}: expected one of {AUGMENTS}')
  batches = modality_batches(config)
  shown = ', '.join(f'{m} {b}' for m, b in batches.items())
  if any(mc.queue_size % b for b in batches.values()):
    raise ValueError(
      f"config.moco.queue_size={mc.queue_size}: must be a multiple of every modality's global "
      f'batch ({shown})'
    )
  if any(b % mc.bn_groups or b // mc.bn_groups < 2 for b in batches.values()):
    raise ValueError(
      f"config.moco.bn_groups={mc.bn_groups}: must split every modality's global batch "
      f'({shown}) into groups of at least 2'
    )
  for key in ('crop_area', 'contrast', 'blur_sigma'):
    lo, hi = tuple(mc[key])
    if not lo <= hi:
      raise ValueError(f'config.moco.{key}={tuple(mc[key])}: expected (low, high), low <= high')


METHOD = Method(
  name='moco_v2',
  check_config=check_config,
  build_model=build_model,
  make_loss=make_loss,
  init_extra=init_extra,
  after_update=after_update,
)
