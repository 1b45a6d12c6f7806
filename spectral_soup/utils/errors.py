"""Input errors: bad input found before a run's expensive work, reported by the CLIs as one line.

A config field, a model path that does not load, data that fail their checks, a checkpoint in the workdir from
another config, a workdir that another live run holds: each is the user's input, not a failure of the run. The
code that checks them runs inside `input_stage()`, which turns the `ValueError` / `OSError` it raises into an
`InputError` (a `ValueError`, so library callers see the same type as before); the CLIs print any `InputError`
as `error: <message>` and exit with status 2, wherever in the run it is raised (`utils.cli`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class InputError(ValueError):
  """Bad input (config, path, data, workdir), found before the run's expensive work."""


class MissingInputError(InputError, FileNotFoundError):
  """A missing file or directory as input: still a `FileNotFoundError` to library callers that catch one."""


def message_of(e: BaseException) -> str:
  """The error's message, with the file name of an OSError that does not already name it."""
  message = str(e) or type(e).__name__
  filename = getattr(e, "filename", None)
  if isinstance(e, OSError) and filename and str(filename) not in message:
    message = f"{message}: {filename}"
  return message


@contextlib.contextmanager
def input_stage() -> Iterator[None]:
  """Inside the block, `ValueError` and `OSError` are input errors: re-raised as `InputError` (chained)."""
  try:
    yield
  except InputError:
    raise
  except FileNotFoundError as e:
    raise MissingInputError(message_of(e)) from e
  except (ValueError, OSError) as e:
    raise InputError(message_of(e)) from e


def summary(e: BaseException, limit: int = 300) -> str:
  """The first line of the error's message, for a one-line report of an error raised by another library; a first
  line that ends in ':' introduces what follows (transformers' validation errors put their reason on the next line),
  so then all its lines are joined. At most `limit` characters."""
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  text = " ".join(lines) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
  return text if len(text) <= limit else text[:limit - 3] + "..."
