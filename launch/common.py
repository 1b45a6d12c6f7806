"""What the launchers share: commands as argv lists, `--dry-run`, the code archive, the remote job's shell lines.

A launcher checks its flags, builds its whole plan first, as a list of `Step`s (a name and an argv list), and then
either prints it (`--dry-run`: one shell-quoted line per command, in order, nothing run) or runs it with
`subprocess`, stopping at the first failure. Steps marked `always` (deleting a cloud VM) still run after a failed
step, a Ctrl-C or any other error, so that a failed job does not leave a machine running; the one exception is a
job that may still be running: the job runs detached on the machine, so a dropped connection (or a Ctrl-C) while
its log streams does not stop it, and the machine is then kept, with the commands that re-attach to the job and
that delete the machine printed. Local files a step writes (the code archive) are removed when the plan ends.

No credentials live here: project, zone and names come from flags or `SPECTRAL_SOUP_*` environment variables, and
gcloud uses whatever account it is logged in with.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib.util
import inspect
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("experiments.train_basis", "experiments.main")  # Entry points a launcher can run.
CODE_DIR = "spectral_soup"  # Where the code goes on a remote machine (relative to the remote home).
VENV = "spectral_soup_venv"  # The remote virtual environment (relative to the remote home).
RUNS_DIR = "spectral_soup_runs"  # Remote logs, pids and exit codes of detached jobs (relative to the remote home).
# Left out of the code archive, besides the paths .gitignore names (read when the plan is built).
ARCHIVE_EXCLUDES = (".git", "workdir", "__pycache__", "*.pyc", ".pytest_cache")
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C.
USAGE_ERROR_EXIT_CODE = 2  # As argparse's own errors.
# Compute Engine and Cloud TPU resource names (RFC 1035): the name is also part of remote file names.
NAME_PATTERN = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # A shell variable name.
_REMOTE_PATH = re.compile(r"[A-Za-z0-9._+=@%,/-]+")  # Characters that reach scp's remote side unquoted safely.
_OWN_FLAGS = re.compile(r"--?(config|workdir)(=|$)")  # Job flags the launcher sets itself.


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of a plan. argv runs without a shell, in `cwd` if set.

  always: also runs after a failed step or an interruption (deleting the machine), unless a detached job may still
    be running on it.
  ended: for the step that streams a detached job's log: a command that succeeds only once the job has ended (its
    exit status file exists). When the step fails (ssh's status 255 on a dropped connection, or a job that is gone
    without an exit status) and this command fails too, the job may still be running: the machine is kept.
  local_files: local files the step writes, removed when the plan ends.
  """
  name: str
  argv: List[str]
  always: bool = False
  cwd: Optional[str] = None
  ended: Optional[List[str]] = None
  local_files: Tuple[str, ...] = ()

  def line(self) -> str:
    """The command as one shell line (what `--dry-run` prints)."""
    command = shlex.join(self.argv)
    return f"cd {shlex.quote(self.cwd)} && {command}" if self.cwd else command


def env_default(name: str, fallback: Optional[str] = None) -> Optional[str]:
  """`SPECTRAL_SOUP_<NAME>` from the environment, else `fallback`."""
  return os.environ.get(f"SPECTRAL_SOUP_{name.upper()}", fallback)


