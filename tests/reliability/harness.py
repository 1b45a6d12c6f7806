"""Shared pieces of the reliability suite: the training command, its fault-injecting wrapper (`faulty_train.py`),
and one uninterrupted reference run that the interrupted runs must reproduce bitwise (fixtures used through
conftest.py).

Every training run here is a subprocess with 2 CPU devices sharing one persistent compilation cache: the first run
compiles, the others load the same programs (identical programs, so results stay bitwise comparable) and start in
a few seconds.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import List, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WRAPPER = os.path.join(REPO, "tests", "reliability", "faulty_train.py")
NUM_STEPS = 16
EVERY = 2
# 128 pairs in batches of 32: 4 batches per epoch, so 16 steps also cross 3 epoch boundaries.
FLAGS = [
    "--config=configs/train_basis_tiny.py", "--config.train.tensorboard=False", f"--config.train.num_steps={NUM_STEPS}",
    f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.max_to_keep=3", "--config.train.log_every_steps=1",
    "--config.data.num_train_pairs=128", "--config.data.num_eval_pairs=0", "--config.optim.warmup_steps=2"
]


@dataclasses.dataclass
class Run:
  """A finished training subprocess."""
  rc: int
  out: str

  def tail(self) -> str:
    return self.out[-4000:]


class Trainer:
  """Starts `experiments.train_basis` (optionally through `faulty_train.py`) on a workdir."""

  def __init__(self, root: str):
    self.root = root
    self.env = dict(os.environ)
    self.env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                    SPECTRAL_SOUP_PROGRESS="0", PYTHONPATH=REPO + os.pathsep + self.env.get("PYTHONPATH", ""),
                    JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

  def command(self, workdir: str, flags: List[str], fault: str) -> List[str]:
    entry = [WRAPPER] if fault else ["-m", "experiments.train_basis"]
    return [sys.executable, *entry, *FLAGS, *flags, f"--workdir={workdir}"]

  def start(self, workdir: str, *flags: str, fault: str = "") -> subprocess.Popen:
    log = open(os.path.join(self.root, f"log-{time.time_ns()}.txt"), "w+")  # A file: no pipe to fill up.
    env = dict(self.env, RELIABILITY_FAULT=fault)
    proc = subprocess.Popen(self.command(workdir, list(flags), fault), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc

  def finish(self, proc: subprocess.Popen, timeout: float = 300) -> Run:
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    return Run(proc.returncode, out)

  def run(self, workdir: str, *flags: str, fault: str = "", timeout: float = 300) -> Run:
    return self.finish(self.start(workdir, *flags, fault=fault), timeout)


def finished_steps(workdir: str) -> List[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def partial_steps(workdir: str) -> List[str]:
  """Names of uncommitted (temporary) step directories."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(d for d in os.listdir(directory) if "tmp" in d) if os.path.isdir(directory) else []


def wait_for(predicate, proc: Optional[subprocess.Popen] = None, timeout: float = 240) -> bool:
  """Polls `predicate` until it holds (True), `proc` exits or the timeout passes (False)."""
  deadline = time.time() + timeout
  while time.time() < deadline and (proc is None or proc.poll() is None):
    if predicate():
      return True
    time.sleep(0.02)
  return predicate()


def one_device(tree):
  """ShapeDtypeStructs on the first device for a tree of arrays or array metadata."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def restore(directory: str, step: Optional[int] = None):
  """(step, state as numpy, data) of a checkpoint directory (`<workdir>/checkpoints`), read-only, on one device."""
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True), item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "data": ocp.JsonCheckpointHandler()
      })
  step = manager.latest_step() if step is None else step
  abstract = one_device(manager.item_metadata(step)["state"].tree)
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  manager.close()
  return step, jax.device_get(restored["state"]), dict(restored["data"])


def assert_bitwise_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="session")
def trainer(tmp_path_factory) -> Trainer:
  return Trainer(str(tmp_path_factory.mktemp("reliability")))


@pytest.fixture(scope="session")
def reference(trainer) -> str:
  """The workdir of one uninterrupted run (it also fills the compilation cache for every later run)."""
  workdir = os.path.join(trainer.root, "reference")
  run = trainer.run(workdir)
  assert run.rc == 0, run.tail()
  return workdir


def copy_workdir(source: str, target: str) -> str:
  shutil.copytree(source, target)
  return target
