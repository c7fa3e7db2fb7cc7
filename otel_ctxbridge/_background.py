"""Calls that must not hold their caller past a deadline: flushing and shutting down the
providers, whose exports may hang on a collector that accepts connections and never answers
(the SDK's batch processors export on the caller's thread and ignore the flush timeout)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

_logger = logging.getLogger("otel_ctxbridge")


class BackgroundCall:
    """``fn()`` on a daemon thread; :attr:`succeeded` once it returned a true value or None
    (``shutdown()`` returns None). An exception is logged at debug level and counts as a
    failure: flushing never raises into the application. Where no thread can start (at
    interpreter exit, or out of threads) it runs on the caller's thread instead."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.succeeded = False

    def start(self) -> BackgroundCall:
        """Start the call; return self."""
        try:
            self._thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown", and others
            self._run()
        return self

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the call to return."""
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """True while the call has not returned."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            outcome = self._fn()
        except Exception:  # a provider that raises: reported as a failure, never raised
            _logger.debug("otel_ctxbridge: error while flushing or shutting down", exc_info=True)
            return
        self.succeeded = outcome is None or bool(outcome)


def wait_all(calls: Sequence[BackgroundCall], deadline: float) -> bool:
    """Wait for ``calls`` together until ``deadline`` (``time.monotonic()``); True when all
    of them returned by then and succeeded."""
    for call in calls:
        if call.running:
            call.join(max(0.0, deadline - time.monotonic()))
    return all(not call.running and call.succeeded for call in calls)
