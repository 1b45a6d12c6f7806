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
Malformed includes text holding an unpaired surrogate (a broken `\\uXXXX` escape) and numbers beyond float32's
range (|x| > 1e37). Every row is checked before anything is written.

Rows that are well formed but carry nothing are left out with a warning naming the first, and counted in
`info.metadata`: a pair whose two responses are the same text (`num_identical_responses`), and a row that repeats
an earlier row of its file exactly (`num_duplicate_rows`; kept once, so a repeated row is not weighted twice).

Files: a name ending in `.gz` must hold gzip data, and a file of another name must not; a file and its `.gz` twin
(or any two JSON files of one stem, `flan.jsonl` and `flan.json.gz`) in one directory are refused
(`SourceFileError`) rather than both read. Suffixes are matched regardless of case.

A prepared dataset records, in `info.metadata`, its config's fields (`config`) and the absolute path, size and
modification time of every source file it read (`source_fingerprint`). Reusing it (`download_and_prepare`
without `FORCE_REDOWNLOAD`, e.g. `load_source` without `rebuild=True`) first checks both: a config with other
fields under the same name, or a source that now resolves to other files or to files changed since the build,
raises `StaleDatasetError` naming the difference. A source that is no longer at hand (the raw files deleted after
the build) does not block reuse.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import json
import math
import numbers
import os
import re
import sys
import zlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from spectral_soup.data import jsonl

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


class SourceFileError(ValueError):
  """A source file cannot be read as its name says (`.gz` but not gzip, ...), or two files hold the same data."""


class StaleDatasetError(ValueError):
  """A prepared dataset no longer matches its config or its source files; rebuild it."""


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


_LEFT_OUT_REASONS = {
    "num_identical_responses": "pair(s) whose two responses are the same text carry no preference and are left out",
    "num_duplicate_rows": "row(s) that repeat an earlier row exactly are left out (each is kept once)",
}


class LeftOut:
  """Well-formed rows or pairs left out because they carry nothing: counted, the first of each kind remembered."""

  def __init__(self, *kinds: str):
    self.counts: Dict[str, int] = {kind: 0 for kind in kinds}
    self.first: Dict[str, str] = {}

  def add(self, kind: str, where: str) -> None:
    self.counts[kind] = self.counts.get(kind, 0) + 1
    self.first.setdefault(kind, where)

  def as_metadata(self, dataset: str) -> Dict[str, int]:
    """The counts (for `info.metadata`); logs one warning per kind that left something out."""
    for kind, count in self.counts.items():
      if count:
        logging.warning("%s: %d %s (first: %s).", dataset, count, _LEFT_OUT_REASONS.get(kind, kind), self.first[kind])
    return dict(self.counts)


class Repeats:
  """Finds rows that repeat an earlier row exactly (by a key of their parsed values)."""

  def __init__(self):
    self._seen: Dict[Any, str] = {}

  def first_of(self, key: Any, where: str) -> Optional[str]:
    """Where the row with this key was seen first; None (remembering `where`) if this row is the first."""
    if key in self._seen:
      return self._seen[key]
    self._seen[key] = where
    return None


# ----------------------------------------------------------------------------------------------------------------
# Reading rows.


def is_gz_name(name: str) -> bool:
  """Whether a file name says gzip (`.gz`, in any case)."""
  return name.lower().endswith(".gz")


def _open_binary(path: epath.Path) -> io.BufferedIOBase:
  """The file's bytes, decompressed if its name ends in `.gz`; `SourceFileError` if the name and the data disagree."""
  handle = path.open("rb")
  head = handle.read(2)
  handle.seek(0)
  if is_gz_name(path.name):
    if not jsonl.is_gzip(head):
      handle.close()
      raise SourceFileError(f"{path}: named .gz but is not gzip-compressed (starts with {head!r}): expected gzip "
                            f"data, or drop the .gz from the name.")
    return gzip.GzipFile(fileobj=handle, mode="rb")
  if jsonl.is_gzip(head):
    handle.close()
    raise SourceFileError(f"{path}: is gzip-compressed but not named .gz: expected plain JSON text (name it "
                          f"{path.name}.gz, or decompress it).")
  return handle


