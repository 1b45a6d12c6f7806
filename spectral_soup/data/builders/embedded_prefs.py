"""The embedded preference dataset of this project, as a TFDS builder (array_record, no TensorFlow).

Source (written by the project's generation command) in the manual directory, or `source_path` (the directory, or
the `pairs.jsonl` file itself, with `metadata.json` next to it):

* `pairs.jsonl` (or `pairs.jsonl.gz`): one preference pair per line,
  `{"prompt": str, "response_a": str, "response_b": str, "scores_a": [float] * A, "scores_b": [float] * A,
  "attributes": [str] * A}`; other keys are ignored.
* `metadata.json`: `{"attributes": [str] * A, "seed": int, ...}`; every row's `attributes` must equal these.

Features: `prompt`, `response_a`, `response_b` (Text), `scores_a`, `scores_b` (float32 [A]), `label` (int8 [A]:
1 a preferred under attribute k, 0 b preferred, -1 tie, i.e. |a - b| <= tie_epsilon) and `mask` (bool [A], all
True: every score is required). A is only known from the source, so the feature shapes are `(None,)`; the
attribute names are in `info.metadata["attributes"]` and `metadata.json` in `info.metadata["source_metadata"]`.

Pairs whose two responses are the same text, and rows that repeat an earlier row exactly, are left out (counted in
`info.metadata["num_identical_responses"]` / `["num_duplicate_rows"]`, with a warning naming the first).

Splits: train / validation / test by a hash of the prompt text, verbatim (`HashSplitConfig`), so the pairs of one
prompt never straddle splits. Empty splits are left out.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

from etils import epath
import tensorflow_datasets as tfds

from spectral_soup.data import jsonl
from spectral_soup.data.builders import common

PAIRS_FILE = "pairs.jsonl"
METADATA_FILE = "metadata.json"


@dataclasses.dataclass(eq=False)
class EmbeddedPrefsConfig(common.HashSplitConfig):
  """Config of `EmbeddedPrefs` (see `common.HashSplitConfig` for the fields)."""


class EmbeddedPrefs(common.ManualSourceBuilder):
  """Pairwise multi-attribute preferences produced by the project's generation command."""

  name = "spectral_soup_embedded_prefs"
  BUILDER_CONFIGS = common.default_hash_split_configs(EmbeddedPrefsConfig)
  UPSTREAM = "the project's preference generation command (it writes pairs.jsonl and metadata.json)"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Run the project's preference generation command and pass its output directory (holding pairs.jsonl and "
      "metadata.json) as the manual directory, or set `source_path` in the builder config.")

  def _locate(self, manual_dir: Optional[epath.Path]) -> Tuple[epath.Path, epath.Path]:
    expected = f"{PAIRS_FILE} and {METADATA_FILE}"
    root = self._source_root(manual_dir, expected)
    if root.is_dir():
      pairs = common.find_file(root, PAIRS_FILE)
      if pairs is None:
        raise self._missing(f"{PAIRS_FILE} (or {PAIRS_FILE}.gz)", root)
    else:
      pairs = root
    metadata = pairs.parent / METADATA_FILE
    if not metadata.exists():
      raise self._missing(METADATA_FILE, pairs.parent)
    return pairs, metadata

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    pairs_path, metadata_path = self._begin(dl_manager)
    source_metadata, attributes = _read_metadata(metadata_path)
    errors = common.RowErrors(config.skip_malformed)
    left_out = common.LeftOut("num_identical_responses", "num_duplicate_rows")
    examples = list(_examples(pairs_path, errors, left_out, attributes, config.tie_epsilon))
    counts = left_out.as_metadata(self.name)
    self.info.metadata.update({
        "attributes": list(attributes),
        "source_metadata": source_metadata,
        "source_file": str(pairs_path),
        "num_source_rows": errors.rows_read,
        **counts,
        "malformed_rows": errors.as_metadata(),
    })
    return self._hash_splits(examples, rows_read=errors.rows_read, malformed=errors.count, left_out=counts)


def _examples(path: epath.Path, errors: common.RowErrors, left_out: common.LeftOut, attributes: List[str],
              tie_epsilon: float):
  """(row number, example) of each well-formed row that carries a preference and is not a repeat.

  Malformed rows go to `errors`; rows whose two responses are the same text, and repeats of an earlier row, to
  `left_out`.
  """
  repeats = common.Repeats()
  for ref, row in common.iter_json_rows(path, errors):
    try:
      example = _parse_row(row, ref, attributes, tie_epsilon)
    except common.MalformedRowError as e:
      errors.handle(e)
      continue
    where = f"{ref.path} row {ref.number}"
    if example["response_a"] == example["response_b"]:
      left_out.add("num_identical_responses", where)
      continue
    key = (example["prompt"], example["response_a"], example["response_b"], example["scores_a"].tobytes(),
           example["scores_b"].tobytes())
    first = repeats.first_of(key, where)
    if first is not None:
      left_out.add("num_duplicate_rows", f"{where} repeats {first}")
      continue
    yield ref.number, example


def _read_metadata(path: epath.Path) -> Tuple[Dict[str, Any], List[str]]:
  try:
    metadata = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(metadata, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
  attributes = metadata.get("attributes")
  if (not isinstance(attributes, list) or not attributes or
      not all(isinstance(a, str) and a.strip() and not jsonl.text_problem(a) for a in attributes)):
    raise ValueError(f"{path}: field 'attributes': expected a non-empty list of non-empty strings, got "
                     f"{attributes!r}")
  if len(set(attributes)) != len(attributes):
    raise ValueError(f"{path}: field 'attributes': names repeat: {attributes!r}")
  return metadata, attributes


def _parse_row(row: Dict[str, Any], ref: common.RowRef, attributes: List[str], tie_epsilon: float) -> Dict[str, Any]:
  """One pair example, or `MalformedRowError`."""
  prompt = common.text(row, "prompt", ref)
  response_a = common.text(row, "response_a", ref)
  response_b = common.text(row, "response_b", ref)
  row_attributes = common.require(row, "attributes", ref)
  if row_attributes != attributes:
    raise ref.error("attributes", f"{row_attributes!r} differs from metadata.json's {attributes!r}")
  scores_a = common.number_list(row, "scores_a", ref, len(attributes))
  scores_b = common.number_list(row, "scores_b", ref, len(attributes))
  label, mask = common.pair_labels(scores_a, scores_b, tie_epsilon=tie_epsilon)
  return {
      "prompt": prompt,
      "response_a": response_a,
      "response_b": response_b,
      "scores_a": scores_a,
      "scores_b": scores_b,
      "label": label,
      "mask": mask
  }
