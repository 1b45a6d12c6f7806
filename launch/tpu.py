r"""Runs a config on a Cloud TPU VM or pod slice: create, copy and install on every worker, run, stream, delete.

  python -m launch.tpu --name=ss-uf-1b --accelerator-type=v5p-32 --zone=us-east5-a --project=my-project \
      --config=configs/ultrafeedback_gemma3_1b.py --workdir=/mnt/shared/uf_gemma3_1b \
      --copy=$HOME/data/ultrafeedback:data/ultrafeedback [--dry-run] [-- --config.FIELD=VALUE ...]

The plan, in order (`--steps` picks a subset, e.g. `--steps=logs` to re-attach, `--steps=delete`):

  create   gcloud compute tpus tpu-vm create NAME --accelerator-type=... --version=<runtime of that generation>
  archive  tar the working tree (uncommitted changes included; no .git, no workdir) to /tmp/NAME-spectral_soup.tar.gz
  upload   gcloud compute tpus tpu-vm scp ARCHIVE NAME:spectral_soup.tar.gz --worker=all
  install  on --worker=all: Python 3.11 (apt), unpack into ~/spectral_soup, a venv, pip install -e . 'jax[tpu]'
  copy     gcloud compute tpus tpu-vm scp --recurse LOCAL NAME:spectral_soup/REMOTE --worker=all, per --copy
  run      on --worker=all (or --run-workers): start `python -m experiments.train_basis --config=... --workdir=...`
           in the background (plus `--distributed` on a multi-host slice, so that every host joins one JAX job), log
           in ~/spectral_soup_runs/NAME.log
  logs     on --worker=0: stream that log until the job ends; exits with the job's status
  delete   gcloud compute tpus tpu-vm delete NAME --quiet (also after a failed step; `--keep` skips it)

Project, zone and name come from the flags or from SPECTRAL_SOUP_PROJECT / SPECTRAL_SOUP_ZONE / SPECTRAL_SOUP_TPU;
gcloud's own defaults apply when neither is given. gcloud runs with the account it is logged in with; for
`--worker=all` add your key to ssh-agent first (`ssh-add ~/.ssh/google_compute_engine`).
Every worker gets the same code, data and command; multi-host jobs need `--workdir` to be one directory shared by
all hosts (a bucket mounted with gcsfuse, or Filestore), since every host writes its shards of each checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import List, Optional, Sequence

from launch import common

STEPS = ("create", "archive", "upload", "install", "copy", "run", "logs", "delete")


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU accelerator type as JAX sees it."""
  accelerator_type: str
  chips: int  # TPU chips in the slice.
  hosts: int  # TPU VM workers (one JAX process each).
  devices: int  # jax.device_count() over all hosts.
  hbm_gib: float  # High-bandwidth memory per JAX device.
  peak_tflops: float  # Peak bf16 TFLOP/s per JAX device (vendor figure).
  runtime: str  # Default `--version` (TPU VM software image) of the generation.


# generation: (cores per chip in the name, JAX devices per chip, chips per host, largest single-host slice in chips,
#              HBM GiB per device, peak bf16 TFLOP/s per device, runtime).
_GENERATIONS = {
    "v2": (2, 2, 4, 4, 8.0, 22.5, "tpu-ubuntu2204-base"),
    "v3": (2, 2, 4, 4, 16.0, 61.5, "tpu-ubuntu2204-base"),
    "v4": (2, 1, 4, 4, 32.0, 275.0, "tpu-ubuntu2204-base"),
    "v5p": (2, 1, 4, 4, 95.0, 459.0, "v2-alpha-tpuv5"),
    "v5litepod": (1, 1, 4, 8, 16.0, 197.0, "v2-alpha-tpuv5-lite"),
    "v6e": (1, 1, 4, 8, 32.0, 918.0, "v2-alpha-tpuv6e"),
}


