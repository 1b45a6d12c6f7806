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


def check_finite(config: Any, prefix: str = "config") -> None:
  """Raises ValueError naming the first float field of a (nested) ConfigDict that is NaN or infinite."""
  items = config.items() if hasattr(config, "items") else []
  for name, value in items:
    field = f"{prefix}.{name}"
    if hasattr(value, "items"):
      check_finite(value, field)
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{field}={value!r} is invalid: expected a finite number.")
