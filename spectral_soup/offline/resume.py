"""The config values a checkpoint must share with the run that resumes it (`resume_fields`, saved with every
checkpoint), and the checks that stop a run naming the first one that differs, before it reads or writes anything.

Also what kind of run a workdir holds (`workdir_kind`: a basis training's, the main job's, another tool's), so that
one job does not write into, or resume from, another's workdir; and `config_differences` between a workdir's
recorded config.json and a new config, field by field.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np

from spectral_soup.offline import checkpoint as checkpoint_lib
from spectral_soup.offline import sources
from spectral_soup.utils import files


def resume_fields(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The config values a checkpoint must share with the run that resumes it, saved with every checkpoint.

  The data order (batch size, seed), what the state's arrays mean: the bases (kind, K, their ranks, the heads'
  vocabulary support) and the backbone they sit on (a checkpoint path, or the random backbone's architecture, drawn
  from `seed`; its storage and compute dtypes), what they
  are trained on: every `data.*` field (the pairs, their attributes in basis order, their tokenization) and every
  `loss.*` field (the objective), and how: every `optim.*` field (the optimizer and its schedule; `train.num_steps`
  may grow, which stretches the schedule's decay).
  """
  c = config
  names = ["train.batch_size", "seed", "basis.kind", "basis.num_bases", "model.path", "model.weight_dtype"]
  names += ["model.dtype"] if "dtype" in c.model else []  # The steps' compute dtype (config.json records one).
  names += (["basis.head_rank", "basis.feature_dim"]
            if c.basis.kind == "heads" else ["basis.lora_rank", "basis.lora_targets"])
  if c.basis.kind == "heads" and "vocab_support" in c.basis:  # The heads' zero columns outside it are the state.
    names += ["basis.vocab_support"]
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
    fields[name] = value
  if c.basis.kind == "heads":
    fields["basis.logit_bias"] = bool(c.basis.get("logit_bias", False))
  for section in ("data", "loss", "optim"):
    if section in c:
      fields.update(flatten(json.loads(c[section].to_json_best_effort()), f"{section}."))
  for name in PATH_FIELDS:  # Where they lie from here (a resume from another directory then names the change).
    if name in fields:
      fields[name] = _resolved(name, fields[name])
  return {name: list(v) if isinstance(v, tuple) else v for name, v in fields.items()}  # As it reads back from JSON.


# Config fields that hold paths: a run records them absolute (`with_absolute_paths`), and a resume compares them so.
PATH_FIELDS = ("model.path", "data.tokenizer", "data.source", "data.data_dir", "data.manual_dir")


