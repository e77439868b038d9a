"""Stage two: fine-tuning an encoder on a labelled task, on the shared loop, then its test metrics.

`python -m aacp_jax.main --config=configs/finetune.py:task=NAME,init=INIT --workdir=DIR` trains
the task's head (and, with `protocol='full'`, the encoder) on a label fraction of the fitting
split (`data.fraction` percent of the patients, or `data.shots` per class), and writes
`DIR/eval.json`: test metrics with 95 % patient-bootstrap CIs, the draw (examples, patients),
and the settings. `run(config, workdir)` returns the same with the fitted predictor and the test
scores, for notebooks.

Defaults are the paper's stage two (4.3): Adam, lr 1e-5 for the encoder and a separate head lr,
the task's CT window. The encoder's BatchNorm trains with it (`protocol='full'`); `'linear'`
freezes the encoder and runs the model in inference mode (fixed statistics), so only the head
learns.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aacp_jax import augment, config_checks, experiments, sharding, supervised_losses, task_specs
from aacp_jax.data import labelled
from aacp_jax.eval import bootstrap, dice, few_shot, fractions, report
from aacp_jax.eval import embed as embed_lib
from aacp_jax.modalities import IN_CHANNELS
from aacp_jax.train import inits, inputs, loop
from aacp_jax.train import state as state_lib

PROTOCOLS = ('full', 'linear')
UNCERTAIN = ('ones', 'zeros', 'ignore')
REGRESSION = ('l1', 'mse', 'huber')

RULES = (
  ('optim.head_lr', config_checks.POSITIVE),
  ('data.fraction', config_checks.Number(lo=0, hi=100, open_lo=True)),
  ('data.shots', config_checks.INDEX),
  ('data.phantom_seed', config_checks.INDEX),
  ('loss.dice_weight', config_checks.NON_NEGATIVE),
  ('eval.bootstrap', config_checks.COUNT),
  ('eval.batch_size', config_checks.COUNT),
)


def resolve(config) -> ml_collections.ConfigDict:
  """The run's complete config (what config.json records): the task's modality and window, and
  the encoder settings a pretrained init fixes. The caller's config is not changed."""
  config = copy.deepcopy(config)
  task = task_specs.get(config.task)
  config.modalities = (task.modality,)
  config.data.shares = ml_collections.ConfigDict({task.modality: 1.0})
  if config.augment.ct_window == 'task':
    config.augment.ct_window = task.ct_window
  for key, value in inits.encoder_config(config.init, task.modality).items():
    config.model[key] = value
  return config


def check_config(config) -> None:
  """One-line errors naming the key, before any data is read or anything compiles."""
  task = task_specs.get(config.task)
  state_lib.check_common(config)
  config_checks.check(config, RULES)
  for key, allowed in (
    ('protocol', PROTOCOLS),
    ('loss.uncertain', UNCERTAIN),
    ('loss.regression', REGRESSION),
  ):
    value = config
    for part in key.split('.'):
      value = value[part]
    if value not in allowed:
      raise ValueError(f'config.{key}={value!r}: expected one of {", ".join(allowed)}')
  if task.kind == 'segmentation' and config.data.image_size % 32:
    raise ValueError(
      f'config.data.image_size={config.data.image_size}: segmentation needs a multiple of 32 '
      "(the decoder mirrors the encoder's five stride-2 stages)"
    )
  if config.data.shots and task.kind not in ('binary', 'multiclass'):
    raise ValueError(
      f'config.data.shots={config.data.shots}: few-shot draws need class labels; task '
      f'{task.name} is {task.kind}'
    )


@dataclasses.dataclass(frozen=True)
class LabelledData(inputs.Data):
  """inputs.Data plus the drawn fitting subset: `fit_indices` into the fitting split,
  `fit_patients`, and the regression target's mean and std over the subset (the head predicts
  standardised targets)."""

  fit_indices: np.ndarray
  fit_patients: int
  target_mean: float
  target_std: float


def draw(config, task, table: labelled.LabelTable) -> np.ndarray:
  """The fitting subset: `data.shots` per class (one image per patient), else `data.fraction` %
  of the patients, stratified and nested across fractions (`eval.fractions`)."""
  if config.data.shots:
    return few_shot.draw_shots(
      table.strata, config.data.shots, seed=config.seed, subjects=table.subjects
    )
  strata = table.strata if task.kind != 'regression' else np.zeros(len(table.subjects), int)
  (indices,) = fractions.draw_fractions(
    table.subjects, strata, [config.data.fraction], seed=config.seed
  ).values()
  return indices