def fail(message: str) -> None:
  """Ends the launcher before any step: `error: <message>` on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR_EXIT_CODE)


def warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def add_job_flags(parser: argparse.ArgumentParser) -> None:
  """Flags of the job itself, shared by every launcher. Arguments after `--` go to the job unchanged."""
  parser.add_argument(
      "--config", required=True, help="Config file inside the repository (a path relative to its root), optionally "
      "with a variant (configs/ultrafeedback_gemma3_1b.py or configs/ultrafeedback_gemma3_1b.py:local); it is "
      "loaded here first, so that a bad file or variant fails before anything starts.")
  parser.add_argument(
      "--workdir", required=True,
      help="The job's --workdir (checkpoints, metrics); `~` is the home directory of the machine that runs the job. "
      "Multi-host jobs need one directory that every host sees at this path (a mounted bucket or NFS).")
  parser.add_argument("--module", default=MODULES[0], choices=MODULES, help="Entry point to run.")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="Print the commands in order instead of running them.")
  parser.add_argument("job_args", nargs="*", help="After `--`: flags passed to the job (--config.FIELD=VALUE).")


def check_name(parser: argparse.ArgumentParser, name: Optional[str], flag: str) -> None:
  """`--name`: required, and a valid Compute Engine / Cloud TPU name (it also names remote files)."""
  if not name:
    parser.error(f"{flag} is required.")
  if not NAME_PATTERN.fullmatch(name):
    parser.error(f"--name={name}: expected a lowercase letter, then up to 62 lowercase letters, digits or '-' "
                 f"(not ending with '-'), as Compute Engine names are.")


def check_job_args(parser: argparse.ArgumentParser, job_args: Sequence[str]) -> None:
  """The job's own --config and --workdir come from the launcher's flags: a second one after `--` would win."""
  for arg in job_args:
    match = _OWN_FLAGS.match(arg)
    if match:
      parser.error(f"job argument {arg}: give --{match.group(1)} to the launcher, before `--` (the job would use "
                   f"this one instead of the one the launcher checked).")
    name = arg.split("=", 1)[0]
    if name in ("--show_config", "--noshow_config", "--show-config"):
      parser.error(f"job argument {arg}: the job would print its config and exit (the machine then deleted as if "
                   "it had run); run `python -m <module> --config=... --show_config` here instead.")
    if not (name.startswith("--config.") or name.lstrip("-").split("=")[0] in _JOB_FLAGS):
      parser.error(f"job argument {arg}: expected --config.FIELD=VALUE overrides (or one of "
                   f"{', '.join('--' + f for f in sorted(_JOB_FLAGS))}); any other flag would fail on the machine, "
                   "after it was created.")


# Flags of the jobs themselves (besides --config.*) that may follow `--`: absl's logging flags.
_JOB_FLAGS = frozenset({"verbosity", "v", "logtostderr", "alsologtostderr", "log_dir", "stderrthreshold"})


class ConfigFileError(ValueError):
  """A config file that is not a config module (no get_config(), or a variant it cannot take)."""


def load_config(path: str, variant: Optional[str]) -> Any:
  """`get_config()` (or `get_config(variant)`) of the config file at `path`, as the job will load it.

  Raises ConfigFileError, or whatever the config's own code raises. The launcher's environment is left as it was
  (importing the package may set XLA_FLAGS).
  """
  spec = importlib.util.spec_from_file_location("_launch_config", path)
  if spec is None or spec.loader is None:
    raise ConfigFileError("not a Python file")
  saved_path, saved_env = list(sys.path), dict(os.environ)
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `from configs import ...`, as the job's working directory allows.
  try:
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
      raise ConfigFileError("the file has no get_config(): expected a module defining get_config()")
    if variant is not None and not inspect.signature(get_config).parameters:
      raise ConfigFileError(f"the config takes no variant (its get_config() has no argument), got :{variant}")
    return get_config() if variant is None else get_config(variant)
  finally:
    sys.path[:] = saved_path
    if dict(os.environ) != saved_env:
      os.environ.clear()
      os.environ.update(saved_env)


def check_config(parser: argparse.ArgumentParser, args: argparse.Namespace, remote: bool) -> Any:
  """Checks `--config` and returns the loaded config (None where it cannot be loaded here).

  Remote launchers ship the repository only: the file must be inside it, and not a path the archive leaves out;
  `args.config` becomes its path relative to the repository root. The file is loaded (and its variant applied) as
  the job will load it. Also refuses --config / --workdir among the job arguments.
  """
  check_job_args(parser, args.job_args)
  path, sep, variant = args.config.partition(":")
  full = os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(path)))
  if not os.path.isfile(full):
    parser.error(f"--config={args.config}: {path} is not a file (relative paths are from {REPO_ROOT}).")
  if remote:
    relative = os.path.relpath(os.path.realpath(full), os.path.realpath(REPO_ROOT))
    if relative.startswith(os.pardir + os.sep):
      parser.error(f"--config={args.config}: the file is outside the repository {REPO_ROOT} (or links out of it), "
                   f"and the remote machine gets only the repository's files: put the config under configs/.")
    relative = os.path.relpath(full, REPO_ROOT)
    left_out = excluded(relative, args.workdir)
    if left_out:
      parser.error(f"--config={args.config}: {relative} is left out of the code archive (pattern {left_out}), so "
                   f"the remote machine would not have it: put the config under configs/.")
    args.config = relative + sep + variant
  elif path.startswith("~"):  # The job gets the flag without a shell, which would have expanded it.
    args.config = os.path.expanduser(path) + sep + variant
  try:
    config = load_config(full, variant if sep else None)
  except ModuleNotFoundError as e:
    if e.name and os.path.exists(os.path.join(REPO_ROOT, e.name.split(".")[0])):
      parser.error(f"--config={args.config}: could not be loaded: {type(e).__name__}: {e}")
    warn(f"--config={args.config} was not loaded here ({e}); the job will load it.")
    return None
  except ConfigFileError as e:
    parser.error(f"--config={args.config}: {e}.")
  except Exception as e:  # pylint: disable=broad-except  # Any error of the config's own code is the user's input.
    message = " ".join(str(e).split())
    parser.error(f"--config={args.config}: loading it failed: {type(e).__name__}: {message}")
  overrides = [a for a in args.job_args if a.startswith("--config.")]
  return apply_overrides(parser, full + sep + variant, overrides) if overrides else config


def check_job_values(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Any, num_devices: Optional[int],
                     machine: str, num_hosts: int = 1) -> None:
  """The job's own config checks (`--module`'s `validate_config`), here, with the remote machine's device count,
  before any machine is created: the job would refuse the same config at once, after minutes of billed setup.
  `num_devices` None (not known from the flags): left to the job, with a warning."""
  if config is None:
    return
  if num_devices is None:
    warn(f"the number of devices of {machine} is not known here: the config's values are checked when the job "
         "starts.")
    return
  try:
    if args.module == "experiments.main":
      from experiments import main as job  # pylint: disable=g-import-not-at-top
      job.validate_config(config, num_devices=num_devices)
    elif hasattr(config, "train"):
      from spectral_soup.offline import config_checks  # pylint: disable=g-import-not-at-top
      config_checks.validate_config(config, num_devices=num_devices, num_hosts=num_hosts)
  except ValueError as e:
    parser.error(f"{e} (on the {num_devices} devices of {machine})")


def apply_overrides(parser: argparse.ArgumentParser, config_arg: str, overrides: Sequence[str]) -> Any:
  """The config of `--config=config_arg` with the job's `--config.FIELD=VALUE` arguments applied, parsed as the job
  parses them (ml_collections' config flags): a misspelt field or a value of the wrong type is refused here, before
  any machine is created, with the job's own one-line message."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import cli  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "The job's config.", flag_values=flag_values)
  argv = ["job", f"--config={config_arg}", *overrides]
  saved_argv, saved_path, saved_env = sys.argv, list(sys.path), dict(os.environ)
  sys.argv = argv  # ml_collections reads the overrides from sys.argv.
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  try:
    flag_values(argv)
    return flag_values.config
  except flags.Error as e:
    parser.error(f"job argument: {cli.flag_error_message(e)}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    parser.error(f"job argument: {cli._config_error_message(e, argv)}")  # pylint: disable=protected-access
  finally:
    sys.argv, sys.path[:] = saved_argv, saved_path
    if dict(os.environ) != saved_env:
      os.environ.clear()
      os.environ.update(saved_env)


def check_plan_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, steps: Sequence[str]) -> None:
  """Parses `--steps` into a list (a subset of `steps`), `--copy LOCAL:REMOTE` into `args.copies` and `--env
  KEY=VALUE` into `args.env_vars`, refusing what would fail (or do something else) only on the remote machine.

  A --copy source that does not exist is refused, except in a dry run (a warning), which shows the plan only.
  """
  if not _REMOTE_PATH.fullmatch(getattr(args, "python", "python3")):  # It reaches the remote shell unquoted.
    parser.error(f"--python={args.python!r}: expected an interpreter name or path of letters, digits and "
                 "._+=@%,/- (no spaces or shell characters).")
  if not args.workdir.strip():  # The job refuses it, but only on the machine, after create and install.
    parser.error("--workdir is empty: expected the job's directory on the machine (e.g. /mnt/shared/RUN).")
  if "://" in args.workdir:  # The jobs write to a file system path; a URL became a relative local directory.
    parser.error(f"--workdir={args.workdir}: expected a path on the machine (mount a bucket with gcsfuse, or use "
                 "Filestore, and give its mount path, e.g. /mnt/shared/RUN), not a URL.")
  args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  if not args.steps:
    parser.error(f"--steps is empty: expected some of {','.join(steps)}.")
  unknown = sorted(set(args.steps) - set(steps))
  if unknown:
    parser.error(f"--steps: unknown {unknown}; expected some of {tuple(steps)}.")
  args.copies = []
  for item in args.copy:
    local, sep, remote = item.partition(":")
    if not sep or not local or not remote:
      parser.error(f"--copy={item}: expected LOCAL:REMOTE (a local path, then a path relative to the code "
                   f"directory).")
    local = os.path.expanduser(local)
    target = posixpath.normpath(remote)
    if posixpath.isabs(remote) or remote.startswith("~") or target == os.pardir or target.startswith("../"):
      parser.error(f"--copy={item}: REMOTE must be a relative path inside the code directory (~/{CODE_DIR}), "
                   f"e.g. data/ultrafeedback.")
    if not _REMOTE_PATH.fullmatch(remote):
      parser.error(f"--copy={item}: REMOTE may hold only letters, digits and ._+=@%,/- (it reaches the remote "
                   f"shell unquoted).")
    if not os.path.exists(local):
      if not args.dry_run:
        parser.error(f"--copy={item}: {local} does not exist.")
      warn(f"--copy={item}: {local} does not exist here (a real run refuses it).")
    args.copies.append((local, target))
  args.env_vars = {}
  for item in args.env:
    key, sep, value = item.partition("=")
    if not sep:
      parser.error(f"--env={item}: expected KEY=VALUE.")
    if not _ENV_KEY.fullmatch(key):
      parser.error(f"--env={item}: the key {key!r} is not a shell variable name ([A-Za-z_][A-Za-z0-9_]*).")
    args.env_vars[key] = value


def job_argv(python: str, module: str, config: str, workdir: str, job_args: Sequence[str],
             extra_flags: Sequence[str] = ()) -> List[str]:
  """`python -m <module> --config=... --workdir=... [extra flags] [job args]`."""
  return [python, "-m", module, f"--config={config}", f"--workdir={workdir}", *extra_flags, *job_args]


def archive_excludes(workdir: Optional[str] = None) -> List[str]:
  """tar --exclude patterns: ARCHIVE_EXCLUDES, the paths .gitignore names and a local --workdir inside the repo.

  Archive members are named `./path`, so a pattern starting with `./` matches at the repository root only (as a
  .gitignore pattern with a leading or inner `/`); any other pattern matches a name at any depth.
  """
  patterns = list(ARCHIVE_EXCLUDES)
  try:
    with open(os.path.join(REPO_ROOT, ".gitignore")) as f:
      lines = f.read().splitlines()
  except OSError:
    lines = []
  for line in lines:
    line = line.strip()
    if not line or line.startswith(("#", "!")):
      continue
    anchored = "/" in line.rstrip("/")
    line = line.strip("/")
    patterns.append(f"./{line}" if anchored else line)
  if workdir and not workdir.startswith("~"):
    inside = os.path.relpath(os.path.normpath(os.path.join(REPO_ROOT, workdir)), REPO_ROOT)
    if inside != os.curdir and not inside.startswith(os.pardir):
      patterns.append(f"./{inside}")  # Outputs of local runs with the same --workdir.
  return list(dict.fromkeys(patterns))


def excluded(relative: str, workdir: Optional[str] = None) -> Optional[str]:
  """The archive exclude pattern that leaves out the repository path `relative`, or None."""
  parts = relative.split(os.sep)
  for pattern in archive_excludes(workdir):
    if pattern.startswith("./"):
      depth = pattern.count("/")
      if fnmatch.fnmatchcase("./" + "/".join(parts[:depth]), pattern):
        return pattern
    elif "/" in pattern:
      if any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern + "*") for i in range(len(parts))):
        return pattern
    elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
      return pattern
  return None


