"""Sentiment (P-SOUPS "friendly vs. unfriendly"): VADER compound score; higher = friendlier / more positive.

VADER (Hutto & Gilbert 2014, the `vadersentiment` package, MIT) is a lexicon- and rule-based sentiment model
tuned for short, informal text: it handles negation ("not good"), intensifiers ("very"), capitalization
("GREAT"), exclamation marks, emoticons (":)") and emoji. Its lexicon files ship inside the package; nothing is
downloaded (only its command-line demo imports nltk/requests).

The compound score is the normalized sum of valences, in [-1, 1]: >= 0.05 positive, <= -0.05 negative, else
neutral. ``aggregate="text"`` (default) scores the whole response at once; ``aggregate="sentence_mean"`` averages
the compound scores of its sentences (VADER's recommendation for long paragraphs, whose whole-text compound
saturates towards +-1). Empty responses score 0.0 (neutral). Throughput (shared 2-core dev VM, ~35-word
responses): ~4-6k responses/s.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List

import numpy as np

from spectral_soup.data.rewards import base
from spectral_soup.data.rewards import text as text_lib

AGGREGATES = ("text", "sentence_mean")


@functools.lru_cache(maxsize=1)
def analyzer():
  """The shared VADER analyzer (loads its ~7.5k-word lexicon from the package once)."""
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # pylint: disable=g-import-not-at-top
  return SentimentIntensityAnalyzer()


def compound(text: str) -> float:
  """VADER compound score of `text`, in [-1, 1] (0.0 for empty text)."""
  return float(analyzer().polarity_scores(text)["compound"])


class SentimentReward(base.Reward):
  """VADER compound score of the response: friendliness / positivity."""

  name = "sentiment"
  description = ("Friendliness: VADER compound sentiment of the response in [-1, 1] (higher = friendlier, more "
                 "positive; lower = unfriendly, hostile); 0.0 (neutral) for empty responses.")
  range = (-1.0, 1.0)

  def __init__(self, aggregate: str = "text"):
    if aggregate not in AGGREGATES:
      raise ValueError(f"unknown sentiment aggregate {aggregate!r}; choose one of {AGGREGATES}.")
    self.aggregate = aggregate

  def config(self) -> Dict[str, Any]:
    return {"aggregate": self.aggregate}

  def _score(self, prompts: List[str], responses: List[str]) -> np.ndarray:
    del prompts
    if self.aggregate == "text":
      return np.array([compound(r) for r in responses], np.float64)
    out = np.empty(len(responses), np.float64)
    for i, r in enumerate(responses):
      sents = text_lib.sentences(r) or [r]
      out[i] = np.mean([compound(s) for s in sents])
    return out
