"""Orbax checkpoints of the train state and the data-iterator position, with fallback past corrupt steps.

A step directory holds two items: `state` (the train state pytree: step, trainable params, optimizer state, RNG)
and `data` (JSON: the input iterator's {"epoch", "position"} and anything else the loop needs to resume).

* Saves are asynchronous (the device-to-host copy blocks; writing happens in a background thread) and keep the
  last `max_to_keep` steps.
* Atomic: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a crash
  mid-save leaves a temporary directory that is never listed as a step (and is cleaned up on the next start).
* Restores place every array directly into its target sharding (restore arguments from `jax.eval_shape` of the
  state plus the shardings), so nothing is gathered on one host.
* `restore_latest` tries steps newest first: a step that fails to restore (a truncated or deleted file) is moved
  aside to `<directory>.corrupt/<step>` with a warning and the previous step is tried.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Train-state + iterator-state checkpoints in `directory` (see the module docstring)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # Multiples of the interval (plus forced saves); no "initial" save at the first step.
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(save_interval_steps),
                                                     policies.PreemptionCheckpointingPolicy()]),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # Partial saves of a crashed run.
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def all_steps(self):
    return list(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data: Mapping[str, Any], *, force: bool = False) -> bool:
    """Starts saving `state` (a pytree of jax.Arrays) and `data` (JSON) at `step` if due (or `force`d)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data)))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
    """(state, data) of `step`; `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored["state"], dict(restored["data"])

  def restore_latest(self, abstract_state: Any) -> Optional[Tuple[int, Any, dict]]:
    """(step, state, data) of the newest step that restores, or None if there is none.

    A step that fails is moved aside (process 0) to `<directory>.corrupt/<step>` with a warning.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (any read failure means "unusable step")
        logging.warning("Checkpoint step %d in %s is corrupt or incomplete (%s: %s); falling back to the "
                        "previous step.", step, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
        self._set_aside(step)
        continue
      return step, state, data
    return None

  def _set_aside(self, step: int) -> None:
    """Moves a bad step out of the manager's directory, so later saves of the same step number succeed."""
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      target_dir = self.directory + ".corrupt"
      os.makedirs(target_dir, exist_ok=True)
      target = os.path.join(target_dir, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)
      if os.path.exists(source):
        shutil.move(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
