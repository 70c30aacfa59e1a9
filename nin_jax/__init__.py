"""Network in Network, as taught in Dive into Deep Learning, in JAX and Flax; docs/architecture.md
maps the package. Importing it keeps JAX off GPU and TPU plugins whose devices this machine lacks,
before JAX starts (runtime/platforms.py)."""

from nin_jax.runtime import platforms as _platforms

_platforms.keep_off_absent_accelerators()
