"""Anatomy-aware contrastive pre-training for medical images (JAX/Flax)."""

__version__ = "0.1.0"
