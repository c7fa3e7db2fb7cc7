"""The bridge's fields on log records: a stdlib ``logging.Filter`` and an OTel log processor.

``ContextLogFilter`` sets each declared field's ``log_key`` plus ``trace_id`` / ``span_id`` (hex,
as OTel writes them) on every stdlib record; put it on the *handlers* that format records (a
logger's own filters do not see records propagated from child loggers).

JSON log lines with python-json-logger (``pip install otel_ctxbridge[json]``), one object a
line with level, message, logger, timestamp, the fields and the trace ids::

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
                "fmt": "%(levelname)s %(name)s %(message)s "
                       "%(request_id)s %(tenant_id)s %(user_id)s %(trace_id)s %(span_id)s",
                "rename_fields": {"levelname": "level", "name": "logger"},
                "timestamp": True,
            },
        },
        "handlers": {
            "stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                       "filters": ["ctx"], "formatter": "json"},
        },
        "loggers": {  # uvicorn's own lines (its CLI gives them text handlers) as JSON too
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
        },
        "root": {"level": "INFO", "handlers": ["stdout"]},
    })

Each line is then one JSON object: ``{"level": "INFO", "logger": "app", "message": "...",
"request_id": "r-1", "tenant_id": "acme", "user_id": null, "trace_id": "4bf9...",
"span_id": "00f0...", "timestamp": "2025-01-01T12:00:00.123456+00:00"}`` (plus any
``extra=`` keys). ``ext://myapp.bridge`` names the module attribute holding your bridge.

``ContextLogRecordProcessor`` adds the fields as attributes (``app.request_id``) to OTel log
records (the ones ``LoggingHandler`` from ``opentelemetry-instrumentation-logging`` makes of
stdlib records and exports over OTLP); ``configure()`` installs it.
"""

from __future__ import annotations

import keyword
import logging
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry.context import Context
from opentelemetry.sdk._logs import LoggerProvider, LogRecordProcessor, ReadWriteLogRecord
from opentelemetry.trace import SpanContext

from . import _runtime as rt
from ._failed import context_for_record
from ._state import CHANGES, MISSING
from .errors import FieldConfigError
from .spans import FieldReader, attributes_of

_get_current = rt.get_current

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = [
    "RESERVED_LOG_KEYS",
    "ContextLogFilter",
    "ContextLogRecordProcessor",
    "OTelLoggingBridge",
    "trace_ids",
]

TRACE_ID = "trace_id"
SPAN_ID = "span_id"
RESERVED_LOG_KEYS = frozenset(
    {*vars(logging.makeLogRecord({})), *dir(logging.LogRecord), "message", "asctime"}
)
"""Names a ``LogRecord`` has already (its attributes and methods, plus the formatter's
``message`` and ``asctime``): no field's ``log_key`` may be one of them."""


def trace_ids(ctx: Context) -> tuple[str, str] | None:
    """``(trace_id, span_id)`` in lower-case hex (32 and 16 digits, as OTel writes them) of
    the span current in ``ctx``; None without a valid span."""
    span: Any = ctx.get(rt.SPAN_KEY)
    if span is None:
        return None
    sc: SpanContext = span.get_span_context()
    if not sc.is_valid:
        return None
    return format(sc.trace_id, "032x"), format(sc.span_id, "016x")


_PLAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # no leading _: never a dunder


