"""UltraFeedback fine-grained ratings as pairwise multi-attribute preferences (TFDS, array_record, no TensorFlow).

Upstream: the openbmb/UltraFeedback release (https://huggingface.co/datasets/openbmb/UltraFeedback), one JSON-lines
file per instruction source: `evol_instruct.jsonl`, `false_qa.jsonl`, `flan.jsonl`, `sharegpt.jsonl`,
`truthful_qa.jsonl`, `ultrachat.jsonl` (`.jsonl.gz` also accepted). Where the files are looked for: `source_path`
(a file, or a directory whose JSON / JSON-lines files are all read), else `<manual_dir>/ultrafeedback/` if it
exists (all its JSON files), else the six upstream names in `<manual_dir>`.

Row schema read (other keys are ignored):
  {"source": str (optional, default: the file name), "instruction": str,
   "completions": [{"model": str (optional), "response": str,
                    "annotations": {"instruction_following": A, "honesty": A, "truthfulness": A,
                                    "helpfulness": A}}, ...]}
where A is `{"Rating": "4", ...}` or a list of such dicts (their ratings are averaged). A rating is a number or
numeric string in [1, 5], or "N/A" (case-insensitive; also "NA", "none", "", null) for a missing rating: its
score is NaN, `mask` False and `label` -1. Anything else (a missing attribute, a NaN, out of range, an empty
response) is a malformed row.

Examples: for every instruction, pairs (i, j), i < j, of its completions in upstream order, with
`scores_a`, `scores_b` (float32 [4], attribute order `ATTRIBUTES`), `label` (int8 [4]: 1 a rated higher, 0 b, -1
tie or missing), `mask` (bool [4]), `source`, `model_a`, `model_b`. Configs:
* `all` (default): every pair (6 per instruction with 4 completions) or `pairs_per_prompt` of them.
* `conflicting`: only pairs where the attributes disagree (some available attribute prefers a, another prefers b;
  ties do not count), the conflicting-preference subset.
With `pairs_per_prompt=k`, k pairs per instruction are drawn (after the conflict filter) with a seed derived from
the instruction text, so the choice is reproducible. Splits: by a hash of the instruction text, verbatim
(`HashSplitConfig`). Instructions with fewer than two completions give no pairs (counted in `info.metadata`).
A pair of two completions with the same response text is left out (`num_identical_responses`), and a row that
repeats an earlier one exactly (instruction, completions and ratings; e.g. in two overlapping files) is read once
(`num_duplicate_rows`); both with a warning naming the first. `sharegpt.jsonl` and `sharegpt.jsonl.gz` (any two
files of one stem) side by side are refused rather than read twice.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from spectral_soup.data.builders import common

ATTRIBUTES = ("instruction_following", "honesty", "truthfulness", "helpfulness")
UPSTREAM_FILES = ("evol_instruct", "false_qa", "flan", "sharegpt", "truthful_qa", "ultrachat")
SUBDIR = "ultrafeedback"
_MISSING_RATINGS = ("n/a", "na", "none", "")


@dataclasses.dataclass(eq=False)
class UltraFeedbackConfig(common.HashSplitConfig):
  """Config of `UltraFeedback`.

  Attributes:
    pairs_per_prompt: keep at most this many pairs per instruction (None: all).
    conflicting_only: keep only pairs whose attributes disagree.
  """

  pairs_per_prompt: Optional[int] = None
  conflicting_only: bool = False

  def __post_init__(self):
    super().__post_init__()
    common.check_int(self, "pairs_per_prompt", "an integer >= 1, or None for all pairs", low=1, allow_none=True)
    common.check_bool(self, "conflicting_only")


@dataclasses.dataclass
class _Prompt:
  """One parsed instruction with its completions and the pairs selected from them."""

  key: str
  prompt: str
  source: str
  responses: List[str]
  models: List[str]
  scores: np.ndarray  # [n, len(ATTRIBUTES)] float32, NaN where "N/A".
  pairs: List[Tuple[int, int, np.ndarray, np.ndarray]]  # (i, j, label, mask)


class UltraFeedback(common.ManualSourceBuilder):
  """UltraFeedback pairs with per-attribute labels (instruction following, honesty, truthfulness, helpfulness)."""

  name = "spectral_soup_ultrafeedback"
  BUILDER_CONFIGS = [
      UltraFeedbackConfig(name="all", description="All completion pairs of every instruction."),
      UltraFeedbackConfig(name="conflicting", conflicting_only=True,
                          description="Pairs whose attribute preferences disagree."),
  ]
  DEFAULT_CONFIG_NAME = "all"
  UPSTREAM = "openbmb/UltraFeedback (https://huggingface.co/datasets/openbmb/UltraFeedback)"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the JSON-lines files of openbmb/UltraFeedback (evol_instruct.jsonl, false_qa.jsonl, flan.jsonl, "
      "sharegpt.jsonl, truthful_qa.jsonl, ultrachat.jsonl) into the manual directory, or into "
      "<manual_dir>/ultrafeedback/.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self._make_info(
        common.pair_features(len(ATTRIBUTES), extra_text=("source", "model_a", "model_b")), description=__doc__,
        homepage="https://github.com/OpenBMB/UltraFeedback",
        citation="Cui et al., UltraFeedback: Boosting Language Models with High-quality Feedback, 2023.")

  def _locate(self, manual_dir: Optional[epath.Path]) -> List[epath.Path]:
    names = ", ".join(f"{n}.jsonl" for n in UPSTREAM_FILES)
    root = self._source_root(manual_dir, f"the UltraFeedback files ({names})")
    if not root.is_dir():
      return [root]
    if self.builder_config.source_path or (root / SUBDIR).is_dir():
      directory = root if self.builder_config.source_path else root / SUBDIR
      files = common.json_files(directory)
    else:
      directory = root
      files = [p for p in common.json_files(root) if common.strip_json_suffix(p.name) in UPSTREAM_FILES]
    if not files:
      raise self._missing(f"the UltraFeedback files ({names})", directory)
    common.refuse_twins(files)
    return files

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    files = self._begin(dl_manager)
    errors = common.RowErrors(config.skip_malformed)
    left_out = common.LeftOut("num_identical_responses", "num_duplicate_rows")
    repeats = common.Repeats()
    per_split: Dict[str, List[_Prompt]] = {s: [] for s in common.SPLITS}
    counts = {
        "num_prompts_without_pairs": 0,
        "num_missing_ratings": 0,
        "num_candidate_pairs": 0,
        "num_conflicting_pairs": 0,
        "num_pairs": 0
    }
    for path in files:
      for ref, row in common.iter_json_rows(path, errors):
        try:
          prompt = _parse_row(row, ref, default_source=common.strip_json_suffix(path.name))
        except common.MalformedRowError as e:
          errors.handle(e)
          continue
        where = f"{ref.path} row {ref.number}"
        first = repeats.first_of(
            (prompt.prompt, tuple(prompt.responses), tuple(prompt.models), prompt.scores.tobytes()), where)
        if first is not None:
          left_out.add("num_duplicate_rows", f"{where} repeats {first}")
          continue
        counts["num_missing_ratings"] += int(np.isnan(prompt.scores).sum())
        candidates = []
        for i, j in itertools.combinations(range(len(prompt.responses)), 2):
          if prompt.responses[i] == prompt.responses[j]:
            left_out.add("num_identical_responses", f"{where} (completions[{i}] and completions[{j}])")
            continue
          label, mask = common.pair_labels(prompt.scores[i], prompt.scores[j], tie_epsilon=config.tie_epsilon)
          conflict = common.has_conflict(label, mask)
          counts["num_candidate_pairs"] += 1
          counts["num_conflicting_pairs"] += int(conflict)
          if conflict or not config.conflicting_only:
            candidates.append((i, j, label, mask))
        prompt.pairs = common.subsample(candidates, config.pairs_per_prompt, config.split_salt, prompt.prompt)
        if not prompt.pairs:
          counts["num_prompts_without_pairs"] += 1
          continue
        counts["num_pairs"] += len(prompt.pairs)
        split = common.split_for_prompt(prompt.prompt, config.validation_fraction, config.test_fraction,
                                        config.split_salt)
        per_split[split].append(prompt)
    left_out_counts = left_out.as_metadata(self.name)
    self.info.metadata.update({
        "attributes": list(ATTRIBUTES),
        "source_files": [p.name for p in files],
        "pairs_per_prompt": config.pairs_per_prompt,
        "conflicting_only": config.conflicting_only,
        "num_source_rows": errors.rows_read,
        **counts,
        **left_out_counts,
        "malformed_rows": errors.as_metadata(),
    })
    return self._splits(per_split, rows_read=errors.rows_read, malformed=errors.count, left_out={
        "num_prompts_without_pairs": counts["num_prompts_without_pairs"],
        **left_out_counts
    })

  def _generate_examples(self, prompts: Sequence[_Prompt]):
    for p in prompts:
      for i, j, label, mask in p.pairs:
        yield f"{p.key}:{i}:{j}", {
            "prompt": p.prompt,
            "response_a": p.responses[i],
            "response_b": p.responses[j],
            "scores_a": p.scores[i],
            "scores_b": p.scores[j],
            "label": label,
            "mask": mask,
            "source": p.source,
            "model_a": p.models[i],
            "model_b": p.models[j]
        }


def parse_rating(value: Any, ref: common.RowRef, name: str) -> float:
  """One annotation (a dict with "Rating", or a list of them) -> rating in [1, 5], or NaN for "N/A"."""
  if isinstance(value, list):
    if not value:
      raise ref.error(name, "empty list of annotations")
    ratings = [parse_rating(v, ref, f"{name}[{k}]") for k, v in enumerate(value)]
    present = [r for r in ratings if not np.isnan(r)]
    return float(np.mean(present)) if present else float("nan")
  if not isinstance(value, dict):
    raise ref.error(name, f"expected an object with 'Rating' (or a list of them), got {type(value).__name__}")
  if "Rating" not in value:
    raise ref.error(f"{name}.Rating", "missing")
  rating = value["Rating"]
  name = f"{name}.Rating"
  if rating is None or (isinstance(rating, str) and rating.strip().lower() in _MISSING_RATINGS):
    return float("nan")
  if isinstance(rating, str):
    try:
      rating = float(rating.strip())
    except ValueError:
      raise ref.error(name, f"not a number or 'N/A': {value['Rating']!r}") from None
  return common.number(rating, ref, name, low=1, high=5)


def _parse_row(row: Dict[str, Any], ref: common.RowRef, default_source: str) -> _Prompt:
  """One instruction with its completions, or `MalformedRowError`."""
  instruction = common.text(row, "instruction", ref)
  source = common.text(row, "source", ref, default=default_source)
  completions = common.require(row, "completions", ref)
  if not isinstance(completions, list):
    raise ref.error("completions", f"expected a list, got {type(completions).__name__}")
  responses, models, scores = [], [], []
  for c, completion in enumerate(completions):
    name = f"completions[{c}]"
    if not isinstance(completion, dict):
      raise ref.error(name, f"expected an object, got {type(completion).__name__}")
    responses.append(common.text(completion, "response", ref, name=f"{name}.response"))
    models.append(common.text(completion, "model", ref, name=f"{name}.model", allow_empty=True, default=""))
    annotations = common.require(completion, "annotations", ref, f"{name}.annotations")
    if not isinstance(annotations, dict):
      raise ref.error(f"{name}.annotations", f"expected an object, got {type(annotations).__name__}")
    scores.append([
        parse_rating(common.require(annotations, a, ref, f"{name}.annotations.{a}"), ref, f"{name}.annotations.{a}")
        for a in ATTRIBUTES
    ])
  return _Prompt(key=f"{ref.path.rsplit('/', 1)[-1]}:{ref.number}", prompt=instruction, source=source,
                 responses=responses, models=models,
                 scores=np.asarray(scores, np.float32).reshape(len(responses), len(ATTRIBUTES)), pairs=[])
