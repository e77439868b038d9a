"""Fine-tuning models: shapes, dtypes, the encoder's tree, and that both heads can fit phantoms."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from aacp_jax import augment, supervised_losses
from aacp_jax.data import phantoms
from aacp_jax.eval import dice
from aacp_jax.models import finetune, resnet

TINY = dict(depth=18, width=4)
DECODER = (16, 16, 8, 8)


def _phantoms(n, nonempty):
  """n X-ray phantoms at 32 px (those with a lesion when `nonempty`): (images, masks)."""
  images, masks = [], []
  for i in range(200):
    r = phantoms.make_record('xray', i, seed=0, image_size=32, split='train')
    if not nonempty or r['mask'].any():
      images.append(r['image'])
      masks.append(r['mask'])
    if len(images) == n:
      break
  x = augment.preprocess(np.stack(images).astype(np.float32), 'xray')
  return x, np.stack(masks)


def _init(model, x):
  # Jitted: an eager init runs op by op, far slower than one compile on a small CPU.
  return jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_and_encoder_tree(dtype):
  # Shapes and dtypes only (jax.eval_shape: traced, not run); the fits below run the numbers.
  x = jax.ShapeDtypeStruct((2, 64, 32, 1), jnp.float32)
  key = jax.random.PRNGKey(0)
  seg = finetune.FineTuneModel(
    **TINY, dtype=dtype, head='segment', num_outputs=3, decoder_features=DECODER
  )
  cls = finetune.FineTuneModel(**TINY, dtype=dtype, head='classify', num_outputs=5)
  encoder = resnet.ResNet(**TINY, num_classes=None, dtype=dtype)
  ref = jax.eval_shape(lambda x: encoder.init(key, x, train=False), x)
  for model, shape in ((seg, (2, 64, 32, 3)), (cls, (2, 5))):
    v = jax.eval_shape(lambda x: model.init(key, x, train=False), x)
    for train in (False, True):
      out, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=train, mutable=['batch_stats']), v, x
      )
      assert out['logits'].shape == shape and out['logits'].dtype == jnp.float32
      assert out['features'].shape == (2, 32) and out['features'].dtype == jnp.float32
    for col in ('params', 'batch_stats'):
      got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), v[col]['encoder'])
      assert got == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), ref[col])
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v['params']))
    assert 'head' in v['params'] and ('decoder' in v['params']) == (model.head == 'segment')


def test_bad_size_and_builder():
  model = finetune.FineTuneModel(**TINY, head='segment', num_outputs=2, decoder_features=DECODER)
  with pytest.raises(ValueError, match=r'\(48, 40\) must be divisible by 32') as e:
    _init(model, jnp.ones((1, 48, 40, 1)))
  assert '\n' not in str(e.value)
  cfg = ml_collections.ConfigDict(dict(depth=18, width=4, dtype='bfloat16'))
  built = finetune.build_finetune_model(cfg, 'segment', 2)
  assert built.dtype == jnp.bfloat16 and built.decoder_features == (256, 128, 64, 32)
  assert not built.zero_init_residual
  cfg.decoder_features = DECODER
  assert finetune.build_finetune_model(cfg, 'classify', 1).decoder_features == DECODER
  with pytest.raises(ValueError, match='head='):
    finetune.build_finetune_model(cfg, 'detect', 1)


def _fit(model, x, loss_fn, steps, lr):
  v = _init(model, x)
  params, stats = v['params'], v['batch_stats']
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt):
    def loss(p):
      out, new = model.apply(
        {'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
      )
      return loss_fn(out['logits']), new['batch_stats']

    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, value

  for _ in range(steps):
    params, stats, opt, value = step(params, stats, opt)
  return {'params': params, 'batch_stats': stats}


def test_segmentation_overfits_phantoms():
  x, masks = _phantoms(8, nonempty=True)
  model = finetune.FineTuneModel(**TINY, head='segment', num_outputs=2, decoder_features=DECODER)
  loss = lambda logits: supervised_losses.segmentation_loss(logits, masks)[0]
  v = _fit(model, x, loss, steps=80, lr=3e-3)
  # Train-mode BN (batch statistics of these same 8 images): the running averages of a few
  # hundred steps of fast-moving weights lag the weights; fitting, not BN, is under test here.
  out, _ = model.apply(v, x, train=True, mutable=['batch_stats'])
  pred = np.asarray(jnp.argmax(out['logits'], -1))
  score = dice.dice_binary(pred == 1, masks == 1)
  assert score > 0.9, score


def test_regression_head_fits_lesion_area():
  x, masks = _phantoms(16, nonempty=False)
  target = 100.0 * masks.reshape(16, -1).mean(1)
  model = finetune.FineTuneModel(**TINY, head='classify', num_outputs=1)
  loss = lambda logits: supervised_losses.regression_loss(logits[:, 0], target, 'l1')
  v = _fit(model, x, loss, steps=40, lr=3e-3)
  out, _ = model.apply(v, x, train=True, mutable=['batch_stats'])
  mae = np.abs(np.asarray(out['logits'][:, 0]) - target).mean()
  baseline = np.abs(target - target.mean()).mean()
  assert mae < 0.3 * baseline, (mae, baseline)
