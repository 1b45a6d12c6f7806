"""Formality: documented lexical features; higher = more formal register, lower = casual / chatty.

In the spirit of Heylighen & Dewaele's F-score (formal text has more articles and prepositions, informal text more
pronouns and interjections), extended with markers of written informality. All counts are per word of the
response (W words):

  formal   F = (articles + prepositions) / W
             + 3 * formal vocabulary / W        ("therefore", "shall", "regarding", "furthermore", "e.g.", ...)
             + 1 * nominalizations / W          (>= 7 letters ending in -tion/-sion/-ment/-ness/-ity/-ance/-ence)
  informal I = 1 * first/second-person pronouns / W   ("I", "me", "you", "we", ...)
             + 3 * contractions / W             ("don't", "it's", "we'll"; not noun possessives)
             + 3 * slang and interjections / W  ("gonna", "lol", "hey", "yeah", "cool", "wow", "dont", ...)
             + 2 * exclamation marks / W
             + 3 * emoticons and emoji / W      (":)", ":D", "<3", any emoji)
             + 2 * repeated punctuation / W     ("!!", "?!", "...", "??")
             + 2 * lower-case sentence starts and lone lower-case "i" / W

  score = tanh(2 * (F - I - 0.15)),   in (-1, 1).

The offset 0.15 is the F - I of neutral expository prose (about one article or preposition in five words and few
pronouns), so plain expository answers score ~+0.2..+0.5, legal/academic prose ~+0.9, chatty answers with
contractions and exclamations ~-0.5..-0.9 and text messages ("hey gonna grab food lol") ~-1. A response
with no words (e.g. only ":)") is scored on its non-word markers with W = 1. Empty responses score 0.0.
Known limits of the lexical rules (kept as they are: the shipped data's labels and every reported result use
them): the "i" of "i.e." counts as the pronoun I and the lower-case word after "i.e." / "e.g." / "p.m." as a
lower-case sentence start; "8)" as list numbering counts as an emoticon, and the emoji class includes symbols such
as a check mark; "regarding" / "concerning" count both as prepositions and as formal vocabulary.
Throughput (shared 2-core dev VM, ~35-word responses): ~5-6k responses/s.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

import numpy as np

from spectral_soup.data.rewards import base
from spectral_soup.data.rewards import text as text_lib

OFFSET = 0.15
GAIN = 2.0

ARTICLES_PREPOSITIONS = frozenset("""
a an the of in on at by for with from to into onto upon within without among amongst between through throughout
during under over about against across along around before after behind below beneath beside besides beyond
despite except inside outside per regarding concerning toward towards underneath unlike until via whereby
""".split())

FORMAL_VOCABULARY = frozenset("""
accordingly additionally aforementioned albeit approximately ascertain assist attain commence comprise concerning
consequently constitute demonstrate deem endeavor endeavour ensure facilitate furthermore hence henceforth hereby
herein heretofore however indicate inquire likewise moreover namely necessitate nevertheless nonetheless
notwithstanding obtain pertaining prior pursuant regarding respectively shall subsequently sufficient therefore
thereby therein thereof thus whereas wherein whilst whom utilize utilise purchase require requires obtain
regard regards sincerely furthermore accordingly esteemed kindly permit hereinafter thereafter aforesaid
""".split())

FIRST_SECOND_PERSON = frozenset(
    "i me my mine myself you your yours yourself yourselves we us our ours ourselves".split())

SLANG = frozenset("""
gonna wanna gotta kinda sorta lemme gimme dunno ya yall y'all yeah yea yep yup nope nah hey hi hiya yo lol lmao
lmfao rofl omg omfg btw tbh idk imo imho fyi brb ttyl thx ty pls plz ok okay k cool awesome dude bro buddy guys
folks stuff wow whoa oops ugh uh um umm hmm hm haha hahaha hehe yay meh huh aww oh duh cuz coz ain't dont cant
wont im ive youre thats whats isnt doesnt didnt gotcha sure totally super
""".split())

_CONTRACTION_RE = re.compile(
    r"\b\w+(?:n['’]t|['’](?:m|re|ll|ve|d))\b"
    r"|\b(?:it|that|what|there|here|he|she|who|let|where|how|everything)['’]s\b", re.IGNORECASE)
_EMOTICON_RE = re.compile(r"(?:^|(?<=\s))(?:[:;=8][\-o']?[)(\]\[dDpP/\\|*3]|<3|\^_?\^|[xX][dD])(?=\s|$|[.,!?])"
                          "|[\U0001F300-\U0001FAFF\u2600-\u27BF\U0001F000-\U0001F2FF]")
_REPEATED_PUNCT_RE = re.compile(r"[!?]{2,}|\.{3,}|…")
# A line break's whitespace run tried from its start only, without backtracking: linear in the text (`\n\s*` took
# 16 s over 40,000 line breaks); the same matches as `(?:^|[.!?]\s+|\n\s*)[a-z]`.
_LOWER_START_RE = re.compile(r"(?:^|[.!?]\s++|(?<!\s)(?>\s*\n)\s*+)[a-z]")
_LONE_LOWER_I_RE = re.compile(r"\bi\b(?!['’.])")
_NOMINALIZATION_RE = re.compile(r"^[a-z]{3,}(?:tion|sion|ment|ness|ity|ance|ence)s?$")


def features(text: str) -> Dict[str, float]:
  """The raw feature counts of the module docstring for one text (plus `words`)."""
  ws = text_lib.words(text)
  lower = [w.lower().replace("’", "'") for w in ws]
  return {
      "words":
          float(len(ws)),
      "articles_prepositions":
          float(sum(w in ARTICLES_PREPOSITIONS for w in lower)),
      "formal_vocabulary":
          float(sum(w in FORMAL_VOCABULARY for w in lower) + len(re.findall(r"\b(?:e\.g|i\.e)\.", text))),
      "nominalizations":
          float(sum(bool(_NOMINALIZATION_RE.match(w)) for w in lower if len(w) >= 7)),
      "pronouns":
          float(sum(w in FIRST_SECOND_PERSON for w in lower)),
      "contractions":
          float(len(_CONTRACTION_RE.findall(text))),
      "slang":
          float(sum(w in SLANG for w in lower)),
      "exclamations":
          float(text.count("!")),
      "emoticons":
          float(len(_EMOTICON_RE.findall(text))),
      "repeated_punctuation":
          float(len(_REPEATED_PUNCT_RE.findall(text))),
      "lowercase_starts":
          float(len(_LOWER_START_RE.findall(text.strip())) + len(_LONE_LOWER_I_RE.findall(text))),
  }


def formality_score(text: str) -> float:
  """tanh(2 * (F - I - 0.15)) of the module docstring (for non-empty `text`)."""
  f = features(text)
  n = max(f["words"], 1.0)
  formal = (f["articles_prepositions"] + 3.0 * f["formal_vocabulary"] + f["nominalizations"]) / n
  informal = (f["pronouns"] + 3.0 * f["contractions"] + 3.0 * f["slang"] + 2.0 * f["exclamations"] +
              3.0 * f["emoticons"] + 2.0 * f["repeated_punctuation"] + 2.0 * f["lowercase_starts"]) / n
  return float(np.tanh(GAIN * (formal - informal - OFFSET)))


class FormalityReward(base.Reward):
  """Lexical formality score tanh(2 (F - I - 0.15)); see the module docstring for F and I."""

  name = "formality"
  description = ("Formality of register from lexical features (articles/prepositions, formal vocabulary, "
                 "nominalizations vs. pronouns, contractions, slang, exclamations, emoticons), in (-1, 1) "
                 "(higher = more formal); 0.0 for empty responses.")
  range = (-1.0, 1.0)

  def config(self) -> Dict[str, Any]:
    return {"offset": OFFSET, "gain": GAIN}

  def _score(self, prompts: List[str], responses: List[str]) -> np.ndarray:
    del prompts
    return np.array([formality_score(r) for r in responses], np.float64)
