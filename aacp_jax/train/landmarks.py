"""Landmark detector training, evaluation and inference (the frozen reference of the spatial loss).

`python -m aacp_jax.main --config=configs/landmarks.py[:demo] --workdir=DIR` trains one small
heatmap U-Net per modality on an annotated subset (phantom ground truth by default, or shards
made from a keypoint file by `data_prep.keypoints`), with the anatomy-aware augmentation moving the
landmarks, then writes `DIR/eval.json` (held-out mean radial error and detection rate) and
`DIR/detector.json` (what `data_prep.annotate_landmarks` needs to rebuild and apply it).
"""
import functools
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax

from aacp_jax import augment
from aacp_jax import checkpoint as ckpt_lib
from aacp_jax import sharding
from aacp_jax.data import landmarks as lm
from aacp_jax.data import pipeline
from aacp_jax.metrics import MetricWriter
from aacp_jax.models import detector as det
from aacp_jax.train import pretrain
from aacp_jax.train import state as state_lib

DETECTOR_FILE = 'detector.json'
_MODALITY_IDS = {'ct': 0, 'mri': 1, 'xray': 2}


def check_config(config) -> None:
  """One-line errors naming the config key, before any data is read or anything compiles."""
  state_lib.check_modalities(config)
  state_lib.compute_dtype(config.model.dtype)
  factor = 2 ** config.model.levels
  if config.data.image_size % factor:
    raise ValueError(f'config.data.image_size={config.data.image_size}: must be divisible by '
                     f'2**config.model.levels = {factor}')
  if not 0 <= config.model.output_level <= config.model.levels:
    raise ValueError(f'config.model.output_level={config.model.output_level}: must lie in '
                     f'[0, config.model.levels={config.model.levels}]')
  for key in ('heatmap_sigma', 'coord_weight', 'visible_weight'):
    if config.loss[key] < 0 or (key == 'heatmap_sigma' and config.loss[key] == 0):
      raise ValueError(f'config.loss.{key}={config.loss[key]}: must be positive')
  if not 0 < config.eval.visible_threshold < 1:
    raise ValueError(f'config.eval.visible_threshold={config.eval.visible_threshold}: '
                     'must lie in (0, 1)')
  if config.total_steps <= 0:
    raise ValueError(f'config.total_steps={config.total_steps}: must be positive')
  if config.optim.lr <= 0:
    raise ValueError(f'config.optim.lr={config.optim.lr}: must be positive')


def modality_loss(out, landmarks, visible, image_size, loss_cfg):
  """Loss of one modality's detector output against (moved) ground truth.

  L = CE + λ_c·MRE + λ_v·BCE, with
    CE  = mean over visible (b, k) of −Σ_p q_bk(p) log softmax(h_bk)(p), q a Gaussian of σ output
          pixels at the true landmark (`heatmap_targets`): a dense gradient from the first step;
    MRE = mean over visible (b, k) of ‖ŷ_bk − y_bk‖₂ · image_size, the soft-argmax error in pixels,
          which refines below the heatmap's pixel;
    BCE = mean over all (b, k) of the visibility logit's binary cross-entropy.
  Returns (loss, metrics).
  """
  heat = out['heatmaps']
  b, h, w, k = heat.shape
  vis = visible.astype(jnp.float32)
  n_vis = jnp.maximum(vis.sum(), 1.0)
  target = det.heatmap_targets(landmarks, h, w, loss_cfg.heatmap_sigma)
  logp = jax.nn.log_softmax(heat.reshape(b, h * w, k), axis=1).reshape(b, h, w, k)
  ce = -jnp.sum(target * logp, axis=(1, 2))  # (B, K)
  ce = jnp.sum(ce * vis) / n_vis
  err = jnp.sqrt(jnp.sum(jnp.square(out['landmarks'] - landmarks), -1) + 1e-12) * image_size
  mre = jnp.sum(err * vis) / n_vis
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(out['visible_logit'], vis))
  loss = ce + loss_cfg.coord_weight * mre + loss_cfg.visible_weight * bce
  return loss, {'heatmap_ce': ce, 'mre_px': mre, 'visible_bce': bce}