def archive_step(archive: str, workdir: Optional[str] = None) -> Step:
  """Packs the working tree (without .git, ignored paths and workdirs) into `archive`, so uncommitted changes travel
  too; the archive is removed when the plan ends."""
  excludes = [f"--exclude={pattern}" for pattern in archive_excludes(workdir)]
  return Step("archive", ["tar", "-czf", archive, *excludes, "-C", REPO_ROOT, "."], local_files=(archive,))


def install_script(archive_name: str, python: str, jax_extra: str, install_python: bool,
                   make_dirs: Sequence[str] = ()) -> str:
  """Remote shell lines: unpack the code into ~/CODE_DIR, make a virtual environment, install the package.

  jax_extra: "tpu" or "cuda12" (`jax[...]` within setup.py's jax range). install_python: apt-get `python`
  first (TPU and Deep Learning VM images ship Python 3.10; the package needs >= 3.11).
  """
  lines = []
  if install_python:
    lines.append(f"sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                 f"{python} {python}-venv")
  lines += [
      f"mkdir -p ~/{CODE_DIR} ~/{RUNS_DIR}",
      f"tar -xzf ~/{archive_name} -C ~/{CODE_DIR}",
      *(f"mkdir -p ~/{CODE_DIR}/{shlex.quote(d)}" for d in make_dirs),
      f"{python} -m venv ~/{VENV}",
      f"~/{VENV}/bin/python -m pip install -q -U pip",
      f"~/{VENV}/bin/python -m pip install -q -e ~/{CODE_DIR} 'jax[{jax_extra}]>=0.10,<0.11'",
  ]
  return " && ".join(lines)


def copy_parents(copies: Sequence[Tuple[str, str]]) -> List[str]:
  """The remote directories (relative to the code directory) that the --copy destinations go into."""
  return sorted({posixpath.dirname(remote) for _, remote in copies if posixpath.dirname(remote)})


def remote_python() -> str:
  return f"~/{VENV}/bin/python"


def detached_script(argv: Sequence[str], run_name: str, env: Optional[Dict[str, str]] = None) -> str:
  """Remote shell lines that start `argv` in ~/CODE_DIR in the background and return at once.

  Output goes to ~/RUNS_DIR/<run>.log, the pid to <run>.pid and, when the job ends, its exit status to <run>.rc:
  the job survives a dropped ssh connection, and `follow_script` streams it.
  """
  for key in env or {}:
    if not _ENV_KEY.fullmatch(key):
      raise ValueError(f"environment variable name {key!r}: expected [A-Za-z_][A-Za-z0-9_]*")
  prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items())]
  command = " ".join(prefix + [_quote_remote(a) for a in argv])
  run = f"~/{RUNS_DIR}/{run_name}"
  inner = f"cd ~/{CODE_DIR} && {command}; echo $? > {run}.rc"
  return (f"mkdir -p ~/{RUNS_DIR} && rm -f {run}.rc && "
          f"{{ nohup sh -c {shlex.quote(inner)} > {run}.log 2>&1 < /dev/null & echo $! > {run}.pid; }}")


