"""Fitting a user's mixing vector lambda from pairwise preferences (docs/METHOD.md section 5).

Pairwise feedback: a user compares two responses y_a, y_b to a prompt x; with the bases' implicit-reward features
f(x, y) in R^K (f_k = beta * (log pi_k(y|x) - log pi_ref(y|x))) and d = f(x, y_a) - f(x, y_b), the model is

  P(y_a > y_b) = sigmoid(lam . d).

`fit_lambda` returns the exact optimum of the L2-regularized (MAP) logistic regression

  L(lam) = sum_i m_i * [-p_i log sigmoid(z_i) - (1 - p_i) log sigmoid(-z_i)] + l2 / 2 * |lam - mu|^2,  z_i = lam . d_i

(= sum_i m_i * (softplus(z_i) - p_i z_i) + l2 / 2 * |lam - mu|^2, `log_loss`), with soft labels p_i in [0, 1]
(0.5 = tie), row weights / mask m_i and a prior mean mu (0 by default; e.g. the uniform soup 1/K). It runs damped
Newton (IRLS) steps in K dimensions (`newton`) until the step is negligible (`tol`; at most `num_iters`), each a
descent step (up to rounding) whatever the data: separable data (the optimum stays finite because l2 > 0), ties,
all-one-side feedback, no feedback (lam = mu), feature scales from 1e-6 to 1e6. Accuracy in float32 is ~1e-6
relative on ordinary problems (K = 30, N = 64: within 3e-7 of the float64 optimum), and on separable comparisons
whose margins at the optimum lie far into the sigmoid's tails (features 1e2-3e4, l2 = 1e-3-1: within 2e-7; the
derivative and curvature there are computed from sigmoid(-z), `newton.residual` and `newton.curvature`, not as
differences from 1); it degrades (lam stays finite) on separable data whose curvature exceeds l2 by ~1e10 or more
(features ~1e5-1e6 with l2 = 1: lam 2-5% off, the objective's changes there below float32's resolution), where a
RuntimeWarning names the fits that did not converge.

Everything in the online package is a pure function of arrays. Each entry point has two forms:
  * the one-user form (`fit_lambda`, `posterior`, ...) on `[N, K]` data, which is jit- and vmap-compatible:
    `jax.vmap(functools.partial(fit_lambda, l2=1.0))(x [U, N, K], p [U, N])` (keyword arguments given to the
    vmapped function directly are mapped over their leading axis by `jax.vmap`, so pass scalars by `partial` or
    pass `l2` as a `[U]` array);
  * a batched form (`fit_lambda` on `[U, N, K]` data, or `fit_lambda_batched`, `posterior_batched`, ...): one
    compiled call for all U users.
Both forms share their argument checks and run the same one-user core (jitted, or vmapped inside one jit). Users
never interact: a user whose data holds NaN gets NaN (only that user; the others are unaffected).

Constraints (`constraint="simplex"` or `"box"`; negative weights are penalized by the theory, docs/METHOD.md section 2)
use a projected Newton method whose fixed points are exactly the constrained optima. `sgd_update` is the cheap
alternative: one online-gradient step per new comparison, no refit.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online import newton
from spectral_soup.online.checks import Array
from spectral_soup.online.checks import ArrayLike
from spectral_soup.online.checks import check_constraint
from spectral_soup.online.checks import check_finite
from spectral_soup.online.checks import check_finite_rows
from spectral_soup.online.checks import check_l2
from spectral_soup.online.checks import check_l2_shape
from spectral_soup.online.checks import check_labels
from spectral_soup.online.checks import check_num_features
from spectral_soup.online.checks import check_numeric
from spectral_soup.online.checks import check_row_weights
from spectral_soup.online.checks import check_prior_mean
from spectral_soup.online.checks import check_shapes
from spectral_soup.online.checks import check_solver
from spectral_soup.online.checks import dims
from spectral_soup.online.checks import float_dtype
from spectral_soup.online.checks import is_tracer
from spectral_soup.online.newton import DEFAULT_NUM_INNER_ITERS
from spectral_soup.online.newton import DEFAULT_NUM_ITERS
from spectral_soup.online.newton import DEFAULT_TOL


def unit_total_weight(lam: ArrayLike) -> np.ndarray:
  """Nonnegative lambda rescaled to sum 1 per user (rows of [..., K]); a row of zeros becomes the uniform soup.

  Pairwise choices identify lambda's direction and how consistently the user chooses, not the scale of the user's
  reward: serving lam / sum(lam) puts the soup at the bases' reward scale, the scale of a user whose weights over
  the bases' attributes sum to 1 (as Dirichlet users' do). Any row with a positive total keeps its direction,
  however small the total (lambda's scale is 1 / the features' scale); only a total of 0 (or below the smallest
  normal number of lambda's float dtype, float32 for other dtypes) counts as a row of zeros.
  """
  check_numeric("lam", lam)  # Strings would be parsed, complex numbers lose their imaginary part.
  dtype = np.asarray(lam).dtype
  tiny = np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float32).tiny
  lam = np.asarray(lam, np.float64)
  if lam.ndim < 1 or not lam.shape[-1]:
    raise ValueError(f"unit_total_weight needs lambda of shape [..., K] with K >= 1 (one weight per basis), got "
                     f"shape {lam.shape}.")
  if not np.all(np.isfinite(lam)):
    row = np.argwhere(~np.isfinite(lam))[0].tolist()
    raise ValueError(f"unit_total_weight needs finite lambda; lam{row} = {lam[tuple(row)]}.")
  if np.any(lam < 0):
    raise ValueError(f"unit_total_weight needs nonnegative lambda; got a minimum of {lam.min():.3g}.")
  # Summed after scaling by the row's largest weight: a total beyond float64's range (two weights of 1e308) would be
  # inf, and lam / inf a row of zeros.
  largest = lam.max(-1, keepdims=True)
  scaled = lam / np.where(largest > 0, largest, 1.0)
  with np.errstate(over="ignore"):
    total = largest * scaled.sum(-1, keepdims=True)  # May be inf; only compared with tiny.
  uniform = np.full_like(lam, 1.0 / lam.shape[-1])
  return np.where(total >= tiny, scaled / np.maximum(scaled.sum(-1, keepdims=True), tiny), uniform).astype(np.float32)


def log_loss(lam: ArrayLike, delta_features: ArrayLike, prefs: ArrayLike, *, l2: ArrayLike = 0.0,
             mask: Optional[ArrayLike] = None, prior_mean: Optional[ArrayLike] = None) -> Array:
  """The objective `fit_lambda` minimizes (l2 = 0: the plain summed log-loss).

  Args:
    lam: `[K]`.
    delta_features: `[N, K]`.
    prefs: `[N]` in [0, 1].
    l2: penalty strength (>= 0 here).
    mask: `[N]` bool or non-negative row weights (None: all ones).
    prior_mean: `[K]` (None: 0).

  Returns:
    scalar objective value.
  """
  for name, value in (("lam", lam), ("delta_features", delta_features), ("prefs", prefs), ("mask", mask), ("prior_mean",
                                                                                                           prior_mean)):
    check_numeric(name, value)
  check_shapes("delta_features", delta_features, (None, None), "[N, K]")
  num_rows, num = np.shape(delta_features)
  check_shapes("lam", lam, (num,), "[K]")
  check_shapes("prefs", prefs, (num_rows,), "[N]")
  if mask is not None:
    check_shapes("mask", mask, (num_rows,), "[N]")
  if prior_mean is not None:
    check_prior_mean(prior_mean, (), num)
  check_finite("lam", lam)
  if (isinstance(l2, (str, bytes, bool, np.bool_)) or np.ndim(l2) or
      (not is_tracer(l2) and not 0 <= np.asarray(l2, np.float64) < np.inf)):  # NaN fails too.
    raise ValueError(f"l2 must be a finite number >= 0 (0: the plain log-loss), got {l2!r}.")
  check_row_weights("mask", mask)
  check_labels(prefs, mask)
  lam = jnp.asarray(lam)
  dtype = float_dtype(lam, delta_features)
  x = jnp.asarray(delta_features, dtype)
  p = jnp.asarray(prefs, dtype)
  m = jnp.ones(p.shape, dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  x, p, m = newton.sanitize(x, p, m)
  mu = jnp.zeros(lam.shape, dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  z = x @ lam.astype(dtype)
  data = jnp.sum(m * (jax.nn.softplus(z) - p * z), axis=-1)  # The stable form of the soft-label log-loss.
  return data + 0.5 * l2 * jnp.sum(jnp.square(lam - mu))


def _fit_inputs(delta_features, prefs, l2, mask, init, prior_mean, constraint, box, *, batched: bool):
  """Checks the arguments of `fit_lambda` (batched: U users) and materializes the core's inputs.

  The batched form broadcasts l2 and prior_mean over users; the one-user form refuses non-finite counted rows (the
  batched form isolates those users instead, see `fit_lambda`). Both refuse non-finite prior_mean, init and mask
  entries (concrete values) and mismatched shapes, before anything compiles.

  Returns:
    (x, p, m, l2, mu, init, lo, hi) in the computation dtype, as `newton.fit_core` takes them.
  """
  check_l2(l2)
  check_shapes("delta_features", delta_features, (None,) * (3 if batched else 2), dims(batched, "N", "K"))
  check_num_features("delta_features", delta_features)
  *users, num_rows, num = np.shape(delta_features)
  check_constraint(constraint, box, num)
  rows = (*users, num_rows)
  if np.shape(prefs)[-1:] == (num,) and num != num_rows:  # The likely slip: features given as [K, N].
    raise ValueError(f"prefs has {num} entries per user but delta_features {tuple(np.shape(delta_features))} has "
                     f"{num_rows} rows: is delta_features transposed? Expected {dims(batched, 'N', 'K')}, one row "
                     "per comparison and one column per basis.")
  check_shapes("prefs", prefs, rows, dims(batched, "N"))
  check_l2_shape(l2, users)
  dtype = float_dtype(delta_features)
  if mask is not None:
    check_shapes("mask", mask, rows, dims(batched, "N"))
  check_row_weights("mask", mask)
  m = jnp.ones(rows, dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  if prior_mean is not None:
    check_prior_mean(prior_mean, users, num)
  mu = jnp.zeros((num,), dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  if batched:
    mu = jnp.broadcast_to(mu, (*users, num))
  if init is not None:
    check_shapes("init", init, (*users, num), dims(batched, "K"))
  check_finite("init", init)
  lam0 = mu if init is None else jnp.asarray(init, dtype)
  l2 = jnp.broadcast_to(jnp.asarray(l2, dtype), tuple(users)) if batched else jnp.asarray(l2, dtype)
  check_labels(prefs, mask)
  if not batched:
    check_finite_rows(delta_features, prefs, mask)
  lo, hi = newton.box_arrays(constraint, box, num, dtype)
  return jnp.asarray(delta_features, dtype), jnp.asarray(prefs, dtype), m, l2, mu, lam0, lo, hi


def fit_lambda(delta_features: ArrayLike, prefs: ArrayLike, *, l2: ArrayLike, mask: Optional[ArrayLike] = None,
               init: Optional[ArrayLike] = None, prior_mean: Optional[ArrayLike] = None,
               constraint: Optional[str] = None, box: Optional[Tuple[ArrayLike, ArrayLike]] = None,
               num_iters: int = DEFAULT_NUM_ITERS, num_inner_iters: int = DEFAULT_NUM_INNER_ITERS,
               tol: float = DEFAULT_TOL) -> Array:
  """The L2-regularized logistic-regression fit of lambda (see the module docstring), for one user or U users.

  The rank of `delta_features` picks the form: `[N, K]` is one user; `[U, N, K]` is U independent users in one
  compiled call (vmap inside jit; `fit_lambda_batched` insists on this form). Shapes below are one user's, with a
  leading `[U]` axis for U users unless said otherwise.

  Args:
    delta_features: `[N, K]` f(x, y_a) - f(x, y_b).
    prefs: `[N]` labels in [0, 1]: 1 means y_a preferred, 0 means y_b, fractions are soft labels (0.5 = tie).
    l2: the penalty strength, > 0 (checked when concrete); the objective is
      sum of log-losses + l2 / 2 * |lam - prior_mean|^2. One user: a scalar; U users: a scalar or `[U]`.
    mask: `[N]` bool (False = padding, contributes nothing even if it holds NaN), or non-negative finite row
      weights. None: every row counts.
    init: `[K]` finite warm start (e.g. the previous lambda); projected onto the constraint set. None: the
      (projected) prior mean. The optimum does not depend on it; only the number of steps needed does: a start far
      beyond the data's scale (logits X init in the thousands, e.g. features ~50 and |init| ~ 100) can need more
      than the default `num_iters` (the fit then stops short of the optimum; a concrete result comes with a
      RuntimeWarning naming the users that did not pass the convergence test): start such a user cold (init=None)
      or raise `num_iters`.
    prior_mean: `[K]` finite, the penalty's center (None: 0; `jnp.full(K, 1 / K)` is the uniform soup). U users:
      `[K]` (shared; a 1-D prior is always `[K]`, also when U == K) or `[U, K]`.
    constraint: None, "simplex" (lam >= 0, sum lam = 1) or "box" (lo <= lam <= hi).
    box: `(lo, hi)` scalars or `[K]` arrays, with constraint="box" (shared by all users): lo <= hi, no NaN,
      lo < inf and hi > -inf (an infinite bound leaves that side open).
    num_iters: Newton steps (static). 25 reach float32 precision from a cold start on the tested problems
      (separable data with l2 = 1e-3 included); warm starts near the optimum need fewer (see `init`).
    num_inner_iters: projected-gradient steps per Newton step for a constrained fit (static).
    tol: >= 0. > 0 (default 1e-5): stop once a full Newton step is below tol * max(1, |lam|_inf) and moves no
      logit by more than tol * max(1, |logits|_inf) (a `while_loop`; under
      vmap it runs until the slowest user converges; Newton converges quadratically, so the error left is ~ the step
      squared: 5-7 steps from a cold start on ordinary problems, at most `num_iters`). Differentiable in forward
      and reverse mode (`jax.jvp`, `jax.grad`, higher orders) by the implicit function theorem: the derivative of
      the exact optimum in delta_features, prefs, mask weights, l2 and prior_mean (one K x K solve per user; 0 in
      init); for a constrained fit, on the optimum's face (bounds it touches stay active). 0: exactly `num_iters`
      steps (a `fori_loop`), differentiated through the steps instead.

  Returns:
    `[K]` the optimum lam, in float32 (float64 for float64 inputs with x64 enabled). U users: `[U, K]`, row u
    equal to the one-user fit on user u's data. One user with a non-finite counted row raises; among U users, such
    a user gets a NaN row, with a warning naming it, and does not affect the others. Finite labels outside [0, 1]
    raise in both forms, as do non-finite prior_mean, init, mask or box entries (naming the argument and index).
  """
  check_solver(num_iters, num_inner_iters, tol)
  for name, value in (("delta_features", delta_features), ("prefs", prefs), ("mask", mask), ("init", init),
                      ("prior_mean", prior_mean)):
    check_numeric(name, value)
  if np.ndim(delta_features) not in (2, 3):
    raise ValueError(f"delta_features must have shape [N, K] (one user) or [U, N, K] (U users), got "
                     f"{tuple(np.shape(delta_features))}.")
  batched = np.ndim(delta_features) == 3
  inputs = _fit_inputs(delta_features, prefs, l2, mask, init, prior_mean, constraint, box, batched=batched)
  solve = newton.fit_batched if batched else newton.fit_single
  lam, converged = solve(*inputs, constraint=constraint, num_iters=num_iters, num_inner_iters=num_inner_iters,
                         tol=float(tol))
  if is_tracer(lam):  # Traced (jit, grad, vmap) through any argument: nothing to name on the host.
    return lam
  finite = np.all(np.isfinite(np.asarray(lam)), axis=-1)
  short = np.flatnonzero(finite & ~np.asarray(converged)).tolist() if tol else []
  if short:
    who = "the fit" if not batched else (f"{len(short)} of {len(finite)} users "
                                         f"({short[:10]}{' ...' if len(short) > 10 else ''})")
    warnings.warn(
        f"fit_lambda: {who} did not converge within num_iters={num_iters} Newton steps (the last step was above "
        f"tol, and its model still predicted a decrease above {newton.SETTLED_RTOL:g} of the objective): lam may "
        f"stop short of the optimum. A warm start far beyond the data's scale needs more steps (raise num_iters, "
        f"or start from init=None); separable comparisons with large features and a small l2 leave an objective "
        f"too flat for the float32 fit (rescale the features or raise l2).", RuntimeWarning, stacklevel=2)
  if not batched:
    return lam
  # A user with a non-finite counted row gets a NaN lam (the fit isolates it): name those users from the [U, K]
  # result instead of scanning the [U, N, K] features on the host.
  users = np.flatnonzero(~finite).tolist()
  if users:
    warnings.warn(
        f"fit_lambda: users {users[:10]}{' ...' if len(users) > 10 else ''} have non-finite "
        "delta_features or prefs on rows the mask counts; their lam is NaN, the other users' fits are "
        "unaffected (mask the rows out to fit those users on the rest).", RuntimeWarning, stacklevel=2)
  return lam


def fit_lambda_batched(delta_features: ArrayLike, prefs: ArrayLike, **options) -> Array:
  """`fit_lambda` for U users in one compiled call: `delta_features` must be `[U, N, K]`.

  Args:
    delta_features: `[U, N, K]`.
    prefs: `[U, N]`.
    **options: `fit_lambda`'s keyword arguments (`l2` scalar or `[U]`, `mask` `[U, N]`, `init` `[U, K]`,
      `prior_mean` `[K]` or `[U, K]`; the solver's options shared by all users).

  Returns:
    `[U, K]`, as `fit_lambda` for U users.
  """
  check_shapes("delta_features", delta_features, (None, None, None), "[U, N, K]")
  return fit_lambda(delta_features, prefs, **options)


def sgd_update(lam: ArrayLike, delta_features_t: ArrayLike, prefs_t: ArrayLike, lr: ArrayLike, l2: ArrayLike,
               prior_mean: Optional[ArrayLike] = None) -> Array:
  """One online-gradient step on a single new comparison (cheap; no refit).

  lam <- lam - lr * ((sigmoid(lam . d) - p) d + l2 (lam - mu)): a stochastic-gradient step on the per-comparison
  objective log-loss + l2 / 2 |lam - mu|^2 (for N comparisons in total, l2 here corresponds to `fit_lambda`'s
  l2 / N). For U users, `jax.vmap` it over `[U, K]` / `[U]` inputs (inside vmap or jit the values are not
  checked).

  Args:
    lam: `[K]` current weights.
    delta_features_t: `[K]` the new comparison's feature difference.
    prefs_t: scalar label in [0, 1].
    lr: step size (a finite number > 0).
    l2: penalty strength (a finite number >= 0).
    prior_mean: `[K]` (None: 0).

  Returns:
    `[K]` updated lam.
  """
  check_shapes("lam", lam, (None,), "[K]")
  num = np.shape(lam)[0]
  check_shapes("delta_features_t", delta_features_t, (num,), "[K]")
  if np.ndim(prefs_t):
    raise ValueError(f"prefs_t must be one label (a scalar), got shape {np.shape(prefs_t)}.")
  if prior_mean is not None:
    check_shapes("prior_mean", prior_mean, (num,), "[K]")
  for name, value in (("lam", lam), ("delta_features_t", delta_features_t), ("prefs_t", prefs_t), ("lr", lr),
                      ("l2", l2), ("prior_mean", prior_mean)):
    check_numeric(name, value)
    check_finite(name, value)
  for name, value in (("lr", lr), ("l2", l2)):
    if np.ndim(value):
      raise ValueError(f"{name} must be one number (a scalar), got shape {np.shape(value)}.")
    if isinstance(value, (bool, np.bool_)):  # As fit_lambda's l2: a flag passed by mistake, not a number.
      raise ValueError(f"{name} must be a number, got {value!r}.")
  for name, value, low, ok in (("prefs_t", prefs_t, "a label in [0, 1]", lambda v: 0 <= v <= 1),
                               ("lr", lr, "a number > 0", lambda v: v > 0), ("l2", l2, "a number >= 0",
                                                                             lambda v: v >= 0)):
    if not is_tracer(value) and not ok(float(np.asarray(value))):
      raise ValueError(f"{name}={float(np.asarray(value))!r}: expected {low}.")
  return _sgd_update(lam, delta_features_t, prefs_t, lr, l2, prior_mean)


@jax.jit
def _sgd_update(lam, delta_features_t, prefs_t, lr, l2, prior_mean):
  lam = jnp.asarray(lam)
  dtype = float_dtype(lam)
  lam = lam.astype(dtype)
  d = jnp.asarray(delta_features_t, dtype)
  mu = jnp.zeros_like(lam) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  grad = newton.residual(jnp.dot(lam, d), prefs_t) * d + l2 * (lam - mu)
  return lam - lr * grad
