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
import re
import sys
from typing import Iterator, Optional

from absl import logging

from spectral_soup.utils import errors
from spectral_soup.utils import files
from spectral_soup.utils import workdir_lock

USAGE_ERROR_EXIT_CODE = 2


def parse_flags(argv):
  """The flags parser for `app.run(main, flags_parser=cli.parse_flags)`.

  absl's own parser turns a malformed flag value into a usage message with exit status 1, and lets the errors of a
  config file (missing, a syntax error, no `get_config`) or of a config override (an unknown field, with its "did
  you mean") escape as tracebacks. Here each of them is one line, `error: ...`, with exit status 2, like the config
  errors found after parsing.

  A `--workdir` starting with `~` is expanded here, as a shell would (a shell leaves `--workdir=~/x` as typed): the
  checks and the run then see the same directory, the user's home, never one named `~`. So are the config's path
  fields (`PATH_FIELDS`: `--config.data.source=~/pairs.jsonl`).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
    expand_home(flags.FLAGS, "workdir")
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None:
      _ = config.keys  # A config file that failed to load raises (OSError) on first use, not while parsing.
      expand_config_home(config)
    return rest
  except flags.Error as e:
    message = flag_error_message(e)
  except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError, ImportError) as e:
    message = _config_error_message(e, argv)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR_EXIT_CODE)


def flag_error_message(e: BaseException) -> str:
  """One line for absl's error about a flag's value, in the words of the config checks ("expected ...")."""
  message = " ".join(str(e).split())  # One line.
  boolean = re.match(r"(flag \S+?=(.*?)): \('Non-boolean argument to boolean flag'", message)
  if boolean:
    return f"{boolean.group(1)}: expected true or false, got {boolean.group(2)!r}"
  # Python's conversion message for an integer or float field (`num_steps=1e3`, `=True`, `learning_rate=abc`).
  number = re.match(
      r"(flag \S+?=(.*?)): (?:invalid literal for int\(\) with base 10|could not convert string to "
      r"float): ", message)
  if number:
    return f"{number.group(1)}: expected {'an integer' if 'int()' in message else 'a number'}, got {number.group(2)!r}"
  # A config file whose get_config raised (an unknown variant, `file.py:nope`): its exception, not the traceback.
  raised = re.match(
      r"(flag --config=\S+): Error whilst parsing config file: Traceback .* (\w+(?:Error|Exception)): "
      r"(.*)$", message)
  if raised:
    return f"{raised.group(1)}: its get_config raised {raised.group(2)}: {raised.group(3)}"
  return message


# Config fields that name a file or directory: a leading `~` is expanded as `--workdir`'s is (a shell does not
# expand it after `--config.data.source=`).
PATH_FIELDS = ("data.source", "data.tokenizer", "data.data_dir", "data.manual_dir", "data.cache_dir", "model.path",
               "train.features_dir")


def expand_config_home(config) -> None:
  """Expands a leading `~` or `~user` of the config's path fields (`PATH_FIELDS`, those it has), in place."""
  for dotted in PATH_FIELDS:
    section, name = dotted.split(".")
    holder = config.get(section, None)
    value = holder.get(name, None) if holder is not None and hasattr(holder, "get") else None
    if isinstance(value, str) and value.startswith("~"):
      holder[name] = os.path.expanduser(value)


def expand_home(flag_values, name: str) -> None:
  """Expands a leading `~` or `~user` of the string flag `name` (if defined and set), in place."""
  if name in flag_values and isinstance(flag_values[name].value, str):
    flag_values[name].value = os.path.expanduser(flag_values[name].value)


