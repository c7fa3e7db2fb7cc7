"""The bridge's fields on log records: a stdlib ``logging.Filter`` and an OTel log processor.

``ContextLogFilter`` sets each declared field's ``log_key`` plus ``trace_id`` / ``span_id`` (hex,
as OTel writes them) on every stdlib record; put it on the *handlers* that format records (a
logger's own filters do not see records propagated from child loggers).

JSON log lines with python-json-logger (``pip install otel_ctxbridge[json]``)::

    import logging.config

    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "ctx": {"()": "otel_ctxbridge.ContextLogFilter", "bridge": "ext://myapp.bridge",
                    "default": None},
        },
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s "
                       "%(request_id)s %(tenant_id)s %(user_id)s %(trace_id)s %(span_id)s",
                "rename_fields": {"levelname": "level", "name": "logger",
                                  "asctime": "timestamp"},
                "timestamp": False,
            },
        },
        "handlers": {
            "stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                       "filters": ["ctx"], "formatter": "json"},
        },
        "root": {"level": "INFO", "handlers": ["stdout"]},
    })

Each line is then one JSON object: ``{"timestamp": ..., "level": "INFO", "logger": "app",
"message": "...", "request_id": "r-1", "tenant_id": "acme", "user_id": null,
"trace_id": "4bf9...", "span_id": "00f0..."}``.

``ContextLogRecordProcessor`` adds the fields as attributes (``app.request_id``) to OTel log
records (the ones ``LoggingHandler`` from ``opentelemetry-instrumentation-logging`` makes of
stdlib records and exports over OTLP); ``configure()`` installs both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.sdk._logs import LogRecordProcessor, ReadWriteLogRecord
from opentelemetry.trace import SpanContext

from . import _runtime as rt
from ._state import MISSING
from .spans import _SCALARS, FieldReader

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["ContextLogFilter", "ContextLogRecordProcessor", "trace_ids"]

TRACE_ID = "trace_id"
SPAN_ID = "span_id"
_last: tuple[SpanContext | None, str, str] = (None, "", "")


def trace_ids(span_context: SpanContext) -> tuple[str, str]:
    """``(trace_id, span_id)`` of a span context in lower-case hex (32 and 16 digits)."""
    global _last  # noqa: PLW0603 - a one-entry cache; a tuple swap is atomic
    last = _last
    if last[0] is span_context:
        return last[1], last[2]
    ids = format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")
    _last = (span_context, ids[0], ids[1])
    return ids


def current_trace_ids(ctx: Context) -> tuple[str, str] | None:
    """The hex ids of the span current in ``ctx``, or None without a valid span."""
    span: Any = ctx.get(rt.SPAN_KEY)
    if span is None:
        return None
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return trace_ids(sc)


class ContextLogFilter(logging.Filter):
    """Sets the declared fields' log keys and ``trace_id``/``span_id`` on every log record.

    Unset fields (and the ids outside a span) get ``default``. A key the record already has
    (an ``extra=`` value) is kept. Always returns True: it annotates, never drops.
    Usable from ``logging.config.dictConfig``:
    ``{"()": "otel_ctxbridge.ContextLogFilter", "bridge": "ext://myapp.bridge"}``.
    """

    def __init__(self, bridge: ContextBridge, default: Any = "-", name: str = "") -> None:
        super().__init__(name)
        self.bridge = bridge
        self.default = default
        self._reader = FieldReader(bridge)
        self._log_keys = tuple(e.log_key for e in self._reader.entries)
        self._keys = frozenset((*self._log_keys, TRACE_ID, SPAN_ID))
        self._defaults = dict.fromkeys(self._keys, default)

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; always True."""
        try:
            ctx = rt.get_current()
            values = self._reader.read(ctx)
            default = self.default
            out = {
                k: default if v is MISSING else v
                for k, v in zip(self._log_keys, values, strict=True)
            }
            ids = current_trace_ids(ctx)
            if ids is None:
                out[TRACE_ID] = out[SPAN_ID] = default
            else:
                out[TRACE_ID], out[SPAN_ID] = ids
            d = record.__dict__
            if self._keys.isdisjoint(d):
                d.update(out)
            else:
                for k, v in out.items():
                    d.setdefault(k, v)
        except Exception as exc:  # logging must never fail because of context
            self._reader.warn_once("filter", "ContextLogFilter failed (%s)", type(exc).__name__)
            for k, v in self._defaults.items():
                record.__dict__.setdefault(k, v)
        return True


class ContextLogRecordProcessor(LogRecordProcessor):
    """Adds the declared fields as attributes to OTel log records, never overwriting one.

    Values come from the record's context (the context current when it was emitted).
    Register it on the SDK ``LoggerProvider`` before the exporting processors.
    """

    def __init__(self, bridge: ContextBridge) -> None:
        self.bridge = bridge
        self._reader = FieldReader(bridge)

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        """Set the fields on ``log_record``'s attributes."""
        try:
            record = log_record.log_record
            ctx = record.context if record.context is not None else rt.get_current()
            values = self._reader.read(ctx)
            attributes: Any = record.attributes
            for entry, value in zip(self._reader.entries, values, strict=True):
                if value is MISSING or not isinstance(value, _SCALARS):
                    continue
                if attributes is None:
                    record.attributes = attributes = {}
                if entry.attribute not in attributes:
                    attributes[entry.attribute] = value
        except Exception as exc:  # telemetry never throws on the logging path
            self._reader.warn_once(
                "on_emit", "ContextLogRecordProcessor failed (%s)", type(exc).__name__
            )

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered: always True."""
        return True
