"""The Bayes estimate of a user's soup direction: the posterior mean of lambda / sum(lambda) on the simplex.

For nonnegative lambda served at unit total weight (`fit.unit_total_weight`), only lambda's direction
d = lambda / sum(lambda) reaches the user; pairwise choices also carry a scale s > 0 (how consistently the user
chooses, in units of the features), which serving discards. Model of one user's comparisons:

  P(y_a preferred to y_b) = sigmoid(s * d . (f(y_a) - f(y_b))),   d ~ Dirichlet(concentration * 1),
  log s ~ uniform on [log scale_min, log scale_max].

The penalized fit's maximum (`fit.fit_lambda`, box-constrained) sits on a face of the orthant when the choices
are few and the features noisy: exact zeros on bases the user may well care about, and a soup concentrated on one
or two bases, which spends more KL per unit of reward than the user's own mix. The posterior mean averages over every
direction the choices leave plausible (it minimizes the expected squared error of d), so it never drops a basis the
data do not rule out.

Computed by Monte Carlo: M directions drawn once from the prior (shared by all users: common random numbers), each
weighted by its likelihood integrated over a log-spaced grid of scales. Exact up to the sampling error of M draws
(about 1 / sqrt(effective draws) per coordinate); cost O(U N M G): at the defaults and N = 64 comparisons, 0.34 s for
16 users and 2.5 s for 128 on an idle 2-core AMD EPYC (medians of 3), linear in the users.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online import checks
from spectral_soup.soup import validation

Array = jax.Array
_MAX_FLOAT32 = float(np.finfo(np.float32).max)
DEFAULT_NUM_SAMPLES = 4096
DEFAULT_SCALES = (0.1, 30.0)
DEFAULT_NUM_SCALES = 25


def prior_directions(key: Array, num_bases: int, num_samples: int = DEFAULT_NUM_SAMPLES,
                     concentration: float = 1.0) -> Array:
  """`num_samples` directions from Dirichlet(concentration * 1) over `num_bases` bases: f32[M, K]."""
  checks.check_key(key)
  checks.check_int("num_bases", num_bases, 1)
  checks.check_int("num_samples", num_samples, 1)
  if not (validation.is_real(concentration) and 0 < concentration <= _MAX_FLOAT32):  # NaN, inf: NaN draws.
    raise ValueError(f"concentration={concentration!r}: expected a finite number > 0.")
  return jax.random.dirichlet(key, jnp.full((num_bases,), concentration, jnp.float32), (num_samples,))


@functools.partial(jax.jit, static_argnames=("num_scales",))
def _posterior_mean(x: Array, p: Array, m: Array, directions: Array, lo: float, hi: float, num_scales: int) -> Array:
  scales = jnp.exp(jnp.linspace(jnp.log(lo), jnp.log(hi), num_scales))  # [G]

  def one_user(args):
    xu, pu, mu = args  # [N, K], [N], [N]
    margin = xu @ directions.T  # [N, M]
    z = scales[:, None, None] * margin[None]  # [G, N, M]
    # log P(choice) = p log sigmoid(z) + (1 - p) log sigmoid(-z) = log sigmoid(z) - (1 - p) z (ties: p = 0.5).
    ll = jnp.einsum("gnm,n->gm", jax.nn.log_sigmoid(z) - (1.0 - pu[:, None]) * z, mu)
    log_w = jax.nn.logsumexp(ll, axis=0)  # [M]: the scale integrated out (uniform in log s on the grid).
    return jax.nn.softmax(log_w) @ directions

  return jax.lax.map(one_user, (x, p, m))  # One user at a time: O(N M G) memory, not O(U N M G).


def _check_directions(directions, num_bases: int) -> None:
  """ValueError unless `directions` is `[M, K]` points of the simplex (finite, >= 0, rows summing to 1)."""
  shape = tuple(np.shape(directions))
  if len(shape) != 2 or shape[1] != num_bases or not shape[0]:
    raise ValueError(f"directions has shape {shape}; expected [M, {num_bases}] (one draw per row, M >= 1).")
  values = np.asarray(directions, np.float64)
  bad = ~np.isfinite(values) | (values < 0)
  sums = values.sum(axis=1)
  off = np.abs(sums - 1.0) > 1e-4
  if np.any(bad) or np.any(off):
    row = int(np.flatnonzero(np.any(bad, axis=1) | off)[0])
    raise ValueError(f"directions[{row}] = {values[row].tolist()}"[:160] + ": expected points of the simplex, "
                     "finite weights >= 0 summing to 1 (e.g. from prior_directions).")


def posterior_mean_direction(delta_features, prefs, *, key: Optional[Array] = None, mask=None, directions=None,
                             num_samples: int = DEFAULT_NUM_SAMPLES, concentration: float = 1.0, scales=DEFAULT_SCALES,
                             num_scales: int = DEFAULT_NUM_SCALES) -> np.ndarray:
  """The posterior mean of each user's direction on the simplex (module docstring): float32[U, K], rows sum to 1.

  Args:
    delta_features: [U, N, K] f(y_a) - f(y_b) of every comparison (the bases' implicit rewards).
    prefs: [U, N] labels in [0, 1] (1: y_a preferred; 0.5: a tie).
    key: draws the prior directions (needed unless `directions` is given).
    mask: [U, N] bool, the comparisons that count, or non-negative row weights (each comparison's log-likelihood
      times its weight); None: all. A user with none gets the mean of the prior draws (1 / K each up to Monte Carlo
      error: [0.337, 0.344, 0.319] at K = 3 and the default draws).
    directions: [M, K] prior draws to use instead of drawing (common random numbers across calls): points of the
      simplex (checked).
    num_samples, concentration: M and the Dirichlet prior's concentration (1: uniform on the simplex).
    scales: (scale_min, scale_max) > 0, the range of the log-uniform prior on s; num_scales: its grid size.
  """
  for name, value in (("delta_features", delta_features), ("prefs", prefs), ("mask", mask), ("directions", directions)):
    checks.check_numeric(name, value)
  x = np.asarray(delta_features)
  checks.check_shapes("delta_features", x, (None, None, None), "[U, N, K]")
  num_users, num_rows, num_bases = x.shape
  checks.check_shapes("prefs", prefs, (num_users, num_rows), "[U, N]")
  checks.check_row_weights("mask", mask)  # A -1 or NaN would count as True.
  m = np.ones((num_users, num_rows)) if mask is None else np.asarray(mask, np.float64)  # Row weights.
  checks.check_shapes("mask", m, (num_users, num_rows), "[U, N]")
  checks.check_labels(prefs, m)
  checks.check_int("num_scales", num_scales, 1)
  if (np.shape(scales) != (2,) or not all(validation.is_real(s) for s in scales) or
      not 0 < scales[0] <= scales[1] <= _MAX_FLOAT32):
    raise ValueError(f"scales={scales!r}: expected (scale_min, scale_max) with 0 < scale_min <= scale_max, finite "
                     "numbers that float32 holds.")
  lo, hi = (float(s) for s in scales)
  counts = m > 0
  x = np.where(counts[..., None], x, 0.0)  # Rows the mask drops count for nothing, NaN or not.
  p = np.where(counts, np.asarray(prefs, np.float64), 0.0)
  finite = np.all(np.isfinite(x), axis=(1, 2)) & np.all(np.isfinite(p), axis=1)
  bad = np.flatnonzero(~finite)
  if bad.size:
    raise ValueError(f"users {bad[:10].tolist()} have non-finite delta_features or prefs on comparisons the mask "
                     "counts (mask them out).")
  # Each user's log-likelihood sums m_n * |scale * margin_n| <= scales[1] * sum_n m_n max_k |x_nk| in float32: beyond
  # its range the user's direction was NaN (features ~1e37 and more), with only numpy's overflow warning.
  with np.errstate(over="ignore"):
    reach = max(hi, 1.0) * np.sum(m * np.max(np.abs(x), axis=-1, initial=0.0), axis=-1)
  big = np.flatnonzero(reach > _MAX_FLOAT32 / 4)
  if big.size:
    raise ValueError(f"users {big[:10].tolist()} have delta_features up to {np.max(np.abs(x[big[0]])):.3g}: their "
                     f"log-likelihood at scales[1]={hi:g} leaves float32's range (about 3.4e38); rescale the features "
                     "(or lower scales).")
  if directions is None:
    if key is None:
      raise ValueError("posterior_mean_direction needs a key (or the prior draws, `directions`).")
    directions = prior_directions(key, num_bases, num_samples, concentration)
  else:
    _check_directions(directions, num_bases)
  directions = jnp.asarray(directions, jnp.float32)
  out = _posterior_mean(jnp.asarray(x, jnp.float32), jnp.asarray(p, jnp.float32), jnp.asarray(m, jnp.float32),
                        directions, lo, hi, num_scales)
  return np.asarray(out, np.float32)
