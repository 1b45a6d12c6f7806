"""Logging helpers shared by the entry points."""

from __future__ import annotations

import logging as std_logging

from absl import logging


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's per-save INFO chatter (its warnings and errors still show)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def quiet_orbax() -> None:
  """Installs the filter on absl's logger (idempotent)."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())
