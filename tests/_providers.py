"""Configuring afresh in one process: OpenTelemetry sets its global providers once, and
``configure()`` refuses to run over them, so tests that call it reset them around each test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace

from otel_ctxbridge import _sigterm
from otel_ctxbridge.sdk import active_telemetry


def reset_providers() -> None:
    """Unset the global providers (OTel sets them once per process). The logger provider
    lives in ``opentelemetry._logs._internal``, not in the ``_logs`` package."""
    from opentelemetry._logs import _internal as logs_internal
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    logs_internal._LOGGER_PROVIDER_SET_ONCE = Once()
    logs_internal._LOGGER_PROVIDER = None


@contextmanager
def unconfigured() -> Iterator[None]:
    """No providers set before the block; what ``configure()`` installed in it is shut down
    (its SIGTERM handler removed) and the providers unset after it."""
    reset_providers()
    try:
        yield
    finally:
        telemetry = active_telemetry()
        if telemetry is not None:
            telemetry.shutdown()
        _sigterm.remove()  # a shutdown() from another thread could not (signals: main thread)
        reset_providers()
