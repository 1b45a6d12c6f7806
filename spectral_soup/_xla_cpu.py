"""XLA CPU settings the package needs to compute correctly, applied when `spectral_soup` is imported.

jaxlib 0.10.2's CPU backend hands dots and the elementwise ops and reductions around them to YNNPACK ("YNN
fusions", `__ynn_fusion` in the compiled HLO). On some x86-64 CPUs (seen on an AVX-512 AMD EPYC) the fusion of a
broadcast-weighted sum over a leading axis, `(c[:, None, None] * x).sum(0)`, returns the wrong rows: the naive and
explicit soups' greedy tokens disagreed with the parameter soup and an independent PyTorch implementation on 85-98%
of positions. `tests/xla_cpu_regression.py` holds the smallest program and reproduces the comparison on any machine.

The package keeps YNN for plain dots only: `--xla_cpu_experimental_ynn_fusion_type=dot`. The miscompiled
elementwise/reduction fusions are gone (every probe of the regression script matches float64), and the dots, where
YNNPACK is 3-5x faster than XLA's own CPU kernels on the 49,152-wide output layer, stay fast: greedy decoding of
SmolLM2 runs at 0.93-1.11x the speed under XLA's defaults on an AVX-512 EPYC (medians of runs paired by round, two
runs; BENCHMARKS.md section 4). Turning every fusion off (`=`), which would avoid the whole class, costs more: on
2026-12-06, three rounds alternating `=dot` and `=` of `experiments.benchmarks.decode` on an idle AVX-512 EPYC gave
the single model 0.75x and 0.72x the tokens/s of `=dot` at 32 and 128 rows, explicit/heads 0.67x and 0.86x
(medians of the paired ratios). XLA's own max and argmax reductions are 3-10x slower than YNNPACK's, so the package's
vocabulary-wide reductions are folds of elementwise maxima (`utils/reductions.py`); before those, the setting cost
12-18% on two days.

One dot pattern is wrong under `=dot` (and right under XLA's defaults): a dot_general whose [B, F] operand is a
broadcast of one row (rows gathered from a single row) against [K, F, R] heads, at B >= 32 (every row but the first
came back NaN or ~1e30). It arises in the decoding engine when many rows continue one prefilled prompt (head bases
of rank > 0: 126 of 128 identical rows decoded other tokens); the engine materializes the gathered rows
(`jax.lax.optimization_barrier`), the one place in the package found to build such an operand.
`tests/xla_cpu_regression.py` reports the raw pattern (`broadcast_dot`) beside the materialized form.

`XLA_FLAGS` is read once per process, when the first XLA backend starts (not when `jax` is imported), so setting
it here works whenever `spectral_soup` is imported before the first computation, which is the case for the
package's CLIs, notebooks and tests. A user who sets `--xla_cpu_experimental_ynn_fusion_type` themselves keeps
their value; `SPECTRAL_SOUP_XLA_DEFAULTS=1` leaves XLA's defaults alone (to compare, as
`tests/xla_cpu_regression.py` does). A jaxlib that does not know the flag (XLA aborts on unknown flags) is left
alone too.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# YNN fusions for plain dots only: no elementwise or reduction fusions (the miscompiled ones).
YNN_SAFE = YNN_FLAG + "=dot"


def _jaxlib_knows(flag: str) -> bool:
  """Whether the installed jaxlib's XLA defines `flag` (looked up in its shared library, without loading it)."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return False
  needle = flag.lstrip("-").encode()
  for folder in spec.submodule_search_locations:
    for name in ("libjax_common.so", "xla_extension.so"):
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        continue
      try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
          if data.find(needle) >= 0:
            return True
      except (OSError, ValueError):
        continue
  return False


def _backends_started() -> bool:
  import sys  # pylint: disable=g-import-not-at-top
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def restrict_ynn_fusions() -> bool:
  """Adds `--xla_cpu_experimental_ynn_fusion_type=dot` to XLA_FLAGS unless the user chose a value.

  Returns True when the package's setting is in effect for this process (set now or already present).
  """
  flags = os.environ.get("XLA_FLAGS", "").split()
  if os.environ.get("SPECTRAL_SOUP_XLA_DEFAULTS", "0") not in ("", "0"):
    return False
  if any(f.split("=", 1)[0] == YNN_FLAG for f in flags):
    return YNN_SAFE in flags
  if not _jaxlib_knows(YNN_FLAG):
    return False
  if _backends_started():
    warnings.warn(
        "spectral_soup was imported after JAX started its backends, so XLA's CPU YNN fusions stay at their defaults; "
        "some miscompute souped decoding on some x86 CPUs. Import spectral_soup before the first JAX computation, or "
        f"set XLA_FLAGS={YNN_SAFE} yourself.", RuntimeWarning, stacklevel=3)
    return False
  os.environ["XLA_FLAGS"] = " ".join(flags + [YNN_SAFE])
  return True
