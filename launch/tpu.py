r"""Runs a config on a Cloud TPU VM or pod slice: create, copy and install on every worker, run, stream, delete.

  python -m launch.tpu --name=ss-uf-1b --accelerator-type=v5p-32 --zone=us-east5-a --project=my-project \
      --config=configs/ultrafeedback_gemma3_1b.py --workdir=/mnt/shared/uf_gemma3_1b \
      --copy=$HOME/data/ultrafeedback:data/ultrafeedback [--dry-run] [-- --config.FIELD=VALUE ...]

The plan, in order (`--steps` picks a subset, e.g. `--steps=logs` to re-attach, `--steps=delete`):

  create   gcloud compute tpus tpu-vm create NAME --accelerator-type=... --version=<runtime of that generation>
  archive  tar the working tree (uncommitted changes included; no .git, no .gitignore'd paths, no workdir) to
           /tmp/NAME-spectral_soup.tar.gz (removed when the launcher ends)
  upload   gcloud compute tpus tpu-vm scp ARCHIVE NAME:spectral_soup.tar.gz --worker=all
  install  on --worker=all: Python 3.11 (apt), unpack into ~/spectral_soup, a venv, pip install -e . 'jax[tpu]'
  copy     gcloud compute tpus tpu-vm scp --recurse LOCAL NAME:spectral_soup/REMOTE --worker=all, per --copy
  run      on --worker=all (or --run-workers): start `python -m experiments.train_basis --config=... --workdir=...`
           in the background (plus `--distributed` on a multi-host slice, so that every host joins one JAX job), log
           in ~/spectral_soup_runs/NAME.log
  logs     on --worker=0 (--log-worker): stream that log until the job ends; exits with the job's status
  delete   gcloud compute tpus tpu-vm delete NAME --quiet (also after a failed step or a Ctrl-C; `--keep` skips it)

The job runs detached: if the log stream breaks (a dropped connection, a Ctrl-C) before the job has ended, the TPU
VM is kept and the launcher prints the command that re-attaches (`--steps=logs,delete`) and the one that deletes it.

Without --accelerator-type the slice is the config's `launch.accelerator_type` (the one it is sized for), else
v5litepod-16. Project, zone and name come from the flags or from SPECTRAL_SOUP_PROJECT / SPECTRAL_SOUP_ZONE /
SPECTRAL_SOUP_TPU; gcloud's own defaults apply when neither is given. gcloud runs with the account it is logged in
with; for `--worker=all` add your key to ssh-agent first (`ssh-add ~/.ssh/google_compute_engine`).
Every worker gets the same code, data and command; multi-host jobs need `--workdir` to be one directory shared by
all hosts (a bucket mounted with gcsfuse, or Filestore), since every host writes its shards of each checkpoint (the
launcher warns about a relative path, `~` or /tmp there). experiments.main is one process: it runs on single-host
slices only.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from typing import List, Optional, Sequence

from launch import common

STEPS = ("create", "archive", "upload", "install", "copy", "run", "logs", "delete")
DEFAULT_ACCELERATOR = "v5litepod-16"
SINGLE_HOST_TYPES = ("v5litepod-8", "v6e-8", "v5p-8", "v4-8")  # Named when a single-process job needs one host.
LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # Per-host directories of a TPU VM.


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


@dataclasses.dataclass(frozen=True)
class _Generation:
  cores_per_chip: int  # The accelerator type's number counts TensorCores: this many per chip.
  devices_per_chip: int  # JAX devices per chip.
  chips_per_host: int  # Chips per TPU VM worker of a multi-host slice.
  single_host: tuple  # Chip counts of the single-host slices (one VM).
  max_chips: int  # The largest slice (the pod, or the largest schedulable slice).
  power_of_two: bool  # 2D-torus generations: every slice has a power-of-two number of chips (4x4, 4x8, ... 16x16).
  hbm_gib: float  # HBM GiB per JAX device.
  peak_tflops: float  # Peak bf16 TFLOP/s per JAX device.
  runtime: str  # Default TPU VM runtime.


# Cloud TPU's documented slice shapes: v2 / v3 / v4 / v5p slices are whole 4-chip hosts (the smallest is one host:
# v2-8, v3-8, v4-8, v5p-8); v5e and v6e have 1-, 4- and 8-chip single-host slices and multi-host slices of 4-chip
# hosts from 4x4 to the 16x16 pod.
_GENERATIONS = {
    "v2": _Generation(2, 2, 4, (4,), 256, False, 8.0, 22.5, "tpu-ubuntu2204-base"),
    "v3": _Generation(2, 2, 4, (4,), 1024, False, 16.0, 61.5, "tpu-ubuntu2204-base"),
    "v4": _Generation(2, 1, 4, (4,), 4096, False, 32.0, 275.0, "tpu-ubuntu2204-base"),
    "v5p": _Generation(2, 1, 4, (4,), 6144, False, 95.0, 459.0, "v2-alpha-tpuv5"),
    "v5litepod": _Generation(1, 1, 4, (1, 4, 8), 256, True, 16.0, 197.0, "v2-alpha-tpuv5-lite"),
    "v6e": _Generation(1, 1, 4, (1, 4, 8), 256, True, 32.0, 918.0, "v2-alpha-tpuv6e"),
}


def slice_of(accelerator_type: str) -> Slice:
  """Chips, hosts and JAX devices of a TPU accelerator type ("v5litepod-16": 16 chips on 4 hosts).

  Raises ValueError for a name that is not a TPU slice: unknown generation, a count that is not a whole number of
  chips, a size between the single-host slices, not a whole number of hosts, beyond the pod, or (v5e, v6e) not a
  power of two.
  """
  match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type)
  if not match:
    raise ValueError(f"Unknown TPU accelerator type {accelerator_type!r}; expected e.g. v5litepod-16, v5p-32, "
                     f"v6e-8, v4-32.")
  generation = "v5litepod" if match.group(1) == "v5e" else match.group(1)
  g = _GENERATIONS[generation]
  count = int(match.group(2))
  if count <= 0 or count % g.cores_per_chip:
    raise ValueError(f"{accelerator_type}: {generation} sizes count TensorCores, a positive multiple of "
                     f"{g.cores_per_chip}.")
  chips = count // g.cores_per_chip
  sizes = ", ".join(f"{generation}-{c * g.cores_per_chip}" for c in g.single_host)
  largest_single = max(g.single_host)
  if chips <= largest_single:
    if chips not in g.single_host:
      raise ValueError(f"{accelerator_type} ({chips} chips) is not a {generation} slice: its single-host slices "
                       f"are {sizes}.")
    hosts = 1
  else:
    hosts = chips // g.chips_per_host
    if chips % g.chips_per_host or chips > g.max_chips or (g.power_of_two and chips & (chips - 1)):
      rule = "a power of two" if g.power_of_two else f"a multiple of {g.chips_per_host} (whole hosts)"
      raise ValueError(f"{accelerator_type} ({chips} chips) is not a {generation} slice: a multi-host slice has "
                       f"{rule} chips, at most {g.max_chips}.")
  return Slice(accelerator_type=f"{generation}-{count}", chips=chips, hosts=hosts, devices=chips * g.devices_per_chip,
               hbm_gib=g.hbm_gib, peak_tflops=g.peak_tflops, runtime=g.runtime)


def workers_of(text: str, hosts: int) -> List[int]:
  """The worker indices of a gcloud `--worker` value ("all", "0", "0,2", "1-3"), each checked against `hosts`.

  Raises ValueError for anything else.
  """
  if text.lower() == "all":
    return list(range(hosts))
  workers = set()
  for part in text.split(","):
    bounds = part.split("-")
    if not all(b.isdigit() for b in bounds) or len(bounds) > 2 or (len(bounds) == 2 and
                                                                   int(bounds[0]) >= int(bounds[1])):
      raise ValueError(f"expected all, a worker index, or a comma-separated list of indices and ranges (0,2 or 1-3), "
                       f"got {text!r}")
    workers.update(range(int(bounds[0]), int(bounds[-1]) + 1))
  outside = sorted(w for w in workers if w >= hosts)
  if outside:
    raise ValueError(f"worker {outside[0]} does not exist: the slice has {hosts} host{'s' * (hosts > 1)} "
                     f"(workers 0..{hosts - 1})")
  return sorted(workers)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", default=common.env_default("tpu"), help="TPU VM name (env SPECTRAL_SOUP_TPU).")
  parser.add_argument("--project", default=common.env_default("project"),
                      help="GCP project (env SPECTRAL_SOUP_PROJECT; default: gcloud's core/project).")
  parser.add_argument("--zone", default=common.env_default("zone"),
                      help="Zone (env SPECTRAL_SOUP_ZONE; default: gcloud's compute/zone).")
  parser.add_argument(
      "--accelerator-type", "--accelerator_type", dest="accelerator_type", default=None,
      help="TPU type: v5litepod-16 (v5e, 16 chips, 4 hosts), v5p-32, v6e-8, v4-32, ... (default: the config's "
      f"launch.accelerator_type, else {DEFAULT_ACCELERATOR}).")
  parser.add_argument("--version", default=None, help="TPU VM runtime (default: the generation's, e.g. "
                      "v2-alpha-tpuv5-lite for v5e).")
  parser.add_argument(
      "--spot", action="store_true", help="Create a Spot TPU: cheaper, but it can be preempted at any time; a "
      "preempted TPU VM cannot be restarted: delete it and launch again (train_basis resumes from the newest "
      "checkpoint in a --workdir that outlives the VM, a mounted bucket).")
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
      help="Workers that run the job: all (one multi-host job), or indices and ranges as gcloud's --worker (0,2 or "
      "1-3).")
  parser.add_argument("--log-worker", dest="log_worker", default="0",
                      help="Worker whose log `logs` streams (one of --run-workers).")
  parser.add_argument(
      "--allow-multi-host-main", dest="allow_multi_host_main", action="store_true",
      help="Run --module=experiments.main on a multi-host slice anyway (it is one process: every run worker runs "
      "its own copy of the whole job).")
  common.add_job_flags(parser)
  args = parser.parse_args(argv)
  common.check_name(parser, args.name, "--name (or SPECTRAL_SOUP_TPU)")
  config = common.check_config(parser, args, remote=True)
  declared = config.get("launch", {}).get("accelerator_type", "") if hasattr(config, "get") else ""
  if args.accelerator_type and declared and args.accelerator_type != declared:
    common.warn(f"{args.config} is sized for {declared} (config.launch.accelerator_type); launching on "
                f"{args.accelerator_type}.")
  args.accelerator_type = args.accelerator_type or declared or DEFAULT_ACCELERATOR
  try:
    args.slice = slice_of(args.accelerator_type)
  except ValueError as e:
    parser.error(f"--accelerator-type={args.accelerator_type}: {e}")
  common.check_plan_flags(parser, args, STEPS)
  _check_workers(parser, args)
  if "run" in args.steps:
    _check_multi_host(parser, args)
  # A multi-host training is one process per host over the whole slice: its batch is split over the hosts too. Any
  # other process (the main job, or a training on some workers only) sees its own host's chips only.
  whole_slice = args.module == "experiments.train_basis" and args.run_workers == "all"
  devices = args.slice.devices if whole_slice else args.slice.devices // args.slice.hosts
  hosts = args.slice.hosts if whole_slice else 1
  common.check_job_values(parser, args, config, devices, args.accelerator_type, num_hosts=hosts)
  return args


def _check_workers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  hosts = args.slice.hosts
  try:
    run_workers = workers_of(args.run_workers, hosts)
  except ValueError as e:
    parser.error(f"--run-workers={args.run_workers}: {e}.")
  if args.run_workers.lower() == "all" or (hosts > 1 and sorted(run_workers) == list(range(hosts))):
    # Every host: one multi-host job (--distributed, a shared workdir), as "all" (0-3 on 4 hosts ran 4 separate jobs;
    # gcloud's --worker takes "all" in lower case).
    args.run_workers = "all"
  elif hosts > 1 and "run" in args.steps:
    common.warn(f"--run-workers={args.run_workers} on the {hosts}-host {args.slice.accelerator_type}: each listed "
                f"worker runs a separate single-host job on its own {args.slice.devices // hosts} chips, without "
                "--distributed, and Cloud TPU's runtime may wait at start-up for the slice's other hosts. "
                "--run-workers=all runs one job over the whole slice." +
                (f" The {len(run_workers)} jobs would share --workdir={args.workdir}." if len(run_workers) > 1 else ""))
  if not args.log_worker.isdigit():
    parser.error(f"--log-worker={args.log_worker}: expected one worker index.")
  if int(args.log_worker) not in run_workers:
    parser.error(f"--log-worker={args.log_worker}: expected one of the workers that run the job "
                 f"(--run-workers={args.run_workers}: {','.join(map(str, run_workers))}); the others have no log.")


def _check_multi_host(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """experiments.main is one process; a multi-host job needs a workdir every host shares."""
  tpu = args.slice
  if tpu.hosts > 1 and args.module == "experiments.main" and not args.allow_multi_host_main:
    parser.error(f"--module=experiments.main is a single-process job, but {tpu.accelerator_type} has {tpu.hosts} "
                 f"hosts: every run worker would run its own copy of the whole job, and one process uses one "
                 f"host's chips only. Use a single-host type ({', '.join(SINGLE_HOST_TYPES)}), or "
                 f"--allow-multi-host-main to run it anyway.")
  workdir = args.workdir
  local = (not workdir.startswith("/") and "://" not in workdir) or any(
      workdir == d or workdir.startswith(d + "/") for d in LOCAL_DIRS)
  if tpu.hosts > 1 and args.run_workers.lower() == "all" and local:
    common.warn(f"--workdir={workdir} is not shared by the {tpu.hosts} hosts of {tpu.accelerator_type} (a relative "
                f"path, ~ and {', '.join(LOCAL_DIRS)} are each host's own): every host would write its own shards "
                f"of each checkpoint there. Use one directory that every host mounts at the same path (a bucket "
                f"mounted with gcsfuse, or Filestore), e.g. --workdir=/mnt/shared/RUN.")


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
  multi_host = tpu.hosts > 1 and args.run_workers.lower() == "all" and args.module == "experiments.train_basis"
  extra_flags = ["--distributed"] if multi_host else []
  job = common.job_argv(common.remote_python(), args.module, args.config, args.workdir, args.job_args, extra_flags)
  ssh = _gcloud(args, "ssh", args.name)
  plan = {
      "create": [
          common.Step(
              "create",
              _gcloud(args, "create", args.name) + [
                  f"--accelerator-type={tpu.accelerator_type}", f"--version={args.version or tpu.runtime}",
                  *(["--spot"] if args.spot else [])
              ])
      ],
      "archive": [common.archive_step(archive, args.workdir)],
      "upload": [
          common.Step("upload",
                      _gcloud(args, "scp", archive, f"{args.name}:{archive_name}") + ["--worker=all"])
      ],
      "install": [
          common.Step(
              "install", ssh + [
                  "--worker=all", "--command=" + common.install_script(
                      archive_name, args.python, "tpu", args.install_python, make_dirs=common.copy_parents(args.copies))
              ])
      ],
      "copy": [
          common.Step(
              "copy",
              _gcloud(args, "scp", "--recurse", local, f"{args.name}:{common.CODE_DIR}/{remote}") + ["--worker=all"])
          for local, remote in args.copies
      ],
      "run": [
          common.Step(
              "run", ssh +
              [f"--worker={args.run_workers}", "--command=" + common.detached_script(job, args.name, args.env_vars)])
      ],
      "logs": [
          common.Step("logs", ssh + [f"--worker={args.log_worker}", "--command=" + common.follow_script(args.name)],
                      ended=ssh + [f"--worker={args.log_worker}", "--command=" + common.ended_script(args.name)])
      ],
      "delete": [] if args.keep else
                [common.Step("delete",
                             _gcloud(args, "delete", args.name) + ["--quiet"], always=True)],
  }
  return [step for name in STEPS if name in args.steps for step in plan[name]]


def reattach_command(args: argparse.Namespace) -> str:
  """The launcher command that streams the job's log again (and then deletes the VM, unless --keep)."""
  argv = ["python", "-m", "launch.tpu", f"--name={args.name}"]
  argv += [f"--zone={args.zone}"] if args.zone else []
  argv += [f"--project={args.project}"] if args.project else []
  argv += [f"--accelerator-type={args.slice.accelerator_type}", f"--config={args.config}", f"--workdir={args.workdir}"]
  argv += [f"--run-workers={args.run_workers}"] if args.run_workers != "all" else []
  argv += [f"--log-worker={args.log_worker}"] if args.log_worker != "0" else []
  argv += [f"--module={args.module}"] if args.module != common.MODULES[0] else []
  argv += ["--steps=logs" if args.keep else "--steps=logs,delete"]
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
