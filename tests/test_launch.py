"""Launchers (`launch/`): the --dry-run plans of a v5e-16 pod slice, a GPU VM and a local run, the TPU slice table,
the remote job scripts (run for real here against a temporary HOME), the flag checks, and how a plan runs (a
stand-in for `subprocess.run`: no gcloud, no network)."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import tarfile

from absl import flags
import pytest

from launch import common
from launch import gpu
from launch import local
from launch import tpu
from spectral_soup.utils import cli

CONFIG = "configs/train_basis_tiny.py"
DATA = os.path.dirname(os.path.abspath(__file__))  # Any existing local directory, as a --copy source.
# An existing file outside the repository, named relative to it (whatever the checkout's depth).
OUTSIDE = os.path.relpath(os.path.realpath(os.__file__), common.REPO_ROOT)
POD = [
    "--name=ss-pod", "--zone=us-west4-a", "--project=my-project", "--accelerator-type=v5litepod-16",
    f"--config={CONFIG}", "--workdir=/mnt/shared/run1", f"--copy={DATA}:data/ultrafeedback"
]
OVERRIDES = ["--", "--config.train.num_steps=10", "--config.optim.warmup_steps=2", "--config.data.source=synthetic"]


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
  assert copy[4:8] == ["scp", "--recurse", DATA, "ss-pod:spectral_soup/data/ultrafeedback"]
  assert "--worker=all" in copy

  # The job: every host runs the same command in the background; 4 hosts -> one distributed JAX job.
  job = _remote(run)
  assert ("~/spectral_soup_venv/bin/python -m experiments.train_basis --config=configs/train_basis_tiny.py "
          "--workdir=/mnt/shared/run1 --distributed --config.train.num_steps=10 --config.optim.warmup_steps=2 "
          "--config.data.source=synthetic") in job
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
  lines = _dry_run(tpu, argv + ["--steps=logs,delete", "--module=experiments.main", "--config=configs/demo.py"])
  assert len(lines) == 1 and "--worker=0" in lines[0]  # --keep drops the delete.
  (run,) = _dry_run(
      tpu, POD + [
          "--steps=run", "--module=experiments.main", "--config=configs/demo.py", "--run-workers=0",
          "--allow-multi-host-main"
      ])
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
      f"--config={CONFIG}", "--workdir=workdir/run1", f"--copy={DATA}:checkpoints/gemma-3-1b-it"
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
  assert copy[-3:] == ["--recurse", DATA, "ss-gpu:spectral_soup/checkpoints/gemma-3-1b-it"]
  job = _remote(run)
  assert ("-m experiments.train_basis --config=configs/train_basis_tiny.py --workdir=workdir/run1 "
          "--config.train.num_steps=10") in job and "--distributed" not in job
  assert "tail -n +1 -F" in _remote(logs)
  assert delete == ["gcloud", "compute", "instances", "delete", "ss-gpu", *location, "--quiet"]


def test_local_plan(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  argv = [f"--config={CONFIG}", "--workdir=workdir/t", "--fake-devices=8", "--nice=15", "--python=python3"]
  out = io.StringIO()
  common.execute(local.build_commands(local.parse_args(argv + OVERRIDES)), dry_run=True, out=out)
  assert out.getvalue().splitlines() == [
      f"cd {common.REPO_ROOT} && env XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "
      f"nice -n 15 python3 -m experiments.train_basis --config={CONFIG} --workdir=workdir/t "
      f"--config.train.num_steps=10 --config.optim.warmup_steps=2 --config.data.source=synthetic"
  ]


def test_local_checks_the_config_on_its_fake_devices(capsys):
  """--dry-run printed a command whose job refused the config seconds later (a batch of 32 over 3 devices)."""
  with pytest.raises(SystemExit):
    local.parse_args([f"--config={CONFIG}", "--workdir=w", "--fake-devices=3", "--dry-run"])
  assert "train.batch_size=32 is invalid" in capsys.readouterr().err


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


def _start_launcher(tmp_path, setup: str, body: str):
  """`launch.local --restarts=3` in its own session, running a Python job (`setup`, then it writes
  `tmp_path/started`, then `body`); returns the launcher's process once the job has started."""
  import time  # pylint: disable=g-import-not-at-top
  job = tmp_path / "job.py"
  job.write_text("import pathlib, signal, sys, time\n" + setup +
                 f"pathlib.Path({str(tmp_path / 'started')!r}).write_text('1')\n" + body)
  launcher = tmp_path / "launcher.py"
  launcher.write_text("import signal, sys\nfrom launch import common, local\n"
                      "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                      f"common.job_argv = lambda *a, **k: [sys.executable, {str(job)!r}]\n"
                      f"sys.exit(local.main(['--config={CONFIG}', '--workdir=w', '--restarts=3']))\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([common.REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.Popen([sys.executable, str(launcher)], cwd=common.REPO_ROOT, env=env, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not (tmp_path / "started").exists() and time.time() < deadline:
    time.sleep(0.05)
  return proc


def test_local_ctrl_c_stops_the_job_and_the_launcher_without_a_traceback(tmp_path):
  """Ctrl-C (SIGINT to the process group) reaches the job; the launcher waits for it, exits 130, no restart."""
  import signal  # pylint: disable=g-import-not-at-top
  # A job started from a background shell inherits SIGINT ignored; a terminal's job has Python's default handler.
  proc = _start_launcher(
      tmp_path, "signal.signal(signal.SIGINT, signal.default_int_handler)\n",
      "try:\n  time.sleep(60)\nexcept KeyboardInterrupt:\n"
      f"  time.sleep(0.5)\n  pathlib.Path({str(tmp_path / 'stopped')!r}).write_text('1')\n  sys.exit(1)\n")
  os.killpg(proc.pid, signal.SIGINT)  # What the terminal sends on Ctrl-C.
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, (out, err)
  assert "Traceback" not in err and "[interrupted] the job stopped." in err, err
  assert (tmp_path / "stopped").exists()  # The launcher waited for the job's own shutdown.
  assert out.count("[run ") == 1  # Not restarted.


def test_local_sigterm_reaches_the_job_and_is_not_restarted(tmp_path):
  """SIGTERM to the launcher alone (a scheduler, `kill PID`): it exited 143 at once and left the job running, its
  workdir held, never checkpointed."""
  import signal  # pylint: disable=g-import-not-at-top
  proc = _start_launcher(
      tmp_path, "def stop(*_):\n"
      f"  time.sleep(0.5)\n  pathlib.Path({str(tmp_path / 'stopped')!r}).write_text('1')\n  sys.exit(143)\n"
      "signal.signal(signal.SIGTERM, stop)\n", "time.sleep(60)\nsys.exit(0)\n")
  os.kill(proc.pid, signal.SIGTERM)  # The launcher only.
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, (out, err)
  assert (tmp_path / "stopped").exists()  # The job got SIGTERM and the launcher waited for it.
  assert out.count("[run ") == 1 and "passing SIGTERM on to the job" in err, (out, err)  # Not restarted.


def test_remote_job_scripts_run(tmp_path):
  """detached_script starts the job in the background; follow_script streams its log and returns its status."""
  home = tmp_path / "home"
  (home / common.CODE_DIR).mkdir(parents=True)
  env = {**os.environ, "HOME": str(home)}
  job = [
      sys.executable, "-c", "import os, sys, time; time.sleep(0.5); print('step 1 in', os.getcwd()); "
      "print(os.environ['GREETING']); print('argv', sys.argv[1:]); raise SystemExit(3)", "--workdir=~/runs/x"
  ]
  start = common.detached_script(job, "run1", env={"GREETING": "hello there"})
  subprocess.run(["bash", "-c", start], env=env, check=True, timeout=30)
  assert subprocess.run(["bash", "-c", common.ended_script("run1")], env=env).returncode != 0  # Still running.
  follow = subprocess.run(["bash", "-c", common.follow_script("run1")], env=env, capture_output=True, text=True,
                          timeout=60)
  assert follow.returncode == 3
  assert f"step 1 in {home / common.CODE_DIR}" in follow.stdout and "hello there" in follow.stdout
  # `~` after `=` reaches the job as typed; the entry points expand it (cli.parse_flags) with the remote home.
  assert "argv ['--workdir=~/runs/x']" in follow.stdout
  assert (home / common.RUNS_DIR / "run1.rc").read_text().strip() == "3"
  assert subprocess.run(["bash", "-c", common.ended_script("run1")], env=env).returncode == 0
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


# ---- Running a plan: a stand-in for subprocess.run (no gcloud, no network).


class _FakeRun:
  """Records each argv; the first rule whose text occurs in the command line gives its exit status (or raises)."""

  def __init__(self, rules=()):
    self.rules, self.calls = list(rules), []

  def __call__(self, argv, cwd=None, check=False):
    del cwd, check
    self.calls.append(list(argv))
    line = " ".join(argv)
    for needle, result in self.rules:
      if needle in line:
        if isinstance(result, BaseException):
          raise result
        return subprocess.CompletedProcess(argv, result)
    return subprocess.CompletedProcess(argv, 0)

  def ran(self, text):
    return any(text in " ".join(argv) for argv in self.calls)


def _run_plan(monkeypatch, capsys, tmp_path, module, argv, rules):
  """module.main(argv) with gcloud on PATH (a stub: never run) and subprocess.run replaced; (status, out, fake)."""
  stub = tmp_path / "bin" / "gcloud"
  stub.parent.mkdir(exist_ok=True)
  stub.write_text("#!/bin/sh\nexit 99\n")
  stub.chmod(0o755)
  monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
  fake = _FakeRun(rules)
  monkeypatch.setattr(common.subprocess, "run", fake)
  capsys.readouterr()
  status = module.main(argv)
  return status, capsys.readouterr().out, fake


TPU_RUN = POD[:4] + [f"--config={CONFIG}", "--workdir=/mnt/shared/run1", "--steps=create,run,logs,delete"]
GPU_RUN = [
    "--name=ss-gpu", "--zone=us-central1-a", f"--config={CONFIG}", "--workdir=workdir/run1",
    "--steps=create,run,logs,delete"
]


@pytest.mark.parametrize("module, argv, delete", [(tpu, TPU_RUN, "tpu-vm delete ss-pod"),
                                                  (gpu, GPU_RUN, "instances delete ss-gpu")])
def test_a_dropped_log_stream_keeps_the_machine_while_the_job_may_run(monkeypatch, capsys, tmp_path, module, argv,
                                                                      delete):
  # ssh drops (255) while streaming, and the job has no exit status yet: the machine stays, with both commands.
  status, out, fake = _run_plan(monkeypatch, capsys, tmp_path, module, argv, [("tail -n", 255), ("test -f", 1)])
  assert status == 255 and not fake.ran(delete)
  assert fake.ran("test -f ~/spectral_soup_runs/")  # It asked whether the job had ended.
  assert "the machine is kept" in out and "--steps=logs,delete" in out and delete in out
  reattach = re.search(r"Re-attach .*?: (python -m launch\.\w+ .*)", out).group(1)
  args = module.parse_args(shlex.split(reattach)[3:])  # The printed command is a valid launch.
  assert args.steps == ["logs", "delete"] and args.name == argv[0].split("=")[1]
  # The same failure once the job has ended (its .rc exists): the machine is deleted.
  status, out, fake = _run_plan(monkeypatch, capsys, tmp_path, module, argv, [("tail -n", 255)])
  assert status == 255 and fake.ran(delete) and "kept" not in out
  # The job failed (the stream returns its status): deleted too.
  status, out, fake = _run_plan(monkeypatch, capsys, tmp_path, module, argv, [("tail -n", 3)])
  assert status == 3 and fake.ran(delete)


def test_an_interruption_still_deletes_and_removes_the_archive(monkeypatch, capsys, tmp_path):
  archive = "/tmp/ss-pod-spectral_soup.tar.gz"
  argv = TPU_RUN[:-1] + ["--steps=create,archive,upload,install,run,logs,delete"]
  # Ctrl-C during the install: the delete still runs, the status is 130, the local archive is gone.
  status, out, fake = _run_plan(monkeypatch, capsys, tmp_path, tpu, argv, [("tar -czf", 0),
                                                                           ("pip install", KeyboardInterrupt())])
  assert status == 130 and "[install] interrupted." in out and fake.ran("tpu-vm delete ss-pod")
  assert not fake.ran("nohup") and not os.path.exists(archive)
  # Ctrl-C while the log streams: the detached job goes on, so the VM is kept, with both commands printed.
  status, out, fake = _run_plan(monkeypatch, capsys, tmp_path, tpu, argv, [("tail -n", KeyboardInterrupt())])
  assert status == 130 and not fake.ran("tpu-vm delete") and "--steps=logs,delete" in out
  assert "Delete it now: gcloud compute tpus tpu-vm delete ss-pod" in out
  # A second Ctrl-C during the delete itself: the command to finish it is printed.
  status, out, fake = _run_plan(monkeypatch, capsys, tmp_path, tpu, argv, [("create", KeyboardInterrupt()),
                                                                           ("delete", KeyboardInterrupt())])
  assert status == 130 and "Run it again: gcloud compute tpus tpu-vm delete ss-pod" in out
  # Any other error: the delete runs, then the error propagates.
  with pytest.raises(RuntimeError):
    _run_plan(monkeypatch, capsys, tmp_path, tpu, argv, [("tpu-vm create", RuntimeError("boom"))])
  assert common.subprocess.run.ran("tpu-vm delete ss-pod")


def test_missing_programs_are_one_line_errors(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))  # No gcloud, no tar.
  for module, argv in ((tpu, TPU_RUN), (gpu, GPU_RUN)):
    with pytest.raises(SystemExit) as e:
      module.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: gcloud is not on PATH (install the Google Cloud SDK, or use --dry-run).\n"
  with pytest.raises(SystemExit) as e:
    local.main([f"--config={CONFIG}", "--workdir=w", "--python=/nonexistent/python"])
  assert e.value.code == 2 and "--python=/nonexistent/python: no such executable" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--env=XLA-FLAGS=--xla_dump_to=/tmp/d"], "'XLA-FLAGS' is not a shell variable name"),
    (["--env=X;touch /tmp/pwn=1"], "is not a shell variable name"),
    (["--env==1"], "the key '' is not"),
    (["--env=A B=1"], "'A B' is not"),
    (["--copy=/nonexistent/dir:data/x"], "/nonexistent/dir does not exist"),
    (["--copy=:"], "expected LOCAL:REMOTE"),
    ([f"--copy={DATA}:../../x"], "REMOTE must be a relative path inside the code directory"),
    ([f"--copy={DATA}:/etc/x"], "REMOTE must be a relative path inside the code directory"),
    ([f"--copy={DATA}:data/a b"], "REMOTE may hold only"),
    (["--steps="], "--steps is empty"),
    (["--run-workers=banana"], "--run-workers=banana: expected all"),
    (["--run-workers=0-5"], "worker 4 does not exist: the slice has 4 hosts"),
    (["--log-worker=7"], "--log-worker=7: expected one of the workers that run the job"),
    (["--run-workers=1-3"], "--log-worker=0: expected one of the workers"),
    (["--log-worker=x"], "expected one worker index"),
    (["--name=Bad_Name"], "--name=Bad_Name: expected a lowercase letter"),
    (["--config=configs/train_basis_tiny.py:bogus"], "takes no variant"),
    (["--config=configs/ultrafeedback_gemma3_1b.py:bogus"], "Unknown config variant 'bogus'"),
    ([f"--config={OUTSIDE}"], "outside the repository"),
    (["--config=configs/nope.py:local"], "configs/nope.py is not a file"),
    (["--module=experiments.main", "--config=configs/demo.py"
     ], "--module=experiments.main is a single-process job, but v5litepod-16 has 4 hosts"),
    (["--", "--config=configs/demo.py"], "job argument --config=configs/demo.py: give --config to the launcher"),
    (["--", "--workdir=/elsewhere"], "job argument --workdir=/elsewhere: give --workdir"),
    (["--accelerator-type=v5p-10"], "v5p-10 (5 chips) is not a v5p slice"),
])
def test_tpu_refuses_what_would_fail_on_the_vm(extra, message, capsys):
  with pytest.raises(SystemExit):
    tpu.parse_args(POD + extra)
  assert message in capsys.readouterr().err


