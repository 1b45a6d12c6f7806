"""Shared machinery of the manual-source TFDS builders: row reading, validation, labels, splits.

Every builder in this package reads files that a person placed on disk (the `manual_dir`, or a `source_path` in the
builder config), writes `array_record` shards and is read back with `builder.as_data_source(split)`; no step needs
TensorFlow and nothing is downloaded.

Conventions shared by all pair datasets:

* `label[k]` is 1 when `response_a` is preferred under attribute `k`, 0 when `response_b` is, and -1 for a tie or
  a comparison that is not available.
* `mask[k]` is True when the comparison under attribute `k` is available (both ratings present). A tie is
  `label = -1, mask = True`; a missing rating ("N/A") is `label = -1, mask = False`.
* Scores of a missing rating are NaN: always select with `mask` before doing arithmetic on scores.

A malformed row raises `MalformedRowError` (a `ValueError`) naming the file, the 1-based row number (the line
number in a JSON-lines file, the element number in a JSON array) and the field; with `skip_malformed=True` in the
builder config the row is skipped instead, and the count is logged and stored in `info.metadata["malformed_rows"]`.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import sys
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "validation", "test")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_MAX_LOGGED_MESSAGES = 20

# ----------------------------------------------------------------------------------------------------------------
# Errors.


class MalformedRowError(ValueError):
  """A row of a source file is missing a field or has a field of the wrong type or value."""

  def __init__(self, path: str, row: int, field: str, problem: str):
    self.path = str(path)
    self.row = row
    self.field = field
    self.problem = problem
    super().__init__(f"{self.path}: row {row}: field '{field}': {problem}")

  def __reduce__(self):  # Picklable (e.g. across processes) despite the custom signature.
    return type(self), (self.path, self.row, self.field, self.problem)


class SourceNotFoundError(FileNotFoundError):
  """The manual directory or a file a builder needs is missing."""


def missing_source_message(dataset: str, expected: str, where: str, upstream: str) -> str:
  """The message of a `SourceNotFoundError`: what was expected, where it was looked for, where to get it."""
  return (f"{dataset}: {expected} not found in {where}. Get it from {upstream} and put it in the manual directory "
          f"(load_source(..., manual_dir=DIR) or DownloadConfig(manual_dir=DIR)), or set `source_path` in the "
          f"builder config.")


@dataclasses.dataclass(frozen=True)
class RowRef:
  """Where a row comes from, for error messages."""

  path: str
  number: int

  def error(self, field: str, problem: str) -> MalformedRowError:
    return MalformedRowError(self.path, self.number, field, problem)


class RowErrors:
  """Raises malformed-row errors, or (with `skip=True`) counts, logs and remembers them."""

  def __init__(self, skip: bool):
    self.skip = skip
    self.rows_read = 0  # Non-blank rows seen by `iter_json_rows`, malformed or not.
    self.count = 0
    self.by_file: collections.Counter = collections.Counter()
    self.messages: List[str] = []

  def handle(self, error: MalformedRowError) -> None:
    if not self.skip:
      raise error
    self.count += 1
    self.by_file[os.path.basename(error.path)] += 1
    if len(self.messages) < _MAX_LOGGED_MESSAGES:
      self.messages.append(str(error))
      logging.warning("Skipping malformed row: %s", error)

  def as_metadata(self) -> Dict[str, Any]:
    if self.count:
      logging.warning("Skipped %d malformed rows (%s).", self.count, dict(self.by_file))
    return {"count": self.count, "by_file": dict(self.by_file), "first_messages": list(self.messages)}


# ----------------------------------------------------------------------------------------------------------------
# Reading rows.


def _open_binary(path: epath.Path) -> io.BufferedIOBase:
  handle = path.open("rb")
  if path.name.endswith(".gz"):
    return gzip.GzipFile(fileobj=handle, mode="rb")
  return handle


def _first_byte(path: epath.Path) -> bytes:
  """The first non-whitespace byte of a (possibly gzipped) file, b'' if there is none."""
  with _open_binary(path) as handle:
    while chunk := handle.read(1 << 16):
      if chunk.strip():
        return chunk.lstrip()[:1]
  return b""


def iter_json_rows(path: epath.Path, errors: RowErrors) -> Iterator[Tuple[RowRef, Dict[str, Any]]]:
  """Yields `(RowRef, row)` for every JSON object in a JSON-lines or JSON-array file (optionally gzipped).

  JSON-lines files are streamed; a file starting with '[' is read whole as one array whose elements are the rows.
  Blank lines are skipped (but counted in row numbers). A line that is not valid JSON, or a row that is not a JSON
  object, goes to `errors` (field '<json>' or '<row>').
  """
  if _first_byte(path) == b"[":
    with _open_binary(path) as handle:
      try:
        rows = json.loads(handle.read())
      except ValueError as e:
        raise MalformedRowError(str(path), 1, "<json>", f"not a valid JSON array ({e})") from e
    if not isinstance(rows, list):
      raise MalformedRowError(str(path), 1, "<json>", f"expected a JSON array, got {type(rows).__name__}")
    for number, row in enumerate(rows, start=1):
      errors.rows_read += 1
      ref = RowRef(str(path), number)
      if not isinstance(row, dict):
        errors.handle(ref.error("<row>", f"expected a JSON object, got {type(row).__name__}"))
        continue
      yield ref, row
    return
  with _open_binary(path) as handle:
    for number, line in enumerate(handle, start=1):
      if not line.strip():
        continue
      errors.rows_read += 1
      ref = RowRef(str(path), number)
      try:
        row = json.loads(line)
      except ValueError as e:  # Includes UnicodeDecodeError.
        errors.handle(ref.error("<json>", f"not valid JSON ({e})"))
        continue
      if not isinstance(row, dict):
        errors.handle(ref.error("<row>", f"expected a JSON object, got {type(row).__name__}"))
        continue
      yield ref, row


def strip_json_suffix(name: str) -> str:
  """'sharegpt.jsonl.gz' -> 'sharegpt'."""
  for suffix in sorted(JSON_SUFFIXES, key=len, reverse=True):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def json_files(directory: epath.Path) -> List[epath.Path]:
  """The JSON / JSON-lines files (optionally gzipped) directly inside `directory`, sorted by name."""
  return sorted((p for p in directory.iterdir() if p.name.endswith(JSON_SUFFIXES) and p.is_file()),
                key=lambda p: p.name)


# ----------------------------------------------------------------------------------------------------------------
# Field accessors. `name` is the field's full name in error messages (e.g. "completions[2].response").


def require(row: Mapping[str, Any], key: str, ref: RowRef, name: Optional[str] = None) -> Any:
  if key not in row or row[key] is None:
    raise ref.error(name or key, "missing")
  return row[key]


def text(row: Mapping[str, Any], key: str, ref: RowRef, *, name: Optional[str] = None, allow_empty: bool = False,
         default: Optional[str] = None) -> str:
  """A string field; empty (or whitespace-only) strings are malformed unless `allow_empty`."""
  name = name or key
  if default is not None and (key not in row or row[key] is None):
    return default
  value = require(row, key, ref, name)
  if not isinstance(value, str):
    raise ref.error(name, f"expected a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise ref.error(name, "empty")
  return value


def number(value: Any, ref: RowRef, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
           integer: bool = False) -> float:
  """A finite JSON number (not a bool), optionally integral and within [low, high]."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ref.error(name, f"expected a number, got {type(value).__name__} {value!r}")
  value = float(value)
  if not math.isfinite(value):
    raise ref.error(name, f"not a finite number ({value})")
  if integer and value != int(value):
    raise ref.error(name, f"expected an integer, got {value}")
  if (low is not None and value < low) or (high is not None and value > high):
    raise ref.error(name, f"{value} is outside [{low}, {high}]")
  return value


