"""Fitting a user's mixing vector lambda from ratings: ridge regression of the ratings on the responses' features.

The alternative to pairwise feedback (`fit`) when users rate single responses: closed form, one K x K Cholesky
solve, optionally with an unpenalized intercept (implicit-reward features are known only up to a per-prompt
constant, and rating scales have arbitrary offsets).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online import newton
from spectral_soup.online.checks import Array
from spectral_soup.online.checks import ArrayLike
from spectral_soup.online.checks import check_finite_rows
from spectral_soup.online.checks import check_l2
from spectral_soup.online.checks import check_l2_shape
from spectral_soup.online.checks import check_num_features
from spectral_soup.online.checks import check_numeric
from spectral_soup.online.checks import check_row_weights
from spectral_soup.online.checks import check_prior_mean
from spectral_soup.online.checks import check_shapes
from spectral_soup.online.checks import float_dtype
from spectral_soup.online.checks import is_tracer


@jax.jit
def _fit_ratings_core(x, r, m, l2, mu, fit_intercept):
  x, r, m = newton.sanitize(x, r, m)
  # An unpenalized intercept = centering features and ratings by their weighted means (masked rows have weight 0).
  total = jnp.maximum(jnp.sum(m), jnp.finfo(x.dtype).tiny)
  x = jnp.where(fit_intercept, x - jnp.sum(m[:, None] * x, axis=0) / total, x)
  r = jnp.where(fit_intercept, r - jnp.sum(m * r) / total, r)
  a = jnp.einsum("nk,n,nj->kj", x, m, x) + l2 * jnp.eye(x.shape[-1], dtype=x.dtype)
  b = x.T @ (m * r) + l2 * mu
  return newton.spd_solve(a, b)


def fit_lambda_ratings(features: ArrayLike, ratings: ArrayLike, *, l2: ArrayLike, mask: Optional[ArrayLike] = None,
                       prior_mean: Optional[ArrayLike] = None, fit_intercept: bool = False) -> Array:
  """Ridge regression of ratings on features: argmin sum_i m_i (r_i - lam . f_i)^2 + l2 |lam - mu|^2.

  Closed form (X^T M X + l2 I)^-1 (X^T M r + l2 mu), one K x K Cholesky solve. jit/vmap-compatible. Checked
  as `fit_lambda`'s one-user form (concrete values): a non-finite row the mask counts, a non-finite mask weight or
  prior_mean entry, or a mismatched shape raises ValueError naming it.

  Args:
    features: `[N, K]` f(x, y) of the rated responses.
    ratings: `[N]` the user's ratings.
    l2: penalty strength, a scalar > 0.
    mask: `[N]` bool or non-negative finite row weights (None: all rows; masked rows may hold NaN).
    prior_mean: `[K]` the penalty's center (None: 0).
    fit_intercept: also fit an unpenalized offset (features f_k are implicit rewards known only up to a
      per-prompt constant, and rating scales have arbitrary offsets); only lam is returned. A bool (may be traced).

  Returns:
    `[K]` lam.
  """
  check_l2(l2)
  if not (is_tracer(fit_intercept) or isinstance(fit_intercept, (bool, np.bool_))):
    raise ValueError(f"fit_intercept={fit_intercept!r}: expected True or False.")  # "False" would fit one.
  for name, value in (("features", features), ("ratings", ratings), ("mask", mask), ("prior_mean", prior_mean)):
    check_numeric(name, value)
  check_shapes("features", features, (None, None), "[N, K]")
  check_num_features("features", features)
  num_rows, num = np.shape(features)
  check_shapes("ratings", ratings, (num_rows,), "[N]")
  check_l2_shape(l2, ())
  dtype = float_dtype(features)
  m = jnp.ones((num_rows,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  check_shapes("mask", m, (num_rows,), "[N]")
  check_row_weights("mask", mask)
  if prior_mean is not None:
    check_prior_mean(prior_mean, (), num)
  check_finite_rows(features, ratings, mask, x_name="features", p_name="ratings")
  mu = jnp.zeros((num,), dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  return _fit_ratings_core(jnp.asarray(features, dtype), jnp.asarray(ratings, dtype), m, jnp.asarray(l2, dtype), mu,
                           jnp.asarray(fit_intercept, bool))