def test_config_inside_the_repository_its_variant_and_its_slice(tmp_path, capsys):
  # An absolute path inside the repository becomes the archive's relative path; one outside it is refused.
  args = tpu.parse_args(POD[:4] + [f"--config={common.REPO_ROOT}/{CONFIG}", "--workdir=/mnt/shared/r"])
  assert args.config == CONFIG
  outside = tmp_path / "mine.py"
  outside.write_text("def get_config():\n  return {}\n")
  for module in (tpu, gpu):
    with pytest.raises(SystemExit):
      module.parse_args(["--name=ss", f"--config={outside}", "--workdir=/mnt/shared/r"])
    assert "outside the repository" in capsys.readouterr().err
  assert local.parse_args([f"--config={outside}", "--workdir=w"]).config == str(outside)  # Runs here: fine.
  with pytest.raises(SystemExit):
    gpu.parse_args(["--name=ss", f"--config={CONFIG}", "--workdir=w", "--", "--config=configs/demo.py"])
  assert "job argument --config" in capsys.readouterr().err
  # Paths the archive leaves out (.gitignore'd, workdirs) would not exist on the VM.
  assert common.excluded("workdir/x.py") and common.excluded(".venv/lib/c.py") and common.excluded("a.egg-info/c.py")
  assert common.excluded("runs/a/c.py", workdir="runs/a") == "./runs/a"
  assert common.excluded(CONFIG) is None and common.excluded("spectral_soup/utils/workdir_lock.py") is None
  # A variant is applied as the job will; the slice defaults to the one the config is sized for.
  uf = "configs/ultrafeedback_gemma3_1b.py"
  assert tpu.parse_args(["--name=ss", f"--config={uf}", "--workdir=/mnt/shared/r"]).slice.accelerator_type == "v5p-32"
  # The local variant declares no slice (its batch of 2 runs on one worker: the default slice has 4 hosts).
  args = tpu.parse_args(["--name=ss", f"--config={uf}:local", "--workdir=/mnt/shared/r", "--run-workers=0"])
  assert args.slice.accelerator_type == tpu.DEFAULT_ACCELERATOR
  capsys.readouterr()
  # On another slice its batch no longer splits: refused before the slice is created, as the job would refuse it.
  with pytest.raises(SystemExit):
    tpu.parse_args(["--name=ss", f"--config={uf}", "--workdir=/mnt/shared/r", "--accelerator-type=v5p-64"])
  err = capsys.readouterr().err
  assert "is sized for v5p-32" in err and "config.train.batch_size=64 is invalid" in err
  assert "(on the 32 devices of v5p-64)" in err
  for job_args, message in ((["--config.trian.num_steps=5"], r"'trian' is not a config field; did you mean \"train\"?"),
                            (["--config.train.num_steps=abc"],
                             r"--config\.train\.num_steps=abc: expected an integer, got 'abc'"),
                            (["--config.train.batch_size=63"], r"expected a divisor of train\.batch_size=63")):
    with pytest.raises(SystemExit):  # The job's own checks of its overrides, before any machine is created.
      tpu.parse_args(["--name=ss", f"--config={uf}", "--workdir=/mnt/shared/r", "--", *job_args])
    assert re.search(message, capsys.readouterr().err), message


