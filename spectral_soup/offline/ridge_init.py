"""Closed-form initialization of logit-vector bases (`basis.init="ridge"`): before any training step, each basis's
logit vector is a ridge regression of its ratings on the responses' token surprise (or counts) over the support.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from spectral_soup.offline import learnability
from spectral_soup.soup import validation

RIDGE_FEATURES = ("pair_surprise", "surprise", "counts")  # What the "ridge" initialization regresses ratings on.


def ridge_logit_bias(pairs: Mapping[str, np.ndarray], support: np.ndarray, vocab_size: int, *, beta: float,
                     rating_scale: float, l2: float, features: str = "pair_surprise") -> np.ndarray:
  """Closed-form logit vectors c: f32[K, V] (zero outside `support`) for bias-only bases, from rated pairs.

  With pi_k(a|s) ~ pi_ref(a|s) exp(c_k(a)), the log-ratio log pi_k(y) / pi_ref(y) of a response is, to first order
  in c, c . s(y) with s(y) = sum_t (onehot(y_t) - p_ref(. | s_t)) its token surprise under the reference. The ratings
  loss asks beta * log-ratio = rating_scale * rating (up to a constant per prompt), which is then linear least
  squares in c_k; with an L2 penalty, ridge regression times rating_scale / beta solves it in closed form:
  * "pair_surprise": each pair's rating difference on its surprise difference s(y_a) - s(y_b) (one row per pair:
    the pairwise ratings loss; no intercept, as in that loss: with chosen / rejected data, where a is always the
    better response, the mean difference is most of the signal);
  * "surprise": each response's rating on its surprise, both responses of every pair, centered (twice the rows; on
    the embedded default these directions buy more true reward per nat of KL: docs/METHOD.md, section 3);
  * "counts": each response's rating on its support-token counts, centered: a bag-of-words reward model (PAD's,
    `baselines.pad.fit_token_rewards`), whose token-level KL-regularized optimum, ignoring the soft value of what
    follows, is pi_ref exp(c_k). Counts credit every token of a longer response, so a length attribute's basis
    makes common words likelier instead of longer answers; under surprise, length is carried by the end-of-turn
    token.
  Training, if any, refines it. pairs: response_a/b [N, R] with masks, support_probs_a/b [N, R, S] (the cached
  feature pass; surprise only) and scores_a/b [N, K] (NaN: missing, dropped per basis); support: int[S] token ids.
  """
  if features not in RIDGE_FEATURES:
    raise ValueError(f"features={features!r}: expected one of {RIDGE_FEATURES}.")
  for name, value in (("beta", beta), ("rating_scale", rating_scale)):
    if not (validation.is_real(value) and np.isfinite(value) and value > 0):
      raise ValueError(f"{name}={value!r}: expected a finite number > 0.")
  support = np.asarray(support)
  if (support.ndim != 1 or not np.issubdtype(support.dtype, np.integer) or not len(support) or
      np.any((support < 0) | (support >= vocab_size)) or len(np.unique(support)) != len(support)):
    raise ValueError(f"support must be distinct token ids in [0, {vocab_size}) (int[S], S >= 1), got "
                     f"{support.dtype} {np.shape(support)} with values in [{support.min() if support.size else '-'}, "
                     f"{support.max() if support.size else '-'}]"
                     f"{' and repeats' if support.size and len(np.unique(support)) != len(support) else ''}.")
  check_ridge_ratings(pairs)
  if features != "counts":
    for side in ("a", "b"):
      probs = np.asarray(pairs[f"support_probs_{side}"])
      if probs.shape[-1:] != (len(support),) or not np.all(np.isfinite(probs)):
        raise ValueError(f"support_probs_{side} must be finite reference probabilities [N, R, S={len(support)}], got "
                         f"shape {probs.shape}{'' if np.all(np.isfinite(probs)) else ' with non-finite entries'}.")
  scores = [np.asarray(pairs[f"scores_{side}"], np.float64) for side in ("a", "b")]
  if features == "counts":
    x = [
        learnability.token_counts(pairs[f"response_{side}"], pairs[f"response_{side}_mask"], support)
        for side in ("a", "b")
    ]
  else:
    x = [
        learnability.surprise(pairs[f"response_{side}"], pairs[f"response_{side}_mask"], support,
                              pairs[f"support_probs_{side}"]) for side in ("a", "b")
    ]
  if features == "pair_surprise":
    weights = learnability.fit_ridge(x[0] - x[1], scores[0] - scores[1], l2, center=False)  # No intercept.
  else:
    weights = learnability.fit_ridge(np.concatenate(x), np.concatenate(scores), l2)
  c = np.zeros((scores[0].shape[1], vocab_size), np.float32)
  c[:, support] = rating_scale / beta * weights.T
  return c


def check_ridge_ratings(pairs: Mapping[str, np.ndarray]) -> None:
  """basis.init='ridge' needs, for every basis, pairs with a rating of both responses: else a ValueError."""
  rated = np.isfinite(np.asarray(pairs["scores_a"], np.float64) - np.asarray(pairs["scores_b"], np.float64))
  for k in np.flatnonzero(rated.sum(0) < 2):
    raise ValueError(f"basis.init='ridge' fits basis {k} on pairs with both responses rated, but scores_a / scores_b "
                     f"have {rated[:, k].sum()} such pairs (>= 2 needed). Use basis.init='zeros'.")
