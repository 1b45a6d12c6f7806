"""The solver behind `fit_lambda`: damped (projected) Newton on one user's L2-regularized logistic regression.

Each step solves with the K x K Hessian sum_i m_i s_i (1 - s_i) d_i d_i^T + l2 I (positive definite, >= l2 I: one
Cholesky solve) and line-searches along the step: the largest step size in {1, 2^-1/2, ..., 2^-60, 0} at which the
objective's slope along the line is not yet positive (up to its rounding), so every step is a descent step whatever
the data (module docstring of `fit`).

Constraints use a projected Newton method: each step minimizes the local quadratic model over the feasible set
(accelerated projected gradient with restarts, `num_inner_iters` steps, step 1 / (an upper bound of the largest
Hessian eigenvalue), then rounds of a primal active-set method from the face that it reached: `_face_minimizer`)
and line-searches along the feasible segment, so its fixed points are exactly the constrained optima, reached at
the unconstrained fit's accuracy (tested with feature columns 1e4 apart in scale, cond(H) ~ 5e5).

`fit_core` is one user's fit on materialized arrays; `fit_status` is the same fit with whether it converged within
`num_iters` steps; `fit_single` jits `fit_status` and `fit_batched` vmaps it over users inside one jit. A converged
fit (tol > 0) is differentiated by the implicit function theorem at the optimum (`optimality_residual`: one K x K
solve per user), forward and reverse mode. The Hessian, the SPD solve and the row masking also serve the Laplace
posterior and the ratings fit.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online.checks import Array
from spectral_soup.online.checks import ArrayLike
from spectral_soup.online.projections import project

DEFAULT_NUM_ITERS = 25
DEFAULT_NUM_INNER_ITERS = 50
# Stop once a full Newton step is below DEFAULT_TOL * max(1, |lam|_inf) and moves no logit by more than
# DEFAULT_TOL * max(1, |z|_inf) (`fit_core`): the error left is ~ its square. `tol=0` runs exactly num_iters steps
# instead (a fori_loop, differentiated through the steps; tol > 0 is differentiated implicitly at the optimum).
DEFAULT_TOL = 1e-5
# Line-search step sizes, largest first, ratio 1/sqrt(2), down to 2^-60; the final 0 keeps the current point. The
# search stops at the first acceptable size, so the small ones cost nothing unless needed: from a start that saturates
# the logits (a prior mean or warm start far from the data's optimum) the Hessian is ~l2 I and the Newton step
# overshoots the line's minimum by a factor up to ~|x|^2 / l2; with sizes only down to 2^-10 every size was rejected
# and the fit never left its start (|x| = 300, l2 = 0.1).
_STEP_SIZES = tuple(2.0**(-i / 2) for i in range(121)) + (0.0,)
# A slope within this many ulps of the magnitude of its terms counts as 0 (`_line_search`): near the optimum the
# slope at the full step is rounding, and taking its sign at face value rejects the full step half the time, which
# turns Newton's quadratic convergence into a linear one (ratio 1/sqrt(2) per rejected size) at the last steps.
_SLOPE_ULPS = 8.0
# Rounds of the active-set refinement of a constrained Newton direction (`_face_minimizer`).
_ACTIVE_SET_ROUNDS = 8
# Sufficient-decrease constant of the line search's value test (`_line_search`).
_ARMIJO = 1e-4
# Relative jitter of the Hessian before its Cholesky factorization: each diagonal entry grows by K * _JITTER_ULPS
# ulps of itself (a jitter relative to the largest entry, added to every one, biased the small-scale coordinates:
# 3-13% on the ratings closed form with feature columns 100x apart). Only matters when the data term is ~1 / eps
# times larger than l2 (feature scales ~1e6), where float32 rounding makes X^T W X + l2 I numerically indefinite;
# relative to each entry, it perturbs the solution by ~K * _JITTER_ULPS ulps in every direction.
_JITTER_ULPS = 4.0
# A fit that ends at num_iters still counts as converged (`fit_status`) when its last step's quadratic model
# predicted a decrease below this fraction of the objective: the fit is at the optimum up to that, and float32
# rounding of an ill-conditioned Newton step can keep the step test from passing however many steps run.
SETTLED_RTOL = 1e-6
# The fit's static (compile-time) arguments.
STATIC_ARGNAMES = ("constraint", "num_iters", "num_inner_iters", "tol")


def sanitize(x: Array, p: Array, m: Array) -> Tuple[Array, Array, Array]:
  """Zeroes masked-out rows, so that padding (even NaN padding) contributes exactly nothing."""
  keep = m > 0
  x = jnp.where(keep[:, None], x, 0.0)
  p = jnp.where(keep, p, 0.0)
  m = jnp.where(keep, m, 0.0)
  return x, p, m


def residual(z: Array, p: Array) -> Array:
  """sigmoid(z) - p, the log-loss's derivative at logit z for label p, as (1 - p) sigmoid(z) - p sigmoid(-z): equal
  in exact arithmetic (soft labels too), accurate to rounding at any z. In float32 the plain difference holds
  1 - sigmoid(z) = sigmoid(-z) to an absolute 6e-8 only (1e-3 relative at z = 10, exactly 0 from z ~ 17): on
  separable comparisons with large features, whose closest margins at the optimum lie there, the fit stopped 1e-3
  to 30% short of the optimum."""
  return (1.0 - p) * jax.nn.sigmoid(z) - p * jax.nn.sigmoid(-z)


def curvature(z: Array) -> Array:
  """sigmoid(z) (1 - sigmoid(z)), the log-loss's second derivative at logit z, as sigmoid(z) sigmoid(-z): accurate
  to rounding at any z (in float32, 1 - sigmoid(z) is 0 for z > ~17, where the curvature is still e^-z)."""
  return jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)


def hessian(x: Array, w: Array, l2: Array, x_t: Optional[Array] = None) -> Array:
  """X^T diag(w) X + l2 I: `[K, K]`, with w = m * curvature(z) the log-loss's weights (m the row mask or weights).

  The weights are `curvature(z)`, not s (1 - s) from s = sigmoid(z), which is 0 for z > ~17 in float32 (the rows
  there would leave the Newton steps, the posterior covariance and the implicit derivative).

  `x_t`: x.T (`[K, N]`) materialized by the caller, for repeated calls on the same x: batched over users (vmap), the
  dot then contracts the weighted operand's minor axis, which XLA's CPU dot runs 2-3x faster than contracting
  x's major axis twice (XLA folds a transpose written next to the dot back into the dot, so it must be materialized
  outside the caller's loop).
  """
  eye = l2 * jnp.eye(x.shape[-1], dtype=x.dtype)
  if x_t is not None:
    return (x_t * w[None, :]) @ x + eye
  # Two operands (one dot_general, batched under vmap): 3-4x faster on CPU than the three-operand einsum.
  return jnp.einsum("nk,nj->kj", x * w[:, None], x) + eye


def spd_solve(h: Array, g: Array) -> Array:
  """h^-1 g for a symmetric positive definite `[K, K]` h (Cholesky, with a tiny jitter relative to each diagonal
  entry)."""
  num = h.shape[-1]
  jitter = _JITTER_ULPS * num * jnp.finfo(h.dtype).eps
  chol = jnp.linalg.cholesky(h + jitter * jnp.abs(h) * jnp.eye(num, dtype=h.dtype))  # Each diagonal entry's own.
  return jax.scipy.linalg.cho_solve((chol, True), g)


def _largest_eig_bound(h: Array) -> Array:
  """An upper bound of the largest eigenvalue of a PSD matrix: min(trace, max absolute row sum)."""
  return jnp.minimum(jnp.trace(h), jnp.max(jnp.sum(jnp.abs(h), axis=-1)))


def _line_search(lam: Array, direction: Array, x: Array, z: Array, xd: Array, p: Array, m: Array, l2: Array, mu: Array,
                 initial_slope: Array, *, sum_zero: bool) -> Array:
  """lam + t * direction for the largest t in _STEP_SIZES at which phi(t) = L(lam + t * direction) still decreases.

  phi is convex, so {t : phi'(t) <= 0} = [0, t*] and the chosen t (<= t*) never increases the objective. Testing
  the sign of the derivative, sum_i m_i (sigmoid(z_i + t xd_i) - p_i) xd_i + l2 (lam - mu + t d) . d, rather than
  comparing objective values keeps full Newton steps near the optimum, where objective differences fall below
  float32 resolution (comparing values there stalls at a gradient of ~sqrt(eps * L)). A slope below `_SLOPE_ULPS`
  ulps of the summed magnitude of its terms is rounding and counts as 0, so t can exceed t* only where phi rises by
  less than that rounding (phi(t) <= phi(0) + t phi'(t) for convex phi). A size that decreases phi sufficiently
  (phi(t) <= phi(0) + 1e-4 t phi'(0), Armijo; `initial_slope` = phi'(0) = g . direction) is accepted too,
  whatever its slope: the full Newton step near the optimum, which overshoots the line's minimum by O(step^2)
  (rejecting it made convergence linear in float64). Only t = 1 is tested so.

  The step sizes are tried largest first and the search stops at the first acceptable one (a `while_loop`; under
  vmap it runs until every user has one): near the optimum the full step passes at once, so a step costs one slope
  evaluation instead of one per step size. The slope is monotone in t, so this is the same t as testing them all.

  `sum_zero` (simplex steps, sum(d) = 0 up to rounding): the slope is computed as (grad - c 1) . d with c the mean
  gradient over the moving coordinates. Equal in exact arithmetic, but it removes the large common component of
  the gradient (the simplex multiplier), which times the float32 rounding of sum(d) would swamp the true slope.
  """
  steps = jnp.asarray(_STEP_SIZES, lam.dtype)
  r = lam - mu
  moving = (direction != 0).astype(lam.dtype)

  ulps = _SLOPE_ULPS * jnp.finfo(lam.dtype).eps

  def slope(t):
    """phi'(t) and its rounding scale (ulps times the summed magnitude of its terms)."""
    res = m * residual(z + t * xd, p)
    shifted = r + t * direction
    if sum_zero:
      grad = res @ x + l2 * shifted
      center = jnp.sum(grad * moving) / jnp.maximum(jnp.sum(moving), 1.0)
      scale = (jnp.abs(res) @ jnp.abs(x) + l2 * jnp.abs(shifted) + jnp.abs(center)) @ jnp.abs(direction)
      return (grad - center) @ direction, ulps * scale
    terms = res * xd
    value = jnp.sum(terms) + l2 * jnp.sum(shifted * direction)
    return value, ulps * (jnp.sum(jnp.abs(terms)) + l2 * jnp.sum(jnp.abs(shifted * direction)))

  # _STEP_SIZES is decreasing and ends with 0, which is always acceptable. A NaN user gets t = 1, so NaN reaches
  # its lam. The loop carries each step size's verdict instead of recomputing it in the loop's condition: under
  # vmap the condition and the body are compiled apart, and a slope within rounding of 0 could then pass in one and
  # fail in the other, which never ends the loop.
  last = len(_STEP_SIZES) - 1

  def objective(t):
    """phi(t) - phi(0) up to a constant: sum_i m_i (softplus(z_i + t xd_i) - p_i t xd_i) + l2 / 2 |r + t d|^2."""
    return (jnp.sum(m * (jax.nn.softplus(z + t * xd) - p * (t * xd))) +
            0.5 * l2 * jnp.sum(jnp.square(r + t * direction)))

  if sum_zero:  # g . d would carry the simplex multiplier times the rounding of sum(d): the centered form.
    initial_slope = slope(jnp.zeros((), lam.dtype))[0]

  def rejected(i, armijo=False):
    value, rounding = slope(steps[i])
    verdict = (i < last) & (value > rounding) & ~jnp.isnan(value)
    if armijo:
      # Sufficient decrease (Armijo) also accepts the full step: near the optimum a full Newton step overshoots the
      # line's minimum by O(step^2), its slope is then just above rounding, and rejecting it made the last steps
      # linear (ratio 0.29, visible in float64); where values are below float32's resolution the slope test decides
      # as before. Smaller sizes are left to the slope test (one objective evaluation per Newton step).
      zero_t = jnp.zeros((), lam.dtype)
      verdict &= ~(objective(steps[i]) <= objective(zero_t) + _ARMIJO * steps[i] * initial_slope)
    return verdict

  def next_step(carry):
    i, _ = carry
    return i + 1, rejected(i + 1)

  zero = jnp.zeros((), jnp.int32)
  best, _ = jax.lax.while_loop(lambda carry: carry[1], next_step, (zero, rejected(zero, armijo=True)))
  return lam + steps[best] * direction


def _constrained_direction(lam: Array, g: Array, h: Array, lo: Array, hi: Array, *, constraint: str,
                           num_inner_iters: int) -> Array:
  """The constrained Newton direction v - lam, v the minimizer of the local quadratic model over the feasible set.

  The model is g.(v - lam) + 1/2 (v - lam)^T h (v - lam), minimized by FISTA with gradient-based adaptive restart
  from the feasible lam.
  """
  step = 1.0 / _largest_eig_bound(h)

  def inner(_, carry):
    v, y, t = carry
    v_new = project(y - step * (g + h @ (y - lam)), constraint, lo, hi)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    restart = jnp.sum((y - v_new) * (v_new - v)) > 0
    y_new = jnp.where(restart, v_new, v_new + ((t - 1.0) / t_new) * (v_new - v))
    t_new = jnp.where(restart, jnp.ones_like(t), t_new)
    return v_new, y_new, t_new

  v, _, _ = jax.lax.fori_loop(0, num_inner_iters, inner, (lam, lam, jnp.ones((), lam.dtype)))
  v = _face_minimizer(v, lam, g, h, lo, hi, constraint=constraint)
  return v - lam  # lam + t * direction stays feasible for t in [0, 1] (convex set).


def _face_solve(w: Array, fixed: Array, lam: Array, g: Array, h: Array, *, constraint: str) -> Array:
  """The minimizer of the local quadratic model over the face of the feasible set on which w lies, with the
  coordinates `fixed` held at w's values (for the simplex, the others keep w's total); not projected."""
  held = jnp.where(fixed, w - lam, 0.0)  # The step's fixed coordinates.
  if constraint == "simplex":
    # The free coordinates keep w's total exactly: the step is held + c e_j + Z y, with j the free coordinate of
    # largest w, c what the free coordinates must gain together, and Z's columns e_i - e_j (i free, i != j), each
    # summing to 0; y minimizes the model (null-space method: no multiplier whose cancellation loses the total at
    # large feature scales).
    index = jnp.arange(w.shape[-1])
    pivot = jnp.argmax(jnp.where(fixed, -jnp.inf, w))
    basis = (~fixed & (index != pivot)).astype(w.dtype)
    z = jnp.diag(basis) - (index == pivot).astype(w.dtype)[:, None] * basis[None, :]  # [K, K], zero columns off it.
    base = held + jnp.where(index == pivot, jnp.sum(jnp.where(fixed, 0.0, w - lam)), 0.0)
    reduced = z.T @ h @ z + jnp.diag(1.0 - basis)  # SPD: Z^T h Z on the basis, I elsewhere.
    step = base + z @ spd_solve(reduced, -(z.T @ (g + h @ base)))
  else:
    free = (~fixed).astype(w.dtype)
    reduced = h * free[:, None] * free[None, :] + jnp.diag(1.0 - free)  # SPD: h on the free block, I elsewhere.
    step = spd_solve(reduced, -(g + h @ held) * free)
  return jnp.where(fixed, w, lam + step)  # w's own values on the fixed coordinates, exactly.


def _face_minimizer(v: Array, lam: Array, g: Array, h: Array, lo: Array, hi: Array, *, constraint: str) -> Array:
  """v, or a point of lower model value: the model's exact minimizer over the feasible set once the active set is
  found (a primal active-set method started on the face that v lies on, `_ACTIVE_SET_ROUNDS` rounds).

  FISTA's steps are sized for the largest curvature, so on an ill-conditioned Hessian `num_inner_iters` steps
  barely move the low-curvature coordinates (feature columns 100x apart in scale: lam 4x too small after 25
  Newton steps), and at cond(H) ~ 1e5 they may not even find which bounds are active (a simplex fit 0.1 off). Each
  round minimizes the model on the current face (one reduced K x K solve; for the simplex, over the directions that
  keep the total); if that point leaves the feasible set, it moves towards it as far as it stays feasible and holds
  the coordinates that reach a bound; otherwise it moves there and frees the held coordinate whose multiplier has
  the wrong sign (the most violating one), if any. The model decreases at every round, and once the optimum's
  active set is found the Newton direction is exact and the outer steps converge quadratically, as in the
  unconstrained fit.
  """
  simplex = constraint == "simplex"
  fixed = (v <= 0.0) if simplex else (v <= lo) | (v >= hi)
  low = jnp.zeros_like(v) if simplex else lo
  high = jnp.full_like(v, jnp.inf) if simplex else hi
  index = jnp.arange(v.shape[-1])

  def model(w):
    d = w - lam
    return g @ d + 0.5 * d @ (h @ d)

  def round_(_, carry):
    w, fixed = carry
    u = _face_solve(w, fixed, lam, g, h, constraint=constraint)
    below, above = ~fixed & (u < low), ~fixed & (u > high)
    # Ratio test: the largest alpha in [0, 1] with w + alpha (u - w) feasible.
    ratio = jnp.where(below, (w - low) / jnp.where(below, w - u, 1.0),
                      jnp.where(above, (high - w) / jnp.where(above, u - w, 1.0), jnp.inf))
    alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    leaves = jnp.any(below | above) & jnp.all(jnp.isfinite(u))
    hits = (below | above) & (ratio <= alpha)
    moved = jnp.where(hits, jnp.where(below, low, high), w + alpha * (u - w))
    # Multipliers on the held coordinates at u: the model's gradient there, against the free coordinates' common
    # value for the simplex (its multiplier), must push each held coordinate onto its bound.
    grad = g + h @ (u - lam)
    if simplex:
      level = jnp.sum(jnp.where(fixed, 0.0, grad)) / jnp.maximum(jnp.sum(~fixed), 1)
      pull = jnp.where(fixed, level - grad, -jnp.inf)
    else:
      pull = jnp.where(fixed & (w <= low), -grad, jnp.where(fixed & (w >= high), grad, -jnp.inf))
    worst = jnp.argmax(pull)
    release = pull[worst] > 1e-5 * jnp.max(jnp.abs(grad))
    ok = jnp.all(jnp.isfinite(u))
    new_w = jnp.where(leaves, moved, jnp.where(ok, u, w))
    new_fixed = jnp.where(leaves, fixed | hits, fixed & ~(release & (index == worst) & ok))
    return new_w, new_fixed

  w, _ = jax.lax.fori_loop(0, _ACTIVE_SET_ROUNDS, round_, (v, fixed))
  w = project(w, constraint, lo, hi) if not simplex else jnp.maximum(w, 0.0)  # Rounding only.
  better = (model(w) < model(v)) & jnp.all(jnp.isfinite(w))
  return jnp.where(better, w, v)


def fit_core(x: Array, p: Array, m: Array, l2: Array, mu: Array, init: Array, lo: Array, hi: Array, *,
             constraint: Optional[str], num_iters: int, num_inner_iters: int, tol: float) -> Array:
  """Damped (projected) Newton for one user; all inputs materialized, see `fit.fit_lambda`.

  `tol > 0`: Newton steps until converged (a `while_loop`), differentiated implicitly at the optimum (`_fit_converged`:
  forward and reverse mode, the derivative of the exact optimum). `tol = 0`: exactly `num_iters` steps (a
  `fori_loop`), differentiated through the steps.
  """
  return fit_status(x, p, m, l2, mu, init, lo, hi, constraint=constraint, num_iters=num_iters,
                    num_inner_iters=num_inner_iters, tol=tol)[0]


def fit_status(x: Array, p: Array, m: Array, l2: Array, mu: Array, init: Array, lo: Array, hi: Array, *,
               constraint: Optional[str], num_iters: int, num_inner_iters: int, tol: float) -> Tuple[Array, Array]:
  """`fit_core`'s lam and whether the fit converged: bool[] (tol > 0: a Newton step below tol came within
  `num_iters` steps, or the last step's model predicted a decrease below SETTLED_RTOL of the objective; False for
  a non-finite fit; tol = 0: True, the fixed number of steps asked for)."""
  if tol:
    return _fit_converged(constraint, num_iters, num_inner_iters, tol, x, p, m, l2, mu, init, lo, hi)
  lam, _ = _newton(x, p, m, l2, mu, init, lo, hi, constraint=constraint, num_iters=num_iters,
                   num_inner_iters=num_inner_iters, tol=tol)
  return lam, jnp.ones((), bool)


def optimality_residual(lam: Array, x: Array, p: Array, m: Array, l2: Array, mu: Array, lo: Array, hi: Array, *,
                        constraint: Optional[str], step: Array) -> Array:
  """A map F with F(lam) = 0 exactly at the fit's optimum: `[K]`.

  Unconstrained: the objective's gradient, X^T (m (sigmoid(X lam) - p)) + l2 (lam - mu). Constrained: the projected
  gradient step's displacement, lam - project(lam - step * gradient, constraint) (zero exactly at the constrained
  optimum, for any step > 0).
  """
  x, p, m = sanitize(x, p, m)
  grad = x.T @ (m * residual(x @ lam, p)) + l2 * (lam - mu)
  if constraint is None:
    return grad
  return lam - project(lam - step * grad, constraint, lo, hi)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _fit_converged(constraint, num_iters, num_inner_iters, tol, x, p, m, l2, mu, init, lo, hi):
  """`_newton` until converged, with the implicit function theorem's derivative (`_fit_converged_jvp`): returns
  (lam, whether it converged within num_iters steps)."""
  return _newton(x, p, m, l2, mu, init, lo, hi, constraint=constraint, num_iters=num_iters,
                 num_inner_iters=num_inner_iters, tol=tol)


@_fit_converged.defjvp
def _fit_converged_jvp(constraint, num_iters, num_inner_iters, tol, primals, tangents):
  """The derivative of the optimum lam*(theta), theta = (x, p, m, l2, mu, lo, hi), by the implicit function theorem.

  F(lam*(theta), theta) = 0 (`optimality_residual`), so J dlam = -dF/dtheta dtheta with J = dF/dlam at lam*: one
  K x K solve per user instead of differentiating through the Newton steps (a `while_loop`, which reverse mode
  cannot traverse). It is linear in the tangents, so reverse mode follows by transposition. Unconstrained, J is the
  Hessian (SPD). Constrained, J = I - P (I - step H) with P the projection's Jacobian, invertible when the active
  set is strictly complementary (every bound the optimum touches has a nonzero multiplier), the generic case;
  there the derivative is the one of the optimum restricted to its face. The start `init` does not move the
  optimum: its derivative is 0. The derivative assumes the fit converged (within `num_iters` steps).
  """
  x, p, m, l2, mu, init, lo, hi = primals
  lam, converged = _fit_converged(constraint, num_iters, num_inner_iters, tol, *primals)
  theta, theta_dot = (x, p, m, l2, mu, lo, hi), tuple(t for i, t in enumerate(tangents) if i != 5)
  xs, _, ms = sanitize(x, p, m)
  h = hessian(xs, ms * curvature(xs @ lam), l2)
  # Constrained, any step > 0 gives the same optimum: 1 / (a bound of H's largest eigenvalue) keeps J well scaled.
  step = jnp.ones((), lam.dtype) if constraint is None else jax.lax.stop_gradient(1.0 / _largest_eig_bound(h))
  optimality = lambda lam, *theta: optimality_residual(lam, *theta, constraint=constraint, step=step)
  _, f_dot = jax.jvp(functools.partial(optimality, lam), theta, theta_dot)
  if constraint is None:
    lam_dot = -spd_solve(h, f_dot)
  else:
    jac = jax.jacfwd(optimality)(lam, *theta)
    lam_dot = -jnp.linalg.solve(jac, f_dot)
  return (lam, converged), (lam_dot, np.zeros(np.shape(converged), jax.dtypes.float0))


def _newton(x: Array, p: Array, m: Array, l2: Array, mu: Array, init: Array, lo: Array, hi: Array, *,
            constraint: Optional[str], num_iters: int, num_inner_iters: int, tol: float) -> Tuple[Array, Array]:
  """The Newton iterations of `fit_core`: (lam, converged as `fit_status` defines it; tol = 0: exactly num_iters
  steps, not tested: False)."""
  x, p, m = sanitize(x, p, m)
  x_t = x.T  # Materialized once, outside the loop (`hessian`).
  lam0 = project(init, constraint, lo, hi)

  def newton_step(lam):
    z = x @ lam
    g = x_t @ (m * residual(z, p)) + l2 * (lam - mu)
    h = hessian(x, m * curvature(z), l2, x_t)
    if constraint is None:
      direction = -spd_solve(h, g)
      fallback = -g / jnp.trace(h)  # A gradient step, if the factorization failed (non-finite).
      direction = jnp.where(jnp.all(jnp.isfinite(direction)), direction, fallback)
    else:
      direction = _constrained_direction(lam, g, h, lo, hi, constraint=constraint, num_inner_iters=num_inner_iters)
    xd = x @ direction
    new = _line_search(lam, direction, x, z, xd, p, m, l2, mu, g @ direction, sum_zero=constraint == "simplex")
    # Converged when the full (projected) Newton step is tiny both in lam and in the logits it moves (the second
    # makes the test independent of the features' scale: with features ~1e6, lam ~1e-6 moves by less than tol
    # long before the fit is done); the error left is then ~ the step squared. NaN: never done.
    # `initial=0`: a user with no comparison (N = 0) has no logits; its step is the prior's, done at once.
    done = ((jnp.max(jnp.abs(direction)) <= tol * jnp.maximum(1.0, jnp.max(jnp.abs(lam)))) &
            (jnp.max(jnp.abs(xd), initial=0.0) <= tol * jnp.maximum(1.0, jnp.max(jnp.abs(z), initial=0.0))))
    # Only reported (`fit_status`), never a reason to stop: the step's quadratic model predicts a decrease of the
    # objective below SETTLED_RTOL of it. Near the optimum of an ill-conditioned fit the step is float32 rounding,
    # which can stay above tol while the objective has nothing left to give.
    value = jnp.sum(m * (jax.nn.softplus(z) - p * z)) + 0.5 * l2 * jnp.sum(jnp.square(lam - mu))
    decrease = -(g @ direction + 0.5 * direction @ (h @ direction))
    settled = decrease <= SETTLED_RTOL * value
    return new, done, settled

  if not tol:
    return jax.lax.fori_loop(0, num_iters, lambda _, lam: newton_step(lam)[0], lam0), jnp.zeros((), bool)

  def cond(carry):
    i, _, done, _ = carry
    return (i < num_iters) & ~done

  def body(carry):
    i, lam, _, _ = carry
    lam, done, settled = newton_step(lam)
    return i + 1, lam, done, settled

  no = jnp.zeros((), bool)
  _, lam, done, settled = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), lam0, no, no))
  return lam, done | settled