def test_multi_host_workdir_warnings_and_single_process_jobs(capsys):
  base = POD[:4] + [f"--config={CONFIG}"]
  for workdir in ("/tmp/run", "runs/x", "~/runs/x"):
    tpu.parse_args(base + [f"--workdir={workdir}"])
    assert f"warning: --workdir={workdir} is not shared by the 4 hosts of v5litepod-16" in capsys.readouterr().err
  tpu.parse_args(base + ["--workdir=/mnt/shared/run"])
  tpu.parse_args(POD[:3] + ["--accelerator-type=v5litepod-8", f"--config={CONFIG}", "--workdir=/tmp/run"])
  tpu.parse_args(base + ["--workdir=/tmp/run", "--steps=delete"])
  assert capsys.readouterr().err == ""
  # experiments.main: one host, or an explicit override.
  tpu.parse_args(
      POD[:3] +
      ["--accelerator-type=v5litepod-8", "--config=configs/demo.py", "--workdir=w", "--module=experiments.main"])
  tpu.parse_args(
      base + ["--workdir=/mnt/s", "--module=experiments.main", "--config=configs/demo.py", "--allow-multi-host-main"])


def test_some_workers_of_a_multi_host_slice_are_checked_as_one_host_each_with_a_warning(capsys):
  """A training on some workers only is one single-host job per worker: checked against one host's chips (it was
  checked against the whole slice's), and warned about; "ALL" is gcloud's "all"."""
  base = POD[:4] + [f"--config={CONFIG}", "--workdir=/mnt/shared/run"]
  args = tpu.parse_args(base + ["--run-workers=0,1", "--", "--config.mesh.num_devices=8"][:1])
  assert args.run_workers == "0,1"
  err = capsys.readouterr().err
  assert "warning: --run-workers=0,1 on the 4-host v5litepod-16: each listed worker runs a separate single-host job " \
         "on its own 4 chips" in err and "The 2 jobs would share --workdir=/mnt/shared/run." in err
  with pytest.raises(SystemExit):  # One host has 4 chips, not 16.
    tpu.parse_args(base + ["--run-workers=0", "--", "--config.mesh.num_devices=8"])
  assert "num_devices=8" in capsys.readouterr().err
  single = POD[:3] + ["--accelerator-type=v5litepod-8", f"--config={CONFIG}", "--workdir=/tmp/run"]
  assert tpu.parse_args(single + ["--run-workers=ALL"]).run_workers == "all"
  assert capsys.readouterr().err == ""
  with pytest.raises(SystemExit):  # The whole 4-host slice: the job's mesh refused a subset after the setup.
    tpu.parse_args(base + ["--", "--config.mesh.num_devices=4"])
  assert "num_devices=4 is invalid: expected -1 (or 16): a job of 4 hosts uses every device" in capsys.readouterr().err


