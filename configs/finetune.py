r"""Stage two: fine-tune an encoder on a labelled task (paper 4.3-4.4).

Commands (run from the repository root):

  # CPU demo: pretrain (configs/pretrain.py:demo), then fine-tune its CT encoder on 10 % of the
  # phantom patients' labels, and the same from random init:
  python -m aacp_jax.main --config=configs/finetune.py:demo,task=phantom_ct_cls,init=/tmp/aacp_demo,data.fraction=10 \
      --workdir=/tmp/ft_ct_10
  python -m aacp_jax.main --config=configs/finetune.py:demo,task=phantom_ct_cls,init=random,data.fraction=10 \
      --workdir=/tmp/ft_ct_10_random

  # A paper task on prepared shards, from a pretraining workdir (GPU):
  python -m aacp_jax.main --config=configs/finetune.py:task=lits,init=$PRETRAIN_DIR \
      --config.data.root=/data/lits_shards --workdir=$DIR

`task`: a name in `aacp_jax.task_specs.TASKS` (phantom_{ct,mri,xray}_{cls,seg,area}, lidc, lits,
brats, acdc, covidx, boneage, chexpert). `init`: `random`, a pretraining workdir (any method; its
encoder settings are used), or `imagenet:PATH` (torchvision/timm ResNet weights, .npz or
.safetensors, on disk). `data.fraction`: percent of the fitting split's patients (stratified,
nested across fractions, drawn by `seed`); `data.shots` > 0 draws that many per class instead.
`protocol`: `full` fine-tuning or `linear` (frozen encoder).
"""

import ml_collections

from aacp_jax import augment_defaults as augment
from configs import variants

VARIANTS = variants.Variants('configs/finetune.py')
_variant = VARIANTS.register


def base_config():
  c = ml_collections.ConfigDict()
  c.experiment = 'finetune'
  c.task = 'phantom_ct_cls'
  c.init = 'random'
  c.protocol = 'full'
  c.seed = 0  # draws the label fraction and the batches; the data stay the same
  # Resolved from the task when the run starts (and recorded so in config.json).
  c.modalities = ('ct',)

  c.data = ml_collections.ConfigDict()
  c.data.root = ''  # Empty: phantoms built into the workdir from `phantom_seed`.
  c.data.phantom_seed = 2  # other phantoms than pretraining's (seed 0) and the detector's (1)
  c.data.fit_split = 'train'
  c.data.test_split = 'test'
  c.data.image_size = 224
  c.data.fraction = 100.0  # percent of the fitting patients
  c.data.shots = 0  # > 0: that many examples per class instead of a fraction
  c.data.shares = ml_collections.ConfigDict({'ct': 1.0})  # resolved: the task's modality
  c.data.worker_count = 0
  c.data.phantoms = ml_collections.ConfigDict({'train': 512, 'test': 256})

  c.batch_size = 64
  c.num_epochs = 50
  c.total_steps = 0  # > 0 overrides num_epochs: the same number of steps at every fraction

  c.model = ml_collections.ConfigDict()
  c.model.depth = 50  # a pretraining init replaces depth, width and zero_init_residual
  c.model.width = 64
  c.model.zero_init_residual = False
  c.model.dtype = 'bfloat16'
  c.model.decoder_features = (256, 128, 64, 32)  # segmentation decoder, strides 16..2
  # 'resnet' (depth, width) or 'vit' (`vit`, ViT-B/16 here; the segmentation decoder then
  # upsamples its token grid in log2(patch) stages at the last widths above); a pretraining init
  # replaces both with its own (an MAE workdir: 'vit').
  c.model.arch = 'resnet'
  c.model.vit = ml_collections.ConfigDict(
    dict(patch_size=16, depth=12, width=768, heads=12, mlp_dim=3072, pos_embed='sincos')
  )

  c.loss = ml_collections.ConfigDict()
  c.loss.uncertain = 'ones'  # CheXpert's -1: 'ones' (U-Ones), 'zeros' or 'ignore'
  c.loss.regression = 'l1'  # on standardised targets: 'l1', 'mse' or 'huber'
  c.loss.dice_weight = 1.0  # segmentation: CE + this x (1 - soft Dice)

  c.augment = augment.default_config()
  c.augment.ct_window = 'task'  # the task's window (lung, liver, ...), resolved at start
  c.augment.cutout.p = 0.0  # a hole could erase the lesion a label or mask is about

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-5  # encoder (paper 4.3)
  c.optim.head_lr = 1e-3  # head or decoder
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.bootstrap = 1000
  c.eval.batch_size = 64
  c.eval.threshold = 0.5  # binary tasks: sensitivity and specificity at this probability
  return c


@_variant
def demo(c):
  """CPU-sized, matching configs/pretrain.py:demo's encoder (ResNet-18, width 16, 64²)."""
  c.data.image_size = 64
  c.data.phantoms = ml_collections.ConfigDict({'train': 128, 'test': 128})
  c.batch_size = 32
  c.total_steps = 150
  c.model.depth = 18
  c.model.width = 16
  c.model.dtype = 'float32'
  c.model.decoder_features = (64, 32, 16, 16)
  # Small data and few steps: the paper's 1e-5 would leave a CPU-sized encoder where it starts.
  c.optim.lr = 1e-4
  c.log_every_steps = 25
  c.checkpoint_every_steps = 150
  c.eval.bootstrap = 300


@_variant
def linear(c):
  """Linear probe through the same harness: frozen encoder, trained head."""
  c.protocol = 'linear'


def get_config(arg=None):
  return VARIANTS.apply(base_config(), arg)
