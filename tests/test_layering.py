"""Imports point one way: every import statement of the project (module level or inside a
function) is read from the source, and the package edges below are the only ones allowed.

Layers, bottom up: the leaf facts (version, modalities, errors, workdir, precision, config
checks); data, augment, models, losses and the small utilities; methods; restore and
experiments; eval; train; the commands (main, bench, inspect). data_prep sits beside the
library and uses it; configs use only the JAX-free leaf modules.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('aacp_jax', 'configs', 'data_prep')

LEAF = (
  'aacp_jax',
  'aacp_jax.version',
  'aacp_jax.modalities',
  'aacp_jax.errors',
  'aacp_jax.digest',
  'aacp_jax.workdir',
  'aacp_jax.precision',
  'aacp_jax.augment_defaults',
  'aacp_jax.config_checks',
  'aacp_jax.task_specs',
)
BASE = LEAF + (
  'aacp_jax.sharding',
  'aacp_jax.metrics',
  'aacp_jax.checkpoint',
  'aacp_jax.losses',
  'aacp_jax.supervised_losses',
)
COMMANDS = (
  'aacp_jax.main',
  'aacp_jax.bench',
  'aacp_jax.inspect',
  'aacp_jax.soak',
  'aacp_jax.finetune_bench',
  'aacp_jax.infer_bench',
  'aacp_jax.export',
)
# group -> the groups its modules may import (a module may always import its own group).
ALLOWED = {
  'leaf': ('leaf',),
  'base': ('leaf', 'base'),
  'aacp_jax.data': ('leaf', 'base'),
  'aacp_jax.augment': ('leaf', 'base', 'aacp_jax.data'),
  'aacp_jax.models': ('leaf', 'base'),
  'aacp_jax.methods': ('leaf', 'base', 'aacp_jax.data', 'aacp_jax.augment', 'aacp_jax.models'),
  'registry': ('leaf', 'base', 'aacp_jax.data', 'aacp_jax.models', 'aacp_jax.methods'),
  'aacp_jax.eval': (
    'leaf',
    'base',
    'aacp_jax.data',
    'aacp_jax.augment',
    'aacp_jax.models',
    'registry',
  ),
  'aacp_jax.train': (
    'leaf',
    'base',
    'aacp_jax.data',
    'aacp_jax.augment',
    'aacp_jax.models',
    'aacp_jax.methods',
    'registry',
    'aacp_jax.eval',
  ),
  'commands': (
    'leaf',
    'base',
    'aacp_jax.data',
    'aacp_jax.augment',
    'aacp_jax.models',
    'aacp_jax.methods',
    'registry',
    'aacp_jax.eval',
    'aacp_jax.train',
  ),
  'configs': ('leaf',),
  'data_prep': (
    'leaf',
    'base',
    'aacp_jax.data',
    'aacp_jax.augment',
    'aacp_jax.models',
    'registry',
    'aacp_jax.eval',
  ),
}


def group(module: str) -> str:
  if module in LEAF:
    return 'leaf'
  if module in BASE:
    return 'base'
  if module in ('aacp_jax.restore', 'aacp_jax.experiments'):
    return 'registry'
  if module in COMMANDS or module.split('.')[:2] == ['aacp_jax', 'study']:
    return 'commands'  # the study drives pretraining and fine-tuning runs, like main.py
  top = module.split('.')[:2]
  if top[0] in ('configs', 'data_prep'):
    return top[0]
  name = '.'.join(top)
  if name not in ALLOWED:
    raise AssertionError(f'{module}: in no layer of tests/test_layering.py; add it there')
  return name


def project_modules() -> dict:
  """module name -> source path for every .py file of the three packages."""
  out = {}
  for package in PACKAGES:
    for folder, _, names in os.walk(os.path.join(ROOT, package)):
      for n in names:
        if n.endswith('.py'):
          rel = os.path.relpath(os.path.join(folder, n), ROOT)[:-3].split(os.sep)
          if rel[-1] == '__init__':
            rel = rel[:-1]
          out['.'.join(rel)] = os.path.join(folder, n)
  return out


def imports_of(module: str, path: str, modules: dict) -> set:
  """Project modules that `module` imports (`from pkg import sub` counts as pkg.sub)."""
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  is_package = path.endswith('__init__.py')
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = module.split('.')
        parts = parts if is_package else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = '.'.join(parts + ([base] if base else []))
      names = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition('.')[0]
      if name and name != module:
        found.add(name)
  return found


def graph():
  modules = project_modules()
  return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_edge_is_allowed():
  bad = []
  for module, targets in graph().items():
    g = group(module)
    for target in sorted(targets):
      t = group(target)
      if t != g and t not in ALLOWED[g]:
        bad.append(f'{module} ({g}) imports {target} ({t})')
  assert not bad, '\n'.join(bad)


def test_no_cycles():
  edges = graph()
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for t in sorted(edges[m]):
      # A package's own __init__ importing its submodules is how packages export; not a cycle.
      if m.startswith(t + '.'):
        continue
      if state.get(t) == 'open':
        cycles.append(' -> '.join(stack[stack.index(t) :] + [t]))
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = 'done'

  for m in sorted(edges):
    if m not in state:
      visit(m)
  assert not cycles, '\n'.join(cycles)


def test_the_rules_catch_a_back_edge():
  # The checks above must be able to fail: models importing data is a back edge.
  assert 'aacp_jax.data' not in ALLOWED['aacp_jax.models']
  modules = project_modules()
  assert 'aacp_jax.data.landmarks' in imports_of(
    'aacp_jax.methods.aacp', modules['aacp_jax.methods.aacp'], modules
  )


@pytest.mark.parametrize('module', ['configs.pretrain', 'configs.landmarks'])
def test_configs_load_without_jax(module):
  code = (
    f'import sys; import {module} as c; c.get_config("demo"); '
    'bad = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "flax", "optax"}); '
    'assert not bad, bad'
  )
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, timeout=1800)
