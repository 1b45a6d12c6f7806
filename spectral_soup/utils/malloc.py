"""glibc malloc settings that keep XLA CPU's freed buffers for reuse, applied when `spectral_soup` is imported.

XLA's CPU runtime allocates an executable's temporaries (one block for all of them) and its outputs with `malloc` on
every call. With glibc's defaults a block above the mmap threshold (128 KiB, raised dynamically up to 32 MiB) gets
fresh pages from the kernel and gives them back on `free`, and the top of the heap is trimmed, so each call of a
step that holds tens of MiB of temporaries faults all of its pages in again, and the kernel zeroes every one. The
shared K = 8 basis training step of `experiments/benchmarks/train.py` took about 13,000 page faults (51 MiB) per
call that way; with the settings below, none once the heap has grown to the step's size
(`python -m experiments.benchmarks.malloc` measures time and page faults per call under both; BENCHMARKS.md,
section 6).

The settings (`mallopt`, process-wide): no mmap'd blocks (`M_MMAP_MAX` 0; every block comes from the heap, whatever
its size, so the temporaries of a step larger than glibc's 32 MiB ceiling on the mmap threshold are reused too),
one arena (`M_ARENA_MAX` 1: XLA's worker threads allocate and free the same blocks, which per-thread arenas would
release and refault), no trimming (`M_TRIM_THRESHOLD`) and heap growth 256 MiB at a time (`M_TOP_PAD`, address
space only). The cost: the process's resident memory does not shrink after a peak (freed memory is reused by the
next allocations, not leaked; `release_free_memory` hands it back after a one-off peak such as loading a
checkpoint), and its threads share one malloc lock (2-16 XLA threads allocating a few blocks per
call do not contend measurably). Only glibc has `mallopt`; elsewhere (macOS, musl) nothing is changed.
`SPECTRAL_SOUP_MALLOC_DEFAULTS=1` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Dict

# mallopt parameters (glibc's malloc.h) and the values set.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS: Dict[int, int] = {
    M_MMAP_THRESHOLD: 32 * 2**20,  # Its highest value (fixes it: no dynamic threshold), moot with M_MMAP_MAX 0.
    M_TRIM_THRESHOLD: 2**31 - 1,  # Never hand the top of a heap back (an int: mallopt's argument).
    M_TOP_PAD: 256 * 2**20,  # Grow heaps 256 MiB at a time (address space; pages are touched when used).
    M_MMAP_MAX: 0,  # Never mmap a block: the heap serves every size.
    M_ARENA_MAX: 1,  # One arena for every thread.
}
OPT_OUT = "SPECTRAL_SOUP_MALLOC_DEFAULTS"


def _glibc(name: str, argtypes: tuple):
  """glibc's function `name` (ctypes, int result), or None where the C library is not glibc."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
  except (OSError, AttributeError):
    return None
  fn.argtypes, fn.restype = argtypes, ctypes.c_int
  return fn


def retain_freed_memory() -> bool:
  """Applies `SETTINGS` with glibc's `mallopt`. Returns True when every setting took effect."""
  if os.environ.get(OPT_OUT, "0") not in ("", "0"):
    return False
  mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
  return mallopt is not None and all([mallopt(param, value) == 1 for param, value in SETTINGS.items()])


def release_free_memory() -> bool:
  """Returns the heap's free memory to the kernel now (glibc's `malloc_trim(0)`); True if any was released.

  For after one-off peaks whose memory the process will not need again, such as a checkpoint's conversion
  (`models.from_pretrained` calls it): with `retain_freed_memory`'s settings the heap otherwise keeps it.
  """
  trim = _glibc("malloc_trim", (ctypes.c_size_t,))
  return trim is not None and trim(0) == 1
