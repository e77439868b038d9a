r"""The landmark detector (paper 3.2.1): trained once on an annotated subset, then frozen.

Commands (run from the repository root):

  # CPU demo on built-in phantoms (ground-truth landmarks): ~2.5 min on 2 idle cores, writes
  # DIR/eval.json (held-out mean radial error, detection rate) and DIR/detector.json.
  python -m aacp_jax.main --config=configs/landmarks.py:demo --workdir=/tmp/aacp_landmarks

  # Real images: annotate a subset (README "Landmark annotation"), then
  python -m aacp_jax.main --config=configs/landmarks.py --workdir=$DIR \
      --config.data.root=/data/keypoints_shards --config.modalities=xray
  # and write the detected landmarks into the pretraining shards:
  python -m data_prep.annotate_landmarks --checkpoint=$DIR --input=/data/shards \
      --output=/data/shards_landmarks

Variants join with commas (`demo` composes with the others); `--config.x=y` overrides any value.
"""

import ml_collections

from aacp_jax import augment_defaults as augment
from configs import variants

VARIANTS = variants.Variants('configs/landmarks.py')
_variant = VARIANTS.register


def base_config():
  c = ml_collections.ConfigDict()
  c.experiment = 'landmarks'
  # Not the pretraining seed: the demo's annotated phantoms are other subjects than the
  # phantoms the encoders pretrain on, so the detector is applied to images it never saw.
  c.seed = 1
  c.modalities = ('ct', 'mri', 'xray')

  c.data = ml_collections.ConfigDict()
  c.data.root = ''  # Empty: phantoms with ground-truth landmarks, built into the workdir.
  c.data.split = 'train'
  c.data.image_size = 224
  c.data.shares = ml_collections.ConfigDict({'ct': 1 / 3, 'mri': 1 / 3, 'xray': 1 / 3})
  c.data.worker_count = 0
  c.data.phantoms = ml_collections.ConfigDict({'train': 1024, 'test': 256})

  c.batch_size = 96  # global
  c.total_steps = 6000

  c.model = ml_collections.ConfigDict()
  c.model.width = 32  # channels at full resolution, doubled per level
  c.model.levels = 4  # 2x downsamplings: the bottleneck sees stride 16
  c.model.output_level = 1  # heatmaps at stride 2; soft-argmax is sub-pixel
  c.model.dtype = 'bfloat16'

  c.loss = ml_collections.ConfigDict()
  c.loss.heatmap_sigma = 1.5  # Gaussian target width, in heatmap pixels
  c.loss.coord_weight = 0.1  # per pixel of soft-argmax radial error
  c.loss.visible_weight = 1.0

  # The anatomy-aware augmentation moves the landmarks with the image: the detector learns the
  # anatomy, not the average landmark position.
  c.augment = augment.default_config()

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 100
  c.optim.grad_clip = 1.0

  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'test'  # held out from training
  c.eval.visible_threshold = 0.5  # confidence above which a landmark counts as detected
  c.eval.detect_radius = 0.05  # a detection must lie within 5 % of the image side
  return c


@_variant
def demo(c):
  """CPU-sized: 64² phantoms, a narrow U-Net, minutes on 2 cores."""
  c.data.image_size = 64
  c.data.phantoms = ml_collections.ConfigDict({'train': 384, 'test': 128})
  c.batch_size = 24
  c.total_steps = 600
  c.model.width = 16
  c.model.levels = 3
  c.model.dtype = 'float32'
  c.optim.warmup_steps = 50
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200


def get_config(arg=None):
  return VARIANTS.apply(base_config(), arg)
