"""instrument_asgi on a real uvicorn server: trace continuity, field policies, request ids,
access log, update() from FastAPI dependencies, errors, background tasks, streaming."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from _servers import serve
from fastapi import BackgroundTasks, Depends, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import baggage, trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime
from otel_ctxbridge._failed import remember_failed_context
from otel_ctxbridge.asgi import ACCESS_LOGGER, ContextBridgeMiddleware, instrument_asgi
from otel_ctxbridge.logs import OTelLoggingBridge
from otel_ctxbridge.trust import TrustPolicy

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
SAFE_ID = re.compile(cb.REQUEST_ID_PATTERN)


class Records(logging.Handler):
    """Collects the records of some loggers during a test."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._loggers = [logging.getLogger(n) for n in names]
        self._levels = [lg.level for lg in self._loggers]

    def emit(self, record: logging.LogRecord) -> None:
        if not any(r is record for r in self.records[-3:]):  # also on a parent logger
            self.records.append(record)

    def __enter__(self) -> Records:
        for lg in self._loggers:
            lg.addHandler(self)
            lg.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self._loggers, self._levels, strict=True):
            lg.removeHandler(self)
            lg.setLevel(level)

    def named(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == name]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``predicate`` until it is truthy (the server finishes spans and logs just after
    the client has the response)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.01)


def server_spans(exporter: InMemorySpanExporter, count: int = 1) -> list[ReadableSpan]:
    """The finished SERVER spans, once ``count`` of them are there."""

    def found() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]

    wait_until(lambda: len(found()) >= count)
    return found()


def access_lines(records: Records, count: int = 1) -> list[logging.LogRecord]:
    wait_until(lambda: len(records.named(ACCESS_LOGGER)) >= count)
    return records.named(ACCESS_LOGGER)


