"""Hostile inbound headers through instrument_asgi on a real uvicorn server: never a 5xx caused
by the middleware (or by OTel's middleware behind it), always a valid echoed request id."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from _servers import serve
from fastapi import FastAPI
from opentelemetry import baggage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from otel_ctxbridge.asgi import instrument_asgi
from otel_ctxbridge.trust import TrustPolicy

SAFE_ID = re.compile(cb.REQUEST_ID_PATTERN)
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def raw_get(
    base: str, headers: list[tuple[bytes, bytes]], path: str = "/", host_header: bytes = b""
) -> tuple[int, dict[str, str]]:
    """GET with header bytes exactly as given (and the ``Host`` value, when given); returns
    (status, lower-cased headers)."""
    host, port = base.removeprefix("http://").split(":")
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    request = (
        b"GET "
        + path.encode()
        + b" HTTP/1.1\r\nHost: "
        + (host_header or host.encode())
        + b"\r\nConnection: close\r\n"
        + head
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request + b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        found[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return status, found


def make_app(bridge: cb.ContextBridge, trust: TrustPolicy | None, provider: TracerProvider) -> Any:
    api = FastAPI()

    @api.get("/")
    async def index() -> dict[str, Any]:
        return {"fields": dict(bridge.current()), "baggage": dict(baggage.get_all())}

    return instrument_asgi(api, bridge, trust=trust, tracer_provider=provider)


BRIDGE = cb.ContextBridge(
    fields=[
        cb.Field(
            "request_id",
            header="x-request-id",
            generate=cb.new_request_id,
            inbound="always",
            validator=cb.REQUEST_ID_PATTERN,
        ),
        cb.Field("tenant_id", header="x-tenant-id", inbound="trusted"),
        cb.Field("user_id", propagate=False),
    ]
)


@pytest.fixture(scope="module")
def provider() -> Iterator[TracerProvider]:
    """A recording SDK tracer provider for the module's servers (spans kept in memory)."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    yield tracer_provider
    tracer_provider.shutdown()


@pytest.fixture(scope="module", params=["untrusted", "trusted"])
def base(request: pytest.FixtureRequest, provider: TracerProvider) -> Iterator[str]:
    """The app behind instrument_asgi, once trusting nobody and once trusting loopback."""
    trust = TrustPolicy(networks=["127.0.0.0/8"]) if request.param == "trusted" else None
    with serve(make_app(BRIDGE, trust, provider)) as url:
        yield url


def assert_survives(base: str, headers: list[tuple[bytes, bytes]], raw_id: bytes = b"") -> str:
    """The request is answered (no 5xx) with a safe echoed id that is not the raw bad one."""
    status, response = raw_get(base, headers)
    assert status < 500, (status, headers[:1])
    echoed = response["x-request-id"]
    assert SAFE_ID.fullmatch(echoed)
    if raw_id:
        assert echoed.encode("latin-1") != raw_id
    return echoed


NON_UTF8 = [b"\xff\xfe", b"\xc3\x28", b"\xff\\x", b"\\N{", b"\xe2\x82", b"ok\x80\\u12"]


@pytest.mark.parametrize("raw", NON_UTF8)
@pytest.mark.parametrize(
    "header", [b"traceparent", b"tracestate", b"baggage", b"x-request-id", b"x-tenant-id"]
)
def test_non_utf8_and_bad_escapes_in_context_headers(base: str, header: bytes, raw: bytes) -> None:
    """Bytes that are not UTF-8 (and broken backslash escapes, which make OTel's middleware
    answer 500 on its own) in any context header: answered, with a generated id."""
    headers = [(header, raw)]
    if header == b"tracestate":
        headers.insert(0, (b"traceparent", TRACEPARENT))
    assert uuid.UUID(assert_survives(base, headers, raw_id=raw)).version == 4


@pytest.mark.parametrize("raw", NON_UTF8)
def test_undecodable_bytes_in_headers_otel_reads(base: str, raw: bytes) -> None:
    """user-agent / host-like headers OTel decodes for its attributes cannot crash it."""
    assert_survives(base, [(b"user-agent", raw), (b"x-forwarded-host", raw)])


@pytest.mark.parametrize("host", [b"a\xff\\x", b"ex\\N{ample", b"\xc3\x28"])
def test_undecodable_host_header(base: str, host: bytes) -> None:
    """OTel's middleware decodes the ``Host`` header (backslash escapes included) before it
    calls any hook: bytes it cannot decode are hidden by the shield outside it, so the
    request is answered, with a generated id, instead of a 500."""
    status, response = raw_get(base, [], host_header=host)
    assert status < 500, status
    assert SAFE_ID.fullmatch(response["x-request-id"])


def test_oversized_headers(base: str) -> None:
    """An 8 KB request id, a 12 KB tracestate and a 12 KB baggage: answered, id replaced."""
    big_id = b"a" * 8000
    headers = [
        (b"x-request-id", big_id),
        (b"traceparent", TRACEPARENT),
        (b"tracestate", b"k=" + b"v" * 12000),
        (b"baggage", b"request_id=" + b"r" * 12000),
    ]
    assert uuid.UUID(assert_survives(base, headers, raw_id=big_id)).version == 4


def test_headers_past_the_servers_limit_are_not_a_5xx(base: str) -> None:
    """Headers beyond what the server accepts are refused by the server, never a 5xx."""
    host, port = base.removeprefix("http://").split(":")
    request = b"GET / HTTP/1.1\r\nHost: x\r\nx-request-id: " + b"a" * 200_000 + b"\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(request)
            data = sock.recv(65536)
        except OSError:
            data = b""
    if data:
        assert int(data.split(b" ")[1]) < 500


