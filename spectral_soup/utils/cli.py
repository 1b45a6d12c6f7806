"""Command-line entry points: a bad config, path or workdir ends in one line and exit status 2.

    with cli.input_checks():
      validate_config(config)
      cli.check_workdir(workdir)

    with cli.reporting_input_errors():
      run(...)  # Its own input checks (model path, data, resume, workdir lock) raise `errors.InputError`.

A `ValueError` or `OSError` raised inside `input_checks`, and an `errors.InputError` raised anywhere inside
`reporting_input_errors`, is printed as `error: <message>` on stderr and the process exits with status 2 (absl's own
flag errors look the same); with `--verbosity=1` (or higher) the traceback is kept. Any other error is a failure of
the run, and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from absl import logging

from spectral_soup.utils import errors
from spectral_soup.utils import workdir_lock

USAGE_ERROR_EXIT_CODE = 2


def _exit_with(e: BaseException) -> None:
  if logging.get_verbosity() >= 1:
    raise e
  print(f"error: {errors.message_of(e)}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR_EXIT_CODE)


@contextlib.contextmanager
def input_checks() -> Iterator[None]:
  """The checks before the expensive work: any ValueError / OSError is the user's input."""
  try:
    yield
  except (ValueError, OSError) as e:
    _exit_with(e)


@contextlib.contextmanager
def reporting_input_errors() -> Iterator[None]:
  """The run itself: only `errors.InputError` (raised by its own input checks) is the user's input."""
  try:
    yield
  except errors.InputError as e:
    _exit_with(e)


def check_workdir(workdir: str) -> None:
  """Raises ValueError unless `workdir` is, or can be created as, a writable directory that no live run holds
  (nothing is created)."""
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
  if os.path.isdir(path):
    workdir_lock.check_free(workdir)
