"""ContextLogFilter, the JSON and structlog recipes, and ContextLogRecordProcessor."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime
from otel_ctxbridge.logs import ContextLogFilter, ContextLogRecordProcessor, OTelLoggingBridge
from otel_ctxbridge.structlog_processor import ContextStructlogProcessor

FILTER = (
    "otel_ctxbridge.ContextLogFilter"
    if hasattr(cb, "ContextLogFilter")
    else "otel_ctxbridge.logs.ContextLogFilter"
)
SECRET = "alice@example.com"
BRIDGE = cb.ContextBridge(
    [
        cb.Field("request_id"),
        cb.Field("tenant_id"),
        cb.Field("user_id", propagate=False),
        cb.Field("email", redact=True),
    ]
)
"""Module-level, so that dictConfig can name it with ``ext://``."""


class Records(logging.Handler):
    """Keeps the records it is handed (after its filters ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured(bridge: cb.ContextBridge) -> Iterator[Records]:
    """A logger ``app`` whose handler carries a ContextLogFilter of the shared bridge."""
    handler = Records()
    handler.addFilter(ContextLogFilter(bridge))
    logger = logging.getLogger("app")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger's handlers and level after a test that runs dictConfig."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    keys = ("request_id", "tenant_id", "user_id", "trace_id", "span_id")
    return {k: getattr(record, k) for k in keys}


def _ids(span: trace.Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format_trace_id(ctx.trace_id), format_span_id(ctx.span_id)


def test_a_line_in_a_scope_carries_the_fields_and_the_span_ids(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, captured: Records
) -> None:
    """Inside a scope and a span, the record has every field and the span's hex ids."""
    log = logging.getLogger("app")
    with (
        bridge.scope(request_id="r-1", tenant_id="acme", user_id="u-7"),
        trace.get_tracer("t").start_as_current_span("handler") as span,
    ):
        log.info("hello")
    trace_id, span_id = _ids(span)
    assert len(trace_id) == 32
    assert len(span_id) == 16
    assert _fields(captured.records[0]) == {
        "request_id": "r-1",
        "tenant_id": "acme",
        "user_id": "u-7",
        "trace_id": trace_id,
        "span_id": span_id,
    }


def test_outside_a_scope_the_defaults_appear(bridge: cb.ContextBridge, captured: Records) -> None:
    """Unset fields and the ids outside a span get the default, "-" unless configured."""
    logging.getLogger("app").info("outside")
    assert set(_fields(captured.records[0]).values()) == {"-"}
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    assert ContextLogFilter(bridge, default=None).filter(record) is True
    assert set(_fields(record).values()) == {None}


def test_nested_scopes_and_updates_show_in_later_lines(
    bridge: cb.ContextBridge, captured: Records
) -> None:
    """A nested scope overlays, leaving it restores, and update() shows from then on."""
    log = logging.getLogger("app")
    with bridge.scope(request_id="r-outer", tenant_id="acme"):
        with bridge.scope(tenant_id="globex"):
            log.info("nested")
        log.info("restored")
        bridge.update(user_id="u-9")
        log.info("updated")
    got = [(r.tenant_id, r.user_id) for r in captured.records]  # type: ignore[attr-defined]
    assert got == [("globex", "-"), ("acme", "-"), ("acme", "u-9")]


async def test_a_line_in_a_task_carries_the_scope_of_its_creation(
    bridge: cb.ContextBridge, captured: Records
) -> None:
    """Tasks copy the context when created: each task logs its own request's fields."""
    log = logging.getLogger("app")

    async def handle(request_id: str) -> None:
        with bridge.scope(request_id=request_id):
            await asyncio.sleep(0)
            child = asyncio.create_task(asyncio.sleep(0, result=None))
            log.info("in task")
            await child

    await asyncio.gather(handle("r-a"), handle("r-b"))
    assert sorted(r.request_id for r in captured.records) == ["r-a", "r-b"]  # type: ignore[attr-defined]


def test_a_line_in_a_bound_thread_carries_the_fields(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, captured: Records
) -> None:
    """A thread or executor job started with bridge.bind logs the caller's fields and span;
    an unbound thread starts empty."""
    log = logging.getLogger("app")
    with (
        bridge.scope(request_id="r-t", user_id="u-t"),
        trace.get_tracer("t").start_as_current_span("outer") as span,
    ):
        bound = threading.Thread(target=bridge.bind(lambda: log.info("bound")))
        bound.start()
        bound.join(5)
        unbound = threading.Thread(target=lambda: log.info("unbound"))
        unbound.start()
        unbound.join(5)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(bridge.bind(log.info), "pool").result(5)
    by_message = {r.getMessage(): _fields(r) for r in captured.records}
    trace_id, span_id = _ids(span)
    expected = {"request_id": "r-t", "tenant_id": "-", "user_id": "u-t"}
    for message in ("bound", "pool"):
        assert by_message[message] == {**expected, "trace_id": trace_id, "span_id": span_id}
    assert set(by_message["unbound"].values()) == {"-"}


