"""Downstream tasks by name: what a fine-tuning run predicts, from which records, in which window.

The one table of stage-two tasks (paper 4.3-4.4, Table 5): the phantom tasks (the embedded
default, so every protocol runs with no data) and the paper's datasets as `data_prep` writes
them. JAX- and NumPy-free, so config files import it.

kind: 'binary' | 'multiclass' (class id `label`), 'multilabel' (`labels`, -1 uncertain),
'regression' (`target`, or a target derived from the record), 'segmentation' (`mask`).
`num_outputs`: classes (binary tasks have 2: scores are (N, 2) with column 1 positive), labels,
1 for regression, classes including background for segmentation. `mask_values`: the stored
mask value of each class index (BraTS stores 0, 1, 2, 4). `regions`: evaluated unions of classes
(BraTS whole tumour, tumour core, enhancing tumour).
"""

from __future__ import annotations

import dataclasses

KINDS = ('binary', 'multiclass', 'multilabel', 'regression', 'segmentation')
LABEL_KEY = {
  'binary': 'label',
  'multiclass': 'label',
  'multilabel': 'labels',
  'regression': 'target',
  'segmentation': 'mask',
}
# Derived regression targets, computed from a record when it stores none.
DERIVED_TARGETS = ('lesion_area',)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  modality: str
  kind: str
  num_outputs: int
  dataset: str  # 'phantom', or the dataset name data_prep writes into the manifest's meta
  ct_window: str = 'pretrain'  # a name in modalities.CT_WINDOWS (CT tasks)
  class_names: tuple = ()
  mask_values: tuple = ()
  regions: tuple = ()  # ((name, (class ids...)), ...)
  target: str = ''  # '' = the record's `target`; a DERIVED_TARGETS name otherwise
  target_unit: str = ''
  description: str = ''

  @property
  def label_key(self) -> str:
    return LABEL_KEY[self.kind]

  @property
  def head(self) -> str:
    return 'segment' if self.kind == 'segmentation' else 'classify'


def _phantom_tasks():
  # LABEL_NAMES of aacp_jax.data.phantoms, repeated here to stay NumPy-free (a test checks).
  finding = {'ct': 'effusion_or_steatosis', 'mri': 'tumour', 'xray': 'pneumonia'}
  out = []
  for m in ('ct', 'mri', 'xray'):
    out += [
      TaskSpec(
        f'phantom_{m}_cls',
        m,
        'binary',
        2,
        'phantom',
        class_names=('normal', finding[m]),
        description=f'phantom {m.upper()}: {finding[m]} vs normal',
      ),
      TaskSpec(
        f'phantom_{m}_seg',
        m,
        'segmentation',
        2,
        'phantom',
        class_names=('background', 'lesion'),
        mask_values=(0, 1),
        description=f'phantom {m.upper()}: lesion segmentation',
      ),
      TaskSpec(
        f'phantom_{m}_area',
        m,
        'regression',
        1,
        'phantom',
        target='lesion_area',
        target_unit='% of the image',
        description=f'phantom {m.upper()}: lesion area (100 x mask mean)',
      ),
    ]
  return out


# CheXpert's (and MIMIC-CXR's) 14 findings, in the labeller's column order; data_prep writes
# `labels` in this order.
CHEXPERT_LABELS = (
  'No Finding',
  'Enlarged Cardiomediastinum',
  'Cardiomegaly',
  'Lung Opacity',
  'Lung Lesion',
  'Edema',
  'Consolidation',
  'Pneumonia',
  'Atelectasis',
  'Pneumothorax',
  'Pleural Effusion',
  'Pleural Other',
  'Fracture',
  'Support Devices',
)

TASKS = {
  t.name: t
  for t in _phantom_tasks()
  + [
    TaskSpec(
      'lidc',
      'ct',
      'binary',
      2,
      'lidc_idri',
      ct_window='lung',
      class_names=('benign', 'malignant'),
      description='LIDC-IDRI nodule malignancy (median rating > 3)',
    ),
    TaskSpec(
      'lits',
      'ct',
      'segmentation',
      3,
      'lits',
      ct_window='liver',
      class_names=('background', 'liver', 'tumour'),
      mask_values=(0, 1, 2),
      regions=(('liver', (1, 2)), ('tumour', (2,))),
      description='LiTS liver and tumour segmentation',
    ),
    TaskSpec(
      'brats',
      'mri',
      'segmentation',
      4,
      'brats',
      class_names=('background', 'necrotic_core', 'oedema', 'enhancing'),
      mask_values=(0, 1, 2, 4),
      regions=(('WT', (1, 2, 3)), ('TC', (1, 3)), ('ET', (3,))),
      description='BraTS 2020 whole tumour / tumour core / enhancing tumour',
    ),
    TaskSpec(
      'acdc',
      'mri',
      'segmentation',
      4,
      'acdc',
      class_names=('background', 'RV', 'myocardium', 'LV'),
      mask_values=(0, 1, 2, 3),
      description='ACDC right ventricle, myocardium, left ventricle (ED and ES)',
    ),
    TaskSpec(
      'covidx',
      'xray',
      'multiclass',
      3,
      'covidx',
      class_names=('normal', 'pneumonia', 'COVID-19'),
      description='COVIDx CXR 3-class',
    ),
    TaskSpec(
      'boneage',
      'xray',
      'regression',
      1,
      'rsna_boneage',
      target_unit='months',
      description='RSNA paediatric bone age',
    ),
    TaskSpec(
      'chexpert',
      'xray',
      'multilabel',
      len(CHEXPERT_LABELS),
      'chexpert',
      class_names=CHEXPERT_LABELS,
      description='CheXpert 14 findings (uncertain labels by config.loss.uncertain)',
    ),
  ]
}


def get(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ValueError(f'config.task={name!r}: expected one of {", ".join(TASKS)}')
  return TASKS[name]
