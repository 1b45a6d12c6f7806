"""The preference pairs of a config as host arrays (`input_pipeline` format): the training pairs and the held-out ones.

`load_pairs(config)` serves the trainer for every `config.data.source`: synthetic marker-token pairs
(`input_pipeline.synthetic_pairs`), the TFDS builders and JSON-lines files (`sources.builder_pairs`), and the
embedded data. `embedded_data(config, tokenizer)` is the one loading path of the embedded data, shared by
`load_pairs` and the main job (`experiments/main.py`), which also needs the pairs' texts, the split and the
attribute scores' statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Dict, List, Tuple

import ml_collections
import numpy as np

from spectral_soup.data import embedded
from spectral_soup.data import jsonl
from spectral_soup.data import rewards
from spectral_soup.models import hf_import
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import sources


def fingerprint(*splits: Dict[str, np.ndarray]) -> str:
  """A hash of the pairs a run trains and evaluates on (every field's name, dtype, shape and bytes, split by split):
  saved with each checkpoint, so that a resume on other pairs (a data file edited in place, another tokenizer at the
  same path) is refused instead of training the checkpoint's bases on a mix."""
  digest = hashlib.blake2b(digest_size=16)
  for split in splits:
    for name in sorted(split):
      value = np.ascontiguousarray(split[name])
      digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
      digest.update(value.tobytes())
    digest.update(b"|")
  return digest.hexdigest()


def load_pairs(config: ml_collections.ConfigDict) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """(train, eval) pair arrays for `config.data` (`input_pipeline` format)."""
  d = config.data
  if d.source == "embedded":
    return _embedded_pairs(config)
  if d.source in sources.BUILDER_SOURCES or jsonl.is_jsonl(d.source):
    train, held_out, _ = sources.builder_pairs(config, sources.load_tokenizer(config))
    return train, held_out
  total = d.num_train_pairs + d.num_eval_pairs
  pairs = input_pipeline.synthetic_pairs(total, num_bases=config.basis.num_bases, vocab_size=config.model.vocab_size,
                                         prompt_len=d.prompt_len, response_len=d.response_len, seed=d.seed)
  train = {name: value[:d.num_train_pairs] for name, value in pairs.items()}
  held_out = {name: value[d.num_train_pairs:] for name, value in pairs.items()}
  return train, held_out


@dataclasses.dataclass
class EmbeddedData:
  """The embedded preference data of a config, tokenized and split by prompt, with its scores' statistics.

  Attributes:
    directory: the dataset's directory (`embedded.generate_for_config`).
    pairs: the pairs as read (prompt and response texts, raw scores), in the order of the arrays' rows.
    metadata: the dataset's metadata.json.
    arrays: `embedded.tokenize_pairs` of `pairs`: tokens and masks, labels, raw scores_a / scores_b [N, A].
    is_eval: bool[N], the held-out pairs.
    stats: each attribute's mean and std over the training pairs' responses (both of each pair).
  """
  directory: str
  pairs: List[dict]
  metadata: Dict[str, Any]
  arrays: Dict[str, np.ndarray]
  is_eval: np.ndarray
  stats: rewards.RewardStats

  def standardized(self, side: str) -> np.ndarray:
    """float32[N, A]: the scores of response `side` ("a" or "b") standardized with `stats`."""
    return self.stats.standardize(self.arrays[f"scores_{side}"])


def embedded_data(config: ml_collections.ConfigDict, tokenizer, *, dev: bool = False) -> EmbeddedData:
  """Generates (or reuses) the embedded preference data of `config.data`, tokenizes it and splits it by prompt.

  A hash of each prompt holds out the share `data.eval_fraction`. With `dev` (tuning), the held-out pairs are
  dropped before anything is fitted, and a second hash split of the training prompts plays their part. The labels'
  tie margin (`data.tie_margin` standard deviations) and the scores' statistics are fitted on the training
  responses only: the held-out prompts inform nothing that is chosen or fitted.
  """
  d = config.data
  directory = embedded.generate_for_config(config)
  pairs, metadata = embedded.load_pairs(directory)
  arrays = embedded.tokenize_pairs(pairs, tokenizer, prompt_len=d.prompt_len, response_len=d.response_len,
                                   tie_margin=d.tie_margin)
  is_eval = np.asarray([embedded.split_of(p["prompt"], d.eval_fraction) == "eval" for p in pairs])
  if dev:
    keep = np.flatnonzero(~is_eval)
    pairs, arrays = [pairs[i] for i in keep], {name: value[keep] for name, value in arrays.items()}
    is_eval = np.asarray([embedded.split_of(p["prompt"], d.eval_fraction, salt="dev") == "eval" for p in pairs])
  # The tie margin's standard deviations from the training pairs only (tokenize_pairs used all of them).
  arrays["labels"] = embedded.pair_labels(arrays["scores_a"], arrays["scores_b"], d.tie_margin, fit=~is_eval)
  stats = rewards.RewardStats.fit(d.attributes,
                                  np.concatenate([arrays["scores_a"][~is_eval], arrays["scores_b"][~is_eval]]))
  return EmbeddedData(directory, pairs, metadata, arrays, is_eval, stats)


def _embedded_pairs(config: ml_collections.ConfigDict) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """The embedded data's (train, eval) pairs, the ratings of loss.kind="ratings" standardized (`embedded_data`):
  the first `data.num_train_pairs` / `data.num_eval_pairs` of each split (the split is `data.eval_fraction`'s)."""
  if len(config.data.attributes) != config.basis.num_bases:
    raise ValueError(f"config.basis.num_bases={config.basis.num_bases} but config.data.attributes has "
                     f"{len(config.data.attributes)} attributes: one basis per attribute.")
  data = embedded_data(config, hf_import.tokenizer_from_pretrained(config.model.path))
  arrays = {**data.arrays, "scores_a": data.standardized("a"), "scores_b": data.standardized("b")}
  train = np.flatnonzero(~data.is_eval)[:config.data.num_train_pairs]
  held_out = np.flatnonzero(data.is_eval)[:config.data.num_eval_pairs]
  return ({k: v[train] for k, v in arrays.items()}, {k: v[held_out] for k, v in arrays.items()})
