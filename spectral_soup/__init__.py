"""spectral_soup: online personalized alignment of language models by spectral souping (JAX / Flax)."""

from spectral_soup import _xla_cpu

# Before any submodule can start an XLA backend: turn off the CPU fusions that miscompute on some x86 CPUs.
YNN_FUSIONS_OFF = _xla_cpu.disable_ynn_fusions()
