"""spectral_soup: online personalized alignment of language models by spectral souping (JAX / Flax)."""

from spectral_soup import _xla_cpu

# Before any submodule can start an XLA backend: keep XLA CPU's YNN fusions to plain dots
# (its elementwise/reduction fusions miscompute on some x86 CPUs; see _xla_cpu.py).
# True when the setting is in effect for this process.
XLA_CPU_SAFE = _xla_cpu.restrict_ynn_fusions()
