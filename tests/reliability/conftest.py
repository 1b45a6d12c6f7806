"""Fixtures of the reliability suite (defined in harness.py)."""

from tests.reliability.harness import reference  # noqa: F401  pylint: disable=unused-import
from tests.reliability.harness import trainer  # noqa: F401  pylint: disable=unused-import
