"""Readability (P-SOUPS "expertise": elementary vs. PhD): higher = simpler text.

Default metric, Flesch reading ease (FRE):

    FRE = 206.835 - 1.015 * (words / sentences) - 84.6 * (syllables / words),

clipped to [-100, 121.22] (121.22 is the formula's maximum: one-syllable words, one word per sentence; very long
sentences of long words can go arbitrarily negative). Scale: 90-100 very easy (5th grade), 60-70 plain English,
30-50 college, < 30 very difficult (graduate). Alternative metric `"fk_grade"`: minus the Flesch-Kincaid grade
level, -(0.39 * words/sentences + 11.8 * syllables/words - 15.59), clipped to [-50, 3.4], so that higher is still
simpler.

Words, sentences and syllables come from `spectral_soup.data.rewards.text` (regexes + a vowel-group syllable rule
with a pyphen floor): nothing touches nltk/cmudict or the network. A response with no words (only digits,
punctuation or emoji) scores 0.0 like an empty one. Known limits of the syllable rule (kept: the shipped data's
labels and every reported result use it): a vowel + "y" before "-ed" keeps its extra syllable ("played": 2),
a few common words are off by one ("people", "really", "business" high; "idea", "area" low), and a word of a
non-Latin script counts as one syllable (so Russian or Japanese text reads as very easy). Throughput (shared
2-core dev VM, ~35-word responses): ~16k responses/s once the per-word syllable cache is warm, ~4k/s on a first
call over a fresh vocabulary.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from spectral_soup.data.rewards import base
from spectral_soup.data.rewards import text as text_lib

FRE_RANGE = (-100.0, 121.22)
FK_GRADE_SCORE_RANGE = (-50.0, 3.4)
METRICS = ("flesch", "fk_grade")


def counts(text: str) -> tuple[int, int, int]:
  """(words, sentences, syllables) of `text`; sentences >= 1 whenever words >= 1."""
  ws = text_lib.words(text)
  if not ws:
    return 0, 0, 0
  n_sent = max(1, len(text_lib.sentences(text)))
  return len(ws), n_sent, sum(text_lib.syllables(w) for w in ws)


def flesch_reading_ease(text: str) -> float:
  """Unclipped Flesch reading ease of `text` (NaN when it has no words)."""
  w, s, syl = counts(text)
  if w == 0:
    return float("nan")
  return 206.835 - 1.015 * (w / s) - 84.6 * (syl / w)


def flesch_kincaid_grade(text: str) -> float:
  """Unclipped Flesch-Kincaid grade level of `text` (NaN when it has no words)."""
  w, s, syl = counts(text)
  if w == 0:
    return float("nan")
  return 0.39 * (w / s) + 11.8 * (syl / w) - 15.59


class ReadabilityReward(base.Reward):
  """Flesch reading ease (default) or minus Flesch-Kincaid grade; higher = simpler, more elementary text."""

  name = "readability"
  description = ("Flesch reading ease of the response (higher = simpler, elementary; lower = expert/PhD-level "
                 "text), clipped to [-100, 121.22]; 0.0 for empty or word-less responses.")
  range = FRE_RANGE

  def __init__(self, metric: str = "flesch"):
    if metric not in METRICS:
      raise ValueError(f"unknown readability metric {metric!r}; choose one of {METRICS}.")
    self.metric = metric
    if metric == "fk_grade":
      # Instance attributes shadow the class-level documentation for this variant.
      self.range = FK_GRADE_SCORE_RANGE
      self.description = ("Minus the Flesch-Kincaid grade level of the response (higher = simpler), clipped to "
                          "[-50, 3.4]; 0.0 for empty or word-less responses.")

  def config(self) -> Dict[str, Any]:
    return {"metric": self.metric}

  def _score(self, prompts: List[str], responses: List[str]) -> np.ndarray:
    del prompts  # Readability is a property of the response alone.
    c = np.array([counts(r) for r in responses], np.float64).reshape(-1, 3)
    w, s, syl = c[:, 0], c[:, 1], c[:, 2]
    has_words = w > 0
    wps = np.divide(w, s, out=np.zeros_like(w), where=has_words)
    spw = np.divide(syl, w, out=np.zeros_like(w), where=has_words)
    if self.metric == "flesch":
      score = 206.835 - 1.015 * wps - 84.6 * spw
    else:
      score = -(0.39 * wps + 11.8 * spw - 15.59)
    lo, hi = self.range
    return np.where(has_words, np.clip(score, lo, hi), base.EMPTY_SCORE)
