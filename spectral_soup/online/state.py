"""The online state of U users: a ring buffer of each user's last N comparisons, refit in one compiled call.

`UserState` keeps the buffers and the fitted lambda of every user (a pytree with a leading users axis);
`update_users` appends one comparison per user and refits every user that got one (warm-started, one compiled call
for all users; a comparison holding NaN / Inf is refused and counted, so one bad input never poisons a buffer), and
`state_posterior` gives every user's Laplace posterior for Thompson sampling and pair choice (`laplace`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.online import laplace
from spectral_soup.online import newton
from spectral_soup.online.checks import Array
from spectral_soup.online.checks import ArrayLike
from spectral_soup.online.checks import check_constraint
from spectral_soup.online.checks import check_finite
from spectral_soup.online.checks import check_l2
from spectral_soup.online.checks import check_labels
from spectral_soup.online.checks import check_numeric
from spectral_soup.online.checks import check_row_weights
from spectral_soup.online.checks import check_shapes
from spectral_soup.online.checks import check_solver
from spectral_soup.online.checks import is_tracer
from spectral_soup.online.newton import DEFAULT_NUM_INNER_ITERS
from spectral_soup.online.newton import DEFAULT_NUM_ITERS
from spectral_soup.online.newton import DEFAULT_TOL
from spectral_soup.online.projections import project
from spectral_soup.soup.validation import check_int
from spectral_soup.utils import memory


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


def init_user_state(num_users: int, num_features: int, buffer_size: int, *, l2: ArrayLike = 1.0,
                    prior_mean: Optional[ArrayLike] = None, dtype: Any = jnp.float32, constraint: Optional[str] = None,
                    box: Optional[Tuple[ArrayLike, ArrayLike]] = None) -> UserState:
  """An empty state: no comparisons, lam = the prior mean (0 by default) projected onto the constraint.

  That is `fit_lambda`'s answer for a user without comparisons; `update_users` keeps it for users without a valid
  comparison yet (give it the same constraint).

  Args:
    num_users: U.
    num_features: K.
    buffer_size: N, how many recent comparisons each user's fit uses (older ones are overwritten).
    l2: scalar or `[U]`, > 0.
    prior_mean: `[K]` or `[U, K]` (None: 0), the penalty's center (kept unprojected in the state).
    dtype: float dtype of the buffers.
    constraint, box: the feasible set of the fits, as in `fit_lambda` (None: unconstrained).

  Returns:
    UserState.
  """
  num_users, num_features = check_int("num_users", num_users, 1), check_int("num_features", num_features, 1)
  buffer_size = check_int("buffer_size", buffer_size, 1)
  try:
    jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"dtype={dtype!r}: expected float32 or float64.") from None
  if jnp.dtype(dtype) == jnp.dtype(jnp.float64) and not jax.config.jax_enable_x64:
    raise ValueError("dtype=float64 needs jax's 64-bit mode (jax.config.update('jax_enable_x64', True)); without it "
                     "the state would silently be float32.")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(f"dtype={jnp.dtype(dtype).name}: expected float32 or float64 (the fit's batched Cholesky "
                     "solves).")
  check_l2(l2)
  if np.ndim(l2) not in (0, 1) or (np.ndim(l2) == 1 and np.shape(l2)[0] != num_users):
    raise ValueError(f"l2 must be a scalar or one per user, [U={num_users}], got shape {np.shape(l2)}.")
  if prior_mean is not None:
    check_numeric("prior_mean", prior_mean)
    if np.shape(prior_mean) not in ((num_features,), (num_users, num_features)):
      raise ValueError(f"prior_mean must have shape [K={num_features}] or [U={num_users}, K={num_features}], got "
                       f"{np.shape(prior_mean)}.")
    check_finite("prior_mean", prior_mean)
  check_constraint(constraint, box, num_features)
  _check_state_fits(num_users, num_features, buffer_size, jnp.dtype(dtype).itemsize)
  mu = jnp.zeros((num_features,), dtype) if prior_mean is None else jnp.asarray(prior_mean, dtype)
  mu = jnp.broadcast_to(mu, (num_users, num_features))
  lam = mu if constraint is None else project(mu, constraint, *newton.box_arrays(constraint, box, num_features, dtype))
  return UserState(
      lam=lam,
      features=jnp.zeros((num_users, buffer_size, num_features), dtype),
      prefs=jnp.zeros((num_users, buffer_size), dtype),
      mask=jnp.zeros((num_users, buffer_size), bool),
      count=jnp.zeros((num_users,), jnp.int32),
      num_invalid=jnp.zeros((num_users,), jnp.int32),
      l2=jnp.broadcast_to(jnp.asarray(l2, dtype), (num_users,)),
      prior_mean=mu,
  )


def _check_state_fits(num_users: int, num_features: int, buffer_size: int, itemsize: int) -> None:
  """ValueError when the state's buffers alone exceed the device's memory (a lower bound: each refit needs about as
  much again), before anything is allocated: it was an out-of-memory kill without a message."""
  need = num_users * (buffer_size * (num_features * itemsize + itemsize + 1) + 2 * num_features * itemsize + 12)
  limit = memory.memory_limit_bytes()
  if limit and need > limit:
    raise ValueError(f"init_user_state: num_users={num_users} x buffer_size={buffer_size} x "
                     f"num_features={num_features} needs at least {need / 2**30:.3g} GiB for the users' buffers, "
                     f"more than the {limit / 2**30:.3g} GiB this device holds: lower buffer_size or num_users.")


@functools.partial(jax.jit, static_argnames=newton.STATIC_ARGNAMES)
def _update_users_jit(state, new_delta, new_pref, new_mask, lo, hi, *, constraint, num_iters, num_inner_iters, tol):
  core = functools.partial(newton.fit_core, constraint=constraint, num_iters=num_iters, num_inner_iters=num_inner_iters,
                           tol=tol)

  def one_user(lam, feats, prefs, mask, count, num_invalid, l2, mu, delta, pref, wants):
    finite = jnp.all(jnp.isfinite(delta)) & jnp.isfinite(pref) & (pref >= 0) & (pref <= 1)
    append = wants & finite
    slot = count % feats.shape[0]
    feats = jnp.where(append, feats.at[slot].set(delta), feats)
    prefs = jnp.where(append, prefs.at[slot].set(pref), prefs)
    mask = jnp.where(append, mask.at[slot].set(True), mask)
    # A lam that is not finite (a state read back damaged) is no start: its users refit from the prior mean.
    start = jnp.where(jnp.all(jnp.isfinite(lam)), lam, mu)
    refit = core(feats, prefs, mask.astype(feats.dtype), l2, mu, start, lo, hi)
    lam = jnp.where(append, refit, lam)  # Users without a new comparison keep exactly their lam.
    count = count + append.astype(jnp.int32)
    if constraint is not None:  # Users without any comparison hold the projected prior, as `fit_lambda` gives them.
      lam = jnp.where(count == 0, project(mu, constraint, lo, hi), lam)
    return lam, feats, prefs, mask, count, num_invalid + (wants & ~finite).astype(jnp.int32)

  out = jax.vmap(one_user)(state.lam, state.features, state.prefs, state.mask, state.count, state.num_invalid, state.l2,
                           state.prior_mean, new_delta, new_pref, new_mask)
  lam, feats, prefs, mask, count, num_invalid = out
  return state.replace(lam=lam, features=feats, prefs=prefs, mask=mask, count=count, num_invalid=num_invalid)


def update_users(state: UserState, new_delta: ArrayLike, new_pref: ArrayLike, new_mask: Optional[ArrayLike] = None, *,
                 constraint: Optional[str] = None, box: Optional[Tuple[ArrayLike, ArrayLike]] = None,
                 num_iters: int = DEFAULT_NUM_ITERS, num_inner_iters: int = DEFAULT_NUM_INNER_ITERS,
                 tol: float = DEFAULT_TOL) -> UserState:
  """Appends one comparison per user to the ring buffers and refits every user that got one: one compiled call.

  The refit warm-starts from the current lam (near the new optimum: one comparison moves it little). Unlike a
  concrete `fit_lambda` call it does not warn about a refit that ends at `num_iters` (the state stays on the device;
  `fit_lambda(state.features[u], state.prefs[u], mask=state.mask[u], ...)` refits user u with that check). A
  comparison holding NaN / Inf is not appended (that user's `num_invalid` grows and its lam is unchanged), so one
  bad input never poisons a buffer. A finite label outside [0, 1] (a -1 / +1 convention) raises ValueError when the
  labels are concrete, as in `fit_lambda`; traced (under jit), it is not appended either.
  With a constraint, a user without any comparison yet gets the prior mean projected onto it (`fit_lambda`'s answer
  for no comparisons), whatever lam the state held.

  Args:
    state: UserState for U users.
    new_delta: `[U, K]` the new comparisons' feature differences.
    new_pref: `[U]` their labels in [0, 1].
    new_mask: `[U]` bool, False = this user gave no feedback this step (None: all True).
    constraint, box, num_iters, num_inner_iters, tol: as in `fit_lambda`.

  Returns:
    The new UserState.
  """
  check_solver(num_iters, num_inner_iters, tol)
  _check_state(state)
  num_users, num = state.lam.shape
  check_constraint(constraint, box, num)
  for name, value in (("new_delta", new_delta), ("new_pref", new_pref), ("new_mask", new_mask)):
    check_numeric(name, value)  # Strings would be parsed as numbers (or, for the mask, all be True).
  check_shapes("new_delta", new_delta, (num_users, num), "[U, K]")
  check_shapes("new_pref", new_pref, (num_users,), "[U]")
  dtype = state.features.dtype
  check_row_weights("new_mask", new_mask)
  if new_mask is not None and not is_tracer(new_mask):
    values = np.asarray(new_mask, np.float64)
    partial = np.flatnonzero((values != 0) & (values != 1))
    if partial.size:  # The state stores whether a comparison counts: a weight of 0.2 would count in full.
      user = int(partial[0])
      raise ValueError(f"new_mask[{user}] is {values[user]:g}: expected bools (or 0 / 1), whether user {user}'s "
                       "comparison counts; the user state holds no row weights (fit_lambda takes them).")
  wants = jnp.ones((num_users,), bool) if new_mask is None else jnp.asarray(new_mask, bool)
  check_shapes("new_mask", wants, (num_users,), "[U]")
  check_labels(new_pref, new_mask, name="new_pref")  # They were dropped silently (only num_invalid grew).
  lo, hi = newton.box_arrays(constraint, box, num, dtype)
  with np.errstate(over="ignore"):  # A value beyond the state's float becomes inf: not stored, counted invalid.
    new_delta, new_pref = jnp.asarray(new_delta, dtype), jnp.asarray(new_pref, dtype)
  new = _update_users_jit(state, new_delta, new_pref, wants, lo, hi, constraint=constraint, num_iters=num_iters,
                          num_inner_iters=num_inner_iters, tol=float(tol))
  # The unchanged fields keep the given (ready) arrays, so the next call's `_check_state` reads them without waiting
  # for this refit: reading the jit's copies synchronized every update with the device (6-10% slower at U = 1,024).
  return new.replace(l2=state.l2, prior_mean=state.prior_mean)


# (dtype family, its name) of the fields that are not floating point.
_STATE_DTYPES = {
    "mask": (jnp.bool_, "bool"),
    "count": (jnp.integer, "integers (int32)"),
    "num_invalid": (jnp.integer, "integers (int32)")
}


def _check_state(state: UserState) -> None:
  """Raises ValueError naming the field of a state that `init_user_state` would not have made (edited by hand or
  read back from disk): fields that disagree on U, K or N, an l2 that is not a finite number > 0, a prior mean that
  is not finite (a negative l2 gave lam = 0, a NaN one NaN for every user, silently). Tracers pass."""
  if not isinstance(state, UserState):
    raise TypeError(f"state must be a UserState (from init_user_state or a previous update_users), got a "
                    f"{type(state).__name__}.")
  if np.ndim(state.lam) != 2:
    raise ValueError(f"state.lam must be [U, K], got shape {np.shape(state.lam)}.")
  (num_users, num), slots = np.shape(state.lam), np.shape(state.features)[1:2] or (None,)
  expected = {
      "features": (num_users, slots[0], num),
      "prefs": (num_users, slots[0]),
      "mask": (num_users, slots[0]),
      "count": (num_users,),
      "num_invalid": (num_users,),
      "l2": (num_users,),
      "prior_mean": (num_users, num)
  }
  for name, shape in expected.items():
    if tuple(np.shape(getattr(state, name))) != shape:
      raise ValueError(f"state.{name} has shape {tuple(np.shape(getattr(state, name)))}: expected {shape}, as "
                       f"state.lam [U={num_users}, K={num}] and state.features [U, N={slots[0]}, K] give (a state "
                       "made by init_user_state).")
  # A state read back from a file of another format (JSON: counts as floats, lists): a TypeError from inside the
  # jitted update, or a vmap error about ranks, before.
  for name in ("lam", *expected):
    value = getattr(state, name)
    family, family_name = _STATE_DTYPES.get(name, (jnp.floating, "floating point"))
    if not hasattr(value, "dtype"):
      raise ValueError(f"state.{name} is a {type(value).__name__}: expected an array (numpy or jax), as "
                       "init_user_state makes.")
    if not jnp.issubdtype(value.dtype, family):
      raise ValueError(f"state.{name} has dtype {value.dtype}: expected {family_name}, as init_user_state "
                       "makes.")
  try:
    check_l2(state.l2)
  except ValueError as e:
    raise ValueError(f"state.{e}") from None
  check_finite("state.prior_mean", state.prior_mean)


def state_posterior(state: UserState) -> Tuple[Array, Array]:
  """The Laplace posterior of every user in `state`: (mean `[U, K]`, cov `[U, K, K]`); unconstrained, whatever
  constraint the updates used (`laplace`'s module docstring)."""
  _check_state(state)
  mask = state.mask.astype(state.features.dtype)
  return laplace.posterior_core_batched(state.lam, state.features, mask, state.l2)
