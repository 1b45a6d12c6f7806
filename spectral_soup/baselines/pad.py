"""PAD-style reward-guided decoding: a token-level attribute reward model and the features it gives a user fit.

PAD (Chen et al., ICLR 2025) personalizes at decoding time: next-token scores are the reference log-probs plus
the user's preference-weighted *token-level* rewards, pi(a|s) ~ pi_ref(a|s) exp(g . R(s, a) / beta). Here the
token-level reward of attribute j is a linear reward over tokens, R_j(a) = table[j, a], fitted by ridge regression
of the attribute's standardized sequence score on the response's token counts (`fit_token_rewards`), so that a
response's predicted attribute vector is sum_t table[:, y_t]. A user's weights g are fitted online from the same
comparisons as lambda, with these predicted attribute vectors as features (`pad_features`). Decoding uses
`spectral_soup.soup.engine` rows of mode "guided" (greedy in the token reward, as PAD: no lookahead).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def token_counts(responses: Sequence[np.ndarray], masks: Sequence[np.ndarray], support: np.ndarray) -> np.ndarray:
  """Counts of each support token per response: float32[N, S] (tokens outside the support are ignored).

  support: distinct non-negative token ids (ValueError otherwise: a repeated id left its first column at zero);
  a negative token id on a counted position raises (it was counted as the highest support id)."""
  support = np.asarray(support)
  if support.ndim != 1 or not support.size or not np.issubdtype(support.dtype, np.integer) or support.min() < 0:
    raise ValueError(f"support must be a non-empty int[S] of token ids >= 0, got {support.dtype} of shape "
                     f"{support.shape}.")
  if len(np.unique(support)) != len(support):
    raise ValueError(
        f"support repeats token ids (e.g. {int(support[np.flatnonzero(np.diff(np.sort(support)) == 0)[0]])}"
        "): expected distinct ids, one column each.")
  position = np.full((int(support.max()) + 1,), -1, np.int64)
  position[support] = np.arange(len(support))
  rows = []
  for tokens, mask in zip(responses, masks):
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    for row, row_mask in zip(tokens, mask):
      ids = row[row_mask]
      if ids.size and ids.min() < 0:
        raise ValueError(f"token id {int(ids.min())} on a counted position of response {len(rows)}: expected ids "
                         ">= 0 (mask padding out).")
      ids = ids[ids < len(position)]
      idx = position[ids]
      rows.append(np.bincount(idx[idx >= 0], minlength=len(support)))
  return np.asarray(rows, np.float32)


def fit_token_rewards(counts: np.ndarray, scores: np.ndarray, support: np.ndarray, vocab_size: int,
                      l2: float = 1.0) -> np.ndarray:
  """Ridge regression of standardized scores on token counts, in its dual form (N << S).

  counts: [N, S] (`token_counts`); scores: [N, A] standardized attribute scores; support: int[S] token ids.
  Returns table: float32[A, V], zero outside the support: the centered per-token reward of each attribute.
  """
  if counts.shape[0] != scores.shape[0]:
    raise ValueError(f"counts has {counts.shape[0]} rows but scores has {scores.shape[0]}.")
  if l2 <= 0:
    raise ValueError(f"l2={l2}: expected > 0.")
  bad = np.argwhere(~np.isfinite(np.asarray(scores, np.float64)))
  if bad.size:  # One NaN made that attribute's whole table NaN (and guided decoding's logits with it).
    row, column = (int(i) for i in bad[0])
    raise ValueError(f"scores[{row}, {column}] is {scores[row, column]}: expected finite standardized scores "
                     f"({len(bad)} such entries; leave the responses without a score out of the fit).")
  x = counts.astype(np.float64)
  x = x - x.mean(0, keepdims=True)
  y = scores.astype(np.float64) - scores.mean(0, keepdims=True)
  alpha = np.linalg.solve(x @ x.T + l2 * np.eye(len(x)), y)  # [N, A]
  coef = x.T @ alpha  # [S, A]
  table = np.zeros((scores.shape[1], vocab_size), np.float32)
  table[:, support] = coef.T
  return table


def pad_features(counts: np.ndarray, table: np.ndarray, support: np.ndarray) -> np.ndarray:
  """A response's predicted attribute vector sum_t table[:, y_t]: [N, A], from its support counts [N, S]."""
  return (counts @ table[:, support].T).astype(np.float32)