def follow_script(run_name: str) -> str:
  """Remote shell lines that stream a detached job's log until it ends, then exit with the job's status (1 when
  it left none: `ended_script` then tells whether it ended)."""
  run = f"~/{RUNS_DIR}/{run_name}"
  return (f"tail -n +1 -F --pid=$(cat {run}.pid) {run}.log; "
          f"exit $(cat {run}.rc 2>/dev/null || echo 1)")


def ended_script(run_name: str) -> str:
  """Remote shell lines that succeed only if the detached job has ended (its exit status file exists)."""
  return f"test -f ~/{RUNS_DIR}/{run_name}.rc"


def _quote_remote(arg: str) -> str:
  """shlex.quote, but a leading `~/` stays unquoted so that the remote shell expands it.

  A `~` later in the word (`--workdir=~/x`) reaches the job as typed; the job's entry points expand it themselves
  (`spectral_soup.utils.cli.parse_flags`), with the remote machine's home.
  """
  if arg.startswith("~/"):
    return "~/" + shlex.quote(arg[2:])
  return shlex.quote(arg)


def check_programs(programs: Sequence[str]) -> None:
  """Ends the launcher (one line, exit status 2) if a program the plan runs is not installed."""
  for program in dict.fromkeys(programs):
    if shutil.which(program):
      continue
    if program == "gcloud":
      fail("gcloud is not on PATH (install the Google Cloud SDK, or use --dry-run).")
    fail(f"{program} is not on PATH (or not executable).")


