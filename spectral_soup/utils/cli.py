"""Command-line entry points: a bad config, path or workdir ends in one line and exit status 2.

    with cli.input_checks():
      validate_config(config)
      cli.check_workdir(workdir)

A `ValueError` or `OSError` raised inside the block is printed as `error: <message>` on stderr and the process exits
with status 2 (absl's own flag errors look the same); with `--verbosity=1` (or higher) the traceback is kept.
Only the checks before the expensive work go in the block: an error raised later is a failure of the run, and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from absl import logging

USAGE_ERROR_EXIT_CODE = 2


@contextlib.contextmanager
def input_checks() -> Iterator[None]:
  try:
    yield
  except (ValueError, OSError) as e:
    if logging.get_verbosity() >= 1:
      raise
    message = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
      message = f"{message}: {e.filename}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR_EXIT_CODE)


def check_workdir(workdir: str) -> None:
  """Raises ValueError unless `workdir` is, or can be created as, a writable directory (nothing is created)."""
  if not workdir:
    raise ValueError("--workdir is empty: expected a directory for the run's outputs.")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--workdir={workdir} is a file: expected a directory (new or from an earlier run).")
  parent = path
  while not os.path.exists(parent):  # The nearest existing ancestor must let us create the rest.
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"--workdir={workdir}: {parent} is a file, so the directory cannot be created.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir={workdir}: {parent} is not writable, expected a directory this user can write.")
