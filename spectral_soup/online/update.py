"""Online update rules for a user's mixing vector lambda (docs/METHOD.md section 5).

Pairwise feedback: a user compares two responses y_a, y_b to a prompt x; with the bases' implicit-reward features
f(x, y) in R^K (f_k = beta * (log pi_k(y|x) - log pi_ref(y|x))) and d = f(x, y_a) - f(x, y_b), the model is

  P(y_a > y_b) = sigmoid(lam . d).

`fit_lambda` returns the exact optimum of the L2-regularized (MAP) logistic regression

  L(lam) = sum_i m_i * [-p_i log sigmoid(z_i) - (1 - p_i) log sigmoid(-z_i)] + l2 / 2 * |lam - mu|^2,  z_i = lam . d_i

(= sum_i m_i * (softplus(z_i) - p_i z_i) + l2 / 2 * |lam - mu|^2), with soft labels p_i in [0, 1] (0.5 = tie),
row weights / mask m_i and a prior mean mu (0 by default; e.g. the uniform soup 1/K). It runs a fixed number of
damped Newton (IRLS) steps in K dimensions: the Hessian sum_i m_i s_i (1 - s_i) d_i d_i^T + l2 I is K x K and
positive definite (>= l2 I), so each step is one Cholesky solve, and a parallel backtracking line search (the
slope of the objective along the step at every step size in {1, 2^-1/2, ..., 2^-10, 0} at once, keep the largest
step before the minimum along the line) makes every step a descent step, whatever the data: separable data (the
optimum stays finite because l2 > 0), ties, all-one-side feedback, no feedback (lam = mu), feature scales from
1e-6 to 1e6. Accuracy in float32 is ~1e-6 relative on ordinary problems; it degrades (lam stays finite) when the
data curvature exceeds l2 by ~1e6 or more on nearly separable data (e.g. features ~1e3 with l2 = 1: ~1e-3).

Everything here is a pure function of arrays. Each entry point has two forms:
  * the one-user form (`fit_lambda`, `posterior`, ...) on `[N, K]` data, which is jit- and vmap-compatible:
    `jax.vmap(functools.partial(fit_lambda, l2=1.0))(x [U, N, K], p [U, N])` (keyword arguments given to the
    vmapped function directly are mapped over their leading axis by `jax.vmap`, so pass scalars by `partial` or
    pass `l2` as a `[U]` array);
  * a batched form (`fit_lambda_batched`, ...) on `[U, N, K]` data: one compiled call for all U users.
Users never interact: a user whose data holds NaN gets NaN (only that user; the others are unaffected).

Constraints (`constraint="simplex"` or `"box"`; negative weights are penalized by the theory, docs/METHOD.md section 2)
use a projected Newton method: each step minimizes the local quadratic model over the feasible set (accelerated
projected gradient with restarts, `num_inner_iters` steps, step 1 / (an upper bound of the largest Hessian
eigenvalue)) and line-searches along the feasible segment, so its fixed points are exactly the constrained optima.

The Laplace posterior N(lam_hat, H(lam_hat)^-1) gives Thompson sampling and the choice of which pair of candidate
responses to show (`choose_pair`). `UserState` keeps a ring buffer of each user's last N comparisons and
`update_users` appends one comparison per user and refits all users in one compiled call.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional, Sequence, Tuple, Union

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float, Sequence[float]]

CONSTRAINTS = (None, "simplex", "box")
PAIR_RULES = ("max_variance", "max_info", "thompson")
DEFAULT_NUM_ITERS = 25
DEFAULT_NUM_INNER_ITERS = 50
# Line-search step sizes, largest first, ratio 1/sqrt(2); the final 0 keeps the current point.
_STEP_SIZES = tuple(2.0**(-i / 2) for i in range(21)) + (0.0,)
# Relative jitter of the Hessian before its Cholesky factorization (times K * max diagonal entry): only matters
# when the data term is ~1 / eps times larger than l2 (feature scales ~1e6), where float32 rounding makes
# X^T W X + l2 I numerically indefinite.
_JITTER_ULPS = 4.0
# Relative jitter added to a posterior covariance (times its largest variance): keeps it numerically positive
# definite in float32.
_COV_JITTER = 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Validation helpers (host side; shape checks always, value checks only for concrete inputs).
# ----------------------------------------------------------------------------------------------------------------------


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_l2(l2: Any) -> None:
  """Raises ValueError unless every l2 is > 0 (concrete values only; tracers pass)."""
  if l2 is None:
    raise ValueError("l2 is required (the L2 penalty strength, > 0).")
  if _is_tracer(l2):
    return
  values = np.asarray(l2, np.float64)
  if values.size and not np.all(values > 0):  # Also rejects NaN.
    raise ValueError(f"l2 must be > 0 (it keeps the optimum finite on separable data), got {l2}.")


def _check_constraint(constraint: Optional[str], box: Optional[Tuple[ArrayLike, ArrayLike]]) -> None:
  if constraint not in CONSTRAINTS:
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}.")
  if constraint == "box":
    if box is None or len(box) != 2:
      raise ValueError(f"constraint='box' needs box=(lo, hi) (scalars or [K] arrays), got {box!r}.")
    lo, hi = box
    if not (_is_tracer(lo) or _is_tracer(hi)) and not np.all(np.asarray(lo) <= np.asarray(hi)):
      raise ValueError(f"box=(lo, hi) needs lo <= hi, got lo={lo}, hi={hi}.")
  elif box is not None:
    raise ValueError(f"box is only used with constraint='box', got constraint={constraint!r}.")


def _check_shapes(name: str, x: Any, expected: Tuple[Optional[int], ...], what: str) -> None:
  shape = np.shape(x)
  if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
    pretty = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
    raise ValueError(f"{name} must have shape {what} = {pretty}, got {tuple(shape)}.")


def _check_labels(prefs: Any, mask: Any) -> None:
  """Concrete values only: a finite label outside [0, 1] on a row that counts (mask > 0) raises ValueError.

  -1 / +1 labels are a caller's convention error, not a bad data point, so they are refused, naming the first.
  NaN labels are non-finite rows, refused (`fit_lambda`) or isolated (`fit_lambda_batched`) like NaN features.
  """
  if _is_tracer(prefs) or _is_tracer(mask):
    return
  p = np.asarray(prefs)
  counts = np.ones(p.shape, bool) if mask is None else np.asarray(mask) > 0
  bad = np.argwhere(counts & np.isfinite(p) & ((p < 0) | (p > 1)))
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    raise ValueError(f"prefs{list(index)} = {float(p[index])}: expected a label in [0, 1] (1: the first response "
                     f"preferred, 0: the second, 0.5: a tie) on every row the mask counts; {len(bad)} such "
                     f"row{'s' if len(bad) > 1 else ''} in total.")


def _float_dtype(*xs: Any) -> Any:
  """The computation dtype: float32, or float64 when an input is float64 and x64 is enabled."""
  dtype = jnp.result_type(*[jnp.asarray(x).dtype for x in xs if x is not None])
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Projections.
# ----------------------------------------------------------------------------------------------------------------------


def unit_total_weight(lam: ArrayLike) -> np.ndarray:
  """Nonnegative lambda rescaled to sum 1 per user (rows of [..., K]); a row of zeros becomes the uniform soup.

  Pairwise choices identify lambda's direction and how consistently the user chooses, not the scale of the user's
  reward: serving lam / sum(lam) puts the soup at the bases' reward scale, the scale of a user whose weights over
  the bases' attributes sum to 1 (as Dirichlet users' do).
  """
  lam = np.asarray(lam, np.float64)
  if np.any(lam < 0):
    raise ValueError(f"unit_total_weight needs nonnegative lambda; got a minimum of {lam.min():.3g}.")
  total = lam.sum(-1, keepdims=True)
  uniform = np.full_like(lam, 1.0 / lam.shape[-1])
  return np.where(total > 1e-6, lam / np.maximum(total, 1e-6), uniform).astype(np.float32)


@jax.jit
def project_simplex(lam: ArrayLike, radius: float = 1.0) -> Array:
  """Euclidean projection onto the simplex {x >= 0, sum x = radius} along the last axis (sort-based, exact).

  Args:
    lam: `[..., K]` points.
    radius: the simplex's total mass (> 0).

  Returns:
    `[..., K]` the nearest points of the simplex (Duchi et al., 2008).
  """
  lam = jnp.asarray(lam)
  lam = lam.astype(_float_dtype(lam))
  num = lam.shape[-1]
  u = -jnp.sort(-lam, axis=-1)  # Descending.
  css = jnp.cumsum(u, axis=-1) - radius
  ind = jnp.arange(1, num + 1, dtype=lam.dtype)
  rho = jnp.sum(u - css / ind > 0, axis=-1, keepdims=True)  # >= 1: the largest entry always qualifies.
  rho = jnp.maximum(rho, 1)
  theta = jnp.take_along_axis(css, rho - 1, axis=-1) / rho.astype(lam.dtype)
  return jnp.maximum(lam - theta, 0.0)


@jax.jit
def project_box(lam: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> Array:
  """Projection onto the box lo <= lam <= hi (elementwise clip). lo, hi: scalars or broadcastable to `lam`."""
  return jnp.clip(jnp.asarray(lam), lo, hi)


def _project(lam: Array, constraint: Optional[str], lo: Array, hi: Array) -> Array:
  if constraint == "simplex":
    return project_simplex(lam)
  if constraint == "box":
    return project_box(lam, lo, hi)
  return lam


# ----------------------------------------------------------------------------------------------------------------------
# Logistic regression (one user).
# ----------------------------------------------------------------------------------------------------------------------


def _sanitize(x: Array, p: Array, m: Array) -> Tuple[Array, Array, Array]:
  """Zeroes masked-out rows, so that padding (even NaN padding) contributes exactly nothing."""
  keep = m > 0
  x = jnp.where(keep[:, None], x, 0.0)
  p = jnp.where(keep, p, 0.0)
  m = jnp.where(keep, m, 0.0)
  return x, p, m


def _data_loss(z: Array, p: Array, m: Array) -> Array:
  """sum_i m_i (softplus(z_i) - p_i z_i) over the last axis (the stable form of the soft-label log-loss)."""
  return jnp.sum(m * (jax.nn.softplus(z) - p * z), axis=-1)


def log_loss(lam: ArrayLike,
             delta_features: ArrayLike,
             prefs: ArrayLike,
             *,
             l2: ArrayLike = 0.0,
             mask: Optional[ArrayLike] = None,
             prior_mean: Optional[ArrayLike] = None) -> Array:
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
  lam = jnp.asarray(lam)
  dtype = _float_dtype(lam, delta_features)
  x = jnp.asarray(delta_features, dtype)
  p = jnp.asarray(prefs, dtype)
  m = jnp.ones(p.shape, dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  x, p, m = _sanitize(x, p, m)
  mu = jnp.zeros(lam.shape, dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  return _data_loss(x @ lam.astype(dtype), p, m) + 0.5 * l2 * jnp.sum(jnp.square(lam - mu))


def _hessian(x: Array, s: Array, m: Array, l2: Array) -> Array:
  """X^T diag(m s (1 - s)) X + l2 I: `[K, K]`."""
  w = m * s * (1.0 - s)
  return jnp.einsum("nk,n,nj->kj", x, w, x) + l2 * jnp.eye(x.shape[-1], dtype=x.dtype)


def _spd_solve(h: Array, g: Array) -> Array:
  """h^-1 g for a symmetric positive definite `[K, K]` h (Cholesky, with a tiny relative jitter)."""
  num = h.shape[-1]
  jitter = _JITTER_ULPS * num * jnp.finfo(h.dtype).eps * jnp.max(jnp.abs(jnp.diagonal(h)))
  chol = jnp.linalg.cholesky(h + jitter * jnp.eye(num, dtype=h.dtype))
  return jax.scipy.linalg.cho_solve((chol, True), g)


def _largest_eig_bound(h: Array) -> Array:
  """An upper bound of the largest eigenvalue of a PSD matrix: min(trace, max absolute row sum)."""
  return jnp.minimum(jnp.trace(h), jnp.max(jnp.sum(jnp.abs(h), axis=-1)))


def _line_search(lam: Array, direction: Array, x: Array, z: Array, xd: Array, p: Array, m: Array, l2: Array,
                 mu: Array, *, sum_zero: bool) -> Array:
  """lam + t * direction for the largest t in _STEP_SIZES at which phi(t) = L(lam + t * direction) still decreases.

  phi is convex, so {t : phi'(t) <= 0} = [0, t*] and the chosen t (<= t*) never increases the objective. Testing
  the sign of the derivative, sum_i m_i (sigmoid(z_i + t xd_i) - p_i) xd_i + l2 (lam - mu + t d) . d, rather than
  comparing objective values keeps full Newton steps near the optimum, where objective differences fall below
  float32 resolution (comparing values there stalls at a gradient of ~sqrt(eps * L)).

  `sum_zero` (simplex steps, sum(d) = 0 up to rounding): the slope is computed as (grad - c 1) . d with c the mean
  gradient over the moving coordinates. Equal in exact arithmetic, but it removes the large common component of
  the gradient (the simplex multiplier), which times the float32 rounding of sum(d) would swamp the true slope.
  """
  steps = jnp.asarray(_STEP_SIZES, lam.dtype)
  zs = z[None, :] + steps[:, None] * xd[None, :]  # [T, N]
  r = lam - mu
  if sum_zero:
    grads = (m * (jax.nn.sigmoid(zs) - p)) @ x + l2 * (r[None, :] + steps[:, None] * direction[None, :])  # [T, K]
    moving = (direction != 0).astype(lam.dtype)
    center = jnp.sum(grads * moving, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(moving), 1.0)
    slopes = (grads - center) @ direction
  else:
    slopes = (jnp.sum(m * (jax.nn.sigmoid(zs) - p) * xd, axis=-1) + l2 *
              (jnp.sum(r * direction) + steps * jnp.sum(direction * direction)))
  # _STEP_SIZES is decreasing and ends with 0: argmax finds the first (largest) t with a non-positive slope, and
  # t = 0 is always acceptable. A NaN user gets t = 1, so NaN reaches its lam.
  ok = (slopes <= 0) | (steps == 0)
  best = jnp.where(jnp.any(jnp.isnan(slopes)), 0, jnp.argmax(ok))
  return lam + steps[best] * direction


def _fit_core(x: Array, p: Array, m: Array, l2: Array, mu: Array, init: Array, lo: Array, hi: Array, *,
              constraint: Optional[str], num_iters: int, num_inner_iters: int, tol: float) -> Array:
  """Damped (projected) Newton for one user; all inputs materialized, see `fit_lambda`."""
  x, p, m = _sanitize(x, p, m)
  lam0 = _project(init, constraint, lo, hi)

  def newton_step(lam):
    z = x @ lam
    s = jax.nn.sigmoid(z)
    g = x.T @ (m * (s - p)) + l2 * (lam - mu)
    h = _hessian(x, s, m, l2)
    if constraint is None:
      direction = -_spd_solve(h, g)
      fallback = -g / jnp.trace(h)  # A gradient step, if the factorization failed (non-finite).
      direction = jnp.where(jnp.all(jnp.isfinite(direction)), direction, fallback)
    else:
      # Minimize the quadratic model g.(v - lam) + 1/2 (v - lam)^T h (v - lam) over the feasible set (FISTA with
      # gradient-based adaptive restart), starting from the feasible lam.
      step = 1.0 / _largest_eig_bound(h)

      def inner(_, carry):
        v, y, t = carry
        v_new = _project(y - step * (g + h @ (y - lam)), constraint, lo, hi)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        restart = jnp.sum((y - v_new) * (v_new - v)) > 0
        y_new = jnp.where(restart, v_new, v_new + ((t - 1.0) / t_new) * (v_new - v))
        t_new = jnp.where(restart, jnp.ones_like(t), t_new)
        return v_new, y_new, t_new

      v, _, _ = jax.lax.fori_loop(0, num_inner_iters, inner, (lam, lam, jnp.ones((), lam.dtype)))
      direction = v - lam  # lam + t * direction stays feasible for t in [0, 1] (convex set).
    return _line_search(lam, direction, x, z, x @ direction, p, m, l2, mu,
                        sum_zero=constraint == "simplex"), direction

  if not tol:
    return jax.lax.fori_loop(0, num_iters, lambda _, lam: newton_step(lam)[0], lam0)

  def cond(carry):
    i, _, done = carry
    return (i < num_iters) & ~done

  def body(carry):
    i, lam, _ = carry
    lam, direction = newton_step(lam)
    # Converged when the full (projected) Newton step is tiny: the error after it is ~its square (NaN: not done).
    done = jnp.max(jnp.abs(direction)) <= tol * jnp.maximum(1.0, jnp.max(jnp.abs(lam)))
    return i + 1, lam, done

  return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), lam0, jnp.zeros((), bool)))[1]


_STATIC = ("constraint", "num_iters", "num_inner_iters", "tol")
_fit_single_jit = jax.jit(_fit_core, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _fit_batched_jit(x, p, m, l2, mu, init, lo, hi, *, constraint, num_iters, num_inner_iters, tol):
  core = functools.partial(_fit_core, constraint=constraint, num_iters=num_iters, num_inner_iters=num_inner_iters,
                           tol=tol)
  return jax.vmap(core, in_axes=(0, 0, 0, 0, 0, 0, None, None))(x, p, m, l2, mu, init, lo, hi)


def _box_arrays(constraint: Optional[str], box: Optional[Tuple[ArrayLike, ArrayLike]], num: int,
                dtype: Any) -> Tuple[Array, Array]:
  if constraint == "box":
    lo, hi = box
    return (jnp.broadcast_to(jnp.asarray(lo, dtype), (num,)), jnp.broadcast_to(jnp.asarray(hi, dtype), (num,)))
  return jnp.full((num,), -jnp.inf, dtype), jnp.full((num,), jnp.inf, dtype)


def fit_lambda(delta_features: ArrayLike,
               prefs: ArrayLike,
               *,
               l2: ArrayLike,
               mask: Optional[ArrayLike] = None,
               init: Optional[ArrayLike] = None,
               prior_mean: Optional[ArrayLike] = None,
               constraint: Optional[str] = None,
               box: Optional[Tuple[ArrayLike, ArrayLike]] = None,
               num_iters: int = DEFAULT_NUM_ITERS,
               num_inner_iters: int = DEFAULT_NUM_INNER_ITERS,
               tol: float = 0.0) -> Array:
  """One user's L2-regularized logistic-regression fit of lambda (see the module docstring).

  Args:
    delta_features: `[N, K]` f(x, y_a) - f(x, y_b).
    prefs: `[N]` labels in [0, 1]: 1 means y_a preferred, 0 means y_b, fractions are soft labels (0.5 = tie).
    l2: the penalty strength, > 0 (checked when concrete); the objective is
      sum of log-losses + l2 / 2 * |lam - prior_mean|^2.
    mask: `[N]` bool (False = padding, contributes nothing even if it holds NaN), or non-negative row weights.
      None: every row counts.
    init: `[K]` warm start (e.g. the previous lambda); projected onto the constraint set. None: the (projected)
      prior mean. The optimum does not depend on it; only the number of steps needed does.
    prior_mean: `[K]` the penalty's center (None: 0; `jnp.full(K, 1 / K)` is the uniform soup).
    constraint: None, "simplex" (lam >= 0, sum lam = 1) or "box" (lo <= lam <= hi).
    box: `(lo, hi)` scalars or `[K]` arrays, with constraint="box".
    num_iters: Newton steps (static). 25 reach float32 precision from a cold start on the tested problems
      (separable data with l2 = 1e-3 included); warm starts need fewer.
    num_inner_iters: projected-gradient steps per Newton step for a constrained fit (static).
    tol: 0 (default): exactly `num_iters` steps (a `fori_loop`, reverse-differentiable). > 0: stop early once a
      full Newton step is below tol * max(1, |lam|_inf) (a `while_loop`; under vmap it runs until the slowest user
      converges). 1e-4 is safe (Newton converges quadratically: the remaining error is ~ the step squared).

  Returns:
    `[K]` the optimum lam, in float32 (float64 for float64 inputs with x64 enabled).
  """
  _check_l2(l2)
  _check_constraint(constraint, box)
  _check_shapes("delta_features", delta_features, (None, None), "[N, K]")
  num_rows, num = np.shape(delta_features)
  _check_shapes("prefs", prefs, (num_rows,), "[N]")
  dtype = _float_dtype(delta_features)
  m = jnp.ones((num_rows,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  _check_shapes("mask", m, (num_rows,), "[N]")
  mu = jnp.zeros((num,), dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  _check_shapes("prior_mean", mu, (num,), "[K]")
  lam0 = mu if init is None else jnp.asarray(init, dtype)
  _check_shapes("init", lam0, (num,), "[K]")
  _check_labels(prefs, mask)
  bad = None
  if not (_is_tracer(delta_features) or _is_tracer(prefs) or _is_tracer(mask)):  # [N, K]: small, checked on host.
    counts = np.ones(num_rows, bool) if mask is None else np.asarray(mask) > 0
    finite = np.all(np.isfinite(np.asarray(delta_features)), axis=-1) & np.isfinite(np.asarray(prefs))
    bad = np.flatnonzero(counts & ~finite)
  if bad is not None and len(bad):
    row = int(bad[0])
    raise ValueError(f"row {row} is not finite (delta_features[{row}] = {np.asarray(delta_features)[row]}, "
                     f"prefs[{row}] = {np.asarray(prefs)[row]}); every row the mask counts must be finite (mask "
                     f"it out to skip it). {len(bad)} such row{'s' if len(bad) > 1 else ''} in total.")
  lo, hi = _box_arrays(constraint, box, num, dtype)
  return _fit_single_jit(jnp.asarray(delta_features, dtype), jnp.asarray(prefs, dtype), m, jnp.asarray(l2, dtype),
                         mu, lam0, lo, hi, constraint=constraint, num_iters=num_iters,
                         num_inner_iters=num_inner_iters, tol=float(tol))


def fit_lambda_batched(delta_features: ArrayLike,
                       prefs: ArrayLike,
                       *,
                       l2: ArrayLike,
                       mask: Optional[ArrayLike] = None,
                       init: Optional[ArrayLike] = None,
                       prior_mean: Optional[ArrayLike] = None,
                       constraint: Optional[str] = None,
                       box: Optional[Tuple[ArrayLike, ArrayLike]] = None,
                       num_iters: int = DEFAULT_NUM_ITERS,
                       num_inner_iters: int = DEFAULT_NUM_INNER_ITERS,
                       tol: float = 0.0) -> Array:
  """`fit_lambda` for U users in one compiled call (vmap inside jit).

  Args:
    delta_features: `[U, N, K]`.
    prefs: `[U, N]`.
    l2: scalar or `[U]`, > 0.
    mask: `[U, N]` (None: all rows count).
    init: `[U, K]` warm starts (None: the prior mean).
    prior_mean: `[K]` (shared) or `[U, K]` (None: 0).
    constraint, box, num_iters, num_inner_iters, tol: as in `fit_lambda` (box shared by all users).

  Returns:
    `[U, K]`; row u equals `fit_lambda` on user u's data (users are independent: a user with non-finite features
    gets a NaN row, with a warning naming it, and does not affect the others). Finite labels outside [0, 1] raise.
  """
  _check_l2(l2)
  _check_constraint(constraint, box)
  _check_shapes("delta_features", delta_features, (None, None, None), "[U, N, K]")
  num_users, num_rows, num = np.shape(delta_features)
  _check_shapes("prefs", prefs, (num_users, num_rows), "[U, N]")
  dtype = _float_dtype(delta_features)
  m = jnp.ones((num_users, num_rows), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  _check_shapes("mask", m, (num_users, num_rows), "[U, N]")
  mu = jnp.zeros((num,), dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  mu = jnp.broadcast_to(mu, (num_users, num))
  lam0 = mu if init is None else jnp.asarray(init, dtype)
  _check_shapes("init", lam0, (num_users, num), "[U, K]")
  l2 = jnp.broadcast_to(jnp.asarray(l2, dtype), (num_users,))
  _check_labels(prefs, mask)
  lo, hi = _box_arrays(constraint, box, num, dtype)
  lam = _fit_batched_jit(jnp.asarray(delta_features, dtype), jnp.asarray(prefs, dtype), m, l2, mu, lam0, lo, hi,
                         constraint=constraint, num_iters=num_iters, num_inner_iters=num_inner_iters,
                         tol=float(tol))
  if _is_tracer(delta_features) or _is_tracer(prefs):
    return lam
  # A user with a non-finite counted row gets a NaN lam (the fit isolates it): name those users from the [U, K]
  # result instead of scanning the [U, N, K] features on the host.
  users = np.flatnonzero(~np.all(np.isfinite(np.asarray(lam)), axis=-1)).tolist()
  if users:
    warnings.warn(f"fit_lambda_batched: users {users[:10]}{' ...' if len(users) > 10 else ''} have non-finite "
                  "delta_features or prefs on rows the mask counts; their lam is NaN, the other users' fits are "
                  "unaffected (mask the rows out to fit those users on the rest).",
                  RuntimeWarning, stacklevel=2)
  return lam


# ----------------------------------------------------------------------------------------------------------------------
# Ratings and online gradient steps.
# ----------------------------------------------------------------------------------------------------------------------


@jax.jit
def _fit_ratings_core(x, r, m, l2, mu, fit_intercept):
  keep = m > 0
  x = jnp.where(keep[:, None], x, 0.0)
  r = jnp.where(keep, r, 0.0)
  m = jnp.where(keep, m, 0.0)
  # An unpenalized intercept = centering features and ratings by their weighted means (masked rows have weight 0).
  total = jnp.maximum(jnp.sum(m), jnp.finfo(x.dtype).tiny)
  x = jnp.where(fit_intercept, x - jnp.sum(m[:, None] * x, axis=0) / total, x)
  r = jnp.where(fit_intercept, r - jnp.sum(m * r) / total, r)
  a = jnp.einsum("nk,n,nj->kj", x, m, x) + l2 * jnp.eye(x.shape[-1], dtype=x.dtype)
  b = x.T @ (m * r) + l2 * mu
  return _spd_solve(a, b)


def fit_lambda_ratings(features: ArrayLike,
                       ratings: ArrayLike,
                       *,
                       l2: ArrayLike,
                       mask: Optional[ArrayLike] = None,
                       prior_mean: Optional[ArrayLike] = None,
                       fit_intercept: bool = False) -> Array:
  """Ridge regression of ratings on features: argmin sum_i m_i (r_i - lam . f_i)^2 + l2 |lam - mu|^2.

  Closed form (X^T M X + l2 I)^-1 (X^T M r + l2 mu), one K x K Cholesky solve. jit/vmap-compatible.

  Args:
    features: `[N, K]` f(x, y) of the rated responses.
    ratings: `[N]` the user's ratings.
    l2: penalty strength, > 0.
    mask: `[N]` bool or non-negative row weights (None: all rows).
    prior_mean: `[K]` the penalty's center (None: 0).
    fit_intercept: also fit an unpenalized offset (features f_k are implicit rewards known only up to a
      per-prompt constant, and rating scales have arbitrary offsets); only lam is returned. A bool (may be traced).

  Returns:
    `[K]` lam.
  """
  _check_l2(l2)
  _check_shapes("features", features, (None, None), "[N, K]")
  num_rows, num = np.shape(features)
  _check_shapes("ratings", ratings, (num_rows,), "[N]")
  dtype = _float_dtype(features)
  m = jnp.ones((num_rows,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  mu = jnp.zeros((num,), dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  return _fit_ratings_core(jnp.asarray(features, dtype), jnp.asarray(ratings, dtype), m, jnp.asarray(l2, dtype), mu,
                           jnp.asarray(fit_intercept, bool))


@jax.jit
def sgd_update(lam: ArrayLike,
               delta_features_t: ArrayLike,
               prefs_t: ArrayLike,
               lr: ArrayLike,
               l2: ArrayLike,
               prior_mean: Optional[ArrayLike] = None) -> Array:
  """One online-gradient step on a single new comparison (cheap; no refit).

  lam <- lam - lr * ((sigmoid(lam . d) - p) d + l2 (lam - mu)): a stochastic-gradient step on the per-comparison
  objective log-loss + l2 / 2 |lam - mu|^2 (for N comparisons in total, l2 here corresponds to `fit_lambda`'s
  l2 / N). Vmap over users for `[U, K]` / `[U]` inputs.

  Args:
    lam: `[K]` current weights.
    delta_features_t: `[K]` the new comparison's feature difference.
    prefs_t: scalar label in [0, 1].
    lr: step size.
    l2: penalty strength (>= 0).
    prior_mean: `[K]` (None: 0).

  Returns:
    `[K]` updated lam.
  """
  lam = jnp.asarray(lam)
  dtype = _float_dtype(lam)
  lam = lam.astype(dtype)
  d = jnp.asarray(delta_features_t, dtype)
  mu = jnp.zeros_like(lam) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  grad = (jax.nn.sigmoid(jnp.dot(lam, d)) - prefs_t) * d + l2 * (lam - mu)
  return lam - lr * grad


# ----------------------------------------------------------------------------------------------------------------------
# Laplace posterior, Thompson sampling, pair selection.
# ----------------------------------------------------------------------------------------------------------------------


@jax.jit
def _posterior_core(lam, x, m, l2):
  x, _, m = _sanitize(x, jnp.zeros(x.shape[:1], x.dtype), m)
  s = jax.nn.sigmoid(x @ lam)
  h = _hessian(x, s, m, l2)
  h = 0.5 * (h + h.T)
  evals, evecs = jnp.linalg.eigh(h)
  evals = jnp.maximum(evals, l2)  # Exact arithmetic gives evals >= l2; rounding may not.
  cov = (evecs / evals) @ evecs.T
  cov = 0.5 * (cov + cov.T)
  cov = cov + (_COV_JITTER / jnp.min(evals)) * jnp.eye(x.shape[-1], dtype=x.dtype)
  return lam, cov


def posterior(lam_hat: ArrayLike,
              delta_features: ArrayLike,
              mask: Optional[ArrayLike] = None,
              *,
              l2: ArrayLike) -> Tuple[Array, Array]:
  """Laplace approximation N(lam_hat, H^-1) of the posterior of lam around the fitted optimum.

  H = sum_i m_i s_i (1 - s_i) d_i d_i^T + l2 I, s_i = sigmoid(lam_hat . d_i) (it does not depend on the labels).
  The inverse is taken by eigendecomposition with eigenvalues clamped at l2 (their exact lower bound), symmetrized,
  plus a relative jitter (1e-5 of the largest variance), so `cov` is symmetric positive definite even for
  degenerate data (no rows, separable data, feature scales 1e6).

  Args:
    lam_hat: `[K]` the `fit_lambda` optimum (with the same l2, mask).
    delta_features: `[N, K]`.
    mask: `[N]` bool or row weights (None: all rows).
    l2: penalty strength, > 0.

  Returns:
    (mean `[K]`, cov `[K, K]`).
  """
  _check_l2(l2)
  _check_shapes("delta_features", delta_features, (None, None), "[N, K]")
  num_rows, num = np.shape(delta_features)
  _check_shapes("lam_hat", lam_hat, (num,), "[K]")
  dtype = _float_dtype(delta_features, lam_hat)
  m = jnp.ones((num_rows,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  return _posterior_core(jnp.asarray(lam_hat, dtype), jnp.asarray(delta_features, dtype), m, jnp.asarray(l2, dtype))


_posterior_batched_jit = jax.jit(jax.vmap(_posterior_core))


def posterior_batched(lam_hat: ArrayLike,
                      delta_features: ArrayLike,
                      mask: Optional[ArrayLike] = None,
                      *,
                      l2: ArrayLike) -> Tuple[Array, Array]:
  """`posterior` for U users in one compiled call: lam_hat `[U, K]`, delta_features `[U, N, K]`, mask `[U, N]`,
  l2 scalar or `[U]` -> (mean `[U, K]`, cov `[U, K, K]`)."""
  _check_l2(l2)
  _check_shapes("delta_features", delta_features, (None, None, None), "[U, N, K]")
  num_users, num_rows, num = np.shape(delta_features)
  _check_shapes("lam_hat", lam_hat, (num_users, num), "[U, K]")
  dtype = _float_dtype(delta_features, lam_hat)
  m = jnp.ones((num_users, num_rows), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  _check_shapes("mask", m, (num_users, num_rows), "[U, N]")
  l2 = jnp.broadcast_to(jnp.asarray(l2, dtype), (num_users,))
  return _posterior_batched_jit(jnp.asarray(lam_hat, dtype), jnp.asarray(delta_features, dtype), m, l2)


def _cov_sqrt(cov: Array) -> Array:
  evals, evecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
  return evecs * jnp.sqrt(jnp.maximum(evals, 0.0))


@functools.partial(jax.jit, static_argnames=("num_samples",))
def thompson_sample(key: Array, mean: ArrayLike, cov: ArrayLike, num_samples: Optional[int] = None) -> Array:
  """Samples of lam ~ N(mean, cov) (through a symmetric eigendecomposition, robust to tiny eigenvalues).

  Args:
    key: PRNG key.
    mean: `[K]`.
    cov: `[K, K]` symmetric PSD.
    num_samples: None for one `[K]` sample, else `[num_samples, K]`.

  Returns:
    `[K]` or `[num_samples, K]`.
  """
  mean = jnp.asarray(mean)
  dtype = _float_dtype(mean, cov)
  mean = mean.astype(dtype)
  root = _cov_sqrt(jnp.asarray(cov, dtype))
  shape = (mean.shape[-1],) if num_samples is None else (num_samples, mean.shape[-1])
  eps = jax.random.normal(key, shape, dtype)
  return mean + eps @ root.T


def _masked_argmax_pair(scores: Array) -> Tuple[Array, Array]:
  """(i, j), i < j, of the largest entry of a symmetric `[M, M]` score matrix (off-diagonal, -inf = excluded)."""
  num = scores.shape[0]
  upper = jnp.triu(jnp.ones((num, num), bool), k=1)
  flat = jnp.argmax(jnp.where(upper, scores, -jnp.inf).reshape(-1))
  return (flat // num).astype(jnp.int32), (flat % num).astype(jnp.int32)


def choose_pair(candidate_features: ArrayLike,
                mean: ArrayLike,
                cov: ArrayLike,
                *,
                rule: str = "max_variance",
                key: Optional[Array] = None,
                candidate_mask: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
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
    candidate_mask: `[M]` bool, False = not a valid candidate (at least two must be valid).

  Returns:
    (i, j) int32 scalars with i != j (i < j for the deterministic rules).
  """
  if rule not in PAIR_RULES:
    raise ValueError(f"rule must be one of {PAIR_RULES}, got {rule!r}.")
  if rule == "thompson" and key is None:
    raise ValueError("rule='thompson' needs a PRNG key.")
  _check_shapes("candidate_features", candidate_features, (None, None), "[M, K]")
  num_cands, num = np.shape(candidate_features)
  if num_cands < 2:
    raise ValueError(f"choose_pair needs at least 2 candidates, got {num_cands}.")
  _check_shapes("mean", mean, (num,), "[K]")
  _check_shapes("cov", cov, (num, num), "[K, K]")
  valid = jnp.ones((num_cands,), bool) if candidate_mask is None else jnp.asarray(candidate_mask, bool)
  dtype = _float_dtype(candidate_features, mean, cov)
  return _choose_pair_core(jnp.asarray(candidate_features, dtype), jnp.asarray(mean, dtype),
                           jnp.asarray(cov, dtype), valid, key, rule=rule)


