"""Landmark detector training and evaluation (the frozen reference of the spatial loss; inference is
`aacp_jax.eval.detector`).

`python -m aacp_jax.main --config=configs/landmarks.py[:demo] --workdir=DIR` trains one small
heatmap U-Net per modality on an annotated subset (phantom ground truth by default, or shards
made from a keypoint file by `data_prep.keypoints`), with the anatomy-aware augmentation moving the
landmarks, then writes `DIR/eval.json` (held-out mean radial error and detection rate) and
`DIR/detector.json` (what `data_prep.annotate_landmarks` needs to rebuild and apply it).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aacp_jax import augment, config_checks, experiments
from aacp_jax.eval import detector as detector_eval
from aacp_jax.eval import embed as embed_lib
from aacp_jax.eval.detector import canonical_atlas, detection_metrics, predict
from aacp_jax.modalities import MODALITY_IDS
from aacp_jax.models import detector as det
from aacp_jax.models import inputs as model_inputs
from aacp_jax.train import loop
from aacp_jax.train import state as state_lib

# The detector's numeric keys (the loop's own are `state.COMMON_RULES`).
RULES = (
  ('total_steps', config_checks.COUNT),  # no epochs here: the length is total_steps alone
  ('model.width', config_checks.COUNT),
  ('model.levels', config_checks.COUNT),
  ('loss.heatmap_sigma', config_checks.POSITIVE),
  ('loss.coord_weight', config_checks.NON_NEGATIVE),
  ('loss.visible_weight', config_checks.NON_NEGATIVE),
  ('eval.visible_threshold', config_checks.Number(lo=0, hi=1, open_lo=True, open_hi=True)),
  ('eval.detect_radius', config_checks.POSITIVE),
)


def check_config(config) -> None:
  """One-line errors naming the config key, before any data is read or anything compiles."""
  state_lib.check_common(config)
  config_checks.check(config, RULES)
  factor = 2**config.model.levels
  if config.data.image_size % factor:
    raise ValueError(
      f'config.data.image_size={config.data.image_size}: must be divisible by '
      f'2**config.model.levels = {factor}'
    )
  if not 0 <= config.model.output_level <= config.model.levels:
    raise ValueError(
      f'config.model.output_level={config.model.output_level}: must lie in '
      f'[0, config.model.levels={config.model.levels}]'
    )


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
    k = jax.random.fold_in(key, MODALITY_IDS[m])
    img, pts, vis = augment.augment_batch(
      k,
      batch[m]['image'].astype(jnp.float32),
      batch[m]['landmarks'],
      batch[m]['landmark_visible'],
      m,
      config.augment,
      extent=batch[m].get('extent'),
      out_size=config.data.image_size,
    )
    images[m], targets[m] = img, (pts, vis)
  return images, targets


def loss_fn(params, batch_stats, images, targets, *, model, config):
  """Mean over modalities of `modality_loss` on the augmented views."""
  out, new_vars = model.apply(
    {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
  )
  total, metrics = 0.0, {}
  for m in config.modalities:
    l_m, parts = modality_loss(out[m], *targets[m], config.data.image_size, config.loss)
    total = total + l_m / len(config.modalities)
    metrics.update({f'{name}_{m}': v for name, v in parts.items()})
  metrics['loss'] = total
  return total, (new_vars['batch_stats'], metrics)


def evaluate(config, model, variables, root):
  """(eval.json's body, canonical atlas): per modality, detection metrics on the held-out split as
  stored and under random anatomy-aware transforms, beside the mean-position baseline (training
  means); the atlas comes from the same training arrays (`canonical_atlas`)."""
  size = config.data.image_size
  thr, radius = config.eval.visible_threshold, config.eval.detect_radius
  results, train_arrays = {}, []
  for m in config.modalities:
    train = embed_lib.load_split(root, config.data.split, m, size)
    train_arrays.append(train)
    test = embed_lib.load_split(root, config.eval.split, m, size)
    vis_train = train['landmark_visible']
    mean_pos = (train['landmarks'] * vis_train[..., None]).sum(0) / np.maximum(vis_train.sum(0), 1)[
      :, None
    ]
    pred, conf = predict(variables, test['image'], m, model=model, aug_cfg=config.augment)
    row = {
      'held_out': detection_metrics(
        pred, conf, test['landmarks'], test['landmark_visible'], size, threshold=thr, radius=radius
      )
    }
    baseline = np.broadcast_to(mean_pos, pred.shape)
    row['mean_position_baseline_mre_px'] = detection_metrics(
      baseline,
      conf,
      test['landmarks'],
      test['landmark_visible'],
      size,
      threshold=thr,
      radius=radius,
    )['mre_px']
    # The same held-out images moved by random spatial transforms: a detector that learnt the
    # average anatomy position, not the anatomy, fails here.
    key = jax.random.key(config.seed + 7919)
    img, pts, vis = augment.augment_batch(
      key,
      jnp.asarray(test['image'], jnp.float32),
      jnp.asarray(test['landmarks']),
      jnp.asarray(test['landmark_visible']),
      m,
      _spatial_only(config.augment),
    )
    pred_t, conf_t = predict(variables, np.asarray(img), m, model=model, aug_cfg=None)
    row['held_out_transformed'] = detection_metrics(
      pred_t, conf_t, np.asarray(pts), np.asarray(vis), size, threshold=thr, radius=radius
    )
    results[m] = row
  return results, canonical_atlas(train_arrays)


def _spatial_only(aug_cfg):
  cfg = ml_collections.ConfigDict(aug_cfg.to_dict())
  for op in ('brightness', 'contrast', 'noise', 'cutout'):
    cfg[op].p = 0.0
  return cfg


def make_task(config, data) -> loop.Task:
  model = experiments.get('landmarks').build_model(config)
  tx, schedule = state_lib.make_optimizer(config.optim, config.total_steps)

  def loss(params, batch_stats, extra, batch, key, scheduled):
    del scheduled
    # The views do not depend on the parameters: only their images enter the model.
    images, targets = make_views(batch, key, config)
    value, (new_stats, metrics) = loss_fn(
      params, batch_stats, images, targets, model=model, config=config
    )
    return value, (new_stats, extra, metrics)

  return loop.Task(
    model=model,
    dummy_inputs=model_inputs.dummy_inputs(config.modalities, config.data.image_size),
    tx=tx,
    schedule=schedule,
    loss_fn=loss,
    total_steps=config.total_steps,
  )


def train_and_evaluate(config, workdir: str) -> dict:
  check_config(config)
  trained = loop.train(config, workdir, make_task)
  if trained.stopped_at is not None:
    return {'stopped_at': trained.stopped_at}
  variables = jax.device_get(trained.state.variables)
  per_modality, atlas = evaluate(config, trained.task.model, variables, trained.data.root)
  results = {
    'steps': config.total_steps,
    'image_size': config.data.image_size,
    'detect_radius_fraction': config.eval.detect_radius,
    'visible_threshold': config.eval.visible_threshold,
    'modalities': per_modality,
  }
  if jax.process_index() == 0:
    info = {'step': config.total_steps, 'canonical_atlas': atlas}
    with open(os.path.join(workdir, detector_eval.DETECTOR_FILE), 'w', encoding='utf-8') as f:
      json.dump(info, f, indent=1)
    with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)
  return results


def format_results(results: dict, workdir: str) -> str:
  if 'modalities' not in results:
    return ''
  return (
    '\nLandmark detector on held-out images (test split):\n'
    f'{format_table(results)}\nDetails: {os.path.join(workdir, "eval.json")}'
  )


def format_table(results) -> str:
  """eval.json as a small text table: one row per modality."""
  size = results['image_size']
  lines = [
    f'{"modality":<9}{"MRE px":>8}{"MRE %":>8}{"detect":>8}{"false+":>8}'
    f'{"MRE px moved":>14}{"mean-pos px":>13}   (image {size}², radius '
    f'{results["detect_radius_fraction"]:.0%})'
  ]
  for m, row in results['modalities'].items():
    h, t = row['held_out'], row['held_out_transformed']
    lines.append(
      f'{m:<9}{h["mre_px"]:>8.2f}{h["mre_percent"]:>8.2f}{h["detection_rate"]:>8.3f}'
      f'{h["false_detection_rate"]:>8.3f}{t["mre_px"]:>14.2f}'
      f'{row["mean_position_baseline_mre_px"]:>13.2f}'
    )
  return '\n'.join(lines)
