"""The attribute registry and `RewardSuite`: score a batch with several rewards, optionally standardized.

    suite = RewardSuite(["readability", "verbosity", "sentiment", "relevance", "formality"])
    raw = suite(prompts, responses)                   # float32[N, A], columns in suite.names order
    suite.fit(ref_prompts, ref_responses)             # mean/std per attribute on a reference sample
    suite.save_stats("reward_stats.json")
    z = suite(prompts, responses, standardize=True)   # (raw - mean) / std, comparable scales

    suite2 = RewardSuite(suite.names, stats="reward_stats.json")  # later / elsewhere
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, Union

import numpy as np

from spectral_soup.data.rewards import base
from spectral_soup.data.rewards.expertise import ExpertiseReward
from spectral_soup.data.rewards.formality import FormalityReward
from spectral_soup.data.rewards.readability import ReadabilityReward
from spectral_soup.data.rewards.relevance import RelevanceReward
from spectral_soup.data.rewards.sentiment import SentimentReward
from spectral_soup.data.rewards.structure import StructureReward
from spectral_soup.data.rewards.verbosity import DensityReward
from spectral_soup.data.rewards.verbosity import VerbosityReward

# name -> reward class. Every class's `name` equals its key.
ATTRIBUTES: Dict[str, Type[base.Reward]] = {
    cls.name: cls for cls in (ReadabilityReward, VerbosityReward, SentimentReward, RelevanceReward, FormalityReward,
                              StructureReward, ExpertiseReward, DensityReward)
}
# The five core attributes (P-SOUPS expertise / informativeness / friendliness + relevance + formality).
DEFAULT_ATTRIBUTES = ("readability", "verbosity", "sentiment", "relevance", "formality")


def make_reward(name: str, **options: Any) -> base.Reward:
  """One reward by registry name, constructed with `options`.

  Raises:
    ValueError: unknown name (the message lists the known attributes).
  """
  if not isinstance(name, str) or name not in ATTRIBUTES:
    raise ValueError(f"unknown reward attribute {name!r}; known attributes: {', '.join(sorted(ATTRIBUTES))}.")
  return ATTRIBUTES[name](**options)


def make_rewards(names: Optional[Union[str, Sequence[str]]] = None,
                 options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> List[base.Reward]:
  """Rewards for `names` (a list, or one comma-separated string), in order.

  Args:
    names: attribute names; None = `DEFAULT_ATTRIBUTES`.
    options: optional per-name constructor options, e.g. `{"verbosity": {"mode": "words"}}`.

  Raises:
    ValueError: an unknown or repeated name, an empty list, or options for a name not in `names`.
  """
  if names is None:
    names = DEFAULT_ATTRIBUTES
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  names = list(names)
  if not names:
    raise ValueError(f"no reward attributes given; known attributes: {', '.join(sorted(ATTRIBUTES))}.")
  unknown = [n for n in names if n not in ATTRIBUTES]
  if unknown:
    raise ValueError(f"unknown reward attribute(s) {unknown}; known attributes: {', '.join(sorted(ATTRIBUTES))}.")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"reward attribute(s) {repeated} listed more than once.")
  options = dict(options or {})
  stray = sorted(set(options) - set(names))
  if stray:
    raise ValueError(f"options given for {stray}, which are not among the requested attributes {names}.")
  return [make_reward(n, **options.get(n, {})) for n in names]


class RewardSuite:
  """Scores a batch with A rewards -> float32[N, A], with optional standardization.

  Attributes:
    names: the A attribute names (column order).
    rewards: the reward objects, same order.
    stats: `base.RewardStats` used by `standardize=True` (None until fitted or loaded).
  """

  def __init__(self, names: Optional[Union[str, Sequence[str]]] = None,
               options: Optional[Mapping[str, Mapping[str, Any]]] = None, stats: Optional[Union[base.RewardStats, str,
                                                                                                os.PathLike]] = None):
    """Builds the suite.

    Args:
      names: attribute names (see `make_rewards`); None = `DEFAULT_ATTRIBUTES`.
      options: per-name constructor options.
      stats: normalization statistics (object or JSON path) covering at least `names`.
    """
    self.rewards = make_rewards(names, options)
    self.names = tuple(r.name for r in self.rewards)
    self.stats: Optional[base.RewardStats] = None
    if stats is not None:
      self.set_stats(stats)

  def __len__(self) -> int:
    return len(self.rewards)

  def configs(self) -> Dict[str, Dict[str, Any]]:
    return {r.name: r.config() for r in self.rewards}

  def describe(self) -> Dict[str, Dict[str, Any]]:
    """name -> {description, range, config}: a human-readable summary of the suite."""
    return {r.name: {"description": r.description, "range": tuple(r.range), "config": r.config()} for r in self.rewards}

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Raw scores `float32[N, A]` (column j = `self.rewards[j]`)."""
    prompts, responses = base.check_batch(prompts, responses)
    out = np.empty((len(responses), len(self.rewards)), np.float32)
    for j, r in enumerate(self.rewards):
      out[:, j] = r(prompts, responses)
    return out

  def __call__(self, prompts: Sequence[str], responses: Sequence[str], *, standardize: bool = False) -> np.ndarray:
    """`float32[N, A]` scores, standardized with `self.stats` when `standardize`."""
    raw = self.score(prompts, responses)
    return self.standardize(raw) if standardize else raw

  def standardize(self, raw: np.ndarray) -> np.ndarray:
    """Raw `float[N, A]` -> `(raw - mean) / std` float32[N, A]."""
    if self.stats is None:
      raise ValueError("this RewardSuite has no normalization stats: call fit(...) or load_stats(path) first.")
    return self.stats.standardize(raw)

  def fit(self, prompts: Sequence[str], responses: Sequence[str]) -> base.RewardStats:
    """Fits (and stores) mean/std of every attribute on a reference sample of N >= 2 pairs."""
    return self.fit_scores(self.score(prompts, responses))

  def fit_scores(self, raw: np.ndarray) -> base.RewardStats:
    """Fits (and stores) the stats from already computed raw scores `float[N, A]`."""
    self.stats = base.RewardStats.fit(self.names, raw, self.configs())
    return self.stats

  def set_stats(self, stats: Union[base.RewardStats, str, os.PathLike]) -> None:
    """Uses `stats` (object or JSON path) for standardization; they must cover `names` with the same configs."""
    if not isinstance(stats, base.RewardStats):
      stats = base.RewardStats.load(stats)
    stats = stats.select(self.names)
    for r in self.rewards:
      fitted = stats.configs.get(r.name)
      if fitted is not None and dict(fitted) != r.config():
        raise ValueError(f"normalization stats for {r.name!r} were fitted with options {dict(fitted)}, but this "
                         f"suite's reward uses {r.config()}.")
    self.stats = stats

  def save_stats(self, path: Union[str, os.PathLike]) -> None:
    if self.stats is None:
      raise ValueError("no normalization stats to save: call fit(...) first.")
    self.stats.save(path)

  def load_stats(self, path: Union[str, os.PathLike]) -> base.RewardStats:
    self.set_stats(path)
    return self.stats
