"""Argument checks shared by the online entry points (fits, posterior, pair choice, user state, directions).

Host side: shape checks always run; value checks run only on concrete inputs (tracers pass), so every entry point
stays jit- and vmap-compatible. They raise ValueError with messages that name the argument and its expected shape.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.soup.validation import check_int
from spectral_soup.soup import validation as _validation

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float, Sequence[float]]

CONSTRAINTS = (None, "simplex", "box")
check_key = _validation.check_key  # One PRNG key (the serving front end checks its key alike).


def is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


# l2 is used in float32: from its smallest normal number (below, l2 rounds to 0 and a posterior without data has
# infinite variance) to its largest (above, l2 is inf and every fit NaN).
L2_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))


def l2_in_range(l2: Any) -> bool:
  """Whether every l2 is a number in `L2_RANGE` (NaN is not)."""
  try:
    values = np.asarray(l2, np.float64)
  except (TypeError, ValueError):
    return False
  return bool(np.all((values >= L2_RANGE[0]) & (values <= L2_RANGE[1])))


def check_l2(l2: Any) -> None:
  """Raises ValueError unless every l2 is a number in `L2_RANGE` (concrete values only; tracers pass)."""
  if l2 is None:
    raise ValueError("l2 is required (the L2 penalty strength, > 0).")
  if is_tracer(l2):
    return
  if (isinstance(l2, (bool, np.bool_, str)) or np.asarray(l2).dtype == bool or  # True would be taken as 1.0.
      not _is_real_dtype(np.asarray(l2).dtype)):  # A string such as "1.0" would be parsed.
    raise ValueError(f"l2 must be a number > 0 (or one per user), got {l2!r}.")
  try:
    values = np.asarray(l2, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"l2 must be a number > 0 (or one per user), got {l2!r}.") from None
  if values.size and not l2_in_range(values):
    raise ValueError(f"l2 must be a finite number > 0 (it keeps the optimum finite on separable data) that float32 "
                     f"holds, in [{L2_RANGE[0]:.3g}, {L2_RANGE[1]:.3g}], got {l2}.")


def _is_real_dtype(dtype: Any) -> bool:
  """bool, integer or real floating (bfloat16 included); not complex, string or object."""
  return np.dtype(dtype).kind in "biuf" or jnp.issubdtype(dtype, jnp.floating)


def check_numeric(name: str, x: Any) -> None:
  """Raises ValueError unless `x` holds real numbers (bool, integer or float; not complex, strings or objects).
  Tracers are checked by dtype only."""
  if x is None:
    return
  if is_tracer(x) or isinstance(x, jax.Array):
    if not _is_real_dtype(x.dtype):  # A complex jax array would lose its imaginary part in the float32 cast.
      raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}.")
    return
  try:
    dtype = np.asarray(x).dtype
  except ValueError:  # Ragged nested sequences.
    raise ValueError(f"{name} must be a rectangular array of numbers; it is ragged.") from None
  if not _is_real_dtype(dtype):
    first = np.asarray(x).ravel()[:1].tolist()
    raise ValueError(f"{name} must hold numbers, got dtype {dtype} (first element {first}).")


def check_solver(num_iters: Any, num_inner_iters: Any, tol: Any) -> None:
  """Raises ValueError unless num_iters and num_inner_iters are integers >= 1 and tol a finite number >= 0."""
  check_int("num_iters", num_iters, 1)
  check_int("num_inner_iters", num_inner_iters, 1)
  if isinstance(tol, (np.ndarray, jax.Array)) and not is_tracer(tol) and tol.shape == () and _is_real_dtype(
      tol.dtype) and tol.dtype != bool:
    tol = tol.item()  # A 0-d array (jnp.float32(1e-5)) is one number.
  if (isinstance(tol, (bool, np.bool_)) or not isinstance(tol, (int, float, np.integer, np.floating)) or
      not np.isfinite(tol) or tol < 0):
    raise ValueError(f"tol must be a finite number >= 0 (0: exactly num_iters steps), got {tol!r}.")


def _fit_float() -> type:
  """The widest float the fits compute in: float32, or float64 when x64 is enabled (`float_dtype`)."""
  return np.float64 if jax.config.jax_enable_x64 else np.float32


def representable(values: Any) -> np.ndarray:
  """bool mask: finite in the fits' float (1e39 is finite in float64 but inf once a float32 fit casts it)."""
  return np.abs(np.asarray(values, np.float64)) <= float(np.finfo(_fit_float()).max)  # NaN compares False.


