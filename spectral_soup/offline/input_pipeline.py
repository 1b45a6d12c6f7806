"""Host-side input for basis training: tokenized preference pairs in memory, a seekable iterator, synthetic pairs.

The pair format (numpy arrays with a leading example axis N; `spectral_soup.data` builders produce it):

    prompt           int32[N, P]    prompt_mask     bool[N, P]     (any padding side)
    response_a       int32[N, R]    response_a_mask bool[N, R]
    response_b       int32[N, R]    response_b_mask bool[N, R]
    labels           int8[N, K]     1: a preferred under basis k, 0: b preferred, -1: tie or missing
    scores_a/_b      f32[N, K]      optional per-attribute ratings / scores (NaN: missing), for the ratings loss

`PairIterator` is deterministic and seekable: epoch e visits the examples in the order of a permutation drawn
from (seed, e); its whole state is {"epoch", "position"} (JSON, saved with every checkpoint), so a restarted job
sees exactly the batches the interrupted one would have seen. Each host yields its own consecutive share of every
global batch (process_index-th of process_count). Incomplete trailing batches of an epoch are dropped.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

TOKEN_FIELDS = ("prompt", "prompt_mask", "response_a", "response_a_mask", "response_b", "response_b_mask")
PAD_ID = 0


def _first_row(bad: np.ndarray) -> int:
  return int(np.flatnonzero(bad)[0])


# The largest |rating_scale * (rating_a - rating_b)| `check_pairs` accepts: its square times a batch of a million
# pairs stays below float32's largest value (3.4e38).
MAX_RATING_TARGET = 1e15


def check_pairs(arrays: Mapping[str, np.ndarray], num_bases: int, need_ratings: bool = False,
                vocab_size: Optional[int] = None, rating_scale: Optional[float] = None,
                max_len: Optional[int] = None) -> int:
  """Validates the pair format; returns N. Raises ValueError naming the field (and the first bad row).

  Checks: the fields are present with N rows and matching shapes (both responses [N, R] with one R, and P + R at
  most `max_len`, the model's positions, if given); tokens are integers (in [0, vocab_size) where
  the mask is set, if `vocab_size` is given); no prompt or response is empty; labels are -1, 0 or 1; scores are
  floats, NaN (missing) or finite; with `rating_scale` (the ratings loss's), every rating difference times it is
  within +-`MAX_RATING_TARGET`, so that the loss's float32 squares stay finite.
  """
  needed = TOKEN_FIELDS + (("scores_a", "scores_b") if need_ratings else ("labels",))
  missing = [name for name in needed if name not in arrays]
  if missing:
    raise ValueError(f"Preference pairs lack fields {missing}; have {sorted(arrays)}.")
  n = len(arrays["prompt"])
  for name, value in arrays.items():
    if len(value) != n:
      raise ValueError(f"Pair field {name!r} has {len(value)} rows; 'prompt' has {n}.")
  for side in ("prompt", "response_a", "response_b"):
    tokens, mask = np.asarray(arrays[side]), np.asarray(arrays[f"{side}_mask"]).astype(bool)
    if tokens.shape != mask.shape or tokens.ndim != 2:
      raise ValueError(f"Pair field {side}_mask has shape {mask.shape}; {side} has {tokens.shape} (expected [N, T] "
                       f"both).")
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"Pair field {side!r} holds {tokens.dtype} values; token ids must be integers.")
    empty = ~mask.any(axis=1)
    if empty.any():
      raise ValueError(f"Pair field {side!r} is empty in row {_first_row(empty)} ({int(empty.sum())} rows in total: "
                       f"{side}_mask has no True entry); drop such pairs before training.")
    too_big = (tokens >= vocab_size) if vocab_size is not None else np.zeros(tokens.shape, bool)
    out_of_range = mask & ((tokens < 0) | too_big)
    if out_of_range.any():
      row = _first_row(out_of_range.any(axis=1))
      token = int(tokens[row][out_of_range[row]][0])
      if token < 0:
        raise ValueError(f"Pair field {side!r} row {row} holds the negative token id {token}.")
      raise ValueError(f"Pair field {side!r} row {row} holds token id {token}, but the model's vocab_size is "
                       f"{vocab_size} (ids 0..{vocab_size - 1}): the data was tokenized for another model.")
  prompt_len, response_len = np.shape(arrays["prompt"])[1], np.shape(arrays["response_a"])[1]
  if np.shape(arrays["response_b"])[1] != response_len:
    raise ValueError(f"Pair field 'response_b' is {np.shape(arrays['response_b'])[1]} tokens wide, 'response_a' "
                     f"{response_len}: both responses are [N, R] with one R (pad the shorter, its mask False).")
  if max_len is not None and prompt_len + response_len > max_len:
    raise ValueError(f"Pair fields 'prompt' ({prompt_len} tokens wide) + 'response_a'/'response_b' ({response_len}) "
                     f"= {prompt_len + response_len} positions, beyond the model's max_len={max_len}: truncate the "
                     f"pairs (data.prompt_len + data.response_len <= model.max_len) or use a longer model.max_len.")
  for name in ("labels", "scores_a", "scores_b"):
    if name in arrays and arrays[name].shape[1:] != (num_bases,):
      raise ValueError(f"Pair field {name!r} has shape {arrays[name].shape}: expected [N, {num_bases}] "
                       f"(one column per basis).")
  if "labels" in arrays:
    labels = np.asarray(arrays["labels"])
    bad = ~np.isin(labels, (-1, 0, 1))
    if bad.any():
      row = _first_row(bad.any(axis=1))
      raise ValueError(f"Pair field 'labels' row {row} holds {labels[row][bad[row]][0].item()!r}: labels are 1 (a "
                       f"preferred), 0 (b preferred) or -1 (tie / missing).")
  for name in ("scores_a", "scores_b"):
    if name in arrays:
      scores = np.asarray(arrays[name])
      if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"Pair field {name!r} holds {scores.dtype} values; scores must be floats (NaN: missing).")
      bad = np.isinf(scores)
      if bad.any():
        row = _first_row(bad.any(axis=1))
        raise ValueError(f"Pair field {name!r} row {row} holds {scores[row][bad[row]][0].item()}: scores must be "
                         f"finite (NaN marks a missing score).")
  if rating_scale is not None and "scores_a" in arrays and "scores_b" in arrays:
    with np.errstate(invalid="ignore", over="ignore"):
      target = np.abs(rating_scale *
                      (np.asarray(arrays["scores_a"], np.float64) - np.asarray(arrays["scores_b"], np.float64)))
    bad = target > MAX_RATING_TARGET  # NaN (a missing rating) compares False.
    if bad.any():
      row = _first_row(bad.any(axis=1))
      basis = int(np.argmax(bad[row]))
      raise ValueError(
          f"Pair row {row}, basis {basis}: loss.rating_scale * (scores_a - scores_b) = {rating_scale:g} * "
          f"({arrays['scores_a'][row, basis]:g} - {arrays['scores_b'][row, basis]:g}) is beyond "
          f"+-{MAX_RATING_TARGET:g}: the ratings loss squares it in float32 (overflow). Rescale the ratings or "
          f"loss.rating_scale (typical ratings are a few units apart).")
  return n


def _is_int(value: Any) -> bool:
  """An integer (Python or numpy, a 0-d array too), not a bool."""
  return not isinstance(value, bool) and np.ndim(value) == 0 and np.asarray(value).dtype.kind in "iu"


class PairIterator:
  """Global batches of pairs in a seeded order per epoch; seekable through `get_state` / `set_state`.

  Yields this host's rows of each global batch: {field: array[batch_size // process_count, ...]}. An epoch is
  N // batch_size whole batches: the N % batch_size examples left over are another set each epoch when shuffled,
  and never read with `shuffle=False`.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int, shuffle: bool = True,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    self.arrays = dict(arrays)
    if not self.arrays:
      raise ValueError("PairIterator: arrays holds no field: expected {field: array[N, ...]}.")
    lengths = {name: len(value) for name, value in self.arrays.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"PairIterator: the fields hold different numbers of rows {lengths}: expected one N.")
    self.num_examples = next(iter(lengths.values()))
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if not _is_int(batch_size) or batch_size < 1:
      raise ValueError(f"PairIterator: batch_size={batch_size!r}: expected an integer >= 1.")
    if not _is_int(self.process_count) or self.process_count < 1:
      raise ValueError(f"PairIterator: process_count={self.process_count!r}: expected an integer >= 1.")
    if not _is_int(self.process_index) or not 0 <= self.process_index < self.process_count:
      raise ValueError(f"PairIterator: process_index={self.process_index!r}: expected an integer in [0, "
                       f"{self.process_count}) (a host past the last read the next batch's rows: repeats).")
    if batch_size % self.process_count:
      raise ValueError(f"batch_size={batch_size} does not split over {self.process_count} hosts.")
    if self.num_examples < batch_size:
      raise ValueError(f"{self.num_examples} examples cannot fill one batch of {batch_size}.")
    self.batches_per_epoch = self.num_examples // batch_size
    self.epoch = 0
    self.position = 0  # Index of the next global batch within the epoch.
    self._order = None
    self._order_epoch = None

  def get_state(self) -> Dict[str, int]:
    return {"epoch": self.epoch, "position": self.position}

  def set_state(self, state: Mapping[str, Any]) -> None:
    epoch, position = state["epoch"], state["position"]
    if not (_is_int(epoch) and _is_int(position)) or not 0 <= position <= self.batches_per_epoch or epoch < 0:
      raise ValueError(f"Iterator state {dict(state)} is invalid: expected integers epoch >= 0 and position in [0, "
                       f"{self.batches_per_epoch}] ({self.batches_per_epoch} batches/epoch).")
    self.epoch, self.position = int(epoch), int(position)

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self.epoch:
      if self.shuffle:
        self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
      else:
        self._order = np.arange(self.num_examples)
      self._order_epoch = self.epoch
    return self._order

  def __iter__(self) -> "PairIterator":
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self.position >= self.batches_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
    per_host = self.batch_size // self.process_count
    start = self.position * self.batch_size + self.process_index * per_host
    rows = np.sort(self._epoch_order()[start:start + per_host])  # Sorted: contiguous reads from memmaps.
    self.position += 1
    return {name: value[rows] for name, value in self.arrays.items()}


def synthetic_pairs(num_pairs: int, *, num_bases: int, vocab_size: int, prompt_len: int, response_len: int, seed: int,
                    max_rate: float = 0.3) -> Dict[str, np.ndarray]:
  """Pairs whose attribute k is how often the response contains marker token k + 1.

  Tokens: 0 is padding, 1..K are the K markers, the rest filler. Every response draws a marker rate per attribute
  (uniform in [0, max_rate / K]) and a length in [R/2, R]; attribute k's rating is the marker's frequency and
  label k says which response has more markers k (-1 on a tie). Prompts are random filler, right-padded.
  """
  if vocab_size <= num_bases + 1:
    raise ValueError(f"config.model.vocab_size={vocab_size} leaves no filler tokens beside the synthetic pairs' "
                     f"{num_bases} marker tokens (one per basis, config.basis.num_bases): expected a vocabulary of at "
                     f"least {num_bases + 2}.")
  rng = np.random.default_rng(seed)

  def tokens(n, length, markers):
    lengths = rng.integers(max(1, length // 2), length + 1, size=n)
    mask = np.arange(length)[None, :] < lengths[:, None]
    out = rng.integers(num_bases + 1, vocab_size, size=(n, length))
    if markers:
      rates = rng.uniform(0.0, max_rate / num_bases, size=(n, num_bases))
      draw = rng.uniform(size=(n, length))
      edges = np.cumsum(rates, axis=1)  # Marker k where draw falls in [edges[k-1], edges[k]).
      which = np.sum(draw[:, :, None] >= edges[:, None, :], axis=-1)  # [n, length] in 0..K
      out = np.where(which < num_bases, which + 1, out)
    out = np.where(mask, out, PAD_ID).astype(np.int32)
    return out, mask

  prompt, prompt_mask = tokens(num_pairs, prompt_len, markers=False)
  a, a_mask = tokens(num_pairs, response_len, markers=True)
  b, b_mask = tokens(num_pairs, response_len, markers=True)
  count = lambda t: np.stack([(t == k + 1).sum(axis=1) for k in range(num_bases)], axis=1)
  count_a, count_b = count(a), count(b)
  labels = np.where(count_a > count_b, 1, np.where(count_a < count_b, 0, -1)).astype(np.int8)
  return {
      "prompt": prompt,
      "prompt_mask": prompt_mask,
      "response_a": a,
      "response_a_mask": a_mask,
      "response_b": b,
      "response_b_mask": b_mask,
      "labels": labels,
      "scores_a": (count_a / a_mask.sum(1, keepdims=True)).astype(np.float32),
      "scores_b": (count_b / b_mask.sum(1, keepdims=True)).astype(np.float32),
  }