@pytest.mark.parametrize("machine, accelerator", [("a2-ultragpu-0g", None), ("n1-standard-8", "type=nvidia-t4,count=0"),
                                                  ("n1-standard-8", "type=nvidia-t4,count=-1")])
def test_a_gpu_count_below_one_is_refused_by_name(machine, accelerator, capsys):
  argv = ["--name=ss-gpu", f"--machine-type={machine}", f"--config={CONFIG}", "--workdir=/tmp/r"]
  with pytest.raises(SystemExit):
    gpu.parse_args(argv + ([f"--accelerator={accelerator}"] if accelerator else []))
  err = capsys.readouterr().err
  assert f"--machine-type={machine}" in err and "at least 1" in err and "Traceback" not in err


def test_local_expands_a_tilde_in_the_config_path(monkeypatch, tmp_path):
  """The job gets its flags without a shell: `--config=~/x.py` was checked here (expanded) and failed in the job."""
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "conf.py").write_text(open(os.path.join(common.REPO_ROOT, CONFIG)).read())
  args = local.parse_args(["--config=~/conf.py", "--workdir=workdir/t"])
  assert args.config == str(tmp_path / "conf.py")


def _documented_tpu_commands():
  """The README's TPU example and every config docstring's `python -m launch.tpu` command, as argv lists."""
  readme = open(os.path.join(common.REPO_ROOT, "README.md")).read().split("## Running on a TPU VM", 1)[1]
  texts = [re.search(r"```\n(.*?)```", readme, re.S).group(1)]
  for name in sorted(os.listdir(os.path.join(common.REPO_ROOT, "configs"))):
    if name.endswith(".py"):
      texts.append(open(os.path.join(common.REPO_ROOT, "configs", name)).read())
  for text in texts:
    for match in re.finditer(r"python -m launch\.tpu (?:.*\\\n)*.*", text):
      yield shlex.split(match.group(0).replace("\\\n", " "))[3:]


