"""configure(): tracer and logger providers, the bridge's processors, logging bridge, OTLP export.

::

    telemetry = cb.configure(bridge, service_name="orders", endpoint="http://collector:4318")
    ...
    telemetry.shutdown()        # at exit: in the ASGI lifespan's shutdown, say

The SDK flushes at interpreter exit (``atexit``), which SIGTERM skips; ``configure()`` therefore
also shuts down on SIGTERM, when nothing else handles it (``flush_on_sigterm``). Where a
server resets signal handlers in its worker processes (gunicorn with ``--preload``), call
``telemetry.shutdown()`` from the application's lifespan shutdown.

``configure()`` runs once per process: OpenTelemetry lets the global providers be set once,
so a second call raises :class:`~otel_ctxbridge.AlreadyConfiguredError`, also after
``shutdown()``.

Arguments win over ``OTEL_*`` variables, as in the OTel SDK; leave one as None to let the
environment decide: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the per-signal ``..._TRACES_/_LOGS_``
variants), ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``
default, or ``grpc``), ``OTEL_EXPORTER_OTLP_TIMEOUT`` (seconds), ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_EXPORTER`` / ``OTEL_LOGS_EXPORTER`` (``otlp``,
``console``, ``none``), ``OTEL_PROPAGATORS``, and the SDK's own ``OTEL_BSP_*``/``OTEL_BLRP_*``
and sampler variables. Export runs in background threads with a short timeout (2 s by
default), so an absent collector never blocks nor breaks the app, and shutdown returns in
bounded time.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import _logs, propagate, trace
from opentelemetry._logs._internal import ProxyLoggerProvider  # public API lacks the name
from opentelemetry.sdk._logs import LoggerProvider, LogRecordProcessor
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from . import _sigterm
from ._background import BackgroundCall, wait_all
from ._otlp_export import (
    DEFAULT_EXPORT_TIMEOUT as DEFAULT_EXPORT_TIMEOUT,  # noqa: PLC0414 - explicit re-export (mypy)
)
from ._otlp_export import _Export
from .bridge import ContextBridge
from .errors import AlreadyConfiguredError
from .logs import ContextLogRecordProcessor, OTelLoggingBridge
from .propagation import default_propagator
from .spans import ContextSpanProcessor

__all__ = ["Telemetry", "active_telemetry", "configure"]

_logger = logging.getLogger("otel_ctxbridge")
_lock = threading.Lock()
_active: Telemetry | None = None
_first_caller: tuple[str, int, str] | None = None
"""Where the active configuration's configure() was called from (for an error message)."""
_installed: weakref.WeakSet[TracerProvider] = weakref.WeakSet()  # by configure(), ever
_SIGTERM_WAIT = 8.0
"""Seconds a SIGTERM waits for the flush (``shutdown()`` returns within about 5)."""


