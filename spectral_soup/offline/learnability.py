"""How much of each attribute the pairs can teach a basis: linear probes scored like a basis, before training.

A basis k is judged by its implicit reward r_k(x, y) = beta * (log pi_k(y|x) - log pi_ref(y|x)) ranking held-out
pairs by attribute k. Two linear probes of a response y = (y_1 .. y_T) bound what to expect, each a ridge
regression of the attribute's scores (both responses of every training pair, centered) on a vector of the
response, scored by the sign of its margin on labelled pairs exactly as a basis is:

* `token_counts`: sum_t onehot(y_t) over a vocabulary support, a bag-of-words reward model (PAD's reward model).
  It is not a policy; it says how much of the attribute the response's tokens carry at all.
* `surprise`: sum_t (onehot(y_t) - p_ref(. | s_t)) on the support. A policy whose logits move by a context-free
  vector c (zero outside the support) has log pi_c(y_t|s_t) - log pi_ref(y_t|s_t) = c(y_t) - log E_ref[exp c],
  whose first order in c is c . (onehot(y_t) - p_ref(.|s_t)): its implicit reward is linear in these features. So
  this probe is what a policy can express from token identities alone: tokens the reference already expected at
  that point earn nothing. A basis reaches the token-count level only through context (the soft value of what
  follows), which small data rarely teaches.

`hint_share` measures how much of an attribute's variance the generation's style hints explain: an attribute the
hints barely move varies mostly by sampling noise, which a policy cannot learn to produce without being told.

`experiments.attribute_learnability` runs these on a config's pairs and cached features.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from spectral_soup.baselines import pad as pad_lib


def token_counts(tokens: np.ndarray, mask: np.ndarray, support: np.ndarray) -> np.ndarray:
  """sum_t onehot(y_t) restricted to the support: float64[N, S] (PAD's token counts). tokens: int[N, R]."""
  return pad_lib.token_counts([tokens], [mask], np.asarray(support)).astype(np.float64)


def surprise(tokens: np.ndarray, mask: np.ndarray, support: np.ndarray, support_probs: np.ndarray) -> np.ndarray:
  """sum_t (onehot(y_t) - p_ref(. | s_t)) on the support: float64[N, S]. support_probs: [N, R, S]."""
  if support_probs.shape[:2] != tokens.shape or support_probs.shape[2] != len(support):
    raise ValueError(f"support_probs has shape {support_probs.shape}; expected {tokens.shape + (len(support),)} "
                     "(responses x positions x support).")
  expected = np.einsum("nrs,nr->ns", support_probs.astype(np.float64), np.asarray(mask, np.float64))
  return token_counts(tokens, mask, support) - expected


def check_settings(*, l2: float, folds: Optional[int] = None, prefix: str = "") -> None:
  """Raises ValueError unless `l2` is a finite number > 0 and `folds` (if given) an integer >= 2; the message names
  the setting as `{prefix}l2` / `{prefix}folds` (a CLI passes "--")."""
  shown = lambda value: str(value) if isinstance(value, numbers.Number) else repr(value)  # nan, not np.float64(nan).
  if isinstance(l2, bool) or not isinstance(l2, numbers.Real) or not math.isfinite(l2) or l2 <= 0:
    raise ValueError(f"{prefix}l2={shown(l2)}: expected a finite number > 0 (the ridge penalty).")
  if folds is not None and (isinstance(folds, bool) or not isinstance(folds, numbers.Integral) or folds < 2):
    raise ValueError(f"{prefix}folds={shown(folds)}: expected an integer >= 2 (cross-validation folds over the "
                     "training pairs).")


def fit_ridge(features: np.ndarray, scores: np.ndarray, l2: float, *, center: bool = True) -> np.ndarray:
  """Ridge weights [S, A] of scores [N, A] on features [N, S] (NaN scores: dropped per column).

  center: fit an intercept (features and scores centered on the rows fitted), for responses rated up to a
  constant; False for pair differences, whose model has none (a constant would say "response a is better" whatever
  the pair, and flip sign with the pair's order).
  """
  check_settings(l2=l2)
  if features.shape[0] != scores.shape[0]:
    raise ValueError(f"features has {features.shape[0]} rows but scores has {scores.shape[0]}.")
  shift = (lambda v: v - v.mean(0, keepdims=True)) if center else (lambda v: v)
  x = shift(features)
  gram = x.T @ x + l2 * np.eye(x.shape[1])
  weights = np.zeros((x.shape[1], scores.shape[1]))
  for k in range(scores.shape[1]):
    ok = ~np.isnan(scores[:, k])
    y = shift(scores[ok, k])
    if ok.all():
      weights[:, k] = np.linalg.solve(gram, x.T @ y)
    else:  # Centered on the rows it is fitted on, as the scores are.
      xk = shift(features[ok])
      weights[:, k] = np.linalg.solve(xk.T @ xk + l2 * np.eye(x.shape[1]), xk.T @ y)
  return weights


def pair_accuracy(margins: np.ndarray, labels: np.ndarray) -> tuple:
  """(accuracy [A], count [A]) of margin signs [N, A] against labels [N, A] (1: a wins, 0: b wins, -1: masked).

  A zero margin counts as wrong, as in the basis metrics (`spectral_soup.offline.losses`). An attribute without a
  labelled pair has no accuracy: NaN (it read 0.0, a probe that is always wrong).
  """
  labelled = labels >= 0
  correct = np.where(labels == 1, margins > 0, margins < 0) & labelled
  count = labelled.sum(0)
  return _share(correct.sum(0), count), count


def _share(correct: np.ndarray, count: np.ndarray) -> np.ndarray:
  """correct / count, NaN where count is 0."""
  count = np.asarray(count)
  return np.where(count > 0, np.asarray(correct, np.float64) / np.maximum(count, 1), np.nan)


def probe_accuracy(train_a: np.ndarray, train_b: np.ndarray, train_scores_a: np.ndarray, train_scores_b: np.ndarray,
                   test_a: np.ndarray, test_b: np.ndarray, test_labels: np.ndarray, l2: float) -> tuple:
  """Fits the probe on both responses of the training pairs; (accuracy [A], count [A]) on the test pairs."""
  weights = fit_ridge(np.concatenate([train_a, train_b]), np.concatenate([train_scores_a, train_scores_b]), l2)
  return pair_accuracy((test_a - test_b) @ weights, test_labels)


def cross_validated_accuracy(feats_a: np.ndarray, feats_b: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                             labels: np.ndarray, *, l2: float, folds: int = 4, seed: int = 0) -> tuple:
  """k-fold (by pair) accuracy of the probe on the training pairs alone: (accuracy [A], count [A]) pooled."""
  check_settings(l2=l2, folds=folds)
  n = len(labels)
  if n < folds:
    raise ValueError(f"{n} pairs cannot be split into {folds} folds.")
  order = np.random.default_rng(seed).permutation(n)
  correct = np.zeros(labels.shape[1])
  count = np.zeros(labels.shape[1])
  for fold in np.array_split(order, folds):
    train = np.setdiff1d(order, fold)
    acc, cnt = probe_accuracy(feats_a[train], feats_b[train], scores_a[train], scores_b[train], feats_a[fold],
                              feats_b[fold], labels[fold], l2)
    correct += np.where(cnt > 0, acc, 0.0) * cnt
    count += cnt
  return _share(correct, count), count


def hint_share(hints: Sequence[str], scores: np.ndarray) -> np.ndarray:
  """Share of each attribute's variance explained by the style hint a response was sampled under: [A] in [0, 1]."""
  hints = np.asarray(list(hints))
  scores = np.asarray(scores, np.float64)
  if len(hints) != len(scores):
    raise ValueError(f"{len(hints)} hints for {len(scores)} scored responses.")
  total = scores.var(0)
  between = np.zeros(scores.shape[1])
  for hint in np.unique(hints):
    group = scores[hints == hint]
    between += len(group) * (group.mean(0) - scores.mean(0))**2
  return between / len(scores) / np.maximum(total, 1e-12)


def binomial_z(accuracy: np.ndarray, count: np.ndarray) -> np.ndarray:
  """Standard errors above chance of an accuracy on `count` pairs: (acc - 0.5) / sqrt(0.25 / count)."""
  return (np.asarray(accuracy) - 0.5) / np.sqrt(0.25 / np.maximum(np.asarray(count, np.float64), 1))


def report(train: Mapping[str, np.ndarray], held_out: Mapping[str, np.ndarray], support: np.ndarray, *, l2: float,
           folds: int = 4, seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
  """Both probes, cross-validated on `train` and fitted on `train` / scored on `held_out`.

  train, held_out: pair arrays (`spectral_soup.offline.input_pipeline` format) with `scores_a/_b` and `labels`;
  `support_probs_a/_b` (cached features of a head basis with a vocabulary support) enable the surprise probe.
  Returns {probe: {"cv_accuracy", "cv_count", "held_out_accuracy", "held_out_count": [A]}}.
  """

  def vectors(pairs, kind):
    out = []
    for side in ("a", "b"):
      tokens, mask = pairs[f"response_{side}"], pairs[f"response_{side}_mask"]
      if kind == "token_counts":
        out.append(token_counts(tokens, mask, support))
      else:
        out.append(surprise(tokens, mask, support, pairs[f"support_probs_{side}"]))
    return out

  kinds = ["token_counts"]
  if "support_probs_a" in train and (not len(held_out["labels"]) or "support_probs_a" in held_out):
    kinds.append("surprise")
  results = {}
  for kind in kinds:
    ta, tb = vectors(train, kind)
    acc, cnt = cross_validated_accuracy(ta, tb, train["scores_a"], train["scores_b"], train["labels"], l2=l2,
                                        folds=folds, seed=seed)
    row = {"cv_accuracy": acc, "cv_count": cnt}
    if len(held_out["labels"]):
      ea, eb = vectors(held_out, kind)
      row["held_out_accuracy"], row["held_out_count"] = probe_accuracy(ta, tb, train["scores_a"], train["scores_b"], ea,
                                                                       eb, held_out["labels"], l2)
    results[kind] = row
  return results


def verdict(cv_accuracy: np.ndarray, cv_count: np.ndarray, min_z: float = 3.0) -> list:
  """"learnable" where the cross-validated probe is at least `min_z` standard errors above chance, "no pairs" where
  the attribute has no labelled pair, else "weak"."""
  return [("learnable" if z >= min_z else "weak") if n > 0 else "no pairs"
          for z, n in zip(binomial_z(cv_accuracy, cv_count), np.asarray(cv_count))]


def hint_share_of_pairs(pairs: Sequence[Mapping], num_attributes: int) -> Optional[np.ndarray]:
  """`hint_share` over both responses of embedded pairs (records with hint_a/_b), None if they have no hints."""
  if not pairs or "hint_a" not in pairs[0]:
    return None
  hints = [p["hint_a"] for p in pairs] + [p["hint_b"] for p in pairs]
  scores = np.asarray([p["scores_a"] for p in pairs] + [p["scores_b"] for p in pairs], np.float64)
  return hint_share(hints, scores[:, :num_attributes])
