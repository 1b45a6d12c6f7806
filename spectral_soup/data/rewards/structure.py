"""Structure: how much visible layout a response has (lists, headers, paragraphs, code blocks).

Counted structural elements (line-based, Markdown-aware):

  * list items: lines starting with ``-``, ``*``, ``+``, ``•``, ``1.``/``1)`` or ``a.``/``a)`` followed by text;
  * headers: Markdown ``#`` headings, lines that are entirely bold (``**Ingredients**``), and short lines
    (<= 6 words) ending with ``:`` (``Ingredients:``);
  * code blocks: pairs of ```` ``` ```` fences;
  * extra paragraphs: (number of blank-line-separated paragraphs) - 1.

With E the total,

    score = 1 - exp(-E / 4),   in [0, 1):

a single prose paragraph scores 0, one extra paragraph 0.22, a three-item list 0.53, a header + four-item list in
two paragraphs 0.78. Higher = more structured (scannable) layout; lower = plain running prose. Empty responses
score 0.0. Throughput (shared 2-core dev VM, ~35-word responses): ~50k responses/s.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List

import numpy as np

from spectral_soup.data.rewards import base

SCALE = 4.0

_LIST_ITEM_RE = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)]|[a-zA-Z][.)])\s+\S")
_MD_HEADER_RE = re.compile(r"^\s*#{1,6}\s+\S")
_BOLD_LINE_RE = re.compile(r"^\s*+(\*\*|__)[^*_\n]++\1\s*+:?\s*+$")  # Possessive: linear in the line's length.
_COLON_HEADER_RE = re.compile(r"^\s*[^\s:][^:]*:\s*$")
# A fence on its own line (`^\s*` reached over blank lines found the same fences, in time quadratic in their count).
_FENCE_RE = re.compile(r"^[^\S\n]*```", re.MULTILINE)
_PARAGRAPH_SPLIT_RE = re.compile(r"\n\s*\n")


def elements(text: str) -> Dict[str, int]:
  """Counts of the structural elements of the module docstring."""
  n_list = n_header = 0
  for line in text.splitlines():
    if _LIST_ITEM_RE.match(line):
      n_list += 1
    elif (_MD_HEADER_RE.match(line) or _BOLD_LINE_RE.match(line) or
          (_COLON_HEADER_RE.match(line) and len(line.split()) <= 6)):
      n_header += 1
  paragraphs = [p for p in _PARAGRAPH_SPLIT_RE.split(text) if p.strip()]
  return {
      "list_items": n_list,
      "headers": n_header,
      "code_blocks": len(_FENCE_RE.findall(text)) // 2,
      "extra_paragraphs": max(0,
                              len(paragraphs) - 1)
  }


class StructureReward(base.Reward):
  """Saturating count of layout elements, 1 - exp(-E / 4)."""

  name = "structure"
  description = ("Layout structure: 1 - exp(-E / 4) with E = list items + headers + code blocks + extra "
                 "paragraphs, in [0, 1) (higher = more structured, lower = plain prose); 0.0 for empty responses.")
  range = (0.0, 1.0)

  def config(self) -> Dict[str, Any]:
    return {"scale": SCALE}

  def _score(self, prompts: List[str], responses: List[str]) -> np.ndarray:
    del prompts
    return np.array([0.0 - math.expm1(-sum(elements(r).values()) / SCALE) for r in responses], np.float64)
