"""Corrupt or foreign checkpoint state: damaged steps are set aside with a warning and training resumes from the
previous good one (bitwise); another config's checkpoint stops the run naming the mismatch; a full disk during a
save stops the run naming the step, and leaves every earlier step as it was."""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
import shutil
import sys
import time
import types
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import train_basis_tiny
from spectral_soup.offline import checkpoint as checkpoint_lib
from spectral_soup.offline import resume
from spectral_soup.offline import train
from tests.reliability.faulty_train import tree_hashes
from tests.reliability.harness import (NUM_STEPS, assert_bitwise_equal, copy_workdir, finished_steps, one_device,
                                       partial_steps, restore)


def _unraisable_at_next_collection():
  """What the garbage collector reports as "Exception ignored in ..." when it next runs (e.g. in another test)."""
  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = seen.append
  try:
    gc.collect()
  finally:
    sys.unraisablehook = previous
  return [f"{u.object!r}: {u.exc_value!r}"[:200] for u in seen]


def _reads_left_suspended():
  """Orbax array reads still suspended after a restore returned (pending tasks of an event loop already closed)."""
  return [
      o for o in gc.get_objects()
      if type(o) is types.CoroutineType and o.cr_frame is not None and o.__name__ == "_read_array_index_and_device_put"
  ]


def _truncate(path, fraction):
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * fraction))


def _tamper(step_dir):
  """One array value changed in files that are otherwise intact and readable (silent corruption)."""
  path = os.path.join(step_dir, "state")
  with ocp.StandardCheckpointer() as checkpointer:
    state = jax.tree.map(np.array, jax.device_get(checkpointer.restore(path)))  # Writable copies.
  state["params"]["heads"]["b"][0, 0, 0] += 1.0
  shutil.rmtree(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()


def _array_files(step_dir):
  return glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))