def number_list(row: Mapping[str, Any], key: str, ref: RowRef, length: int) -> np.ndarray:
  """A list of `length` finite numbers, as float32."""
  value = require(row, key, ref)
  if not isinstance(value, list):
    raise ref.error(key, f"expected a list of {length} numbers, got {type(value).__name__}")
  if len(value) != length:
    raise ref.error(key, f"expected {length} numbers, got {len(value)}")
  return np.asarray([number(v, ref, f"{key}[{i}]") for i, v in enumerate(value)], np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Labels and splits.


def pair_labels(scores_a: np.ndarray, scores_b: np.ndarray, mask: Optional[np.ndarray] = None,
                tie_epsilon: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
  """Per-attribute labels (int8: 1 a preferred, 0 b preferred, -1 tie/missing) and the mask (bool)."""
  scores_a = np.asarray(scores_a, np.float32)
  scores_b = np.asarray(scores_b, np.float32)
  if mask is None:
    mask = np.isfinite(scores_a) & np.isfinite(scores_b)
  mask = np.asarray(mask, bool)
  with np.errstate(invalid="ignore"):
    diff = scores_a - scores_b
    label = np.where(diff > tie_epsilon, 1, np.where(diff < -tie_epsilon, 0, -1)).astype(np.int8)
  label[~mask] = -1
  return label, mask


def has_conflict(label: np.ndarray, mask: np.ndarray) -> bool:
  """Whether some available attribute prefers a and another prefers b (ties do not count)."""
  label = np.asarray(label)
  mask = np.asarray(mask, bool)
  return bool(np.any(mask & (label == 1)) and np.any(mask & (label == 0)))


def stable_hash(*parts: str) -> bytes:
  """SHA-256 of the parts (NUL-separated, UTF-8); independent of PYTHONHASHSEED and the platform."""
  return hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()


def prompt_bucket(prompt: str, salt: str) -> float:
  """A number in [0, 1) determined by the prompt text and the salt only."""
  return int.from_bytes(stable_hash(salt, prompt)[:8], "big") / 2.0**64


def split_for_prompt(prompt: str, validation_fraction: float, test_fraction: float, salt: str) -> str:
  """'train', 'validation' or 'test' for a prompt: all pairs of one prompt land in the same split."""
  bucket = prompt_bucket(prompt, salt)
  if bucket < test_fraction:
    return "test"
  if bucket < test_fraction + validation_fraction:
    return "validation"
  return "train"


def subsample(items: Sequence[Any], k: Optional[int], *seed_parts: str) -> List[Any]:
  """At most `k` of `items` (in their original order), chosen by a seed derived from `seed_parts`."""
  if k is None or len(items) <= k:
    return list(items)
  rng = np.random.default_rng(int.from_bytes(stable_hash(*seed_parts)[:8], "big"))
  keep = np.sort(rng.choice(len(items), size=k, replace=False))
  return [items[i] for i in keep]


# ----------------------------------------------------------------------------------------------------------------
# Configs, features and the base builder.


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  """Options shared by all builders of this package.

  Attributes:
    source_path: a file or directory to read instead of the manual directory (relative paths are taken as is).
    skip_malformed: skip (and count) malformed rows instead of raising `MalformedRowError`.
  """

  source_path: Optional[str] = None
  skip_malformed: bool = False


@dataclasses.dataclass(eq=False)
class HashSplitConfig(SourceConfig):
  """Options of builders that split by a hash of the prompt.

  Attributes:
    validation_fraction: expected fraction of prompts in 'validation'.
    test_fraction: expected fraction of prompts in 'test'.
    split_salt: salt of the prompt hash; change it to draw other splits.
    tie_epsilon: score differences with absolute value <= tie_epsilon are ties.
  """

  validation_fraction: float = 0.05
  test_fraction: float = 0.05
  split_salt: str = "spectral_soup"
  tie_epsilon: float = 0.0

  def __post_init__(self):
    if not (0 <= self.validation_fraction and 0 <= self.test_fraction and
            self.validation_fraction + self.test_fraction <= 1):
      raise ValueError(f"{self.name}: need 0 <= validation_fraction, test_fraction and their sum <= 1, got "
                       f"{self.validation_fraction}, {self.test_fraction}")
    if self.tie_epsilon < 0:
      raise ValueError(f"{self.name}: tie_epsilon must be >= 0, got {self.tie_epsilon}")


def pair_features(num_attributes: Optional[int], with_scores: bool = True,
                  extra_text: Sequence[str] = ()) -> tfds.features.FeaturesDict:
  """Features of a pair dataset: texts, per-attribute scores (float32), labels (int8) and mask (bool)."""
  return tfds.features.FeaturesDict(pair_feature_dict(num_attributes, with_scores, extra_text))


def pair_feature_dict(num_attributes: Optional[int], with_scores: bool = True,
                      extra_text: Sequence[str] = ()) -> Dict[str, Any]:
  """The features of `pair_features` as a plain dict (to add more)."""
  shape = (num_attributes,)
  features: Dict[str, Any] = {
      "prompt": tfds.features.Text(),
      "response_a": tfds.features.Text(),
      "response_b": tfds.features.Text(),
      "label": tfds.features.Tensor(shape=shape, dtype=np.int8),
      "mask": tfds.features.Tensor(shape=shape, dtype=np.bool_),
  }
  if with_scores:
    features["scores_a"] = tfds.features.Tensor(shape=shape, dtype=np.float32)
    features["scores_b"] = tfds.features.Tensor(shape=shape, dtype=np.float32)
  for name in extra_text:
    features[name] = tfds.features.Text()
  return features


def default_hash_split_configs(config_cls: type) -> List[HashSplitConfig]:
  """The one predefined config ("default": all pairs, 90/5/5 prompt-hash splits) of a hash-split builder."""
  return [config_cls(name="default", description="All pairs; 90/5/5 prompt-hash splits.")]


class ManualSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders of this package: resolves the source directory with clear errors.

  Subclasses set `UPSTREAM` (where the files come from) and `MANUAL_DOWNLOAD_INSTRUCTIONS`, parse everything in
  `_split_generators` (so malformed rows fail before anything is written) and return only non-empty splits (TFDS
  refuses to write an empty split).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DEFAULT_CONFIG_NAME = "default"
  UPSTREAM = ""

  def __init__(self, *, file_format: Optional[str] = None, **kwargs: Any):
    # array_record by default (TFDS defaults to tfrecord), so `tfds.builder(...)` / `tfds.data_source(...)` of these
    # builders also write a format that is readable without TensorFlow.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _source_root(self, dl_manager: tfds.download.DownloadManager, expected: str) -> epath.Path:
    """`source_path` of the config if set (must exist), else the manual directory (must exist, non-empty)."""
    config = self.builder_config
    if config.source_path:
      path = epath.Path(os.path.expanduser(os.fspath(config.source_path)))
      if not path.exists():
        raise SourceNotFoundError(missing_source_message(self.name, expected, f"source_path={path}", self.UPSTREAM))
      return path
    try:
      return dl_manager.manual_dir
    except AssertionError as e:  # TFDS: "Manual directory ... does not exist or is empty".
      manual_dir = getattr(dl_manager, "_manual_dir", None)  # Private, only to name the path in the message.
      where = f"the manual directory {manual_dir} (missing or empty)" if manual_dir else "the manual directory"
      raise SourceNotFoundError(missing_source_message(self.name, expected, where, self.UPSTREAM)) from e

  def _missing(self, expected: str, where: epath.Path) -> SourceNotFoundError:
    return SourceNotFoundError(missing_source_message(self.name, expected, str(where), self.UPSTREAM))

  def _info(self) -> tfds.core.DatasetInfo:
    """Pair features with any number of attributes, described by the builder module's docstring (override for more)."""
    return self._make_info(pair_features(None), description=sys.modules[type(self).__module__].__doc__ or "")

  def _make_info(self, features: tfds.features.FeaturesDict, description: str, homepage: Optional[str] = None,
                 citation: Optional[str] = None) -> tfds.core.DatasetInfo:
    # `dataset_info_from_configs` would look for README / CITATIONS.bib next to the module; build the info directly.
    return tfds.core.DatasetInfo(builder=self, description=description, features=features, homepage=homepage,
                                 citation=citation, metadata=tfds.core.MetadataDict())

  def _splits(self, per_split: Mapping[str, Sequence[Any]]) -> Dict[str, Iterator[Any]]:
    """`_split_generators`' result: one generator per non-empty split of the parsed items."""
    return {split: self._generate_examples(items) for split, items in nonempty(per_split).items()}

  def _hash_splits(self, keyed_examples: Iterable[Tuple[Any, Dict[str, Any]]]) -> Dict[str, Iterator[Any]]:
    """`_splits` of (key, example) pairs assigned to splits by a hash of `example["prompt"]` (`HashSplitConfig`)."""
    config = self.builder_config
    per_split: Dict[str, List[Tuple[Any, Dict[str, Any]]]] = {s: [] for s in SPLITS}
    for key, example in keyed_examples:
      split = split_for_prompt(example["prompt"], config.validation_fraction, config.test_fraction, config.split_salt)
      per_split[split].append((key, example))
    return self._splits(per_split)

  def _generate_examples(self, items):
    """The (key, example) pairs parsed (and checked) by `_split_generators`."""
    yield from items


def nonempty(per_split: Mapping[str, Sequence[Any]]) -> Dict[str, Sequence[Any]]:
  """The splits that have at least one item (TFDS cannot write an empty split)."""
  empty = [s for s, items in per_split.items() if not items]
  if empty:
    logging.warning("Splits with no examples are left out: %s", empty)
  result = {s: items for s, items in per_split.items() if items}
  if not result:
    raise ValueError("No examples in any split (all rows malformed or filtered out?).")
  return result
