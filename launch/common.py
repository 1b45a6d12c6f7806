"""What the launchers share: commands as argv lists, `--dry-run`, the code archive, the remote job's shell lines.

A launcher builds its whole plan first, as a list of `Step`s (a name and an argv list), and then either prints it
(`--dry-run`: one shell-quoted line per command, in order, nothing run) or runs it with `subprocess`, stopping at
the first failure. Steps marked `always` (deleting a cloud VM) run even after a failure, so that a failed job does
not leave a machine running.

No credentials live here: project, zone and names come from flags or `SPECTRAL_SOUP_*` environment variables, and
gcloud uses whatever account it is logged in with.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("experiments.train_basis", "experiments.main")  # Entry points a launcher can run.
CODE_DIR = "spectral_soup"  # Where the code goes on a remote machine (relative to the remote home).
VENV = "spectral_soup_venv"  # The remote virtual environment (relative to the remote home).
RUNS_DIR = "spectral_soup_runs"  # Remote logs, pids and exit codes of detached jobs (relative to the remote home).
ARCHIVE_EXCLUDES = (".git", "workdir", "__pycache__", "*.pyc", ".pytest_cache")


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of a plan. argv runs without a shell, in `cwd` if set; `always` steps also run after a failure."""
  name: str
  argv: List[str]
  always: bool = False
  cwd: Optional[str] = None

  def line(self) -> str:
    """The command as one shell line (what `--dry-run` prints)."""
    command = shlex.join(self.argv)
    return f"cd {shlex.quote(self.cwd)} && {command}" if self.cwd else command


def env_default(name: str, fallback: Optional[str] = None) -> Optional[str]:
  """`SPECTRAL_SOUP_<NAME>` from the environment, else `fallback`."""
  return os.environ.get(f"SPECTRAL_SOUP_{name.upper()}", fallback)


def add_job_flags(parser: argparse.ArgumentParser) -> None:
  """Flags of the job itself, shared by every launcher. Arguments after `--` go to the job unchanged."""
  parser.add_argument(
      "--config", required=True, help="Config file, relative to the repository root, optionally with a variant "
      "(configs/ultrafeedback_gemma3_1b.py or configs/ultrafeedback_gemma3_1b.py:local).")
  parser.add_argument(
      "--workdir", required=True,
      help="The job's --workdir (checkpoints, metrics). Multi-host jobs need one directory that "
      "every host sees at this path (a mounted bucket or NFS).")
  parser.add_argument("--module", default=MODULES[0], choices=MODULES, help="Entry point to run.")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="Print the commands in order instead of running them.")
  parser.add_argument("job_args", nargs="*", help="After `--`: flags passed to the job (--config.FIELD=VALUE).")


def check_config_path(parser: argparse.ArgumentParser, config: str) -> None:
  path = config.split(":", 1)[0]
  if not os.path.isfile(os.path.join(REPO_ROOT, path)):
    parser.error(f"--config={config}: {path} is not a file under {REPO_ROOT}.")


def check_plan_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, steps: Sequence[str]) -> None:
  """Parses `--steps` into a list (a subset of `steps`) and checks `--copy LOCAL:REMOTE` and `--env KEY=VALUE`."""
  args.steps = [s for s in args.steps.split(",") if s]
  unknown = sorted(set(args.steps) - set(steps))
  if unknown:
    parser.error(f"--steps: unknown {unknown}; expected some of {tuple(steps)}.")
  for item in args.copy:
    if ":" not in item:
      parser.error(f"--copy={item}: expected LOCAL:REMOTE.")
  for item in args.env:
    if "=" not in item:
      parser.error(f"--env={item}: expected KEY=VALUE.")


def job_argv(python: str, module: str, config: str, workdir: str, job_args: Sequence[str],
             extra_flags: Sequence[str] = ()) -> List[str]:
  """`python -m <module> --config=... --workdir=... [extra flags] [job args]`."""
  return [python, "-m", module, f"--config={config}", f"--workdir={workdir}", *extra_flags, *job_args]


def archive_step(archive: str) -> Step:
  """Packs the working tree (without .git and workdirs) into `archive`, so uncommitted changes travel too."""
  excludes = [f"--exclude={pattern}" for pattern in ARCHIVE_EXCLUDES]
  return Step("archive", ["tar", "-czf", archive, *excludes, "-C", REPO_ROOT, "."])


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


def remote_python() -> str:
  return f"~/{VENV}/bin/python"


def detached_script(argv: Sequence[str], run_name: str, env: Optional[Dict[str, str]] = None) -> str:
  """Remote shell lines that start `argv` in ~/CODE_DIR in the background and return at once.

  Output goes to ~/RUNS_DIR/<run>.log, the pid to <run>.pid and, when the job ends, its exit status to <run>.rc:
  the job survives a dropped ssh connection, and `follow_script` streams it.
  """
  prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items())]
  command = " ".join(prefix + [_quote_remote(a) for a in argv])
  run = f"~/{RUNS_DIR}/{run_name}"
  inner = f"cd ~/{CODE_DIR} && {command}; echo $? > {run}.rc"
  return (f"mkdir -p ~/{RUNS_DIR} && rm -f {run}.rc && "
          f"{{ nohup sh -c {shlex.quote(inner)} > {run}.log 2>&1 < /dev/null & echo $! > {run}.pid; }}")


def follow_script(run_name: str) -> str:
  """Remote shell lines that stream a detached job's log until it ends, then exit with the job's status."""
  run = f"~/{RUNS_DIR}/{run_name}"
  return (f"tail -n +1 -F --pid=$(cat {run}.pid) {run}.log; "
          f"exit $(cat {run}.rc 2>/dev/null || echo 1)")


def _quote_remote(arg: str) -> str:
  """shlex.quote, but a leading `~/` stays unquoted so that the remote shell expands it."""
  if arg.startswith("~/"):
    return "~/" + shlex.quote(arg[2:])
  return shlex.quote(arg)


def execute(steps: Sequence[Step], dry_run: bool, out=None) -> int:
  """Prints the plan (dry run) or runs it in order; returns the exit status of the first failed step (or 0)."""
  out = out or sys.stdout
  if dry_run:
    for step in steps:
      print(step.line(), file=out)
    return 0
  status = 0
  for step in steps:
    if status and not step.always:
      continue
    print(f"[{step.name}] {step.line()}", file=out, flush=True)
    code = subprocess.run(step.argv, cwd=step.cwd, check=False).returncode
    if code and not status:
      print(f"[{step.name}] failed with status {code}.", file=out, flush=True)
      status = code
  return status
