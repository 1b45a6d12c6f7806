r"""Preference pairs for basis training from the TFDS builders: UltraFeedback, HelpSteer2, P-SOUPS.

    tokenizer = sources.load_tokenizer(config)              # config.data.tokenizer, else config.model.path's
    train, held_out, metadata = sources.builder_pairs(config, tokenizer)

`builder_pairs` builds `config.data.source` with `spectral_soup.data.builders.load_source` (from the upstream files
in `config.data.manual_dir`, into `config.data.data_dir`; nothing is downloaded), reads the train and eval splits,
tokenizes them and returns arrays in the `input_pipeline` pair format:

    prompt int32[N, P], prompt_mask bool[N, P]          chat-formatted, cut from the text's start, left-padded
    response_a/_b int32[N, R], response_*_mask bool[N, R]  text + end-of-sequence token, right-truncated, right-padded
    labels int8[N, K]                                     BT label of basis k (1: a preferred, 0: b, -1: none)
    scores_a/_b f32[N, K]                                 rating of each response under basis k (NaN: missing)

**Bases on attribute weightings (docs/METHOD.md section 3).** A source has A attributes (UltraFeedback: 4 ratings,
HelpSteer2: 5 ratings, P-SOUPS: 6 preference poles). `config.data.attributes` selects and orders them (empty: all, in
the builder's order); a leading "-" negates one ("-verbosity": the less verbose response wins). Basis k is defined by
a fixed weight vector w_k in R^A (`attribute_weightings`, rows of W: [K, A]):

* bases 0..A-1 are the one-hot attributes (w_k = e_k), so K = A gives one basis per attribute;
* bases A..K-1 are Dirichlet(alpha * 1_A) draws from `numpy.random.default_rng(config.data.seed)`: fixed, seeded
  points of the simplex (K = 30 on UltraFeedback's 4 attributes, as in the paper).

Per pair and attribute, d = score_a - score_b (for sources without scores, P-SOUPS: d = +1 if a is preferred, -1 if
b is, 0 on a tie). Basis k's label is the Bradley-Terry label of w_k . d: 1 if w_k . d > margin, 0 if
w_k . d < -margin, -1 otherwise or when an attribute with w_k != 0 is missing for the pair (margin:
`config.data.label_margin`, in rating units). For a one-hot w_k and margin 0 this is exactly the builder's
per-attribute label. Basis k's ratings are s . w_k (NaN when a weighted attribute is missing, or the source has no
scores). Pairs without a single basis label (dpo) or without a single rating difference (ratings) are dropped.
`metadata` records the attributes, W, the builder config and the pair counts; `basis_metadata(config)` recomputes
the data-independent part (attributes and W) from the config alone.

In a multi-host job every host builds (on first use) and reads the same dataset; the build is deterministic, so keep
`data_dir` on each host's local disk (the configs' `data/tfds`, under the code directory), never on a directory the
hosts share, where their builds would race.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np
from absl import logging

from spectral_soup.data import jsonl
from spectral_soup.offline import input_pipeline

BUILDER_SOURCES = ("ultrafeedback", "helpsteer2", "psoups")
# Attribute order of each builder's `label` / `scores_*` columns: the builders' ATTRIBUTES / POLES, repeated here so
# that importing this module (train.py does) does not import TFDS; tests/test_sources.py checks that they agree.
SOURCE_ATTRIBUTES = {
    "ultrafeedback": ("instruction_following", "honesty", "truthfulness", "helpfulness"),
    "helpsteer2": ("helpfulness", "correctness", "coherence", "complexity", "verbosity"),
    "psoups": ("elementary", "knowledgeable", "concise", "informative", "friendly", "unfriendly"),
}
HELPSTEER2_PREFERENCE_ATTRIBUTES = ("preference",)  # HelpSteer2's `preference` variant: one human label.
JSONL_EVAL_FRACTION = 0.1  # Share of a JSON-lines file's prompts held out when config.data has no eval_fraction.
LABEL_ONLY_SOURCES = ("psoups",)  # Sources whose pairs carry labels but no scores.
_READ_CHUNK = 4_096  # Examples read from the array_record source per call.

# ----------------------------------------------------------------------------------------------------------------
# Config: the builder config, the attributes and the weightings.


def builder_config(config: ml_collections.ConfigDict) -> Any:
  """`config.data.builder_config` as `builders.load_source` takes it (a config name, or a BuilderConfig).

  A string names a predefined config; a mapping holds `base` (a predefined config name, default: the source's
  default) and fields to override. Overrides equal to the base's values are dropped, so they do not create a
  separately named dataset.
  """
  from spectral_soup.data import builders  # pylint: disable=g-import-not-at-top
  source, value = config.data.source, config.data.get("builder_config", None)
  if value is None or isinstance(value, str):
    if value and value not in builders.BUILDERS[source].builder_configs:
      raise ValueError(f"config.data.builder_config={value!r} is invalid: expected one of "
                       f"{sorted(builders.BUILDERS[source].builder_configs)} or a mapping of overrides.")
    return value or None
  overrides = dict(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
  given = dict(overrides)
  base = overrides.pop("base", None) or builders.BUILDERS[source].DEFAULT_CONFIG_NAME
  try:
    template = builders.BUILDERS[source].builder_configs[base]
  except KeyError:
    raise ValueError(f"config.data.builder_config.base={base!r} is invalid: expected one of "
                     f"{sorted(builders.BUILDERS[source].builder_configs)}.") from None
  overrides = {k: v for k, v in overrides.items() if not hasattr(template, k) or getattr(template, k) != v}
  try:
    return builders.make_config(source, base, **overrides)
  except ValueError as e:
    raise ValueError(f"config.data.builder_config={given!r} is invalid: {e}") from None


def source_attributes(config: ml_collections.ConfigDict) -> Tuple[str, ...]:
  """The attributes (label columns) of `config.data.source` under `config.data.builder_config`, builder order."""
  source = config.data.source
  if jsonl.is_jsonl(source):
    return read_jsonl(source)["attributes"]
  if source == "helpsteer2":
    resolved = builder_config(config)
    if resolved is None:
      from spectral_soup.data import builders  # pylint: disable=g-import-not-at-top
      resolved = builders.BUILDERS[source].DEFAULT_CONFIG_NAME
    variant = resolved if isinstance(resolved, str) else resolved.variant
    if variant == "ratings":
      raise ValueError("config.data.builder_config='ratings' is invalid for basis training: HelpSteer2's ratings "
                       "variant has single responses; use 'pairs' (per-attribute labels) or 'preference'.")
    if variant == "preference":
      return HELPSTEER2_PREFERENCE_ATTRIBUTES
  return SOURCE_ATTRIBUTES[source]


def selected_attributes(config: ml_collections.ConfigDict) -> Tuple[Tuple[str, ...], np.ndarray, np.ndarray]:
  """(names, columns int[A], signs f32[A]) of `config.data.attributes` ("-name": negated; empty: all)."""
  available = source_attributes(config)
  names = tuple(config.data.get("attributes", ()) or available)
  columns, signs = [], []
  for name in names:
    base = name[1:] if name.startswith("-") else name
    if base not in available:
      raise ValueError(f"config.data.attributes={names!r} is invalid: {base!r} is not an attribute of "
                       f"{config.data.source} (expected names from {available}, optionally prefixed by '-').")
    columns.append(available.index(base))
    signs.append(-1.0 if name.startswith("-") else 1.0)
  if len(set(names)) != len(names):  # An attribute and its negation may both be bases (the two poles).
    raise ValueError(f"config.data.attributes={names!r} is invalid: an attribute appears twice.")
  return names, np.asarray(columns, np.int64), np.asarray(signs, np.float32)


def attribute_weightings(num_bases: int, num_attributes: int, alpha: float, seed: int) -> np.ndarray:
  """W: f32[K, A]. Rows 0..A-1 are the one-hot attributes; rows A..K-1 are seeded Dirichlet(alpha) draws."""
  if num_bases < num_attributes:
    raise ValueError(f"num_bases={num_bases} < {num_attributes} attributes: every attribute needs its basis.")
  extra = np.random.default_rng(seed).dirichlet(np.full(num_attributes, alpha), size=num_bases - num_attributes)
  return np.concatenate([np.eye(num_attributes), extra.reshape(-1, num_attributes)]).astype(np.float32)


def basis_metadata(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """What basis k means: {"source", "attributes": [A names], "weightings": [K][A]} (no data is read)."""
  names, _, _ = selected_attributes(config)
  weights = attribute_weightings(config.basis.num_bases, len(names), config.data.get("weighting_alpha", 1.0),
                                 config.data.seed)
  return {"source": config.data.source, "attributes": list(names), "weightings": weights.tolist()}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the `config.data` fields of a builder source (no file is touched); raises ValueError naming a field."""
  from spectral_soup.utils import config_check  # pylint: disable=g-import-not-at-top
  need = config_check.field_checker(config)
  d = config.data
  # Seeds the weightings' draws and the subsets read (numpy refuses negative seeds, without naming the field).
  need(isinstance(d.seed, int) and not isinstance(d.seed, bool) and d.seed >= 0, "data.seed", "an integer >= 0")
  if jsonl.is_jsonl(d.source):
    _validate_jsonl_config(config, need)
    return
  if isinstance(d.source, str) and os.path.exists(d.source) and d.source not in BUILDER_SOURCES:
    kind = "file" if os.path.isfile(d.source) else "directory"
    need(
        False, "data.source", f"a JSON-lines file named .jsonl (plain, not compressed) or a directory written by "
        f"datasets' save_to_disk (this {kind} is neither), or one of {BUILDER_SOURCES}")
  need(d.source in BUILDER_SOURCES, "data.source", f"one of {BUILDER_SOURCES}, a .jsonl file of pairs or a datasets "
       "directory (save_to_disk)")
  for field in ("data_dir", "manual_dir", "tokenizer", "train_split", "eval_split"):
    need(isinstance(d.get(field, None), str), f"data.{field}", "a string")
  need(bool(d.train_split), "data.train_split", "a split name ('train')")
  need(
      d.eval_split != d.train_split, "data.eval_split",
      f"a held-out split ('validation' or 'test') other than data.train_split={d.train_split!r}, or '' (none): "
      f"its pairs would be training pairs")
  for field in ("train_split", "eval_split"):
    need(
        "[" not in d[field], f"data.{field}", "a split name ('train', 'validation', 'test') without a slice: "
        f"data.num_{field.split('_')[0]}_pairs sets how many pairs are read")
  need(bool(config.model.path or d.tokenizer), "data.tokenizer",
       "a local tokenizer (or checkpoint) directory when config.model.path is empty")
  builder_config(config)  # Raises naming data.builder_config.
  names, _, _ = selected_attributes(config)  # Raises naming data.attributes.
  need(
      config.basis.num_bases >= len(names), "basis.num_bases",
      f">= the {len(names)} attributes {names} (one basis per attribute, then weightings); select fewer with "
      f"config.data.attributes")
  need(d.weighting_alpha > 0, "data.weighting_alpha", "> 0")
  need(d.label_margin >= 0, "data.label_margin", ">= 0")
  need(d.prompt_len >= 1 and d.response_len >= 1, "data.response_len", "prompt_len >= 1 and response_len >= 1")
  if config.loss.kind == "ratings":
    need(d.source not in LABEL_ONLY_SOURCES and names != HELPSTEER2_PREFERENCE_ATTRIBUTES, "loss.kind",
         f"'dpo' for {d.source} (its pairs have labels, no ratings)")


