"""The optimiser by config (`train.state.make_optimizer`, issue 13): Adam unchanged, AdamW against a
hand-written NumPy step in float64, its decay mask, MAE's recipe in the config, one-line errors;
and the methods that train a ResNet refusing `model.arch='vit'`."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from aacp_jax.train import pretrain as pretrain_experiment
from aacp_jax.train import state as state_lib
from configs import pretrain
from tests.devices import run_check


def _params(dtype=np.float32, seed=0):
  """A small tree with every kind of leaf the mask sorts: kernels, biases, norm scales, a patch
  conv, the class and mask tokens (1-D), a learned position embedding (2-D)."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: rng.standard_normal(shape).astype(dtype)
  return {
    'encoder_ct': {
      'patch_embed': {'kernel': draw(2, 2, 3, 4), 'bias': draw(4)},
      'cls_token': draw(4),
      'pos_embed': draw(5, 4),
      'block0': {
        'norm1': {'scale': draw(4), 'bias': draw(4)},
        'attn': {'qkv': {'kernel': draw(4, 12), 'bias': draw(12)}},
      },
    },
    'decoder_ct': {'mask_token': draw(4), 'pred': {'kernel': draw(4, 12), 'bias': draw(12)}},
    'bn1': {'scale': draw(4), 'bias': draw(4)},
  }


# The mask by hand: decay only the kernels (>= 2-D) that are not position embeddings.
MASK = {
  'encoder_ct': {
    'patch_embed': {'kernel': True, 'bias': False},
    'cls_token': False,
    'pos_embed': False,
    'block0': {
      'norm1': {'scale': False, 'bias': False},
      'attn': {'qkv': {'kernel': True, 'bias': False}},
    },
  },
  'decoder_ct': {'mask_token': False, 'pred': {'kernel': True, 'bias': False}},
  'bn1': {'scale': False, 'bias': False},
}


def _optim(**values):
  base = dict(lr=1e-3, weight_decay=0.05, warmup_steps=0, grad_clip=0.0)
  return ml_collections.ConfigDict({**base, **values})


def test_decay_mask_against_the_hand_reference():
  assert state_lib.decay_mask(_params()) == MASK
  # Abstract leaves too (optax may see shapes only).
  abstract = jax.eval_shape(lambda: _params())
  assert state_lib.decay_mask(abstract) == MASK


def test_adam_is_the_default_and_unchanged():
  # A config without `name`, `b1`, `b2` (fine-tuning's, the detector's) and the pretraining
  # default both give exactly the chain every earlier run trained with.
  params = _params()
  grads = [_params(seed=s) for s in (1, 2, 3)]
  old_schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup_steps=1, decay_steps=10)
  old = optax.chain(optax.add_decayed_weights(1e-6), optax.adam(old_schedule))
  for cfg in (_optim(weight_decay=1e-6, warmup_steps=1), pretrain.get_config('demo').optim):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.update(lr=1e-3, weight_decay=1e-6, warmup_steps=1)
    tx, _ = state_lib.make_optimizer(cfg, 10)
    runs = []
    for t in (old, tx):
      p, s = params, t.init(params)
      for g in grads:
        u, s = t.update(g, s, p)
        p = optax.apply_updates(p, u)
      runs.append(p)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), *runs)


def check_adamw():
  """In a float64 process: three AdamW steps of `make_optimizer` equal NumPy's, written from
  torch.optim.AdamW's update, with the warmup-cosine schedule by hand."""
  jax.config.update('jax_enable_x64', True)
  lr, wd, b1, b2, eps, total, warmup = 1e-2, 0.05, 0.9, 0.95, 1e-8, 10, 2
  cfg = _optim(name='adamw', lr=lr, weight_decay=wd, b1=b1, b2=b2, warmup_fraction=0.2)
  tx, schedule = state_lib.make_optimizer(cfg, total)
  params = _params(np.float64)
  grads = [_params(np.float64, seed=s) for s in (1, 2, 3)]

  def lr_at(t):
    if t < warmup:
      return lr * t / warmup
    return lr * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup)))

  flat_p = jax.tree.leaves(params)
  flat_mask = jax.tree.leaves(MASK)
  want = [np.array(p) for p in flat_p]
  m = [np.zeros_like(p) for p in want]
  v = [np.zeros_like(p) for p in want]
  got, state = jax.tree.map(jnp.asarray, params), tx.init(params)
  for t, g in enumerate(grads):
    assert abs(float(schedule(t)) - lr_at(t)) <= 1e-15
    # optax evaluates the schedule at its int32 step count, which JAX divides in float32 even
    # under x64: the learning rate alone is float32 (here the rounding of the float64 value).
    lr_t = float(np.float32(lr_at(t)))
    for i, gi in enumerate(jax.tree.leaves(g)):
      m[i] = b1 * m[i] + (1 - b1) * gi
      v[i] = b2 * v[i] + (1 - b2) * gi**2
      m_hat, v_hat = m[i] / (1 - b1 ** (t + 1)), v[i] / (1 - b2 ** (t + 1))
      decay = wd * want[i] if flat_mask[i] else 0.0
      want[i] = want[i] - lr_t * (m_hat / (np.sqrt(v_hat) + eps) + decay)
    updates, state = tx.update(g, state, got)
    got = optax.apply_updates(got, updates)
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), want):
    assert a.dtype == jnp.float64
    worst = max(worst, float(np.max(np.abs(np.asarray(a) - b) / (np.abs(b) + 1e-12))))
  assert worst <= 1e-12, worst
  print(f'OK: AdamW == NumPy over 3 steps in float64, max rel diff {worst:.1e}')


