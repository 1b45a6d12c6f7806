"""spectral_soup: online personalized alignment of language models by spectral souping (JAX / Flax)."""

from spectral_soup.utils import malloc as _malloc
from spectral_soup import _xla_cpu

# Before any submodule can start an XLA backend: keep XLA CPU's YNN fusions to plain dots
# (its elementwise/reduction fusions miscompute on some x86 CPUs; see _xla_cpu.py).
# True when the setting is in effect for this process.
XLA_CPU_SAFE = _xla_cpu.restrict_ynn_fusions()
# glibc keeps freed memory for the next allocation instead of returning it to the kernel: XLA CPU allocates its
# buffers on every call, and re-faulting tens of MiB of fresh pages per call cost a third of a training step
# (see utils/malloc.py). True when the settings are in effect.
MALLOC_TUNED = _malloc.retain_freed_memory()

# The public API, imported on first use (importing the package stays light and starts no XLA backend):
#   ss.load_basis(workdir) -> ss.Basis (.generate, .features, .encode_prompts); ss.fit_lambda (one user's lambda,
#   or U users' at once); ss.export_hf(basis, lam, out_dir) (one user's soup as a Hugging Face checkpoint).
_API = {
    "load_basis": "spectral_soup.basis",
    "Basis": "spectral_soup.basis",
    "fit_lambda": "spectral_soup.online.fit",
    "export_hf": "spectral_soup.export"
}
__all__ = sorted(_API) + ["MALLOC_TUNED", "XLA_CPU_SAFE"]


def __getattr__(name):
  if name in _API:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f"module 'spectral_soup' has no attribute {name!r}")