# ----------------------------------------------------------------------------------------------------------------
# Labels and ratings of the K bases.


def _validate_jsonl_config(config: ml_collections.ConfigDict, need) -> None:
  """`validate_config` for a JSON-lines source: the file is read and every row checked (`data.jsonl`)."""
  d = config.data
  need(bool(config.model.path or d.get("tokenizer", "")), "data.tokenizer",
       "a local tokenizer (or checkpoint) directory when config.model.path is empty")
  need(0.0 <= d.get("eval_fraction", JSONL_EVAL_FRACTION) < 1.0, "data.eval_fraction", "in [0, 1)")
  examples = read_jsonl(d.source)  # Raises naming the file, line and field of the first bad row.
  names, _, _ = selected_attributes(config)  # Raises naming data.attributes.
  need(
      config.basis.num_bases >= len(names), "basis.num_bases",
      f">= the {len(names)} attributes {names} of {d.source} (one basis per attribute, then weightings); select "
      "fewer with config.data.attributes")
  need(d.get("weighting_alpha", 1.0) > 0, "data.weighting_alpha", "> 0")
  need(d.get("label_margin", 0.0) >= 0, "data.label_margin", ">= 0")
  if config.loss.kind == "ratings":
    need(examples["scores_a"] is not None, "loss.kind", f"'dpo' for {d.source} (its rows have labels, no scores)")
  _check_jsonl_splits(config)