class Telemetry:
    """What :func:`configure` installed; ``shutdown()`` flushes and uninstalls it."""

    def __init__(
        self,
        bridge: ContextBridge,
        tracer_provider: TracerProvider,
        logger_provider: LoggerProvider,
        handler: logging.Handler | None,
    ) -> None:
        self.bridge = bridge
        self.tracer_provider = tracer_provider
        self.logger_provider = logger_provider
        self.logging_handler = handler
        """The handler on the root logger that turns stdlib records into OTel log records."""
        self._closed = False
        self.flushes_on_sigterm = False
        """True when ``configure()`` installed the SIGTERM handler that shuts this down."""
        self._flush_lock = threading.Lock()
        self._flushes: list[BackgroundCall | None] = [None, None]  # tracer's, logger's

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        """Export what is buffered now, spans and logs together; False when it did not
        complete within about ``timeout_millis`` (the SDK's batch processors export on the
        caller's thread and do not heed the timeout themselves: an export that hangs goes on
        in the background, and this returns at the deadline)."""
        deadline = time.monotonic() + timeout_millis / 1000.0
        # At most one flush in flight per provider: a call that finds the last one still
        # exporting waits for it, then flushes anew, instead of queueing one more thread
        # behind the SDK's export lock at every call during an outage.
        with self._flush_lock:
            previous = [c for c in self._flushes if c is not None and c.running]
        wait_all(previous, deadline)
        flushers = (self.tracer_provider.force_flush, self.logger_provider.force_flush)
        with self._flush_lock:
            for index, flusher in enumerate(flushers):
                flush = self._flushes[index]
                if flush is None or not flush.running:
                    flush = BackgroundCall(functools.partial(flusher, timeout_millis))
                    self._flushes[index] = flush.start()
            calls = [c for c in self._flushes if c is not None]
        return wait_all(calls, deadline)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flush and stop both providers (in parallel; returns within about ``timeout``
        seconds even when the collector does not answer) and remove the logging handler.
        Idempotent. The global providers stay set (OTel sets them once per process), so
        ``configure()`` cannot run again in this process."""
        global _active  # noqa: PLW0603 - the one installed configuration
        with _lock:
            if self._closed:
                return
            self._closed = True
            if _active is self:
                _active = None
        if self.flushes_on_sigterm:
            _sigterm.remove()
        if self.logging_handler is not None:
            logging.getLogger().removeHandler(self.logging_handler)
        shutdowns = (self.tracer_provider.shutdown, self.logger_provider.shutdown)
        calls = [BackgroundCall(shutdown).start() for shutdown in shutdowns]
        wait_all(calls, time.monotonic() + timeout)

    @property
    def closed(self) -> bool:
        """True after :meth:`shutdown`."""
        return self._closed

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def active_telemetry() -> Telemetry | None:
    """The configuration installed by :func:`configure` and not yet shut down, if any."""
    return _active


def configure(
    bridge: ContextBridge,
    service_name: str | None = None,
    endpoint: str | None = None,
    *,
    protocol: str | None = None,
    headers: Mapping[str, str] | None = None,
    resource_attributes: Mapping[str, Any] | None = None,
    export_timeout: float | None = None,
    otlp: bool = True,
    span_processors: Sequence[SpanProcessor] = (),
    span_exporters: Sequence[SpanExporter] = (),
    log_processors: Sequence[LogRecordProcessor] = (),
    log_exporters: Sequence[LogRecordExporter] = (),
    log_level: int | str = logging.NOTSET,
    bridge_logging: bool = True,
    set_propagator: bool = True,
    flush_on_sigterm: bool = True,
) -> Telemetry:
    """Install global tracer and logger providers carrying the bridge's fields, exporting OTLP.

    Args:
        bridge: the field registry whose processors are installed.
        service_name: ``service.name`` of the resource (else ``OTEL_SERVICE_NAME``).
        endpoint: the collector's base URL, like ``OTEL_EXPORTER_OTLP_ENDPOINT``
            (``/v1/traces`` and ``/v1/logs`` are appended for http/protobuf).
        protocol: ``"http/protobuf"`` (default) or ``"grpc"``.
        headers: headers for every export request (else ``OTEL_EXPORTER_OTLP_HEADERS``).
        resource_attributes: more resource attributes (merged over ``OTEL_RESOURCE_ATTRIBUTES``).
        export_timeout: seconds an export may take with retries (default 2, or the variable).
        otlp: False exports nothing over OTLP (extra exporters only).
        span_processors, log_processors: extra processors, added as given.
        span_exporters, log_exporters: extra exporters, each behind a batch processor.
        log_level: level of the handler bridging stdlib logging (root logger) to OTel logs.
        bridge_logging: False leaves stdlib logging alone.
        flush_on_sigterm: on SIGTERM (how Kubernetes, Docker and systemd stop a service; it
            ends the process without running the SDK's ``atexit`` flush, also after uvicorn's
            graceful shutdown), run :meth:`Telemetry.shutdown` before the process ends.
            Installed from the main thread only, and only when nothing else handles SIGTERM.
        set_propagator: install :func:`default_propagator` as the global textmap (skipped
            when ``OTEL_PROPAGATORS`` is set).

    Raises:
        AlreadyConfiguredError: an earlier ``configure()`` is still active, or global OTel
            providers were already set (OTel allows them to be set once per process).
    """
    global _active, _first_caller  # noqa: PLW0603 - the one installed configuration
    caller = _caller()
    with _lock:
        if _active is not None:
            raise AlreadyConfiguredError(
                "otel_ctxbridge.configure() was already called: it runs once per process "
                "(OpenTelemetry's global providers can be set once, shutdown() does not undo "
                "that); use the Telemetry handle the first call returned"
                + _twice_hint(_first_caller, caller)
            )
        _refuse_foreign_providers()
        resource = _resource(service_name, resource_attributes)
        export = _Export(otlp, endpoint, protocol, headers, export_timeout)
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(ContextSpanProcessor(bridge))
        for span_processor in span_processors:
            tracer_provider.add_span_processor(span_processor)
        for span_exporter in [
            *span_exporters,
            *export.exporters("traces"),
        ]:
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        logger_provider = LoggerProvider(resource=resource)
        logger_provider.add_log_record_processor(ContextLogRecordProcessor(bridge))
        for log_processor in log_processors:
            logger_provider.add_log_record_processor(log_processor)
        for log_exporter in [
            *log_exporters,
            *export.exporters("logs"),
        ]:
            logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
        trace.set_tracer_provider(tracer_provider)
        _logs.set_logger_provider(logger_provider)
        _installed.add(tracer_provider)
        handler = OTelLoggingBridge(bridge, logger_provider, log_level) if bridge_logging else None
        if handler is not None:
            logging.getLogger().addHandler(handler)
        if set_propagator and not os.environ.get("OTEL_PROPAGATORS"):
            propagate.set_global_textmap(default_propagator())
        _active = telemetry = Telemetry(bridge, tracer_provider, logger_provider, handler)
        _first_caller = caller
    if flush_on_sigterm:
        telemetry.flushes_on_sigterm = _sigterm.install(telemetry.shutdown, _SIGTERM_WAIT)
    return telemetry


def _caller() -> tuple[str, int, str]:
    """(file, line, module name) of the code calling :func:`configure`."""
    try:
        frame = sys._getframe(2)  # the caller of configure(), for an error message only
    except ValueError:  # called from C, with no Python frame there
        return "?", 0, "?"
    return frame.f_code.co_filename, frame.f_lineno, str(frame.f_globals.get("__name__"))


def _twice_hint(first: tuple[str, int, str] | None, now: tuple[str, int, str]) -> str:
    """Why a second call came from where the first did, when it did."""
    if first is None or first[:2] != now[:2]:
        return ""
    if first[2] != now[2]:
        return (
            f". Both calls come from {now[0]}:{now[1]}, run as module {first[2]!r} and again "
            f"as {now[2]!r}: the file was executed twice (run as a script and imported by "
            "name, e.g. by dictConfig's ext:// or uvicorn's 'module:app'), which also makes "
            "two bridges. Keep the bridge and configure() in a module that is only imported"
        )
    return f". Both calls come from {now[0]}:{now[1]}: call configure() once, at startup"


def _refuse_foreign_providers() -> None:
    provider = trace.get_tracer_provider()
    if provider in _installed:
        raise AlreadyConfiguredError(
            "a global TracerProvider is already set by an earlier configure() that was shut "
            "down; OTel sets the global providers once per process, so configure() runs once"
        )
    if not isinstance(provider, trace.ProxyTracerProvider):
        raise AlreadyConfiguredError(
            "a global TracerProvider is already set (OTel allows one per process; "
            "opentelemetry-instrument sets one): add otel_ctxbridge.ContextSpanProcessor(bridge) "
            "to it, and ContextLogRecordProcessor(bridge) to the LoggerProvider, instead of "
            "calling configure()"
        )
    if not isinstance(_logs.get_logger_provider(), ProxyLoggerProvider):
        raise AlreadyConfiguredError(
            "a global LoggerProvider is already set (OTel allows one per process); add "
            "otel_ctxbridge.ContextLogRecordProcessor(bridge) to it instead of calling configure()"
        )


def _resource(service_name: str | None, attributes: Mapping[str, Any] | None) -> Resource:
    extra: dict[str, Any] = dict(attributes or {})
    if service_name is not None:
        extra[SERVICE_NAME] = service_name
    return Resource.create(extra)  # merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
