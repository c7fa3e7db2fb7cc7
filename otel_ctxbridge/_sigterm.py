"""Flushing telemetry when the process is asked to stop with SIGTERM.

Kubernetes, Docker and systemd stop a service with SIGTERM, whose default action ends the
process without running ``atexit`` hooks, where the SDK flushes its batch processors. uvicorn
(and gunicorn's uvicorn worker) shut down gracefully on SIGTERM, put back the handler they
found and raise the signal again, so the process still ends by the default action: the spans
and logs buffered in its last seconds were lost on every deploy. :func:`install` puts, over the
default disposition only (never over an application's own handler), a handler that runs the
flush (bounded: in a thread, waited for at most ``timeout`` seconds) and then ends the process
by the default action, as it would have ended without it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

_installed: Callable[[int, FrameType | None], None] | None = None


def install(flush: Callable[[], None], timeout: float) -> bool:
    """Run ``flush`` (at most ``timeout`` seconds) when SIGTERM arrives, then end the process
    as the default action does. Only from the main thread and only over the default
    disposition; returns True when the handler was installed."""
    global _installed  # noqa: PLW0603 - one handler per process
    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is None or threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(sigterm)
    ours = _installed is not None and current is _installed  # left by a shutdown elsewhere
    if current is not signal.SIG_DFL and not ours:
        return False  # the application (or its server) handles SIGTERM itself

    def flush_then_terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        # In a thread: the interrupted main thread may hold a lock the flush needs.
        worker = threading.Thread(target=flush, name="otel_ctxbridge-sigterm", daemon=True)
        worker.start()
        worker.join(timeout)
        signal.raise_signal(signum)

    signal.signal(sigterm, flush_then_terminate)
    _installed = flush_then_terminate
    return True


def remove() -> None:
    """Put the default disposition back if this module's handler is still the one installed.
    Only the main thread can: called elsewhere, the handler stays (it finds nothing left to
    flush) until a later :func:`remove` from the main thread, or :func:`install` replaces it."""
    global _installed  # noqa: PLW0603 - one handler per process
    if _installed is None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _installed:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _installed = None
