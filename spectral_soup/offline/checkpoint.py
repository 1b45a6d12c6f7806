"""Orbax checkpoints of the train state and the data-iterator position, with fallback past corrupt steps.

A step directory holds two items: `state` (the train state pytree: step, trainable params, optimizer state, RNG)
and `data` (JSON: the input iterator's {"epoch", "position"} and anything else the loop needs to resume).

* Saves are asynchronous (the device-to-host copy blocks; writing happens in a background thread) and keep the
  last `max_to_keep` steps.
* Atomic: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a crash
  mid-save leaves a temporary directory that is never listed as a step (and is cleaned up on the next start).
* Every save also stores a fingerprint of each array (a position-weighted wrapping sum of its bits, computed on
  device) in the JSON item; a restore whose arrays do not match (a changed value in files that still read fine)
  counts as a corrupt step.
* Restores place every array directly into its target sharding (restore arguments from `jax.eval_shape` of the
  state plus the shardings), so nothing is gathered on one host.
* `restore_latest` tries steps newest first: a step that fails to restore (a truncated or deleted file) is moved
  aside to `<directory>.corrupt/<step>` with a warning and the previous step is tried. When one array read fails,
  the step's other reads are cancelled and awaited before Orbax closes its event loop (`_cancel_reads_on_failure`);
  left pending on a closed loop, each later printed "Exception ignored in <coroutine ...>" and "Event loop is
  closed" tracebacks wherever the garbage collector or TensorStore's threads next reached them.
* A step that reads fine but does not fit (another config: other K, other model shape) is not corrupt: before any
  array is read, the caller's `check_data` sees the step's JSON item and the saved shapes are compared with the
  abstract state; either raises (`CheckpointMismatchError` names the first arrays that differ) and nothing is
  moved aside.
* A save that fails (a full disk, a lost file system) raises `CheckpointSaveError` naming the step, the directory
  and the cause, at the `save` or `wait` that follows it (asynchronous writes fail in the background). Older steps
  are only deleted (`max_to_keep`) after a newer one is committed, so they are never lost to a failed save.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from spectral_soup.utils import errors


class CheckpointMismatchError(ValueError):
  """A checkpoint step is readable but holds other shapes than the state being restored (another config)."""


class CheckpointSaveError(OSError):
  """Writing a checkpoint step failed; the message names the step, the directory and the cause."""


class FingerprintMismatchError(ValueError):
  """A step's arrays read back differently from what was saved (a corrupt step)."""


def _path_name(path: Tuple[Any, ...]) -> str:
  """'params.heads.a' for a pytree key path (dict keys, sequence indices and attribute names alike)."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _shapes(tree: Any) -> Dict[str, Tuple[Tuple[int, ...], str]]:
  """{path name: (shape, dtype name)} of every array leaf (jax.Array, ShapeDtypeStruct or Orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): (tuple(leaf.shape), str(getattr(leaf, "dtype", "?"))) for path, leaf in leaves}


FINGERPRINTS = "array_fingerprints"  # Key of the fingerprints in the JSON item.


@jax.jit
def _bit_sums(arrays: Tuple[jax.Array, ...]) -> Tuple[jax.Array, ...]:
  """Arrays of any shape and dtype -> uint32 scalars: sum_i w_i * bits_i mod 2^32 over each array's elements read
  as unsigned words, with odd weights w_i = 2 i + 1 (i: the flat index). An odd weight is invertible mod 2^32, so
  changing any one element always changes the sum; the weights also make it depend on the order of elements."""

  def one(x):
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    width = jnp.dtype(x.dtype).itemsize
    if width >= 4:  # 8-byte types become [..., 2] uint32.
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
      bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[width]).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)  # Flat index from per-axis iotas: no reshape of sharded data.
    for axis, size in enumerate(bits.shape):
      index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)

  return tuple(one(x) for x in arrays)