def choose_pair_batched(candidate_features: ArrayLike,
                        mean: ArrayLike,
                        cov: ArrayLike,
                        *,
                        rule: str = "max_variance",
                        key: Optional[Array] = None,
                        candidate_mask: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
  """`choose_pair` for U users in one compiled call.

  Args:
    candidate_features: `[U, M, K]`.
    mean: `[U, K]`.
    cov: `[U, K, K]`.
    rule: one of PAIR_RULES.
    key: PRNG key (split per user), required for "thompson".
    candidate_mask: `[U, M]` bool (None: all valid).

  Returns:
    (i `[U]`, j `[U]`) int32.
  """
  if rule not in PAIR_RULES:
    raise ValueError(f"rule must be one of {PAIR_RULES}, got {rule!r}.")
  if rule == "thompson" and key is None:
    raise ValueError("rule='thompson' needs a PRNG key.")
  _check_shapes("candidate_features", candidate_features, (None, None, None), "[U, M, K]")
  num_users, num_cands, num = np.shape(candidate_features)
  if num_cands < 2:
    raise ValueError(f"choose_pair needs at least 2 candidates, got {num_cands}.")
  _check_shapes("mean", mean, (num_users, num), "[U, K]")
  _check_shapes("cov", cov, (num_users, num, num), "[U, K, K]")
  valid = (jnp.ones((num_users, num_cands), bool) if candidate_mask is None else jnp.asarray(candidate_mask, bool))
  dtype = _float_dtype(candidate_features, mean, cov)
  keys = None if key is None else jax.random.split(key, num_users)
  core = functools.partial(_choose_pair_core, rule=rule)
  return jax.vmap(core)(jnp.asarray(candidate_features, dtype), jnp.asarray(mean, dtype), jnp.asarray(cov, dtype),
                        valid, keys)


@functools.partial(jax.jit, static_argnames=("rule",))
def _choose_pair_core(f, mean, cov, valid, key, *, rule):
  pair_ok = valid[:, None] & valid[None, :]
  if rule == "thompson":
    k1, k2 = jax.random.split(key)
    values1 = jnp.where(valid, f @ thompson_sample(k1, mean, cov), -jnp.inf)
    values2 = jnp.where(valid, f @ thompson_sample(k2, mean, cov), -jnp.inf)
    i = jnp.argmax(values1)
    j = jnp.argmax(jnp.where(jnp.arange(f.shape[0]) == i, -jnp.inf, values2))
    return i.astype(jnp.int32), j.astype(jnp.int32)
  c = f @ cov @ f.T
  q = jnp.diagonal(c)
  variance = jnp.maximum(q[:, None] + q[None, :] - 2.0 * c, 0.0)  # d^T cov d for every pair.
  if rule == "max_info":
    mu = f @ mean
    s = jax.nn.sigmoid(mu[:, None] - mu[None, :])
    score = jnp.log1p(s * (1.0 - s) * variance)
  else:
    score = variance
  return _masked_argmax_pair(jnp.where(pair_ok, score, -jnp.inf))


# ----------------------------------------------------------------------------------------------------------------------
# Batched per-user state: a ring buffer of the last N comparisons, refit every step.
# ----------------------------------------------------------------------------------------------------------------------


@struct.dataclass
class UserState:
  """The online state of U users (a pytree; every field has a leading users axis).

  Attributes:
    lam: `[U, K]` current fitted weights.
    features: `[U, N, K]` ring buffer of the last N comparisons' feature differences.
    prefs: `[U, N]` their labels in [0, 1].
    mask: `[U, N]` bool, True where a slot holds a comparison.
    count: `[U]` int32, comparisons appended so far (the next slot is count % N).
    num_invalid: `[U]` int32, comparisons rejected because they held NaN / Inf.
    l2: `[U]` penalty strengths.
    prior_mean: `[U, K]` penalty centers.
  """
  lam: Array
  features: Array
  prefs: Array
  mask: Array
  count: Array
  num_invalid: Array
  l2: Array
  prior_mean: Array

  @property
  def num_users(self) -> int:
    return self.lam.shape[0]

  @property
  def num_features(self) -> int:
    return self.lam.shape[1]

  @property
  def buffer_size(self) -> int:
    return self.features.shape[1]


def init_user_state(num_users: int,
                    num_features: int,
                    buffer_size: int,
                    *,
                    l2: ArrayLike = 1.0,
                    prior_mean: Optional[ArrayLike] = None,
                    dtype: Any = jnp.float32) -> UserState:
  """An empty state: no comparisons, lam = prior mean (0 by default).

  Args:
    num_users: U.
    num_features: K.
    buffer_size: N, how many recent comparisons each user's fit uses (older ones are overwritten).
    l2: scalar or `[U]`, > 0.
    prior_mean: `[K]` or `[U, K]` (None: 0).
    dtype: float dtype of the buffers.

  Returns:
    UserState.
  """
  _check_l2(l2)
  if buffer_size < 1:
    raise ValueError(f"buffer_size must be >= 1, got {buffer_size}.")
  mu = jnp.zeros((num_features,), dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  mu = jnp.broadcast_to(mu, (num_users, num_features))
  return UserState(
      lam=mu,
      features=jnp.zeros((num_users, buffer_size, num_features), dtype),
      prefs=jnp.zeros((num_users, buffer_size), dtype),
      mask=jnp.zeros((num_users, buffer_size), bool),
      count=jnp.zeros((num_users,), jnp.int32),
      num_invalid=jnp.zeros((num_users,), jnp.int32),
      l2=jnp.broadcast_to(jnp.asarray(l2, dtype), (num_users,)),
      prior_mean=mu,
  )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _update_users_jit(state, new_delta, new_pref, new_mask, lo, hi, *, constraint, num_iters, num_inner_iters,
                      tol):
  core = functools.partial(_fit_core, constraint=constraint, num_iters=num_iters, num_inner_iters=num_inner_iters,
                           tol=tol)

  def one_user(lam, feats, prefs, mask, count, num_invalid, l2, mu, delta, pref, wants):
    finite = jnp.all(jnp.isfinite(delta)) & jnp.isfinite(pref) & (pref >= 0) & (pref <= 1)
    append = wants & finite
    slot = count % feats.shape[0]
    feats = jnp.where(append, feats.at[slot].set(delta), feats)
    prefs = jnp.where(append, prefs.at[slot].set(pref), prefs)
    mask = jnp.where(append, mask.at[slot].set(True), mask)
    refit = core(feats, prefs, mask.astype(feats.dtype), l2, mu, lam, lo, hi)
    lam = jnp.where(append, refit, lam)  # Users without a new comparison keep exactly their lam.
    return (lam, feats, prefs, mask, count + append.astype(jnp.int32),
            num_invalid + (wants & ~finite).astype(jnp.int32))

  out = jax.vmap(one_user)(state.lam, state.features, state.prefs, state.mask, state.count, state.num_invalid,
                           state.l2, state.prior_mean, new_delta, new_pref, new_mask)
  lam, feats, prefs, mask, count, num_invalid = out
  return state.replace(lam=lam, features=feats, prefs=prefs, mask=mask, count=count, num_invalid=num_invalid)


def update_users(state: UserState,
                 new_delta: ArrayLike,
                 new_pref: ArrayLike,
                 new_mask: Optional[ArrayLike] = None,
                 *,
                 constraint: Optional[str] = None,
                 box: Optional[Tuple[ArrayLike, ArrayLike]] = None,
                 num_iters: int = DEFAULT_NUM_ITERS,
                 num_inner_iters: int = DEFAULT_NUM_INNER_ITERS,
                 tol: float = 0.0) -> UserState:
  """Appends one comparison per user to the ring buffers and refits every user that got one: one compiled call.

  The refit warm-starts from the current lam. A comparison holding NaN / Inf, or a label outside [0, 1], is not
  appended (that user's `num_invalid` grows and its lam is unchanged), so one bad input never poisons a buffer.

  Args:
    state: UserState for U users.
    new_delta: `[U, K]` the new comparisons' feature differences.
    new_pref: `[U]` their labels in [0, 1].
    new_mask: `[U]` bool, False = this user gave no feedback this step (None: all True).
    constraint, box, num_iters, num_inner_iters, tol: as in `fit_lambda`.

  Returns:
    The new UserState.
  """
  _check_constraint(constraint, box)
  num_users, num = state.num_users, state.num_features
  _check_shapes("new_delta", new_delta, (num_users, num), "[U, K]")
  _check_shapes("new_pref", new_pref, (num_users,), "[U]")
  dtype = state.features.dtype
  wants = jnp.ones((num_users,), bool) if new_mask is None else jnp.asarray(new_mask, bool)
  _check_shapes("new_mask", wants, (num_users,), "[U]")
  lo, hi = _box_arrays(constraint, box, num, dtype)
  return _update_users_jit(state, jnp.asarray(new_delta, dtype), jnp.asarray(new_pref, dtype), wants, lo, hi,
                           constraint=constraint, num_iters=num_iters, num_inner_iters=num_inner_iters,
                          tol=float(tol))


def state_posterior(state: UserState) -> Tuple[Array, Array]:
  """The Laplace posterior of every user in `state`: (mean `[U, K]`, cov `[U, K, K]`)."""
  return _posterior_batched_jit(state.lam, state.features, state.mask.astype(state.features.dtype), state.l2)