def test_documented_tpu_commands_use_a_shared_workdir_and_copy_what_the_config_reads(capsys):
  commands = list(_documented_tpu_commands())
  assert len(commands) >= 5
  for argv in commands:
    args = tpu.parse_args(["--dry-run"] + argv)
    assert "is not shared" not in capsys.readouterr().err, argv
    config = common.load_config(os.path.join(common.REPO_ROOT, args.config), None)
    remote = {r for _, r in args.copies}
    assert config.data.manual_dir in remote and config.data.tokenizer in remote, argv


@pytest.mark.parametrize("accelerator", [
    "v5p-10", "v5litepod-12", "v4-6", "v5litepod-0", "v5litepod-2", "v5p-0", "v5litepod-512", "v6e-24", "v3-12", "v2-2",
    "v4-9"
])
def test_slice_table_refuses_sizes_that_are_not_slices(accelerator):
  with pytest.raises(ValueError):
    tpu.slice_of(accelerator)


def test_gcloud_worker_values():
  assert tpu.workers_of("all", 4) == [0, 1, 2, 3] and tpu.workers_of("0,2-3", 4) == [0, 2, 3]
  for bad in ("", "1-1", "3-1", "1-2-3", "a", "0,", "4"):
    with pytest.raises(ValueError):
      tpu.workers_of(bad, 4)


