"""The rule for tests that need a service of this machine (PostgreSQL, RabbitMQ, the collector)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
"""True under CI (``CI=true``), where a missing service fails the run instead of skipping."""


def unavailable(message: str) -> NoReturn:
    """A service the test needs is missing: fail under CI, skip elsewhere, saying why."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def running_demo_stack(workdir: Path, env: Mapping[str, str] | None = None) -> Iterator[Any]:
    """``examples/demo_stack.Stack`` started: the rotel collector, its sink and both example
    services; stopped on exit. A collector that cannot start is :func:`unavailable`."""
    from otel_ctxbridge.collector import CollectorStartError

    sys.path.insert(0, str(_EXAMPLES))
    try:
        import demo_stack
    finally:
        sys.path.remove(str(_EXAMPLES))
    stack = demo_stack.Stack(workdir, env=env)
    try:
        stack.__enter__()
    except CollectorStartError as exc:
        unavailable(f"the rotel collector cannot start: {exc}")
    try:
        yield stack
    finally:
        stack.stop()
