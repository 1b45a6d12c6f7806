"""Fail-fast config checks whose messages name the field, its value and what was expected."""

from __future__ import annotations

import math
from typing import Any, Callable


def field_checker(config: Any) -> Callable[[Any, str, str], None]:
  """Returns need(cond, "a.b", expected): raises ValueError("config.a.b=<value> is invalid: expected ...")."""

  def need(cond: Any, field: str, expected: str) -> None:
    if not cond:
      value = config
      for part in field.split("."):
        value = value[part]
      raise ValueError(f"config.{field}={value!r} is invalid: expected {expected}.")

  return need


def is_numbers(value: Any, integers: bool = False) -> bool:
  """Whether `value` is a tuple or list of finite real numbers (integers only with `integers`; never bools).

  A tuple field overridden on the command line with a value that is not a Python literal (`(0.5,nan)`) arrives as a
  string: this is False for it, so the check names the field instead of failing on the string's characters.
  """
  kinds = (int,) if integers else (int, float)
  return isinstance(value, (tuple, list)) and all(
      isinstance(x, kinds) and not isinstance(x, bool) and math.isfinite(x) for x in value)


# The largest integer a config field may hold: counts and sizes become array dimensions, int32 indices and loop
# bounds (10**30 failed deep inside jax or numpy with a traceback that named no field); seeds are 64-bit.
MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1


def check_finite(config: Any, prefix: str = "config") -> None:
  """Raises ValueError naming the first field of a (nested) ConfigDict that is a NaN or infinite float, or an
  integer beyond `MAX_INT` in size (`MAX_SEED` for a field named *seed)."""
  items = config.items() if hasattr(config, "items") else []
  for name, value in items:
    field = f"{prefix}.{name}"
    if hasattr(value, "items"):
      check_finite(value, field)
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{field}={value!r} is invalid: expected a finite number.")
    elif isinstance(value, int) and not isinstance(value, bool):
      if name.endswith("seed") and abs(value) > MAX_SEED:
        raise ValueError(f"{field}={value!r} is invalid: expected an integer in [0, 2**63 - 1] (a 64-bit seed).")
      if not name.endswith("seed") and abs(value) > MAX_INT:
        raise ValueError(f"{field}={value!r} is invalid: expected an integer of at most 2**31 - 1 in size (counts "
                         "and sizes are 32-bit).")
