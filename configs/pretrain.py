r"""Anatomy-aware contrastive pre-training: the paper's full model (Table 6 row 1) by default.

Commands (run from the repository root):

  # CPU demo of the full model on built-in phantoms: pretrain, then probes (~5.5 min on 2 idle cores).
  python -m aacp_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/aacp_demo

  # Paper settings (ResNet-50, 224², batch 256, 200 epochs) on prepared shards; GPU cluster.
  python -m aacp_jax.main --config=configs/pretrain.py --workdir=$DIR \
      --config.data.root=/data/aacp_shards

  # One Table 6 row, e.g. without the triplet loss, on CPU:
  python -m aacp_jax.main --config=configs/pretrain.py:demo,no_triplet --workdir=/tmp/aacp_nt

Variants are joined with commas, e.g. `configs/pretrain.py:demo,simclr`; `key=value` items set
any value too, e.g. `configs/pretrain.py:demo,method=aacp,optim.lr=3e-4`. Any value can be
overridden on the command line, e.g. `--config.optim.lr=3e-4`. `sweep()` lists every variant;
`TABLE6` the ablation rows in the paper's order. The baselines: `moco_v2` and `mae` (the same as
`method=moco_v2` / `method=mae`; MAE with its own AdamW recipe, `_mae_recipe`).
"""

import ml_collections

from aacp_jax import augment_defaults as augment
from configs import variants

# Each variant is a function editing the config in place; `demo` composes with the others.
VARIANTS = variants.Variants('configs/pretrain.py')
_variant = VARIANTS.register


