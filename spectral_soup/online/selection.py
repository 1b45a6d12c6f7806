"""Choosing a learner's penalty from comparisons alone: cross-validated prediction of the users' choices.

The online fits shrink lambda toward a prior with an L2 penalty. Its best strength depends on how informative the
features are about the choices (the bases' implicit rewards predict them less well than a token-count reward
model's attribute predictions, for example), so each learner's penalty is chosen on the comparisons of a dev run
(`experiments.choose_online_l2` reads its `comparisons.npz`), never on the held-out users: every user's comparisons
are split into folds, each fold's choices are predicted by the fit on the other folds, and the held-out
log-likelihood and accuracy are averaged over users and folds.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from spectral_soup.online import checks
from spectral_soup.online import fit
from spectral_soup.soup import validation

CONSTRAINTS = ("none", "nonnegative", "simplex")


def _fit_kwargs(constraint: str, prior_mean: Optional[np.ndarray]) -> dict:
  if constraint not in CONSTRAINTS:
    raise ValueError(f"constraint={constraint!r}: expected one of {CONSTRAINTS}.")
  if constraint == "simplex":
    return {"constraint": "simplex"}
  kwargs = {"tol": 1e-5}
  if prior_mean is not None:
    kwargs["prior_mean"] = np.asarray(prior_mean, np.float32)
  if constraint == "nonnegative":
    kwargs.update(constraint="box", box=(0.0, np.inf))
  return kwargs


def cross_validate(features: np.ndarray, prefs: np.ndarray, l2s: Sequence[float], *, constraint: str = "none",
                   prior_mean: Optional[np.ndarray] = None, folds: int = 8) -> Dict[str, np.ndarray]:
  """Held-out choice prediction of the logistic lambda fit at each penalty.

  Args:
    features: f32[U, N, K] each comparison's feature difference (first response minus second).
    prefs: f32[U, N] 1 where the user chose the first response, else 0; a label p in between (0.5: a tie) counts
      as p of a correct choice where the margin is positive and 1 - p where it is negative.
    l2s: the penalties to compare.
    constraint: "none", "nonnegative" (lam >= 0) or "simplex" (P-Soups; its fit has no prior).
    prior_mean: f32[K] the center of the penalty (None: 0); ignored for the simplex.
    folds: comparisons of every user are assigned to folds round-robin (comparison n to fold n % folds).

  Returns:
    {"l2": [P], "log_likelihood": [P] mean held-out log-likelihood per comparison, "accuracy": [P] held-out
    share of choices on the side of the fitted lambda's margin (a zero margin counts half, as in the online rounds)}.
  """
  # Every input is checked here, on the caller's indices, before any fit compiles: the fits see fold subsets (a
  # row's index there is not the caller's), and a user with a NaN row would get a NaN lambda whose margins all
  # count as wrong choices (a finite, lowered accuracy).
  for name, value in (("features", features), ("prefs", prefs), ("prior_mean", prior_mean)):
    checks.check_numeric(name, value)
  if np.ndim(features) != 3 or np.shape(prefs) != np.shape(features)[:2]:
    raise ValueError(f"features must be [U, N, K] and prefs [U, N]; got {np.shape(features)} and "
                     f"{np.shape(prefs)}.")
  num_users, num, _ = np.shape(features)
  if not num_users:
    raise ValueError(f"features {np.shape(features)} has no user (U = 0): nothing to cross-validate.")
  checks.check_num_features("features", features)
  for name, value in (("features", features), ("prefs", prefs)):
    checks.check_finite(name, value)
  checks.check_labels(prefs, None)
  if (isinstance(folds, (bool, np.bool_)) or not isinstance(folds, (int, np.integer)) or not 2 <= folds <= num):
    raise ValueError(f"folds={folds!r}: expected an integer in 2..{num} (the comparisons per user)"
                     f"{'; the users have fewer than 2 comparisons each' if num < 2 else ''}.")
  if np.ndim(l2s) != 1 or isinstance(l2s, (str, bytes)):
    raise ValueError(f"l2s={l2s!r}: expected a list of penalties (one fit per value), e.g. [0.1, 1.0].")
  if not len(l2s):
    raise ValueError("l2s=[]: expected one or more positive penalties.")
  for i, l2 in enumerate(l2s):
    if not (validation.is_real(l2) and checks.l2_in_range(l2)):
      raise ValueError(f"l2s[{i}] is {l2!r}: expected a finite number > 0 that float32 holds, in "
                       f"[{checks.L2_RANGE[0]:.3g}, {checks.L2_RANGE[1]:.3g}].")
  if prior_mean is not None and constraint != "simplex":
    checks.check_shapes("prior_mean", prior_mean, (np.shape(features)[2],), "[K]")
    checks.check_finite("prior_mean", prior_mean)
  features, prefs = np.asarray(features, np.float32), np.asarray(prefs, np.float32)
  kwargs = _fit_kwargs(constraint, prior_mean)
  fold = np.arange(num) % folds
  ll, acc = np.zeros(len(l2s)), np.zeros(len(l2s))
  for i, l2 in enumerate(l2s):
    for j in range(folds):
      train, test = fold != j, fold == j
      lam = np.asarray(
          fit.fit_lambda_batched(features[:, train], prefs[:, train], l2=float(l2), mask=np.ones(
              (num_users, train.sum()), bool), **kwargs))
      margin = np.einsum("unk,uk->un", features[:, test], lam).astype(np.float64)
      y = prefs[:, test]
      ll[i] += np.sum(-y * np.logaddexp(0.0, -margin) - (1 - y) * np.logaddexp(0.0, margin))
      # y (margin > 0) + (1 - y) (margin < 0): for 0 / 1 labels the share on the margin's side. A zero margin
      # (lam = 0: a nonnegative fit with nothing to go on) predicts nothing: a coin flip, 0.5, as the online rounds
      # count it (it counted as wrong: 0.02 for such a learner, against 0.5).
      acc[i] += np.sum(y * (margin > 0) + (1 - y) * (margin < 0) + 0.5 * (margin == 0))
  total = num_users * num
  return {"l2": np.asarray(l2s, np.float64), "log_likelihood": ll / total, "accuracy": acc / total}