_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _gzip_error(path: epath.Path, after: Optional[int], error: Exception) -> SourceFileError:
  where = f" (after row {after})" if after else ""
  return SourceFileError(f"{path}: the gzip data are truncated or corrupt{where}: {type(error).__name__}: {error}")


_BOM = b"\xef\xbb\xbf"


def _first_byte(path: epath.Path) -> bytes:
  """The first non-whitespace byte of a (possibly gzipped) file after a UTF-8 byte order mark, b'' if there is
  none."""
  with _open_binary(path) as handle:
    try:
      first = True
      while chunk := handle.read(1 << 16):
        if first and chunk.startswith(_BOM):  # json.loads of bytes skips it; so must the format test.
          chunk = chunk[len(_BOM):]
        first = False
        if chunk.strip():
          return chunk.lstrip()[:1]
    except _GZIP_ERRORS as e:
      raise _gzip_error(path, None, e) from None
  return b""


class _Fields(dict):
  """A parsed JSON object that remembers its first repeated key (`repeated`, nested objects' as 'outer.inner')."""
  repeated: Optional[str] = None


def _fields(pairs: List[Tuple[str, Any]]) -> _Fields:
  """json's object_pairs_hook: keeps the object, noting a repeated key (json alone keeps the last value, silently)."""
  out = _Fields()
  for key, value in pairs:
    inner = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, _Fields) and v.repeated]
    if out.repeated is None and key in out:
      out.repeated = key
    elif out.repeated is None and inner:
      out.repeated = f"{key}.{inner[0].repeated}"
    out[key] = value
  return out


def _check_row(ref: RowRef, row: Any) -> Optional[Exception]:
  """The error of a parsed row that is not a JSON object, or repeats a key; None if it is fine."""
  if not isinstance(row, dict):
    return ref.error("<row>", f"expected a JSON object, got {type(row).__name__}")
  if getattr(row, "repeated", None):
    return ref.error(
        row.repeated, "the key appears twice in one object: expected each field once (JSON readers "
        "disagree on which value counts)")
  return None


def iter_json_rows(path: epath.Path, errors: RowErrors) -> Iterator[Tuple[RowRef, Dict[str, Any]]]:
  """Yields `(RowRef, row)` for every JSON object in a JSON-lines or JSON-array file (optionally gzipped).

  JSON-lines files are streamed; a file starting with '[' is read whole as one array whose elements are the rows.
  Blank lines are skipped (but counted in row numbers). A line that is not valid JSON, or a row that is not a JSON
  object, or an object that repeats a key, goes to `errors` (field '<json>', '<row>' or the repeated key).
  """
  if _first_byte(path) == b"[":
    with _open_binary(path) as handle:
      try:
        rows = json.loads(handle.read(), object_pairs_hook=_fields)
      except _GZIP_ERRORS as e:
        raise _gzip_error(path, None, e) from None
      except ValueError as e:
        raise MalformedRowError(str(path), 1, "<json>", f"not a valid JSON array ({e})") from e
    if not isinstance(rows, list):
      raise MalformedRowError(str(path), 1, "<json>", f"expected a JSON array, got {type(rows).__name__}")
    for number, row in enumerate(rows, start=1):
      errors.rows_read += 1
      ref = RowRef(str(path), number)
      if (error := _check_row(ref, row)) is not None:
        errors.handle(error)
        continue
      yield ref, row
    return
  with _open_binary(path) as handle:
    number = 0
    try:
      for number, line in enumerate(handle, start=1):
        if not line.strip():
          continue
        errors.rows_read += 1
        ref = RowRef(str(path), number)
        try:
          row = json.loads(line, object_pairs_hook=_fields)
        except ValueError as e:  # Includes UnicodeDecodeError.
          errors.handle(ref.error("<json>", f"not valid JSON ({e})"))
          continue
        if (error := _check_row(ref, row)) is not None:
          errors.handle(error)
          continue
        yield ref, row
    except _GZIP_ERRORS as e:  # Raised only by reading the file.
      raise _gzip_error(path, number, e) from None