def fingerprints(state: Any) -> Dict[str, int]:
  """{array path: its `_bit_sums` fingerprint}: changes if any one element changes (not a secure hash).

  One compiled call per set of devices the arrays live on (a jitted call needs its arrays on the same devices).
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  groups: Dict[Any, list] = {}
  for index, (_, leaf) in enumerate(leaves):
    sharding = getattr(leaf, "sharding", None)
    devices = tuple(sorted(d.id for d in sharding.device_set)) if sharding is not None else ()
    groups.setdefault(devices, []).append(index)
  sums = {}
  for indices in groups.values():
    for index, value in zip(indices, jax.device_get(_bit_sums(tuple(leaves[i][1] for i in indices)))):
      sums[_path_name(leaves[index][0])] = int(value)
  return sums


class Checkpointer:
  """Train-state + iterator-state checkpoints in `directory` (see the module docstring)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1, async_save: bool = True,
               remove_partial_steps: bool = True):
    """remove_partial_steps: delete a crashed run's unfinished steps (in the background, awaited by the first
    save). False for a Checkpointer that only reads: two of them deleting the same step race each other."""
    self.directory = os.path.abspath(directory)
    if remove_partial_steps and jax.process_index() == 0:  # Orbax says so at INFO only, which the CLIs hide.
      partial = sorted(name for name in (os.listdir(self.directory) if os.path.isdir(self.directory) else ())
                       if ".orbax-checkpoint-tmp" in name)
      if partial:
        logging.warning(
            "%s: %d step(s) left half-written by an interrupted save (%s) are ignored and removed; the "
            "run resumes from the newest complete step.", self.directory, len(partial), ", ".join(partial))
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # Multiples of the interval (plus forced saves); no "initial" save at the first step.
        save_decision_policy=policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(save_interval_steps),
             policies.PreemptionCheckpointingPolicy()]),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=remove_partial_steps,  # Partial saves of a crashed run.
        create=True)
    # Handlers given up front (not learned from the first save or restore): the metadata of a step written by
    # another process can be read before anything is restored.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler()
        })
    self._pending_step: Optional[int] = None  # The newest save started and not yet known to be committed.

  def all_steps(self):
    return list(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data: Mapping[str, Any], *, force: bool = False) -> bool:
    """Starts saving `state` (a pytree of jax.Arrays) and `data` (JSON) at `step` if due (or `force`d).

    Raises CheckpointSaveError if the previous asynchronous save failed or this one cannot start.
    """
    if not force and not self.manager.should_save(step):
      return False
    self.wait()  # What Orbax does first anyway; here a failure is reported as the previous step's.
    data = {**data, FINGERPRINTS: fingerprints(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except  (any write failure: name the step and the cause)
      raise self._save_error(step, e) from e
    if saved:
      self._pending_step = step
    return saved

  def _save_error(self, step: Optional[int], error: BaseException) -> CheckpointSaveError:
    cause = error
    while not isinstance(cause, OSError) and cause.__cause__ is not None:
      cause = cause.__cause__
    code = cause.errno if isinstance(cause, OSError) else None
    self.manager.reload()  # Its in-memory list may already have dropped steps that the failed save would retire.
    kept = [s for s in self.all_steps() if s != step]
    what = f"step {step}" if step is not None else "a step"
    return CheckpointSaveError(
        code, f"Saving checkpoint {what} in {self.directory} failed ({type(error).__name__}: "
        f"{errors.summary(error)}). Earlier steps {kept} are untouched; the "
        f"partial step is removed on the next start. Free space (or fix the file system) and run the same "
        f"command again to resume from step {max(kept) if kept else 0}.")

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
    """(state, data) of `step`; `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set.

    Raises FingerprintMismatchError (a ValueError) if the arrays do not match the fingerprints saved with them.
    """
    state, data = self._read(step, abstract_state)
    self._verify(state, data)
    return state, data

  def _read(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    with _cancel_reads_on_failure():
      restored = self.manager.restore(step, args=args)
    return restored["state"], dict(restored["data"])

  @staticmethod
  def _verify(state: Any, data: dict) -> None:
    """Pops the fingerprints from `data`; raises FingerprintMismatchError if `state` does not match them."""
    expected = data.pop(FINGERPRINTS, None)
    if expected is not None:
      got = fingerprints(state)  # A failure to compute them is a bug, not a corrupt step: it propagates.
      bad = sorted(name for name in expected if got.get(name) != expected[name])
      if bad:
        raise FingerprintMismatchError(f"the restored arrays {bad[:3]} do not match the fingerprints saved with them")

  def read_data(self, step: int) -> dict:
    """The JSON item of `step` alone (no array is read), without the fingerprints."""
    restored = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    return {k: v for k, v in restored["data"].items() if k != FINGERPRINTS}

  def _check_fits(self, step: int, saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    """Raises CheckpointMismatchError naming the first arrays whose path, shape or dtype differ."""
    problems = []
    for name in sorted(set(saved) | set(wanted)):
      if name not in saved:
        problems.append(f"{name} is missing from the checkpoint (expected shape {wanted[name][0]})")
      elif name not in wanted:
        problems.append(f"{name} (shape {saved[name][0]}) is in the checkpoint but not in this state")
      elif saved[name] != wanted[name]:
        problems.append(f"{name} has shape {saved[name][0]} {saved[name][1]} in the checkpoint but "
                        f"{wanted[name][0]} {wanted[name][1]} here")
    if problems:
      more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
      raise CheckpointMismatchError(
          f"Checkpoint step {step} in {self.directory} does not fit this configuration: "
          f"{'; '.join(problems[:3])}{more}. It was written with another config (number of bases, basis kind "
          f"or rank, model shape); run with that config, or use a new directory.")

  def restore_latest(self, abstract_state: Any,
                     check_data: Optional[Callable[[int, dict], None]] = None) -> Optional[Tuple[int, Any, dict]]:
    """(step, state, data) of the newest step that restores, or None if there is none.

    For each step, newest first: its JSON item and array metadata are read, `check_data(step, data)` is called
    (it may raise, e.g. on a config mismatch), the saved shapes are compared with `abstract_state`
    (CheckpointMismatchError), then the arrays are restored. Those errors propagate; a step that cannot be read is
    moved aside (process 0) to `<directory>.corrupt/<step>` with a warning and the previous step is tried.
    """
    wanted = _shapes(abstract_state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        data = self.read_data(step)
        saved = _shapes(self.manager.item_metadata(step)["state"])
        if not saved:
          raise ValueError("the state's array metadata is missing")
      except Exception as e:  # pylint: disable=broad-except  (any read failure means "unusable step")
        self._corrupt(step, e)
        continue
      if check_data is not None:
        check_data(step, data)
      self._check_fits(step, saved, wanted)
      try:
        state, data = self._read(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        self._corrupt(step, e)
        continue
      try:
        self._verify(state, data)
      except FingerprintMismatchError as e:
        self._corrupt(step, e)
        continue
      return step, state, data
    return None

  def _corrupt(self, step: int, error: BaseException) -> None:
    logging.warning("Checkpoint step %d in %s is corrupt or incomplete (%s: %s); falling back to the previous "
                    "step.", step, self.directory,
                    type(error).__name__, errors.summary(error))
    self._set_aside(step)

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
    """Blocks until pending asynchronous saves are committed; CheckpointSaveError if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._pending_step = self._pending_step, None
      raise self._save_error(step, e) from e
    self._pending_step = None

  def close(self) -> None:
    self.manager.close()


def _run_cancelling_pending(coro):
  """Orbax's `_run_sync_via_new_loop`, plus: if `coro` fails, the loop's other tasks are cancelled and awaited."""
  loop = asyncio.new_event_loop()
  cancelled = False
  try:
    asyncio.set_event_loop(loop)
    try:
      return loop.run_until_complete(coro)
    except BaseException:
      pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
      for task in pending:
        task.cancel()
      if pending:
        cancelled = True
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
      raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()
    if cancelled:  # A cancelled read's TensorStore future may still complete, from its own thread, into this loop:
      loop.call_soon_threadsafe = lambda *args, **kwargs: None  # dropped, not an "Event loop is closed" traceback.


@contextlib.contextmanager
def _cancel_reads_on_failure():
  """While restoring: a failed restore cancels the array reads still in flight instead of abandoning them.

  Orbax (0.12) runs a restore's reads as tasks of a fresh event loop and closes the loop as soon as the first read
  fails, leaving the others pending, each holding a TensorStore future. Whenever that future completed or the
  garbage collector reached the task (later, in unrelated code), Python printed "Event loop is closed" and
  "Exception ignored in <coroutine _read_array_index_and_device_put>" with a full TensorStore spec. Cancelling and
  awaiting them before the loop closes ends each one cleanly. Where Orbax's runner is not there (another version),
  restores run as they are.
  """
  try:
    from orbax.checkpoint._src import asyncio_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    asyncio_utils = None
  if asyncio_utils is None or not callable(getattr(asyncio_utils, "_run_sync_via_new_loop", None)):
    yield
    return
  original = asyncio_utils._run_sync_via_new_loop  # pylint: disable=protected-access
  asyncio_utils._run_sync_via_new_loop = _run_cancelling_pending  # pylint: disable=protected-access
  try:
    yield
  finally:
    asyncio_utils._run_sync_via_new_loop = original  # pylint: disable=protected-access


def save_debug_step(directory: str, state: Any, host_batch: Mapping[str, np.ndarray], metrics: Mapping[str,
                                                                                                       Any]) -> str:
  """Writes what reproduces one training step to `directory` (all hosts call it); returns the directory.

  `state/`: the state (an Orbax checkpoint of the pytree, restorable with `ocp.StandardCheckpointer`);
  `batch_process<i>.npz`: host i's rows of the batch; `metrics.json`: the step's metrics (NaN kept as NaN).
  """
  directory = os.path.abspath(directory)
  state_dir = os.path.join(directory, "state")
  if jax.process_index() == 0 and os.path.exists(state_dir):  # A previous run stopped at the same step.
    shutil.rmtree(state_dir)
  os.makedirs(directory, exist_ok=True)
  np.savez(os.path.join(directory, f"batch_process{jax.process_index()}.npz"), **{
      name: np.asarray(value) for name, value in host_batch.items()
  })
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(state_dir, state)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, "metrics.json"), "w") as f:
      json.dump({name: np.asarray(value).tolist() for name, value in metrics.items()}, f, indent=1)
  return directory
