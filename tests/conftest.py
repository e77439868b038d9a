"""Eight fake CPU devices for every test, so sharded code paths run as on an 8-GPU host.

XLA reads the flag when JAX first initialises its backend, hence before any test imports jax.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
