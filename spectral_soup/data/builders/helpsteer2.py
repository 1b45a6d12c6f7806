"""nvidia/HelpSteer2 as TFDS datasets (array_record, no TensorFlow): ratings, rating pairs, human preferences.

Upstream: https://huggingface.co/datasets/nvidia/HelpSteer2. Files looked for in `source_path` (a directory) or
the manual directory, or its `helpsteer2/` subdirectory if that exists (`.jsonl` accepted for `.jsonl.gz`):
* `train.jsonl.gz`, `validation.jsonl.gz`: one rated response per line, `{"prompt": str, "response": str,
  "helpfulness": int, "correctness": int, "coherence": int, "complexity": int, "verbosity": int}`, ratings 0..4.
  Multi-turn prompts keep upstream's `<extra_id_1>` turn markers verbatim.
* `preference/preference.jsonl.gz` (or `preference.jsonl.gz`), the HelpSteer2-Preference subset:
  `{"split": "train" | "val", "prompt": str, "response_1": str, "response_2": str, "preference_strength": int}`
  with strength in -3..3: negative prefers response_1, positive response_2, 0 a tie. Other keys are ignored.

Configs (`variant`):
* `ratings` (default): one example per response: `prompt`, `response` (Text), `scores` (float32 [5], attribute
  order `ATTRIBUTES`).
* `pairs`: every pair (i, j), i < j, of responses to the same prompt (upstream order; usually 2 per prompt) with
  the pair features: `scores_a`, `scores_b` (float32 [5]), `label` (int8 [5]: 1 a rated higher, 0 b, -1 tie),
  `mask` (bool [5], all True). Note that "higher" is the raw rating: for verbosity and complexity more is not
  necessarily better; flipping their sign is a pipeline decision.
* `preference`: `prompt`, `response_a` (= response_1), `response_b`, `label` (int8 [1]), `mask` (bool [1]),
  `preference_strength` (int8, upstream sign); attribute name "preference".

Splits are upstream's: train and validation (`preference`: "val" -> validation). There is no test split.

Two rows of one file with the same response text to one prompt make no `pairs` example, nor does a `preference`
row whose two responses are the same text (`info.metadata["num_identical_responses"]`); a row that repeats an
earlier row of its file exactly is read once (`num_duplicate_rows`); both with a warning naming the first. A file
and its uncompressed twin (`train.jsonl.gz` and `train.jsonl`) side by side are refused rather than one silently
preferred. `source_path` must be a directory, and only the JSON-lines names above are looked for (not `.json`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from spectral_soup.data.builders import common

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
VARIANTS = ("ratings", "pairs", "preference")
SPLIT_FILES = {"train": "train.jsonl.gz", "validation": "validation.jsonl.gz"}
PREFERENCE_FILE = "preference/preference.jsonl.gz"
SUBDIR = "helpsteer2"
_PREFERENCE_SPLITS = {"train": "train", "val": "validation", "validation": "validation"}


@dataclasses.dataclass(eq=False)
class HelpSteer2Config(common.SourceConfig):
  """Config of `HelpSteer2`.

  Attributes:
    variant: 'ratings', 'pairs' or 'preference' (see the module docstring).
  """

  variant: str = "ratings"

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.variant, str) or self.variant not in VARIANTS:
      raise common.config_error(self, "variant", f"one of {VARIANTS}")


class HelpSteer2(common.ManualSourceBuilder):
  """HelpSteer2 ratings (helpfulness, correctness, coherence, complexity, verbosity) and preferences."""

  name = "spectral_soup_helpsteer2"
  BUILDER_CONFIGS = [
      HelpSteer2Config(name="ratings", variant="ratings", description="One example per rated response."),
      HelpSteer2Config(name="pairs", variant="pairs",
                       description="Pairs of responses to one prompt with per-attribute labels."),
      HelpSteer2Config(name="preference", variant="preference",
                       description="HelpSteer2-Preference: human pairwise preferences with strength."),
  ]
  DEFAULT_CONFIG_NAME = "ratings"
  UPSTREAM = "nvidia/HelpSteer2 (https://huggingface.co/datasets/nvidia/HelpSteer2)"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download train.jsonl.gz and validation.jsonl.gz (and, for the 'preference' config, "
      "preference/preference.jsonl.gz) of nvidia/HelpSteer2 into the manual directory, keeping the "
      "preference/ subdirectory, or into <manual_dir>/helpsteer2/.")

  def _info(self) -> tfds.core.DatasetInfo:
    variant = self.builder_config.variant
    if variant == "ratings":
      features = tfds.features.FeaturesDict({
          "prompt": tfds.features.Text(),
          "response": tfds.features.Text(),
          "scores": tfds.features.Tensor(shape=(len(ATTRIBUTES),), dtype=np.float32),
      })
    elif variant == "pairs":
      features = common.pair_features(len(ATTRIBUTES))
    else:
      features = tfds.features.FeaturesDict({
          **common.pair_feature_dict(1, with_scores=False), "preference_strength":
              tfds.features.Tensor(shape=(), dtype=np.int8)
      })
    return self._make_info(
        features, description=__doc__, homepage="https://huggingface.co/datasets/nvidia/HelpSteer2",
        citation="Wang et al., HelpSteer2: Open-source dataset for training top-performing "
        "reward models, 2024.")

  def _directory(self, manual_dir: Optional[epath.Path], expected: str) -> epath.Path:
    root = self._source_root(manual_dir, expected)
    if not root.is_dir():
      raise common.SourceNotFoundError(
          f"{self.name}: source_path must be a directory holding {expected}, got the file {root}")
    return root / SUBDIR if (not self.builder_config.source_path and (root / SUBDIR).is_dir()) else root

  def _locate(self, manual_dir: Optional[epath.Path]) -> Dict[str, epath.Path]:
    """{split: file} of the rated variants, {"preference": file} of `preference`."""
    if self.builder_config.variant == "preference":
      directory = self._directory(manual_dir, PREFERENCE_FILE)
      path = _find(directory, (PREFERENCE_FILE, "preference.jsonl.gz"))
      if path is None:
        raise self._missing(PREFERENCE_FILE, directory)
      return {"preference": path}
    directory = self._directory(manual_dir, " and ".join(SPLIT_FILES.values()))
    found = {}
    for split, file_name in SPLIT_FILES.items():
      path = _find(directory, (file_name,))
      if path is None:
        raise self._missing(file_name, directory)
      found[split] = path
    return found

  def _files(self, located: Dict[str, epath.Path]) -> List[epath.Path]:
    return list(located.values())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    located = self._begin(dl_manager)
    errors = common.RowErrors(config.skip_malformed)
    left_out = common.LeftOut("num_identical_responses", "num_duplicate_rows")
    metadata: Dict[str, Any] = {}
    if config.variant == "preference":
      path = located["preference"]
      per_split: Dict[str, List[Tuple[str, Dict[str, Any]]]] = {"train": [], "validation": []}
      repeats = common.Repeats()
      for ref, row in common.iter_json_rows(path, errors):
        try:
          split, example = _parse_preference(row, ref)
        except common.MalformedRowError as e:
          errors.handle(e)
          continue
        where = f"{ref.path} row {ref.number}"
        if example["response_a"] == example["response_b"]:
          left_out.add("num_identical_responses", where)
          continue
        key = (split, example["prompt"], example["response_a"], example["response_b"],
               int(example["preference_strength"]))
        first = repeats.first_of(key, where)
        if first is not None:
          left_out.add("num_duplicate_rows", f"{where} repeats {first}")
          continue
        per_split[split].append((f"{ref.number}", example))
      metadata.update(attributes=["preference"], source_files=[path.name])
    else:
      per_split = {}
      for split, path in located.items():
        rated = []
        repeats = common.Repeats()
        for ref, row in common.iter_json_rows(path, errors):
          try:
            example = _parse_rated(row, ref)
          except common.MalformedRowError as e:
            errors.handle(e)
            continue
          where = f"{ref.path} row {ref.number}"
          first = repeats.first_of((example["prompt"], example["response"], example["scores"].tobytes()), where)
          if first is not None:
            left_out.add("num_duplicate_rows", f"{where} repeats {first}")
            continue
          rated.append((ref.number, example))
        if config.variant == "ratings":
          per_split[split] = [(f"{n}", e) for n, e in rated]
        else:
          per_split[split] = _pairs(rated, path, left_out)
      metadata.update(attributes=list(ATTRIBUTES), source_files=[p.name for p in located.values()])
    counts = left_out.as_metadata(self.name)
    metadata["num_source_rows"] = errors.rows_read
    metadata.update(counts)
    metadata["malformed_rows"] = errors.as_metadata()
    self.info.metadata.update(metadata)
    return self._splits(per_split, rows_read=errors.rows_read, malformed=errors.count, left_out=counts)


def _find(directory: epath.Path, names: Tuple[str, ...]) -> Optional[epath.Path]:
  """The first of `names` (or its uncompressed `.jsonl` twin) that exists in `directory`.

  Raises `common.SourceFileError` when a name and its twin both exist.
  """
  for name in names:
    path = common.find_file(directory, name)
    if path is not None:
      return path
  return None


def _parse_rated(row: Dict[str, Any], ref: common.RowRef) -> Dict[str, Any]:
  return {
      "prompt":
          common.text(row, "prompt", ref),
      "response":
          common.text(row, "response", ref),
      "scores":
          np.asarray(
              [common.number(common.require(row, a, ref), ref, a, low=0, high=4, integer=True) for a in ATTRIBUTES],
              np.float32),
  }


def _pairs(rated: List[Tuple[int, Dict[str, Any]]], path: epath.Path,
           left_out: common.LeftOut) -> List[Tuple[str, Dict[str, Any]]]:
  """All pairs of different responses to the same prompt (prompts in order of first appearance).

  Two rows with the same response text to one prompt make no pair (`left_out`: num_identical_responses).
  """
  by_prompt: Dict[str, List[Tuple[int, Dict[str, Any]]]] = collections.defaultdict(list)
  for number, example in rated:
    by_prompt[example["prompt"]].append((number, example))
  pairs = []
  for prompt, group in by_prompt.items():
    for (n_a, a), (n_b, b) in itertools.combinations(group, 2):
      if a["response"] == b["response"]:
        left_out.add("num_identical_responses", f"{path} rows {n_a} and {n_b}")
        continue
      label, mask = common.pair_labels(a["scores"], b["scores"])
      pairs.append((f"{n_a}:{n_b}", {
          "prompt": prompt,
          "response_a": a["response"],
          "response_b": b["response"],
          "scores_a": a["scores"],
          "scores_b": b["scores"],
          "label": label,
          "mask": mask
      }))
  return pairs


def _parse_preference(row: Dict[str, Any], ref: common.RowRef) -> Tuple[str, Dict[str, Any]]:
  split_name = common.text(row, "split", ref)
  if split_name not in _PREFERENCE_SPLITS:
    raise ref.error("split", f"expected one of {sorted(_PREFERENCE_SPLITS)}, got {split_name!r}")
  strength = int(
      common.number(common.require(row, "preference_strength", ref), ref, "preference_strength", low=-3, high=3,
                    integer=True))
  label = 1 if strength < 0 else (0 if strength > 0 else -1)
  return _PREFERENCE_SPLITS[split_name], {
      "prompt": common.text(row, "prompt", ref),
      "response_a": common.text(row, "response_1", ref),
      "response_b": common.text(row, "response_2", ref),
      "label": np.asarray([label], np.int8),
      "mask": np.asarray([True]),
      "preference_strength": np.int8(strength),
  }
