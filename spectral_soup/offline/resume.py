"""The config values a checkpoint must share with the run that resumes it (`resume_fields`, saved with every
checkpoint), and the checks that stop a run naming the first one that differs, before it reads or writes anything.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import ml_collections

from spectral_soup.offline import checkpoint as checkpoint_lib


def resume_fields(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The config values a checkpoint must share with the run that resumes it, saved with every checkpoint.

  The data order (batch size, seed) and what the state's arrays mean: the bases (kind, K, their ranks) and the
  backbone they sit on (a checkpoint path, or the random backbone's architecture, drawn from `seed`).
  """
  c = config
  names = ["train.batch_size", "seed", "basis.kind", "basis.num_bases", "model.path", "model.weight_dtype"]
  names += (["basis.head_rank", "basis.feature_dim"]
            if c.basis.kind == "heads" else ["basis.lora_rank", "basis.lora_targets"])
  if c.basis.kind == "heads" and c.basis.get("logit_bias", False):
    names.append("basis.logit_bias")
  if c.basis.get("init", "zeros") == "ridge":  # Where the state started (the state itself when num_steps = 0).
    names += ["basis.init", "basis.init_l2"] + (["basis.init_features"] if "init_features" in c.basis else [])
  if not c.model.path:
    names += [
        f"model.{f}" for f in ("family", "vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
                               "head_dim", "mlp_dim")
    ]
  fields = {}
  for name in names:
    value = c
    for part in name.split("."):
      value = value[part]
    fields[name] = list(value) if isinstance(value, (tuple, list)) else value  # As it reads back from JSON.
  return fields


# Resume fields added after checkpoints were first written, with the value every older checkpoint was made with.
_RESUME_FIELD_DEFAULTS = {"basis.init_features": "pair_surprise"}


def check_resume(config: ml_collections.ConfigDict, workdir: str, step: int, saved: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first `resume_fields` value that differs from checkpoint `step`'s data."""
  for field, value in resume_fields(config).items():
    if field not in saved and field not in _RESUME_FIELD_DEFAULTS:  # Older checkpoints lack it: not checked.
      continue
    stored = saved.get(field, _RESUME_FIELD_DEFAULTS.get(field))
    if stored != value:
      why = ("the data order would not continue"
             if field in ("train.batch_size", "seed") else "the checkpoint holds other bases or another backbone")
      raise ValueError(f"config.{field}={value!r} differs from {stored!r} in the checkpoint of step {step} in "
                       f"{workdir}: {why}. Use the same value or a new --workdir.")


def check_existing_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Before anything is written: the newest readable checkpoint in `workdir` must have been made by a compatible
  config (`check_resume`, which names the field). Unreadable steps are left for `restore_latest` to set aside."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=config.checkpoint.max_to_keep, save_interval_steps=1,
                                     async_save=False, remove_partial_steps=False)  # Reads only.
  try:
    for step in sorted(ckpt.all_steps(), reverse=True):
      try:
        data = ckpt.read_data(step)
      except Exception:  # pylint: disable=broad-except  (unreadable: `restore_latest` falls back past it)
        continue
      check_resume(config, workdir, step, data)
      return
  finally:
    ckpt.close()