def test_adamw_equals_numpy_in_float64():
  assert 'OK:' in run_check('from tests.test_optim import check_adamw; check_adamw()', 1)


def test_mae_config_sets_maes_recipe_and_the_rest_keep_adam():
  for arg in ('method=mae', 'mae'):
    o = pretrain.get_config(arg).optim
    assert (o.name, o.b1, o.b2, o.weight_decay) == ('adamw', 0.9, 0.95, 0.05)
    assert o.lr == pytest.approx(1.5e-4) and (o.warmup_steps, o.warmup_fraction) == (0, 0.05)
  assert pretrain.get_config('mae').model.arch == 'vit'
  # `demo` and items still set what they name, in either order around the method.
  for arg in ('demo,method=mae', 'method=mae,demo', 'demo,mae'):
    o = pretrain.get_config(arg).optim
    assert (o.name, o.lr, o.warmup_steps, o.weight_decay) == ('adamw', 1e-3, 20, 0.05)
  assert pretrain.get_config('demo,method=mae,optim.lr=3e-4').optim.lr == 3e-4
  # The named variant on top of a resolved config (as `bench step --variants=mae` applies it):
  # MAE's model and update rule, that config's schedule.
  c = pretrain.get_config('demo')
  pretrain.VARIANTS['mae'](c)
  assert (c.method, c.model.arch, c.optim.name, c.optim.b2, c.optim.lr) == (
    'mae',
    'vit',
    'adamw',
    0.95,
    1e-3,
  )
  pretrain_experiment.check_config(c)
  for arg in (None, 'demo', 'moco_v2', 'demo,method=moco_v2', 'simclr'):
    o = pretrain.get_config(arg).optim
    assert (o.name, o.b1, o.b2, o.warmup_fraction) == ('adam', 0.9, 0.999, 0.0)
  # 5 % of the run when warmup_steps is 0.
  cfg = _optim(warmup_fraction=0.05)
  assert state_lib.warmup_steps(cfg, 1000) == 50
  assert state_lib.warmup_steps(_optim(warmup_steps=7, warmup_fraction=0.05), 1000) == 7


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('optim.name', 'sgd', r"^config.optim.name='sgd': expected one of adam, adamw$"),
    ('optim.b2', 1.0, r'^config.optim.b2=1.0: must be a finite number in \[0, 1\)$'),
    ('optim.b1', -0.1, r'^config.optim.b1=-0.1: must be'),
    ('optim.warmup_fraction', 1.5, r'^config.optim.warmup_fraction=1.5: must be'),
  ],
)
def test_bad_optimiser_values_are_one_line_naming_the_key(key, value, match):
  c = pretrain.get_config('demo,method=mae')
  c.optim[key.split('.')[1]] = value
  with pytest.raises(ValueError, match=match):
    pretrain_experiment.check_config(c)
  with pytest.raises(ValueError, match=r"^config.optim.name='sgd'"):
    state_lib.make_optimizer(_optim(name='sgd'), 10)


@pytest.mark.parametrize('arg', ['demo', 'demo,simclr', 'demo,moco_v2'])
def test_resnet_methods_refuse_a_vit(arg):
  c = pretrain.get_config(arg)
  c.model.arch = 'vit'
  with pytest.raises(ValueError, match=r"^config.model.arch='vit': method '(aacp|moco_v2)'") as e:
    pretrain_experiment.check_config(c)
  assert '\n' not in str(e.value) and "set model.arch='resnet'" in str(e.value)