def make_views(batch, key, config):
  """One augmented view per modality: (images, (landmarks, visible)) moved by the same transform."""
  images, targets = {}, {}
  for m in config.modalities:
    k = jax.random.fold_in(key, _MODALITY_IDS[m])
    img, pts, vis = augment.augment_batch(
        k, batch[m]['image'].astype(jnp.float32), batch[m]['landmarks'],
        batch[m]['landmark_visible'], m, config.augment)
    images[m], targets[m] = img, (pts, vis)
  return images, targets


def loss_fn(params, batch_stats, images, targets, *, model, config):
  """Mean over modalities of `modality_loss` on the augmented views."""
  out, new_vars = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                              mutable=['batch_stats'])
  total, metrics = 0.0, {}
  for m in config.modalities:
    l_m, parts = modality_loss(out[m], *targets[m], config.data.image_size, config.loss)
    total = total + l_m / len(config.modalities)
    metrics.update({f'{name}_{m}': v for name, v in parts.items()})
  metrics['loss'] = total
  return total, (new_vars['batch_stats'], metrics)


def train_step(state, batch, *, model, tx, schedule, config):
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  # The views do not depend on the parameters: drawn once, outside the differentiated function.
  images, targets = make_views(batch, key, config)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, config=config),
                               has_aux=True)
  (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, images, targets)
  new_state, finite, _, _ = state_lib.apply_if_finite(state, grads, batch_stats, loss, tx)
  metrics.update(lr=schedule(state.step), finite=finite.astype(jnp.float32))
  return new_state, metrics


@functools.partial(jax.jit, static_argnames=('model', 'modality', 'aug_cfg'))
def _predict(variables, images, *, model, modality, aug_cfg):
  if aug_cfg is not None:  # raw stored values: normalise as training did
    images = augment.preprocess(images, modality, aug_cfg)
  out = model.apply(variables, {modality: images}, train=False)[modality]
  return out['landmarks'], jax.nn.sigmoid(out['visible_logit'])


def predict(variables, raw_images, modality, *, model, aug_cfg, batch_size=64):
  """Raw host images (N, H, W, C) -> (landmarks (N, K, 2), confidence (N, K)) numpy, batched.

  Images are the records' stored values (HU, 0..255, normalised MRI) at the detector's image size;
  the confidence is the predicted probability that the landmark is in the field of view.
  `aug_cfg=None` takes images already normalised (augmentation output).
  """
  aug_cfg = None if aug_cfg is None else ml_collections.FrozenConfigDict(aug_cfg)
  pts, conf = [], []
  for i in range(0, len(raw_images), batch_size):
    chunk = np.asarray(raw_images[i:i + batch_size], np.float32)
    n = len(chunk)
    if n < batch_size:  # one compiled shape for every chunk
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.float32)])
    p, c = _predict(variables, chunk, model=model, modality=modality, aug_cfg=aug_cfg)
    pts.append(np.asarray(p)[:n])
    conf.append(np.asarray(c)[:n])
  return np.concatenate(pts), np.concatenate(conf)


def detection_metrics(pred, conf, truth, visible, image_size, *, threshold, radius):
  """Held-out figures of one modality (numpy).

  mre_px / mre_percent: mean radial error over truly visible landmarks, in pixels at `image_size`
  and in % of the image side; detection_rate: fraction of truly visible landmarks predicted visible
  (confidence > threshold) within `radius` (fraction of the side); false_detection_rate: fraction
  of truly invisible landmarks predicted visible.
  """
  err = np.linalg.norm(pred - truth, axis=-1)  # normalised units
  vis = visible.astype(bool)
  called = conf > threshold
  n_vis, n_invis = int(vis.sum()), int((~vis).sum())
  per_landmark = {lm.LANDMARKS[k]: round(float(err[:, k][vis[:, k]].mean() * image_size), 3)
                  for k in range(vis.shape[1]) if vis[:, k].any()}
  return {
      'images': int(len(pred)),
      'visible_landmarks': n_vis,
      'mre_px': float(err[vis].mean() * image_size) if n_vis else None,
      'mre_percent': float(err[vis].mean() * 100) if n_vis else None,
      'p90_error_px': float(np.percentile(err[vis], 90) * image_size) if n_vis else None,
      'detection_rate': float((called & vis & (err <= radius)).sum() / max(n_vis, 1)),
      'false_detection_rate': float((called & ~vis).sum() / max(n_invis, 1)),
      'mre_px_per_landmark': per_landmark,
  }