def _check_jsonl_splits(config: ml_collections.ConfigDict) -> None:
  """What `builder_pairs` would refuse after the model has loaded, checked on the file first (no tokenizer needed):
  a split with fewer labelled pairs than one batch (every pair a tie, say), and a rating difference beyond what the
  ratings loss takes (`input_pipeline.MAX_RATING_TARGET`), named by its line in the file."""
  d, train = config.data, config.get("train", None)
  fraction = d.get("eval_fraction", JSONL_EVAL_FRACTION)
  weights = np.asarray(basis_metadata(config)["weightings"], np.float32)
  splits = [("train", d.get("num_train_pairs", 0), "batch_size")]
  if fraction:
    splits.append(("eval", d.get("num_eval_pairs", 0), "eval_batch_size"))
  for split, limit, batch_field in splits:
    if limit <= 0:
      continue
    examples = read_split(config, split, limit)
    _, rated_a, rated_b, keep = pair_targets(examples, config, weights)
    read, kept = len(examples["prompt"]), int(np.sum(keep))
    batch = train.get(batch_field, None) if train is not None else None
    if batch is not None and kept < batch and (split == "train" or kept):  # An empty held-out share only warns.
      share = (f"the training share (the prompts not held out by data.eval_fraction={fraction})"
               if split == "train" else f"the held-out share (data.eval_fraction={fraction})")
      untaught = "every label a tie or null" if config.loss.kind == "dpo" else "no rating difference"
      raise ValueError(
          f"config.train.{batch_field}={batch} is invalid: {d.source} has {kept} labelled pairs in "
          f"{share}, fewer than one batch ({read} rows read, at most data.num_{split}_pairs={limit}" +
          (f"; {read - kept} of them teach no basis: {untaught} for the selected attributes" if read > kept else "") +
          "). Use a smaller batch, or a file with more rows.")
    if config.loss.kind == "ratings":
      scale = config.loss.rating_scale
      with np.errstate(invalid="ignore", over="ignore"):
        beyond = np.abs(scale * (rated_a - rated_b)) > input_pipeline.MAX_RATING_TARGET
      if np.any(beyond):
        row, basis = (int(i[0]) for i in np.nonzero(beyond))
        a, b = rated_a[row, basis], rated_b[row, basis]
        raise ValueError(
            f"{examples['where'][row]}: loss.rating_scale * (rating_a - rating_b) = {scale:g} * ({a:g} - {b:g}) "
            f"for basis {basis} is beyond +-{input_pipeline.MAX_RATING_TARGET:g}, the "
            "largest rating difference the ratings loss takes (its float32 squares must stay finite): expected "
            "smaller scores (rescale them) or a smaller loss.rating_scale.")


