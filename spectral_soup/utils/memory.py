"""How much memory one device can hold, for checks that refuse an impossible size before anything is allocated."""

from __future__ import annotations

import os
from typing import Optional

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v2, v1.


def _cgroup_limit() -> Optional[int]:
  """The container's memory limit (cgroup v2 or v1), or None when there is none (or it cannot be read)."""
  for path in _CGROUP_LIMITS:
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and int(text) < 1 << 60:  # "max" (v2) or a huge number (v1): no limit.
      return int(text)
  return None


def memory_limit_bytes() -> Optional[int]:
  """The first local device's memory: its allocator's limit on accelerators (GPU, TPU); on CPU the host's physical
  memory, or the container's (cgroup) limit if lower, shared by the process's CPU devices (8 fake devices each get an
  eighth); None when neither is known."""
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
  host = host_memory_bytes()
  return None if host is None else host // max(1, len(jax.local_devices()))


def host_memory_bytes() -> Optional[int]:
  """The host's physical memory, or the container's (cgroup) limit if lower; None when neither is known."""
  try:
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    physical = None
  limits = [v for v in (physical, _cgroup_limit()) if v]
  return min(limits) if limits else None
