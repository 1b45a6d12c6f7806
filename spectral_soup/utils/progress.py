"""Progress bars with rate and ETA for long host loops (tqdm; quiet when stderr is not a terminal)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional, TypeVar

import tqdm

T = TypeVar("T")


def track(iterable: Iterable[T], *, desc: str, unit: str = "it", total: Optional[int] = None) -> Iterable[T]:
  """Wraps `iterable` in a progress bar. Set SPECTRAL_SOUP_PROGRESS=0 (or false / off / no / empty) to silence,
  =1 (or true / on / yes) to force it on; unset: on where stderr is a terminal."""
  setting = os.environ.get("SPECTRAL_SOUP_PROGRESS")
  setting = None if setting is None else setting.strip().lower()
  off = setting in ("0", "false", "off", "no", "")
  disable = off or (setting not in ("1", "true", "on", "yes") and not sys.stderr.isatty())
  return tqdm.tqdm(iterable, desc=desc, unit=unit, total=total, disable=disable, dynamic_ncols=True, mininterval=1.0)
