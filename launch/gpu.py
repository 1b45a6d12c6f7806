r"""Runs a config on a Compute Engine GPU VM: create, wait for the driver, copy and install, run, stream, delete.

  python -m launch.gpu --name=ss-gpu --zone=us-central1-a --project=my-project --machine-type=a2-ultragpu-1g \
      --config=configs/train_basis_tiny.py --workdir=workdir/basis_tiny [--dry-run] [-- --config.FIELD=VALUE ...]

The plan, in order (`--steps` picks a subset):

  create   gcloud compute instances create NAME --machine-type=... (the A2 / A3 / G2 types include their GPUs;
           `--accelerator=type=...,count=...` adds one to an N1 type) on a Deep Learning VM image with the NVIDIA
           driver installed at first boot
  wait     ssh until `nvidia-smi` answers (the driver install takes a few minutes; after --driver-timeout seconds
           the step fails, and the VM is deleted)
  archive  tar the working tree (no .git, no .gitignore'd paths, no workdir) to /tmp/NAME-spectral_soup.tar.gz
           (removed when the launcher ends)
  upload   gcloud compute scp ARCHIVE NAME:spectral_soup.tar.gz
  install  Python 3.11 (apt), unpack into ~/spectral_soup, a venv, pip install -e . 'jax[cuda12]'
  copy     gcloud compute scp --recurse LOCAL NAME:spectral_soup/REMOTE, per --copy
  run      start `python -m experiments.train_basis --config=... --workdir=...` in the background (one process sees
           every GPU of the VM: no multi-host setup), log in ~/spectral_soup_runs/NAME.log
  logs     stream that log until the job ends; exits with the job's status
  delete   gcloud compute instances delete NAME --quiet (also after a failed step or a Ctrl-C; `--keep` skips it)

The job runs detached: if the log stream breaks (a dropped connection, a Ctrl-C) before the job has ended, the VM is
kept and the launcher prints the command that re-attaches (`--steps=logs,delete`) and the one that deletes it.
A relative --workdir lives on the VM's boot disk, and goes with the VM when it is deleted: copy what you need
first (`gcloud compute scp --recurse NAME:spectral_soup/WORKDIR .`, with --keep), or use a mounted bucket.

`--spot` makes a Spot VM that Compute Engine stops (not deletes) on preemption: its boot disk, with a relative
--workdir, is kept (and billed) while it is stopped. To resume, start it again (`gcloud compute instances start
NAME`) and rerun the launcher with `--steps=run,logs,delete`: experiments.train_basis resumes from the newest
checkpoint in the workdir. Or delete it.

Project, zone and name come from the flags or from SPECTRAL_SOUP_PROJECT / SPECTRAL_SOUP_ZONE / SPECTRAL_SOUP_VM.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import List, Optional, Sequence

from launch import common

STEPS = ("create", "wait", "archive", "upload", "install", "copy", "run", "logs", "delete")
WAIT_INTERVAL_S = 10  # Between two `nvidia-smi` tries of the wait step.


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.gpu", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", default=common.env_default("vm"), help="VM name (env SPECTRAL_SOUP_VM).")
  parser.add_argument("--project", default=common.env_default("project"),
                      help="GCP project (env SPECTRAL_SOUP_PROJECT; default: gcloud's core/project).")
  parser.add_argument("--zone", default=common.env_default("zone"),
                      help="Zone (env SPECTRAL_SOUP_ZONE; default: gcloud's compute/zone).")
  parser.add_argument(
      "--machine-type", "--machine_type", dest="machine_type", default="a2-ultragpu-1g",
      help="Machine type: a2-ultragpu-1g (1x A100 80GB), a3-highgpu-1g (1x H100 80GB), "
      "g2-standard-8 (1x L4), or an N1 type with --accelerator.")
  parser.add_argument("--accelerator", default=None, help="GPUs to attach, e.g. type=nvidia-tesla-t4,count=1 "
                      "(N1 machine types only).")
  parser.add_argument(
      "--image-family", "--image_family", dest="image_family", default="common-cu124-ubuntu-2204-py310",
      help="Deep Learning VM image family (list them: gcloud compute images list "
      "--project=deeplearning-platform-release).")
  parser.add_argument("--image-project", "--image_project", dest="image_project",
                      default="deeplearning-platform-release", help="Project of the image family.")
  parser.add_argument("--boot-disk-size", "--boot_disk_size", dest="boot_disk_size", default="200GB",
                      help="Boot disk size.")
  parser.add_argument(
      "--spot", action="store_true",
      help="Create a Spot VM: cheaper, but Compute Engine may stop it at any time; its disk (and a relative "
      "--workdir) stays. Resume: gcloud compute instances start NAME, then --steps=run,logs,delete.")
  parser.add_argument("--driver-timeout", dest="driver_timeout", type=int, default=1200,
                      help="Seconds the wait step waits for the NVIDIA driver (nvidia-smi) before it fails.")
  parser.add_argument(
      "--copy", action="append", default=[], metavar="LOCAL:REMOTE",
      help="Copy a local file or directory to the VM, at REMOTE relative to the code directory. "
      "Repeatable.")
  parser.add_argument("--steps", default=",".join(STEPS), help=f"Comma-separated subset of {','.join(STEPS)}.")
  parser.add_argument("--keep", action="store_true", help="Do not delete the VM at the end.")
  parser.add_argument("--python", default="python3.11", help="Remote interpreter the venv is made from.")
  parser.add_argument("--no-install-python", dest="install_python", action="store_false",
                      help="The image already has --python (skip apt-get).")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="Environment variable of the job. Repeatable.")
  common.add_job_flags(parser)
  args = parser.parse_args(argv)
  common.check_name(parser, args.name, "--name (or SPECTRAL_SOUP_VM)")
  if args.driver_timeout <= 0:
    parser.error(f"--driver-timeout={args.driver_timeout}: expected a number of seconds > 0.")
  config = common.check_config(parser, args, remote=True)
  machine = args.machine_type + (f" with --accelerator={args.accelerator}" if args.accelerator else "")
  try:
    count = gpu_count(args.machine_type, args.accelerator)
  except ValueError as e:
    parser.error(f"--machine-type={args.machine_type}" +
                 (f" --accelerator={args.accelerator}" if args.accelerator else "") + f": {e}.")
  common.check_job_values(parser, args, config, count, machine)
  common.check_plan_flags(parser, args, STEPS)
  return args


# GPUs of the G2 machine types (the A2 / A3 types name theirs: a2-ultragpu-8g, a3-highgpu-8g).
_G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 32: 1, 24: 2, 48: 4, 96: 8}


def gpu_count(machine_type: str, accelerator: Optional[str]) -> Optional[int]:
  """The GPUs of a Compute Engine machine: `--accelerator`'s count, else the A2 / A3 type's `-<n>g` suffix or the G2
  type's table; None where the flags do not tell."""
  if accelerator:
    count = re.search(r"(?:^|,)count=([^,]*)(?:,|$)", accelerator)
    if not count:
      return 1
    if not re.fullmatch(r"\d+", count.group(1)) or int(count.group(1)) < 1:
      raise ValueError(f"count={count.group(1)}: expected a whole number of GPUs, at least 1")
    return int(count.group(1))
  named = re.fullmatch(r"a\d-\w+-(\d+)g", machine_type)
  if named:
    if int(named.group(1)) < 1:
      raise ValueError(f"{machine_type} names {named.group(1)} GPUs: expected at least 1")
    return int(named.group(1))
  g2 = re.fullmatch(r"g2-standard-(\d+)", machine_type)
  return _G2_GPUS.get(int(g2.group(1))) if g2 else None


