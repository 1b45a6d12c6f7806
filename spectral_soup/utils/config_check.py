"""Fail-fast config checks whose messages name the field, its value and what was expected."""

from __future__ import annotations

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
