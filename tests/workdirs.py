"""Workdirs for tests, made without compiling a training step."""

import os

from configs import pretrain as pretrain_config


def override(config, **overrides):
  """config with dotted keys set (`override(c, **{'data.image_size': 32})`)."""
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def pretraining_workdir(path, root, modalities=('xray',)):
  """A pretraining workdir as a run leaves it (config.json and a checkpoint of the train state),
  with initialised weights: what an init reads, without compiling a pretraining step."""
  p = pretrain_config.get_config('demo,minimal')
  p.modalities = tuple(modalities)
  p.data.image_size, p.data.root, p.batch_size, p.total_steps = 32, root, 8, 2
  p.model.width, p.model.projector = 4, (16, 16, 8)
  return workdir_from_config(path, p)


def workdir_from_config(path, p):
  """`pretraining_workdir` for any pretraining config `p` (any method)."""
  from aacp_jax import checkpoint, experiments, sharding
  from aacp_jax import workdir as workdir_lib
  from aacp_jax.train import state as state_lib

  experiment = experiments.get('pretrain')
  model = experiment.build_model(p)
  tx, _ = state_lib.make_optimizer(p.optim, 2)
  state, _ = state_lib.create_state(
    model, tx, sharding.make_mesh(), experiment.dummy_inputs(p), seed=3
  )
  os.makedirs(path, exist_ok=True)
  workdir_lib.write_config(p, path)
  ckpt = checkpoint.Checkpointer(os.path.join(path, 'checkpoints'), every_steps=1, keep=1)
  ckpt.save(2, state, force=True)
  ckpt.close()
  return path
