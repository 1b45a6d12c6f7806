"""Your own preference pairs (the JSON-lines layouts of `spectral_soup.data.jsonl`) as a TFDS builder (array_record).

Source: `source_path` in the builder config (a `.jsonl` file, or a directory written by Hugging Face `datasets`'
`save_to_disk`), else the manual directory holding `prefs.jsonl`. Both layouts of `spectral_soup/data/jsonl.py` are
read: `{"prompt", "chosen", "rejected", "attribute"}` rows, or `{"prompt", "response_a", "response_b", "labels":
{attribute: "a" | "b" | "tie"}}` and/or `"scores_a"` / `"scores_b"` rows. Every row is checked before anything is
written, and the first bad one is refused naming the file, the line and the field (`skip_malformed` is not
offered: a file of your own is fixed rather than filtered).

Features: `prompt`, `response_a`, `response_b` (Text), `label` (int8 [A]: 1 a preferred under attribute k, 0 b,
-1 tie or not judged), `mask` (bool [A]: the row judges attribute k), `scores_a` / `scores_b` (float32 [A]; NaN where
a row has no score for k, everywhere when the file has no scores: `info.metadata["has_scores"]`). A is only known
from the file, so the shapes are `(None,)`; the attribute names, in order of first appearance, are in
`info.metadata["attributes"]`.

Rows whose two responses are the same text are left out by `jsonl.read` (with a warning); a row that repeats an
earlier one exactly is kept once (counted in `info.metadata["num_duplicate_rows"]`, with a warning naming the
first).

Splits: train / validation / test by a hash of the prompt text, verbatim (`HashSplitConfig`); empty splits are left
out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from spectral_soup.data import jsonl
from spectral_soup.data.builders import common

PREFS_FILE = "prefs.jsonl"


@dataclasses.dataclass(eq=False)
class JsonlPrefsConfig(common.HashSplitConfig):
  """Config of `JsonlPrefs` (see `common.HashSplitConfig` for the fields).

  `skip_malformed` must stay False: every row of a file of your own is checked, and the first bad one is refused
  with its line and field (a file of your own is fixed rather than filtered). `tie_epsilon` applies to the
  attributes a row scores: two scores within it make the attribute a tie, whatever its label.
  """


class JsonlPrefs(common.ManualSourceBuilder):
  """Preference pairs from a JSON-lines file (or a `datasets` directory) of your own."""

  name = "spectral_soup_jsonl_prefs"
  BUILDER_CONFIGS = common.default_hash_split_configs(JsonlPrefsConfig)
  UPSTREAM = "your own data (write it in a layout of spectral_soup/data/jsonl.py)"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {PREFS_FILE} in the manual directory, or set the config's `source_path`."

  def _locate(self, manual_dir: Optional[epath.Path]) -> str:
    root = self._source_root(manual_dir, f"{PREFS_FILE} or a datasets directory")
    if root.is_dir() and not jsonl.is_dataset_dir(os.fspath(root)):
      path = root / PREFS_FILE
      if not path.exists():
        raise self._missing(PREFS_FILE, root)
      return os.fspath(path)
    return os.fspath(root)

  def _files(self, located: str) -> List[epath.Path]:
    path = epath.Path(located)
    if not path.is_dir():
      return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())  # A datasets directory: every file in it.

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    if config.skip_malformed:
      raise ValueError(f"{self.name}: skip_malformed=True is not offered for a file of your own: every row is "
                       "checked and the first bad one is refused with its line and field.")
    path = self._begin(dl_manager)
    # Raises ValueError naming the file, line and field of the first bad row. Exact repeats are kept here: they are
    # left out below, counted in the dataset's metadata.
    data = jsonl.read(path, keep_repeats=True)
    attributes = list(data["attributes"])
    num_attributes = len(attributes)
    nan = np.full(num_attributes, np.nan, np.float32)
    left_out = common.LeftOut("num_duplicate_rows")
    repeats = common.Repeats()
    examples = []
    for i, prompt in enumerate(data["prompt"]):
      example = {
          "prompt": prompt,
          "response_a": data["response_a"][i],
          "response_b": data["response_b"][i],
          "label": _ties(data, i, config.tie_epsilon),
          "mask": data["mask"][i],
          "scores_a": nan if data["scores_a"] is None else data["scores_a"][i],
          "scores_b": nan if data["scores_b"] is None else data["scores_b"][i]
      }
      key = (prompt, example["response_a"], example["response_b"], example["label"].tobytes(),
             example["mask"].tobytes(), example["scores_a"].tobytes(), example["scores_b"].tobytes())
      # jsonl.read has left out the rows whose two responses are the same text: pair i is not always line i + 1.
      where = f"pair {i + 1} (prompt {prompt[:60]!r})"
      first = repeats.first_of(key, where)
      if first is not None:
        left_out.add("num_duplicate_rows", f"{path}: {where} repeats {first}")
        continue
      examples.append((i, example))
    counts = left_out.as_metadata(self.name)
    self.info.metadata.update({
        "attributes": attributes,
        "source_file": path,
        "num_source_rows": len(data["prompt"]),
        "has_scores": data["scores_a"] is not None,
        **counts,
    })
    return self._hash_splits(examples, rows_read=len(data["prompt"]), left_out=counts)


def _ties(data: Dict[str, Any], i: int, tie_epsilon: float) -> np.ndarray:
  """Row i's labels, with the attributes whose two scores differ by at most `tie_epsilon` made ties (-1)."""
  label = data["label"][i]
  if not tie_epsilon or data["scores_a"] is None:
    return label
  with np.errstate(invalid="ignore"):
    close = np.abs(data["scores_a"][i] - data["scores_b"][i]) <= tie_epsilon  # False where a score is missing.
  return np.where(close & data["mask"][i], -1, label).astype(label.dtype)
