"""Verbosity (P-SOUPS "concise vs. informative"): higher = more informative / longer, lower = more concise.

Three documented modes (all in [0, 1], 0.0 for an empty or word-less response):

  * ``"content"`` (default): a saturating transform of the number U of *distinct content words* (lower-cased
    words that are not stop words, >= 2 letters):

        score = 1 - exp(-U / scale),  scale = 30 by default,

    so U = 1 -> 0.03, 10 -> 0.28, 30 -> 0.63, 60 -> 0.86, 100 -> 0.96. Counting distinct content words (not raw
    length) means padding with repetitions or filler function words does not count as being informative, and the
    saturation means that beyond a few paragraphs extra length is worth little.
  * ``"words"``: the same transform of the raw word count W, ``1 - exp(-W / scale)`` (scale 60 by default): pure
    length.
  * ``"density"``: information density U / W (distinct content words per word, in (0, 1]); length-free. It is
    also registered as an attribute of its own, ``"density"`` (`DensityReward`), so that a suite can score
    verbosity and density side by side.

Throughput (shared 2-core dev VM, ~35-word responses): ~35k responses/s.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from spectral_soup.data.rewards import base
from spectral_soup.data.rewards import text as text_lib

MODES = ("content", "words", "density")
_DEFAULT_SCALE = {"content": 30.0, "words": 60.0, "density": 1.0}


class VerbosityReward(base.Reward):
  """Saturating count of distinct content words (default); see the module docstring for the other modes."""

  name = "verbosity"
  description = ("How informative/long the response is: 1 - exp(-distinct content words / 30) (higher = more "
                 "informative, lower = more concise); 0.0 for empty responses.")
  range = (0.0, 1.0)

  def __init__(self, mode: str = "content", scale: Optional[float] = None):
    if mode not in MODES:
      raise ValueError(f"unknown verbosity mode {mode!r}; choose one of {MODES}.")
    scale = _DEFAULT_SCALE[mode] if scale is None else float(scale)
    if not (scale > 0 and math.isfinite(scale)):
      raise ValueError(f"verbosity scale must be a positive finite number, got {scale}.")
    self.mode, self.scale = mode, scale
    if mode != "content":
      self.description = {
          "words": f"Response length: 1 - exp(-words / {scale:g}) (higher = longer); 0.0 for empty responses.",
          "density": "Information density: distinct content words / words; 0.0 for empty responses.",
      }[mode]

  def config(self) -> Dict[str, Any]:
    return {"mode": self.mode, "scale": self.scale}

  def _score(self, prompts: List[str], responses: List[str]) -> np.ndarray:
    del prompts
    n_words = np.empty(len(responses), np.float64)
    n_unique = np.empty(len(responses), np.float64)
    for i, r in enumerate(responses):
      ws = text_lib.words(r)
      n_words[i] = len(ws)
      n_unique[i] = len(set(text_lib.content_words(ws)))
    if self.mode == "content":
      return -np.expm1(-n_unique / self.scale)
    if self.mode == "words":
      return -np.expm1(-n_words / self.scale)
    return np.divide(n_unique, n_words, out=np.zeros_like(n_words), where=n_words > 0)


class DensityReward(VerbosityReward):
  """Information density U / W as an attribute of its own: `VerbosityReward(mode="density")`, named "density".

  The P-SOUPS "concise" direction in the sense of no filler, independently of length. Higher = a larger share of
  the words are distinct content words (denser, less filler); lower = more function words, repetitions and filler.
  A word-less response (digits, emoji, punctuation only) scores 0.0. There are no options: `config()` is empty.
  """

  name = "density"
  description = ("Information density: distinct content words per word (higher = denser, less filler); 0.0 for "
                 "empty or word-less responses.")
  range = (0.0, 1.0)

  def __init__(self):
    super().__init__(mode="density")
    self.description = DensityReward.description  # Not the per-mode text `VerbosityReward` sets.

  def config(self) -> Dict[str, Any]:
    return {}
