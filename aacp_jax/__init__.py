"""Anatomy-aware contrastive pre-training for medical images (JAX/Flax)."""

from aacp_jax.version import __version__  # noqa: F401