DAMAGE = {
    "truncated_arrays": lambda d: [_truncate(p, 0.5) for p in _array_files(d)],
    "empty_arrays": lambda d: [_truncate(p, 0.0) for p in _array_files(d)],
    "deleted_arrays": lambda d: shutil.rmtree(os.path.join(d, "state", "ocdbt.process_0")),
    "changed_value": _tamper,
    "truncated_array_metadata": lambda d: _truncate(os.path.join(d, "state", "_METADATA"), 0.5),
    "deleted_array_metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "truncated_sharding": lambda d: _truncate(os.path.join(d, "state", "_sharding"), 0.5),
    "deleted_iterator_state": lambda d: os.remove(os.path.join(d, "data", "metadata")),
    "garbled_iterator_state": lambda d: open(os.path.join(d, "data", "metadata"), "w").write('{"iterator": {"ep'),
    "deleted_state_item": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


@pytest.fixture(scope="module")
def good_checkpoints(reference, tmp_path_factory):
  """A copy of the reference run's checkpoints (steps 12, 14, 16) and its abstract state on one device."""
  directory = copy_workdir(os.path.join(reference, "checkpoints"), str(tmp_path_factory.mktemp("good") / "checkpoints"))
  ckpt = checkpoint_lib.Checkpointer(directory)
  abstract = one_device(ckpt.manager.item_metadata(NUM_STEPS)["state"].tree)
  ckpt.close()
  return directory, abstract


@pytest.mark.parametrize("damage", sorted(DAMAGE))
# A cancelled read completing late into the closed loop printed "Event loop is closed" (under load, now and then).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_step_falls_back_with_a_warning(good_checkpoints, tmp_path, caplog, damage):
  source, abstract = good_checkpoints
  directory = copy_workdir(source, str(tmp_path / "checkpoints"))
  DAMAGE[damage](os.path.join(directory, str(NUM_STEPS)))
  ckpt = checkpoint_lib.Checkpointer(directory)
  with caplog.at_level(logging.WARNING):
    step, state, data = ckpt.restore_latest(abstract)
  ckpt.close()
  # The other reads of a failed restore are cancelled before Orbax closes its event loop: none is left suspended
  # (each would print tracebacks when TensorStore completes it or the garbage collector reaches it).
  assert _reads_left_suspended() == []
  assert step == NUM_STEPS - 2 and data["iterator"] == restore(source, step)[2]["iterator"]
  assert_bitwise_equal(jax.device_get(state), restore(source, step)[1])
  warnings = [r.getMessage() for r in caplog.records if f"step {NUM_STEPS}" in r.getMessage()]
  assert any("corrupt" in w for w in warnings), warnings
  if damage == "changed_value":  # Only the fingerprints can tell.
    assert any("do not match the fingerprints" in w for w in warnings), warnings
  assert os.path.isdir(f"{directory}.corrupt/{NUM_STEPS}") and finished_steps(os.path.dirname(directory)) == [12, 14]
  assert _unraisable_at_next_collection() == []


def test_training_resumes_past_two_damaged_steps_bitwise(trainer, reference, tmp_path):
  """The newest two steps are damaged in different ways; the same command resumes from the third, warns about
  both, and still ends bitwise equal to the uninterrupted run."""
  workdir = copy_workdir(reference, str(tmp_path / "damaged"))
  DAMAGE["truncated_arrays"](os.path.join(workdir, "checkpoints", str(NUM_STEPS)))
  DAMAGE["deleted_iterator_state"](os.path.join(workdir, "checkpoints", str(NUM_STEPS - 2)))
  run = trainer.run(workdir)
  assert run.rc == 0, run.tail()
  for step in (NUM_STEPS, NUM_STEPS - 2):
    assert f"Checkpoint step {step} in" in run.out and "is corrupt or incomplete" in run.out, run.tail()
  assert f"Resumed from step {NUM_STEPS - 4}" in run.out, run.tail()
  step, state, data = restore(os.path.join(workdir, "checkpoints"))
  step_ref, state_ref, data_ref = restore(os.path.join(reference, "checkpoints"))
  assert step == step_ref == NUM_STEPS and data == data_ref
  assert_bitwise_equal(state, state_ref)


# ----------------------------------------------------------------------------------------------------------------
# Another config's checkpoint: a clear error before training, and the checkpoint is left alone.


def _config(**flat):
  """The subprocess runs' config (tests/reliability/harness.py FLAGS), without the feature pass."""
  config = train_basis_tiny.get_config()
  config.update_from_flattened_dict({
      "train.tensorboard": False,
      "train.num_steps": NUM_STEPS,
      "checkpoint.every_steps": 2,
      "train.log_every_steps": 1,
      "data.num_train_pairs": 128,
      "data.num_eval_pairs": 0,
      "optim.warmup_steps": 2,
      "train.cache_features": False,
      **flat
  })
  return config


@pytest.mark.parametrize(
    "flat, message",
    [
        ({
            "basis.num_bases": 4
        }, "config.basis.num_bases=4 differs from 3"),
        ({
            "model.embed_dim": 48
        }, "config.model.embed_dim=48 differs from 32"),
        ({
            "basis.head_rank": 2
        }, "config.basis.head_rank=2 differs from 4"),
        ({
            "basis.kind": "lora"
        }, "config.basis.kind='lora' differs from 'heads'"),
        ({
            "train.batch_size": 64
        }, "config.train.batch_size=64 differs from 32"),
        ({
            "basis.num_bases": 4,
            "train.cache_features": True
        }, "config.basis.num_bases=4 differs from 3"),
        (
            {  # It was recorded only when True: the bases' bias arrays were a CheckpointMismatchError traceback.
                "basis.logit_bias": True
            },
            "config.basis.logit_bias=True differs from False"),
        (
            {  # What the bases are trained on and for: it resumed on other pairs, or with another objective.
                "data.seed": 7
            },
            "config.data.seed=7 differs from 1 in the checkpoint of step 16 in .*: the checkpoint's bases were trained on "
            "other pairs"),
        ({
            "loss.beta": 0.5
        }, "config.loss.beta=0.5 differs from 1.0 .*: the checkpoint's bases were trained with another objective"),
        (
            {  # Nothing left to train: config.json said 8 steps beside bases of step 16.
                "train.num_steps": 8
            },
            "config.train.num_steps=8 is below step 16 of the checkpoint in .*: its bases are trained further than "
            "asked"),
    ])
def test_checkpoint_of_another_config_names_the_field(reference, tmp_path, flat, message):
  workdir = copy_workdir(reference, str(tmp_path / "other"))
  before = tree_hashes(os.path.join(workdir, "checkpoints"))
  files_before = _files(workdir)
  with pytest.raises(ValueError, match=message.replace("[", r"\[")) as info:
    train.train_and_evaluate(_config(**flat), workdir)
  assert f"step {NUM_STEPS}" in str(info.value) and "new --workdir" in str(info.value)
  assert tree_hashes(os.path.join(workdir, "checkpoints")) == before  # Nothing set aside, nothing written.
  assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))
  # Nor anywhere else in the workdir: no new config.json, no features file for the rejected config.
  assert _files(workdir) == files_before