def test_extra_values_and_a_second_filter_keep_what_the_record_has(
    bridge: cb.ContextBridge, captured: Records
) -> None:
    """A key passed with extra= wins; a filter running again on an annotated record (say
    behind a QueueHandler, outside the request) does not overwrite the request's values."""
    log = logging.getLogger("app")
    with bridge.scope(request_id="r-ctx", tenant_id="acme"):
        log.info("explicit", extra={"request_id": "r-extra"})
    record = captured.records[0]
    assert (record.request_id, record.tenant_id) == ("r-extra", "acme")  # type: ignore[attr-defined]
    with bridge.scope(request_id="r-first"):
        annotated = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
        ContextLogFilter(bridge).filter(annotated)
    ContextLogFilter(bridge).filter(annotated)  # outside the scope now
    assert annotated.request_id == "r-first"  # type: ignore[attr-defined]


def test_log_keys_that_are_not_identifiers(captured: Records) -> None:
    """Fields may name log keys that are not Python identifiers (set with setattr)."""
    dotted = cb.ContextBridge([cb.Field("request_id", log_key="request.id")])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    with dotted.scope(request_id="r-dot"):
        ContextLogFilter(dotted).filter(record)
    assert record.__dict__["request.id"] == "r-dot"


def test_a_record_that_refuses_attributes_still_passes(bridge: cb.ContextBridge) -> None:
    """The filter never raises and never drops: on a failure it sets the defaults."""

    class Frozen(logging.LogRecord):
        def __setattr__(self, name: str, value: object) -> None:
            if name in ("request_id", "trace_id"):
                raise AttributeError(name)
            super().__setattr__(name, value)

    record = Frozen("x", logging.INFO, __file__, 1, "m", (), None)
    with bridge.scope(request_id="r-1"):
        assert ContextLogFilter(bridge).filter(record) is True
    assert record.__dict__["request_id"] == "-"


def test_redacted_values_never_reach_a_log_line(root_logging: None) -> None:
    """A redacted field is logged hashed, in the filter's output and in OTel log records."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextLogFilter(BRIDGE))
    handler.setFormatter(logging.Formatter("%(message)s %(email)s"))
    logger = logging.getLogger("app.redact")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(ContextLogRecordProcessor(BRIDGE))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    otel_handler = LoggingHandler(logger_provider=provider)
    logger.addHandler(otel_handler)
    try:
        with BRIDGE.scope(request_id="r-1", email=SECRET):
            logger.info("signed in")
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(otel_handler)
        provider.shutdown()
    assert SECRET not in stream.getvalue()
    assert "sha256:" in stream.getvalue()
    (record,) = exporter.get_finished_logs()
    assert SECRET not in record.to_json()
    assert str(record.log_record.attributes["app.email"]).startswith("sha256:")  # type: ignore[index]


def test_dictconfig_builds_the_filter_from_a_dotted_path(root_logging: None) -> None:
    """dictConfig's "()" factory makes the filter, with the bridge named by ext://."""
    handler = Records()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"ctx": {"()": FILTER, "bridge": f"ext://{__name__}.BRIDGE"}},
            "handlers": {"keep": {"()": lambda: handler, "filters": ["ctx"]}},
            "root": {"level": "INFO", "handlers": ["keep"]},
        }
    )
    with BRIDGE.scope(request_id="r-dict"):
        logging.getLogger("anything").info("configured")
    assert handler.records[0].request_id == "r-dict"  # type: ignore[attr-defined]


