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


def check_finite(config: Any, prefix: str = "config") -> None:
  """Raises ValueError naming the first float field of a (nested) ConfigDict that is NaN or infinite."""
  items = config.items() if hasattr(config, "items") else []
  for name, value in items:
    field = f"{prefix}.{name}"
    if hasattr(value, "items"):
      check_finite(value, field)
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{field}={value!r} is invalid: expected a finite number.")
