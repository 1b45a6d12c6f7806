"""How much memory one device can hold, for checks that refuse an impossible size before anything is allocated."""

from __future__ import annotations

import os
from typing import Optional


def memory_limit_bytes() -> Optional[int]:
  """The first local device's memory: its allocator's limit on accelerators (GPU, TPU), the host's physical memory
  on CPU; None when neither is known."""
  import jax  # pylint: disable=g-import-not-at-top  (importing this module stays cheap, as for the CLIs)
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform != "cpu":
    return None
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None