def wait_script(timeout_s: int, interval_s: float = WAIT_INTERVAL_S) -> str:
  """Remote shell lines: wait until `nvidia-smi` answers, at most `timeout_s` seconds, then list the GPUs."""
  tries = max(1, int(timeout_s / interval_s))
  return (f"i=0; until nvidia-smi > /dev/null 2>&1; do i=$((i + 1)); if [ $i -ge {tries} ]; then "
          f"echo 'nvidia-smi did not answer within {timeout_s} s: no NVIDIA driver (is --image-family a Deep Learning "
          f"VM image with the driver, and does the machine type have a GPU?)' >&2; exit 1; fi; sleep {interval_s}; "
          f"done; nvidia-smi -L")


def _location(args: argparse.Namespace) -> List[str]:
  return ([f"--zone={args.zone}"] if args.zone else []) + ([f"--project={args.project}"] if args.project else [])


def build_commands(args: argparse.Namespace) -> List[common.Step]:
  """The plan: `common.Step`s in order (see the module docstring)."""
  archive = f"/tmp/{args.name}-{common.CODE_DIR}.tar.gz"
  archive_name = f"{common.CODE_DIR}.tar.gz"
  job = common.job_argv(common.remote_python(), args.module, args.config, args.workdir, args.job_args)

  def ssh(name: str, command: str, *flags: str, **kwargs) -> common.Step:
    return common.Step(name, ["gcloud", "compute", "ssh", args.name, *_location(args), *flags, "--command=" + command],
                       **kwargs)

  create = [
      "gcloud", "compute", "instances", "create", args.name, *_location(args), f"--machine-type={args.machine_type}",
      f"--image-family={args.image_family}", f"--image-project={args.image_project}",
      f"--boot-disk-size={args.boot_disk_size}", "--maintenance-policy=TERMINATE",
      "--metadata=install-nvidia-driver=True"
  ]
  if args.accelerator:
    create.append(f"--accelerator={args.accelerator}")
  if args.spot:
    # STOP, not DELETE: a preempted VM keeps its boot disk, which holds the code, the venv and a relative --workdir
    # with its checkpoints, so that starting it again and rerunning `run` resumes the job.
    create += ["--provisioning-model=SPOT", "--instance-termination-action=STOP"]
  plan = {
      "create": [common.Step("create", create)],
      "wait": [ssh("wait", wait_script(args.driver_timeout), "--ssh-flag=-oConnectionAttempts=30")],
      "archive": [common.archive_step(archive, args.workdir)],
      "upload": [
          common.Step("upload", ["gcloud", "compute", "scp", *_location(args), archive, f"{args.name}:{archive_name}"])
      ],
      "install": [
          ssh(
              "install",
              common.install_script(archive_name, args.python, "cuda12", args.install_python,
                                    make_dirs=common.copy_parents(args.copies)))
      ],
      "copy": [
          common.Step("copy", [
              "gcloud", "compute", "scp", *_location(args), "--recurse", local,
              f"{args.name}:{common.CODE_DIR}/{remote}"
          ]) for local, remote in args.copies
      ],
      "run": [ssh("run", common.detached_script(job, args.name, args.env_vars))],
      "logs": [
          ssh(
              "logs", common.follow_script(args.name), ended=[
                  "gcloud", "compute", "ssh", args.name, *_location(args), "--command=" + common.ended_script(args.name)
              ])
      ],
      "delete": [] if args.keep else [
          common.Step("delete", ["gcloud", "compute", "instances", "delete", args.name, *_location(args), "--quiet"],
                      always=True)
      ],
  }
  return [step for name in STEPS if name in args.steps for step in plan[name]]


def reattach_command(args: argparse.Namespace) -> str:
  """The launcher command that streams the job's log again (and then deletes the VM, unless --keep)."""
  argv = [
      "python", "-m", "launch.gpu", f"--name={args.name}", *_location(args), f"--config={args.config}",
      f"--workdir={args.workdir}", "--steps=logs" if args.keep else "--steps=logs,delete"
  ]
  argv += [f"--machine-type={args.machine_type}"] + ([f"--accelerator={args.accelerator}"] if args.accelerator else [])
  argv += [f"--module={args.module}"] if args.module != common.MODULES[0] else []
  # The job's overrides too: the launcher checks the config again, and without them refused what the job accepted.
  argv += ["--", *args.job_args] if args.job_args else []
  return shlex.join(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  steps = build_commands(args)
  if not args.dry_run:
    common.check_programs([step.argv[0] for step in steps])
  return common.execute(steps, args.dry_run, reattach=reattach_command(args))


if __name__ == "__main__":
  sys.exit(main())