def slice_of(accelerator_type: str) -> Slice:
  """Chips, hosts and JAX devices of a TPU accelerator type ("v5litepod-16": 16 chips on 4 hosts)."""
  match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type)
  if not match:
    raise ValueError(f"Unknown TPU accelerator type {accelerator_type!r}; expected e.g. v5litepod-16, v5p-32, "
                     f"v6e-8, v4-32.")
  generation = "v5litepod" if match.group(1) == "v5e" else match.group(1)
  cores_per_chip, devices_per_chip, chips_per_host, single_host, hbm, tflops, runtime = _GENERATIONS[generation]
  count = int(match.group(2))
  if count % cores_per_chip:
    raise ValueError(f"{accelerator_type}: {generation} sizes count TensorCores, a multiple of {cores_per_chip}.")
  chips = count // cores_per_chip
  hosts = 1 if chips <= single_host else chips // chips_per_host
  return Slice(accelerator_type=f"{generation}-{count}", chips=chips, hosts=hosts, devices=chips * devices_per_chip,
               hbm_gib=hbm, peak_tflops=tflops, runtime=runtime)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", default=common.env_default("tpu"), help="TPU VM name (env SPECTRAL_SOUP_TPU).")
  parser.add_argument("--project", default=common.env_default("project"),
                      help="GCP project (env SPECTRAL_SOUP_PROJECT; default: gcloud's core/project).")
  parser.add_argument("--zone", default=common.env_default("zone"),
                      help="Zone (env SPECTRAL_SOUP_ZONE; default: gcloud's compute/zone).")
  parser.add_argument("--accelerator-type", "--accelerator_type", dest="accelerator_type", default="v5litepod-16",
                      help="TPU type: v5litepod-16 (v5e, 16 chips, 4 hosts), v5p-32, v6e-8, v4-32, ...")
  parser.add_argument("--version", default=None, help="TPU VM runtime (default: the generation's, e.g. "
                      "v2-alpha-tpuv5-lite for v5e).")
  parser.add_argument("--spot", action="store_true", help="Create a Spot TPU (preemptible; restart to resume).")
  parser.add_argument(
      "--copy", action="append", default=[], metavar="LOCAL:REMOTE",
      help="Copy a local file or directory to every worker, at REMOTE relative to the code "
      "directory (data, checkpoints). Repeatable.")
  parser.add_argument("--steps", default=",".join(STEPS), help=f"Comma-separated subset of {','.join(STEPS)}.")
  parser.add_argument("--keep", action="store_true", help="Do not delete the TPU VM at the end.")
  parser.add_argument("--python", default="python3.11", help="Remote interpreter the virtual environment is made "
                      "from.")
  parser.add_argument("--no-install-python", dest="install_python", action="store_false",
                      help="The image already has --python (skip apt-get).")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="Environment variable of the job on every worker. Repeatable.")
  parser.add_argument(
      "--run-workers", dest="run_workers", default="all",
      help="Workers that run the job: all (one multi-host job), or e.g. 0 for a single-process job "
      "such as experiments.main, whose decoding is not sharded over hosts.")
  parser.add_argument("--log-worker", dest="log_worker", default="0", help="Worker whose log `logs` streams.")
  common.add_job_flags(parser)
  args = parser.parse_args(argv)
  if not args.name:
    parser.error("--name (or SPECTRAL_SOUP_TPU) is required.")
  common.check_config_path(parser, args.config)
  try:
    args.slice = slice_of(args.accelerator_type)
  except ValueError as e:
    parser.error(str(e))
  common.check_plan_flags(parser, args, STEPS)
  return args


def _gcloud(args: argparse.Namespace, *words: str) -> List[str]:
  """`gcloud compute tpus tpu-vm WORDS... --zone=... --project=...` (location flags only when given)."""
  argv = ["gcloud", "compute", "tpus", "tpu-vm", *words]
  if args.zone:
    argv.append(f"--zone={args.zone}")
  if args.project:
    argv.append(f"--project={args.project}")
  return argv


def build_commands(args: argparse.Namespace) -> List[common.Step]:
  """The plan: `common.Step`s in order (see the module docstring)."""
  tpu = args.slice
  archive = f"/tmp/{args.name}-{common.CODE_DIR}.tar.gz"
  archive_name = f"{common.CODE_DIR}.tar.gz"
  copies = [item.split(":", 1) for item in args.copy]
  multi_host = tpu.hosts > 1 and args.run_workers == "all" and args.module == "experiments.train_basis"
  extra_flags = ["--distributed"] if multi_host else []
  job = common.job_argv(common.remote_python(), args.module, args.config, args.workdir, args.job_args, extra_flags)
  env = dict(item.split("=", 1) for item in args.env)
  plan = {
      "create": [
          common.Step(
              "create",
              _gcloud(args, "create", args.name) + [
                  f"--accelerator-type={tpu.accelerator_type}", f"--version={args.version or tpu.runtime}",
                  *(["--spot"] if args.spot else [])
              ])
      ],
      "archive": [common.archive_step(archive)],
      "upload": [
          common.Step("upload",
                      _gcloud(args, "scp", archive, f"{args.name}:{archive_name}") + ["--worker=all"])
      ],
      "install": [
          common.Step(
              "install",
              _gcloud(args, "ssh", args.name) + [
                  "--worker=all", "--command=" +
                  common.install_script(archive_name, args.python, "tpu", args.install_python, make_dirs=sorted(
                      {r.rsplit("/", 1)[0] for _, r in copies if "/" in r}))
              ])
      ],
      "copy": [
          common.Step(
              "copy",
              _gcloud(args, "scp", "--recurse", local, f"{args.name}:{common.CODE_DIR}/{remote}") + ["--worker=all"])
          for local, remote in copies
      ],
      "run": [
          common.Step(
              "run",
              _gcloud(args, "ssh", args.name) +
              [f"--worker={args.run_workers}", "--command=" + common.detached_script(job, args.name, env)])
      ],
      "logs": [
          common.Step(
              "logs",
              _gcloud(args, "ssh", args.name) +
              [f"--worker={args.log_worker}", "--command=" + common.follow_script(args.name)])
      ],
      "delete": [] if args.keep else
                [common.Step("delete",
                             _gcloud(args, "delete", args.name) + ["--quiet"], always=True)],
  }
  return [step for name in STEPS if name in args.steps for step in plan[name]]


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  return common.execute(build_commands(args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
