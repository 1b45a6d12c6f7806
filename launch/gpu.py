r"""Runs a config on a Compute Engine GPU VM: create, wait for the driver, copy and install, run, stream, delete.

  python -m launch.gpu --name=ss-gpu --zone=us-central1-a --project=my-project --machine-type=a2-ultragpu-1g \
      --config=configs/train_basis_tiny.py --workdir=workdir/basis_tiny [--dry-run] [-- --config.FIELD=VALUE ...]

The plan, in order (`--steps` picks a subset):

  create   gcloud compute instances create NAME --machine-type=... (the A2 / A3 / G2 types include their GPUs;
           `--accelerator=type=...,count=...` adds one to an N1 type) on a Deep Learning VM image with the NVIDIA
           driver installed at first boot
  wait     ssh until `nvidia-smi` answers (the driver install takes a few minutes)
  archive  tar the working tree to /tmp/NAME-spectral_soup.tar.gz
  upload   gcloud compute scp ARCHIVE NAME:spectral_soup.tar.gz
  install  Python 3.11 (apt), unpack into ~/spectral_soup, a venv, pip install -e . 'jax[cuda12]'
  copy     gcloud compute scp --recurse LOCAL NAME:spectral_soup/REMOTE, per --copy
  run      start `python -m experiments.train_basis --config=... --workdir=...` in the background (one process sees
           every GPU of the VM: no multi-host setup), log in ~/spectral_soup_runs/NAME.log
  logs     stream that log until the job ends; exits with the job's status
  delete   gcloud compute instances delete NAME --quiet (also after a failed step; `--keep` skips it)

Project, zone and name come from the flags or from SPECTRAL_SOUP_PROJECT / SPECTRAL_SOUP_ZONE / SPECTRAL_SOUP_VM.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from launch import common

STEPS = ("create", "wait", "archive", "upload", "install", "copy", "run", "logs", "delete")


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
  parser.add_argument("--spot", action="store_true", help="Create a Spot VM (preemptible; restart to resume).")
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
  if not args.name:
    parser.error("--name (or SPECTRAL_SOUP_VM) is required.")
  common.check_config_path(parser, args.config)
  common.check_plan_flags(parser, args, STEPS)
  return args


def _location(args: argparse.Namespace) -> List[str]:
  return ([f"--zone={args.zone}"] if args.zone else []) + ([f"--project={args.project}"] if args.project else [])


def build_commands(args: argparse.Namespace) -> List[common.Step]:
  """The plan: `common.Step`s in order (see the module docstring)."""
  archive = f"/tmp/{args.name}-{common.CODE_DIR}.tar.gz"
  archive_name = f"{common.CODE_DIR}.tar.gz"
  copies = [item.split(":", 1) for item in args.copy]
  job = common.job_argv(common.remote_python(), args.module, args.config, args.workdir, args.job_args)
  env = dict(item.split("=", 1) for item in args.env)

  def ssh(name: str, command: str, *flags: str) -> common.Step:
    return common.Step(name, ["gcloud", "compute", "ssh", args.name, *_location(args), *flags, "--command=" + command])

  create = [
      "gcloud", "compute", "instances", "create", args.name, *_location(args), f"--machine-type={args.machine_type}",
      f"--image-family={args.image_family}", f"--image-project={args.image_project}",
      f"--boot-disk-size={args.boot_disk_size}", "--maintenance-policy=TERMINATE",
      "--metadata=install-nvidia-driver=True"
  ]
  if args.accelerator:
    create.append(f"--accelerator={args.accelerator}")
  if args.spot:
    create += ["--provisioning-model=SPOT", "--instance-termination-action=DELETE"]
  plan = {
      "create": [common.Step("create", create)],
      "wait": [
          ssh("wait", "until nvidia-smi > /dev/null 2>&1; do sleep 10; done; nvidia-smi -L",
              "--ssh-flag=-oConnectionAttempts=30")
      ],
      "archive": [common.archive_step(archive)],
      "upload": [
          common.Step("upload", ["gcloud", "compute", "scp", *_location(args), archive, f"{args.name}:{archive_name}"])
      ],
      "install": [
          ssh(
              "install",
              common.install_script(archive_name, args.python, "cuda12", args.install_python,
                                    make_dirs=sorted({r.rsplit("/", 1)[0] for _, r in copies if "/" in r})))
      ],
      "copy": [
          common.Step("copy", [
              "gcloud", "compute", "scp", *_location(args), "--recurse", local,
              f"{args.name}:{common.CODE_DIR}/{remote}"
          ]) for local, remote in copies
      ],
      "run": [ssh("run", common.detached_script(job, args.name, env))],
      "logs": [ssh("logs", common.follow_script(args.name))],
      "delete": [] if args.keep else [
          common.Step("delete", ["gcloud", "compute", "instances", "delete", args.name, *_location(args), "--quiet"],
                      always=True)
      ],
  }
  return [step for name in STEPS if name in args.steps for step in plan[name]]


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  return common.execute(build_commands(args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