def test_json_recipe_writes_one_json_object_a_line(
    spans: InMemorySpanExporter, root_logging: None
) -> None:
    """The documented python-json-logger recipe: every line parses as a JSON object holding
    level, message, logger, timestamp, the fields and the trace ids."""
    stream = _json_lines()
    log = logging.getLogger("app.json")
    log.info("outside")
    with (
        BRIDGE.scope(request_id="r-json", tenant_id="acme", user_id="u-1"),
        trace.get_tracer("t").start_as_current_span("op") as span,
    ):
        log.warning("inside %s", "a span", extra={"order": "o-1"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    outside, inside = (json.loads(line) for line in lines)
    trace_id, span_id = _ids(span)
    assert inside["level"] == "WARNING"
    assert inside["logger"] == "app.json"
    assert inside["message"] == "inside a span"
    assert inside["timestamp"].endswith("+00:00")
    assert inside["order"] == "o-1"
    assert {k: inside[k] for k in ("request_id", "tenant_id", "user_id")} == {
        "request_id": "r-json",
        "tenant_id": "acme",
        "user_id": "u-1",
    }
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert outside["request_id"] is None
    assert outside["trace_id"] is None


def _json_lines() -> io.StringIO:
    """The documented python-json-logger recipe on the root logger, writing into a buffer."""
    stream = io.StringIO()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "ctx": {"()": FILTER, "bridge": f"ext://{__name__}.BRIDGE", "default": None},
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
                "out": {
                    "class": "logging.StreamHandler",
                    "stream": stream,
                    "filters": ["ctx"],
                    "formatter": "json",
                },
            },
            "root": {"level": "INFO", "handlers": ["out"]},
        }
    )
    return stream


