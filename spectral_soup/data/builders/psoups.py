"""P-SOUPS (RLPHF, Personalized Soups) preferences with one label per preference pole (TFDS, array_record, no TF).

Upstream: https://github.com/joeljang/RLPHF; its data archive (https://storage.googleapis.com/personalized-soups/
data.zip) holds GPT-4-labelled reward-model training pairs, one file per preference pole, in `data/rm_training/`.
The six poles (attribute order `POLES`): P1A elementary, P1B knowledgeable (expertise), P2A concise, P2B informative
(informativeness), P3A friendly, P3B unfriendly (style). Other poles (e.g. P3C, P3D) are ignored.

Files: in `source_path` (a file or directory) or the manual directory, the first of `rm_training/`,
`data/rm_training/`, `psoups/` and the directory itself that holds files of the six poles (a directory holding only
other poles' files, e.g. P3C, is passed over). A pole file is a JSON array or JSON-lines file (optionally gzipped;
suffixes in any case) whose name contains the pole code as a separate token, in any case (`P1A.json`,
`rm_p1a_train.jsonl`, ...) or the pole name (`elementary.json`); several files per pole are merged. A name that
names two poles (`P1A_P2B.json`) is refused, as are two files of one stem (`P1A.json` and `P1A.json.gz`). Pole names
must stand alone (`elementary.json` counts, `elementaryschool.json` does not).

Row schemas read (assumed; the RLPHF reward-model trainer reads the first):
* RLPHF reward-model pairs: `{"user_input": str, "completion_a": str (preferred), "completion_b": str}`.
* AlpacaFarm annotator output (what RLPHF's gpt4_annotate writes): `{"instruction": str, "input": str
  (optional; appended after a blank line when non-empty), "output_1": str, "output_2": str, "preference": 1 | 2}`;
  a preference strictly between 1 and 2 (e.g. 1.5) is a tie; anything outside [1, 2] (a 0/1 coding) is malformed.

Examples: one per distinct (prompt, unordered response pair) across all pole files: `prompt`, `response_a`,
`response_b` (Text; the two responses are ordered by a hash of their text, so `a` is not systematically the
preferred one), `label` (int8 [6]: 1 a preferred under the pole, 0 b, -1 tie or not annotated) and `mask`
(bool [6]: the pair was annotated for the pole). There are no scores. A pair annotated again for the same pole is
one example (`info.metadata["num_repeated_annotations"]`); if the annotations disagree, the label is a tie
(`num_conflicting_duplicates`). A row whose two responses are the same text is left out
(`num_identical_responses`, with a warning naming the first). Splits: by a hash of the prompt text, verbatim
(`HashSplitConfig`).
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
  """Config of `PSoups` (see `common.HashSplitConfig` for the fields; `tie_epsilon` stays 0: the pairs carry labels,
  no scores)."""

  def __post_init__(self):
    super().__post_init__()
    if self.tie_epsilon != 0:  # It named a dataset of its own whose labels were the same.
      raise common.config_error(self, "tie_epsilon", "0 (P-SOUPS pairs carry labels, no scores: no score difference "
                                "to call a tie)")


@dataclasses.dataclass
class _Pair:
  prompt: str
  response_a: str
  response_b: str
  label: np.ndarray  # int8 [len(POLES)]
  mask: np.ndarray  # bool [len(POLES)]


def poles_of_file(name: str) -> List[str]:
  """Every pole code ('P1A', ..., or another code like 'P3C') a file name refers to, by code or pole name, sorted."""
  stem = common.strip_json_suffix(name).lower()
  codes = {m.group(1).upper() for m in _CODE_RE.finditer(stem)}
  codes |= {POLE_CODES[POLES.index(m.group(1))] for m in _NAME_RE.finditer(stem)}
  return sorted(codes)


def pole_of_file(name: str) -> Optional[str]:
  """The pole code ('P1A', ..., or another code like 'P3C') a file name refers to, or None (see `poles_of_file`)."""
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

  def _locate(self, manual_dir: Optional[epath.Path]) -> Tuple[List[Tuple[str, epath.Path]], List[str]]:
    """([(pole code, file)] of the six poles, sorted; names of the pole files of other poles, ignored)."""
    expected = f"per-pole preference files ({', '.join(POLE_CODES)})"
    root = self._source_root(manual_dir, expected)
    candidates = [root] if not root.is_dir() else []
    searched = [root]
    if root.is_dir():
      searched = [root / sub if sub != "." else root for sub in SEARCH_SUBDIRS]
      for directory in searched:
        if directory.is_dir():
          files = [p for p in common.json_files(directory) if pole_of_file(p.name)]
          if any(pole_of_file(p.name) in POLE_CODES for p in files):  # Another pole's files alone do not count.
            candidates = files
            break
    for path in candidates:
      poles = poles_of_file(path.name)
      if len(poles) > 1 and set(poles) & set(POLE_CODES):
        raise common.SourceFileError(f"{path}: the file name names several poles ({', '.join(poles)}): expected one "
                                     "pole per file (rename it after the pole its preferences are for).")
    wanted = [(pole_of_file(p.name), p) for p in candidates if pole_of_file(p.name) in POLE_CODES]
    ignored = [p.name for p in candidates if pole_of_file(p.name) not in POLE_CODES]
    common.refuse_twins([path for _, path in wanted])
    if not wanted:
      where = ", ".join(str(d) for d in searched)
      raise common.SourceNotFoundError(common.missing_source_message(self.name, expected, where, self.UPSTREAM))
    wanted.sort(key=lambda item: (POLE_CODES.index(item[0]), item[1].name))
    return wanted, ignored

  def _files(self, located: Tuple[List[Tuple[str, epath.Path]], List[str]]) -> List[epath.Path]:
    return [path for _, path in located[0]]

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    files, ignored = self._begin(dl_manager)
    errors = common.RowErrors(config.skip_malformed)
    left_out = common.LeftOut("num_identical_responses")
    pairs: Dict[Tuple[str, str, str], _Pair] = {}
    counts = {"num_conflicting_duplicates": 0, "num_repeated_annotations": 0}
    for code, path in files:
      pole = POLE_CODES.index(code)
      for ref, row in common.iter_json_rows(path, errors):
        try:
          prompt, first, second, winner = _parse_row(row, ref)
        except common.MalformedRowError as e:
          errors.handle(e)
          continue
        if first == second:
          left_out.add("num_identical_responses", f"{ref.path} row {ref.number}")
          continue
        a, b = sorted((first, second), key=lambda t: (common.stable_hash(t), t))
        pair = pairs.get((prompt, a, b))
        if pair is None:
          pair = pairs[(prompt, a, b)] = _Pair(prompt, a, b, np.full(len(POLES), -1, np.int8),
                                               np.zeros(len(POLES), bool))
        label = -1 if winner is None else (1 if winner == a else 0)
        if pair.mask[pole]:
          # The same pair annotated again for this pole: merged into one example (never weighted twice).
          counts["num_repeated_annotations"] += 1
          if pair.label[pole] != label:
            counts["num_conflicting_duplicates"] += 1
            label = -1
        pair.label[pole] = label
        pair.mask[pole] = True
    per_split: Dict[str, List[_Pair]] = {s: [] for s in common.SPLITS}
    for pair in pairs.values():
      per_split[common.split_for_prompt(pair.prompt, config.validation_fraction, config.test_fraction,
                                        config.split_salt)].append(pair)
    left_out_counts = left_out.as_metadata(self.name)
    self.info.metadata.update({
        "attributes": list(POLES),
        "pole_codes": list(POLE_CODES),
        "source_files": {
            code: sorted(p.name for c, p in files if c == code) for code in POLE_CODES
        },
        "ignored_files": ignored,
        "num_pairs": len(pairs),
        "num_source_rows": errors.rows_read,
        **left_out_counts,
        **counts,
        "malformed_rows": errors.as_metadata(),
    })
    return self._splits(per_split, rows_read=errors.rows_read, malformed=errors.count, left_out=left_out_counts)

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
    if not 1 <= preference <= 2:
      raise ref.error(
          "preference", f"{preference:g} is outside [1, 2]: expected 1 (output_1 preferred), 2 (output_2 preferred) "
          "or a value strictly between (a tie)")
    winner = output_1 if preference == 1 else (output_2 if preference == 2 else None)
    return prompt, output_1, output_2, winner
  raise ref.error(
      "user_input", "missing (expected user_input / completion_a / completion_b, or instruction / "
      "output_1 / output_2 / preference)")