def _not_finite_message(value: float) -> str:
  if not np.isfinite(value):
    return "expected finite numbers"
  float_type = _fit_float()
  return f"expected finite numbers that {np.dtype(float_type).name} holds (|x| <= {np.finfo(float_type).max:.3g})"


def check_finite(name: str, x: Any) -> None:
  """Raises ValueError naming the first entry of `x` that is not finite in the fits' float dtype (concrete values
  only; tracers pass)."""
  if x is None or is_tracer(x):
    return
  values = np.asarray(x, np.float64)
  bad = ~representable(values)
  if np.any(bad):
    index = [int(i) for i in np.argwhere(bad)[0]] if values.ndim else []  # argwhere of a 0-d array is empty.
    value = values[tuple(index)]
    raise ValueError(f"{name}{index if index else ''} is {value}: {_not_finite_message(value)}.")


def check_row_weights(name: str, x: Any) -> None:
  """Raises ValueError naming the first entry of a mask / row-weight array `x` that is not a finite number >= 0
  (concrete values only; tracers pass). A -1 would otherwise count as 0 in a fit, or as True in a bool mask."""
  check_finite(name, x)
  if x is None or is_tracer(x):
    return
  values = np.asarray(x, np.float64)
  if np.any(values < 0):
    index = [int(i) for i in np.argwhere(values < 0)[0]] if values.ndim else []
    raise ValueError(f"{name}{index if index else ''} is {values[tuple(index)]:g}: expected bools or row weights "
                     f">= 0 (0 / False: the row does not count).")


def check_constraint(constraint: Optional[str], box: Optional[Tuple[ArrayLike, ArrayLike]],
                     num: Optional[int] = None) -> None:
  """Raises ValueError unless `constraint` is known and, for "box", `box` = (lo, hi) is a usable box.

  lo and hi are scalars or `[K]` arrays (checked when `num` = K is given); concrete bounds must not be NaN, lo must
  be below +inf and hi above -inf (a side with no finite point), and lo <= hi.
  """
  if constraint not in CONSTRAINTS:
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}.")
  if constraint == "box":
    if box is None or isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 2:
      raise ValueError(f"constraint='box' needs box=(lo, hi) (scalars or [K] arrays), got {box!r}.")
    for name, bound in zip(("lo", "hi"), box):
      if bound is None or isinstance(bound, str) or (not is_tracer(bound) and
                                                     np.asarray(bound).dtype.kind not in "iuf"):
        raise ValueError(f"box {name} must be a number or [K] numbers, got {bound!r}.")
      if num is not None and np.shape(bound) not in ((), (num,)):
        raise ValueError(f"box {name} must be a scalar or have shape [K] = [{num}], got {tuple(np.shape(bound))}.")
    lo, hi = box
    if is_tracer(lo) or is_tracer(hi):
      return
    for name, bound, empty in (("lo", lo, np.inf), ("hi", hi, -np.inf)):
      given = np.asarray(bound, np.float64)
      values = np.where(np.isnan(given) | representable(given), given, np.copysign(np.inf, given))  # As computed.
      bad = np.isnan(values) | (values == empty)
      if np.any(bad):
        index = tuple(int(i) for i in np.argwhere(bad)[0]) if values.ndim else ()
        cast = f" (inf in {np.dtype(_fit_float()).name}, the fit's float)" if np.isfinite(given[index]) else ""
        raise ValueError(f"box {name}{list(index) if index else ''} is {given[index]:g}{cast}: the bounds must be "
                         f"numbers with lo < inf and hi > -inf (lo = -inf or hi = inf leaves that side open).")
    if not np.all(np.asarray(lo) <= np.asarray(hi)):
      raise ValueError(f"box=(lo, hi) needs lo <= hi, got lo={lo}, hi={hi}.")
  elif box is not None:
    raise ValueError(f"box is only used with constraint='box', got constraint={constraint!r}.")


def check_l2_shape(l2: Any, users: Sequence[int]) -> None:
  """Raises ValueError unless l2 is a scalar (one user: `users` = ()) or a scalar or `[U]` (users = (U,))."""
  shape = tuple(np.shape(l2))
  if not users and shape:
    raise ValueError(f"l2 must be a scalar for one user ([N, K] data; a [U] l2 needs [U, N, K] data), got shape "
                     f"{shape}.")
  if users and shape not in ((), tuple(users)):
    raise ValueError(f"l2 must be a scalar or one per user, [U] = [{users[0]}], got shape {shape}.")