def test_archive_leaves_out_ignored_paths_and_the_workdir(tmp_path):
  tree = tmp_path / "tree"
  for path in ("a.py", "configs/c.py", ".venv/bin/python", ".whl/x.whl", "build/lib/a.py", "dist/p.tar.gz",
               "pkg.egg-info/PKG-INFO", "pkg/__pycache__/a.pyc", "workdir/ckpt", "runs/x/ckpt", "runs/y/keep",
               "spectral_soup/utils/workdir_lock.py", ".git/HEAD"):
    (tree / path).parent.mkdir(parents=True, exist_ok=True)
    (tree / path).write_text("x")
  step = common.archive_step(str(tmp_path / "a.tar.gz"), workdir="runs/x")
  assert step.local_files == (str(tmp_path / "a.tar.gz"),)
  argv = step.argv[:-2] + [str(tree), "."]  # The same excludes, on this tree.
  subprocess.run(argv, check=True)
  with tarfile.open(tmp_path / "a.tar.gz") as f:
    files = sorted(m.name for m in f.getmembers() if m.isfile())
  assert files == ["./a.py", "./configs/c.py", "./runs/y/keep", "./spectral_soup/utils/workdir_lock.py"]


def test_fake_devices_keep_the_users_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2")
  (step,) = local.build_commands(local.parse_args([f"--config={CONFIG}", "--workdir=w", "--fake-devices=8"]))
  assert step.argv[1] == "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"