def strip_json_suffix(name: str) -> str:
  """'sharegpt.jsonl.gz' -> 'sharegpt' (suffixes in any case: 'P1A.JSON' -> 'P1A')."""
  for suffix in sorted(JSON_SUFFIXES, key=len, reverse=True):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def json_files(directory: epath.Path) -> List[epath.Path]:
  """The JSON / JSON-lines files (optionally gzipped; suffixes in any case) directly inside `directory`, by name.

  Pass the ones a builder reads to `refuse_twins`.
  """
  return sorted((p for p in directory.iterdir() if p.name.lower().endswith(JSON_SUFFIXES) and p.is_file()),
                key=lambda p: p.name)


def refuse_twins(files: Sequence[epath.Path]) -> None:
  """Raises `SourceFileError` if two of `files` in one directory share a stem (in any case).

  Such files hold the same data twice, compressed and not (`flan.jsonl`, `flan.jsonl.gz`) or in two formats
  (`P1A.json`, `P1A.jsonl`), and would otherwise both be read.
  """
  by_stem: Dict[Tuple[str, str], List[epath.Path]] = collections.defaultdict(list)
  for path in files:
    by_stem[(os.fspath(path.parent), strip_json_suffix(path.name).lower())].append(path)
  for twins in by_stem.values():
    if len(twins) > 1:
      names = " and ".join(str(p) for p in twins)
      raise SourceFileError(f"{names} are both present: expected one file per stem (the same data compressed and "
                            "not, or in two formats, would be read twice); remove all but one.")


def find_file(directory: epath.Path, name: str) -> Optional[epath.Path]:
  """`directory/name` or its twin (`name` with `.gz` added or removed), whichever exists; None if neither does.

  Raises `SourceFileError` if both exist.
  """
  twin = name[:-3] if is_gz_name(name) else name + ".gz"
  found = [directory / n for n in (name, twin) if (directory / n).exists()]
  refuse_twins(found)
  return found[0] if found else None


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
  problem = jsonl.text_problem(value)
  if problem:
    raise ref.error(name, problem)
  return value