def check_prior_mean(prior_mean: Any, users: Sequence[int], num: int) -> None:
  """Raises ValueError unless prior_mean (not None) is `[K]`, or for U users `[K]` (shared) or `[U, K]`, and finite.

  A 1-D prior is always `[K]`, also when U == K.
  """
  shape = tuple(np.shape(prior_mean))
  if shape != (num,) and (not users or shape != (*users, num)):
    what = f"[K] = [{num}]" + (f" (shared) or [U, K] = [{users[0]}, {num}]" if users else "")
    raise ValueError(f"prior_mean must have shape {what}, got {shape}.")
  check_finite("prior_mean", prior_mean)


def check_num_features(name: str, x: Any) -> None:
  """Raises ValueError if `x` (`[..., K]`) has no feature (K = 0)."""
  if not np.shape(x)[-1]:
    raise ValueError(f"{name} has shape {tuple(np.shape(x))}: expected at least one feature (K >= 1, one per "
                     "basis).")


def check_finite_rows(x: Any, p: Any, mask: Optional[Any], *, x_name: str = "delta_features",
                      p_name: str = "prefs") -> None:
  """One user's `[N, K]` data (small: checked on the host, concrete values only): a non-finite counted row raises."""
  if is_tracer(x) or is_tracer(p) or is_tracer(mask):
    return
  num_rows = np.shape(x)[0]
  counts = np.ones(num_rows, bool) if mask is None else np.asarray(mask) > 0
  finite = np.all(representable(x), axis=-1) & representable(p)
  bad = np.flatnonzero(counts & ~finite)
  if len(bad):
    row = int(bad[0])
    in_range = np.all(np.isfinite(np.asarray(x, np.float64)[row])) and np.isfinite(np.asarray(p, np.float64)[row])
    what = f"finite in {np.dtype(_fit_float()).name}, the fit's float" if in_range else "finite"
    raise ValueError(f"row {row} is not {what} ({x_name}[{row}] = {np.asarray(x)[row]}, {p_name}[{row}] = "
                     f"{np.asarray(p)[row]}); every row the mask counts must be finite (mask it out to skip it). "
                     f"{len(bad)} such row{'s' if len(bad) > 1 else ''} in total.")


def check_shapes(name: str, x: Any, expected: Tuple[Optional[int], ...], what: str) -> None:
  shape = np.shape(x)
  if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
    pretty = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
    raise ValueError(f"{name} must have shape {what} = {pretty}, got {tuple(shape)}.")


def dims(batched: bool, *names: str) -> str:
  """The `what` of `check_shapes`: e.g. "[N, K]", or "[U, N, K]" for the batched form (a leading users axis)."""
  return "[" + ", ".join((("U",) if batched else ()) + names) + "]"


def check_labels(prefs: Any, mask: Any, name: str = "prefs") -> None:
  """Concrete values only: a finite label outside [0, 1] on a row that counts (mask > 0) raises ValueError.

  -1 / +1 labels are a caller's convention error, not a bad data point, so they are refused, naming the first.
  NaN labels are non-finite rows, refused (`fit_lambda`) or isolated (`fit_lambda_batched`) like NaN features.
  """
  if is_tracer(prefs) or is_tracer(mask):
    return
  p = np.asarray(prefs)
  counts = np.ones(p.shape, bool) if mask is None else np.asarray(mask) > 0
  bad = np.argwhere(counts & np.isfinite(p) & ((p < 0) | (p > 1)))
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    raise ValueError(f"{name}{list(index)} = {float(p[index])}: expected a label in [0, 1] (1: the first response "
                     f"preferred, 0: the second, 0.5: a tie) on every row the mask counts; {len(bad)} such "
                     f"row{'s' if len(bad) > 1 else ''} in total.")


def float_dtype(*xs: Any) -> Any:
  """The computation dtype: float32, or float64 when an input is float64 and x64 is enabled."""
  # From the dtypes alone: converting the arrays would cast them (and warn on float32 overflow) before the checks.
  dtype = jax.dtypes.canonicalize_dtype(
      np.result_type(*[x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype for x in xs if x is not None]))
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.float32
  return jnp.promote_types(dtype, jnp.float32)