def test_gpu_driver_wait_times_out_and_spot_vms_stop(tmp_path):
  fake = tmp_path / "nvidia-smi"
  fake.write_text("#!/bin/sh\nexit 9\n")
  fake.chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
  wait = subprocess.run(["bash", "-c", gpu.wait_script(0.1, 0.05)], env=env, capture_output=True, text=True, timeout=30)
  assert wait.returncode == 1 and "nvidia-smi did not answer within 0.1 s" in wait.stderr
  lines = _dry_run(gpu, GPU_RUN[:-1] + ["--spot", "--driver-timeout=60"])
  assert "--instance-termination-action=STOP" in lines[0] and "within 60 s" in _remote(lines[1])


def test_workdir_tilde_is_the_home_for_check_and_use(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  monkeypatch.setattr(flags, "FLAGS", values)
  cli.parse_flags(["prog", "--workdir=~/runs/x"])
  assert values.workdir == str(tmp_path / "runs" / "x")
  cli.check_workdir(values.workdir)  # What the run writes to is what was checked.
  with pytest.raises(ValueError, match="is not a known home directory"):
    cli.check_workdir("~no_such_user_here/x")


def test_config_path_fields_expand_a_tilde(tmp_path):
  """`--config.data.source=~/pairs.jsonl`: a shell leaves the `~` as typed; the parser expands it as `--workdir`'s."""
  env = {**os.environ, "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([
      sys.executable, "-m", "experiments.train_basis", "--config=configs/train_basis_jsonl.py",
      "--config.data.source=~/pairs.jsonl", "--workdir=~/run"
  ], cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert f"config.data.source={str(tmp_path / 'pairs.jsonl')!r}: no such file" in result.stderr


def test_a_workdir_inside_another_runs_checkpoints_is_refused(tmp_path):
  """The outer run's checkpoint retention would delete a run kept in one of its step directories."""
  run = tmp_path / "run"
  (run / "checkpoints" / "300").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  for inner in (run / "checkpoints", run / "checkpoints" / "300", run / "checkpoints" / "300" / "new"):
    with pytest.raises(ValueError, match=r"lies inside the checkpoints of the run in .*run: its checkpoint retention"):
      cli.check_workdir(str(inner))
  cli.check_workdir(str(run / "elsewhere"))
  cli.check_workdir(str(tmp_path / "checkpoints" / "x"))  # A directory named so, of no run.


@pytest.mark.parametrize("module", [tpu, gpu])
def test_remote_plans_refuse_a_shell_python_and_a_url_workdir_and_reattach_with_the_overrides(module, capsys):
  """`--python='python3.11; touch x #'` ran `touch` on the machine (and commented the install out); a gs:// workdir
  became a relative local directory on each host; the printed re-attach command lost the job's overrides, so the
  launcher's config check refused it while the job ran."""
  base = ["--name=ss", f"--config={CONFIG}", "--workdir=/mnt/shared/r"]
  with pytest.raises(SystemExit):
    module.parse_args(base + ["--python=python3.11; touch /tmp/INJECTED #"])
  assert "--python='python3.11; touch /tmp/INJECTED #': expected an interpreter name" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    module.parse_args(base[:2] + ["--workdir=gs://bucket/run"])
  assert "--workdir=gs://bucket/run: expected a path on the machine" in capsys.readouterr().err
  args = module.parse_args(base + ["--", "--config.train.num_steps=70", "--config.seed=3"])
  again = module.parse_args(shlex.split(module.reattach_command(args))[3:])
  assert again.job_args == ["--config.train.num_steps=70", "--config.seed=3"] and again.steps == ["logs", "delete"]


def test_a_multi_host_training_checks_the_batch_over_the_slices_hosts(capsys):
  """The check used this machine's one process: a batch of 2 on a 4-host slice passed here, and the job refused it
  on the hosts after create and install."""
  argv = [
      "--name=ss-h", "--accelerator-type=v5litepod-16", f"--config={CONFIG}", "--workdir=/mnt/shared/r", "--",
      "--config.mesh.num_devices=2", "--config.train.batch_size=2", "--config.train.feature_batch_size=2",
      "--config.train.eval_batch_size=2"
  ]
  with pytest.raises(SystemExit):
    tpu.parse_args(argv)
  assert "config.train.batch_size=2 is invalid: expected divisible over 4 hosts" in capsys.readouterr().err
  tpu.parse_args(argv[:4] + ["--run-workers=0"] + argv[4:])  # One worker runs one process: 2 pairs are fine.
  # Every host listed is every host: the same multi-host job as "all" (it ran 4 separate jobs, with no warning).
  with pytest.raises(SystemExit):
    tpu.parse_args(argv[:4] + ["--run-workers=0-3"] + argv[4:])
  assert "divisible over 4 hosts" in capsys.readouterr().err
  assert tpu.parse_args(argv[:4] + ["--run-workers=3,2,1,0"]).run_workers == "all"


@pytest.mark.parametrize("job_arg, message", [
    ("--bogus_flag=1", r"job argument --bogus_flag=1: expected --config.FIELD=VALUE overrides"),
    ("--show_config", r"job argument --show_config: the job would print its config and exit"),
])
def test_job_arguments_that_would_fail_or_do_nothing_on_the_machine_are_refused(job_arg, message, capsys):
  """They were forwarded unchecked: `--bogus_flag` failed after the machine was created and installed; `--show_config`
  printed the config, exited 0, and the launcher deleted the machine reporting success."""
  with pytest.raises(SystemExit):
    tpu.parse_args(["--name=ss", f"--config={CONFIG}", "--workdir=/mnt/shared/r", "--", job_arg])
  assert re.search(message, capsys.readouterr().err)
  tpu.parse_args(["--name=ss", f"--config={CONFIG}", "--workdir=/mnt/shared/r", "--", "--verbosity=1"])


def test_the_job_names_a_url_workdir_and_a_config_variant_that_raised(tmp_path):
  with pytest.raises(ValueError, match=r"--workdir=gs://bucket/run: expected a path on this machine"):
    cli.check_workdir("gs://bucket/run")
  result = subprocess.run([
      sys.executable, "-m", "experiments.train_basis", f"--workdir={tmp_path / 'w'}",
      "--config=configs/ultrafeedback_gemma3_1b.py:nope"
  ], cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert ("its get_config raised ValueError: Unknown config variant 'nope': expected '' or 'local'"
          in result.stderr), result.stderr


def test_a_workdir_that_is_a_dangling_symlink_is_refused_up_front(tmp_path):
  """It passed as a missing directory and failed after the model and data loaded: `[Errno 17] File exists`."""
  (tmp_path / "link").symlink_to(tmp_path / "gone")
  with pytest.raises(ValueError, match=r"link is a symbolic link to .*gone, which does not exist: expected a "
                     r"directory"):
    cli.check_workdir(str(tmp_path / "link"))


def test_remote_plans_check_the_jobs_config_values_for_the_machines_devices(capsys):
  """A config the job would refuse at once is refused before any machine is created, for both entry points on TPU
  and on GPU (the GPU count read from --accelerator or the machine type)."""
  refused = [
      (gpu, GPU_RUN + ["--", "--config.train.batch_size=0"], "config.train.batch_size=0 is invalid"),
      (gpu, GPU_RUN + ["--machine-type=a2-ultragpu-2g", "--", "--config.train.batch_size=3"],
       r"on the 2 devices of a2-ultragpu-2g"),
      (tpu, POD[:3] + [
          "--accelerator-type=v5litepod-8", "--module=experiments.main", "--config=configs/demo.py",
          "--workdir=/mnt/shared/run1", "--", "--config.eval.num_prompts=1"
      ], r"config.eval.num_prompts=1 is invalid: expected >= 2"),
  ]
  for module, argv, message in refused:
    with pytest.raises(SystemExit) as e:
      module.parse_args(argv)
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)
  assert gpu.gpu_count("a3-highgpu-8g", None) == 8 and gpu.gpu_count("g2-standard-48", None) == 4
  assert gpu.gpu_count("n1-standard-8", "type=nvidia-tesla-t4,count=2") == 2
  assert gpu.gpu_count("n1-standard-8", None) is None  # Left to the job, with a warning.
  gpu.parse_args(GPU_RUN + ["--machine-type=n1-standard-8"])
  assert "the config's values are checked when the job starts" in capsys.readouterr().err
