"""Fitting a user's mixing vector lambda from ratings: ridge regression of the ratings on the responses' features.

The alternative to pairwise feedback (`fit`) when users rate single responses: closed form, one least-squares
solve (QR), optionally with an unpenalized intercept (implicit-reward features are known only up to a per-prompt
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
  # Least squares on the stacked system [sqrt(m) X; sqrt(l2) I] lam = [sqrt(m) r; sqrt(l2) mu] by QR, not the normal
  # equations (X^T M X + l2 I) lam = X^T M r + l2 mu: those square the condition number, and features with a large
  # common offset (implicit rewards without fit_intercept) lost 6% of lam in float32 at cond 5e5.
  w, root = jnp.sqrt(m), jnp.sqrt(l2)
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  q, upper = jnp.linalg.qr(jnp.concatenate([w[:, None] * x, root * eye]))
  rhs = q.T @ jnp.concatenate([w * r, root * mu])
  return jax.scipy.linalg.solve_triangular(upper, rhs, lower=False)


def fit_lambda_ratings(features: ArrayLike, ratings: ArrayLike, *, l2: ArrayLike, mask: Optional[ArrayLike] = None,
                       prior_mean: Optional[ArrayLike] = None, fit_intercept: bool = False) -> Array:
  """Ridge regression of ratings on features: argmin sum_i m_i (r_i - lam . f_i)^2 + l2 |lam - mu|^2.

  Closed form (X^T M X + l2 I)^-1 (X^T M r + l2 mu), computed as the least-squares solution of the stacked system
  [M^1/2 X; l2^1/2 I] lam = [M^1/2 r; l2^1/2 mu] by one QR (the normal equations square the condition number).
  jit/vmap-compatible. Checked
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
  if not (is_tracer(fit_intercept) or isinstance(fit_intercept, (bool, np.bool_)) or
          (np.ndim(fit_intercept) == 0 and getattr(fit_intercept, "dtype", None) == bool)):
    raise ValueError(f"fit_intercept={fit_intercept!r}: expected True or False.")  # "False" would fit one.
  for name, value in (("features", features), ("ratings", ratings), ("mask", mask), ("prior_mean", prior_mean)):
    check_numeric(name, value)
  check_shapes("features", features, (None, None), "[N, K]")
  check_num_features("features", features)
  num_rows, num = np.shape(features)
  check_shapes("ratings", ratings, (num_rows,), "[N]")
  check_l2_shape(l2, ())
  dtype = float_dtype(features, ratings)  # float64 ratings (x64) are fitted in float64, not cast to inf.
  m = jnp.ones((num_rows,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  check_shapes("mask", m, (num_rows,), "[N]")
  check_row_weights("mask", mask)
  if prior_mean is not None:
    check_prior_mean(prior_mean, (), num)
  check_finite_rows(features, ratings, mask, x_name="features", p_name="ratings")
  mu = jnp.zeros((num,), dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  return _fit_ratings_core(jnp.asarray(features, dtype), jnp.asarray(ratings, dtype), m, jnp.asarray(l2, dtype), mu,
                           jnp.asarray(fit_intercept, bool))
