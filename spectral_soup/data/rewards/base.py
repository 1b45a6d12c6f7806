"""The common interface of the attribute rewards, input validation and normalization statistics.

A reward is a callable object

    reward(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray  # float32[N]

with class attributes `name` (registry key), `description` (what a higher score means) and `range` (closed
interval every score lies in). Rules shared by every reward (enforced here, not re-implemented per reward):

  * `prompts` and `responses` must be sequences of `str` of the same length N (a bare `str` is rejected: it would
    silently be scored character by character). Mismatched lengths -> `ValueError` naming both lengths.
  * N = 0 -> an empty float32 array.
  * An empty or whitespace-only response scores `EMPTY_SCORE` = 0.0 for every attribute, without calling the
    scorer. Per attribute this is: readability FRE 0 (the bottom of the standard 0-100 table, "very difficult"),
    verbosity 0 (the minimum), sentiment 0 (neutral), relevance 0 (orthogonal), formality 0 (neutral),
    structure 0 (the minimum), expertise 0 (the minimum). Rewards document further special cases (e.g. a response
    with no words at all).
  * Scores are float32, finite and inside `range`; a non-finite score is a bug and raises `FloatingPointError`.

`RewardStats` holds per-attribute mean/std fitted on a reference sample so that attributes with very different
units (Flesch points vs. cosine similarity) can be standardized to comparable scales; it round-trips through JSON.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from spectral_soup.utils import files

logger = logging.getLogger(__name__)

EMPTY_SCORE = 0.0
STATS_FORMAT_VERSION = 1
# A standard deviation below this on the reference sample means the attribute is (numerically) constant there:
# it is then only centered (std stored as 1.0), never divided by ~0.
MIN_STD = 1e-6


def check_batch(prompts: Sequence[str], responses: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Validates a (prompts, responses) batch and returns both as lists of `str`.

  Args:
    prompts: N prompt strings.
    responses: N response strings.

  Returns:
    `(prompts, responses)` as Python lists of length N.

  Raises:
    TypeError: either argument is a bare string / not a sequence, or an element is not a `str`.
    ValueError: the lengths differ (both lengths are named), or a string holds a lone surrogate (not text).
  """
  for arg_name, arg in (("prompts", prompts), ("responses", responses)):
    if isinstance(arg, (str, bytes)):
      raise TypeError(f"{arg_name} must be a sequence of strings, not a single {type(arg).__name__}; "
                      f"wrap it in a list: [{arg_name[:-1]}].")
  try:
    prompts, responses = list(prompts), list(responses)
  except TypeError as e:
    raise TypeError(f"prompts and responses must be sequences of strings: {e}") from None
  if len(prompts) != len(responses):
    raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} prompts and "
                     f"{len(responses)} responses.")
  for arg_name, arg in (("prompts", prompts), ("responses", responses)):
    for i, x in enumerate(arg):
      if not isinstance(x, str):
        raise TypeError(f"{arg_name}[{i}] must be a str, got {type(x).__name__}.")
      try:
        x.encode("utf-8")
      except UnicodeEncodeError as e:  # A lone surrogate: the MiniLM tokenizer failed on it naming no input.
        raise ValueError(f"{arg_name}[{i}] is not valid Unicode text: {x[e.start:e.end]!r} at position {e.start} "
                         f"(a lone surrogate; decode bytes with errors='replace').") from None
  return prompts, responses


