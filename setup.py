"""aacp_jax: anatomy-aware contrastive pre-training for medical images, in JAX/Flax."""

import re

import setuptools

# One version string: aacp_jax/version.py.
VERSION = re.search(
  r"__version__ = '([^']+)'", open('aacp_jax/version.py', encoding='utf-8').read()
).group(1)

setuptools.setup(
  name='aacp_jax',
  version=VERSION,
  description='Anatomy-aware contrastive pre-training for CT, MRI and X-ray (JAX/Flax).',
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  python_requires='>=3.10',
  packages=setuptools.find_packages(
    include=['aacp_jax', 'aacp_jax.*', 'configs', 'data_prep', 'data_prep.*']
  ),
  install_requires=[
    'jax>=0.4.35',
    'flax>=0.10',
    'optax>=0.2.4',
    'orbax-checkpoint>=0.11',
    'grain>=0.2.12',
    'array-record>=0.7',
    'ml-collections>=1.0',
    'absl-py>=2.1',
    'numpy>=1.26',
    'scipy>=1.11',
    'tqdm>=4.66',
    'msgpack>=1.0',
    'flatbuffers>=24',  # jax.export's serialize (aacp_jax.export --format=stablehlo)
    # CRC32C of every record (hardware-accelerated; the codec's checksum since record version 2).
    'google-crc32c>=1.5',
    # TF-free TensorBoard event writer (clu.metric_writers would import TensorFlow).
    'tensorboardX>=2.6',
  ],
  extras_require={
    'prep': [
      'SimpleITK>=2.3',
      'nibabel>=5.2',
      'pydicom>=2.4',
      'scikit-image>=0.22',
      'pillow>=10',
      'nilearn>=0.10',
    ],
    'eval': ['scikit-learn>=1.4', 'matplotlib>=3.8'],
    # pydicom-data: the radiographs the prep tests read (shipped files, nothing downloaded).
    'test': [
      'pytest>=8',
      'pytest-xdist>=3.5',
      'pydicom-data>=1.0',
      'ruff>=0.6',
      # tests/test_notebook.py runs notebooks/evaluation.ipynb; test_eval_plots.py draws figures.
      'nbclient>=0.10',
      'nbformat>=5.9',
      'ipykernel>=6.29',
      'matplotlib>=3.8',
      'scikit-learn>=1.4',
    ],
    'gpu': ['jax[cuda12]>=0.4.35'],
    'tfds': ['tensorflow-datasets>=4.9.6'],
  },
)
