"""Host-side validation of user mixing vectors (lambda).

`check_lam` is called by every public souping entry point. Its shape checks use only static shape information, so
they also run (at trace time) inside `jax.jit` / `jax.vmap`. Its value checks (NaN / Inf) need the concrete numbers:
they run when `lam` is a concrete array and are skipped silently when `lam` is a tracer, so the check never breaks
a jitted function and never forces a device-to-host copy inside one.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _format_index(index: tuple[int, ...]) -> str:
  return "[" + ", ".join(str(int(i)) for i in index) + "]"


def check_lam(lam: Any, num_bases: int, *, name: str = "lam", allow_batch: bool = True) -> None:
  """Validates a mixing vector (or a batch of them) against the number of bases.

  Args:
    lam: `[K]`, or `[B, K]` (one row per user / batch row) when `allow_batch`. Any real array-like; a jax tracer
      gets only the shape checks.
    num_bases: K, the number of basis policies (size of the leading `basis` axis).
    name: how `lam` is called in error messages.
    allow_batch: whether a leading batch axis is allowed.

  Raises:
    ValueError: wrong rank, last dimension != K, non-real dtype, or a NaN / Inf entry (concrete arrays only), with a
      message naming the offending entry, e.g. "lam has 3 weights but there are 4 bases" or "lam[2, 1] is NaN".
  """
  expected = "[K] or [B, K]" if allow_batch else "[K]"
  try:
    shape = np.shape(lam)
  except ValueError:  # Ragged rows: numpy's "setting an array element with a sequence".
    raise ValueError(f"{name} must be a rectangular array of shape {expected} with K={num_bases}, got rows of "
                     "different lengths.") from None
  max_ndim = 2 if allow_batch else 1
  if not 1 <= len(shape) <= max_ndim:
    raise ValueError(
        f"{name} must have shape {expected} with K={num_bases} (the number of bases), got shape {tuple(shape)}.")
  if shape[-1] != num_bases:
    raise ValueError(f"{name} has {shape[-1]} weights but there are {num_bases} bases "
                     f"({name} shape {tuple(shape)}, expected {expected} with K={num_bases}).")
  if _is_tracer(lam):
    return
  values = np.asarray(lam)
  if values.dtype == np.bool_ or not (np.issubdtype(values.dtype, np.integer) or
                                      np.issubdtype(values.dtype, np.floating) or values.dtype.kind == "V"):
    # kind "V" covers ml_dtypes such as bfloat16, which numpy does not class as floating.
    raise ValueError(f"{name} must hold real numbers, got dtype {values.dtype}.")
  values = values.astype(np.float64)
  bad = np.argwhere(~np.isfinite(values))
  if bad.size:
    index = tuple(bad[0])
    value = values[index]
    what = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    raise ValueError(f"{name}{_format_index(index)} is {what}; mixing weights must be finite "
                     f"({len(bad)} non-finite entr{'y' if len(bad) == 1 else 'ies'} in total).")
  check_weight_range(values, name)


# Mixing weights beyond this magnitude overflow the soups' float32 log-probs (a weight times a masked logit of
# -1e30, or times log-probs of -1e2 summed over K bases, must stay below float32's 3.4e38), so they are refused.
MAX_ABS_WEIGHT = 1e6


def check_weight_range(values: Any, name: str = "lam") -> None:
  """ValueError naming the first entry of `values` (finite numbers) beyond +-MAX_ABS_WEIGHT."""
  values = np.asarray(values, np.float64)
  big = np.argwhere(np.abs(values) > MAX_ABS_WEIGHT)
  if big.size:
    index = tuple(big[0])
    value = f"{values[index]:g}"
    if abs(float(value)) <= MAX_ABS_WEIGHT:  # %g rounded it onto the bound (1e6 + 1 -> 1e+06): all its digits.
      value = repr(float(values[index]))
    raise ValueError(f"{name}{_format_index(index)} = {value}: mixing weights must lie within "
                     f"+-{MAX_ABS_WEIGHT:g} (beyond it the soup's float32 log-probs overflow to NaN).")


def lam_per_row(lam: Any, num_bases: int, batch: int):
  """Validates lam and returns it as float32 [batch, K] (a [K] lam is shared by every row)."""
  check_lam(lam, num_bases, allow_batch=True)
  lam = jnp.asarray(lam, jnp.float32)
  if lam.ndim == 1:
    return jnp.broadcast_to(lam, (batch, num_bases))
  if lam.shape[0] != batch:
    raise ValueError(f"lam has {lam.shape[0]} rows but the batch has {batch} rows (lam shape {lam.shape}).")
  return lam


def check_token_ids(name: str, ids: Any, mask: Any, vocab_size: int) -> None:
  """Raises ValueError if a real token (mask True) of concrete `ids` is outside [0, vocab_size); tracers pass.

  An id past the embedding table is silently clamped or read as garbage inside jit (NaN log-probs, token 0), so
  it is refused here, naming the first offending position. Shapes are checked for tracers too: ids `[B, T]` and a
  mask of the same shape.
  """
  if np.ndim(ids) != 2 or np.shape(mask) != np.shape(ids):
    raise ValueError(f"{name} must be int[B, T] with a {name}_mask of the same shape; got {tuple(np.shape(ids))} and "
                     f"{tuple(np.shape(mask))}.")
  if _is_tracer(ids) or _is_tracer(mask):
    return
  check_mask(f"{name}_mask", mask)
  ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}.")
  bad = np.argwhere(mask & ((ids < 0) | (ids >= vocab_size)))
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    raise ValueError(f"{name}{_format_index(index)} = {int(ids[index])} is not a token id of this model: expected "
                     f"0 <= id < vocab_size={vocab_size} ({len(bad)} such position{'s' if len(bad) > 1 else ''}).")


def check_mask(name: str, mask: Any) -> None:
  """Raises ValueError unless the concrete `mask` holds bools, or numbers that are all 0 or 1 (tracers pass): cast to
  bool, a -1 or NaN marking padding would count as a real token."""
  if _is_tracer(mask):
    return
  values = np.asarray(mask)
  if values.dtype == np.bool_:
    return
  if values.dtype.kind not in "iuf":
    raise ValueError(f"{name} must hold bools (True: a real token), got dtype {values.dtype}.")
  bad = np.argwhere((values != 0) & (values != 1))  # NaN compares unequal to both.
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    raise ValueError(f"{name}{_format_index(index)} is {values[index].item()!r}: expected bools, or 0 / 1 (True / 1: a "
                     f"real token, False / 0: padding); {len(bad)} such entr{'y' if len(bad) == 1 else 'ies'}.")


def check_key(key: Any, name: str = "key") -> None:
  """Raises ValueError unless `key` is one PRNG key: a typed key (`jax.random.key`) or a raw uint32 one
  (`jax.random.PRNGKey`); tracers pass. An int seed would otherwise fail deep inside jax.random."""
  if _is_tracer(key):
    return
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape:
      raise ValueError(f"{name} must be one PRNG key, got an array of {key.shape} keys (split it, or pass one).")
    return
  if np.ndim(key) == 1 and np.asarray(key).dtype == np.uint32:
    # The default implementation's raw key length (threefry: 2 words); another length fails deep inside jax.random.
    size = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape[-1]
    if np.shape(key)[0] != size:
      raise ValueError(f"{name} is a raw uint32 key of {np.shape(key)[0]} words: expected {size} (jax.random.PRNGKey"
                       f"(seed)), or a typed key (jax.random.key(seed)).")
    return
  raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got "
                   f"{type(key).__name__} {key!r}"[:200] + ".")


def check_token_id(name: str, value: Any, vocab_size: int, *, allow_none: bool = False) -> Optional[int]:
  """`value` as a Python int; ValueError naming `name` unless it is a token id of the model, 0 <= id < vocab_size
  (or None, with `allow_none`). A float or out-of-vocabulary end-of-sequence id never matches a token."""
  if value is None and allow_none:
    return None
  return check_int(name, value, 0, vocab_size - 1)


def is_real(x: Any) -> bool:
  """Whether `x` is one real number (Python or NumPy int / float; not a bool, string or array)."""
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
  """`value` as a Python int; ValueError naming `name` unless it is an integer (not a bool) in [minimum, maximum]."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or
      (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
    if minimum is not None and maximum is not None:
      expected = f"an integer in [{minimum}, {maximum}]"
    else:
      expected = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (f" <= {maximum}"
                                                                                     if maximum is not None else "")
    raise ValueError(f"{name}={value!r}: expected {expected}.")
  return int(value)


def check_seed(name: str, value: Any) -> int:
  """A PRNG seed: an integer that `jax.random.key` takes (64-bit signed)."""
  return check_int(name, value, -2**63, 2**63 - 1)


def check_length(total: int, max_len: int, what: str, fix: str = "shorten the input or generate fewer tokens") -> None:
  """Raises ValueError when a sequence of `total` positions exceeds the model's `max_len` (any position scheme:
  a learned table has no rows past it, and rotary models are not trained past it); the message ends with `fix`."""
  if total > max_len:
    raise ValueError(f"{what} = {total} positions exceed the model's max_len={max_len}; {fix}.")
