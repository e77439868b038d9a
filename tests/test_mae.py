"""MAE (issue 13): the ViT-B/16 size, masking and loss against NumPy, config errors, 4 devices ==
1 in float64, and fine-tuning (both heads) from an MAE workdir on the shared loop."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacp_jax.methods import mae
from aacp_jax.models import finetune as finetune_models
from aacp_jax.models import vit
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from tests import workdirs
from tests.devices import run_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4
RTOL = 1e-9
TINY_VIT = dict(patch_size=8, depth=2, width=32, heads=4, mlp_dim=64)
TINY_DECODER = dict(depth=1, width=16, heads=2, mlp_dim=32)


def tiny_config(modalities=('xray',), **overrides):
  """`demo,method=mae` at 32 px with a 2-block ViT of 32 (4 x 4 patches of 8) and a 1-block decoder."""
  c = pretrain_config.get_config('demo,method=mae')
  c.modalities = tuple(modalities)
  c.data.image_size, c.batch_size, c.total_steps = 32, 8, 2
  c.model.vit.update(TINY_VIT)
  c.mae.decoder.update(TINY_DECODER)
  return workdirs.override(c, **overrides)


def count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_vit_b16_parameter_count():
  # Traced, not run: ViT-B/16 on 224² RGB, no classifier.
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  sizes = {}
  for pos in vit.POS_EMBEDS:
    model = vit.ViT(vit.Spec(pos_embed=pos))
    sizes[pos] = count(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)['params'])
  # timm's vit_base_patch16_224 without its head: patch embedding 590,592 + class token 768 +
  # learned positions 197 x 768 = 151,296 + 12 blocks x 7,087,872 + final norm 1,536.
  assert sizes['learned'] == 85_798_656
  # MAE's fixed sin-cos positions are a constant, not a parameter.
  assert sizes['sincos'] == 85_798_656 - 197 * 768 == 85_647_360
  # The per-modality patch embedding takes each modality's channels (CT 64, X-ray 1).
  c = pretrain_config.get_config('method=mae')
  model = mae.build_model(c)
  from aacp_jax.models import inputs

  params = jax.eval_shape(
    lambda: model.init(jax.random.key(0), inputs.dummy_inputs(c.modalities, 224), train=False)
  )['params']
  assert params['encoder_ct']['patch_embed']['kernel'].shape == (16, 16, 64, 768)
  assert params['decoder_xray']['pred']['kernel'].shape == (512, 16 * 16 * 1)
  assert count(params['encoder_mri']) == sizes['sincos']
  assert count(params['decoder_mri']) == 26_008_320  # MAE's ViT-B decoder (8 x 512)


def test_masking_against_numpy():
  b, n, k, d = 5, 16, 4, 3
  noise = np.random.default_rng(0).uniform(size=(b, n))
  keep, mask, restore = (np.asarray(a) for a in vit.random_masking(jnp.asarray(noise), 0.75))
  shuffle = np.argsort(noise, axis=1, kind='stable')
  np.testing.assert_array_equal(keep, shuffle[:, :k])  # the K lowest noises, in noise order
  np.testing.assert_array_equal(restore, np.argsort(shuffle, axis=1, kind='stable'))
  want = np.ones((b, n))
  np.put_along_axis(want, shuffle[:, :k], 0.0, axis=1)
  np.testing.assert_array_equal(mask, want)
  assert (mask.sum(1) == 12).all()  # exactly 75 % in every sample
  assert len({tuple(r) for r in keep}) == b  # a different subset per sample
  # The decoder's unshuffle: kept token i back at patch keep[i], the mask token elsewhere.
  kept = np.random.default_rng(1).normal(size=(b, k, d)).astype(np.float32)
  token = np.array([7.0, 8.0, 9.0], np.float32)
  got = np.asarray(vit.unshuffle(jnp.asarray(kept), jnp.asarray(token), jnp.asarray(restore)))
  ref = np.broadcast_to(token, (b, n, d)).copy()
  for i in range(b):
    ref[i, keep[i]] = kept[i]
  np.testing.assert_array_equal(got, ref)
  # And the encoder's gather of `keep` is the same subset of the patchified image.
  x = np.random.default_rng(2).normal(size=(b, 32, 32, 2)).astype(np.float32)
  patches = np.asarray(vit.patchify(jnp.asarray(x), 8))
  assert patches.shape == (b, n, 128)
  np.testing.assert_array_equal(patches[1, 5], x[1, 8:16, 8:16].reshape(-1))  # row 1, column 1
  assert vit.num_kept(196, 0.75) == 49 and vit.num_kept(10, 0.7) == 3


def _loss_reference(pred, target, mask, norm_pix):
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, ddof=1, keepdims=True)
    target = (target - mean) / np.sqrt(var + 1e-6)
  return ((pred - target) ** 2).mean(-1)[mask == 1].mean()


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_on_masked_patches_with_normalised_targets(norm_pix):
  rng = np.random.default_rng(3)
  pred = rng.normal(size=(4, 16, 12))
  target = 5.0 + 3.0 * rng.normal(size=(4, 16, 12))
  _, mask, _ = vit.random_masking(jnp.asarray(rng.uniform(size=(4, 16))), 0.75)
  mask = np.asarray(mask)
  loss = lambda p: float(mae.reconstruction_loss(jnp.asarray(p), target, mask, norm_pix))
  np.testing.assert_allclose(loss(pred), _loss_reference(pred, target, mask, norm_pix), rtol=1e-5)
  # Predictions of the visible patches do not enter the loss; those of masked ones do.
  moved = pred + 100.0 * (mask == 0)[..., None]
  assert loss(moved) == loss(pred)
  assert loss(pred + 0.1 * (mask == 1)[..., None]) != loss(pred)


def test_configs_and_bad_values_name_the_key():
  from aacp_jax.train import pretrain

  for arg in ('method=mae', 'demo,method=mae'):
    c = pretrain_config.get_config(arg)
    pretrain.check_config(c)
    assert c.model.arch == 'vit'
  assert pretrain_config.get_config('method=mae').model.vit.width == 768
  assert pretrain_config.get_config('demo,method=mae').model.vit.depth == 2
  assert pretrain_config.get_config('demo').model.arch == 'resnet'
  for key, value, message in [
    ('data.image_size', 36, r'config.data.image_size=36: not divisible by config.model.vit'),
    ('mae.mask_ratio', 1.0, r'config.mae.mask_ratio=1.0: must be a finite number in \(0, 1\)'),
    ('mae.mask_ratio', 0.97, r'config.mae.mask_ratio=0.97: keeps 0 of the 16 patches'),
    ('model.vit.heads', 5, r'config.model.vit.width=32: not divisible by config.model.vit.heads'),
    ('mae.decoder.width', 18, r'config.mae.decoder.width=18: must be a multiple of 4'),
    ('model.vit.pos_embed', 'rope', r"config.model.vit.pos_embed='rope': expected one of"),
    ('model.arch', 'resnet', r"config.model.arch='resnet': method 'mae' trains a ViT"),
    ('mae.crop_area', (0.9, 0.5), r'config.mae.crop_area=\(0.9, 0.5\): need low <= high'),
  ]:
    with pytest.raises(ValueError, match=message) as e:
      pretrain.check_config(tiny_config(**{key: value}))
    assert '\n' not in str(e.value)
  # The fine-tuning model names the key too.
  cfg = {'arch': 'swin', 'dtype': 'float32', 'vit': TINY_VIT}
  with pytest.raises(ValueError, match=r"config.model.arch='swin': expected one of"):
    finetune_models.build_finetune_model(cfg, 'classify', 2)
  with pytest.raises(ValueError, match=r'config.model.vit.width=32: not divisible by'):
    finetune_models.build_finetune_model(
      dict(cfg, arch='vit', vit=dict(TINY_VIT, heads=3)), 'segment', 2
    )


def test_light_augmentation_is_crop_and_flip_only():
  c = tiny_config()
  for m, flip in (('xray', 0.5), ('ct', 0.0)):
    a = mae.aug_config(c, m)
    assert not a.anatomy_aware and a.simclr.area == (0.2, 1.0) and a.simclr.flip_p == flip
    assert a.brightness.p == a.contrast.p == a.noise.p == a.cutout.p == 0.0
    assert a.ct_window == c.augment.ct_window  # the normalisation stays the config's


# --- 4 devices == 1, float64 (subprocess: x64 and the device count stay out of this process) ---


def run_on(devices, config, host_batch):
  from aacp_jax import methods, sharding
  from aacp_jax.methods.base import RunInfo
  from aacp_jax.models import inputs
  from aacp_jax.train import state as state_lib
  from aacp_jax.train.step import train_step

  mesh = sharding.make_mesh(devices)
  method = methods.get(config.method)
  model = method.build_model(config)
  tx, schedule = state_lib.make_optimizer(config.optim, 100)
  state, shardings = state_lib.create_state(
    model, tx, mesh, inputs.dummy_inputs(config.modalities, config.data.image_size), config.seed
  )
  run = RunInfo(steps_per_epoch=1, total_steps=1)
  step = jax.jit(
    functools.partial(
      train_step,
      loss_fn=method.make_loss(config, model, run),
      tx=tx,
      schedule=schedule,
      seed=config.seed,
      schedules=method.make_schedules(config, run),
    ),
    in_shardings=(shardings, sharding.batch_sharded(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
  )
  return jax.device_get(step(state, jax.device_put(host_batch, sharding.batch_sharded(mesh))))


def check_sharded():
  """Runs in the subprocess: one MAE step on 1 and on 4 devices, every leaf compared."""
  jax.config.update('jax_enable_x64', True)
  from aacp_jax.train import pretrain
  from tests import test_step_sharded

  assert jax.device_count() == DEVICES
  config = tiny_config(**{'model.dtype': 'float64'})
  pretrain.check_config(config)
  host = test_step_sharded.phantom_batch(config, {'xray': config.batch_size})
  state1, metrics1 = run_on(jax.devices()[:1], config, host)
  state_n, metrics_n = run_on(jax.devices(), config, host)
  leaves = jax.tree.leaves(state1.params)
  assert all(x.dtype == np.float64 for x in leaves), {x.dtype for x in leaves}
  assert np.isfinite(metrics1['loss']) and metrics1['loss'] > 0
  assert metrics1['loss'] == metrics1['mae_xray'] and metrics1['grad_norm'] > 1e-3
  bad = []
  for k in metrics1:
    a, b = np.float64(metrics1[k]), np.float64(metrics_n[k])
    if not abs(a - b) <= RTOL * abs(a) + 1e-15:
      bad.append(f'metrics[{k!r}]: {a} vs {b}')
  for part in ('params', 'opt_state'):
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(getattr(state1, part)),
      jax.tree.leaves(getattr(state_n, part)),
    ):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      if not np.linalg.norm(a - b) <= RTOL * np.linalg.norm(a) + 1e-15:
        bad.append(f'{part}{jax.tree_util.keystr(path)}: |a - b| = {np.linalg.norm(a - b):.3g}')
  assert not bad, '\n'.join(bad[:20]) + f'\n({len(bad)} leaves differ beyond {RTOL})'
  # The encoder and the decoder both learn (a zero gradient would make the check vacuous).
  mu = state1.opt_state[-1][0].mu
  for name in ('encoder_xray', 'decoder_xray'):
    assert max(np.abs(x).max() for x in jax.tree.leaves(mu[name])) > 0, name
  print(f'OK: {len(leaves)} parameter leaves within {RTOL}')


def test_four_devices_equal_one_in_float64():
  assert 'OK:' in run_check('from tests.test_mae import check_sharded; check_sharded()', DEVICES)


# --- fine-tuning from an MAE workdir ---


def mae_workdir(path, root):
  """An MAE pretraining workdir as a run leaves it (config.json and a checkpoint of the train
  state) with initialised weights, without compiling a step (as `workdirs.pretraining_workdir`)."""
  p = tiny_config(**{'data.root': root})
  p.model.vit.update(dict(depth=1, width=16, heads=2, mlp_dim=32))
  return workdirs.workdir_from_config(path, p)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  from aacp_jax.data import phantoms

  path = str(tmp_path_factory.mktemp('mae_phantoms'))
  counts = {'train': {'xray': 32}, 'test': {'xray': 16}}
  return phantoms.build(path, seed=2, image_size=32, counts=counts, progress=False)


def tiny_finetune(task, **overrides):
  c = finetune_config.get_config(f'demo,task={task}')
  c.data.image_size, c.batch_size, c.total_steps = 32, 8, 4
  c.model.decoder_features = (8, 8, 8, 8)
  c.log_every_steps = c.checkpoint_every_steps = 4
  c.eval.bootstrap = 20
  return workdirs.override(c, **overrides)


def test_finetune_heads_from_an_mae_workdir(root, tmp_path):
  from aacp_jax import restore
  from aacp_jax.train import finetune

  pre_dir = mae_workdir(str(tmp_path / 'mae'), root)
  restored = restore.load_variables(pre_dir)
  encoder, want = restore.encoder_variables(restored, 'xray')
  assert isinstance(encoder, vit.ViT) and want['batch_stats'] == {}
  # The fine-tuning model's encoder is that ViT, under 'encoder', for both heads.
  for head in finetune_models.HEADS:
    m = finetune_models.build_finetune_model(restored.config.model, head, 2)
    shapes = jax.eval_shape(
      lambda x: m.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32),
    )
    got = jax.tree.map(lambda a: a.shape, shapes['params']['encoder'])
    assert got == jax.tree.map(np.shape, want['params'])

  # Segmentation on the token grid, frozen encoder: the workdir's ViT (width 16) wins over the
  # fine-tuning config's settings (a ResNet), and the encoder is exactly the pretrained one.
  config = tiny_finetune(
    'phantom_xray_seg', **{'data.root': root, 'init': pre_dir, 'protocol': 'linear'}
  )
  out = finetune.run(config, str(tmp_path / 'seg'))
  assert out.config.model.arch == 'vit' and out.config.model.vit.width == 16
  assert set(out.results['metrics']) == {'dice_lesion', 'dice'}
  assert out.evaluation.scores.shape == (16, 32, 32, 2)
  got = out.predictor.variables['params']['encoder']
  jax.tree.map(np.testing.assert_array_equal, got, want['params'])
  assert 'decoder' in out.predictor.variables['batch_stats']

  # Classification on the pooled patch tokens, everything trained.
  config = tiny_finetune('phantom_xray_cls', **{'data.root': root, 'init': pre_dir})
  out = finetune.run(config, str(tmp_path / 'cls'))
  assert out.evaluation.scores.shape == (16, 2) and np.allclose(out.evaluation.scores.sum(1), 1)
  assert all(0 <= v['low'] <= v['high'] <= 1 for v in out.results['metrics'].values())
  moved = jax.tree.map(
    lambda a, b: np.abs(a - b).max(), out.predictor.variables['params']['encoder'], want['params']
  )
  assert max(jax.tree.leaves(moved)) > 0  # `full`: the encoder trained too
