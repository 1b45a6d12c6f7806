"""P-SOUPS (RLPHF, Personalized Soups) preferences with one label per preference pole (TFDS, array_record, no TF).

Upstream: https://github.com/joeljang/RLPHF; its data archive (https://storage.googleapis.com/personalized-soups/
data.zip) holds GPT-4-labelled reward-model training pairs, one file per preference pole, in `data/rm_training/`.
The six poles (attribute order `POLES`): P1A elementary, P1B knowledgeable (expertise), P2A concise, P2B informative
(informativeness), P3A friendly, P3B unfriendly (style). Other poles (e.g. P3C, P3D) are ignored.

Files: in `source_path` (a file or directory) or the manual directory, the first of `rm_training/`,
`data/rm_training/`, `psoups/` and the directory itself that holds pole files. A pole file is a JSON array or
JSON-lines file (optionally gzipped) whose name contains the pole code as a separate token (`P1A.json`,
`rm_p1a_train.jsonl`, ...) or the pole name (`elementary.json`); several files per pole are merged.

Row schemas read (assumed; the RLPHF reward-model trainer reads the first):
* RLPHF reward-model pairs: `{"user_input": str, "completion_a": str (preferred), "completion_b": str}`.
* AlpacaFarm annotator output (what RLPHF's gpt4_annotate writes): `{"instruction": str, "input": str
  (optional; appended after a blank line when non-empty), "output_1": str, "output_2": str, "preference": 1 | 2}`;
  any other finite preference (e.g. 1.5) is a tie.

Examples: one per distinct (prompt, unordered response pair) across all pole files: `prompt`, `response_a`,
`response_b` (Text; the two responses are ordered by a hash of their text, so `a` is not systematically the
preferred one), `label` (int8 [6]: 1 a preferred under the pole, 0 b, -1 tie or not annotated) and `mask`
(bool [6]: the pair was annotated for the pole). There are no scores. If a pole annotates the same pair twice with
opposite winners, the label is a tie. Splits: by a hash of the prompt (`HashSplitConfig`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from spectral_soup.data.builders import common

POLES = ("elementary", "knowledgeable", "concise", "informative", "friendly", "unfriendly")
POLE_CODES = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
SEARCH_SUBDIRS = ("rm_training", "data/rm_training", "psoups", ".")
_CODE_RE = re.compile(r"(?:^|[^a-z0-9])(p[1-9][a-z])(?=$|[^a-z0-9])")
_NAME_RE = re.compile(r"(?:^|[^a-z])(" + "|".join(POLES) + r")(?=$|[^a-z])")


@dataclasses.dataclass(eq=False)
class PSoupsConfig(common.HashSplitConfig):
  """Config of `PSoups` (see `common.HashSplitConfig` for the fields)."""


@dataclasses.dataclass
class _Pair:
  prompt: str
  response_a: str
  response_b: str
  label: np.ndarray  # int8 [len(POLES)]
  mask: np.ndarray  # bool [len(POLES)]


def pole_of_file(name: str) -> Optional[str]:
  """The pole code ('P1A', ..., or another code like 'P3C') a file name refers to, or None."""
  stem = common.strip_json_suffix(name).lower()
  match = _CODE_RE.search(stem)
  if match:
    return match.group(1).upper()
  match = _NAME_RE.search(stem)
  if match:
    return POLE_CODES[POLES.index(match.group(1))]
  return None


class PSoups(common.ManualSourceBuilder):
  """P-SOUPS pairwise preferences with per-pole labels (expertise, informativeness, style; two poles each)."""

  name = "spectral_soup_psoups"
  BUILDER_CONFIGS = common.default_hash_split_configs(PSoupsConfig)
  UPSTREAM = ("joeljang/RLPHF (https://github.com/joeljang/RLPHF; data archive "
              "https://storage.googleapis.com/personalized-soups/data.zip, directory data/rm_training/)")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download and unzip the RLPHF data archive (https://storage.googleapis.com/personalized-soups/data.zip) and "
      "pass the directory holding rm_training/ (or the per-pole files themselves) as the manual directory.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self._make_info(
        common.pair_features(len(POLES),
                             with_scores=False), description=__doc__, homepage="https://github.com/joeljang/RLPHF",
        citation="Jang et al., Personalized Soups: Personalized Large Language Model Alignment "
        "via Post-hoc Parameter Merging, 2023.")

  def _source_files(self, dl_manager: tfds.download.DownloadManager) -> Tuple[List[Tuple[str, epath.Path]], List[str]]:
    expected = f"per-pole preference files ({', '.join(POLE_CODES)})"
    root = self._source_root(dl_manager, expected)
    candidates = [root] if not root.is_dir() else []
    if root.is_dir():
      for sub in SEARCH_SUBDIRS:
        directory = root / sub if sub != "." else root
        if directory.is_dir():
          candidates = [p for p in common.json_files(directory) if pole_of_file(p.name)]
          if candidates:
            break
    wanted = [(pole_of_file(p.name), p) for p in candidates if pole_of_file(p.name) in POLE_CODES]
    ignored = [p.name for p in candidates if pole_of_file(p.name) not in POLE_CODES]
    if not wanted:
      raise self._missing(expected, root)
    wanted.sort(key=lambda item: (POLE_CODES.index(item[0]), item[1].name))
    return wanted, ignored

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    files, ignored = self._source_files(dl_manager)
    errors = common.RowErrors(config.skip_malformed)
    pairs: Dict[Tuple[str, str, str], _Pair] = {}
    counts = {"num_identical_responses": 0, "num_conflicting_duplicates": 0}
    for code, path in files:
      pole = POLE_CODES.index(code)
      for ref, row in common.iter_json_rows(path, errors):
        try:
          prompt, first, second, winner = _parse_row(row, ref)
        except common.MalformedRowError as e:
          errors.handle(e)
          continue
        if first == second:
          counts["num_identical_responses"] += 1
          continue
        a, b = sorted((first, second), key=lambda t: (common.stable_hash(t), t))
        pair = pairs.get((prompt, a, b))
        if pair is None:
          pair = pairs[(prompt, a, b)] = _Pair(prompt, a, b, np.full(len(POLES), -1, np.int8),
                                               np.zeros(len(POLES), bool))
        label = -1 if winner is None else (1 if winner == a else 0)
        if pair.mask[pole] and pair.label[pole] != label:
          counts["num_conflicting_duplicates"] += 1
          label = -1
        pair.label[pole] = label
        pair.mask[pole] = True
    per_split: Dict[str, List[_Pair]] = {s: [] for s in common.SPLITS}
    for pair in pairs.values():
      per_split[common.split_for_prompt(pair.prompt, config.validation_fraction, config.test_fraction,
                                        config.split_salt)].append(pair)
    self.info.metadata.update({
        "attributes": list(POLES),
        "pole_codes": list(POLE_CODES),
        "source_files": {
            code: sorted(p.name for c, p in files if c == code) for code in POLE_CODES
        },
        "ignored_files": ignored,
        "num_pairs": len(pairs),
        "num_source_rows": errors.rows_read,
        **counts,
        "malformed_rows": errors.as_metadata(),
    })
    return self._splits(per_split)

  def _generate_examples(self, pairs: List[_Pair]):
    for p in pairs:
      yield common.stable_hash(p.prompt, p.response_a, p.response_b).hex(), {
          "prompt": p.prompt,
          "response_a": p.response_a,
          "response_b": p.response_b,
          "label": p.label,
          "mask": p.mask
      }


def _parse_row(row: Dict[str, Any], ref: common.RowRef) -> Tuple[str, str, str, Optional[str]]:
  """(prompt, response 1, response 2, the preferred response or None for a tie), or `MalformedRowError`."""
  if "user_input" in row:
    prompt = common.text(row, "user_input", ref)
    chosen = common.text(row, "completion_a", ref)
    rejected = common.text(row, "completion_b", ref)
    return prompt, chosen, rejected, chosen
  if "instruction" in row:
    instruction = common.text(row, "instruction", ref)
    extra = common.text(row, "input", ref, allow_empty=True, default="")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output_1 = common.text(row, "output_1", ref)
    output_2 = common.text(row, "output_2", ref)
    preference = common.number(common.require(row, "preference", ref), ref, "preference")
    winner = output_1 if preference == 1 else (output_2 if preference == 2 else None)
    return prompt, output_1, output_2, winner
  raise ref.error(
      "user_input", "missing (expected user_input / completion_a / completion_b, or instruction / "
      "output_1 / output_2 / preference)")