def make_api(bridge: cb.ContextBridge, seen: dict[str, Any]) -> FastAPI:
    """A FastAPI app whose routes report what they see of the context into ``seen``."""
    api = FastAPI()

    def user_sync() -> None:
        bridge.update(user_id="u-sync")

    async def user_async() -> None:
        bridge.update(user_id="u-async")

    class Teapot(Exception):
        pass

    @api.exception_handler(Teapot)
    async def teapot(request: Request, exc: Teapot) -> JSONResponse:
        seen["handler"] = bridge.get("request_id")
        logging.getLogger("tests.app").error("teapot handled")
        return JSONResponse({"teapot": True}, status_code=418)

    @api.get("/fields")
    async def fields() -> dict[str, Any]:
        return {"fields": dict(bridge.current()), "baggage": dict(baggage.get_all())}

    @api.get("/outbound")
    async def outbound() -> dict[str, Any]:
        return {"headers": bridge.inject({})}

    @api.get("/user-sync", dependencies=[Depends(user_sync)])
    def sync_route() -> dict[str, Any]:
        return dict(bridge.current())

    @api.get("/user-async", dependencies=[Depends(user_async)])
    async def async_route() -> dict[str, Any]:
        return dict(bridge.current())

    @api.get("/boom")
    async def boom() -> None:
        logging.getLogger("tests.app").info("about to fail")
        raise RuntimeError("boom")

    @api.get("/teapot")
    async def teapot_route() -> None:
        raise Teapot

    @api.get("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, str]:
        def later() -> None:
            seen["background"] = dict(bridge.current())

        tasks.add_task(later)
        return {"ok": "yes"}

    @api.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> Any:
            for index in range(5):
                await asyncio.sleep(0)
                yield f"{index}:{bridge.get('request_id')}\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    @api.get("/sse")
    async def sse(request: Request) -> StreamingResponse:
        async def events() -> Any:
            sent = 0
            tracer = trace.get_tracer("tests")
            try:
                while not await request.is_disconnected() and sent < 500:
                    with tracer.start_as_current_span("event"):
                        yield f"data: {bridge.get('request_id')}\n\n"
                    sent += 1
                    await asyncio.sleep(0.01)
            finally:
                seen["sse_end"] = bridge.get("request_id")

        return StreamingResponse(events(), media_type="text/event-stream")

    return api


@pytest.fixture
def seen() -> dict[str, Any]:
    """What the test app's routes saw."""
    return {}


@pytest.fixture
def records() -> Iterator[Records]:
    """Records of the access logger, the middleware's diagnostics and the app's logger."""
    with Records(ACCESS_LOGGER, "otel_ctxbridge.asgi", "otel_ctxbridge", "tests.app") as rec:
        yield rec


@pytest.fixture
def url(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, seen: dict[str, Any]
) -> Iterator[str]:
    """The test app under instrument_asgi with the default (trust nobody) policy."""
    with serve(instrument_asgi(make_api(bridge, seen), bridge)) as base:
        yield base


def test_inbound_traceparent_is_continued_with_one_server_span(
    url: str, spans: InMemorySpanExporter
) -> None:
    """The server span continues the inbound trace, is the only SERVER span (FastAPI's native
    telemetry does not add a second one), and carries the request id."""
    response = httpx.get(url + "/fields", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    (server,) = server_spans(spans)
    assert format(server.context.trace_id, "032x") == TRACE
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == PARENT
    assert server.attributes["app.request_id"] == response.headers["x-request-id"]
    time.sleep(0.05)
    assert [s.name for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER] == [
        "GET /fields"
    ]


def test_send_and_receive_spans_are_off_by_default(url: str, spans: InMemorySpanExporter) -> None:
    """Only the server span is recorded: no 'http send' / 'http receive' spans."""
    httpx.get(url + "/fields")
    server_spans(spans)
    time.sleep(0.05)
    names = [s.name for s in spans.get_finished_spans()]
    assert not [n for n in names if n.endswith((" send", " receive"))]


def test_send_spans_can_be_turned_back_on(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, seen: dict[str, Any]
) -> None:
    """exclude_spans=[] brings OTel's send/receive spans back."""
    app = instrument_asgi(make_api(bridge, seen), bridge, exclude_spans=[])
    with serve(app) as base:
        httpx.get(base + "/fields")
        assert wait_until(
            lambda: [s for s in spans.get_finished_spans() if s.name.endswith("http send")]
        )


@pytest.mark.parametrize(
    "inbound",
    [
        str(uuid.uuid4()),
        uuid.uuid4().hex,
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "req-2024.01_02:abc+def/ghi=@x",
        "a" * 128,
    ],
)
def test_valid_inbound_request_id_is_kept_and_echoed(
    url: str, spans: InMemorySpanExporter, records: Records, inbound: str
) -> None:
    """UUIDs, 32-hex ids, nginx $request_id and other safe tokens up to 128 characters are
    used as they are: echoed, on the server span, in the handler and in the access log."""
    response = httpx.get(url + "/fields", headers={"x-request-id": inbound})
    assert response.headers["x-request-id"] == inbound
    assert response.json()["fields"]["request_id"] == inbound
    assert server_spans(spans)[0].attributes["app.request_id"] == inbound
    assert access_lines(records)[0].request_id == inbound


def test_missing_request_id_is_generated(url: str, spans: InMemorySpanExporter) -> None:
    """Without X-Request-ID a UUID4 is generated, echoed and used everywhere."""
    response = httpx.get(url + "/fields")
    generated = response.headers["x-request-id"]
    assert uuid.UUID(generated).version == 4
    assert response.json()["fields"]["request_id"] == generated
    assert server_spans(spans)[0].attributes["app.request_id"] == generated


@pytest.mark.parametrize(
    "bad",
    ["a" * 129, "has space", "semi;colon", 'quote"d', "tab\there", "ünïcode", "-leading-dash"],
)
def test_rejected_request_id_is_replaced_never_echoed_and_logged_without_value(
    url: str, records: Records, bad: str
) -> None:
    """A too long or unsafe id is replaced by a generated one; the warning names the field and
    the reason but never the raw value."""
    response = httpx.get(url + "/fields", headers={"x-request-id": bad.encode()})
    echoed = response.headers["x-request-id"]
    assert echoed != bad
    assert uuid.UUID(echoed).version == 4
    warnings = [r.getMessage() for r in records.named("otel_ctxbridge")]
    assert any("request_id" in w for w in warnings)
    assert not any(bad in w for w in warnings)


def test_request_id_is_echoed_on_404_500_and_handled_errors(
    url: str, records: Records, seen: dict[str, Any]
) -> None:
    """The id goes back on a 404, on the 500 of an unhandled exception, and on the response
    of an exception handler, which sees the request's context."""
    for path, status in (("/missing", 404), ("/boom", 500), ("/teapot", 418)):
        response = httpx.get(url + path, headers={"x-request-id": f"rid-{status}"})
        assert response.status_code == status
        assert response.headers["x-request-id"] == f"rid-{status}"
    assert seen["handler"] == "rid-418"


def test_error_logs_carry_the_request_fields(url: str, records: Records) -> None:
    """The app's own log lines and the unhandled-exception log line see the request's fields;
    the exception is logged with its traceback."""
    httpx.get(url + "/boom", headers={"x-request-id": "rid-boom"})
    errors = wait_until(lambda: records.named("otel_ctxbridge.asgi"))
    (error,) = [r for r in errors if r.levelno == logging.ERROR]
    assert error.request_id == "rid-boom"
    assert error.exc_info is not None
    assert error.exc_info[0] is RuntimeError
    assert error.trace_id


def test_the_servers_own_error_line_carries_the_failed_requests_fields(
    bridge: cb.ContextBridge, url: str, spans: InMemorySpanExporter
) -> None:
    """uvicorn logs ``Exception in ASGI application`` after the request's context is gone: the
    exception carries that context, so the line gets the request's fields and trace ids, as a
    stdlib record (ContextLogFilter) and as an exported OTel log record (OTelLoggingBridge)."""
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(cb.ContextLogRecordProcessor(bridge))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    otel_handler = OTelLoggingBridge(bridge, provider)
    server_log = logging.getLogger("uvicorn.error")
    server_log.addHandler(otel_handler)
    try:
        with Records("uvicorn.error") as errors:
            errors.addFilter(cb.ContextLogFilter(bridge, default=None))
            response = httpx.get(url + "/boom", headers={"x-request-id": "rid-late"})
            assert response.status_code == 500
            line = wait_until(
                lambda: [r for r in errors.records if "Exception in ASGI" in r.getMessage()]
            )[0]
            assert wait_until(exporter.get_finished_logs)
    finally:
        server_log.removeHandler(otel_handler)
        provider.shutdown()
    (span,) = server_spans(spans)
    assert (line.request_id, line.tenant_id) == ("rid-late", None)
    assert line.trace_id == f"{span.context.trace_id:032x}"
    (exported,) = exporter.get_finished_logs()
    assert dict(exported.log_record.attributes or {})["app.request_id"] == "rid-late"
    assert exported.log_record.trace_id == span.context.trace_id


def test_a_line_of_a_failed_requests_exception_in_another_request_keeps_that_request(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """The failed request's context is used only for a record of that very exception written
    outside any request (no span, no scope of the bridge): one written inside a span or a scope
    keeps the fields current there, and another exception's record gets nothing."""
    log = logging.getLogger("tests.late")
    records = Records("tests.late")
    records.addFilter(cb.ContextLogFilter(bridge, default=None))
    exc = RuntimeError("boom")
    with bridge.scope(request_id="r-failed"):
        remember_failed_context(exc, _runtime.get_current())
    with records:
        with trace.get_tracer("t").start_as_current_span("op"):
            log.error("in a span", exc_info=exc)
        with bridge.scope(request_id="r-now"):
            log.error("in a scope", exc_info=exc)
        log.error("outside", exc_info=exc)
        log.error("another", exc_info=ValueError("other"))
    in_span, in_scope, outside, another = records.records
    assert in_span.request_id is None
    assert in_span.trace_id is not None
    assert in_scope.request_id == "r-now"
    assert outside.request_id == "r-failed"
    assert another.request_id is None


def test_one_exception_raised_by_several_requests_is_logged_with_each_ones_ids(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """An exception instance several requests raise (a cached error, a shared future): the
    server's traceback of each carries that request's id, never the first one's."""
    shared = RuntimeError("the shared connection is broken")
    api = FastAPI()

    @api.get("/")
    async def index() -> None:
        raise shared

    with Records("uvicorn.error") as errors:
        errors.addFilter(cb.ContextLogFilter(bridge, default=None))

        def tracebacks() -> list[logging.LogRecord]:
            return [r for r in errors.records if "Exception in" in r.getMessage()]

        with serve(instrument_asgi(api, bridge)) as base:
            for rid in ("r-first", "r-second", "r-third"):
                httpx.get(base + "/", headers={"x-request-id": rid})
            lines = wait_until(lambda: len(tracebacks()) == 3 and tracebacks())
    assert [r.request_id for r in lines] == ["r-first", "r-second", "r-third"]


def test_the_servers_error_line_has_the_ids_when_the_bridge_ran_in_a_child_task(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A ``BaseHTTPMiddleware`` (``@app.middleware("http")``) outside the bridge runs it in a
    child task (anyio's task group): the server's traceback, logged in the parent task, still
    gets the failed request's id (kept on the exception too)."""
    api = FastAPI()

    @api.get("/")
    async def index() -> None:
        raise RuntimeError("boom")

    api.add_middleware(cb.ContextBridgeMiddleware, bridge=bridge)

    @api.middleware("http")
    async def timing(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    with Records("uvicorn.error") as errors:
        errors.addFilter(cb.ContextLogFilter(bridge, default=None))
        with serve(api) as base:
            httpx.get(base + "/", headers={"x-request-id": "r-child"})
            (line,) = wait_until(
                lambda: [r for r in errors.records if "Exception in" in r.getMessage()]
            )
    assert line.request_id == "r-child"


def test_access_log_line_has_request_and_fields(url: str, records: Records) -> None:
    """One line per request, after the response: method, path, status, duration, fields."""
    httpx.get(url + "/fields", headers={"x-request-id": "rid-a"})
    httpx.get(url + "/missing", headers={"x-request-id": "rid-b"})
    first, second = access_lines(records, 2)
    assert (first.method, first.path, first.status_code, first.request_id) == (
        "GET",
        "/fields",
        200,
        "rid-a",
    )
    assert (second.path, second.status_code, second.request_id) == ("/missing", 404, "rid-b")
    assert first.duration_ms >= 0
    assert first.getMessage().startswith("GET /fields 200 ")
    assert re.fullmatch(r"[0-9a-f]{32}", first.trace_id)
    assert len(records.named(ACCESS_LOGGER)) == 2


@pytest.mark.parametrize(("path", "user"), [("/user-sync", "u-sync"), ("/user-async", "u-async")])
def test_update_in_a_dependency_reaches_server_span_and_access_log(
    url: str, spans: InMemorySpanExporter, records: Records, path: str, user: str
) -> None:
    """bridge.update() in a FastAPI dependency (sync: run in a worker thread; async) is seen by
    the handler, the already-started server span and the access-log line."""
    response = httpx.get(url + path)
    assert response.json()["user_id"] == user
    assert server_spans(spans)[0].attributes["app.user_id"] == user
    assert access_lines(records)[0].user_id == user


def test_server_span_gets_fields_and_route_and_the_app_may_overwrite_them(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """The server span gets the request's fields as soon as the request context is built,
    and ``http.route`` (named after the route template) once routed; an attribute the
    application sets on it afterwards wins, and a field unset with update() keeps the value
    the span had (update() leaves spans as they are for unset values)."""
    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, Any]:
        span: Any = trace.get_current_span()
        seen_on_span = span.attributes.get("app.request_id")
        span.set_attribute("app.request_id", "set-by-app")
        return {"item": item_id, "seen": seen_on_span}

    @api.get("/unset")
    async def unset() -> dict[str, Any]:
        bridge.update(request_id=None)
        return dict(bridge.current())

    with serve(instrument_asgi(api, bridge)) as base:
        response = httpx.get(base + "/items/7", headers={"x-request-id": "r-1"})
        assert response.json() == {"item": "7", "seen": "r-1"}  # there during the request
        (span,) = server_spans(spans)
        assert span.name == "GET /items/{item_id}"
        assert span.attributes["http.route"] == "/items/{item_id}"
        assert span.attributes["app.request_id"] == "set-by-app"
        spans.clear()
        assert httpx.get(base + "/unset", headers={"x-request-id": "r-2"}).json() == {}
        (span,) = server_spans(spans)
        assert span.attributes["app.request_id"] == "r-2"


def test_background_tasks_run_with_the_request_fields(url: str, seen: dict[str, Any]) -> None:
    """A Starlette/FastAPI background task sees the request's fields."""
    httpx.get(url + "/background", headers={"x-request-id": "rid-bg"})
    assert wait_until(lambda: "background" in seen)
    assert seen["background"]["request_id"] == "rid-bg"


def test_streaming_response_keeps_context_to_the_last_chunk(url: str) -> None:
    """Every chunk of a streaming response is produced inside the request's context."""
    response = httpx.get(url + "/stream", headers={"x-request-id": "rid-stream"})
    lines = response.text.splitlines()
    assert lines == [f"{i}:rid-stream" for i in range(5)]
    assert response.headers["x-request-id"] == "rid-stream"


def test_sse_client_disconnect_mid_stream_leaves_no_detach_errors(
    url: str, records: Records, seen: dict[str, Any]
) -> None:
    """A client leaving a server-sent-event stream mid-way: the stream ends in the request's
    context, no 'Failed to detach context' anywhere, and the access line is written."""
    failures = _runtime.detach_failures
    with Records("opentelemetry.context") as otel_logs:
        with httpx.stream("GET", url + "/sse", headers={"x-request-id": "rid-sse"}) as response:
            events = response.iter_lines()
            assert next(events) == "data: rid-sse"
        assert wait_until(lambda: "sse_end" in seen)
        assert seen["sse_end"] == "rid-sse"
        line = access_lines(records)[0]
        assert (line.request_id, line.status_code) == ("rid-sse", 200)
    assert not [r for r in otel_logs.records if "detach" in r.getMessage().lower()]
    assert _runtime.detach_failures == failures


def test_untrusted_peer_cannot_set_trusted_fields_or_forward_baggage(url: str) -> None:
    """With the default policy (nobody trusted): x-tenant-id and a baggage tenant are ignored,
    undeclared baggage is dropped, and only accepted fields travel downstream."""
    headers = {
        "x-tenant-id": "evil",
        "baggage": "tenant_id=evil,foo=bar,request_id=rid-bag,user_id=u-evil",
    }
    seen_fields = httpx.get(url + "/fields", headers=headers).json()
    assert seen_fields["fields"] == {"request_id": "rid-bag"}
    assert seen_fields["baggage"] == {"request_id": "rid-bag"}
    downstream = httpx.get(url + "/outbound", headers=headers).json()["headers"]
    assert downstream["baggage"] == "request_id=rid-bag"


def test_trusted_network_may_set_tenant_and_forward_baggage(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, seen: dict[str, Any]
) -> None:
    """A peer inside a trusted network sets x-tenant-id; its undeclared baggage is forwarded;
    an inbound="never" field still cannot be set from outside."""
    trust = TrustPolicy(networks=["127.0.0.0/8"])
    with serve(instrument_asgi(make_api(bridge, seen), bridge, trust=trust)) as base:
        headers = {"x-tenant-id": "acme", "baggage": "foo=bar%20baz,user_id=u-evil"}
        body = httpx.get(base + "/fields", headers=headers).json()
        assert body["fields"]["tenant_id"] == "acme"
        assert "user_id" not in body["fields"]
        assert body["baggage"]["foo"] == "bar baz"
        assert "user_id" not in body["baggage"]
        assert server_spans(spans)[0].attributes["app.tenant_id"] == "acme"


def test_shared_secret_trusts_a_peer_and_is_hidden_from_the_app(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """The right secret header makes a peer trusted; the app never sees the header; a wrong
    secret leaves the peer untrusted."""
    api = FastAPI()

    @api.get("/")
    async def index(request: Request) -> dict[str, Any]:
        return {"tenant": bridge.get("tenant_id"), "headers": list(request.headers.keys())}

    trust = TrustPolicy(secret="gateway-secret")
    with serve(instrument_asgi(api, bridge, trust=trust)) as base:
        good = {"x-ctxbridge-secret": "gateway-secret", "x-tenant-id": "acme"}
        body = httpx.get(base + "/", headers=good).json()
        assert body["tenant"] == "acme"
        assert "x-ctxbridge-secret" not in body["headers"]
        bad = {"x-ctxbridge-secret": "guess", "x-tenant-id": "acme"}
        assert httpx.get(base + "/", headers=bad).json()["tenant"] is None


def test_headers_only_a_trusted_peer_may_send_are_hidden_from_the_app_when_untrusted(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """An untrusted client's ``baggage`` and ``x-tenant-id`` (a trusted field's header) never
    reach the application, so no handler can read a tenant from them by hand; other headers
    (the request id's) do. From a trusted network both arrive as they came."""
    api = FastAPI()

    @api.get("/")
    async def index(request: Request) -> dict[str, Any]:
        return {k: request.headers.get(k) for k in ("baggage", "x-tenant-id", "x-request-id")}

    sent = {"baggage": "tenant_id=evil,role=admin", "x-tenant-id": "evil", "x-request-id": "r-h"}
    with serve(instrument_asgi(api, bridge)) as base:
        assert httpx.get(base + "/", headers=sent).json() == {
            "baggage": None,
            "x-tenant-id": None,
            "x-request-id": "r-h",
        }
    trust = TrustPolicy(networks=["127.0.0.0/8"])
    with serve(instrument_asgi(api, bridge, trust=trust)) as base:
        assert httpx.get(base + "/", headers=sent).json() == sent


def test_when_no_request_context_can_be_built_the_app_gets_no_unchecked_headers(
    spans: InMemorySpanExporter,
) -> None:
    """A request whose context cannot be built (here a ``generate`` callable that raises) still
    reaches the application, logged, but without the headers only a trusted peer may send and
    without the trust secret: no trust was decided for it."""

    def broken() -> str:
        raise RuntimeError("no ids today")

    bridge = cb.ContextBridge(
        [
            cb.Field("request_id", header="x-request-id", generate=broken, inbound="always"),
            cb.Field("tenant_id", header="x-tenant-id"),
        ]
    )
    api = FastAPI()

    @api.get("/")
    async def index(request: Request) -> list[str]:
        return sorted(request.headers.keys())

    sent = {"baggage": "tenant_id=evil", "x-tenant-id": "evil", "x-ctxbridge-secret": "s3"}
    app = instrument_asgi(api, bridge, trust=TrustPolicy(secret="s3"))
    with serve(app) as base:
        seen = httpx.get(base + "/", headers=sent).json()
    assert not {"baggage", "x-tenant-id", "x-ctxbridge-secret"} & set(seen)
    assert "host" in seen


def test_uvicorn_access_log_carries_the_request_id_with_the_log_filter(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, seen: dict[str, Any]
) -> None:
    """uvicorn.access lines are written inside the request context: with ContextLogFilter on
    the handler they carry the request id of their request."""
    app = instrument_asgi(make_api(bridge, seen), bridge, access_log=False)
    with Records("uvicorn.access") as uvicorn_access:
        uvicorn_access.addFilter(cb.ContextLogFilter(bridge))
        with serve(app, access_log=True) as base:
            response = httpx.get(base + "/fields", headers={"x-request-id": "rid-uv"})
            assert response.status_code == 200
            assert wait_until(lambda: uvicorn_access.records)
    assert uvicorn_access.records[0].request_id == "rid-uv"


def test_context_bridge_middleware_inside_users_own_otel_middleware(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, seen: dict[str, Any]
) -> None:
    """Users who wrap with OTel themselves put ContextBridgeMiddleware inside: the server span
    gets the fields (stamped when the request starts) and untrusted baggage is still dropped."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    app = OpenTelemetryMiddleware(ContextBridgeMiddleware(make_api(bridge, seen), bridge))
    with serve(app) as base:
        response = httpx.get(
            base + "/user-async",
            headers={"x-request-id": "rid-own", "baggage": "foo=bar,tenant_id=evil"},
        )
        assert response.json() == {"request_id": "rid-own", "user_id": "u-async"}
        server = server_spans(spans)[0]
        assert server.attributes["app.request_id"] == "rid-own"
        assert server.attributes["app.user_id"] == "u-async"
        body = httpx.get(base + "/fields", headers={"baggage": "foo=bar"}).json()
        assert "foo" not in body["baggage"]


def test_pure_asgi_app_failing_before_responding_gets_a_500_with_the_id(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, records: Records
) -> None:
    """An app that raises before sending anything: the middleware answers 500 with the id
    (the server's own 500 would not carry it) and logs the line."""

    async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise ValueError("broken before the response")

    with serve(instrument_asgi(broken, bridge)) as base:
        response = httpx.get(base + "/", headers={"x-request-id": "rid-raw"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "rid-raw"
    assert server_spans(spans)[0].attributes["http.status_code"] == 500
    assert server_spans(spans)[0].attributes["app.request_id"] == "rid-raw"
    assert access_lines(records)[0].status_code == 500


def test_app_returning_without_a_response_still_has_fields_on_the_server_span(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """An app that returns without sending anything (the server answers 500 itself): the
    request's fields are on the server span all the same."""

    async def silent(scope: dict[str, Any], receive: Any, send: Any) -> None:
        return None

    with serve(instrument_asgi(silent, bridge)) as base:
        response = httpx.get(base + "/", headers={"x-request-id": "rid-silent"})
    assert response.status_code == 500
    assert server_spans(spans)[0].attributes["app.request_id"] == "rid-silent"


def test_a_raising_redactor_hides_its_field_and_leaves_the_rest_of_the_span(
    spans: InMemorySpanExporter,
) -> None:
    """A field whose redactor raises is left off the server span (never shown in clear); the
    other fields and the route name still reach it."""

    def broken(value: str) -> str:
        raise RuntimeError("redactor bug")

    bridge = cb.ContextBridge(
        [
            cb.Field(
                "request_id", header="x-request-id", inbound="always", generate=cb.new_request_id
            ),
            cb.Field("user_id", header="x-user-id", inbound="always", redact=broken),
        ]
    )
    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, Any]:
        return {"item": item_id}

    with serve(instrument_asgi(api, bridge)) as base:
        headers = {"x-request-id": "rid-redact", "x-user-id": "alice"}
        assert httpx.get(base + "/items/7", headers=headers).status_code == 200
    (span,) = server_spans(spans)
    assert span.name == "GET /items/{item_id}"
    assert span.attributes["app.request_id"] == "rid-redact"
    assert "alice" not in span.attributes.values()


def test_lifespan_passes_through_untouched(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """Startup and shutdown run through instrument_asgi; lifespan state reaches requests."""
    from contextlib import asynccontextmanager

    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        events.append("startup")
        yield {"answer": 42}
        events.append("shutdown")

    api = FastAPI(lifespan=lifespan)

    @api.get("/")
    async def index(request: Request) -> dict[str, Any]:
        return {"answer": request.state.answer}

    with serve(instrument_asgi(api, bridge), lifespan="on") as base:
        assert httpx.get(base + "/").json() == {"answer": 42}
    assert events == ["startup", "shutdown"]


async def _websocket_session(app: Any, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    """Drive one websocket connection through ``app`` at the ASGI level: connect, send two
    texts, disconnect; return what the app sent."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []
    for message in (
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "a"},
        {"type": "websocket.receive", "text": "b"},
        {"type": "websocket.disconnect", "code": 1000},
    ):
        inbox.put_nowait(message)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "subprotocols": [],
        "state": {},
    }
    await asyncio.wait_for(app(scope, inbox.get, send), timeout=10)
    return sent


async def test_websocket_connection_gets_the_request_context(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A websocket connection runs inside its own context for its whole life, and its accept
    carries the request id header."""
    api = FastAPI()

    @api.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        for _ in range(2):
            await websocket.receive_text()
            await websocket.send_text(str(bridge.get("request_id")))
        await websocket.receive()

    app = instrument_asgi(api, bridge)
    sent = await _websocket_session(app, [(b"x-request-id", b"rid-ws")])
    accept = sent[0]
    assert accept["type"] == "websocket.accept"
    assert (b"x-request-id", b"rid-ws") in accept["headers"]
    assert [m["text"] for m in sent if m["type"] == "websocket.send"] == ["rid-ws", "rid-ws"]
    sent = await _websocket_session(app, [])
    assert uuid.UUID(sent[1]["text"]).version == 4
    assert bridge.get("request_id") is None


def test_websocket_over_a_real_server_keeps_the_connection_context(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """Through uvicorn and a real websocket client: the handshake answer echoes the id, every
    message handled on the connection sees it, and two connections never share one."""
    from websockets.sync.client import connect

    api = FastAPI()

    @api.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            await asyncio.sleep(0.01)  # the other connection runs meanwhile
            await websocket.send_text(f"{text}:{bridge.get('request_id')}")

    with serve(instrument_asgi(api, bridge)) as base:
        url = base.replace("http://", "ws://") + "/ws"
        with (
            connect(url, additional_headers={"x-request-id": "ws-one"}) as one,
            connect(url, additional_headers={"x-request-id": "ws-two"}) as two,
        ):
            assert one.response.headers["x-request-id"] == "ws-one"
            assert two.response.headers["x-request-id"] == "ws-two"
            for i in range(3):
                one.send(f"a{i}")
                two.send(f"b{i}")
                assert one.recv(timeout=5) == f"a{i}:ws-one"
                assert two.recv(timeout=5) == f"b{i}:ws-two"


def test_echo_follows_update_and_leaves_an_app_set_header(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """An id changed with update() before the response starts is the one echoed; a response
    that sets X-Request-ID itself keeps its own."""
    api = FastAPI()

    @api.get("/renamed")
    async def renamed() -> dict[str, str]:
        bridge.update(request_id="rid-renamed")
        return {"ok": "yes"}

    @api.get("/own")
    async def own() -> JSONResponse:
        return JSONResponse({"ok": "yes"}, headers={"X-Request-ID": "app-own"})

    with serve(instrument_asgi(api, bridge)) as base:
        renamed_response = httpx.get(base + "/renamed", headers={"x-request-id": "rid-in"})
        assert renamed_response.headers["x-request-id"] == "rid-renamed"
        own_response = httpx.get(base + "/own", headers={"x-request-id": "rid-in"})
        assert own_response.headers.get_list("x-request-id") == ["app-own"]


def test_redacted_field_is_redacted_on_span_and_access_log(spans: InMemorySpanExporter) -> None:
    """A field declared with redact="hash" is hashed on the server span and in the access log,
    while the handler (and baggage) has the real value."""
    bridge = cb.ContextBridge(
        [
            cb.Field("request_id", header="x-request-id", generate=cb.new_request_id),
            cb.Field("tenant_id", header="x-tenant-id", inbound="always", redact="hash"),
        ]
    )
    api = FastAPI()

    @api.get("/")
    async def index() -> dict[str, Any]:
        return {"tenant": bridge.get("tenant_id")}

    with Records(ACCESS_LOGGER) as records, serve(instrument_asgi(api, bridge)) as base:
        assert httpx.get(base + "/", headers={"x-tenant-id": "acme"}).json() == {"tenant": "acme"}
        line = access_lines(records)[0]
    shown = server_spans(spans)[0].attributes["app.tenant_id"]
    assert shown != "acme"
    assert str(shown).startswith("sha256:")
    assert line.tenant_id == shown


def test_log_errors_off_leaves_error_logging_to_the_server(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, seen: dict[str, Any]
) -> None:
    """log_errors=False: no error line from the middleware; the 500 still carries the id."""
    with Records("otel_ctxbridge.asgi") as records:
        app = instrument_asgi(make_api(bridge, seen), bridge, log_errors=False)
        with serve(app) as base:
            response = httpx.get(base + "/boom", headers={"x-request-id": "rid-quiet"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "rid-quiet"
    assert not [r for r in records.records if r.levelno >= logging.ERROR]


def test_the_send_an_app_gets_is_a_coroutine_function_as_asgi_adapters_expect(
    bridge: cb.ContextBridge,
) -> None:
    """The wrapped ``send`` stays an ``async def``: asgiref's ``WsgiToAsgi`` (a WSGI app in an
    ASGI server) checks for one and warns on every request otherwise, and ``start_soon(send,
    message)`` in a task group needs a coroutine whatever the server's send returns."""
    import warnings

    from asgiref.wsgi import WsgiToAsgi

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["coroutine function"] = asyncio.iscoroutinefunction(send)
        await WsgiToAsgi(wsgi_app)(scope, receive, send)

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def server_send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(ContextBridgeMiddleware(app, bridge)(scope, receive, server_send))
    assert seen["coroutine function"] is True
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 200
    assert any(name == b"x-request-id" for name, _ in start["headers"])
