r"""Runs a config on this machine, from the repository root; optionally on N fake CPU devices, or until it finishes.

  python -m launch.local --config=configs/train_basis_tiny.py --workdir=workdir/basis_tiny [--dry-run] \
      [--fake-devices=8] [--restarts=3] [-- --config.FIELD=VALUE ...]

* `--fake-devices=N` runs on N CPU devices (--xla_force_host_platform_device_count=N added to XLA_FLAGS,
  JAX_PLATFORMS=cpu), to exercise a config's mesh (data x fsdp x model) without accelerators.
* `--restarts=R` runs the job again, up to R times, while it exits with status 143 (stopped by SIGTERM after saving
  a checkpoint): each run resumes from the newest checkpoint in --workdir.
* `--nice=N` lowers the job's CPU priority (a shared machine).
* Ctrl-C stops the job (which gets it too) and the launcher, exit status 130; a second Ctrl-C kills the job.
* SIGTERM to the launcher is passed on to the job (it saves a checkpoint and stops); the launcher then exits with the
  job's status (143), without restarting it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from typing import List, Optional, Sequence

from launch import common

PREEMPTED_EXIT_CODE = 143  # experiments.train_basis: stopped by SIGTERM after a checkpoint; run again to resume.
INTERRUPTED_EXIT_CODE = 130  # The shell's status for a job stopped by Ctrl-C (128 + SIGINT).
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--python", default=sys.executable, help="Interpreter of the job.")
  parser.add_argument("--fake-devices", "--fake_devices", dest="fake_devices", type=int, default=0,
                      help="Run on this many fake CPU devices (0: the real devices).")
  parser.add_argument("--nice", type=int, default=0, help="CPU niceness of the job (0: unchanged).")
  parser.add_argument("--restarts", type=int, default=0,
                      help=f"Run again up to this many times while the job exits with {PREEMPTED_EXIT_CODE}.")
  common.add_job_flags(parser)
  args = parser.parse_args(argv)
  config = common.check_config(parser, args, remote=False)
  if args.fake_devices < 0 or args.restarts < 0:
    parser.error("--fake-devices and --restarts must be >= 0.")
  if args.fake_devices:  # The job's checks on the devices it will see (a --dry-run printed a command it refuses).
    common.check_job_values(parser, args, config, args.fake_devices, f"--fake-devices={args.fake_devices}")
  return args


def build_commands(args: argparse.Namespace) -> List[common.Step]:
  """One step: `[env ...] [nice -n N] python -m MODULE --config=... --workdir=... [job args]`, in the repo root."""
  argv = common.job_argv(args.python, args.module, args.config, args.workdir, args.job_args)
  if args.nice:
    argv = ["nice", "-n", str(args.nice), *argv]
  if args.fake_devices:
    # The user's XLA_FLAGS stay; only an earlier device count is replaced.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=", 1)[0] != DEVICE_COUNT_FLAG]
    xla_flags = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={args.fake_devices}"])
    argv = ["env", f"XLA_FLAGS={xla_flags}", "JAX_PLATFORMS=cpu", *argv]
  return [common.Step("run", argv, cwd=common.REPO_ROOT)]


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  steps = build_commands(args)
  if args.dry_run:
    return common.execute(steps, dry_run=True)
  if not shutil.which(args.python):
    common.fail(f"--python={args.python}: no such executable (give an interpreter on PATH, or its full path).")
  step = steps[0]
  _Terminated.received = False
  for attempt in range(args.restarts + 1):
    print(f"[run {attempt + 1}] {step.line()}", flush=True)
    code = run_job(step)
    if code != PREEMPTED_EXIT_CODE or _Terminated.received:  # Stopped by the launcher's own SIGTERM: not restarted.
      return code
  return code


class _Terminated:
  """Set by SIGTERM to the launcher while a job runs (a scheduler stopping it, `kill PID`)."""
  received = False


def run_job(step: common.Step) -> int:
  """Runs the job and returns its exit status (128 + N for signal N).

  Ctrl-C reaches the job too (one process group): the launcher waits for the job to stop on its own, then returns
  130 without a traceback and without restarting it; a second Ctrl-C kills the job. SIGTERM to the launcher is
  passed on to the job (which saves a checkpoint and stops), and the launcher returns its status without
  restarting it (the launcher exited at once and left the job running, holding its workdir).
  """
  proc = subprocess.Popen(step.argv, cwd=step.cwd)

  def forward(signum, frame):
    del signum, frame
    if not _Terminated.received:
      print("\n[terminated] passing SIGTERM on to the job and waiting for it to stop ...", file=sys.stderr, flush=True)
    _Terminated.received = True
    proc.send_signal(signal.SIGTERM)

  try:
    previous = signal.signal(signal.SIGTERM, forward)
  except ValueError:  # Not the main thread: no signal handling.
    previous = None
  try:
    code = proc.wait()
  except KeyboardInterrupt:
    print("\n[interrupted] waiting for the job to stop (Ctrl-C again kills it) ...", file=sys.stderr, flush=True)
    try:
      proc.wait()
    except KeyboardInterrupt:
      proc.kill()
      proc.wait()
    print("[interrupted] the job stopped.", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT_CODE
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return code if code >= 0 else 128 - code


if __name__ == "__main__":
  sys.exit(main())
