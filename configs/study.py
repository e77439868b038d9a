r"""The reproduction study (Table 5, Table 6, Figs. 2-3): every method x task x label fraction x
seed, from one resumable command.

  # CPU demo (phantoms, small encoders; see `demo` for its time budget):
  python -m aacp_jax.study --config=configs/study.py:demo --workdir=/tmp/aacp_study
  # The paper's study on prepared shards (GPU cluster; launch/slurm_study.sbatch runs it as arrays):
  python -m aacp_jax.study --config=configs/study.py --workdir=$DIR \
      --config.pretrain_root=/data/aacp_shards --config.task_roots=lits=/data/lits_shards,brats=/data/brats

`methods`: `random` (no pretraining), `imagenet` (needs `imagenet_weights`, a torchvision/timm
ResNet file; left out of the plan when empty), and any variant of configs/pretrain.py (`full`,
`simclr`, `moco_v2`, `mae`, `minimal` and the Table 6 ablations `no_*`), each pretrained once with
`pretrain` (variants and key=value items of configs/pretrain.py) applied first. `finetune` is the
same for configs/finetune.py, applied to every downstream cell. `fractions` are percents of the
fitting patients; `shots` > 0 adds a few-shot cell (that many per class) for each class task
and seed.
"""

import ml_collections

from configs import variants

VARIANTS = variants.Variants('configs/study.py')
_variant = VARIANTS.register

# The paper's Table 6 rows (configs/pretrain.py TABLE6 order; configs import no JAX code, so the
# tuple is repeated here and checked against that one by tests/test_study.py).
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


def base_config():
  c = ml_collections.ConfigDict()
  c.experiment = 'study'
  c.pretrain_config = 'configs/pretrain.py'
  c.finetune_config = 'configs/finetune.py'
  c.pretrain = ''  # variants/items applied before each method's variant
  c.finetune = ''
  c.methods = ('random', 'imagenet', 'moco_v2', 'mae') + TABLE6
  c.imagenet_weights = ''  # a torchvision/timm ResNet file; '' leaves `imagenet` out
  # The row every Table 6 delta is taken against, and the init "data needed to match" reads.
  c.reference = 'full'
  c.baseline = 'random'
  c.tasks = ('lidc', 'lits', 'brats', 'acdc', 'covidx', 'boneage', 'chexpert')
  c.fractions = (1.0, 10.0, 100.0)
  c.seeds = (0, 1, 2)
  c.shots = 5  # 0: no few-shot cells
  c.pretrain_root = ''  # '' = phantoms built into each pretraining workdir
  # `task=ROOT` pairs, comma-separated: a task's prepared shards (a task not named: phantoms).
  c.task_roots = ''
  # Fig. 2: the reference method's encoder at this many checkpoints (evenly spaced, last one
  # included); pretraining keeps at least as many.
  c.embedding_checkpoints = 3
  c.embedding_examples = 48  # test images per modality drawn in embeddings.png / clusters.json
  return c


@_variant
def demo(c):
  """2 CPU cores in <= 45 min. Measured on 2 cores shared with other jobs (load ~3.5, 2026-12-02):
  pretraining `full` 120 steps 264 s (compile and probes included; simclr and minimal are
  smaller models); a fine-tuning cell at 60 steps ~31 s for classification (~70 images/s, so
  ~27 s of it are steps) and ~39 s for segmentation (the first cell of each kind ~20 s more:
  compiles, phantoms). Hence 100 pretraining steps (~9 min for the three methods) and 40
  fine-tuning steps (~21 s / ~28 s a cell): 4 inits x (classification: 10 %, 100 %, 5-shot;
  segmentation: 10 %, 100 %) x 3 seeds = 60 cells ~24 min, figures ~2 min: ~35 min in all, less
  on idle cores. `random` costs no pretraining; moco_v2/mae are left out (add them with
  `--config.methods=...`, ~3 min of pretraining each at these sizes)."""
  c.pretrain = 'demo,total_steps=100,checkpoint_every_steps=25,keep_checkpoints=4'
  c.finetune = 'demo,total_steps=40,checkpoint_every_steps=40'
  c.methods = ('random', 'simclr', 'minimal', 'full')
  c.tasks = ('phantom_ct_cls', 'phantom_ct_seg')
  c.fractions = (10.0, 100.0)
  c.seeds = (0, 1, 2)
  c.shots = 5
  c.embedding_examples = 32


def get_config(arg=None):
  return VARIANTS.apply(base_config(), arg)