def number(value: Any, ref: RowRef, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
           integer: bool = False) -> float:
  """A finite JSON number (not a bool) within float32's range, optionally integral and within [low, high]."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ref.error(name, f"expected a number, got {type(value).__name__} {value!r}")
  try:
    value = float(value)
  except OverflowError:  # An integer beyond float64.
    raise ref.error(
        name, f"an integer of {len(str(abs(value)))} digits is beyond float32: expected a finite number "
        f"within +-{jsonl.MAX_SCORE:g}") from None
  if not math.isfinite(value):
    raise ref.error(name, f"not a finite number ({value})")
  if abs(value) > jsonl.MAX_SCORE:
    raise ref.error(name, f"{value:g} is beyond float32: expected a finite number within +-{jsonl.MAX_SCORE:g}")
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


stable_hash = jsonl.stable_hash
prompt_bucket = jsonl.prompt_bucket


def split_for_prompt(prompt: str, validation_fraction: float, test_fraction: float, salt: str) -> str:
  """'train', 'validation' or 'test' for a prompt: all pairs of one prompt land in the same split.

  The prompt is hashed verbatim: prompts that differ only in whitespace or case are different prompts and may land
  in different splits (normalize them in the source files if they are the same question).
  """
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

# A config's name names its dataset's directory (and `tfds.data_source("<builder>/<config>")` parses it).
CONFIG_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
_BASE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))


def absolute_path(path: Any) -> str:
  """`path` with `~` expanded, made absolute against the working directory (`gs://...` and the like kept as is)."""
  text = os.fspath(path)
  if "://" in text:
    return text
  return os.path.abspath(os.path.expanduser(text))


def config_error(config: tfds.core.BuilderConfig, field: str, expected: str) -> ValueError:
  """`ValueError: UltraFeedbackConfig 'all-...': pairs_per_prompt=2.5: expected an integer >= 1 ...`."""
  return ValueError(f"{type(config).__name__} {config.name!r}: {field}={getattr(config, field)!r}: expected "
                    f"{expected}.")


def check_bool(config: tfds.core.BuilderConfig, field: str) -> None:
  value = getattr(config, field)
  if not isinstance(value, (bool, np.bool_)):
    raise config_error(config, field, "True or False")
  setattr(config, field, bool(value))


def check_number(config: tfds.core.BuilderConfig, field: str, expected: str, *, low: float,
                 high: Optional[float] = None) -> None:
  """A finite real number (not a bool, not a string) within [low, high], stored as a float."""
  value = getattr(config, field)
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value) or
      value < low or (high is not None and value > high)):
    raise config_error(config, field, expected)
  setattr(config, field, float(value))


def check_int(config: tfds.core.BuilderConfig, field: str, expected: str, *, low: int, allow_none: bool) -> None:
  """An integer (not a bool, not a float such as 2.5 or NaN) >= low, or None where `allow_none`."""
  value = getattr(config, field)
  if value is None and allow_none:
    return
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
    raise config_error(config, field, expected)
  setattr(config, field, int(value))


def config_fields(config: tfds.core.BuilderConfig) -> Dict[str, Any]:
  """The fields of a config of this package that decide its data (all but TFDS's name, description, ...)."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _BASE_CONFIG_FIELDS}


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  """Options shared by all builders of this package. Every field is checked when the config is made.

  Attributes:
    source_path: a file or directory to read instead of the manual directory (`~` is expanded; a relative path is
      taken relative to the working directory when the config is made, and stored absolute).
    skip_malformed: skip (and count) malformed rows instead of raising `MalformedRowError`.
  """

  source_path: Optional[str] = None
  skip_malformed: bool = False

  def __post_init__(self):
    if not isinstance(self.name, str) or not CONFIG_NAME_RE.fullmatch(self.name):
      raise ValueError(f"{type(self).__name__}: name={self.name!r}: expected 1 to 200 letters, digits, '_', '.' or "
                       "'-', starting with a letter, a digit or '_' (it names the dataset's directory).")
    if self.source_path is not None:
      path = os.fspath(self.source_path) if isinstance(self.source_path, (str, os.PathLike)) else None
      if not isinstance(path, str) or not path.strip():
        raise config_error(self, "source_path", "a non-empty path (a str or os.PathLike) or None")
      self.source_path = absolute_path(path)
    check_bool(self, "skip_malformed")


@dataclasses.dataclass(eq=False)
class HashSplitConfig(SourceConfig):
  """Options of builders that split by a hash of the prompt.

  The prompt text is hashed verbatim (`split_for_prompt`): prompts that differ only in whitespace or case are
  different prompts to the split.

  Attributes:
    validation_fraction: expected fraction of prompts in 'validation', a number in [0, 1].
    test_fraction: expected fraction of prompts in 'test', a number in [0, 1]; the two sum to at most 1.
    split_salt: salt (a string) of the prompt hash; change it to draw other splits.
    tie_epsilon: score differences with absolute value <= tie_epsilon are ties; a finite number >= 0.
  """

  validation_fraction: float = 0.05
  test_fraction: float = 0.05
  split_salt: str = jsonl.SPLIT_SALT
  tie_epsilon: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    check_number(self, "validation_fraction", "a finite number in [0, 1]", low=0, high=1)
    check_number(self, "test_fraction", "a finite number in [0, 1]", low=0, high=1)
    if self.validation_fraction + self.test_fraction > 1:
      raise ValueError(f"{type(self).__name__} {self.name!r}: validation_fraction={self.validation_fraction} + "
                       f"test_fraction={self.test_fraction} > 1: expected a sum <= 1 (the rest is 'train').")
    if not isinstance(self.split_salt, str) or jsonl.text_problem(self.split_salt):
      raise config_error(self, "split_salt", "a string (it salts the prompt hash)")
    check_number(self, "tie_epsilon", "a finite number >= 0", low=0)


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


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """A `DatasetInfo` that never looks for precomputed metadata in the public TFDS bucket.

  These builders' data are never in that bucket. TFDS's `initialize_from_bucket` (run by every builder constructed
  before its data are prepared) creates a temporary directory before finding nothing there and never removes it:
  one empty `/tmp/tmp*tfds` directory per construction.
  """

  def initialize_from_bucket(self) -> None:
    pass


def manual_dir_of(dl_manager: tfds.download.DownloadManager) -> Optional[epath.Path]:
  """The manual directory a download manager was given (whether or not it exists)."""
  try:
    return dl_manager.manual_dir
  except AssertionError:  # TFDS: "Manual directory ... does not exist or is empty" (or none was given).
    return getattr(dl_manager, "_manual_dir", None)  # Private, only to name the path in messages.


def fingerprint(paths: Iterable[Any]) -> List[Dict[str, Any]]:
  """`[{"path": absolute path, "size": bytes, "mtime_ns": modification time}]` of the files, sorted by path."""
  entries = []
  for path in paths:
    name = absolute_path(path)
    if "://" in name:
      stat = epath.Path(name).stat()
      size, mtime_ns = getattr(stat, "length", 0), int((getattr(stat, "mtime", 0) or 0) * 10**9)
    else:
      stat = os.stat(name)
      size, mtime_ns = stat.st_size, stat.st_mtime_ns
    entries.append({"path": name, "size": int(size), "mtime_ns": int(mtime_ns)})
  return sorted(entries, key=lambda e: e["path"])


def fingerprint_changes(recorded: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]) -> List[str]:
  """How the files of `current` differ from those of `recorded` (both from `fingerprint`); [] if they do not."""
  old = {e["path"]: e for e in recorded}
  new = {e["path"]: e for e in current}
  changes = []
  for path in sorted(set(old) | set(new)):
    if path not in new:
      changes.append(f"{path} was read by the build but is not part of the source now")
    elif path not in old:
      changes.append(f"{path} is part of the source now but was not read by the build")
    elif old[path]["size"] != new[path]["size"]:
      changes.append(f"{path} has changed since the build ({old[path]['size']} -> {new[path]['size']} bytes)")
    elif old[path]["mtime_ns"] != new[path]["mtime_ns"]:
      changes.append(f"{path} was modified since the build")
  return changes