def base_config():
  c = ml_collections.ConfigDict()
  c.experiment = 'pretrain'
  # The pretraining method (aacp_jax/methods/): 'aacp' is the paper's; `simclr` below is aacp with
  # every anatomy-aware part off.
  c.method = 'aacp'
  c.seed = 0
  c.modalities = ('ct', 'mri', 'xray')

  c.data = ml_collections.ConfigDict()
  c.data.root = ''  # Empty: build synthetic phantoms into the workdir (the embedded default).
  c.data.split = 'train'
  c.data.image_size = 224
  # Fixed share of the global batch per modality; each share must split evenly over devices.
  c.data.shares = ml_collections.ConfigDict({'ct': 0.5, 'mri': 0.25, 'xray': 0.25})
  c.data.worker_count = 0
  c.data.phantoms = ml_collections.ConfigDict({'train': 1024, 'test': 256})

  c.batch_size = 256  # Global, over all hosts and devices (paper Table 1).
  c.num_epochs = 200  # Cosine schedule length (paper 3.5.1).
  c.total_steps = 0  # > 0 overrides num_epochs (an epoch = the smallest modality's pass).

  c.model = ml_collections.ConfigDict()
  c.model.depth = 50
  c.model.width = 64
  c.model.projector = (2048, 2048, 512)
  c.model.dtype = 'bfloat16'  # Compute dtype; parameters and losses stay float32.
  # Per-modality landmark head (stride-8 soft-argmax) that the spatial-consistency loss trains.
  c.model.landmark_head = True
  # Feature pyramid p2..p5 (strides 4..32) with the paper's widths, and one small projection per
  # level (GAP + [hidden, out] MLP) for the multi-scale contrast (paper 3.2.3).
  c.model.fpn = True
  c.model.fpn_channels = (64, 128, 256, 512)
  c.model.level_projector = (256, 128)
  # ROI attention on c4 (paper 3.4.1); its map attention-pools c5 into `features` (and so `z`).
  c.model.roi_attention = True
  c.model.roi_features = 64
  # The encoder kind: 'resnet' (the settings above) or 'vit' (`model.vit`); '' = the method's own
  # (mae: vit, every other: resnet), resolved by get_config so that config.json names it.
  c.model.arch = ''
  # ViT-B/16 (read when arch is 'vit'): fixed 2-D sin-cos positions as MAE ('learned' as timm).
  c.model.vit = ml_collections.ConfigDict(
    dict(patch_size=16, depth=12, width=768, heads=12, mlp_dim=3072, pos_embed='sincos')
  )
  # MAE (method=mae, aacp_jax/methods/mae.py; He et al. 2022): read only by that method. 75 % of
  # the patches masked per sample; MSE on them against per-patch normalised pixels; a light
  # decoder per modality; random resized crop (area, ratio) and a flip (X-ray only: the
  # augmentation's symmetric modalities) as its only augmentation.
  c.mae = ml_collections.ConfigDict()
  c.mae.mask_ratio = 0.75
  c.mae.norm_pix_loss = True
  c.mae.decoder = ml_collections.ConfigDict(dict(depth=8, width=512, heads=16, mlp_dim=2048))
  c.mae.crop_area = (0.2, 1.0)
  c.mae.crop_ratio = (3 / 4, 4 / 3)
  c.mae.flip_p = 0.5

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.07
  # Structure-aware negative weighting w = 1 - gamma * exp(-d^2 / sigma^2); gamma 0 = plain InfoNCE.
  c.loss.gamma = 0.0
  c.loss.sigma = 0.15
  # lambda_spatial (paper 3.2.1): spatial consistency between the landmark head on each augmented
  # view and the record's landmarks; needs model.landmark_head. 0 = off.
  c.loss.spatial_weight = 0.1
  # Multi-scale contrast: InfoNCE per pyramid level p2..p5, weighted sum added to the contrast.
  # The paper gives no weights; equal quarters keep the sum on the scale of one InfoNCE.
  c.loss.multiscale_weights = (0.25, 0.25, 0.25, 0.25)
  # Triplet (paper 3.4.2): anchor view 1, positive view 2, in-batch negative; 0 = off. The paper
  # gives no weight or margin: 0.2 is FaceNet's margin on the unit sphere.
  c.loss.triplet_weight = 0.5
  c.loss.triplet_margin = 0.2
  c.loss.triplet_mining = 'hardest'  # or 'semihard'
  # Cross-modal alignment (paper 3.3.3): lambda_cross 0 before cross_start_epoch, linear to
  # cross_weight at cross_end_epoch, then constant; 0 = off. The epochs are epochs of the
  # num_epochs schedule; when total_steps sets the run length they scale with it (pretrain.py).
  c.loss.cross_weight = 0.3
  c.loss.cross_start_epoch = 50.0
  c.loss.cross_end_epoch = 100.0
  c.loss.cross_delta = 0.15  # canonical-frame distance; 0.10 / 0.20 for the sensitivity check
  c.loss.cross_landmarks = ()  # the named landmark set; () = the whole vocabulary
  c.loss.cross_min_common = 1  # landmarks of the set both samples must show
  c.loss.cross_organ_weight = 0.5  # weak pairs sharing an organ label

  c.augment = augment.default_config()

  c.optim = ml_collections.ConfigDict()
  # 'adam' (L2 added to the gradient, as the paper) or 'adamw' (decoupled decay, not on norms,
  # biases, tokens, positions: MAE's, which method=mae sets; aacp_jax/train/state.py).
  c.optim.name = 'adam'
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 1e-6
  c.optim.warmup_steps = 0
  c.optim.warmup_fraction = 0.0  # of the run, read when warmup_steps is 0
  c.optim.grad_clip = 0.0  # 0 = off.

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.probe = True
  c.eval.split_fit = 'train'
  c.eval.split_test = 'test'
  c.eval.batch_size = 128
  c.eval.bootstrap = 1000
  c.eval.l2 = 0.0  # Probe L2 strength; 0 = chosen by cross-validation on the fitting split.

  # MoCo-v2 (method=moco_v2, aacp_jax/methods/moco_v2.py): read only by that method.
  c.moco = ml_collections.ConfigDict()
  c.moco.queue_size = 65536  # K keys per modality; a multiple of each modality's global batch
  c.moco.momentum = 0.999  # key encoder EMA
  c.moco.temperature = 0.2
  c.moco.dim = 128  # MLP head output
  c.moco.mlp_hidden = 0  # MLP head hidden width; 0 = the encoder's (2048 for ResNet-50)
  # BatchNorm groups of each modality's global batch, the keys' groups shuffled (shuffle-BN):
  # MoCo's per-GPU BN over 8 GPUs (docs/DESIGN.md, MoCo-v2).
  c.moco.bn_groups = 8
  # 'moco_v2': MoCo-v2's augmentation below (on the on-device ops); 'config': c.augment as is.
  c.moco.augment = 'moco_v2'
  c.moco.crop_area = (0.2, 1.0)  # random resized crop scale
  c.moco.flip_p = 0.5
  c.moco.jitter_p = 0.8  # brightness and contrast jitter, each with this probability
  c.moco.brightness = 0.4  # additive, normalised units
  c.moco.contrast = (0.6, 1.4)
  c.moco.blur_p = 0.5
  c.moco.blur_sigma = (0.1, 2.0)  # pixels at 224², scaled with the image size
  return c


@_variant
def demo(c):
  """CPU-sized: a narrow ResNet-18 on 64² phantoms, a few hundred steps, minutes on 2 cores.
  300 steps are 37.5 epochs of 8 steps, so the cross-modal curriculum scales to epochs 9.4-18.8
  (steps 75-150) and the term is on for the second half of the run."""
  c.data.image_size = 64
  c.data.phantoms = ml_collections.ConfigDict({'train': 256, 'test': 128})
  c.batch_size = 64
  c.total_steps = 300
  c.model.depth = 18
  c.model.width = 16
  c.model.projector = (256, 256, 128)
  c.model.dtype = 'float32'
  c.model.fpn_channels = (16, 32, 64, 128)
  c.model.level_projector = (64, 32)
  c.model.roi_features = 16
  # method=mae: a tiny ViT (2 blocks of 64, patch 8: 8x8 tokens at 64²) and decoder.
  c.model.vit.update(dict(patch_size=8, depth=2, width=64, heads=4, mlp_dim=256))
  c.mae.decoder.update(dict(depth=1, width=32, heads=4, mlp_dim=128))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.loss.temperature = 0.1
  c.log_every_steps = 10
  c.checkpoint_every_steps = 50
  # MoCo-v2 at demo size: a queue that fills in 64 steps, BN groups of 4-8.
  c.moco.queue_size = 1024
  c.moco.bn_groups = 4


