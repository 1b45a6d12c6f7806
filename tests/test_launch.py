"""Launchers (`launch/`): the --dry-run plans of a v5e-16 pod slice, a GPU VM and a local run, the TPU slice table,
and the remote job scripts (run for real here against a temporary HOME)."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys

import pytest

from launch import common
from launch import gpu
from launch import local
from launch import tpu

CONFIG = "configs/train_basis_tiny.py"
POD = [
    "--name=ss-pod", "--zone=us-west4-a", "--project=my-project", "--accelerator-type=v5litepod-16",
    f"--config={CONFIG}", "--workdir=/mnt/shared/run1", "--copy=/data/uf:data/ultrafeedback"
]
OVERRIDES = ["--", "--config.train.num_steps=10", "--config.data.source=synthetic"]


def _dry_run(module, argv):
  """What `--dry-run` prints, split back into argv lists (one per line)."""
  out = io.StringIO()
  args = module.parse_args(["--dry-run"] + argv)  # Before any `--`: after it, flags belong to the job.
  assert args.dry_run
  assert common.execute(module.build_commands(args), args.dry_run, out=out) == 0
  return [shlex.split(line) for line in out.getvalue().splitlines()]


def _remote(argv):
  """The --command=... of a gcloud ssh argv."""
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def test_tpu_pod_slice_plan_in_order():
  lines = _dry_run(tpu, POD + OVERRIDES)
  # The printed plan is exactly what would run.
  assert lines == [s.argv for s in tpu.build_commands(tpu.parse_args(POD + OVERRIDES))]
  create, archive, upload, install, copy, run, logs, delete = lines
  location = ["--zone=us-west4-a", "--project=my-project"]

  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ss-pod"]
  assert set(location + ["--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]) <= set(create)
  assert archive[:3] == ["tar", "-czf", "/tmp/ss-pod-spectral_soup.tar.gz"] and "--exclude=.git" in archive
  assert archive[-3:] == ["-C", common.REPO_ROOT, "."]
  assert upload[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert upload[5:7] == ["/tmp/ss-pod-spectral_soup.tar.gz", "ss-pod:spectral_soup.tar.gz"]
  assert "--worker=all" in upload and set(location) <= set(upload)

  for step in (install, run):
    assert step[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ss-pod"]
    assert "--worker=all" in step and set(location) <= set(step)
  assert "tar -xzf ~/spectral_soup.tar.gz -C ~/spectral_soup" in _remote(install)
  assert "pip install -q -e ~/spectral_soup 'jax[tpu]>=0.10,<0.11'" in _remote(install)
  assert "mkdir -p ~/spectral_soup/data" in _remote(install)  # The --copy destination's parent.
  assert copy[4:8] == ["scp", "--recurse", "/data/uf", "ss-pod:spectral_soup/data/ultrafeedback"]
  assert "--worker=all" in copy

  # The job: every host runs the same command in the background; 4 hosts -> one distributed JAX job.
  job = _remote(run)
  assert ("~/spectral_soup_venv/bin/python -m experiments.train_basis --config=configs/train_basis_tiny.py "
          "--workdir=/mnt/shared/run1 --distributed --config.train.num_steps=10 --config.data.source=synthetic") in job
  assert "cd ~/spectral_soup" in job and "nohup" in job and "~/spectral_soup_runs/ss-pod.log" in job

  assert logs[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ss-pod"] and "--worker=0" in logs
  assert "tail -n +1 -F --pid=" in _remote(logs)
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ss-pod", *location, "--quiet"]


def test_tpu_single_host_steps_keep_and_env_defaults(monkeypatch):
  monkeypatch.setenv("SPECTRAL_SOUP_TPU", "ss-env")
  monkeypatch.setenv("SPECTRAL_SOUP_ZONE", "us-east5-a")
  monkeypatch.delenv("SPECTRAL_SOUP_PROJECT", raising=False)
  argv = ["--accelerator-type=v5litepod-8", f"--config={CONFIG}", "--workdir=w", "--keep", "--spot"]
  lines = _dry_run(tpu, argv)
  assert [line[0] if line[0] == "tar" else line[4] for line in lines] == ["create", "tar", "scp", "ssh", "ssh",
                                                                          "ssh"]  # No copy, no delete.
  assert lines[0][5] == "ss-env" and "--zone=us-east5-a" in lines[0] and "--spot" in lines[0]
  assert not any(a.startswith("--project") for line in lines for a in line)  # gcloud's default project.
  assert "--distributed" not in _remote(lines[4])  # One host: no jax.distributed.
  lines = _dry_run(tpu, argv + ["--steps=logs,delete", "--module=experiments.main"])
  assert len(lines) == 1 and "--worker=0" in lines[0]  # --keep drops the delete.
  (run,) = _dry_run(tpu, POD + ["--steps=run", "--module=experiments.main", "--run-workers=0"])
  assert "--worker=0" in run and "-m experiments.main" in _remote(run) and "--distributed" not in _remote(run)


@pytest.mark.parametrize("argv, message", [
    (["--accelerator-type=v5litepod-16", f"--config={CONFIG}", "--workdir=w"], "--name"),
    (POD[:3] + ["--accelerator-type=v9-8", f"--config={CONFIG}", "--workdir=w"], "accelerator type"),
    (POD[:4] + ["--config=configs/nope.py", "--workdir=w"], "configs/nope.py"),
    (POD + ["--copy=nocolon"], "LOCAL:REMOTE"),
    (POD + ["--steps=create,launch"], "launch"),
])
def test_tpu_flag_errors(argv, message, capsys, monkeypatch):
  monkeypatch.delenv("SPECTRAL_SOUP_TPU", raising=False)
  with pytest.raises(SystemExit):
    tpu.parse_args(argv)
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("accelerator, chips, hosts, devices", [
    ("v5litepod-16", 16, 4, 16),
    ("v5e-16", 16, 4, 16),
    ("v5litepod-8", 8, 1, 8),
    ("v5litepod-4", 4, 1, 4),
    ("v6e-64", 64, 16, 64),
    ("v5p-32", 16, 4, 16),
    ("v5p-64", 32, 8, 32),
    ("v5p-8", 4, 1, 4),
    ("v4-8", 4, 1, 4),
    ("v4-32", 16, 4, 16),
    ("v3-8", 4, 1, 8),
    ("v3-32", 16, 4, 32),
    ("v2-8", 4, 1, 8),
])
def test_slice_table(accelerator, chips, hosts, devices):
  s = tpu.slice_of(accelerator)
  assert (s.chips, s.hosts, s.devices) == (chips, hosts, devices)
  assert s.accelerator_type.endswith(accelerator.split("-")[1])


def test_gpu_vm_plan_in_order():
  argv = [
      "--name=ss-gpu", "--zone=us-central1-a", "--project=my-project", "--machine-type=a2-ultragpu-1g",
      f"--config={CONFIG}", "--workdir=workdir/run1", "--copy=/ckpt/gemma:checkpoints/gemma-3-1b-it"
  ]
  lines = _dry_run(gpu, argv + OVERRIDES)
  assert lines == [s.argv for s in gpu.build_commands(gpu.parse_args(argv + OVERRIDES))]
  create, wait, archive, upload, install, copy, run, logs, delete = lines
  location = ["--zone=us-central1-a", "--project=my-project"]
  assert create[:5] == ["gcloud", "compute", "instances", "create", "ss-gpu"]
  assert set(location + [
      "--machine-type=a2-ultragpu-1g", "--maintenance-policy=TERMINATE", "--metadata=install-nvidia-driver=True",
      "--image-project=deeplearning-platform-release"
  ]) <= set(create)
  for step in (wait, install, run, logs):
    assert step[:4] == ["gcloud", "compute", "ssh", "ss-gpu"] and set(location) <= set(step)
  assert "nvidia-smi" in _remote(wait)
  assert archive[0] == "tar" and upload[:3] == ["gcloud", "compute", "scp"]
  assert upload[-2:] == ["/tmp/ss-gpu-spectral_soup.tar.gz", "ss-gpu:spectral_soup.tar.gz"]
  assert "'jax[cuda12]>=0.10,<0.11'" in _remote(install) and "mkdir -p ~/spectral_soup/checkpoints" in _remote(install)
  assert copy[-3:] == ["--recurse", "/ckpt/gemma", "ss-gpu:spectral_soup/checkpoints/gemma-3-1b-it"]
  job = _remote(run)
  assert ("-m experiments.train_basis --config=configs/train_basis_tiny.py --workdir=workdir/run1 "
          "--config.train.num_steps=10") in job and "--distributed" not in job
  assert "tail -n +1 -F" in _remote(logs)
  assert delete == ["gcloud", "compute", "instances", "delete", "ss-gpu", *location, "--quiet"]


def test_local_plan():
  argv = [f"--config={CONFIG}", "--workdir=workdir/t", "--fake-devices=8", "--nice=15", "--python=python3"]
  out = io.StringIO()
  common.execute(local.build_commands(local.parse_args(argv + OVERRIDES)), dry_run=True, out=out)
  assert out.getvalue().splitlines() == [
      f"cd {common.REPO_ROOT} && env XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "
      f"nice -n 15 python3 -m experiments.train_basis --config={CONFIG} --workdir=workdir/t "
      f"--config.train.num_steps=10 --config.data.source=synthetic"
  ]


def test_local_restarts_while_preempted(tmp_path, monkeypatch):
  """Exit 143 (checkpoint saved, stopped) is run again; any other status ends the loop."""
  script = tmp_path / "job.py"
  script.write_text("import os, sys\n"
                    "n = int(open(sys.argv[1]).read()) + 1 if os.path.exists(sys.argv[1]) else 1\n"
                    "open(sys.argv[1], 'w').write(str(n))\n"
                    "sys.exit(143 if n < 3 else 0)\n")
  counter = tmp_path / "count"
  monkeypatch.setattr(local.common, "job_argv", lambda *a, **k: [sys.executable, str(script), str(counter)])
  assert local.main([f"--config={CONFIG}", "--workdir=w", "--restarts=5"]) == 0
  assert counter.read_text() == "3"
  counter.unlink()
  assert local.main([f"--config={CONFIG}", "--workdir=w", "--restarts=1"]) == 143
  assert counter.read_text() == "2"


def test_remote_job_scripts_run(tmp_path):
  """detached_script starts the job in the background; follow_script streams its log and returns its status."""
  home = tmp_path / "home"
  (home / common.CODE_DIR).mkdir(parents=True)
  env = {**os.environ, "HOME": str(home)}
  job = [
      sys.executable, "-c", "import os, time; time.sleep(0.5); print('step 1 in', os.getcwd()); "
      "print(os.environ['GREETING']); raise SystemExit(3)"
  ]
  start = common.detached_script(job, "run1", env={"GREETING": "hello there"})
  subprocess.run(["bash", "-c", start], env=env, check=True, timeout=30)
  follow = subprocess.run(["bash", "-c", common.follow_script("run1")], env=env, capture_output=True, text=True,
                          timeout=60)
  assert follow.returncode == 3
  assert f"step 1 in {home / common.CODE_DIR}" in follow.stdout and "hello there" in follow.stdout
  assert (home / common.RUNS_DIR / "run1.rc").read_text().strip() == "3"
  install = common.install_script("code.tar.gz", "python3.11", "tpu", True, make_dirs=["data"])
  assert subprocess.run(["bash", "-n", "-c", install], check=False).returncode == 0  # Valid shell syntax.


def test_execute_stops_at_a_failure_but_still_deletes(tmp_path):
  marker = tmp_path / "deleted"
  steps = [
      common.Step("ok", ["true"]),
      common.Step("fail", ["sh", "-c", "exit 7"]),
      common.Step("skipped", ["sh", "-c", f"touch {tmp_path / 'skipped'}"]),
      common.Step("delete", ["sh", "-c", f"touch {marker}"], always=True)
  ]
  assert common.execute(steps, dry_run=False, out=io.StringIO()) == 7
  assert marker.exists() and not (tmp_path / "skipped").exists()