def test_the_config_check_reads_only(reference, tmp_path):
  """`check_existing_checkpoint` runs before the training's own Checkpointer: it must leave a crashed run's partial
  step to that one (two background deletions of the same directory race: a flaky FileNotFoundError)."""
  workdir = copy_workdir(reference, str(tmp_path / "partial"))
  partial = os.path.join(workdir, "checkpoints", f"{NUM_STEPS + 2}.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(partial, "state"))
  resume.check_existing_checkpoint(_config(), workdir)
  time.sleep(1.0)  # Time for a background deletion, had one started.
  assert os.path.isdir(os.path.join(partial, "state"))
  with mock.patch.object(checkpoint_lib.logging, "warning") as warning:  # Orbax's INFO line was all (hidden).
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))  # The training's: removes it.
  assert "left half-written by an interrupted save" in warning.call_args[0][0]
  assert f"{NUM_STEPS + 2}.orbax-checkpoint-tmp" in warning.call_args[0][-1]
  ckpt.manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access
  ckpt.close()
  assert not os.path.exists(partial)


def _files(root):
  """{relative path: bytes} of every file under `root` outside checkpoints/."""
  out = {}
  for base, _, files in os.walk(root):
    for name in files:
      path = os.path.join(base, name)
      if not os.path.relpath(path, root).startswith("checkpoints"):
        with open(path, "rb") as f:
          out[os.path.relpath(path, root)] = f.read()
  return out


def test_shape_mismatch_without_recorded_config_names_the_arrays(good_checkpoints, tmp_path):
  """A checkpoint whose JSON item lacks the config fields (older runs) is still refused, by its shapes."""
  source, abstract = good_checkpoints
  directory = copy_workdir(source, str(tmp_path / "checkpoints"))
  for step in finished_steps(str(tmp_path)):
    path = os.path.join(directory, str(step), "data", "metadata")
    data = json.load(open(path))
    json.dump({"iterator": data["iterator"]}, open(path, "w"))  # No config fields, no fingerprints.
  grow = lambda s: jax.ShapeDtypeStruct((4,) + s.shape[1:], s.dtype, sharding=s.sharding)
  params = abstract["params"]
  wider = {**abstract, "params": {"heads": {"a": grow(params["heads"]["a"]), "b": grow(params["heads"]["b"])}}}
  ckpt = checkpoint_lib.Checkpointer(directory)
  with pytest.raises(
      checkpoint_lib.CheckpointMismatchError,
      match=r"step 16 .*params\.heads\.a has shape \(3, 32, 4\) float32 in the checkpoint but "
      r"\(4, 32, 4\) float32 here"):
    ckpt.restore_latest(wider)
  assert ckpt.all_steps() == [12, 14, 16] and not os.path.exists(directory + ".corrupt")
  assert ckpt.restore_latest(abstract)[0] == NUM_STEPS  # The checkpoint itself is fine.
  ckpt.close()


# ----------------------------------------------------------------------------------------------------------------
# A full disk during a save.


def test_full_disk_during_save_is_named_and_loses_nothing(trainer, reference, tmp_path):
  workdir = str(tmp_path / "full_disk")
  run = trainer.run(workdir, "--config.checkpoint.max_to_keep=2", fault="enospc:6")
  assert run.rc == 1, run.tail()
  assert "CheckpointSaveError" in run.out and "Saving checkpoint step 6" in run.out, run.tail()
  assert "No space left on device" in run.out and "Earlier steps [2, 4] are untouched" in run.out, run.tail()
  # Exactly the steps that existed when the write failed, byte for byte (max_to_keep=2 would have retired 2).
  snapshot = json.load(open(os.path.join(workdir, "enospc_snapshot.json")))
  assert tree_hashes(os.path.join(workdir, "checkpoints")) == snapshot and sorted(snapshot) == ["2", "4"]
  assert finished_steps(workdir) == [2, 4]
  # Space is back: the same command resumes from step 4 (no step is corrupt) and ends as the uninterrupted run.
  again = trainer.run(workdir, "--config.checkpoint.max_to_keep=2")
  assert again.rc == 0 and "Resumed from step 4" in again.out and "corrupt" not in again.out, again.tail()
  assert not partial_steps(workdir)
  assert_bitwise_equal(
      restore(os.path.join(workdir, "checkpoints"))[1],
      restore(os.path.join(reference, "checkpoints"))[1])