def open_data(config, workdir: str, mesh) -> LabelledData:
  task = task_specs.get(config.task)
  if config.batch_size % mesh.size:
    raise ValueError(
      f'config.batch_size={config.batch_size}: not divisible by the {mesh.size} devices'
    )
  # Without data.root: phantoms of other subjects than those the encoders pretrained on
  # (`data.phantom_seed`), the same for every seed: seeds vary the draw, not the data.
  root = inputs.prepare_data(config, workdir, seed=config.data.phantom_seed)
  table = labelled.read_labels(root, config.data.fit_split, task)
  indices = draw(config, task, table)
  values = table.values[indices]
  mean = float(values.mean()) if task.kind == 'regression' else 0.0
  std = float(values.std()) if task.kind == 'regression' else 1.0
  iterator = labelled.finetune_loader(
    root,
    config.data.fit_split,
    task,
    indices,
    config.batch_size // jax.process_count(),
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  iterator = inputs.Prefetch(iterator, lambda host: sharding.to_global(host, mesh))
  return LabelledData(
    root=root,
    batches={task.modality: config.batch_size},
    iterator=iterator,
    steps_per_epoch=max(1, len(indices) // config.batch_size),
    fit_indices=indices,
    fit_patients=len(np.unique(table.subjects[indices])),
    target_mean=mean,
    target_std=max(std, 1e-6),
  )


def make_optimizer(config, total_steps: int):
  """Adam per part: `optim.lr` for the encoder (zero updates under `protocol='linear'`),
  `optim.head_lr` for the head or decoder, each with the config's schedule."""
  enc_tx, enc_schedule = state_lib.make_optimizer(config.optim, total_steps)
  head_cfg = ml_collections.ConfigDict(config.optim.to_dict())
  head_cfg.lr = config.optim.head_lr
  head_tx, head_schedule = state_lib.make_optimizer(head_cfg, total_steps)
  if config.protocol == 'linear':
    enc_tx, enc_schedule = optax.set_to_zero(), head_schedule
  labels = lambda params: {k: ('encoder' if k == 'encoder' else 'head') for k in params}
  return optax.multi_transform({'encoder': enc_tx, 'head': head_tx}, labels), enc_schedule


def task_loss(out, batch_y, mask, task, config, data):
  """(loss, metrics) of one batch's logits for the task's kind (`supervised_losses`)."""
  logits = out['logits']
  if task.kind in ('binary', 'multiclass'):
    loss = supervised_losses.softmax_cross_entropy(logits, batch_y)
    acc = jnp.mean((jnp.argmax(logits, -1) == batch_y).astype(jnp.float32))
    return loss, {'train_accuracy': acc}
  if task.kind == 'multilabel':
    return supervised_losses.multilabel_bce(logits, batch_y, policy=config.loss.uncertain), {}
  if task.kind == 'regression':
    z = (batch_y - data.target_mean) / data.target_std
    loss = supervised_losses.regression_loss(logits[:, 0], z, kind=config.loss.regression)
    mae = jnp.mean(jnp.abs(logits[:, 0] * data.target_std + data.target_mean - batch_y))
    return loss, {'train_mae': mae}
  return supervised_losses.segmentation_loss(logits, mask, dice_weight=config.loss.dice_weight)


def make_task(config, data: LabelledData) -> loop.Task:
  task = task_specs.get(config.task)
  total_steps = config.total_steps or config.num_epochs * data.steps_per_epoch
  experiment = experiments.get('finetune')
  model = experiment.build_model(config)
  tx, schedule = make_optimizer(config, total_steps)
  train_mode = config.protocol == 'full'
  aug_cfg = ml_collections.FrozenConfigDict(config.augment)
  size = config.data.image_size

  def loss_fn(params, batch_stats, extra, batch, key, scheduled):
    del scheduled
    views = augment.augment_batch(
      key,
      batch['image'].astype(jnp.float32),
      batch['landmarks'],
      batch['landmark_visible'],
      task.modality,
      aug_cfg,
      extent=batch.get('extent'),
      out_size=size,
      masks=batch.get('mask'),
    )
    x, mask = views[0], (views[-1] if 'mask' in batch else None)
    variables = {'params': params, 'batch_stats': batch_stats}
    if train_mode:
      out, new = model.apply(variables, x, train=True, mutable=['batch_stats'])
      batch_stats = new['batch_stats']
    else:
      out = model.apply(variables, x, train=False)
    loss, metrics = task_loss(out, batch.get('y'), mask, task, config, data)
    metrics['loss'] = loss
    return loss, (batch_stats, extra, metrics)

  return loop.Task(
    model=model,
    dummy_inputs=experiment.dummy_inputs(config),
    tx=tx,
    schedule=schedule,
    loss_fn=loss_fn,
    total_steps=total_steps,
    initial_variables=inits.initial_variables(config.init, task.modality),
  )


@functools.partial(jax.jit, static_argnames=('model', 'modality', 'aug_cfg'))
def _logits(variables, images, *, model, modality, aug_cfg):
  x = augment.preprocess(images.astype(jnp.float32), modality, aug_cfg)
  return model.apply(variables, x, train=False)['logits']


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A fine-tuned model as a function of raw images (N, S, S, C) in stored units -> scores:
  class probabilities (N, C) (binary: column 1 positive), label probabilities (N, L),
  predictions (N,) in the target's unit, or class probabilities per pixel (N, S, S, C)."""

  model: Any
  variables: dict
  task: Any
  aug_cfg: Any
  target_mean: float = 0.0
  target_std: float = 1.0
  batch_size: int = 64

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images)
    expect = IN_CHANNELS[self.task.modality]
    if images.ndim != 4 or images.shape[-1] != expect:
      raise ValueError(
        f'task {self.task.name}: images of shape (N, H, W, {expect}) expected, got {images.shape}'
      )
    fn = lambda chunk: _logits(
      self.variables, chunk, model=self.model, modality=self.task.modality, aug_cfg=self.aug_cfg
    )
    logits = embed_lib.in_batches(fn, images, self.batch_size).astype(np.float64)
    if self.task.kind == 'multilabel':
      return 1.0 / (1.0 + np.exp(-logits))
    if self.task.kind == 'regression':
      return logits[:, 0] * self.target_std + self.target_mean
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _pooled_dice(c):
  return lambda pred, truth: dice.dice_binary(np.isin(pred, c), np.isin(truth, c))


def mean_foreground_dice(task):
  """(pred, truth) -> the mean over foreground classes of pooled Dice ('dice')."""
  fg = range(1, task.num_outputs)
  return lambda pred, truth: float(np.mean([_pooled_dice((c,))(pred, truth) for c in fg]))


def segmentation_metrics(pred, truth, task, *, groups, n_bootstrap, seed=0) -> dict:
  """Pooled Dice per foreground class and region, and their mean ('dice'), with patient CIs.
  Both empty counts as 1 (`eval.dice`)."""
  ci = functools.partial(bootstrap.bootstrap_ci, groups=groups, n=n_bootstrap, seed=seed)
  names = task.class_names or tuple(str(c) for c in range(task.num_outputs))
  out = {}
  for c in range(1, task.num_outputs):
    out[f'dice_{names[c]}'] = ci(_pooled_dice((c,)), pred, truth)
  for name, classes in task.regions:
    out[f'dice_{name}'] = ci(_pooled_dice(tuple(classes)), pred, truth)
  out['dice'] = ci(mean_foreground_dice(task), pred, truth)
  return out


def _test_truth(arrays, task, config):
  if task.kind == 'segmentation':
    return labelled.record_value({'mask': arrays['mask']}, task, 'the test split')
  if task.target == 'lesion_area':
    return 100.0 * (arrays['mask'] > 0).mean(axis=(1, 2))
  key = {'binary': 'label', 'multiclass': 'label'}.get(task.kind, task.label_key)
  if key not in arrays:
    raise ValueError(f'the test split has no {key!r} for every record (task {task.name})')
  y = arrays[key]
  if task.kind == 'multilabel':
    # Evaluation needs a definite label: uncertain ones follow the training policy
    # ('ignore' counts them negative, as CheXpert's blank).
    return np.where(y < 0, 1 if config.loss.uncertain == 'ones' else 0, y).astype(np.int8)
  return y


def evaluate(config, predictor: Predictor, root: str):
  """(test scores, {metric: CI}, truth, subjects) on `config.data.test_split`."""
  task = predictor.task
  arrays = embed_lib.load_split(
    root, config.data.test_split, task.modality, config.data.image_size, aug_cfg=config.augment
  )
  truth = _test_truth(arrays, task, config)
  scores = predictor(arrays['image'])
  groups, n = arrays['subject'], config.eval.bootstrap
  if task.kind == 'segmentation':
    metrics = segmentation_metrics(scores.argmax(-1), truth, task, groups=groups, n_bootstrap=n)
  elif task.kind == 'regression':
    metrics = report.regression_metrics(truth, scores, groups=groups, n_bootstrap=n)
  else:
    threshold = config.eval.threshold if task.kind == 'binary' else None
    metrics = report.classification_metrics(
      truth, scores, groups=groups, threshold=threshold, n_bootstrap=n
    )
  return scores, metrics, truth, groups


# What a cell leaves for later aggregation (`label_efficiency`, the study): the test scores
# (segmentation: predicted class maps, uint8), the truth and each test image's subject hash.
TEST_ARRAYS = ('test_scores.npy', 'test_truth.npy', 'test_subjects.npy')


def save_test_arrays(workdir, task, scores, truth, subjects) -> None:
  if task.kind == 'segmentation':
    scores = scores.argmax(-1).astype(np.uint8)
  else:
    scores = np.asarray(scores, np.float32)
  for name, array in zip(TEST_ARRAYS, (scores, truth, subjects)):
    np.save(os.path.join(workdir, name), np.asarray(array), allow_pickle=False)


def load_test_arrays(workdir) -> tuple:
  """(scores, truth, subjects) that `run` saved in a cell's workdir."""
  return tuple(np.load(os.path.join(workdir, n), allow_pickle=False) for n in TEST_ARRAYS)


@dataclasses.dataclass
class FineTuned:
  """`run`'s result: `predictor` (raw images -> scores), the test `evaluation`
  (`report.Evaluation`: predictor, scores, metrics, info), `results` (eval.json's body), the
  resolved `config` and the `workdir`."""

  predictor: Predictor
  evaluation: report.Evaluation
  results: dict
  config: Any
  workdir: str


def _ci_json(ci) -> dict:
  return {'estimate': ci.estimate, 'low': ci.low, 'high': ci.high, 'n_valid': ci.n_valid}


def run(config, workdir: str, *, evaluate_test: bool = True) -> FineTuned | dict:
  """Resolves, checks and trains `config` in `workdir`, then evaluates on the test split.

  Returns `FineTuned`, or {'stopped_at': step} when a signal stopped training."""
  config = resolve(config)
  check_config(config)
  trained = loop.train(config, workdir, make_task, open_data=open_data)
  if trained.stopped_at is not None:
    return {'stopped_at': trained.stopped_at}
  task, data = task_specs.get(config.task), trained.data
  predictor = Predictor(
    model=trained.task.model,
    variables=jax.device_get(trained.state.variables),
    task=task,
    aug_cfg=ml_collections.FrozenConfigDict(config.augment),
    target_mean=data.target_mean,
    target_std=data.target_std,
    batch_size=config.eval.batch_size,
  )
  info = {
    'task': task.name,
    'kind': task.kind,
    'modality': task.modality,
    'init': config.init,
    'protocol': config.protocol,
    'fraction': float(config.data.fraction) if not config.data.shots else None,
    'shots': int(config.data.shots) or None,
    'seed': int(config.seed),
    'steps': int(trained.task.total_steps),
    'fit_examples': int(len(data.fit_indices)),
    'fit_patients': int(data.fit_patients),
    'image_size': int(config.data.image_size),
  }
  scores, metrics, truth, subjects = (
    evaluate(config, predictor, data.root) if evaluate_test else (None, {}, None, None)
  )
  info['test_examples'] = None if scores is None else int(len(scores))
  results = {**info, 'metrics': {k: _ci_json(v) for k, v in metrics.items()}}
  if jax.process_index() == 0:
    if scores is not None:
      save_test_arrays(workdir, task, scores, truth, subjects)
    with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)
  evaluation = report.Evaluation(predictor=predictor, scores=scores, metrics=metrics, info=info)
  return FineTuned(predictor, evaluation, results, config, workdir)


def train_and_evaluate(config, workdir: str) -> dict:
  out = run(config, workdir)
  return out if isinstance(out, dict) else out.results


def format_results(results: dict, workdir: str) -> str:
  if 'metrics' not in results:
    return ''
  draw_text = (
    f'{results["shots"]} per class'
    if results.get('shots')
    else f'{results["fraction"]:g} % of the patients'
  )
  lines = [
    f'\nFine-tuned {results["task"]} ({results["kind"]}, init {results["init"]}, '
    f'{results["protocol"]}): {draw_text} = {results["fit_examples"]} images of '
    f'{results["fit_patients"]} patients, {results["steps"]} steps; test '
    f'{results["test_examples"]} images',
    f'{"metric":<22}{"value":>8}   95% CI (patients resampled)',
  ]
  for name, m in results['metrics'].items():
    lines.append(f'{name:<22}{m["estimate"]:>8.3f}   [{m["low"]:.3f}, {m["high"]:.3f}]')
  lines.append(f'Details: {os.path.join(workdir, "eval.json")}')
  return '\n'.join(lines)