def read_jsonl(path: str) -> Dict[str, Any]:
  """`jsonl.read(path)`, read once per version of the file."""
  stat = os.stat(path) if os.path.isfile(path) else None
  return _read_jsonl_cached(path, None if stat is None else (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_jsonl_cached(path: str, version: Any) -> Dict[str, Any]:
  del version  # Part of the cache key only.
  return jsonl.read(path)


def attribute_differences(scores_a: Optional[np.ndarray], scores_b: Optional[np.ndarray], label: np.ndarray,
                          mask: np.ndarray) -> np.ndarray:
  """d: f32[N, A], score_a - score_b, or +1 / -1 / 0 from the label where a pair has no scores for an attribute (a
  file without scores, or an attribute only labelled in a file that scores others); NaN: missing.

  A pair the builder labels a tie (label -1 under the mask) has d = 0 whatever its scores: a builder config's
  `tie_epsilon` makes scores within it ties, and a one-hot basis then learns the builder's label.
  """
  signs = np.where(label == 1, 1.0, np.where(label == 0, -1.0, 0.0))
  if scores_a is not None:
    with np.errstate(invalid="ignore"):
      diff = scores_a - scores_b
    signs = np.where(np.isnan(diff) | (label == -1), signs, diff)
  return np.where(mask, signs, np.nan).astype(np.float32)


def weighted(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """values f32[N, A] (NaN: missing), W f32[K, A] -> f32[N, K]: values . w_k (NaN if a weighted value is missing)."""
  missing = (~np.isfinite(values)).astype(np.float32) @ (weights != 0).T.astype(np.float32) > 0
  out = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0) @ weights.T
  return np.where(missing, np.nan, out).astype(np.float32)


def basis_labels(differences: np.ndarray, weights: np.ndarray, margin: float = 0.0) -> np.ndarray:
  """int8[N, K]: the BT label of w_k . d (1: a preferred, 0: b preferred, -1: tie within `margin` or missing)."""
  value = weighted(differences, weights)
  with np.errstate(invalid="ignore"):
    return np.where(value > margin, 1, np.where(value < -margin, 0, -1)).astype(np.int8)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization.


def load_tokenizer(config: ml_collections.ConfigDict):
  """The tokenizer of `config.data.tokenizer` (a local directory or .gguf), else of `config.model.path`."""
  from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
  path = config.data.get("tokenizer", "") or config.model.path
  if not path:
    raise ValueError("config.data.tokenizer='' is invalid: expected a local tokenizer (or checkpoint) directory "
                     "when config.model.path is empty.")
  tokenizer = hf_import.tokenizer_from_pretrained(path)
  if config.model.path and path != config.model.path:
    _check_same_tokenizer(config, tokenizer)
  return tokenizer


def _check_same_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> None:
  """ValueError when data.tokenizer is not model.path's own tokenizer (when the checkpoint has one): its ids would
  mean other tokens to the model (a config for a random backbone's toy tokenizer, with a real model.path)."""
  from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
  try:
    own = hf_import.tokenizer_from_pretrained(config.model.path)
  except (OSError, ValueError):  # The checkpoint carries no tokenizer: data.tokenizer is the one to use.
    return
  if own.get_vocab() != tokenizer.get_vocab() or own.eos_token_id != tokenizer.eos_token_id:
    raise ValueError(f"config.data.tokenizer={config.data.tokenizer!r} is invalid: it is not the tokenizer of "
                     f"config.model.path={config.model.path!r} ({len(tokenizer)} tokens, end-of-sequence id "
                     f"{tokenizer.eos_token_id}, against {len(own)} and {own.eos_token_id}), so its ids would mean "
                     "other tokens to the model; set data.tokenizer='' to use the checkpoint's.")


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool) -> List[List[int]]:
  """Token ids of each prompt as one user turn of the chat template (if asked and the tokenizer has one)."""
  if chat_template and getattr(tokenizer, "chat_template", None):
    texts = [
        tokenizer.apply_chat_template([{
            "role": "user",
            "content": p
        }], tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
  return tokenizer(list(prompts))["input_ids"]  # With the tokenizer's own special tokens (e.g. BOS).


def template_head(tokenizer, chat_template: bool = True) -> int:
  """How many tokens the encoding puts before the user's text (BOS, a system turn, the user header): the common
  prefix of two one-letter prompts' encodings."""
  a, b = encode_prompts(tokenizer, ["a", "b"], chat_template)
  head = 0
  while head < min(len(a), len(b)) and a[head] == b[head]:
    head += 1
  return head


def keep_prompt_end(ids: Sequence[int], prompt_len: int, head: int) -> List[int]:
  """A prompt's encoding cut to `prompt_len` tokens from the left of its text: its first `head` tokens (the
  template's start, `template_head`) and its last `prompt_len - head` (the text's end, the template's end and the
  assistant header). Plain left truncation dropped the user header and BOS, a turn shape generation never shows;
  a head above half of `prompt_len` is cut with the rest."""
  ids = list(ids)
  if len(ids) <= prompt_len:
    return ids
  if 0 < head <= prompt_len // 2:
    return ids[:head] + ids[len(ids) - (prompt_len - head):]
  return ids[-prompt_len:]


def tokenize(tokenizer, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], *,
             prompt_len: int, response_len: int, chat_template: bool = True) -> Dict[str, np.ndarray]:
  """Token fields of `input_pipeline` for N pairs of texts.

  Prompts keep their last `prompt_len` tokens, after the template's start (`keep_prompt_end`; left-padded);
  responses are their tokens followed by the end-of-sequence token, cut to `response_len` (right-padded; a cut
  response has no end token).
  """
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else input_pipeline.PAD_ID
  eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  if not eos:
    logging.warning(
        "The tokenizer has no end-of-sequence token (no eos_token: for a Hugging Face directory, tokenizer_config.json "
        "names it): responses are trained without an end token, so the bases do not learn to stop, and generation "
        "runs every response to max_new_tokens.")
  n = len(prompts)
  out = {}
  for name, length in (("prompt", prompt_len), ("response_a", response_len), ("response_b", response_len)):
    out[name] = np.full((n, length), pad, np.int32)
    out[f"{name}_mask"] = np.zeros((n, length), bool)
  cut = {"prompt": 0, "response": 0}
  head = template_head(tokenizer, chat_template) if n else 0
  for i, ids in enumerate(encode_prompts(tokenizer, prompts, chat_template)):
    cut["prompt"] += len(ids) > prompt_len
    ids = keep_prompt_end(ids, prompt_len, head)
    out["prompt"][i, prompt_len - len(ids):] = ids
    out["prompt_mask"][i, prompt_len - len(ids):] = True
  for side, texts in (("a", responses_a), ("b", responses_b)):
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
      ids = list(ids) + eos
      cut["response"] += len(ids) > response_len
      ids = ids[:response_len]
      out[f"response_{side}"][i, :len(ids)] = ids
      out[f"response_{side}_mask"][i, :len(ids)] = True
  if cut["prompt"] or cut["response"]:
    logging.warning(
        "%d of %d prompts were longer than data.prompt_len=%d tokens (their text's start is cut) and %d of %d "
        "responses longer than data.response_len=%d (their end is cut).", cut["prompt"], n, prompt_len, cut["response"],
        2 * n, response_len)
  same = int(
      np.sum(
          np.all(out["response_a"] == out["response_b"], axis=1) &
          np.all(out["response_a_mask"] == out["response_b_mask"], axis=1)))
  if same:
    logging.warning(
        "%d of %d pairs have two responses that are the same tokens within data.response_len=%d: they "
        "carry no preference (raise data.response_len).", same, n, response_len)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Reading a builder.


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_split(config: ml_collections.ConfigDict, split: str, limit: int) -> Dict[str, Any]:
  """At most `limit` examples of one split: texts (lists of str) and label / mask / scores arrays [N, A].

  Builds the dataset first if `config.data.data_dir` does not hold it yet. With more than `limit` examples, a
  subset seeded by (config.data.seed, split) is read, in the split's order.
  """
  from spectral_soup.data import builders  # pylint: disable=g-import-not-at-top
  d = config.data
  if jsonl.is_jsonl(d.source):
    return _read_jsonl_split(config, split, limit)
  data_dir = d.data_dir or _default_data_dir()
  resolved = builder_config(config)
  builders.load_source(d.source, data_dir, manual_dir=d.manual_dir or None, config=resolved, split=d.train_split)
  builder = builders.get_builder(d.source, data_dir, resolved)
  if split not in builder.info.splits:
    field = "data.train_split" if split == d.train_split else "data.eval_split"
    raise ValueError(f"config.{field}={split!r} is invalid: {builder.name}/{builder.builder_config.name} has splits "
                     f"{sorted(builder.info.splits)}.")
  source = builder.as_data_source(split)
  total = len(source)
  rows = np.arange(total)
  if total > limit:
    rows = np.sort(np.random.default_rng([d.seed, *split.encode()]).choice(total, size=limit, replace=False))
  examples = []
  for start in range(0, len(rows), _READ_CHUNK):
    examples.extend(source.__getitems__(rows[start:start + _READ_CHUNK].tolist()))
  has_scores = bool(examples) and "scores_a" in examples[0]
  stack = lambda key, dtype: np.stack([np.asarray(e[key], dtype) for e in examples]) if examples else None
  return {
      "prompt": [_text(e["prompt"]) for e in examples],
      "response_a": [_text(e["response_a"]) for e in examples],
      "response_b": [_text(e["response_b"]) for e in examples],
      "label": stack("label", np.int8),
      "mask": stack("mask", bool),
      "scores_a": stack("scores_a", np.float32) if has_scores else None,
      "scores_b": stack("scores_b", np.float32) if has_scores else None,
      "num_in_split": total,
      "builder_config": builder.builder_config.name,
  }


def jsonl_split_of(prompt: str, eval_fraction: float) -> str:
  """'eval' or 'train' for a JSON-lines prompt: the hash of the `jsonl_prefs` builder's splits (`jsonl.prompt_bucket`),
  so at the default eval_fraction (0.1) the held-out prompts are exactly the builder's default validation and test
  splits (0.05 each), and at any eval_fraction >= 0.05 no prompt of its test split is trained on."""
  return "eval" if jsonl.prompt_bucket(prompt) < eval_fraction else "train"


def _read_jsonl_split(config: ml_collections.ConfigDict, split: str, limit: int) -> Dict[str, Any]:
  """`read_split` of a JSON-lines file: a prompt is held out ("eval") by a hash of its text (`data.eval_fraction`,
  `jsonl_split_of`)."""
  d = config.data
  examples = read_jsonl(d.source)
  fraction = d.get("eval_fraction", JSONL_EVAL_FRACTION)
  rows = np.asarray([i for i, p in enumerate(examples["prompt"]) if jsonl_split_of(p, fraction) == split], np.int64)
  total = len(rows)
  if total > limit:
    rows = np.sort(np.random.default_rng([d.seed, *split.encode()]).choice(rows, size=limit, replace=False))
  pick = lambda x: None if x is None else x[rows]
  return {
      "prompt": [examples["prompt"][i] for i in rows],
      "response_a": [examples["response_a"][i] for i in rows],
      "response_b": [examples["response_b"][i] for i in rows],
      "label": examples["label"][rows],
      "mask": examples["mask"][rows],
      "scores_a": pick(examples["scores_a"]),
      "scores_b": pick(examples["scores_b"]),
      "where": [examples["where"][i] for i in rows],
      "num_in_split": total,
      "builder_config": "jsonl",
  }


def _default_data_dir() -> str:
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")  # TFDS's own default.


def pair_arrays(examples: Mapping[str, Any], tokenizer, config: ml_collections.ConfigDict,
                weights: np.ndarray) -> Tuple[Dict[str, np.ndarray], Dict[str, int]]:
  """`read_split` output -> (`input_pipeline` arrays with labels / scores of the K bases, counts)."""
  d = config.data
  n = len(examples["prompt"])
  labels, rated_a, rated_b, keep = pair_targets(examples, config, weights)
  rows = np.flatnonzero(keep)
  if not len(rows):  # No pair with a label or rating difference for any basis (e.g. all ties): an empty split.
    return {}, {"read": n, "kept": 0}
  pick = lambda texts: [texts[i] for i in rows]
  arrays = tokenize(tokenizer, pick(examples["prompt"]), pick(examples["response_a"]), pick(examples["response_b"]),
                    prompt_len=d.prompt_len, response_len=d.response_len, chat_template=d.get("chat_template", True))
  arrays.update(labels=labels[rows], scores_a=rated_a[rows], scores_b=rated_b[rows])
  return arrays, {"read": n, "kept": len(rows)}


def pair_targets(examples: Mapping[str, Any], config: ml_collections.ConfigDict,
                 weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(labels int8[N, K], ratings of a and b f32[N, K] (NaN: unrated), keep bool[N]) of `read_split`'s pairs: what
  each basis learns from each pair, and which pairs teach some basis (a label for dpo, a rating difference for
  ratings). No tokenizer is needed: the checks before training count the pairs with it."""
  _, columns, signs = selected_attributes(config)
  n, k = len(examples["prompt"]), weights.shape[0]
  if not n:
    return (np.zeros((0, k), np.int8), np.zeros((0, k), np.float32), np.zeros((0, k), np.float32), np.zeros(0, bool))
  label, mask = examples["label"][:, columns], examples["mask"][:, columns]
  label = np.where(signs < 0, np.where(label == 1, 0, np.where(label == 0, 1, label)), label).astype(np.int8)
  if examples["scores_a"] is not None:
    scores_a = examples["scores_a"][:, columns] * signs
    scores_b = examples["scores_b"][:, columns] * signs
    differences = attribute_differences(scores_a, scores_b, label, mask)
    rated_a, rated_b = weighted(scores_a, weights), weighted(scores_b, weights)
  else:
    differences = attribute_differences(None, None, label, mask)
    rated_a = rated_b = np.full((n, k), np.nan, np.float32)
  labels = basis_labels(differences, weights, config.data.get("label_margin", 0.0))
  if config.loss.kind == "dpo":
    keep = np.any(labels >= 0, axis=1)
  else:
    with np.errstate(invalid="ignore"):
      keep = np.any(np.isfinite(rated_a - rated_b), axis=1)
  return labels, rated_a, rated_b, keep


def _check_vocab(config: ml_collections.ConfigDict, arrays: Mapping[str, np.ndarray]) -> None:
  if config.model.path or not arrays:
    return
  top = max(int(arrays[f].max(initial=0)) for f in ("prompt", "response_a", "response_b"))
  if top >= config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is invalid: the tokenizer produced token "
                     f"id {top}; expected a vocabulary of at least {top + 1}.")


def builder_pairs(config: ml_collections.ConfigDict,
                  tokenizer) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, Any]]:
  """(train, eval, metadata) for a builder source; arrays in the `input_pipeline` format with K label columns.

  train: at most `config.data.num_train_pairs` pairs of `config.data.train_split`; eval: at most
  `config.data.num_eval_pairs` of `config.data.eval_split` ("" or 0: none). metadata: `basis_metadata` plus the
  builder config name and per-split counts {"in_split", "read", "kept"}.
  """
  validate_config(config)
  d = config.data
  metadata = basis_metadata(config)
  weights = np.asarray(metadata["weightings"], np.float32)
  out = []
  if jsonl.is_jsonl(d.source):  # Prompts are held out by a hash (`data.eval_fraction`; 0: no held-out pairs).
    splits = (("train", d.num_train_pairs), ("eval" if d.get("eval_fraction", JSONL_EVAL_FRACTION) else "",
                                             d.num_eval_pairs))
  else:
    splits = ((d.train_split, d.num_train_pairs), (d.eval_split, d.num_eval_pairs))
  for split, limit in splits:
    if not split or limit <= 0:
      out.append(_empty_pairs(config.basis.num_bases, d.prompt_len, d.response_len))
      continue
    examples = read_split(config, split, limit)
    arrays, counts = pair_arrays(examples, tokenizer, config, weights)
    if not arrays:
      arrays = _empty_pairs(config.basis.num_bases, d.prompt_len, d.response_len)
    _check_vocab(config, arrays)
    is_train = split == splits[0][0]
    if jsonl.is_jsonl(d.source) and not is_train and not len(arrays["prompt"]):
      logging.warning(
          "%s: no labelled pair in the held-out share data.eval_fraction=%s (%d rows fell in it, none teaching a "
          "basis); training without held-out pairs.", d.source, d.get("eval_fraction", JSONL_EVAL_FRACTION),
          counts["read"])
      out.append(arrays)
      continue
    batch = config.train.batch_size if is_train else config.train.eval_batch_size
    if is_train and len(arrays["prompt"]):
      _warn_untaught_bases(config, metadata, arrays, split)
    if len(arrays["prompt"]) < batch:
      raise ValueError(f"config.train.{'batch_size' if is_train else 'eval_batch_size'}={batch} is invalid: "
                       f"{d.source}/{split} has only {len(arrays['prompt'])} labelled pairs (of at most "
                       f"data.num_{'train' if is_train else 'eval'}_pairs={limit} read), fewer than one batch.")
    metadata["builder_config"] = examples["builder_config"]
    metadata.setdefault("splits", {})[split] = {"in_split": examples["num_in_split"], **counts}
    logging.info("%s/%s: %d of %d pairs read, %d kept (a label or rating difference for some basis).", d.source, split,
                 counts["read"], examples["num_in_split"], counts["kept"])
    out.append(arrays)
  return out[0], out[1], metadata


def _warn_untaught_bases(config: ml_collections.ConfigDict, metadata: Mapping[str, Any],
                         arrays: Mapping[str, np.ndarray], split: str) -> None:
  """A warning naming every basis without one labelled (dpo) or rated (ratings) training pair: it stays at its
  initialization, under a name that says what it learned (an attribute only labelled in a file that scores others
  used to be dropped so, silently)."""
  if config.loss.kind == "dpo":
    taught = np.sum(arrays["labels"] >= 0, axis=0)
  else:
    taught = np.sum(np.isfinite(arrays["scores_a"] - arrays["scores_b"]), axis=0)
  for k in np.flatnonzero(taught == 0):
    what = "label" if config.loss.kind == "dpo" else "rating difference"
    weights = ", ".join(f"{a}: {w:g}" for a, w in zip(metadata["attributes"], metadata["weightings"][k]) if w)
    logging.warning(
        "%s: basis %d (%s) has no training pair with a %s (loss.kind=%r) among the %d pairs of %r: it will stay at "
        "its initialization. Check its attributes' names and values, or leave them out (data.attributes).",
        config.data.source, k, weights, what, config.loss.kind, len(arrays["prompt"]), split)


def _empty_pairs(num_bases: int, prompt_len: int, response_len: int) -> Dict[str, np.ndarray]:
  arrays = {}
  for name, length in (("prompt", prompt_len), ("response_a", response_len), ("response_b", response_len)):
    arrays[name] = np.zeros((0, length), np.int32)
    arrays[f"{name}_mask"] = np.zeros((0, length), bool)
  arrays["labels"] = np.zeros((0, num_bases), np.int8)
  arrays["scores_a"] = arrays["scores_b"] = np.zeros((0, num_bases), np.float32)
  return arrays