def _assigner(keys: tuple[str, ...]) -> Callable[[logging.LogRecord, tuple[Any, ...]], bool]:
    """A function setting ``keys`` on a record to the matching values, unless the record
    has any of them already (an ``extra=`` value, a filter that ran before): then it returns
    False and sets nothing.

    Generated once per filter: plain attribute stores keep CPython on its fastest path, a
    loop of ``setattr`` calls costs three times as much per record. The only configured text
    that enters the source is a key matching ``[A-Za-z][A-Za-z0-9_]*`` (not a keyword),
    written as an attribute name and as a constant; every other key (``app.tenant``, or a
    non-ASCII identifier, which Python would normalise into another name) is passed in as an
    argument of the factory (a closure variable of ``assign``) and set with ``setattr``. For
    the keys ``("request_id", "app.tenant")`` the source is::

        def make(k0, k1):
            def assign(record, values):
                v0, v1, = values
                if hasattr(record, 'request_id') or hasattr(record, k1):
                    return False
                record.request_id = v0
                setattr(record, k1, v1)
                return True
            return assign
    """
    if any(type(key) is not str for key in keys):
        raise TypeError("log keys must be str")
    n = len(keys)
    plain = [_PLAIN_NAME.fullmatch(key) is not None and not keyword.iskeyword(key) for key in keys]
    # a plain key as a constant (no quote nor backslash can be in it), others by variable
    names = [f"'{key}'" if plain[i] else f"k{i}" for i, key in enumerate(keys)]
    lines = [f"def make({', '.join(f'k{i}' for i in range(n))}):"]
    lines.append("    def assign(record, values):")
    lines.append(f"        {', '.join(f'v{i}' for i in range(n))}, = values")
    lines.append(f"        if {' or '.join(f'hasattr(record, {name})' for name in names)}:")
    lines.append("            return False")
    for i, key in enumerate(keys):
        if plain[i]:
            lines.append(f"        record.{key} = v{i}")
        else:
            lines.append(f"        setattr(record, k{i}, v{i})")
    lines.append("        return True")
    lines.append("    return assign")
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), namespace)  # the source is built above from validated parts
    return namespace["make"](*keys)  # type: ignore[no-any-return] # the function defined above


def _share_keys(keys: tuple[str, ...]) -> None:
    """Add ``keys`` to the key-sharing dictionary of ``LogRecord`` instances (PEP 412).

    CPython stores instance attributes compactly while they belong to the class's shared
    keys; a record that gains other attributes pays for a full dict, which is most of what
    setting five attributes costs. The shared keys grow only in insertion order, so one record
    set the way the logging flow sets it (formatter attributes, then ours) makes the filter's
    later records stay compact. Harmless elsewhere.
    """
    record = logging.LogRecord("otel_ctxbridge", logging.INFO, __file__, 0, "", (), None)
    record.message = record.asctime = ""
    for key in keys:
        setattr(record, key, None)