@_variant
def full(c):
  """Table 6 'Full model': every component (the default; named for sweeps and benchmarks)."""
  del c


def _optional_off(c):
  """Switch the optional modules 4-7 (paper 1.3.3) off."""
  no_multiscale(c)
  no_roi(c)
  no_triplet(c)
  no_cross_modal(c)


@_variant
def simclr(c):
  """Table 6 'Minimal (SimCLR-style)': plain InfoNCE with standard random augmentation."""
  _optional_off(c)
  c.augment.anatomy_aware = False
  c.loss.gamma = 0.0
  c.loss.spatial_weight = 0.0
  c.model.landmark_head = False


@_variant
def minimal(c):
  """Paper 1.3.3 'Minimal deployment' (components 1-3): anatomy-aware augmentation +
  spatial-consistency loss + contrastive loss; no pyramid, ROI attention, triplet, cross-modal."""
  _optional_off(c)
  c.augment.anatomy_aware = True
  c.loss.gamma = 0.0
  c.model.landmark_head = True
  c.loss.spatial_weight = 0.1


@_variant
def no_spatial(c):
  """Table 6 ablation: without the spatial-consistency loss (and without its landmark head)."""
  c.loss.spatial_weight = 0.0
  c.model.landmark_head = False


@_variant
def no_anatomy_aug(c):
  """Table 6 ablation: standard augmentation instead of the anatomy-aware one."""
  c.augment.anatomy_aware = False


@_variant
def no_multiscale(c):
  """Table 6 ablation: no pyramid; contrast on the final-stage embedding only."""
  c.model.fpn = False
  c.loss.multiscale_weights = (0.0, 0.0, 0.0, 0.0)


@_variant
def no_roi(c):
  """Table 6 ablation: no ROI attention; `features` are the global average of c5."""
  c.model.roi_attention = False


@_variant
def no_triplet(c):
  """Table 6 ablation: no triplet loss, contrastive only."""
  c.loss.triplet_weight = 0.0


@_variant
def no_cross_modal(c):
  """Table 6 ablation: within-modality learning only, no cross-modal alignment."""
  c.loss.cross_weight = 0.0


@_variant
def moco_v2(c):
  """The MoCo-v2 baseline (c.moco settings; same as the `method=moco_v2` item)."""
  c.method = 'moco_v2'


@_variant
def mae(c):
  """The MAE baseline: c.mae, the ViT (model.vit) and MAE's optimiser (AdamW, betas (0.9, 0.95),
  decoupled decay 0.05); get_config also sets its schedule (`_mae_recipe`), as for the
  `method=mae` item. On its own on top of a resolved config (`bench step --variants=mae`) it keeps
  that config's learning rate and warmup (demo's)."""
  c.method = 'mae'
  c.model.arch = 'vit'
  _mae_optimiser(c)


def _mae_optimiser(c):
  c.optim.name = 'adamw'
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.05


def _mae_recipe(c):
  """MAE's pretraining optimiser (He et al. 2022, Table 8): AdamW, betas (0.9, 0.95), decoupled
  weight decay 0.05, lr 1.5e-4 x batch / 256 (the linear scaling rule, at the config's batch:
  1.5e-4 at the paper's 256), cosine with a warmup of 40 of 800 epochs, i.e. 5 % of the run."""
  _mae_optimiser(c)
  c.optim.lr = 1.5e-4 * c.batch_size / 256
  c.optim.warmup_steps = 0
  c.optim.warmup_fraction = 0.05


# Table 6 rows in the paper's order ('simclr' is its 'Minimal (SimCLR-style)' row; 'minimal' is
# section 1.3.3's components 1-3, the paper's 1.68x training-time reference).
TABLE6 = (
  'full',
  'no_spatial',
  'no_anatomy_aug',
  'no_multiscale',
  'no_roi',
  'no_triplet',
  'no_cross_modal',
  'simclr',
  'minimal',
)


def sweep():
  """Every variant name (the Table 6 rows and `demo`), for launch scripts that run the table;
  combine a row with `demo` for CPU runs (`demo,no_roi`)."""
  return sorted(VARIANTS)


# The encoder kind of each method that does not use the ResNet (`model.arch` '').
_METHOD_ARCH = {'mae': 'vit'}
# A method's own settings beyond its block (c.mae, c.moco): applied to the base config before
# the variants and items, so `demo` and `optim.lr=...` still set what they name.
_METHOD_RECIPE = {'mae': _mae_recipe}


def get_config(arg=None):
  method = VARIANTS.apply(base_config(), arg).method
  base = base_config()
  if method in _METHOD_RECIPE:
    _METHOD_RECIPE[method](base)
  c = VARIANTS.apply(base, arg)
  if not c.model.arch:
    c.model.arch = _METHOD_ARCH.get(c.method, 'resnet')
  return c
