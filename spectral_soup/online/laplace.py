"""The Laplace posterior of a user's lambda, Thompson sampling, and which pair of responses to show next.

The Laplace approximation N(lam_hat, H(lam_hat)^-1) around the fitted optimum (H: the Hessian of `fit_lambda`'s
objective) gives posterior samples of lam (`thompson_sample`) and the choice of which two of M candidate responses
to show the user next (`choose_pair`). As in `fit`, each entry point has a one-user form and a batched form over U
users that share their argument checks and run the same one-user core.

The posterior knows nothing of a constraint the fit had (`constraint="simplex"` / `"box"`): it is the Gaussian with
the unconstrained objective's Hessian around the (constrained) optimum, so at an optimum on a bound about half its
samples fall outside the feasible set (e.g. negative weights for a nonnegative fit). Project the samples
(`online.projections.project`) where the caller needs feasible weights; the online protocol serves them as they
are (a soup takes any real weights).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online import newton
from spectral_soup.online.checks import Array
from spectral_soup.online.checks import ArrayLike
from spectral_soup.online.checks import check_finite
from spectral_soup.online.checks import check_finite_rows
from spectral_soup.online.checks import check_key
from spectral_soup.online.checks import check_l2
from spectral_soup.online.checks import check_l2_shape
from spectral_soup.online.checks import check_num_features
from spectral_soup.online.checks import check_numeric
from spectral_soup.online.checks import check_row_weights
from spectral_soup.online.checks import check_shapes
from spectral_soup.online.checks import dims
from spectral_soup.online.checks import float_dtype
from spectral_soup.online.checks import is_tracer
from spectral_soup.soup.validation import check_int

PAIR_RULES = ("max_variance", "max_info", "thompson")
# Relative jitter added to a posterior covariance (times its largest variance): keeps it numerically positive
# definite in float32.
_COV_JITTER = 1e-5


@jax.jit
def posterior_core(lam: Array, x: Array, m: Array, l2: Array) -> Tuple[Array, Array]:
  """`posterior` on materialized arrays of one user: (lam `[K]`, cov `[K, K]`)."""
  x, _, m = newton.sanitize(x, jnp.zeros(x.shape[:1], x.dtype), m)
  h = newton.hessian(x, m * newton.curvature(x @ lam), l2)  # Exact weights also for saturated logits.
  h = 0.5 * (h + h.T)
  evals, evecs = jnp.linalg.eigh(h)
  evals = jnp.maximum(evals, l2)  # Exact arithmetic gives evals >= l2; rounding may not.
  cov = (evecs / evals) @ evecs.T
  cov = 0.5 * (cov + cov.T)
  cov = cov + (_COV_JITTER / jnp.min(evals)) * jnp.eye(x.shape[-1], dtype=x.dtype)
  return lam, cov


posterior_core_batched = jax.jit(jax.vmap(posterior_core))


def _posterior_inputs(lam_hat, delta_features, mask, l2, *, batched: bool) -> Tuple[Array, Array, Array, Array]:
  """Checks the arguments of `posterior` (batched: `posterior_batched`); returns the core's (lam, x, m, l2)."""
  check_l2(l2)
  for name, value in (("lam_hat", lam_hat), ("delta_features", delta_features), ("mask", mask)):
    check_numeric(name, value)
  check_shapes("delta_features", delta_features, (None,) * (3 if batched else 2), dims(batched, "N", "K"))
  check_num_features("delta_features", delta_features)
  *users, num_rows, num = np.shape(delta_features)
  check_shapes("lam_hat", lam_hat, (*users, num), dims(batched, "K"))
  dtype = float_dtype(delta_features, lam_hat)
  check_l2_shape(l2, users)
  m = jnp.ones((*users, num_rows), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  check_shapes("mask", m, (*users, num_rows), dims(batched, "N"))
  check_row_weights("mask", mask)
  if not batched:  # One user: a NaN lam_hat or counted row gave an all-NaN covariance (batched: a warning).
    check_finite("lam_hat", lam_hat)
    check_finite_rows(delta_features, np.zeros(num_rows), mask)
  if batched:
    l2 = jnp.broadcast_to(jnp.asarray(l2, dtype), tuple(users))
  else:
    l2 = jnp.asarray(l2, dtype)
  return jnp.asarray(lam_hat, dtype), jnp.asarray(delta_features, dtype), m, l2


def posterior(lam_hat: ArrayLike, delta_features: ArrayLike, mask: Optional[ArrayLike] = None, *,
              l2: ArrayLike) -> Tuple[Array, Array]:
  """Laplace approximation N(lam_hat, H^-1) of the posterior of lam around the fitted optimum.

  H = sum_i m_i s_i (1 - s_i) d_i d_i^T + l2 I, s_i = sigmoid(lam_hat . d_i) (it does not depend on the labels).
  The inverse is taken by eigendecomposition with eigenvalues clamped at l2 (their exact lower bound), symmetrized,
  plus a relative jitter (1e-5 of the largest variance), so `cov` is symmetric positive definite even for
  degenerate data (no rows, separable data, feature scales 1e6). The jitter is the same in every direction: a
  direction's variance v becomes v + 1e-5 v_max, so the best-determined directions are inflated by a factor up to
  1 + 1e-5 cond(H) (+0.03% at the demo's cond(H) <= 27; 2x at cond(H) = 1e5, e.g. many comparisons with l2 = 1e-4).

  Args:
    lam_hat: `[K]` the `fit_lambda` optimum (with the same l2, mask).
    delta_features: `[N, K]`.
    mask: `[N]` bool or non-negative finite row weights (None: all rows).
    l2: penalty strength, a scalar > 0 (as in `fit_lambda`'s one-user form).

  Returns:
    (mean `[K]`, cov `[K, K]`).
  """
  return posterior_core(*_posterior_inputs(lam_hat, delta_features, mask, l2, batched=False))


def posterior_batched(lam_hat: ArrayLike, delta_features: ArrayLike, mask: Optional[ArrayLike] = None, *,
                      l2: ArrayLike) -> Tuple[Array, Array]:
  """`posterior` for U users in one compiled call: lam_hat `[U, K]`, delta_features `[U, N, K]`, mask `[U, N]`,
  l2 scalar or `[U]` -> (mean `[U, K]`, cov `[U, K, K]`)."""
  mean, cov = posterior_core_batched(*_posterior_inputs(lam_hat, delta_features, mask, l2, batched=True))
  if not (is_tracer(lam_hat) or is_tracer(delta_features) or is_tracer(mask)):
    # As `fit_lambda`'s batched form: a user with a NaN lam_hat (e.g. the NaN row of a user whose data the fit
    # isolated) or non-finite counted rows gets a NaN covariance; the others are unaffected. Name those users.
    users = np.flatnonzero(~np.all(np.isfinite(np.asarray(cov)), axis=(-2, -1))).tolist()
    if users:
      warnings.warn(
          f"posterior_batched: users {users[:10]}{' ...' if len(users) > 10 else ''} have a non-finite lam_hat or "
          "non-finite delta_features on rows the mask counts; their covariance is NaN (choose_pair_batched would "
          "pick an arbitrary pair for them), the other users' are unaffected.", RuntimeWarning, stacklevel=2)
  return mean, cov


def cov_sqrt(cov: Array) -> Array:
  """A square root R of a symmetric PSD `[K, K]` covariance: R R^T = cov, so mean + R eps samples N(mean, cov).

  By symmetric eigendecomposition, with eigenvalues that rounding made negative clamped at 0 (robust to tiny ones).
  """
  evals, evecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
  return evecs * jnp.sqrt(jnp.maximum(evals, 0.0))


def thompson_sample(key: Array, mean: ArrayLike, cov: ArrayLike, num_samples: Optional[int] = None) -> Array:
  """Samples of lam ~ N(mean, cov) (through a symmetric eigendecomposition, robust to tiny eigenvalues).

  Args:
    key: PRNG key.
    mean: `[K]`.
    cov: `[K, K]` symmetric PSD (checked when concrete).
    num_samples: None for one `[K]` sample, else `[num_samples, K]`.

  Returns:
    `[K]` or `[num_samples, K]`.
  """
  check_key(key)
  check_numeric("mean", mean)
  check_numeric("cov", cov)
  check_shapes("mean", mean, (None,), "[K]")
  check_shapes("cov", cov, (np.shape(mean)[-1],) * 2, "[K, K]")
  check_finite("mean", mean)
  if not is_tracer(cov):
    _check_psd(np.asarray(cov, np.float64))
  check_finite("cov", cov)  # Finite in float64 but not in the sampler's float32 (1e39): NaN samples.
  if num_samples is not None:
    check_int("num_samples", num_samples, 1)
  return _thompson_sample(key, mean, cov, num_samples=num_samples)


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _thompson_sample(key: Array, mean: ArrayLike, cov: ArrayLike, num_samples: Optional[int] = None) -> Array:
  mean = jnp.asarray(mean)
  dtype = float_dtype(mean, cov)
  mean = mean.astype(dtype)
  root = cov_sqrt(jnp.asarray(cov, dtype))
  shape = (mean.shape[-1],) if num_samples is None else (num_samples, mean.shape[-1])
  eps = jax.random.normal(key, shape, dtype)
  return mean + eps @ root.T


def _check_psd(cov: np.ndarray) -> None:
  """A concrete covariance: ValueError unless finite, symmetric and positive semi-definite (up to rounding)."""
  scale = np.max(np.abs(cov)) if cov.size and np.all(np.isfinite(cov)) else np.nan
  if not np.isfinite(scale):
    raise ValueError("cov must be finite: it holds NaN or inf.")
  asymmetry = np.max(np.abs(cov - cov.T))
  if asymmetry > 1e-5 * scale:
    raise ValueError(f"cov must be symmetric: |cov - cov.T| reaches {asymmetry:.3g} (entries up to {scale:.3g}).")
  smallest = np.linalg.eigvalsh(cov)[0]
  if smallest < -1e-5 * scale:
    raise ValueError(f"cov must be positive semi-definite: its smallest eigenvalue is {smallest:.3g} (entries up "
                     f"to {scale:.3g}).")


def _check_psd_users(cov: np.ndarray) -> None:
  """`_check_psd` for each user of a concrete `[U, K, K]` covariance whose entries are finite, naming the first
  user that fails (users with NaN or inf entries are left to the caller, which isolates them)."""
  finite = np.all(np.isfinite(cov), axis=(-2, -1))
  for user in np.flatnonzero(finite & _not_psd(cov, finite)):
    try:
      _check_psd(cov[user])
    except ValueError as e:
      raise ValueError(f"user {int(user)}: {e}") from None


def _not_psd(cov: np.ndarray, finite: np.ndarray) -> np.ndarray:
  """bool[U]: the users whose finite covariance is asymmetric or indefinite beyond rounding (vectorized screen)."""
  safe = np.where(finite[:, None, None], cov, 0.0)
  scale = np.max(np.abs(safe), axis=(-2, -1), initial=0.0)
  asymmetric = np.max(np.abs(safe - np.swapaxes(safe, -1, -2)), axis=(-2, -1), initial=0.0) > 1e-5 * scale
  symmetric = 0.5 * (safe + np.swapaxes(safe, -1, -2))
  smallest = np.linalg.eigvalsh(symmetric)[..., 0] if safe.size else np.zeros(len(safe))
  return asymmetric | (smallest < -1e-5 * scale)


def _masked_argmax_pair(scores: Array) -> Tuple[Array, Array]:
  """(i, j), i < j, of the largest entry of a symmetric `[M, M]` score matrix (off-diagonal, -inf = excluded)."""
  num = scores.shape[0]
  upper = jnp.triu(jnp.ones((num, num), bool), k=1)
  flat = jnp.argmax(jnp.where(upper, scores, -jnp.inf).reshape(-1))
  return (flat // num).astype(jnp.int32), (flat % num).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("rule",))
def _choose_pair_core(f, mean, cov, valid, key, *, rule):
  pair_ok = valid[:, None] & valid[None, :]
  if rule == "thompson":
    k1, k2 = jax.random.split(key)
    values1 = jnp.where(valid, f @ _thompson_sample(k1, mean, cov), -jnp.inf)
    values2 = jnp.where(valid, f @ _thompson_sample(k2, mean, cov), -jnp.inf)
    i = jnp.argmax(values1)
    j = jnp.argmax(jnp.where(jnp.arange(f.shape[0]) == i, -jnp.inf, values2))
    return i.astype(jnp.int32), j.astype(jnp.int32)
  # d = f_i - f_j for every pair, formed before the products: expanding d^T cov d into f_i^T cov f_i + ... cancels
  # catastrophically when the candidates share a large common offset.
  d = f[:, None, :] - f[None, :, :]  # [M, M, K]
  variance = jnp.maximum(jnp.einsum("ijk,kl,ijl->ij", d, cov, d), 0.0)  # d^T cov d for every pair.
  if rule == "max_info":
    score = jnp.log1p(newton.curvature(d @ mean) * variance)  # s (1 - s) without 1 - s's cancellation.
  else:
    score = variance
  return _masked_argmax_pair(jnp.where(pair_ok, score, -jnp.inf))


def _check_candidates(f: np.ndarray, valid: np.ndarray, *, batched: bool) -> None:
  """Concrete candidates: ValueError unless every user has >= 2 valid candidates, all of them finite."""
  name = "choose_pair_batched" if batched else "choose_pair"
  counts = np.reshape(valid.sum(-1), -1)
  short = np.flatnonzero(counts < 2)
  if short.size:
    first = int(short[0])
    count = f"{int(counts[first])} valid candidate{'' if counts[first] == 1 else 's'}"
    if batched:
      more = f" ({short.size} such users: {short[:10].tolist()})" if short.size > 1 else ""
      raise ValueError(f"candidate_mask leaves user {first} with {count}: {name} needs at least 2 per user to "
                       f"return a pair i != j{more}.")
    raise ValueError(f"candidate_mask leaves {count}: {name} needs at least 2 to return a pair i != j.")
  bad = np.argwhere(valid[..., None] & ~np.isfinite(f))
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    where = f"user {index[0]}, candidate {index[1]}" if batched else f"candidate {index[0]}"
    raise ValueError(f"candidate_features{list(index)} is {f[index]} ({where}): every candidate the mask counts "
                     f"must be finite (mark it False in candidate_mask to skip it).")


def _choose_pair_inputs(candidate_features, mean, cov, rule, key, candidate_mask, *,
                        batched: bool) -> Tuple[Array, Array, Array, Array]:
  """Checks the arguments of `choose_pair` (batched: `choose_pair_batched`).

  Returns:
    (f, mean, cov, valid): the core's inputs, in the computation dtype (valid: bool).
  """
  if rule not in PAIR_RULES:
    raise ValueError(f"rule must be one of {PAIR_RULES}, got {rule!r}.")
  if rule == "thompson" and key is None:
    raise ValueError("rule='thompson' needs a PRNG key.")
  if rule == "thompson":
    check_key(key)
  arguments = {"candidate_features": candidate_features, "mean": mean, "cov": cov, "candidate_mask": candidate_mask}
  for name, value in arguments.items():
    check_numeric(name, value)
  check_shapes("candidate_features", candidate_features, (None,) * (3 if batched else 2), dims(batched, "M", "K"))
  *users, num_cands, num = np.shape(candidate_features)
  if num_cands < 2:
    raise ValueError(f"choose_pair needs at least 2 candidates, got {num_cands}.")
  check_shapes("mean", mean, (*users, num), dims(batched, "K"))
  check_shapes("cov", cov, (*users, num, num), dims(batched, "K", "K"))
  check_row_weights("candidate_mask", candidate_mask)  # A -1 or NaN would count as True.
  valid = jnp.ones((*users, num_cands), bool) if candidate_mask is None else jnp.asarray(candidate_mask, bool)
  check_shapes("candidate_mask", valid, (*users, num_cands), dims(batched, "M"))
  if not (is_tracer(candidate_features) or is_tracer(candidate_mask)):
    _check_candidates(np.asarray(candidate_features), np.asarray(valid), batched=batched)
  if not batched:  # One user: a NaN or indefinite posterior silently chose the pair (0, 1).
    check_finite("mean", mean)
    if not is_tracer(cov):
      _check_psd(np.asarray(cov, np.float64))
  elif not is_tracer(cov):  # U users: a non-finite one is isolated (documented); a finite indefinite one is refused.
    _check_psd_users(np.asarray(cov, np.float64))
  dtype = float_dtype(candidate_features, mean, cov)
  return jnp.asarray(candidate_features, dtype), jnp.asarray(mean, dtype), jnp.asarray(cov, dtype), valid


def choose_pair(candidate_features: ArrayLike, mean: ArrayLike, cov: ArrayLike, *, rule: str = "max_variance",
                key: Optional[Array] = None, candidate_mask: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
  """Which two of M candidate responses to show the user next.

  Rules (d = f_i - f_j):
    * "max_variance": argmax over pairs of the predictive variance of the preference score, d^T cov d (the pair the
      posterior is least sure how to rank);
    * "max_info": argmax of log(1 + s (1 - s) d^T cov d), s = sigmoid(mean . d): the D-optimal design criterion
      (log-determinant increase of the Laplace precision), which discounts pairs whose outcome is already
      predictable from the mean;
    * "thompson": double Thompson sampling: i = best candidate under one posterior sample, j = best of the others
      under a second sample (needs `key`).

  Args:
    candidate_features: `[M, K]` f(x, y_m) of the candidates (M >= 2).
    mean: `[K]` posterior mean.
    cov: `[K, K]` posterior covariance.
    rule: one of PAIR_RULES (static).
    key: PRNG key, required for "thompson".
    candidate_mask: `[M]` bool, False = not a valid candidate (at least two must be valid; a masked candidate's
      features are never read, NaN or not).

  Returns:
    (i, j) int32 scalars with i != j (i < j for the deterministic rules), both valid candidates.

  Raises:
    ValueError: on concrete inputs, fewer than two valid candidates, or a non-finite feature of a valid candidate
      (naming it). Traced inputs (`jax.jit` / `jax.vmap` over the features or the mask) cannot be checked: there,
      fewer than two valid candidates give a pair that repeats a candidate or includes a masked one, and a
      non-finite valid candidate may be picked (argmax counts NaN as the largest score).
  """
  inputs = _choose_pair_inputs(candidate_features, mean, cov, rule, key, candidate_mask, batched=False)
  return _choose_pair_core(*inputs, key, rule=rule)


def choose_pair_batched(candidate_features: ArrayLike, mean: ArrayLike, cov: ArrayLike, *, rule: str = "max_variance",
                        key: Optional[Array] = None, candidate_mask: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
  """`choose_pair` for U users in one compiled call.

  Args:
    candidate_features: `[U, M, K]`.
    mean: `[U, K]`.
    cov: `[U, K, K]`.
    rule: one of PAIR_RULES.
    key: PRNG key (split per user), required for "thompson".
    candidate_mask: `[U, M]` bool (None: all valid); at least two valid per user.

  Returns:
    (i `[U]`, j `[U]`) int32, as `choose_pair` per user (a user whose mean or cov holds NaN gets an arbitrary pair
    of its valid candidates; the others are unaffected).

  Raises:
    ValueError: as `choose_pair`, naming the first user with fewer than two valid candidates, the user and
      candidate of the first non-finite valid candidate feature, or the first user whose (finite) cov is not
      symmetric positive semi-definite.
  """
  inputs = _choose_pair_inputs(candidate_features, mean, cov, rule, key, candidate_mask, batched=True)
  keys = None if key is None else jax.random.split(key, inputs[0].shape[0])
  return jax.vmap(functools.partial(_choose_pair_core, rule=rule))(*inputs, keys)
