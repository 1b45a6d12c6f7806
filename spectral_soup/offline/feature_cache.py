"""The frozen feature pass over whole pair sets, run once before training and cached on disk.

Head bases train on cached features (`config.train.cache_features`, `features.py`): `add_cached_features` runs the
frozen backbone over the train and eval pairs (`make_feature_fn`, `compute_features`) and stores the result in
`features-<hash>.npz` (`features_path`: the hash covers the model, its dtypes, the code that computes the features,
the pairs' tokens and the vocabulary support) under `config.train.features_dir` or the workdir, where a restarted
run, `experiments.attribute_learnability` and `experiments.compare_ridge_fits` find it (`load_features`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from spectral_soup.models import embedded as embedded_model
from spectral_soup.models import hf_import
from spectral_soup.models.spectral import SpectralPolicy
from spectral_soup.offline import features
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import mesh as mesh_lib
from spectral_soup.utils import files
from spectral_soup.utils import progress
from spectral_soup.utils import reductions


def add_cached_features(config: ml_collections.ConfigDict, workdir: str, policy: SpectralPolicy, mesh,
                        backbone_shardings: Any, backbone: Any, train_pairs: Dict[str, np.ndarray],
                        eval_pairs: Dict[str, np.ndarray],
                        support: Optional[np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """(train, eval) pairs with their cached features, from the stored file if there is one, else computed (and
  stored by process 0); computed pairs lose their prompts (`compute_features`)."""
  feature_fn = make_feature_fn(policy, mesh, backbone_shardings, support)
  features_dir = config.train.get("features_dir", "") or workdir
  os.makedirs(features_dir, exist_ok=True)
  path = features_path(config, features_dir, train_pairs, eval_pairs, support)
  if os.path.realpath(features_dir) == os.path.realpath(workdir) and jax.process_index() == 0:
    # A killed feature pass's partial file (the caller holds the workdir's lock; a shared features_dir may have
    # live writers, so its leftovers are kept).
    for tmp in files.remove_stale_temps(features_dir, [os.path.basename(path)]):
      logging.info("Removed %s, left by an interrupted feature pass.", tmp)
  stored = load_features(path, {"train": len(train_pairs["prompt"]), "eval": len(eval_pairs["prompt"])})
  if stored is not None:  # A restarted job skips the frozen pass (and drops the prompts, as computing does).
    logging.info("Reusing the cached features in %s.", path)
    drop = lambda pairs: {k: v for k, v in pairs.items() if not k.startswith("prompt")}
    return {**drop(train_pairs), **stored["train"]}, {**drop(eval_pairs), **stored["eval"]}
  train_pairs = compute_features(feature_fn, backbone, train_pairs, mesh, config.train.feature_batch_size,
                                 desc="features (train)")
  if len(eval_pairs["prompt"]):
    eval_pairs = compute_features(feature_fn, backbone, eval_pairs, mesh, config.train.feature_batch_size,
                                  desc="features (eval)")
  if jax.process_index() == 0:
    save_features(path, train_pairs, eval_pairs)
  return train_pairs, eval_pairs


def make_feature_fn(policy: SpectralPolicy, mesh, backbone_shardings: Any, support: Optional[np.ndarray] = None):
  """The jitted frozen feature pass `(backbone, token batch [B, ...]) -> features.pair_features(...)`."""
  batch_shardings = {f: mesh_lib.batch_sharding(mesh, 2) for f in input_pipeline.TOKEN_FIELDS}
  return jax.jit(functools.partial(features.pair_features, policy, support=support),
                 in_shardings=(backbone_shardings, batch_shardings))


def compute_features(feature_fn, backbone: Any, arrays: Mapping[str, np.ndarray], mesh, batch_size: int,
                     desc: str = "features") -> Dict[str, np.ndarray]:
  """The frozen feature pass over a whole pair set: returns `arrays` without the prompts, plus cached features.

  Runs `feature_fn` (from `make_feature_fn`) on batches of `batch_size` pairs split over the mesh's batch axes;
  every host receives all features (any host may draw any row later).
  """
  fields = input_pipeline.TOKEN_FIELDS
  n = len(arrays["prompt"])
  per_host = batch_size // jax.process_count()
  chunks = []
  for start in progress.track(range(0, n, batch_size), desc=desc, unit="batch", total=math.ceil(n / batch_size)):
    stop = min(start + batch_size, n)
    rows = np.arange(start, start + batch_size) % n  # The last batch wraps around; the extra rows are dropped.
    rows = rows[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
    batch = mesh_lib.shard_batch({f: arrays[f][rows] for f in fields}, mesh)
    out = feature_fn(backbone, batch)
    chunks.append({
        name: multihost_utils.process_allgather(value, tiled=True)[:stop - start] for name, value in out.items()
    })
  cached = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
  kept = {name: value for name, value in arrays.items() if not name.startswith("prompt")}
  return {**kept, **cached}


def code_files() -> list:
  """The source files of the code that computes the features: the model package, `offline/features.py`, the
  vocabulary-wide reductions they call (`utils/reductions.py`) and the package's XLA CPU settings (`_xla_cpu.py`,
  which decide which fusions compile)."""
  models_dir = os.path.dirname(os.path.abspath(inspect.getfile(SpectralPolicy)))
  sources = sorted(os.path.join(models_dir, f) for f in os.listdir(models_dir) if f.endswith(".py"))
  package_dir = os.path.dirname(models_dir)
  return sources + [
      os.path.abspath(features.__file__),
      os.path.abspath(reductions.__file__),
      os.path.join(package_dir, "_xla_cpu.py")
  ]


def _compiler_identity() -> list:
  """What else decides the compiled numbers: the jax / jaxlib versions, the backend and the XLA flags."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  return [
      jax.__version__,
      getattr(jaxlib, "__version__", ""),
      jax.default_backend(),
      os.environ.get("XLA_FLAGS", ""),
      os.environ.get("SPECTRAL_SOUP_XLA_DEFAULTS", "")
  ]