def canonical_atlas(train_arrays):
  """Mean canonical (y, x) of every landmark over the annotated split's arrays (one
  `load_split_arrays` dict per modality), or (0, 0) where never seen.

  `annotate_landmarks` gives a detected landmark this position when its record has no canonical
  coordinate of its own (real images: nothing maps them to the canonical frame yet), so
  cross-modal pairing still compares the landmark sets that two images show.
  """
  total = np.zeros((len(lm.LANDMARKS), 2))
  count = np.zeros((len(lm.LANDMARKS),))
  for arrays in train_arrays:
    can = arrays['landmarks_canonical']
    # (0, 0) marks an unknown canonical position (real CT/MRI annotations), not a position.
    known = arrays['landmark_visible'] & (can != 0).any(-1)
    total += (can * known[..., None]).sum(0)
    count += known.sum(0)
  return (total / np.maximum(count, 1)[:, None]).round(6).tolist()


def evaluate(config, model, variables, root):
  """(eval.json's body, canonical atlas): per modality, detection metrics on the held-out split as
  stored and under random anatomy-aware transforms, beside the mean-position baseline (training
  means); the atlas comes from the same training arrays (`canonical_atlas`)."""
  size = config.data.image_size
  thr, radius = config.eval.visible_threshold, config.eval.detect_radius
  results, train_arrays = {}, []
  for m in config.modalities:
    train = pipeline.load_split_arrays(root, config.data.split, m, size)
    train_arrays.append(train)
    test = pipeline.load_split_arrays(root, config.eval.split, m, size)
    vis_train = train['landmark_visible']
    mean_pos = (train['landmarks'] * vis_train[..., None]).sum(0) / np.maximum(
        vis_train.sum(0), 1)[:, None]
    pred, conf = predict(variables, test['image'], m, model=model, aug_cfg=config.augment)
    row = {'held_out': detection_metrics(pred, conf, test['landmarks'], test['landmark_visible'],
                                         size, threshold=thr, radius=radius)}
    baseline = np.broadcast_to(mean_pos, pred.shape)
    row['mean_position_baseline_mre_px'] = detection_metrics(
        baseline, conf, test['landmarks'], test['landmark_visible'], size, threshold=thr,
        radius=radius)['mre_px']
    # The same held-out images moved by random spatial transforms: a detector that learnt the
    # average anatomy position, not the anatomy, fails here.
    key = jax.random.key(config.seed + 7919)
    img, pts, vis = augment.augment_batch(
        key, jnp.asarray(test['image'], jnp.float32), jnp.asarray(test['landmarks']),
        jnp.asarray(test['landmark_visible']), m, _spatial_only(config.augment))
    pred_t, conf_t = predict(variables, np.asarray(img), m, model=model, aug_cfg=None)
    row['held_out_transformed'] = detection_metrics(
        pred_t, conf_t, np.asarray(pts), np.asarray(vis), size, threshold=thr, radius=radius)
    results[m] = row
  return results, canonical_atlas(train_arrays)


def _spatial_only(aug_cfg):
  cfg = ml_collections.ConfigDict(aug_cfg.to_dict())
  for op in ('brightness', 'contrast', 'noise', 'cutout'):
    cfg[op].p = 0.0
  return cfg