def test_structlog_through_stdlib_reaches_json_lines_and_otel_log_records(
    spans: InMemorySpanExporter, root_logging: None
) -> None:
    """The README's structlog recipe for OTLP: events rendered into stdlib logging calls
    (``render_to_log_kwargs``) go through the JSON handler and the OTel logging bridge like any
    stdlib record: the JSON line and the exported record carry the fields and the event's own
    keys, and ``log.exception`` keeps its traceback in both."""
    stream = _json_lines()
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(ContextLogRecordProcessor(BRIDGE))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logging.getLogger().addHandler(OTelLoggingBridge(BRIDGE, provider))
    structlog.configure(
        processors=[structlog.stdlib.render_to_log_kwargs],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    try:
        log = structlog.get_logger("app.sl")
        with (
            BRIDGE.scope(request_id="r-sl", tenant_id="acme"),
            trace.get_tracer("t").start_as_current_span("op") as span,
        ):
            log.info("order placed", order="o-1")
            try:
                raise ValueError("bad order")
            except ValueError:
                log.exception("caught")
    finally:
        structlog.reset_defaults()
        provider.shutdown()
    placed, caught = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (placed["message"], placed["order"], placed["request_id"]) == (
        "order placed",
        "o-1",
        "r-sl",
    )
    assert placed["trace_id"] == _ids(span)[0]
    assert "ValueError: bad order" in caught["exc_info"]
    assert caught["tenant_id"] == "acme"
    first, second = (d.log_record for d in exporter.get_finished_logs())
    assert first.body == "order placed"
    attributes = dict(first.attributes or {})
    assert (attributes["order"], attributes["app.request_id"]) == ("o-1", "r-sl")
    assert first.trace_id == span.get_span_context().trace_id
    assert dict(second.attributes or {})["exception.type"] == "ValueError"


@pytest.fixture
def structlog_output() -> Iterator[io.StringIO]:
    """structlog configured as the documented recipe, rendering JSON into a buffer."""
    out = io.StringIO()
    structlog.configure(
        processors=[
            ContextStructlogProcessor(BRIDGE),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", key="timestamp"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    yield out
    structlog.reset_defaults()


def test_structlog_recipe_renders_the_fields(
    spans: InMemorySpanExporter, structlog_output: io.StringIO
) -> None:
    """The rendered event holds the fields set now and the span's ids; keys bound on the
    logger win; unset fields are left out; ``log.exception`` keeps its traceback."""
    log = structlog.get_logger("app")
    with (
        BRIDGE.scope(request_id="r-s", tenant_id="acme", email=SECRET),
        trace.get_tracer("t").start_as_current_span("op") as span,
    ):
        log.info("placed", order="o-1")
        log.bind(tenant_id="bound").info("bound")
        try:
            raise ValueError("bad order")
        except ValueError:
            log.exception("caught")
    log.info("outside")
    placed, bound, caught, outside = (
        json.loads(line) for line in structlog_output.getvalue().splitlines()
    )
    trace_id, span_id = _ids(span)
    assert placed["event"] == "placed"
    assert placed["order"] == "o-1"
    assert placed["level"] == "info"
    assert "timestamp" in placed
    assert (placed["request_id"], placed["tenant_id"]) == ("r-s", "acme")
    assert (placed["trace_id"], placed["span_id"]) == (trace_id, span_id)
    assert "user_id" not in placed
    assert placed["email"].startswith("sha256:")
    assert SECRET not in structlog_output.getvalue()
    assert bound["tenant_id"] == "bound"
    assert "ValueError: bad order" in caught["exception"]
    assert caught["request_id"] == "r-s"
    assert not {"request_id", "trace_id"} & set(outside)


def test_structlog_processor_with_a_default_and_without_ids() -> None:
    """default= fills unset fields; trace_ids=False leaves the ids out."""
    processor = ContextStructlogProcessor(BRIDGE, default="-", trace_ids=False)
    with trace.get_tracer("t").start_as_current_span("op"):
        event = processor(None, "info", {"event": "e"})
    assert event == {
        "event": "e",
        "request_id": "-",
        "tenant_id": "-",
        "user_id": "-",
        "email": "-",
    }


def test_otel_log_records_carry_the_fields_without_overwriting(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """Through instrumentation-logging's LoggingHandler, OTel log records get the fields as
    prefixed attributes and the span's ids; an attribute the record has is kept."""
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(ContextLogRecordProcessor(bridge))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(logger_provider=provider)
    logger = logging.getLogger("app.otel")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with (
            bridge.scope(request_id="r-o", tenant_id="acme", user_id="u-o"),
            trace.get_tracer("t").start_as_current_span("op") as span,
        ):
            logger.info("in span", extra={"app.tenant_id": "explicit"})
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
        provider.shutdown()
    inside, outside = exporter.get_finished_logs()
    attributes = dict(inside.log_record.attributes or {})
    assert attributes["app.request_id"] == "r-o"
    assert attributes["app.user_id"] == "u-o"
    assert attributes["app.tenant_id"] == "explicit"
    assert inside.log_record.trace_id == span.get_span_context().trace_id
    assert not any(k.startswith("app.") for k in outside.log_record.attributes or {})


@pytest.mark.parametrize("log_key", ["name", "msg", "process", "getMessage", "trace_id"])
def test_a_log_key_that_records_have_already_is_refused(log_key: str) -> None:
    """A log key a LogRecord already has (its attributes, methods, the ids the filter sets)
    could never be set: the filter refuses it when built, naming the field."""
    taken = cb.ContextBridge([cb.Field("who", log_key=log_key)])
    with pytest.raises(cb.FieldConfigError, match=rf"'who'.*{log_key}"):
        ContextLogFilter(taken)
    with pytest.raises(cb.FieldConfigError, match="'name'"):
        ContextLogFilter(cb.ContextBridge([cb.Field("name")]))


def test_keyword_and_dashed_log_keys_are_set_as_given() -> None:
    """Log keys that are Python keywords or hold dashes are set under exactly that name."""
    odd = cb.ContextBridge([cb.Field("a", log_key="class"), cb.Field("b", log_key="req-id")])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    with odd.scope(a="1", b="2"):
        ContextLogFilter(odd).filter(record)
    assert (record.__dict__["class"], record.__dict__["req-id"]) == ("1", "2")


def test_a_redacted_number_never_reaches_a_log_line_in_clear() -> None:
    """A redacted process-local field holding a number is hashed in stdlib records, structlog
    events and OTel log records."""
    secret = cb.ContextBridge([cb.Field("account", propagate=False, redact=True)])
    hashed = secret.fields["account"].shown("123456789")
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(ContextLogRecordProcessor(secret))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(logger_provider=provider)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    with secret.scope(account=123456789):
        ContextLogFilter(secret).filter(record)
        event = ContextStructlogProcessor(secret)(None, "info", {})
        handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None))
    provider.shutdown()
    (exported,) = exporter.get_finished_logs()
    assert record.__dict__["account"] == hashed
    assert event["account"] == hashed
    assert (exported.log_record.attributes or {})["app.account"] == hashed


def test_contexts_sharing_one_baggage_dict_are_told_apart(bridge: cb.ContextBridge) -> None:
    """Two contexts with the same baggage dict but different process-local values give each
    its own values, however often the log filter and current() switch between them."""
    log_filter = ContextLogFilter(bridge)
    with bridge.scope(request_id="r-1"):
        base = _runtime.get_current()
        first = bridge.derive(base, {"user_id": "u-1"})
        second = bridge.derive(base, {"user_id": "u-2"})
    assert first.get(_runtime.BAGGAGE_KEY) is second.get(_runtime.BAGGAGE_KEY)
    seen = []
    for ctx in (first, second, first, second):
        token = _runtime.attach(ctx)
        try:
            record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
            log_filter.filter(record)
            seen.append((bridge.current()["user_id"], record.__dict__["user_id"]))
        finally:
            _runtime.detach(token)
    assert seen == [("u-1", "u-1"), ("u-2", "u-2")] * 2