def execute(steps: Sequence[Step], dry_run: bool, out=None, reattach: Optional[str] = None) -> int:
  """Prints the plan (dry run) or runs it in order; returns the exit status of the first failed step (or 0).

  After a failed step only `always` steps run; a Ctrl-C (or any error) is a failed step too (status 130), so the
  machine is still deleted. While a detached job may still be running (its log stream failed or was interrupted
  before the job left an exit status) the `always` steps are skipped instead, and the commands that re-attach to
  the job (`reattach`) and delete the machine are printed.
  """
  out = out or sys.stdout
  if dry_run:
    for step in steps:
      print(step.line(), file=out)
    return 0

  def say(message: str) -> None:
    print(message, file=out, flush=True)

  status, job_may_run, kept, error = 0, False, [], None
  try:
    for step in steps:
      if status and not step.always:
        continue
      if step.always and job_may_run:
        kept.append(step)
        continue
      say(f"[{step.name}] {step.line()}")
      try:
        code = subprocess.run(step.argv, cwd=step.cwd, check=False).returncode
      except KeyboardInterrupt:
        code = INTERRUPTED_EXIT_CODE
        say(f"[{step.name}] interrupted.")
        if step.always:
          say(f"[{step.name}] did not finish: the machine may still exist. Run it again: {step.line()}")
        elif step.ended is not None:
          job_may_run = True
      except OSError as e:
        code = 127
        say(f"[{step.name}] could not start: {e}")
      except BaseException as e:  # pylint: disable=broad-except  # The always steps still run; re-raised below.
        code, error = 1, e
      if code and not status:
        say(f"[{step.name}] failed with status {code}.")
        status = code
      if code and step.ended is not None and not job_may_run:
        say(f"[{step.name}] has the job ended (left its exit status)? {shlex.join(step.ended)}")
        try:
          job_may_run = subprocess.run(step.ended, check=False).returncode != 0
        except (KeyboardInterrupt, OSError):
          job_may_run = True
  finally:
    for path in {path for step in steps for path in step.local_files}:
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
  if job_may_run:
    say("The job may still be running (its log stream stopped before the job left its exit status): the machine "
        "is kept.")
    if reattach:
      say(f"  Re-attach to its log{' (and delete the machine once it ends)' if kept else ''}: {reattach}")
    for step in kept:
      say(f"  {step.name.capitalize()} it now: {step.line()}")
  if error is not None:
    raise error
  return status
