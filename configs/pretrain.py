r"""Anatomy-aware contrastive pre-training (the paper's settings by default).

Commands (run from the repository root):

  # CPU demo on built-in phantoms: pretrain, then linear probes. ~5-8 min on 2 cores.
  python -m aacp_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/aacp_demo

  # Paper settings (ResNet-50, 224², batch 256, 200 epochs) on prepared shards; GPU cluster.
  python -m aacp_jax.main --config=configs/pretrain.py --workdir=$DIR \
      --config.data.root=/data/aacp_shards

Variants are joined with commas, e.g. `configs/pretrain.py:demo,simclr`. Any value can be
overridden on the command line, e.g. `--config.optim.lr=3e-4`. `sweep()` lists every variant.
"""
import ml_collections

from aacp_jax import augment

# Each variant is a function editing the config in place; `demo` composes with the others.
VARIANTS = {}


def _variant(fn):
  VARIANTS[fn.__name__] = fn
  return fn


def base_config():
  c = ml_collections.ConfigDict()
  c.experiment = 'pretrain'
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

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.07
  # Structure-aware negative weighting w = 1 - gamma * exp(-d^2 / sigma^2); gamma 0 = plain InfoNCE.
  c.loss.gamma = 0.0
  c.loss.sigma = 0.15
  # lambda_spatial (paper 3.2.1): spatial consistency between the landmark head on each augmented
  # view and the record's landmarks; needs model.landmark_head. 0 = off.
  c.loss.spatial_weight = 0.1

  c.augment = augment.default_config()

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-6
  c.optim.warmup_steps = 0
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
  return c


@_variant
def demo(c):
  """CPU-sized: a narrow ResNet-18 on 64² phantoms, a few hundred steps, minutes on 2 cores."""
  c.data.image_size = 64
  c.data.phantoms = ml_collections.ConfigDict({'train': 256, 'test': 128})
  c.batch_size = 64
  c.total_steps = 300
  c.model.depth = 18
  c.model.width = 16
  c.model.projector = (256, 256, 128)
  c.model.dtype = 'float32'
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.loss.temperature = 0.1
  c.log_every_steps = 10
  c.checkpoint_every_steps = 50


@_variant
def simclr(c):
  """Table 6 'Minimal (SimCLR-style)': plain InfoNCE with standard random augmentation."""
  c.augment.anatomy_aware = False
  c.loss.gamma = 0.0
  c.loss.spatial_weight = 0.0
  c.model.landmark_head = False


@_variant
def minimal(c):
  """Table 6 'Minimal' (components 1-3): anatomy-aware augmentation + spatial-consistency loss +
  contrastive loss. Until FPN / ROI / triplet exist this equals the base config."""
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


def sweep():
  """Every variant name, for launch scripts that run the whole table."""
  return sorted(VARIANTS)


def get_config(arg=None):
  c = base_config()
  names = [n.strip() for n in (arg or '').split(',') if n.strip()]
  for name in names:
    if name not in VARIANTS:
      raise ValueError(
          f'configs/pretrain.py: unknown variant {name!r}; known: {", ".join(sweep())}')
    VARIANTS[name](c)
  c.variant = ','.join(names)
  return c
