"""Small file helpers shared by the trainer and the entry points."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np


def directory_problem(path: str) -> Optional[str]:
  """Why `path` cannot be (or be created as) a writable directory, or None if it can (nothing is created)."""
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(full) and not os.path.isdir(full):
    return "is a file: expected a directory (new or from an earlier run)"
  parent = full
  while not os.path.exists(parent):  # The nearest existing ancestor must let us create the rest.
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"{parent} is a file, so the directory cannot be created"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"{parent} is not writable, expected a directory this user can write"
  return None


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
