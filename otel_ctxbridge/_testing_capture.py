"""Span and log captures for tests: what :mod:`otel_ctxbridge.testing`'s fixtures return.

:class:`SpanCapture` records the spans the global SDK ``TracerProvider`` finishes while it is
active; :class:`LogCapture` records stdlib log records (through
:class:`~otel_ctxbridge.ContextLogFilter`) and the OTel log records of the global SDK
``LoggerProvider``. Each provider gets one recorder, added once and pointed at the capture
active now. Import them from :mod:`otel_ctxbridge.testing`.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import ReadWriteLogRecord

    from .bridge import ContextBridge

__all__ = ["LogCapture", "SpanCapture"]


# -- spans -------------------------------------------------------------------------------------


class _SpanRecorder(SpanProcessor):
    """Added once to an SDK provider; forwards to the capture active now, if any."""

    def __init__(self, stamps: bool) -> None:
        self.capture: SpanCapture | None = None
        self.stamps = stamps  # True on a provider this plugin made: also add the fields

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        capture = self.capture
        if capture is not None and self.stamps:
            capture._processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        capture = self.capture
        if capture is not None:
            capture._spans.append(span)


_recorders: weakref.WeakKeyDictionary[TracerProvider, _SpanRecorder] = weakref.WeakKeyDictionary()


class SpanCapture:
    """The spans finished while the capture is active, and the bridge's fields on them."""

    def __init__(self, bridge: ContextBridge) -> None:
        from .spans import ContextSpanProcessor  # noqa: PLC0415 - the plugin loads lazily

        self.bridge = bridge
        self._processor = ContextSpanProcessor(bridge)
        self._spans: list[ReadableSpan] = []
        self._recorder: _SpanRecorder | None = None
        self.tracer_provider: TracerProvider | None = None
        """The SDK provider recorded from (global unless another API provider was set)."""

    def start(self) -> SpanCapture:
        """Start recording the global SDK provider's spans (installing one when none is set).

        Raises:
            RuntimeError: the global provider is not the SDK's (an API-only or vendor
                provider set earlier): its spans cannot be recorded, and OTel refuses to
                replace it, so a capture would stay empty without saying why."""
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            if not isinstance(provider, trace.ProxyTracerProvider):
                raise RuntimeError(
                    f"otel_ctxbridge: the global TracerProvider is a {type(provider).__name__}, "
                    "not the OTel SDK's: span capture needs an SDK TracerProvider"
                )
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        recorder = _recorders.get(provider)
        if recorder is None:
            recorder = _SpanRecorder(stamps=not _has_context_processor(provider))
            provider.add_span_processor(recorder)
            _recorders[provider] = recorder
        recorder.capture = self
        self._recorder = recorder
        self.tracer_provider = provider
        return self

    def stop(self) -> None:
        """Stop recording; the captured spans stay readable."""
        if self._recorder is not None and self._recorder.capture is self:
            self._recorder.capture = None
        self._recorder = None

    @property
    def spans(self) -> list[ReadableSpan]:
        """The finished spans, in the order they ended."""
        return list(self._spans)

    def span(self, name: str) -> ReadableSpan:
        """The last finished span called ``name``; fails the test when there is none."""
        for span in reversed(self._spans):
            if span.name == name:
                return span
        raise AssertionError(f"no finished span named {name!r}: {[s.name for s in self._spans]}")

    def fields(self, span: ReadableSpan) -> dict[str, Any]:
        """The declared fields on ``span`` by field name (as shown: redacted when declared)."""
        attributes = span.attributes or {}
        out: dict[str, Any] = {}
        for name, field in self.bridge.fields.items():
            if field.attribute in attributes:
                out[name] = attributes[str(field.attribute)]
        return out

    def clear(self) -> None:
        """Forget the spans captured so far."""
        self._spans.clear()


def _has_context_processor(provider: TracerProvider) -> bool:
    from .spans import ContextSpanProcessor  # noqa: PLC0415 - the plugin loads lazily

    active = getattr(provider, "_active_span_processor", None)
    processors = getattr(active, "_span_processors", ())
    return any(isinstance(p, ContextSpanProcessor) for p in processors)


# -- logs --------------------------------------------------------------------------------------


class _Handler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.NOTSET)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LogCapture:
    """Stdlib log records (with the fields set by ``ContextLogFilter``) and OTel log records
    emitted while the capture is active."""

    def __init__(self, bridge: ContextBridge) -> None:
        from .logs import ContextLogFilter  # noqa: PLC0415 - the plugin loads lazily

        self.bridge = bridge
        self.records: list[logging.LogRecord] = []
        """The stdlib log records that reached the root logger."""
        self.otel_records: list[ReadWriteLogRecord] = []
        """The OTel log records emitted by the global SDK LoggerProvider, if there is one."""
        self._handler = _Handler(self.records)
        self._handler.addFilter(ContextLogFilter(bridge))
        self._levels: list[tuple[logging.Logger, int]] = []
        self._otel: _LogRecorder | None = None

    def start(self) -> LogCapture:
        """Attach the handler to the root logger and the recorder to the OTel provider."""
        logging.getLogger().addHandler(self._handler)
        from opentelemetry._logs import get_logger_provider  # noqa: PLC0415 - lazily

        provider = get_logger_provider()
        add = getattr(provider, "add_log_record_processor", None)
        if add is not None:
            recorder = _log_recorders.get(provider)
            if recorder is None:
                recorder = _LogRecorder()
                add(recorder)
                _log_recorders[provider] = recorder
            recorder.capture = self
            self._otel = recorder
        return self

    def stop(self) -> None:
        """Detach from the loggers and restore the levels changed by :meth:`set_level`."""
        logging.getLogger().removeHandler(self._handler)
        for logger, level in reversed(self._levels):
            logger.setLevel(level)
        self._levels.clear()
        if self._otel is not None and self._otel.capture is self:
            self._otel.capture = None
        self._otel = None

    def set_level(self, level: int | str, logger: str | None = None) -> None:
        """Set a logger's level (root by default) until the end of the test."""
        target = logging.getLogger(logger)
        self._levels.append((target, target.level))
        target.setLevel(level)

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The declared fields and ``trace_id``/``span_id`` of ``record``, by field name."""
        out = {
            name: getattr(record, str(field.log_key), None)
            for name, field in self.bridge.fields.items()
        }
        out["trace_id"] = getattr(record, "trace_id", None)
        out["span_id"] = getattr(record, "span_id", None)
        return out

    def messages(self) -> list[str]:
        """The formatted messages of the captured stdlib records."""
        return [r.getMessage() for r in self.records]

    def clear(self) -> None:
        """Forget the records captured so far."""
        self.records.clear()
        self.otel_records.clear()


class _LogRecorder:
    """Added once to an SDK LoggerProvider; forwards to the active capture, if any."""

    def __init__(self) -> None:
        self.capture: LogCapture | None = None

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        capture = self.capture
        if capture is not None:
            capture.otel_records.append(log_record)

    def enabled(self, **_: Any) -> bool:
        return True

    def shutdown(self) -> None:
        self.capture = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_log_recorders: weakref.WeakKeyDictionary[object, _LogRecorder] = weakref.WeakKeyDictionary()
