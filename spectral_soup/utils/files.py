"""Small file helpers shared by the trainer and the entry points."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


def directory_problem(path: str) -> Optional[str]:
  """Why `path` cannot be (or be created as) a writable directory, or None if it can (nothing is left: a probe
  directory is created in it, or in its nearest existing ancestor, and removed)."""
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(full) and not os.path.isdir(full):
    return "is a file: expected a directory (new or from an earlier run)"
  if os.path.islink(full) and not os.path.exists(full):  # mkdir would fail with "File exists" after all the work.
    return (f"is a symbolic link to {os.readlink(full)}, which does not exist: expected a directory (create its "
            "target, or remove the link)")
  parent = full
  while not os.path.exists(parent):  # The nearest existing ancestor must let us create the rest.
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"{parent} is a file, so the directory cannot be created"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"{parent} is not writable, expected a directory this user can write"
  try:  # What os.access cannot tell: a read-only mount, a pseudo filesystem (/proc, /sys), root's permissions.
    os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=parent))
  except OSError as e:
    return f"no directory can be created in {parent} ({e.strerror or e}), expected a directory this user can write"
  return None


def output_file_problem(flag: str, path: str, inputs: Sequence[str] = ()) -> Optional[str]:
  """Why the output file `flag`=`path` cannot be written (the whole message), or None if it can: it must not be a
  directory or one of the `inputs`, and its directory must exist and be writable (as must the file, if it exists).
  Entry points check it before any computation, so that a run never ends in a failed write."""
  if not path:
    return f"{flag} is empty: expected a file path."
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    return f"{flag}={path} is a directory: expected a file path."
  if not os.path.isdir(folder):
    return f"{flag}={path}: its directory {folder} does not exist."
  if any(os.path.realpath(path) == os.path.realpath(p) for p in inputs):
    return f"{flag}={path} is one of the inputs: expected a new file (or an earlier report)."
  if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    return f"{flag}={path}: {path if os.path.exists(path) else folder} is not writable."
  problem = directory_problem(folder)  # What os.access cannot tell (root, read-only mounts, /proc): a real write.
  if problem:
    return f"{flag}={path}: its directory {problem}."
  return None


def check_output_file(flag: str, path: str, inputs: Sequence[str] = ()) -> None:
  """Raises ValueError with `output_file_problem`'s message if there is one."""
  problem = output_file_problem(flag, path, inputs)
  if problem:
    raise ValueError(problem)


def read_json_object(path: str, what: str = "a run's config") -> dict:
  """The JSON object in `path` (a run's config.json, say); ValueError naming the file and `what` was expected if it
  cannot be read, is not JSON, or holds another JSON value (a list, a number, null)."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read as {what} ({type(e).__name__}: {e}).") from None
  if not isinstance(value, dict):
    kind = "null" if value is None else type(value).__name__
    raise ValueError(f"{path} holds a JSON {kind}: expected {what} (a JSON object).")
  return value


def finite_or_none(value: Any) -> Any:
  """`value` with every float that is not finite replaced by None (nested dicts, lists and tuples): what
  `json.dumps(..., allow_nan=False)` can write (strict JSON has no NaN or Infinity)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_none(v) for v in value]
  return value


def temp_path(path: str, suffix: str = "") -> str:
  """The temporary file an atomic write of `path` goes through (`<path>.tmp-<pid>-<thread><suffix>`: two threads
  writing one path each have their own; with one name, one thread's rename took the other's file away)."""
  return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path to write; on success it replaces `path` (a reader sees the old file or the new one,
  never half of it), on any error it is removed and the error raised.

      with files.atomic_path("plot.png", ".png") as tmp:
        fig.savefig(tmp)

  `suffix` keeps the extension that a writer infers the format from (np.savez appends `.npz` to a name without it).
  A process killed mid-write leaves its `<path>.tmp-<pid>*` behind: `remove_stale_temps` clears them. A symbolic
  link's target is what is replaced (the link was replaced by a file, its target left as it was).
  """
  if os.path.islink(path):
    path = os.path.realpath(path)
  tmp = temp_path(path, suffix)
  try:
    yield tmp
    if os.path.exists(path) and os.path.exists(tmp):  # Keep the replaced file's permissions (a private 0600 file).
      with contextlib.suppress(OSError):
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    with contextlib.suppress(OSError):  # On disk before the rename: a power loss leaves the old file or the new one.
      fsync(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  with contextlib.suppress(OSError):  # The rename itself on disk (best effort: not every file system allows it).
    fsync(os.path.dirname(os.path.abspath(path)))


def fsync(path: str) -> None:
  """Flushes the file or directory `path` to disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader (or a crash) sees the old file or the new one, never half of it."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_npz_atomic(path: str, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically as `write_text_atomic` (`path` should end in .npz)."""
  with atomic_path(path, ".npz") as tmp:
    np.savez(tmp, **arrays)


def remove_stale_temps(directory: str, names: Sequence[str]) -> List[str]:
  """Removes the temporary files (`<name>.tmp-*`) that killed writers of `names` left in `directory`; returns them.

  Only for a directory no live writer uses (a workdir whose lock this process holds).
  """
  removed = []
  for name in names:
    for tmp in sorted(glob.glob(os.path.join(glob.escape(directory), glob.escape(name) + ".tmp-*"))):
      if os.path.isfile(tmp) and not os.path.islink(tmp):
        os.remove(tmp)
        removed.append(tmp)
  return removed


def absolute_if_exists(value: Any) -> Any:
  """`value` as an absolute path if it is a relative path to something that exists here (else unchanged: "",
  "embedded:smollm2", a source name such as "synthetic", an absolute path, a URL)."""
  if not isinstance(value, str) or not value or os.path.isabs(value) or ":" in value:
    return value
  path = os.path.expanduser(value)
  return os.path.abspath(path) if os.path.exists(path) else value


# `content_digest`'s results in this process, by each file's identity (device, inode, size, modification and
# status-change times: the latter changes with every write, also one that restores the modification time).
_DIGESTS: Dict[Tuple[Any, ...], str] = {}


def content_digest(path: str) -> Optional[str]:
  """A hash of the bytes of the file at `path`, or of every file directly in the directory `path` (with their
  names); None for anything else (an empty path, `embedded:smollm2`, a path that does not exist).

  Caches keyed by a model checkpoint use it: a checkpoint replaced at the same path, even by a copy that keeps its
  size and modification time (`cp -p`, `rsync -a`), is another key, and one model reached through two paths (a
  relative path from two directories) hashes alike only if its files are equal. Reads every byte once per process
  and file version (~1 s per GB); later calls on an unchanged file reuse the result.
  """
  path = os.path.expanduser(path) if isinstance(path, str) and path else ""
  if os.path.isfile(path):
    named = [("", path)]
  elif os.path.isdir(path):
    named = sorted((e.name, e.path) for e in os.scandir(path) if e.is_file())
  else:
    return None
  digest = hashlib.blake2b(digest_size=16)
  for name, file in named:
    stat = os.stat(file)
    identity = (os.path.realpath(file), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if identity not in _DIGESTS:
      one = hashlib.blake2b(digest_size=16)
      with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          one.update(block)
      _DIGESTS[identity] = one.hexdigest()
    digest.update(f"{name}:{_DIGESTS[identity]};".encode())
  return digest.hexdigest()