def train_and_evaluate(config, workdir: str) -> dict:
  check_config(config)
  pretrain.check_workdir(workdir)
  mesh = sharding.make_mesh()
  root, _, data_iter = pretrain.open_data(config, workdir, mesh)
  model = det.build_detector(config.model, config.modalities, len(lm.LANDMARKS))
  tx, schedule = state_lib.make_optimizer(config.optim, config.total_steps)
  state, shardings = pretrain.create_state(config, model, tx, mesh, config.data.image_size)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                               every_steps=config.checkpoint_every_steps, keep=2)
  state = pretrain.resume(ckpt, state, shardings, data_iter)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config),
      in_shardings=(shardings, sharding.batch_sharded(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  writer = MetricWriter(workdir)
  t0 = time.perf_counter()
  with pretrain._StopFlag() as stop:  # pylint: disable=protected-access
    for step in range(int(state.step), config.total_steps):
      state, metrics = step_fn(state, sharding.to_global(next(data_iter), mesh))
      done = step + 1
      if done % config.log_every_steps == 0 or done == config.total_steps or stop.requested:
        metrics = jax.device_get(metrics)
        writer.write(done, metrics)
        logging.info('step %d loss %.4f (%.0f s)', done, metrics['loss'], time.perf_counter() - t0)
        if not metrics['finite']:
          raise FloatingPointError(f'step {done}: detector loss is not finite')
      ckpt.save(done, state, data_iter, force=stop.requested or done == config.total_steps)
      if stop.requested:
        ckpt.close()
        writer.close()
        return {'stopped_at': done}
  ckpt.close()
  writer.close()

  variables = jax.device_get(state.variables)
  per_modality, atlas = evaluate(config, model, variables, root)
  results = {'steps': config.total_steps, 'image_size': config.data.image_size,
             'detect_radius_fraction': config.eval.detect_radius,
             'visible_threshold': config.eval.visible_threshold, 'modalities': per_modality}
  if jax.process_index() == 0:
    info = {'config': config.to_dict(), 'step': config.total_steps, 'canonical_atlas': atlas}
    with open(os.path.join(workdir, DETECTOR_FILE), 'w', encoding='utf-8') as f:
      json.dump(info, f, indent=1, default=list)
    with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)
  return results


def load_detector(workdir: str):
  """(config, model, variables, atlas) of a trained detector workdir, for inference.

  Restores the last checkpoint's parameters and BN statistics onto the host (no optimiser state).
  """
  path = os.path.join(workdir, DETECTOR_FILE)
  if not os.path.exists(path):
    raise ValueError(f'--checkpoint={workdir}: no {DETECTOR_FILE}; train a detector there with '
                     '`python -m aacp_jax.main --config=configs/landmarks.py --workdir=...`')
  with open(path, encoding='utf-8') as f:
    info = json.load(f)
  config = ml_collections.ConfigDict(info['config'])
  model = det.build_detector(config.model, config.modalities, len(lm.LANDMARKS))
  tx, _ = state_lib.make_optimizer(config.optim, config.total_steps)

  def init():
    dummy = {m: jnp.zeros((1, config.data.image_size, config.data.image_size,
                           state_lib.IN_CHANNELS[m]), jnp.float32) for m in config.modalities}
    v = model.init(jax.random.key(0), dummy, train=False)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                                batch_stats=v['batch_stats'], opt_state=tx.init(v['params']))

  abstract = jax.eval_shape(init)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), every_steps=1, keep=2,
                               async_save=False)
  state = ckpt.restore(abstract)
  ckpt.close()
  if state is None:
    raise ValueError(f'--checkpoint={workdir}: no checkpoint under {workdir}/checkpoints')
  return config, model, state.variables, np.asarray(info['canonical_atlas'], np.float32)


def format_table(results) -> str:
  """eval.json as a small text table: one row per modality."""
  size = results['image_size']
  lines = [f'{"modality":<9}{"MRE px":>8}{"MRE %":>8}{"detect":>8}{"false+":>8}'
           f'{"MRE px moved":>14}{"mean-pos px":>13}   (image {size}², radius '
           f'{results["detect_radius_fraction"]:.0%})']
  for m, row in results['modalities'].items():
    h, t = row['held_out'], row['held_out_transformed']
    lines.append(f'{m:<9}{h["mre_px"]:>8.2f}{h["mre_percent"]:>8.2f}{h["detection_rate"]:>8.3f}'
                 f'{h["false_detection_rate"]:>8.3f}{t["mre_px"]:>14.2f}'
                 f'{row["mean_position_baseline_mre_px"]:>13.2f}')
  return '\n'.join(lines)
