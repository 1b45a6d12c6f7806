"""Expertise (P-SOUPS "elementary vs. PhD", vocabulary side): the rate of technical / rare vocabulary.

A content word (>= 3 letters, not a stop word) is *rare* when neither it nor a simple inflectional stem of it
(dropping -s, -es, -ed, -ing, -ly, -er, -est, with a silent -e restored) is a whole-word entry of the BERT
uncased WordPiece vocabulary (~22.5k alphabetic words: the common English words plus frequent names). Jargon
such as "photosynthesis", "eigenvalue", "stochastic", "covariance", "heteroscedastic", "indemnify" is rare;
"cat", "recipe", "football", "algorithm", "protein" are not. Capitalized words that do not start a sentence are
treated as proper nouns and skipped (all-caps acronyms such as "GPU" are kept), and so are the slang words of
`formality.SLANG` ("gonna", "lol"), which are rare but not technical.

    score = rare content words / content words,   in [0, 1];

0.0 for empty responses and for responses without content words. Higher = more specialized (expert) vocabulary.

Limitations (why this attribute is optional and not in `DEFAULT_ATTRIBUTES`): the vocabulary comes from
Wikipedia + books, so it is domain-biased (it holds "wavelength", "molecule", "theorem" but not "scatter" or
"covariance"); a proper noun that starts a sentence ("Rayleigh scattering ...") counts as rare; on 30-60-word
responses the score moves in steps of 1/(content words). Readability carries most of the elementary-vs-PhD signal.
The vocabulary is read from the MiniLM package's `tokenizer.json` (see `minilm.find_model_dir`), no network.
Throughput (shared 2-core dev VM, ~35-word responses): ~7k responses/s.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Dict, FrozenSet, List, Optional

import numpy as np

from spectral_soup.data.rewards import base
from spectral_soup.data.rewards import formality
from spectral_soup.data.rewards import minilm
from spectral_soup.data.rewards import text as text_lib

_SUFFIXES = ("ing", "est", "es", "ed", "er", "ly", "s")
# A word preceded by text start, a sentence end or a line break (+ optional list marker / quote) starts a sentence.
# Possessive and atomic runs of whitespace, a line break's run tried from its start only: linear in the text (the
# backtracking `[.!?:]\s+\s*` took 40 s over a run of 20,000 spaces); the same matches.
_WORD_WITH_CONTEXT_RE = re.compile(r"(?P<start>(?:^|[.!?:]\s++|(?<!\s)(?>\s*\n))\s*+"
                                   r"(?:[-*•]\s+|\d+[.)]\s+)?[\"'“(]?)?(?P<word>" + text_lib.WORD_RE.pattern + ")")


@functools.lru_cache(maxsize=4)
def common_vocabulary(model_dir: Optional[str] = None) -> FrozenSet[str]:
  """Whole-word, alphabetic, lower-case entries of the BERT uncased vocabulary (from tokenizer.json)."""
  path = minilm.find_model_dir(model_dir) / "tokenizer.json"
  vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
  return frozenset(w for w in vocab if w.isalpha() and w.islower())


class ExpertiseReward(base.Reward):
  """Share of content words outside the ~22.5k common-word BERT vocabulary."""

  name = "expertise"
  description = ("Technical vocabulary: share of content words (>= 3 letters, not stop words, not proper nouns) "
                 "absent from the BERT uncased common-word vocabulary, in [0, 1] (higher = more expert); 0.0 for "
                 "empty responses or responses without content words.")
  range = (0.0, 1.0)

  def __init__(self, model_dir: Optional[str] = None):
    self.model_dir = None if model_dir is None else str(model_dir)

  def config(self) -> Dict[str, Any]:
    return {}

  def is_rare(self, word: str) -> bool:
    """Whether a lower-case word is outside the common vocabulary (after simple stemming)."""
    return _is_rare(word, self.model_dir)

  def counts(self, text: str) -> tuple[int, int]:
    """(rare content words, content words) of `text`."""
    n_rare = n_content = 0
    for m in _WORD_WITH_CONTEXT_RE.finditer(text):
      word = m.group("word")
      if m.group("start") is None and word[0].isupper() and not word.isupper():
        continue  # Capitalized mid-sentence: a proper noun.
      w = word.lower().replace("’", "'")
      if len(w) < 3 or w in text_lib.STOPWORDS or w in formality.SLANG or "'" in w:
        continue
      n_content += 1
      n_rare += self.is_rare(w)
    return n_rare, n_content

  def _score(self, prompts: List[str], responses: List[str]) -> np.ndarray:
    del prompts
    c = np.array([self.counts(r) for r in responses], np.float64).reshape(-1, 2)
    return np.divide(c[:, 0], c[:, 1], out=np.zeros(len(responses)), where=c[:, 1] > 0)


@functools.lru_cache(maxsize=200_000)
def _is_rare(word: str, model_dir: Optional[str]) -> bool:
  """Whether lower-case `word` is outside `common_vocabulary(model_dir)` after simple stemming. Cached."""
  if "-" in word:  # well-known, state-of-the-art: rare iff one of its (>= 3-letter) parts is rare
    return any(_is_rare(p, model_dir) for p in word.split("-") if len(p) >= 3)
  vocab = common_vocabulary(model_dir)
  if word in vocab:
    return False
  for suf in _SUFFIXES:
    if word.endswith(suf) and len(word) - len(suf) >= 3:
      stem = word[:-len(suf)]
      if stem in vocab or stem + "e" in vocab:  # cats, hoped
        return False
      if stem[-1] == "i" and stem[:-1] + "y" in vocab:  # happily, studies, carried
        return False
      if stem[-1] == stem[-2] and stem[:-1] in vocab:  # running, stopped
        return False
  return True
