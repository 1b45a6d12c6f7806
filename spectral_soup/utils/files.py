"""Small file helpers shared by the trainer and the entry points."""

from __future__ import annotations

import os

import numpy as np


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader (or a crash) sees the old file or the new one, never half of it."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_npz_atomic(path: str, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically as `write_text_atomic` (`path` should end in .npz)."""
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
