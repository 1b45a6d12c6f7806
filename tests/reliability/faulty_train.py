r"""`python -m experiments.train_basis` with one injected fault, for the reliability tests.

  RELIABILITY_FAULT=KIND:STEP python tests/reliability/faulty_train.py --config=... --workdir=... [--config.X=...]

Every kill is a SIGKILL the process sends itself at an exact point (no cleanup, no final save, no Python
`finally`), so each restart of a test starts from a known on-disk state:

  kill_after_step:S     step S's update is computed; its checkpoint (if one is due) is not started.
  kill_before_commit:S  step S's checkpoint is completely written in its temporary directory, not yet renamed.
  slow_write:S          step S's checkpoint write stalls (600 s) in the background; the test kills from outside.
  kill_after_commit:S   right after step S's checkpoint is committed (at step S + 1's save).
  kill_in_metrics:S     halfway through writing step S's line of metrics.jsonl.
  kill_in_restore:0     while restoring the newest checkpoint.
  term_at:S             SIGTERM (a preemption notice, not a kill) arriving during step S.
  int_at:S              SIGINT (a Ctrl-C) arriving during step S.
  enospc:S              step S's checkpoint write fails with OSError(ENOSPC), after writing
                        `<workdir>/enospc_snapshot.json` (a hash of every committed step) for the test to compare.
  nan_batch:S           the S-th batch drawn gets a NaN in its first floating-point field.
"""

import errno
import hashlib
import json
import os
import runpy
import signal
import sys
import time

FAULT_ENV = "RELIABILITY_FAULT"


def _kill() -> None:
  os.kill(os.getpid(), signal.SIGKILL)
  time.sleep(60)  # Not reached.


def _step_of(directory) -> int:
  """The step of a path inside a step directory being written: '<root>/8.orbax-checkpoint-tmp.../data...' -> 8."""
  name = os.path.basename(os.path.dirname(os.fspath(directory)))
  head = name.split(".")[0]
  return int(head) if head.isdigit() else -1


def tree_hashes(root: str) -> dict:
  """{committed step: sha256 over its files' relative paths and bytes} of a checkpoint directory."""
  out = {}
  for name in sorted(os.listdir(root)):
    if not name.isdigit():
      continue
    digest = hashlib.sha256()
    for base, _, files in sorted(os.walk(os.path.join(root, name))):
      for file in sorted(files):
        path = os.path.join(base, file)
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          digest.update(f.read())
    out[name] = digest.hexdigest()
  return out


def install(kind: str, target: int) -> None:
  """Patches the training stack in this process to inject fault `kind` at step `target`."""
  import jax  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.handlers import json_checkpoint_handler  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  from spectral_soup.offline import checkpoint  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import input_pipeline  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import metrics  # pylint: disable=g-import-not-at-top

  if kind in ("kill_after_step", "kill_after_commit"):
    save = checkpoint.Checkpointer.save

    def patched_save(self, step, state, data, *, force=False):
      if kind == "kill_after_step" and step == target:
        jax.block_until_ready(state)
        _kill()
      if kind == "kill_after_commit" and step == target + 1:
        self.wait()
        _kill()
      return save(self, step, state, data, force=force)

    checkpoint.Checkpointer.save = patched_save
  elif kind == "kill_before_commit":
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def patched_finalize(self):
      if self.get_final().name == str(target):
        _kill()
      return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = patched_finalize
  elif kind in ("slow_write", "enospc"):
    save_fn = json_checkpoint_handler.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

    async def patched_save_fn(self, x, directory):
      if _step_of(directory) == target:
        if kind == "slow_write":
          time.sleep(600)
        else:
          root = os.path.dirname(os.path.dirname(os.fspath(directory)))
          with open(os.path.join(os.path.dirname(root), "enospc_snapshot.json"), "w") as f:
            json.dump(tree_hashes(root), f)
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(directory))
      return await save_fn(self, x, directory)

    json_checkpoint_handler.JsonCheckpointHandler._save_fn = patched_save_fn  # pylint: disable=protected-access
  elif kind == "kill_in_metrics":
    write = metrics.MetricsWriter.write

    def patched_write(self, step, values, kind="train"):
      if step == target and kind == "train":
        with open(self.path, "a") as f:
          f.write('{"step": %d, "kind": "train", "total_lo' % step)
        _kill()
      return write(self, step, values, kind)

    metrics.MetricsWriter.write = patched_write
  elif kind in ("term_at", "int_at"):
    draw = input_pipeline.PairIterator.__next__
    signum = signal.SIGTERM if kind == "term_at" else signal.SIGINT

    def patched_next(self):
      if self.epoch * self.batches_per_epoch + self.position + 1 == target:  # Drawing step `target`'s batch.
        os.kill(os.getpid(), signum)  # Handled at once: the loop sees it at this step's stop check.
      return draw(self)

    input_pipeline.PairIterator.__next__ = patched_next
  elif kind == "kill_in_restore":

    def patched_read(self, step, abstract_state):  # Reads the arrays of a step (restore and restore_latest).
      del self, step, abstract_state
      _kill()

    checkpoint.Checkpointer._read = patched_read  # pylint: disable=protected-access
  elif kind == "nan_batch":
    draw = input_pipeline.PairIterator.__next__
    calls = [0]

    def patched_next(self):
      batch = draw(self)
      calls[0] += 1
      if calls[0] == target:
        name = next(n for n in sorted(batch) if batch[n].dtype.kind == "f")
        batch[name] = batch[name].copy()
        batch[name].reshape(-1)[0] = float("nan")
      return batch

    input_pipeline.PairIterator.__next__ = patched_next
  elif kind:
    raise ValueError(f"unknown fault {kind!r}")


if __name__ == "__main__":
  fault_kind, _, fault_step = os.environ.get(FAULT_ENV, "").partition(":")
  install(fault_kind, int(fault_step or 0))
  sys.argv[0] = "train_basis"
  runpy.run_module("experiments.train_basis", run_name="__main__", alter_sys=True)
