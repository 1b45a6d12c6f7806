"""Preemption: one training job killed (SIGKILL) at seven different points and stopped once by SIGTERM, restarted
each time with the same command, ends bitwise equal to an uninterrupted run; its metrics log reads as one run."""

from __future__ import annotations

import json
import os
import signal

import pytest

from spectral_soup.offline import metrics as metrics_lib
from tests.reliability.harness import (EVERY, NUM_STEPS, assert_bitwise_equal, finished_steps, partial_steps, restore,
                                       wait_for)

KILLED = -signal.SIGKILL
PREEMPTED = 143  # experiments.train_basis.PREEMPTED_EXIT_CODE


@pytest.fixture(scope="module")
def chain(trainer, reference):
  """Runs the interrupted job; returns {name: (Run, committed steps after it, partial steps after it)}."""
  workdir = os.path.join(trainer.root, "interrupted")
  out = {"workdir": workdir}

  def record(name, run):
    out[name] = (run, finished_steps(workdir), partial_steps(workdir))

  # 1. After the first update, before any checkpoint exists (compile and feature pass are done).
  record("after_step_1", trainer.run(workdir, fault="kill_after_step:1"))
  # 2. Mid-interval: step 5 computed, the asynchronous save of step 4 possibly still in flight.
  record("after_step_5", trainer.run(workdir, fault="kill_after_step:5"))
  # 3. Step 8's checkpoint fully written to its temporary directory, killed before the rename that commits it.
  record("before_commit_8", trainer.run(workdir, fault="kill_before_commit:8"))
  # 4. While restoring the newest checkpoint.
  record("in_restore", trainer.run(workdir, fault="kill_in_restore:0"))
  # 5. From outside, while step 10's asynchronous write is in progress (the writer stalls).
  proc = trainer.start(workdir, fault="slow_write:10")
  out["saw_partial_10"] = wait_for(lambda: any(p.startswith("10.") for p in partial_steps(workdir)), proc)
  proc.send_signal(signal.SIGKILL)
  record("during_write_10", trainer.finish(proc))
  # 6. Halfway through a line of metrics.jsonl.
  record("in_metrics_11", trainer.run(workdir, fault="kill_in_metrics:11"))
  out["metrics_tail"] = open(os.path.join(workdir, metrics_lib.FILENAME)).read()[-200:]
  # 7. Right after step 12's checkpoint is committed.
  record("after_commit_12", trainer.run(workdir, fault="kill_after_commit:12"))
  # 8. SIGTERM during step 13: a checkpoint at 13 (off the every-2 grid), exit status 143.
  record("term_13", trainer.run(workdir, fault="term_at:13"))
  # 9. A Ctrl-C (SIGINT) during step 15: the same, a checkpoint at 15 and exit status 143.
  record("int_15", trainer.run(workdir, fault="int_at:15"))
  # 10. The same command once more: runs to the end.
  record("final", trainer.run(workdir))
  return out


ORDER = ("after_step_1", "after_step_5", "before_commit_8", "in_restore", "during_write_10", "in_metrics_11",
         "after_commit_12", "term_13", "int_15", "final")


def test_every_restart_resumes_from_the_newest_committed_step(chain):
  """A killed run leaves its committed steps intact; the next start resumes from the newest one."""
  previous = []
  for name in ORDER:
    run, steps, _ = chain[name]
    if name != "in_restore":  # Killed inside the restore, before it could log.
      expected = f"Resumed from step {max(previous)}" if previous else "Resumed"
      assert (expected in run.out) == bool(previous), (name, previous, run.tail())
    assert set(steps) >= set(previous[-1:]), (name, previous, steps)  # The newest committed step survives.
    previous = steps
  # Nothing was ever mistaken for corruption: no step was set aside.
  assert not os.path.exists(os.path.join(chain["workdir"], "checkpoints.corrupt"))


def test_each_kill_point(chain):
  run, steps, _ = chain["after_step_1"]
  assert run.rc == KILLED and steps == [], run.tail()  # Killed before any checkpoint: the next start is fresh.
  run, steps, _ = chain["after_step_5"]
  assert run.rc == KILLED and 2 in steps and set(steps) <= {2, 4}, run.tail()  # 4 only if its write finished.
  run, steps, partial = chain["before_commit_8"]
  assert run.rc == KILLED and max(steps) == 6 and any(p.startswith("8.") for p in partial), (steps, partial)
  run, steps, partial = chain["in_restore"]
  assert run.rc == KILLED and max(steps) == 6 and not any(p.startswith("6") for p in partial), (steps, partial)
  run, steps, _ = chain["during_write_10"]
  assert chain["saw_partial_10"] and run.rc == KILLED and max(steps) == 8, (steps, run.tail())
  run, steps, _ = chain["in_metrics_11"]
  assert run.rc == KILLED and chain["metrics_tail"].endswith('"total_lo'), chain["metrics_tail"]
  run, steps, _ = chain["after_commit_12"]
  assert run.rc == KILLED and max(steps) == 12, (steps, run.tail())