def test_two_hundred_baggage_members(base: str) -> None:
    """200 members (more than the 180 kept): answered; a request id past the limit is not
    taken, one inside it is."""
    members = b",".join(b"m%d=v%d" % (i, i) for i in range(199))
    echoed = assert_survives(base, [(b"baggage", members + b",request_id=late")])
    assert echoed != "late"
    early = b"request_id=early," + members
    assert assert_survives(base, [(b"baggage", early)]) == "early"


@pytest.mark.parametrize(
    "value",
    [
        b"request_id=%zz",
        b"request_id=%E2%82",
        b"request_id=%",
        b"request_id=abc%0D%0AX-Injected:%201",
        b"request_id=abc%00def",
        b"request_id=a b",
        b"request_id",
        b"=value,request_id=",
        b",,,;;;===",
    ],
)
def test_invalid_baggage_encodings_are_dropped(base: str, value: bytes) -> None:
    """Invalid percent-encoding, encoded CR/LF or NUL, missing '=': the member is dropped and
    a request id generated; never echoed."""
    assert uuid.UUID(assert_survives(base, [(b"baggage", value)])).version == 4


def test_control_characters_and_crlf_in_request_ids(base: str) -> None:
    """Control characters in X-Request-ID never come back in the response headers."""
    for raw in (b"abc\x01def", b"abc\x7f", b"abc\tdef", b"%0d%0aSet-Cookie:x=y"):
        echoed = assert_survives(base, [(b"x-request-id", raw)], raw_id=raw)
        assert "\r" not in echoed
        assert "\n" not in echoed
    status, _ = raw_get(base, [(b"x-request-id", b"abc\rdef")])
    assert status < 500  # the server itself refuses a bare CR: 400, never 5xx


def test_duplicated_headers(base: str) -> None:
    """Duplicated traceparent (a new trace), X-Request-ID (the first valid one) and baggage
    (combined) are all answered."""
    headers = [
        (b"traceparent", TRACEPARENT),
        (b"traceparent", TRACEPARENT.replace(b"-01", b"-00")),
        (b"x-request-id", b"bad id"),
        (b"x-request-id", b"rid-second"),
        (b"baggage", b"a=1"),
        (b"baggage", b"b=2"),
    ]
    assert assert_survives(base, headers) == "rid-second"


def test_secret_header_with_hostile_bytes(provider: TracerProvider) -> None:
    """A shared-secret header holding undecodable bytes or repeated: untrusted, answered."""
    with serve(make_app(BRIDGE, TrustPolicy(secret="s"), provider)) as url:
        assert_survives(url, [(b"x-ctxbridge-secret", b"\xff\\x"), (b"x-tenant-id", b"acme")])
        assert_survives(url, [(b"x-ctxbridge-secret", b"s"), (b"x-ctxbridge-secret", b"s")])


@pytest.mark.parametrize("length_limit", [None, 8], ids=["no-limit", "length-limit"])
def test_spoofed_baggage_never_shows_on_the_server_span_under_the_users_own_otel(
    bridge: cb.ContextBridge, length_limit: int | None
) -> None:
    """With ``ContextBridgeMiddleware`` inside the user's own OTel middleware (no header
    shield: OTel extracts the raw ``baggage`` header, and ``ContextSpanProcessor`` copies it
    onto the new server span), the copied values the middleware did not accept leave the
    server span: an untrusted peer's ``tenant_id`` is not there, and a ``request_id`` in
    baggage does not beat the header's (also where the SDK cuts attribute values to a length
    limit). Values the user's own hook set stay."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import SpanLimits

    from otel_ctxbridge.asgi import ContextBridgeMiddleware

    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_attribute_length=length_limit))
    provider.add_span_processor(cb.ContextSpanProcessor(bridge))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    api = FastAPI()

    @api.get("/")
    async def index() -> dict[str, Any]:
        return dict(bridge.current())

    def hook(span: Any, scope: dict[str, Any]) -> None:
        span.set_attribute("app.user_id", "hook-user")
        if (b"x-hook-tenant", b"yes") in scope["headers"]:
            span.set_attribute("app.tenant_id", "from-hook")

    app = OpenTelemetryMiddleware(
        ContextBridgeMiddleware(api, bridge), tracer_provider=provider, server_request_hook=hook
    )
    spoofed = (b"baggage", b"tenant_id=evil-tenant-long,request_id=spoofed-1")
    with serve(app) as base:
        status, headers = raw_get(base, [(b"x-request-id", b"rid-header"), spoofed])
        assert (status, headers["x-request-id"]) == (200, "rid-header")
        status, _ = raw_get(base, [spoofed, (b"x-hook-tenant", b"yes")])
        assert status == 200
    first, second = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert first.attributes["app.request_id"] == "rid-header"[:length_limit]
    assert "app.tenant_id" not in first.attributes
    assert first.attributes["app.user_id"] == "hook-user"[:length_limit]
    assert second.attributes["app.tenant_id"] == "from-hook"[:length_limit]


def test_oversized_baggage_is_reported_as_past_the_limits_not_as_malformed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2,000 well-formed members: the drop warning says the limits may be why (not only
    "malformed"), counted once under "baggage", without any member's value."""
    import logging

    from otel_ctxbridge._inbound import InboundReader

    bridge = cb.ContextBridge([cb.Field("request_id", header="x-request-id", inbound="always")])
    reader = InboundReader(bridge, TrustPolicy(), "request_id")
    members = b",".join(b"m%d=secret%d" % (i, i) for i in range(2000))
    scope = {"type": "http", "headers": [(b"baggage", members)], "client": ("203.0.113.9", 1)}
    with caplog.at_level(logging.WARNING):
        reader.read(scope)
    assert bridge.drop_counts() == {"baggage": 1}
    assert "past 180 members or 8192 bytes" in caplog.text
    assert "secret" not in caplog.text
