"""One live run per workdir: an advisory lock (`flock`) on `<workdir>/.lock`.

The kernel drops a `flock` when its process exits, however it exits (SIGKILL included), so a killed run never
leaves the workdir locked: the file may stay, the lock does not. Only process 0 of a multi-host run takes it
(the other hosts write nothing of their own to the workdir).

    workdir_lock.check_free(workdir)     # Early, before any work: raises InputError if a live run holds it.
    with workdir_lock.hold(workdir):     # Once the run is accepted (creates the file; the workdir must exist).
      ...
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from spectral_soup.utils.errors import InputError

LOCK_NAME = ".lock"


def _busy(workdir: str, holder: str) -> InputError:
  who = f" (process {holder})" if holder else ""
  return InputError(f"--workdir={workdir} is in use by a live run{who}: expected a workdir no running job holds; "
                    "wait for that run to end or choose another --workdir.")


def _read_holder(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def _is_primary() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def check_free(workdir: str, primary: bool | None = None) -> None:
  """Raises InputError if a live process holds `workdir`'s lock (checked on process 0 only). Writes nothing."""
  if primary is None:
    primary = _is_primary()
  if not primary:
    return
  path = os.path.join(workdir, LOCK_NAME)
  if not os.path.lexists(path):
    return
  if not os.path.isfile(path):  # Found here, before any work, not when the run is accepted.
    what = "a directory" if os.path.isdir(path) else "not a regular file"
    raise InputError(f"--workdir={workdir}: {path} is {what}: expected the run's lock file (or nothing there); move "
                     "it away or use another --workdir.")
  try:
    # Read-write: on NFS an exclusive flock needs a file open for writing (read-only: EBADF on every restart).
    fd = os.open(path, os.O_RDWR)
  except OSError:
    return  # Unreadable or read-only: `hold` will say so when the run is accepted.
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise _busy(workdir, _read_holder(path)) from None
  finally:
    os.close(fd)  # Closing drops a lock this probe took.


@contextlib.contextmanager
def hold(workdir: str, primary: bool | None = None) -> Iterator[None]:
  """Holds `workdir`'s lock for the block (on process 0 only, unless `primary` says otherwise).

  Raises InputError if another live process holds it. The file keeps the holder's pid (for that message).
  """
  if primary is None:
    primary = _is_primary()
  if not primary:
    yield
    return
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise _busy(workdir, _read_holder(path)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    yield
  finally:
    os.close(fd)  # Drops the lock.