def _resolved(field: str, value: Any) -> Any:
  """A PATH_FIELDS value made absolute if it names something that exists from here; a source's name ("synthetic",
  "ultrafeedback", ...) stays a name even beside a file of that name."""
  if field == "data.source" and value in ("synthetic", "embedded") + sources.BUILDER_SOURCES:
    return value
  return files.absolute_if_exists(value)


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose PATH_FIELDS are absolute where they name something that exists from here: what a run
  records in its config.json, so that serving it from another directory finds the same backbone and tokenizer."""
  config = config.copy_and_resolve_references()
  for field in PATH_FIELDS:
    section, name = field.split(".")
    if section in config and name in config[section]:
      config[section][name] = _resolved(field, config[section][name])
  return config


# Resume fields added after checkpoints were first written, with the value every older checkpoint was made with
# (basis.logit_bias was recorded only when True). Other fields an older checkpoint lacks are not checked.
_RESUME_FIELD_DEFAULTS = {"basis.init_features": "pair_surprise", "basis.logit_bias": False}

# Elements of each backbone tensor that `weights_fingerprint` reads (evenly strided), beside its name, dtype and shape.
_FINGERPRINT_SAMPLES = 4_096


def weights_fingerprint(tree: Any) -> str:
  """A hash of a backbone's tensors (their names, dtypes, shapes and an even stride of their values): saved with each
  checkpoint of a run on a loaded backbone, so that a resume on other weights at the same `model.path` (a checkpoint
  replaced in place) is refused. Reads a few thousand values per tensor, not the whole model."""
  digest = hashlib.blake2b(digest_size=16)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    value = np.asarray(leaf)
    flat = value.reshape(-1)
    digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype.str}:{value.shape};".encode())
    digest.update(np.ascontiguousarray(flat[::max(1, flat.size // _FINGERPRINT_SAMPLES)]).tobytes())
  return digest.hexdigest()


def check_resume(config: ml_collections.ConfigDict, workdir: str, step: int, saved: Mapping[str, Any], *,
                 pairs_fingerprint: Optional[str] = None, backbone_fingerprint: Optional[str] = None) -> None:
  """Raises ValueError naming the first `resume_fields` value that differs from checkpoint `step`'s data, or (with
  `pairs_fingerprint`, once the pairs are read) when the checkpoint was trained on other pairs."""
  for field, value in resume_fields(config).items():
    if field not in saved and field not in _RESUME_FIELD_DEFAULTS:  # Older checkpoints lack it: not checked.
      continue
    stored = saved.get(field, _RESUME_FIELD_DEFAULTS.get(field))
    if field in PATH_FIELDS:  # A relative path and its absolute form (recorded by a run from here) are one path.
      stored, value = _resolved(field, stored), _resolved(field, value)
    if stored != value:
      if field in ("train.batch_size", "seed"):
        why = "the data order would not continue"
      elif field.startswith("data."):
        why = "the checkpoint's bases were trained on other pairs (or other attributes, in another order)"
      elif field.startswith("loss."):
        why = "the checkpoint's bases were trained with another objective"
      elif field.startswith("optim."):
        why = ("the checkpoint's steps were taken by another optimizer or schedule (config.json would then describe "
               "them wrongly)")
      else:
        why = "the checkpoint holds other bases or another backbone"
      raise ValueError(f"config.{field}={value!r} differs from {stored!r} in the checkpoint of step {step} in "
                       f"{workdir}: {why}. Use the same value or a new --workdir.")
  saved_pairs = saved.get("pairs_fingerprint")
  if pairs_fingerprint is not None and saved_pairs is not None and saved_pairs != pairs_fingerprint:
    raise ValueError(f"the training or evaluation pairs differ from those the checkpoint of step {step} in {workdir} "
                     f"was trained on (config.data.source={config.data.source!r} read or tokenized differently: its "
                     "content or the tokenizer changed with the same config): resuming would train its bases on a "
                     "mix. Use the same data or a new --workdir.")
  saved_backbone = saved.get("backbone_fingerprint")
  if backbone_fingerprint is not None and saved_backbone is not None and saved_backbone != backbone_fingerprint:
    raise ValueError(f"the backbone at config.model.path={config.model.path!r} is not the one the checkpoint of step "
                     f"{step} in {workdir} was trained on (its weights changed at the same path): its bases belong to "
                     "the other backbone. Use that backbone or a new --workdir.")
  if step > config.train.num_steps:
    raise ValueError(f"config.train.num_steps={config.train.num_steps} is below step {step} of the checkpoint in "
                     f"{workdir}: its bases are trained further than asked. Use train.num_steps >= {step} or a new "
                     "--workdir.")


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


# What `workdir_kind` returns.
BASIS_TRAINING = "basis training"  # checkpoints/ at the top: experiments.train_basis, or a main job's basis/.
MAIN_JOB = "main job"  # experiments.main: config.json with users and online sections, the bases in basis/.
OTHER = "other"  # A config.json that no job of this package would write there.
# The sections only a main-job config has (a basis training's config has none of them).
MAIN_JOB_SECTIONS = ("users", "online", "eval")
BASIS_TRAINING_SECTIONS = ("basis", "model", "data", "train", "optim", "loss")


def read_config_json(path: str) -> Dict[str, Any]:
  """The JSON object in `path` (a run's config.json); ValueError naming the file if it is not one."""
  return files.read_json_object(path, "a run's config")


def workdir_kind(workdir: str) -> Optional[str]:
  """What run `workdir` holds: BASIS_TRAINING, MAIN_JOB, OTHER, or None (missing, empty, or no run's files).

  Decided from its top level only, reading nothing but config.json: `checkpoints/` (or metrics.jsonl) marks a basis
  training, a config.json with the main job's sections (or a `basis/` with checkpoints) a main job's workdir.
  """
  path = lambda *names: os.path.join(workdir, *names)
  if not os.path.isdir(workdir):
    return None
  if os.path.isdir(path("checkpoints")) or os.path.isfile(path("metrics.jsonl")):
    return BASIS_TRAINING
  if os.path.lexists(path("config.json")):
    try:
      config = read_config_json(path("config.json"))
    except ValueError:
      return OTHER
    if all(isinstance(config.get(s), dict) for s in MAIN_JOB_SECTIONS):
      return MAIN_JOB
    # A basis training stopped before its first checkpoint or log line leaves only its config.json.
    return BASIS_TRAINING if all(isinstance(config.get(s), dict) for s in BASIS_TRAINING_SECTIONS) else OTHER
  if os.path.isdir(path("basis", "checkpoints")):
    return MAIN_JOB
  return None


def check_not_main_job_workdir(workdir: str) -> None:
  """For a basis training: raises ValueError if `workdir` holds a main job's run (its config.json and basis/), or a
  config.json that no basis training wrote (a Hugging Face checkpoint given as --workdir, another tool's run): the
  training would write its own config.json over it."""
  kind = workdir_kind(workdir)
  if kind == MAIN_JOB:
    raise ValueError(f"--workdir={workdir} holds a run of the main job (experiments.main: a config.json with the "
                     "users / online / eval sections, or basis/checkpoints/): expected a basis training's workdir or a "
                     "fresh one.")
  if kind == OTHER:
    raise ValueError(f"--workdir={workdir} holds a config.json that no basis training wrote (no "
                     f"{' / '.join(BASIS_TRAINING_SECTIONS)} sections): expected a basis training's workdir or a "
                     "fresh one (the training writes its own config.json there).")


def flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a.b": value} for every leaf of a nested dict (a config as read back from config.json)."""
  out = {}
  for name, value in config.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = value
  return out


class _Missing:
  """The value of a field that a config does not have (`config_differences`)."""

  def __repr__(self) -> str:
    return "(not set)"


MISSING = _Missing()


def config_differences(saved: Mapping[str, Any], config: Mapping[str, Any],
                       recomputed: Callable[[str], bool]) -> List[Tuple[str, Any, Any]]:
  """(field, value in `saved`, value in `config`) for every field whose values differ, both as JSON dicts (the
  ConfigDict's `to_json_best_effort`), except the fields `recomputed(field)` says every run recomputes. A field that
  only one of them has differs (its value in the other is MISSING): a new field is state-changing until it is known
  not to be."""
  old, new = flatten(saved), flatten(config)
  fields = list(new) + [f for f in old if f not in new]  # In the config's order.
  return [(f, old.get(f, MISSING), new.get(f, MISSING))
          for f in fields
          if not recomputed(f) and old.get(f, MISSING) != new.get(f, MISSING)]
