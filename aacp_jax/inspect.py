"""`python -m aacp_jax.inspect --config=configs/pretrain.py[:VARIANT]`: model size as JSON.

Parameter counts per submodule (`params`: encoder_<m>, fpn_<m>, levels_<m>, roi_<m>,
landmarks_<m>, projector, total) and per component (`components`: the encoder of each modality,
the feature pyramid with its level projections, the shared projector, the landmark heads, ROI
attention) come from `jax.eval_shape`, so a ResNet-50 is never materialised. FLOPs per example
come from XLA's cost analysis of the compiled eval-mode forward pass of every output (embedding,
pyramid levels, landmarks, attention map), one modality at a time.
"""

import json

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from aacp_jax import methods
from aacp_jax.models import inputs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file[:variants].', lock_config=True
)
flags.DEFINE_bool('flops', True, 'Also compile each forward pass for XLA FLOPs (slower).')


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def dummy_inputs(config, batch: int = 1):
  return inputs.dummy_inputs(config.modalities, config.data.image_size, batch)


def parameter_counts(config) -> dict:
  model = methods.get(config.method).build_model(config)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), dummy_inputs(config, 2), train=False)
  )
  params = shapes['params']
  out = {name: count(sub) for name, sub in params.items()}
  out['total'] = count(params)
  out['batch_stats'] = count(shapes.get('batch_stats', {}))
  return out


# Component -> submodule name prefixes (a submodule per modality for all but the projector).
COMPONENTS = {
  'fpn': ('fpn_', 'levels_'),
  'projector': ('projector',),
  'landmark_head': ('landmarks_',),
  'roi_attention': ('roi_',),
}


def component_counts(params_counts: dict) -> dict:
  """{'encoder_<m>': n for each modality, 'fpn', 'projector', 'landmark_head', 'roi_attention'};
  a component that is off counts 0."""
  out = {k: v for k, v in params_counts.items() if k.startswith('encoder_')}
  for name, prefixes in COMPONENTS.items():
    out[name] = sum(
      v
      for k, v in params_counts.items()
      if k not in ('total', 'batch_stats') and k.startswith(prefixes)
    )
  return out


def flops_per_example(config) -> dict:
  model = methods.get(config.method).build_model(config)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), dummy_inputs(config, 2), train=False)
  )
  out = {}
  batch = 8
  for m, x in dummy_inputs(config, batch).items():
    # Every output, so XLA keeps every head (returning only 'z' would prune the pyramid).
    fwd = jax.jit(lambda v, x, m=m: model.apply(v, {m: x}, train=False)[m])
    cost = fwd.lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[m] = float(cost.get('flops', float('nan'))) / batch
  return out


def main(argv):
  del argv
  config = FLAGS.config
  report = {
    'variant': config.get('variant', ''),
    'image_size': config.data.image_size,
    'depth': config.model.depth,
    'width': config.model.width,
    'params': parameter_counts(config),
  }
  report['components'] = component_counts(report['params'])
  if FLAGS.flops:
    report['flops_per_example_forward'] = flops_per_example(config)
  print(json.dumps(report, indent=2))


if __name__ == '__main__':
  app.run(main)
