"""Training metrics: one JSON line per logged step in `<workdir>/metrics.jsonl`, and TensorBoard scalars.

A line is {"step": int, "kind": "train" | "eval", name: float | [K floats] | [[...]], ...}. Per-basis metrics
([K] arrays) stay lists in JSON and become one TensorBoard scalar per basis (`accuracy/basis_2`; a [K, J] array
gives `cross_accuracy/basis_2/0`). TensorBoard needs
`tensorboardX`; without it only the JSON lines are written (and that is logged once).

On resume from step s, lines after s (written by the interrupted run past its last checkpoint) and a line cut
short by a crash are dropped, by an atomic rewrite, so that the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging

FILENAME = "metrics.jsonl"


def _to_json(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    x = value.item()
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)
  return [_to_json(v) for v in value]


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` (and TensorBoard) from process 0 only."""

  def __init__(self, workdir: str, *, resume_step: Optional[int] = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, FILENAME)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      self._truncate_after(resume_step if resume_step is not None else -1)
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.info("tensorboardX is not installed: metrics go to %s only.", self.path)

  def _truncate_after(self, step: int) -> None:
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line if line.endswith("\n") else line + "\n")  # Cut right after its "}": complete it.
      except (ValueError, KeyError):
        continue  # A line cut short by a crash.
    # Atomic: a crash while rewriting leaves the old file, never a truncated one.
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind}
    record.update({name: _to_json(value) for name, value in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      prefix = "" if kind == "train" else f"{kind}/"
      for name, value in metrics.items():
        value = np.asarray(value, np.float64)
        if value.ndim == 0:
          self._tb.add_scalar(prefix + name, float(value), step)
        else:  # [K] -> name/basis_k; [K, J] -> name/basis_k/j.
          for index in np.ndindex(value.shape):
            suffix = "/".join([f"basis_{index[0]}", *map(str, index[1:])])
            self._tb.add_scalar(f"{prefix}{name}/{suffix}", float(value[index]), step)
      self._tb.flush()

  def has_record(self, step: int, kind: str) -> bool:
    """Whether metrics.jsonl already holds a `kind` record of `step` (e.g. a finished run's final evaluation, before
    its restart evaluates again); False on processes other than 0, which write nothing."""
    if not self.enabled or not os.path.exists(self.path):
      return False
    return any(r.get("step") == step for r in read_metrics(os.path.dirname(self.path), kind=kind))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, kind: Optional[str] = None) -> list:
  """The records of `<workdir>/metrics.jsonl` (optionally only those of one kind).

  A last line without its newline (a run killed while writing it) is skipped; any other bad line raises.
  """
  with open(os.path.join(workdir, FILENAME)) as f:
    lines = f.readlines()
  if lines and not lines[-1].endswith("\n"):
    logging.warning("Skipping the unfinished last line of %s (a run was killed while writing it).",
                    os.path.join(workdir, FILENAME))
    lines = lines[:-1]
  path = os.path.join(workdir, FILENAME)
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {number}: not a JSON object ({e.msg}); expected one metrics record per "
                       f"line, as the training loop writes them.") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}, line {number}: holds {type(record).__name__} {line.strip()[:40]!r}; expected a "
                       f"metrics record (a JSON object) per line.")
    records.append(record)
  return [r for r in records if kind is None or r.get("kind") == kind]