fit_single = jax.jit(fit_status, static_argnames=STATIC_ARGNAMES)


@functools.partial(jax.jit, static_argnames=STATIC_ARGNAMES)
def fit_batched(x, p, m, l2, mu, init, lo, hi, *, constraint, num_iters, num_inner_iters, tol):
  """`fit_status` vmapped over users (a leading axis on every input but the shared box lo, hi) in one jit:
  (lam [U, K], converged [U])."""
  core = functools.partial(fit_status, constraint=constraint, num_iters=num_iters, num_inner_iters=num_inner_iters,
                           tol=tol)
  return jax.vmap(core, in_axes=(0, 0, 0, 0, 0, 0, None, None))(x, p, m, l2, mu, init, lo, hi)


def box_arrays(constraint: Optional[str], box: Optional[Tuple[ArrayLike, ArrayLike]], num: int,
               dtype: Any) -> Tuple[Array, Array]:
  """The `[K]` bounds (lo, hi) `fit_core` takes: the box's, or (-inf, inf) when there is no box."""
  if constraint == "box":
    lo, hi = box
    return (jnp.broadcast_to(jnp.asarray(lo, dtype), (num,)), jnp.broadcast_to(jnp.asarray(hi, dtype), (num,)))
  return jnp.full((num,), -jnp.inf, dtype), jnp.full((num,), jnp.inf, dtype)
