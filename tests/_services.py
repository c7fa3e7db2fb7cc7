"""The rule for tests that need a service of this machine (PostgreSQL, RabbitMQ, the collector)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
"""True under CI (``CI=true``), where a missing service fails the run instead of skipping."""


def unavailable(message: str) -> NoReturn:
    """A service the test needs is missing: fail under CI, skip elsewhere, saying why."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)
