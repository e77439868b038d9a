"""The study's cells: one pretraining per method, then one fine-tuning per method x task x
label setting x seed, each keyed by a hash of its resolved config.

A key must not depend on where the study lives (its workdir may move, a SLURM job sees another
mount path) and must change with anything that changes the run: it hashes the resolved config's
JSON (keys sorted), with the paths the study itself fills in (the init's pretraining workdir,
the shared phantom root) replaced by what decides them (the pretraining cell's key; the phantom
settings already in the config).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
from typing import Any

from aacp_jax import task_specs

NO_PRETRAINING = ('random', 'imagenet')
# Recorded by the variants machinery: the spelling of a config, not the config.
_NOT_HASHED = ('variant',)


@dataclasses.dataclass(frozen=True)
class Cell:
  """kind 'pretrain' (task, fraction None, shots 0) or 'finetune'; `config` is what runs (a
  finetune cell's `init` is filled with the pretraining workdir when it runs); `needs` is the
  key of the pretraining cell it reads, or None."""

  kind: str
  method: str
  task: str | None
  fraction: float | None
  shots: int
  seed: int
  config: Any
  key: str
  config_hash: str
  needs: str | None = None
  resolved: Any = None  # finetune: the resolved config (encoder settings of the init) to check

  @property
  def labels(self) -> str:
    """The label setting as a table prints it: '10 %' or '5-shot'."""
    return f'{self.shots}-shot' if self.shots else f'{self.fraction:g} %'

  @property
  def name(self) -> str:
    if self.kind == 'pretrain':
      return f'pretrain {self.method}'
    return f'{self.method} {self.task} {self.labels} seed {self.seed}'

  def path(self, workdir: str) -> str:
    if self.kind == 'pretrain':
      return os.path.join(workdir, 'pretrain', f'{self.method}-{self.key[:8]}')
    label = f's{self.shots}shot' if self.shots else f'f{self.fraction:g}'
    return os.path.join(
      workdir, 'finetune', self.method, self.task, label, f's{self.seed}-{self.key[:8]}'
    )


def config_hash(config) -> str:
  """16 hex of sha256 over the config's JSON, keys sorted (tuples and lists alike)."""
  d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  for k in _NOT_HASHED:
    d.pop(k, None)
  text = json.dumps(d, sort_keys=True, default=list, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_key(kind, method, task, fraction, shots, seed, chash) -> str:
  ids = [kind, method, task, None if fraction is None else float(fraction), int(shots), int(seed)]
  text = json.dumps(ids + [chash])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config_file(path: str, arg: str, key: str):
  """get_config(arg) of a config file given by path (the library imports no configs package);
  relative paths are read from the working directory, else from the repository root."""
  if not os.path.isabs(path) and not os.path.isfile(path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, path)
  if not os.path.isfile(path):
    raise ValueError(f'config.{key}={path}: no such file')
  spec = importlib.util.spec_from_file_location(f'_study_{key}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


def _join(*parts) -> str:
  return ','.join(p for p in parts if p)


def pretrain_variants(study) -> set:
  module, _ = load_config_file(study.pretrain_config, '', 'pretrain_config')
  return set(module.VARIANTS)


def table6_rows(study) -> list:
  """The study's methods that are Table 6 rows (the pretrain config file's `TABLE6`), in the
  study's order; MoCo-v2, MAE and the inits are Table 5 columns only."""
  module, _ = load_config_file(study.pretrain_config, '', 'pretrain_config')
  rows = set(getattr(module, 'TABLE6', ()))
  return [m for m in study.methods if m in rows]


def pretrain_config(study, method: str):
  _, c = load_config_file(study.pretrain_config, _join(study.pretrain, method), 'pretrain_config')
  if study.pretrain_root:
    c.data.root = study.pretrain_root
  return c


def encoder_settings(pre) -> dict:
  """What a pretraining workdir's config.json fixes in a fine-tuning config (the same fields as
  `train.inits.encoder_config`, read from the config before the workdir exists)."""
  from aacp_jax.train import inits  # JAX-importing: only when a plan is resolved

  return inits.encoder_fields(pre.model)


def task_roots(study) -> dict:
  out = {}
  for item in [i for i in study.task_roots.split(',') if i.strip()]:
    if '=' not in item:
      raise ValueError(f'config.task_roots: expected task=ROOT pairs, got {item!r}')
    task, root = (p.strip() for p in item.split('=', 1))
    out[task] = root
  return out


def finetune_config(study, method, task, fraction, shots, seed, pre=None, pre_key=None):
  """(config to run, config to hash): `init` is 'random', 'imagenet:PATH' or, for a pretrained
  method, filled in when the cell runs; the hashed copy names the pretraining cell instead."""
  from aacp_jax.train import finetune  # lazy: planning a study must not compile anything

  _, c = load_config_file(study.finetune_config, study.finetune, 'finetune_config')
  c.task, c.seed = task, int(seed)
  c.data.fraction = float(fraction if fraction is not None else 100.0)
  c.data.shots = int(shots)
  c.data.root = task_roots(study).get(task, c.data.root)
  c.init = 'imagenet:' + study.imagenet_weights if method == 'imagenet' else 'random'
  resolved = finetune.resolve(c)
  if pre is not None:
    for k, v in encoder_settings(pre).items():
      resolved.model[k] = v
  hashed = copy.deepcopy(resolved)
  if pre_key is not None:
    hashed.init = f'pretrain:{pre_key}'
  return c, resolved, hashed


def label_settings(study, task):
  """(fraction, shots) pairs of a task: each fraction, then `shots` per class for class tasks."""
  out = [(float(f), 0) for f in study.fractions]
  if study.shots and task_specs.get(task).kind in ('binary', 'multiclass'):
    out.append((None, int(study.shots)))
  return out


def methods_of(study) -> list:
  """The methods the study runs: `imagenet` only with weights."""
  return [m for m in study.methods if m != 'imagenet' or study.imagenet_weights]


def plan(study) -> list[Cell]:
  """Every cell, pretraining first (a downstream cell needs its method's pretraining)."""
  check_study(study)
  pre_cells, cells = {}, []
  for method in methods_of(study):
    if method in NO_PRETRAINING:
      continue
    c = pretrain_config(study, method)
    h = config_hash(c)
    pre_cells[method] = Cell('pretrain', method, None, None, 0, 0, c, '', h)
    pre_cells[method] = dataclasses.replace(
      pre_cells[method], key=cell_key('pretrain', method, None, None, 0, 0, h)
    )
  cells += list(pre_cells.values())
  for task in study.tasks:
    for method in methods_of(study):
      pre = pre_cells.get(method)
      for fraction, shots in label_settings(study, task):
        for seed in study.seeds:
          run_cfg, resolved, hashed = finetune_config(
            study,
            method,
            task,
            fraction,
            shots,
            seed,
            pre.config if pre else None,
            pre.key if pre else None,
          )
          h = config_hash(hashed)
          key = cell_key('finetune', method, task, fraction, shots, seed, h)
          cells.append(
            Cell(
              'finetune',
              method,
              task,
              fraction,
              shots,
              int(seed),
              run_cfg,
              key,
              h,
              pre.key if pre else None,
              resolved,
            )
          )
  return cells


def check_study(study) -> None:
  """The study's own keys, one line naming the key, before any config file is read further."""
  known = pretrain_variants(study) | set(NO_PRETRAINING)
  for m in study.methods:
    if m not in known:
      raise ValueError(
        f'config.methods: unknown method {m!r}; expected random, imagenet or a variant of '
        f'{study.pretrain_config}'
      )
  if len(set(study.methods)) != len(study.methods):
    raise ValueError(f'config.methods: a method is listed twice in {list(study.methods)}')
  if study.imagenet_weights and not os.path.isfile(study.imagenet_weights):
    raise ValueError(f'config.imagenet_weights={study.imagenet_weights}: no such file')
  for key in ('reference', 'baseline'):
    if study[key] not in study.methods:
      raise ValueError(f'config.{key}={study[key]!r}: not in config.methods')
  for t in study.tasks:
    if t not in task_specs.TASKS:
      raise ValueError(f'config.tasks: unknown task {t!r}; expected one of task_specs.TASKS')
  if not study.tasks or not study.seeds or not (study.fractions or study.shots):
    raise ValueError('config.tasks, config.seeds and config.fractions (or shots) must be non-empty')
  for f in study.fractions:
    if not 0 < float(f) <= 100:
      raise ValueError(f'config.fractions: {f} is not a percent in (0, 100]')
  for s in study.seeds:
    if int(s) != s or s < 0:
      raise ValueError(f'config.seeds: {s} is not a non-negative integer')
  if int(study.shots) != study.shots or study.shots < 0:
    raise ValueError(f'config.shots={study.shots}: a non-negative integer expected')
  if int(study.embedding_checkpoints) < 1:
    raise ValueError(f'config.embedding_checkpoints={study.embedding_checkpoints}: at least 1')
  roots = task_roots(study)
  for t in roots:
    if t not in study.tasks:
      raise ValueError(f'config.task_roots: {t!r} is not in config.tasks')
  _, ft = load_config_file(study.finetune_config, study.finetune, 'finetune_config')
  for t in study.tasks:
    if task_specs.get(t).dataset != 'phantom' and not (roots.get(t) or ft.data.root):
      raise ValueError(
        f'config.task_roots: task {t!r} reads prepared shards; give {t}=ROOT (phantoms exist '
        'only for the phantom_* tasks)'
      )
    if roots.get(t) and not os.path.isdir(roots[t]):
      raise ValueError(f'config.task_roots: {t}={roots[t]}: no such directory')


def check_cells(cells) -> None:
  """Every cell's config passes its run's own checks (one line naming the cell and the key)
  before the first cell trains."""
  from aacp_jax.train import finetune, pretrain

  for cell in cells:
    try:
      if cell.kind == 'pretrain':
        pretrain.check_config(cell.config)
      else:
        finetune.check_config(cell.resolved)
    except ValueError as e:
      raise ValueError(f'{cell.name}: {e}') from None
