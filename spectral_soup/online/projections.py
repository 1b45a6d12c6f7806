"""Euclidean projections onto the feasible sets of the constrained lambda fits: the simplex and a box."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spectral_soup.online.checks import Array
from spectral_soup.online.checks import ArrayLike
from spectral_soup.online.checks import float_dtype

# `project_simplex` shifts points whose largest entry exceeds this many radii by that entry first (see there).
_SHIFT_BEYOND = 2.0**10


# Not optax.projections.projection_simplex: it projects a whole pytree as one vector (not along the last axis) and
# rounds differently (about a third of the entries differ by up to ~6e-6), which would change the fits' numbers.
def project_simplex(lam: ArrayLike, radius: float = 1.0) -> Array:
  """Euclidean projection onto the simplex {x >= 0, sum x = radius} along the last axis (sort-based, exact).

  Args:
    lam: `[..., K]` points.
    radius: the simplex's total mass (> 0).

  Returns:
    `[..., K]` the nearest points of the simplex (Duchi et al., 2008).
  """
  _check_points("project_simplex", lam)
  if not isinstance(radius, jax.core.Tracer) and (isinstance(radius, (str, bytes, bool, np.bool_)) or np.ndim(radius) or
                                                  not 0 < np.asarray(radius, np.float64) < np.inf):
    raise ValueError(f"project_simplex: radius must be a finite number > 0 (the simplex's total), got {radius!r}.")
  return _project_simplex(lam, radius)


def _check_points(caller: str, lam: ArrayLike) -> None:
  if isinstance(lam, (str, bytes)) or np.ndim(lam) < 1 or (not isinstance(lam, jax.core.Tracer) and
                                                           np.asarray(lam).dtype.kind not in "biuf"):
    raise ValueError(f"{caller}: lam must be [..., K] numbers, got {lam!r}.")
  if np.shape(lam)[-1] == 0:  # numpy's "zero-size array to reduction operation maximum" before.
    raise ValueError(f"{caller}: lam has shape {np.shape(lam)}: expected K >= 1 coordinates on its last axis.")
  if not isinstance(lam, jax.core.Tracer):  # A NaN entry left the others looking like a point of the set.
    values = np.asarray(lam, np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
      index = [int(i) for i in np.argwhere(bad)[0]]
      raise ValueError(f"{caller}: lam{index} is {values[tuple(index)]}: expected finite numbers.")


@jax.jit
def _project_simplex(lam: ArrayLike, radius: float) -> Array:
  lam = jnp.asarray(lam)
  lam = lam.astype(float_dtype(lam))
  num = lam.shape[-1]
  # The projection is unchanged by a common shift of the entries. Points whose largest entry is beyond
  # _SHIFT_BEYOND radii are shifted by it first: the cumulative sums below round at the entries' scale, ~K |max| eps
  # relative to the radius (float32 at 1e7 rounded the radius away: points off the simplex). Points below that are
  # not shifted (their results, and derivatives, as before the shift existed), so they keep that rounding: up to
  # ~1e-4 K off the radius just under the threshold.
  top = jnp.max(lam, axis=-1, keepdims=True)
  shift = jnp.where(jnp.isfinite(top) & (jnp.abs(top) > _SHIFT_BEYOND * radius), top, 0.0)
  lam = lam - jax.lax.stop_gradient(shift)  # Shift-invariant: no derivative flows through the shift.
  u = -jnp.sort(-lam, axis=-1)  # Descending.
  css = jnp.cumsum(u, axis=-1) - radius
  ind = jnp.arange(1, num + 1, dtype=lam.dtype)
  rho = jnp.sum(u - css / ind > 0, axis=-1, keepdims=True)  # >= 1: the largest entry always qualifies.
  rho = jnp.maximum(rho, 1)
  theta = jnp.take_along_axis(css, rho - 1, axis=-1) / rho.astype(lam.dtype)
  return jnp.maximum(lam - theta, 0.0)


def project_box(lam: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> Array:
  """Projection onto the box lo <= lam <= hi (elementwise clip). lo, hi: scalars or broadcastable to `lam`; concrete
  bounds with lo > hi somewhere (an empty box) are refused."""
  _check_points("project_box", lam)
  for name, bound in (("lo", lo), ("hi", hi)):
    if isinstance(bound, (str, bytes)) or bound is None:
      raise ValueError(f"project_box: {name} must be a number or numbers broadcastable to lam, got {bound!r}.")
    try:
      np.broadcast_shapes(np.shape(bound), np.shape(lam))
    except ValueError:
      raise ValueError(f"project_box: {name} of shape {np.shape(bound)} does not broadcast to lam's "
                       f"{np.shape(lam)}.") from None
  if not (isinstance(lo, jax.core.Tracer) or isinstance(hi, jax.core.Tracer)):
    empty = np.asarray(lo, np.float64) > np.asarray(hi, np.float64)
    if np.any(empty):
      raise ValueError(f"box lo > hi (an empty box): lo={lo!r}, hi={hi!r}.")
  return _project_box(lam, lo, hi)


@jax.jit
def _project_box(lam: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> Array:
  return optax.projections.projection_box(jnp.asarray(lam), lo, hi)


def project(lam: Array, constraint: Optional[str], lo: Array, hi: Array) -> Array:
  """`lam` projected onto the feasible set of `constraint` (None, "simplex" or "box" with bounds lo, hi)."""
  if constraint == "simplex":
    return project_simplex(lam)
  if constraint == "box":
    return project_box(lam, lo, hi)
  return lam