def source_digest(paths) -> str:
  """sha256 over the files' names and contents."""
  h = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      h.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
  return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
  """`source_digest` of `code_files()`: features cached by another version of that code (a fixed attention, another
  norm) are not reused."""
  return source_digest(code_files())


def features_path(config: ml_collections.ConfigDict, directory: str, train_pairs: Mapping[str, np.ndarray],
                  eval_pairs: Mapping[str, np.ndarray], support: Optional[np.ndarray]) -> str:
  """`<directory>/features-<hash>.npz`, the hash of everything the cached features depend on: the model (every
  `model.*` field: a random backbone's architecture and, with `seed`, its weights; a checkpoint's file contents,
  `files.content_digest`, the embedded model's GGUF file included), the code and compiler that compute them
  (`code_digest`, `_compiler_identity`), the pairs' tokens (with their shapes), the support (its ids' values)."""
  h = hashlib.sha256()
  model = json.loads(config.model.to_json_best_effort())
  path = config.model.path
  prefix = hf_import.EMBEDDED_PREFIX
  name = path[len(prefix):] if isinstance(path, str) and path.startswith(prefix) else None
  if name in embedded_model.EMBEDDED_MODELS:  # Its weights are a file inside an installed package.
    path = embedded_model.EMBEDDED_MODELS[name]()
  h.update(
      json.dumps([
          model, config.seed if not config.model.path else 0,
          files.content_digest(path),
          code_digest(),
          _compiler_identity()
      ]).encode())
  for pairs in (train_pairs, eval_pairs):
    for name in input_pipeline.TOKEN_FIELDS:  # Framed: the same bytes in another shape are other pairs.
      array = np.ascontiguousarray(pairs[name])
      h.update(f"{name}:{array.shape}:{array.dtype.str}".encode() + b"\0" + array.tobytes())
  if support is not None:
    h.update(b"support\0" + np.asarray(support, np.int64).tobytes())  # int32 or int64 ids: one key.
  return os.path.join(directory, f"features-{h.hexdigest()[:16]}.npz")


def save_features(path: str, train_pairs: Mapping[str, np.ndarray], eval_pairs: Mapping[str, np.ndarray]) -> None:
  """Writes the cached features atomically (temporary file, then rename)."""
  names = set(features.CACHED_FIELDS) | set(features.SUPPORT_FIELDS)
  files.write_npz_atomic(
      path, **{
          f"{split}/{k}": v
          for split, pairs in (("train", train_pairs), ("eval", eval_pairs)) for k, v in pairs.items() if k in names
      })


def load_features(path: str, rows: Optional[Mapping[str, int]] = None) -> Optional[Dict[str, Dict[str, np.ndarray]]]:
  """{"train": {...}, "eval": {...}} from `save_features`, or None if absent or unreadable (then moved aside).

  rows: {"train": N, "eval": M}, the pairs the features are for: a file whose splits lack a cached field (of a split
  with pairs) or hold another number of rows is unreadable too (it was merged with the pairs as it was).
  """
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as data:
      out = {"train": {}, "eval": {}}
      for key in data.files:
        split, name = key.split("/", 1)
        out[split][name] = data[key]
    for split, count in (rows or {}).items():
      missing = sorted(set(features.CACHED_FIELDS) - set(out[split])) if count else []
      if missing:
        raise ValueError(f"its {split} split has no {missing[0]!r}")
      other = [name for name, value in out[split].items() if len(value) != count]
      if other:
        raise ValueError(f"its {split} {other[0]!r} has {len(out[split][other[0]])} rows for {count} pairs")
    return out
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    aside = f"{path}.unreadable"
    try:
      os.replace(path, aside)  # Out of the way: the recomputed features are written under the same name.
    except OSError:
      aside = "(could not be moved)"
    logging.warning("Cached features %s are unreadable (%s: %s); moved to %s, recomputing.", path,
                    type(e).__name__, e, aside)
    return None