def _valid_fingerprint(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(e, dict) and {"path", "size", "mtime_ns"} <= set(e) for e in value)


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

  # ------------------------------------------------------------------------------------------------------------
  # Finding the source files.

  def _locate(self, manual_dir: Optional[epath.Path]) -> Any:
    """Finds the source files of the config (raising `SourceNotFoundError` / `SourceFileError`).

    Subclasses return whatever their `_split_generators` reads; `_files` lists the files in it.
    """
    raise NotImplementedError

  def _files(self, located: Any) -> List[epath.Path]:
    """Every file in `located` (a result of `_locate`)."""
    return list(located)

  def source_files(self, manual_dir: Optional[epath.PathLike] = None) -> List[epath.Path]:
    """The files a build of this config reads now, given the manual directory (unused when `source_path` is set)."""
    return self._files(self._locate(None if manual_dir is None else epath.Path(manual_dir)))

  def _begin(self, dl_manager: tfds.download.DownloadManager) -> Any:
    """`_locate` for `_split_generators`; records the config's fields and the files' fingerprint in the metadata."""
    located = self._locate(manual_dir_of(dl_manager))
    self.info.metadata.update({
        "config": config_fields(self.builder_config),
        "source_fingerprint": fingerprint(self._files(located)),
    })
    return located

  def _source_root(self, manual_dir: Optional[epath.Path], expected: str) -> epath.Path:
    """`source_path` of the config if set (must exist), else the manual directory (must exist, non-empty)."""
    config = self.builder_config
    if config.source_path:
      path = epath.Path(absolute_path(config.source_path))
      if not path.exists():
        raise SourceNotFoundError(missing_source_message(self.name, expected, f"source_path={path}", self.UPSTREAM))
      return path
    if manual_dir is None:
      raise SourceNotFoundError(missing_source_message(self.name, expected, "the manual directory", self.UPSTREAM))
    manual_dir = epath.Path(absolute_path(manual_dir))
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
      raise SourceNotFoundError(
          missing_source_message(self.name, expected, f"the manual directory {manual_dir} (missing or empty)",
                                 self.UPSTREAM))
    return manual_dir

  def _missing(self, expected: str, where: epath.Path) -> SourceNotFoundError:
    return SourceNotFoundError(missing_source_message(self.name, expected, str(where), self.UPSTREAM))

  def _info(self) -> tfds.core.DatasetInfo:
    """Pair features with any number of attributes, described by the builder module's docstring (override for more)."""
    return self._make_info(pair_features(None), description=sys.modules[type(self).__module__].__doc__ or "")

  def _make_info(self, features: tfds.features.FeaturesDict, description: str, homepage: Optional[str] = None,
                 citation: Optional[str] = None) -> tfds.core.DatasetInfo:
    # `dataset_info_from_configs` would look for README / CITATIONS.bib next to the module; build the info directly.
    return LocalDatasetInfo(builder=self, description=description, features=features, homepage=homepage,
                            citation=citation, metadata=tfds.core.MetadataDict())

  def _splits(self, per_split: Mapping[str, Sequence[Any]], *, rows_read: int, malformed: int = 0,
              left_out: Optional[Mapping[str, int]] = None) -> Dict[str, Iterator[Any]]:
    """`_split_generators`' result: one generator per non-empty split of the parsed items.

    The empty splits are left out (TFDS cannot write them) and named in `info.metadata["empty_splits"]`; when every
    split is empty, a `ValueError` names the source files and what happened to their rows.
    """
    empty = [s for s, items in per_split.items() if not items]
    self.info.metadata["empty_splits"] = empty
    if empty and len(empty) < len(per_split):
      logging.warning("%s/%s: splits with no examples are left out: %s", self.name, self.builder_config.name, empty)
    if len(empty) == len(per_split):
      files = [e["path"] for e in self.info.metadata.get("source_fingerprint", [])]
      dropped = ", ".join(f"{k}={v}" for k, v in (left_out or {}).items() if v) or "nothing else"
      raise ValueError(f"No examples in any split of {self.name}/{self.builder_config.name}: {rows_read} rows read "
                       f"from {files}, {malformed} of them skipped as malformed; left out: {dropped}.")
    return {split: self._generate_examples(items) for split, items in per_split.items() if items}

  def _hash_splits(self, keyed_examples: Iterable[Tuple[Any, Dict[str, Any]]], **counts: Any) -> Dict[str, Any]:
    """`_splits` of (key, example) pairs assigned to splits by a hash of `example["prompt"]` (`HashSplitConfig`)."""
    config = self.builder_config
    per_split: Dict[str, List[Tuple[Any, Dict[str, Any]]]] = {s: [] for s in SPLITS}
    for key, example in keyed_examples:
      split = split_for_prompt(example["prompt"], config.validation_fraction, config.test_fraction, config.split_salt)
      per_split[split].append((key, example))
    return self._splits(per_split, **counts)

  def _generate_examples(self, items):
    """The (key, example) pairs parsed (and checked) by `_split_generators`."""
    yield from items

  # ------------------------------------------------------------------------------------------------------------
  # Reusing a prepared dataset.

  def download_and_prepare(self, *, download_dir: Optional[epath.PathLike] = None,
                           download_config: Optional[tfds.download.DownloadConfig] = None, **kwargs: Any) -> None:
    """TFDS's `download_and_prepare`; reusing a prepared dataset first checks it against its config and source.

    Raises:
      StaleDatasetError: the dataset was prepared with other config fields under this config's name, or from other
        source files than the config (and the manual directory) resolve to now, or from files changed since.
    """
    download_config = download_config or tfds.download.DownloadConfig()
    mode = tfds.download.GenerateMode(download_config.download_mode)
    if (not mode.overwrite_dataset and mode != tfds.download.GenerateMode.UPDATE_DATASET_INFO and
        self.data_path.exists()):
      manual_dir = download_config.manual_dir or epath.Path(download_dir or self.data_dir_root / "downloads") / "manual"
      self._check_reuse(epath.Path(manual_dir))
    root = os.fspath(self.data_dir_root)
    before = _tree(root)
    try:
      super().download_and_prepare(download_dir=download_dir, download_config=download_config, **kwargs)
    except BaseException:
      _remove_new_leftovers(root, before)  # A failed build leaves no directories (or config records) behind.
      raise

  def _stale(self, problem: str) -> StaleDatasetError:
    return StaleDatasetError(f"{self.name}/{self.builder_config.name} prepared in {self.data_dir} {problem}. "
                             f"Rebuild it: load_source(..., rebuild=True) (or download_mode=FORCE_REDOWNLOAD), or "
                             f"delete {self.data_dir}.")

  def _check_reuse(self, manual_dir: epath.Path) -> None:
    """Refuses (`StaleDatasetError`) to reuse a dataset whose config or source files differ from the current ones.

    Datasets prepared before these records were kept pass unchecked.
    """
    metadata = self.info.metadata
    recorded_config = metadata.get("config")
    if isinstance(recorded_config, dict):
      current_config = config_fields(self.builder_config)
      differ = [
          k for k in sorted(set(recorded_config) | set(current_config))
          if recorded_config.get(k) != current_config.get(k)
      ]
      if differ:
        built = ", ".join(f"{k}={recorded_config.get(k)!r}" for k in differ)
        asked = ", ".join(f"{k}={current_config.get(k)!r}" for k in differ)
        raise self._stale(f"was built with {built}, but this config has {asked}")
    recorded = metadata.get("source_fingerprint")
    if not _valid_fingerprint(recorded):
      return
    try:
      current = fingerprint(self.source_files(manual_dir))
    except SourceNotFoundError:
      # The source is not at hand (deleted after the build, another machine): reuse, unless a file the build read is
      # still where it was and has changed.
      current = fingerprint(e["path"] for e in recorded if os.path.isfile(e["path"]))
      recorded = [e for e in recorded if e["path"] in {c["path"] for c in current}]
    changes = fingerprint_changes(recorded, current)
    if changes:
      more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
      raise self._stale(f"is out of date with its source: {'; '.join(changes[:3])}{more}")

  def as_data_source(self, split: Any = None, **kwargs: Any):
    """TFDS's `as_data_source`; a split that was left out because it had no examples is named as such."""
    for text in ([split] if isinstance(split, str) else split if isinstance(split, (list, tuple)) else []):
      if isinstance(text, str):
        for part in text.split("+"):
          self._check_split(part.split("[", 1)[0].strip())
    try:
      return super().as_data_source(split, **kwargs)
    except ValueError as e:
      if "can not be of 0 length" not in str(e):
        raise
      raise ValueError(f"{self.name}/{self.builder_config.name}: split {split!r} selects no examples (TFDS: {e}); "
                       f"expected a slice holding at least one example.") from None

  def _check_split(self, name: str) -> None:
    if name in self.info.splits or name not in (self.info.metadata.get("empty_splits") or []):
      return
    config = self.builder_config
    total = sum(split.num_examples for split in self.info.splits.values())
    if isinstance(config, HashSplitConfig):
      why = (f"no prompt of its {total} examples hashed into it at validation_fraction={config.validation_fraction},"
             f" test_fraction={config.test_fraction} (split_salt={config.split_salt!r}); raise that fraction or use "
             f"more prompts")
    else:
      why = "the source has no rows for it"
    raise ValueError(f"{self.name}/{config.name}: split {name!r} has no examples: it was left out when the dataset "
                     f"was built, as {why}. Splits with examples: {sorted(self.info.splits)}.")


def _tree(root: str) -> set:
  """Every directory and file under `root` (paths), empty if it does not exist."""
  found = set()
  for directory, _, names in os.walk(root):
    found.add(directory)
    found.update(os.path.join(directory, name) for name in names)
  return found


def _remove_new_leftovers(root: str, before: set) -> None:
  """Removes what a failed build created under `root` that is only bookkeeping: TFDS's builder-config records
  (`.config/metadata.json`) and directories left empty. Files that existed before are never touched."""
  for directory, _, names in os.walk(root, topdown=False):  # Children before their parents.
    for name in names:
      path = os.path.join(directory, name)
      if path not in before and os.path.basename(directory) == ".config":
        os.remove(path)
    if directory not in before and not os.listdir(directory):
      os.rmdir(directory)
