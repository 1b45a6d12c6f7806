"""Test-wide setup: 8 fake CPU devices for mesh tests (must be set before JAX is imported), no network."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPECTRAL_SOUP_PROGRESS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SPECTRAL_SOUP_BENCH_IDLE_WAIT_S", "0")  # Benchmarks run as tests: correctness, not timing.

# The package's XLA CPU settings (spectral_soup/_xla_cpu.py) go into XLA_FLAGS when it is imported: import it
# before any test module can start a JAX backend.
import spectral_soup  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position  # noqa: E402,F401


def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  """`-n auto` (the README's test command): one worker per usable core, at most four.

  Each worker is a process with its own JAX backend of 8 fake devices, PyTorch and the test models (up to ~6 GiB at
  its peak): more than four would trade memory for little, since most files compile on one core.
  `PYTEST_XDIST_AUTO_NUM_WORKERS` still decides when set.
  """
  chosen = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
  if chosen:
    return int(chosen)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(cores, 4))


# The longest files first (about 1-3 minutes each on 2 cores), so that under `--dist loadfile` no worker starts one
# of them while the others have run out of files. Each file's own order is kept; the rest follow in path order.
_LONGEST_FIRST = ("test_offline.py", "test_export.py", "test_gpu_bench.py", "test_api.py", "test_benchmarks.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # A stable sort.
