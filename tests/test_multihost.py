"""Multi-host basis training on one machine: two processes of 4 CPU devices each (`jax.distributed`, gloo
collectives) run the sharded step of `offline/train.py` and agree with one process of 8 devices.

The mesh data x fsdp x model = 1 x 4 x 2 puts the fsdp axis across the two processes, so every step splits its
batch over both hosts and shards psi's features (the heads' A) over both: the cached-feature pass gathers
features from every host, the iterator and the evaluation slice per host, the gradient is reduced across hosts and
the Orbax checkpoint is written by both. The workers are `tests/multihost_worker.py`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from configs import train_basis_tiny
from spectral_soup.offline import checkpoint as checkpoint_lib
from spectral_soup.offline import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
TIMEOUT_S = 240  # For the whole job; it takes ~30-60 s on 2 CPU cores.

# A few steps of the tiny config with a small learning rate (Adam turns float rounding of a near-zero gradient into
# an update difference of up to lr, so lr bounds how closely two correct runs agree; see test_offline.py).
OVERRIDES = {
    "train.tensorboard": False,
    "train.num_steps": 4,
    "train.log_every_steps": 1,
    "data.num_train_pairs": 128,
    "data.num_eval_pairs": 64,
    "train.eval_batch_size": 32,
    "checkpoint.every_steps": 2,
    "optim.warmup_steps": 1,
    "optim.learning_rate": 1e-3,
    "mesh.data": 1,
    "mesh.fsdp": 4,
    "mesh.model": 2
}


def _config():
  config = train_basis_tiny.get_config()
  config.update_from_flattened_dict(OVERRIDES)
  return config


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", SPECTRAL_SOUP_PROGRESS="0")
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"])
  return env


def _start_workers(tmp_path, workdir, out):
  """Starts the processes of the job; returns them with their log files."""
  port, procs = _free_port(), []
  for i in range(NUM_PROCESSES):
    log = open(tmp_path / f"process_{i}.log", "w")
    argv = [
        sys.executable, WORKER, f"--process_id={i}", f"--num_processes={NUM_PROCESSES}", f"--port={port}",
        f"--workdir={workdir}", f"--out={out}", f"--overrides={json.dumps(OVERRIDES)}", "--timeout_s=120"
    ]
    procs.append((subprocess.Popen(argv, cwd=str(tmp_path), env=_worker_env(), stdout=log,
                                   stderr=subprocess.STDOUT), log))
  return procs


def _stop(procs):
  """Kills the processes still running (each by its own handle) and closes their logs."""
  for proc, log in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()


def _wait(procs, tmp_path, deadline):
  """Waits for every process; when one fails (the others would wait for it in a collective) or the deadline
  passes, kills the rest and fails with the tails of their logs."""
  while time.time() < deadline:
    codes = [proc.poll() for proc, _ in procs]
    if all(code is not None for code in codes) or any(code for code in codes):
      break
    time.sleep(0.2)
  _stop(procs)
  codes = [proc.returncode for proc, _ in procs]
  if any(codes):
    tails = []
    for i in range(len(procs)):
      with open(tmp_path / f"process_{i}.log") as f:
        lines = [line for line in f.read().splitlines() if not line.startswith("[Gloo]")]
      tails.append(f"--- process {i} (exit {codes[i]}):\n" + "\n".join(lines[-30:]))
    pytest.fail("the multi-host job failed or timed out (killed: exit -9):\n" + "\n".join(tails))


def _unflatten(arrays, prefix):
  out = {}
  for name, value in arrays.items():
    if name.startswith(prefix + "/"):
      node = out
      *parents, leaf = name[len(prefix) + 1:].split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The two-process job and the one-process reference (run while the job runs)."""
  if jax.device_count() != NUM_PROCESSES * LOCAL_DEVICES:
    pytest.skip(f"the reference needs {NUM_PROCESSES * LOCAL_DEVICES} devices in this process "
                f"(tests/conftest.py sets them), not {jax.device_count()}")
  tmp_path = tmp_path_factory.mktemp("multihost")
  workdir, out = tmp_path / "multi", tmp_path / "multi.npz"
  t0 = time.time()
  procs = _start_workers(tmp_path, workdir, out)
  try:
    reference = train.train_and_evaluate(_config(), str(tmp_path / "one"))
  except BaseException:
    _stop(procs)
    raise
  _wait(procs, tmp_path, t0 + TIMEOUT_S)
  with np.load(out) as f:
    multi = dict(f)
  return {
      "reference": reference,
      "reference_params": jax.device_get(reference.state["params"]),
      "multi": multi,
      "workdir": workdir,
      "reference_workdir": tmp_path / "one"
  }


def test_job_spans_two_processes(runs):
  multi = runs["multi"]
  assert multi["info/devices"].tolist() == [NUM_PROCESSES, NUM_PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES]
  # [data, fsdp, model]: the fsdp axis crosses the hosts (each holds half of the batch and of A's features).
  np.testing.assert_array_equal(multi["info/mesh_process"], [[[0, 0], [0, 0], [1, 1], [1, 1]]])
  assert int(multi["info/step"]) == OVERRIDES["train.num_steps"]


def test_two_processes_match_one(runs):
  """Same final parameters (1e-5), training losses and held-out metrics as one process over 8 devices."""
  ref, multi = runs["reference"], runs["multi"]
  train_metrics, eval_metrics = _unflatten(multi, "train"), _unflatten(multi, "eval")
  assert ref.train_metrics["grad_norm"] > 0
  for name in ("total_loss", "loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(train_metrics[name], ref.train_metrics[name], rtol=1e-5, atol=1e-5, err_msg=name)
  for name in ("loss", "accuracy", "margin", "count"):
    np.testing.assert_allclose(eval_metrics[name], ref.eval_metrics[name], rtol=1e-5, atol=1e-5, err_msg=name)
  params = _unflatten(multi, "params")
  chex.assert_trees_all_close(params, runs["reference_params"], rtol=1e-5, atol=1e-5)
  assert np.abs(params["heads"]["b"]).max() > 1e-3  # B starts at zero: the bases moved (far beyond 1e-5).


def test_outputs_written_once_and_checkpoint_restores_on_one_host(runs):
  """Process 0 alone writes the metrics; the Orbax checkpoint both processes wrote restores in one 8-device process
  into the reference's shardings: the whole train state (Adam moments too) and the iterator position match."""
  workdir, ref = runs["workdir"], runs["reference"]
  with open(workdir / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  steps = [line["step"] for line in lines if line["kind"] == "train"]
  assert steps == list(range(1, OVERRIDES["train.num_steps"] + 1))
  assert [line["step"] for line in lines if line["kind"] == "eval"] == [OVERRIDES["train.num_steps"]]

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ref.state)
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"))
  try:
    assert ckpt.all_steps() == [2, 4]
    step, state, data = ckpt.restore_latest(abstract)  # Also checks the arrays against their saved fingerprints.
  finally:
    ckpt.close()
  assert step == OVERRIDES["train.num_steps"] == int(state["step"])
  state = jax.device_get(state)
  chex.assert_trees_all_equal(state["params"], _unflatten(runs["multi"], "params"))
  chex.assert_trees_all_close(state, jax.device_get(ref.state), rtol=1e-5, atol=1e-5)
  ref_ckpt = checkpoint_lib.Checkpointer(str(runs["reference_workdir"] / "checkpoints"))
  try:
    assert data["iterator"] == ref_ckpt.read_data(step)["iterator"]
  finally:
    ref_ckpt.close()