def _config_error_message(e: BaseException, argv) -> str:
  """One line naming the override or the config file, for the errors ml_collections raises while parsing."""
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  text = " ".join(text.replace("\\n", " ").split())
  config_args = [a for a in argv[1:] if a.startswith("--config")]
  key = re.search(r"'?([\w.]+)'?", text)
  key = key.group(1) if key else ""
  overridden = lambda a: a.startswith("--config.") and key in a.split("=", 1)[0].split(".")
  # ml_collections says "Did you mean" only when a field's name is close; a name no field resembles raised a bare
  # AttributeError, which was reported as the config file failing to load.
  if isinstance(e, KeyError) or (isinstance(e, AttributeError) and
                                 ("Did you mean" in text or any(overridden(a) for a in config_args))):
    culprit = next((a.split("=", 1)[0] for a in config_args if overridden(a)), "--config.<field>")
    hint = re.search(r"Did you mean (.*?) instead", text)
    return f"{culprit}: {key!r} is not a config field" + (f"; did you mean {hint.group(1)}?" if hint else ".")
  if isinstance(e, SyntaxError) and e.filename:
    return f"the config file {e.filename}, line {e.lineno}: {e.msg}."
  # The last --config= is the one absl loaded (a repeated flag named the first, existing file).
  source = next((a.split("=", 1)[1] for a in reversed(config_args) if a.startswith("--config=")), "--config")
  if isinstance(e, OSError) and "No such file or directory" in text:
    return f"the config file {source} does not exist: expected the path of a config .py file."
  if isinstance(e, AttributeError) and "get_config" in text:
    return f"the config file {source} has no get_config(): expected a module defining get_config()."
  return f"the config file {source} could not be loaded: {type(e).__name__}: {text}"


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
  (nothing is created). A `~` left in it (`parse_flags` expands `~` and `~user`) is refused: the run would write
  to a directory named `~`."""
  if workdir is None:  # Left out (it said "empty").
    raise ValueError("--workdir is missing: expected --workdir=DIR, a directory for the run's outputs.")
  if not workdir:
    raise ValueError("--workdir is empty: expected a directory for the run's outputs.")
  if "://" in workdir:  # It became a relative local directory named after the URL.
    raise ValueError(f"--workdir={workdir}: expected a path on this machine (a bucket mounted with gcsfuse, say), "
                     "not a URL.")
  if workdir.startswith("~"):
    raise ValueError(f"--workdir={workdir}: {workdir.split('/', 1)[0]} is not a known home directory: expected an "
                     "absolute or relative path.")
  problem = files.directory_problem(workdir)
  if problem:
    raise ValueError(f"--workdir={workdir}{' ' if problem.startswith('is a') else ': '}{problem}.")
  owner = _checkpoints_owner(workdir)
  if owner:
    raise ValueError(f"--workdir={workdir} lies inside the checkpoints of the run in {owner}: its checkpoint "
                     "retention would delete this run with an old step. Expected a directory outside any run's "
                     "checkpoints/.")
  if os.path.isdir(os.path.abspath(workdir)):
    workdir_lock.check_free(workdir)


def _checkpoints_owner(workdir: str) -> Optional[str]:
  """The run directory whose `checkpoints/` (or `checkpoints.corrupt/`) holds `workdir`, or None."""
  path = os.path.realpath(os.path.abspath(workdir))
  while True:
    parent = os.path.dirname(path)
    if parent == path:
      return None
    if os.path.basename(path) in ("checkpoints", "checkpoints.corrupt") and any(
        os.path.exists(os.path.join(parent, name)) for name in ("config.json", "metrics.jsonl", "basis.json")):
      return parent
    path = parent


_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_]\w*(?:\.\w+)+)\s*=\s*(.*?)\s*(?:#\s*(.*))?$")
_ALIAS = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*config((?:\.\w+)+)\s*(?:#.*)?$")
_BASE = re.compile(r"^\s*from configs import (\w+)")

_FUNCTION = re.compile(r"^def (\w+)")


def config_comments(path: str) -> dict:
  """{"data.attributes": "its comment"} from a config file and the configs/ files it builds on (`from configs
  import x`), the file's own comments last (they describe its values). Reads the source; imports nothing.

  A field's comment is the one after its assignment (with the indented `#   ` lines that continue it) or, without
  one, the comment lines right above it. Only `get_config`'s assignments count, and those of the function named by
  the config's variant (`file.py:local` runs `local(config)` after `get_config`'s own, so its comments come last).
  """
  main, variant = _comments(*path.partition(":")[::2])
  return {**main, **variant}


def _comments(path: str, variant: str) -> tuple:
  """(comments of `get_config`, comments of the variant's function) of a config file and the files it builds on."""
  main: dict = {}
  extra: dict = {}
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError:
    return main, extra
  for line in lines:  # The bases first: a derived config's comment wins.
    base = _BASE.match(line)
    if base:
      base_main, base_extra = _comments(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                     base.group(1) + ".py"), variant)
      main.update(base_main)
      extra.update(base_extra)
  aliases = {"config": ""}
  function, above, last, assigned = None, [], None, False
  for line in lines:
    stripped = line.strip()
    defined = _FUNCTION.match(line)
    if defined or (line[:1].strip() and not stripped.startswith("#")):  # A top-level statement ends a function.
      function, above, last, assigned = defined.group(1) if defined else None, [], None, False
      continue
    target = main if function == "get_config" else extra if variant and function == variant else None
    if stripped.startswith("#"):
      text = stripped[1:]
      if last is not None and text.startswith("   "):  # `#   ...`: the comment after an assignment continues.
        last[1][last[0]] += " " + text.strip()
      else:
        above = [text.strip()] if assigned else above + [text.strip()]  # A comment after an assignment: a new one.
        last, assigned = None, False
      continue
    assigned = False
    alias = _ALIAS.match(line)
    match = None if alias else _ASSIGNMENT.match(line)
    if alias:
      aliases[alias.group(1)] = alias.group(2)[1:]
    elif match and target is not None:
      head, _, rest = match.group(1).partition(".")
      comment = (match.group(3) or "").strip() or " ".join(above)
      if head in aliases and comment:
        key = ".".join(p for p in (aliases[head], rest) if p)
        target[key] = comment
        last = (key, target) if match.group(3) else None
      else:
        last = None
      if match.group(3):
        above = []  # Comment lines above serve the run of comment-less assignments below them.
      assigned = True
      continue
    else:
      last = None
    above = []
  return main, extra


def describe_config(config, path: str) -> str:
  """Every field of `config` with its value and the comment its config file gives it (`--show_config`)."""
  comments = config_comments(path)
  rows = []

  def walk(node, prefix):
    for name in sorted(node.keys()):
      value, key = node[name], f"{prefix}{name}"
      if hasattr(value, "keys") and not isinstance(value, dict):  # A nested ConfigDict.
        walk(value, key + ".")
      else:
        rows.append((key, repr(value), comments.get(key, "")))

  walk(config, "")
  width = min(max(len(k) + len(v) for k, v, _ in rows) + 3, 60)
  lines = [f"Config fields of {path} (override any with --config.FIELD=VALUE):"]
  for key, value, comment in rows:
    text = f"  {key} = {value}"
    lines.append(f"{text:<{width}}  # {comment}" if comment else text)
  return "\n".join(lines)