def test_sigterm_saves_the_current_step_and_exits_143(chain):
  run, steps, partial = chain["term_13"]
  assert run.rc == PREEMPTED, run.tail()
  assert "SIGTERM received" in run.out and "Stopped at step 13" in run.out, run.tail()
  assert max(steps) == 13 and not partial, (steps, partial)


def test_a_first_ctrl_c_saves_the_current_step_and_exits_143(chain):
  run, steps, partial = chain["int_15"]
  assert run.rc == PREEMPTED, run.tail()
  assert "Interrupted (Ctrl-C)" in run.out and "Stopped at step 15" in run.out, run.tail()
  assert max(steps) == 15 and not partial, (steps, partial)


def test_a_sigterm_before_the_first_logged_step_still_exits_143(trainer):
  """No metrics.jsonl yet when the preemption arrives: plotting the training curves of nothing raised
  FileNotFoundError after the checkpoint, so the job exited 1 (a traceback) and a launcher did not restart it."""
  workdir = os.path.join(trainer.root, "early_term")
  run = trainer.run(workdir, "--config.train.log_every_steps=1000", fault="term_at:3")
  assert run.rc == PREEMPTED, run.tail()
  assert "Stopped at step 3" in run.out and "Training curves: none yet" in run.out, run.tail()
  assert max(finished_steps(workdir)) == 3 and not os.path.exists(os.path.join(workdir, metrics_lib.FILENAME))


def test_restarted_job_ends_bitwise_equal_to_the_uninterrupted_run(chain, reference):
  run, steps, partial = chain["final"]
  assert run.rc == 0 and not partial, (partial, run.tail())  # Leftovers of killed writes are cleaned up.
  assert max(steps) == NUM_STEPS and NUM_STEPS % EVERY == 0
  step_ref, state_ref, data_ref = restore(os.path.join(reference, "checkpoints"))
  step, state, data = restore(os.path.join(chain["workdir"], "checkpoints"))
  assert step == step_ref == NUM_STEPS and data == data_ref  # Includes the iterator position (epoch 3, batch 4).
  assert_bitwise_equal(state, state_ref)  # Params, Adam moments, step counter, RNG.


def test_metrics_log_reads_as_one_run(chain, reference):
  records = metrics_lib.read_metrics(chain["workdir"], kind="train")
  assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
  expected = metrics_lib.read_metrics(reference, kind="train")
  for got, want in zip(records, expected):
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"], (got["step"], got, want)


def test_metrics_file_survives_a_crash_while_it_is_rewritten(tmp_path, monkeypatch):
  """Resuming rewrites metrics.jsonl without the lines past the resumed step; a crash halfway through that rewrite
  leaves the previous file, not a truncated one. A line cut short by a kill is skipped when reading."""
  lines = [json.dumps({"step": s, "kind": "train", "loss": [0.5 / s]}) + "\n" for s in range(1, 6)]
  path = tmp_path / metrics_lib.FILENAME
  path.write_text("".join(lines) + '{"step": 6, "kind": "tr')
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
  before = path.read_text()

  class Crash(Exception):
    pass

  def crashing_open(name, mode="r", *args, **kwargs):
    handle = open(name, mode, *args, **kwargs)  # pylint: disable=unspecified-encoding
    if "w" in mode:

      def writelines(rows):
        rows = list(rows)
        handle.write("".join(rows)[:20])
        handle.flush()
        raise Crash()

      handle.writelines = writelines
    return handle

  monkeypatch.setattr(metrics_lib, "open", crashing_open, raising=False)
  with pytest.raises(Crash):
    metrics_lib.MetricsWriter(str(tmp_path), resume_step=3, tensorboard=False)
  assert path.read_text() == before
  monkeypatch.undo()
  metrics_lib.MetricsWriter(str(tmp_path), resume_step=3, tensorboard=False).close()
  assert path.read_text() == "".join(lines[:3])


def test_every_host_stops_when_any_host_got_sigterm(monkeypatch):
  """A SIGTERM reaching two hosts a second apart stopped the first alone (a forced save) while the second waited in
  the next step's collectives: both hung, nothing saved (two processes on CPU, 2 of 2 runs). The stop is agreed."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import train  # pylint: disable=g-import-not-at-top
  gathered = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: gathered.append(int(x)) or np.asarray([int(x), 1]))  # The other host got it.
  stop = train._StopSignal()  # pylint: disable=protected-access
  assert not stop.received and stop.agreed() and gathered == [0]
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.asarray([int(x), 0]))
  assert not stop.agreed()
  stop.received = True
  assert stop.agreed()