class ContextLogFilter(logging.Filter):
    """Sets the declared fields' log keys and ``trace_id``/``span_id`` on every log record.

    Unset fields (and the ids outside a span) get ``default``. A key the record already has
    (an ``extra=`` value) is kept. Always returns True: it annotates, never drops.
    Usable from ``logging.config.dictConfig``:
    ``{"()": "otel_ctxbridge.ContextLogFilter", "bridge": "ext://myapp.bridge"}``.

    Raises:
        FieldConfigError: a field's ``log_key`` is a name log records have already (such as
            ``name``, ``msg``, ``process``; see :data:`RESERVED_LOG_KEYS`) or ``trace_id`` /
            ``span_id``: its value could never be set. Give the field another ``log_key``.
    """

    def __init__(self, bridge: ContextBridge, default: Any = "-", name: str = "") -> None:
        super().__init__(name)
        self.bridge = bridge
        self.default = default
        self._reader = FieldReader(bridge, self._values_of)
        for entry in self._reader.entries:
            if entry.log_key in RESERVED_LOG_KEYS or entry.log_key in (TRACE_ID, SPAN_ID):
                raise FieldConfigError(
                    f"field {entry.name!r}: log_key {entry.log_key!r} is taken by log records; "
                    "declare the field with another log_key"
                )
        self._names = (*(e.log_key for e in self._reader.entries), TRACE_ID, SPAN_ID)
        self._keys = frozenset(self._names)
        self._assign = _assigner(self._names)
        _share_keys(self._names)

    def _values_of(self, values: tuple[Any, ...], ctx: Context) -> tuple[Any, ...]:
        default = self.default
        return (
            *(default if value is MISSING else value for value in values),
            *(trace_ids(ctx) or (default, default)),
        )

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; always True."""
        try:
            ctx = _get_current()
            if record.exc_info is not None:  # an exception that escaped a request, logged later?
                ctx = context_for_record(record, ctx, self.bridge)
            last = self._reader.last  # the reader's cache, inlined
            fresh = last[0] is ctx and last[1] is CHANGES[0]
            values = last[2] if fresh else self._reader.get(ctx)
            if not self._assign(record, values):  # the record has one of the keys already
                for key, value in zip(self._names, values, strict=True):
                    if not hasattr(record, key):
                        setattr(record, key, value)
        except Exception as exc:  # logging must never fail because of context
            self._reader.warn_once("filter", "ContextLogFilter failed (%s)", type(exc).__name__)
            for key in self._keys:
                record.__dict__.setdefault(key, self.default)
        return True


class ContextLogRecordProcessor(LogRecordProcessor):
    """Adds the declared fields as attributes to OTel log records, never overwriting one.

    Values come from the record's context (the context current when it was emitted).
    Register it on the SDK ``LoggerProvider`` before the exporting processors.
    """

    def __init__(self, bridge: ContextBridge) -> None:
        self.bridge = bridge
        self._reader = FieldReader(bridge, self._attributes, uses_context=False)

    def _attributes(self, values: tuple[Any, ...], ctx: Context) -> dict[str, Any]:
        return attributes_of(self._reader.entries, values)

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        """Set the fields on ``log_record``'s attributes."""
        try:
            record = log_record.log_record
            ctx = record.context if record.context is not None else rt.get_current()
            attributes = self._reader.get(ctx)
            if not attributes:
                return
            existing: Any = record.attributes
            if existing is None:
                record.attributes = dict(attributes)
                return
            for key, value in attributes.items():
                if key not in existing:
                    existing[key] = value
        except Exception as exc:  # telemetry never throws on the logging path
            self._reader.warn_once(
                "on_emit", "ContextLogRecordProcessor failed (%s)", type(exc).__name__
            )

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered: always True."""
        return True


class OTelLoggingBridge(logging.Handler):
    """Root-logger handler turning stdlib records into OTel log records.

    Delegates to ``LoggingHandler`` from ``opentelemetry-instrumentation-logging`` (the SDK's
    own handler is deprecated). Records of OTel's own loggers are not exported (an exporter
    failing to reach the collector would otherwise feed on its own warnings), and the plain
    keys ``ContextLogFilter`` may have set are left out: the record processor adds the fields
    as namespaced attributes and OTel carries the trace ids natively.
    """

    def __init__(
        self, bridge: ContextBridge, provider: LoggerProvider, level: int | str = logging.NOTSET
    ) -> None:
        super().__init__(level)
        self._bridge = bridge
        self._inner = _otel_handler(provider)
        self._plain = frozenset(
            (*(str(f.log_key) for f in bridge.fields.values()), TRACE_ID, SPAN_ID)
        )

    def emit(self, record: logging.LogRecord) -> None:
        """Hand ``record`` (without the filter's plain keys) to OTel's handler."""
        if record.name.startswith("opentelemetry"):
            return
        if not self._plain.isdisjoint(record.__dict__):
            clone = logging.LogRecord.__new__(type(record))
            clone.__dict__.update(
                {k: v for k, v in record.__dict__.items() if k not in self._plain}
            )
            record = clone
        if record.exc_info is not None:
            current = _get_current()
            try:
                ctx = context_for_record(record, current, self._bridge)
            except Exception:  # logging never fails because of context
                ctx = current
            if ctx is not current:  # the record of a failed request, written after it ended
                token = rt.attach(ctx)
                try:
                    self._inner.emit(record)
                finally:
                    rt.detach(token)
                return
        self._inner.emit(record)

    def flush(self) -> None:
        """Nothing to do: the logger provider's batch processor exports in the background
        (and flushes at ``shutdown()`` / interpreter exit)."""


def _otel_handler(provider: LoggerProvider) -> logging.Handler:
    try:
        from opentelemetry.instrumentation.logging.handler import (  # noqa: PLC0415 - optional
            LoggingHandler,
        )
    except ImportError:  # pragma: no cover - fall back to the SDK's deprecated handler
        from opentelemetry.sdk._logs import (  # type: ignore[assignment] # noqa: PLC0415 - same API
            LoggingHandler,
        )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _without_flush(LoggingHandler)(logger_provider=provider)
    return _without_flush(LoggingHandler)(logger_provider=provider)


_H = TypeVar("_H", bound=logging.Handler)


def _without_flush(handler: type[_H]) -> type[_H]:
    """``handler`` whose ``flush()`` does nothing. OTel's flushes the provider from a new
    thread, and ``logging.shutdown()`` flushes every handler ever made at interpreter exit,
    when Python 3.12+ refuses new threads ("can't create new thread at interpreter shutdown",
    printed at every exit). The provider flushes on its own at shutdown and exit."""

    class QuietFlush(handler):  # type: ignore[valid-type,misc] # a class chosen at run time
        def flush(self) -> None:
            """Nothing: see :func:`_without_flush`."""

    return QuietFlush