class Reward(abc.ABC):
  """Base class: validation, empty-response handling and output checks around `_score`.

  Subclasses set `name`, `description`, `range`, implement `_score` on non-empty responses, and return their
  constructor options from `config()` (stored beside normalization statistics so that stats fitted with one
  configuration are never applied to another).
  """

  name: ClassVar[str]
  description: ClassVar[str]
  range: ClassVar[Tuple[float, float]]

  def config(self) -> Dict[str, Any]:
    """JSON-serializable constructor options (empty when the reward has none)."""
    return {}

  @abc.abstractmethod
  def _score(self, prompts: List[str], responses: List[str]) -> np.ndarray:
    """Scores M >= 1 pairs whose responses are non-empty (not whitespace-only). Returns float[M]."""

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Scores a batch.

    Args:
      prompts: N prompt strings.
      responses: N response strings (same length as `prompts`).

    Returns:
      `float32[N]` scores in `self.range`; `EMPTY_SCORE` for empty / whitespace-only responses.
    """
    prompts, responses = check_batch(prompts, responses)
    out = np.full((len(responses),), EMPTY_SCORE, np.float32)
    keep = [i for i, r in enumerate(responses) if r.strip()]
    if keep:
      scores = np.asarray(self._score([prompts[i] for i in keep], [responses[i] for i in keep]), np.float32)
      if scores.shape != (len(keep),):
        raise AssertionError(f"{self.name}: _score returned shape {scores.shape}, expected ({len(keep)},).")
      out[keep] = scores
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
      i = int(bad[0])
      raise FloatingPointError(f"reward {self.name!r} produced a non-finite score {out[i]} for responses[{i}] = "
                               f"{responses[i][:200]!r} (prompt {prompts[i][:200]!r}).")
    lo, hi = self.range
    # Clip away float32 rounding just outside the documented range (e.g. a cosine of 1.0000001).
    return np.clip(out, np.float32(lo), np.float32(hi))

  def __repr__(self) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
    return f"{type(self).__name__}({opts})"


@dataclasses.dataclass(frozen=True)
class RewardStats:
  """Per-attribute location/scale for standardization: z = (score - mean) / std.

  Attributes:
    names: the A attribute names, in column order.
    mean: float32[A].
    std: float32[A], > 0 (an attribute constant on the reference sample is stored with std 1.0).
    count: size N of the reference sample the stats were fitted on.
    configs: per-name reward `config()` at fitting time.
  """

  names: Tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray
  count: int
  configs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @classmethod
  def fit(cls, names: Sequence[str], scores: np.ndarray,
          configs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> "RewardStats":
    """Fits mean/std on raw scores `float[N, A]` (N >= 2) whose columns are `names`."""
    scores = np.asarray(scores, np.float64)
    names = tuple(names)
    if scores.ndim != 2 or scores.shape[1] != len(names):
      raise ValueError(f"scores must have shape [N, {len(names)}] for names {names}, got {scores.shape}.")
    if scores.shape[0] < 2:
      raise ValueError(f"need at least 2 reference samples to fit normalization stats, got {scores.shape[0]}.")
    bad = np.argwhere(~np.isfinite(scores))
    if bad.size:  # A NaN made the mean and std NaN, and every standardized score after them.
      i, j = (int(x) for x in bad[0])
      raise ValueError(f"scores[{i}, {j}] ({names[j]!r}) is {scores[i, j]}: expected finite scores to fit "
                       f"normalization stats ({len(bad)} non-finite in all).")
    mean = scores.mean(axis=0)
    std = scores.std(axis=0)
    for j in np.flatnonzero(std < MIN_STD):
      logger.warning("reward %r is constant (%.6g) on the %d reference samples; it will only be centered.", names[j],
                     mean[j], scores.shape[0])
    std = np.where(std < MIN_STD, 1.0, std)
    return cls(names, mean.astype(np.float32), std.astype(np.float32), int(scores.shape[0]), {
        k: dict(v) for k, v in (configs or {}).items()
    })

  def select(self, names: Sequence[str]) -> "RewardStats":
    """The stats of a subset of the attributes, in the order of `names`."""
    missing = [n for n in names if n not in self.names]
    if missing:
      raise ValueError(f"normalization stats have no entry for {missing}; they cover {list(self.names)}.")
    idx = [self.names.index(n) for n in names]
    return RewardStats(tuple(names), self.mean[idx], self.std[idx], self.count,
                       {n: self.configs[n] for n in names if n in self.configs})

  def standardize(self, scores: np.ndarray) -> np.ndarray:
    """`float[N, A]` raw scores (columns = `names`) -> float32[N, A] standardized scores."""
    scores = np.asarray(scores, np.float32)
    if scores.shape[-1:] != (len(self.names),):
      raise ValueError(f"scores must have a last axis of size {len(self.names)} ({list(self.names)}), "
                       f"got shape {scores.shape}.")
    return ((scores - self.mean) / self.std).astype(np.float32)

  def to_json(self) -> str:
    return json.dumps(
        {
            "format_version": STATS_FORMAT_VERSION,
            "names": list(self.names),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
            "count": self.count,
            "configs": {
                k: dict(v) for k, v in self.configs.items()
            },
        }, indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "RewardStats":
    d = json.loads(text)
    if d.get("format_version") != STATS_FORMAT_VERSION:
      raise ValueError(f"unsupported reward-stats format_version {d.get('format_version')!r}, "
                       f"expected {STATS_FORMAT_VERSION}.")
    names = tuple(d["names"])
    mean, std = np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32)
    if mean.shape != (len(names),) or std.shape != (len(names),) or not np.all(std > 0):
      raise ValueError(f"malformed reward stats: {len(names)} names, mean {mean.shape}, std {std.shape} "
                       f"(std must be > 0).")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
      raise ValueError(f"malformed reward stats: mean {mean.tolist()}, std {std.tolist()}: expected finite numbers.")
    return cls(names, mean, std, int(d["count"]), d.get("configs", {}))

  def save(self, path: str | os.PathLike) -> None:
    """Writes `to_json()` so that a crash leaves the old file or the new one, never half of it."""
    files.write_text_atomic(os.fspath(path), self.to_json() + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "RewardStats":
    with open(path, encoding="utf-8") as f:
      return cls.from_json(f.read())
