"""Inbound trace context per W3C Trace Context Level 1: the parsers, and the key cases of the
W3C test suite (github.com/w3c/trace-context, test/test.py) run against
``examples/w3c_test_service.py`` served by uvicorn, with a recording harness on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import serve
from fastapi import FastAPI
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import otel_ctxbridge as cb
from otel_ctxbridge.asgi import instrument_asgi
from otel_ctxbridge.tracecontext import parse_traceparent, parse_tracestate

TRACE = "12345678901234567890123456789012"
PARENT = "1234567890123456"
VALID = f"00-{TRACE}-{PARENT}-01"
ZERO_TRACE = "0" * 32

# -- the parsers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([VALID], VALID),
        ([f" \t{VALID} \t"], VALID),
        ([f"cc-{TRACE}-{PARENT}-01"], VALID),
        ([f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like"], VALID),
        ([f"00-{TRACE}-{PARENT}-00"], f"00-{TRACE}-{PARENT}-00"),
    ],
)
def test_valid_traceparent_is_normalised(values: list[str], expected: str) -> None:
    """Valid version-00 and future-version headers come back as version 00, OWS removed."""
    assert parse_traceparent(values) == expected


@pytest.mark.parametrize(
    "values",
    [
        [],
        [VALID, VALID],
        [f"{VALID}."],
        [f"{VALID}-what-the-future-will-be-like"],
        [f"cc-{TRACE}-{PARENT}-01.what-the-future-will-be-like"],
        [f"ff-{TRACE}-{PARENT}-01"],
        [f".0-{TRACE}-{PARENT}-01"],
        [f"000-{TRACE}-{PARENT}-01"],
        [f"0-{TRACE}-{PARENT}-01"],
        [f"00-{ZERO_TRACE}-{PARENT}-01"],
        [f"00-{TRACE}-{'0' * 16}-01"],
        [f"00-{TRACE.upper()[:-1]}A-{PARENT}-01"],
        [f"00-{TRACE}3-{PARENT}-01"],
        [f"00-{TRACE[:-1]}-{PARENT}-01"],
        [f"00-{TRACE}-{PARENT}7-01"],
        [f"00-{TRACE}-{PARENT[:-1]}-01"],
        [f"00-{TRACE}-{PARENT}-.0"],
        [f"00-{TRACE}-{PARENT}-001"],
        [f"00-{TRACE}-{PARENT}-1"],
        [f"{VALID}, {VALID}"],
        ["\xff" * 55],
        [""],
    ],
)
def test_invalid_traceparent_is_refused(values: list[str]) -> None:
    """Duplicates, wrong lengths, illegal characters, version ff, all-zero ids: None."""
    assert parse_traceparent(values) is None


def test_tracestate_combines_headers_in_order_and_skips_empty_members() -> None:
    """Several tracestate header fields are one list, in order; empty members are skipped."""
    headers = ["foo=1,bar=2", "", "rojo=1, \t congo=2 ,", "baz=3"]
    assert parse_tracestate(headers) == "foo=1,bar=2,rojo=1,congo=2,baz=3"


@pytest.mark.parametrize(
    "values",
    [
        ["foo=1,foo=1"],
        ["foo=1", "foo=2"],
        ["foo =1"],
        ["FOO=1"],
        ["foo.bar=1"],
        ["foo@=1,bar=2"],
        ["@foo=1,bar=2"],
        ["foo@@bar=1,bar=2"],
        ["foo@bar@baz=1,bar=2"],
        ["foo=bar=baz"],
        ["foo=,bar=3"],
        ["foo=1", "z" * 257 + "=1"],
        ["foo=1", "t" * 242 + "@v=1"],
        ["foo=1", "t@" + "v" * 15 + "=1"],
        [",".join(f"k{i}=v" for i in range(33))],
        ["foo=" + "x" * 257],
        ["foo=\x7f"],
        ["a=" + "b" * 9000],
    ],
)
def test_invalid_tracestate_is_discarded_whole(values: list[str]) -> None:
    """Duplicated keys, bad keys or values, over 32 members, oversized input: None."""
    assert parse_tracestate(values) is None


def test_tracestate_limits_and_allowed_characters() -> None:
    """32 members, 256-character keys, tenant@vendor keys and every allowed value character."""
    assert parse_tracestate([",".join(f"k{i:02}=v" for i in range(32))]) is not None
    assert parse_tracestate(["z" * 256 + "=1"]) == "z" * 256 + "=1"
    assert parse_tracestate(["t" * 241 + "@" + "v" * 14 + "=1"]) is not None
    key = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
    value = "".join(map(chr, range(0x20, 0x2C))) + "".join(map(chr, range(0x2D, 0x3D)))
    value += "".join(map(chr, range(0x3E, 0x7F)))
    assert parse_tracestate([f"{key}={value}"]) == f"{key}={value}"
    assert parse_tracestate([f"{key}@a-z0-9_-*/={value}"]) == f"{key}@a-z0-9_-*/={value}"


def test_long_tracestate_is_truncated_by_whole_members() -> None:
    """Past 512 characters, members over 128 characters go first, then members from the end."""
    big = "big=" + "x" * 200
    small = [f"m{i:02}=" + "y" * 40 for i in range(12)]
    result = parse_tracestate([",".join([*small[:3], big, *small[3:]])])
    assert result is not None
    assert len(result) <= 512
    assert "big=" not in result
    assert result.startswith("m00=")
    members = result.split(",")
    assert members == [m for m in small if m in members]  # order kept, a prefix of the list


# -- the W3C suite's cases against the example service ---------------------------------------


class Harness:
    """The suite's callback side: records the headers of each callback by its path."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[str, str]]] = {}
        self.url = ""
        self._ids = itertools.count()

    def app(self) -> Starlette:
        async def record(request: Request) -> PlainTextResponse:
            self.calls[request.path_params["name"]] = list(request.headers.items())
            return PlainTextResponse("ok")

        return Starlette(routes=[Route("/{name}", record, methods=["POST"])])

    def new_name(self) -> str:
        return f"cb{next(self._ids)}"


def _load_example() -> Any:
    path = Path(__file__).resolve().parent.parent / "examples" / "w3c_test_service.py"
    spec = importlib.util.spec_from_file_location("w3c_test_service", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite() -> Iterator[tuple[str, Harness]]:
    """The example service and the harness, each under its own uvicorn on 127.0.0.1."""
    harness = Harness()
    provider = TracerProvider()
    service = _load_example().build_app(tracer_provider=provider)
    with serve(harness.app()) as harness_url, serve(service) as service_url:
        harness.url = harness_url
        yield service_url + "/test", harness
    provider.shutdown()


def _raw_post(url: str, headers: list[tuple[str, str]], body: bytes) -> int:
    """POST with the header lines exactly as given (OWS included, as the suite sends them)."""
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return int(response.split(b" ", 2)[1])


def _run(
    suite: tuple[str, Harness], headers: list[tuple[str, str]], count: int = 1
) -> list[list[tuple[str, str]]]:
    """Send one harness request; return the headers of each callback the service made."""
    endpoint, harness = suite
    names = [harness.new_name() for _ in range(count)]
    body = [{"url": f"{harness.url}/{name}", "arguments": []} for name in names]
    assert _raw_post(endpoint, headers, json.dumps(body).encode()) == 200
    return [harness.calls[name] for name in names]


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _traceparent(headers: list[tuple[str, str]]) -> tuple[str, str]:
    found = [v for k, v in headers if k.lower() == "traceparent"]
    assert len(found) == 1, found
    match = _TRACEPARENT.fullmatch(found[0])
    assert match is not None, found[0]
    assert match.group(1) != ZERO_TRACE
    return match.group(1), match.group(2)


def _tracestate(headers: list[tuple[str, str]]) -> dict[str, str]:
    state: dict[str, str] = {}
    for key, value in headers:
        if key.lower() == "tracestate":
            for member in value.split(","):
                if member.strip():
                    k, _, v = member.strip().partition("=")
                    state.setdefault(k, v)
    return state


def _trace_of(suite: tuple[str, Harness], headers: list[tuple[str, str]]) -> str:
    return _traceparent(_run(suite, headers)[0])[0]


def test_w3c_missing_traceparent_starts_a_valid_trace(suite: tuple[str, Harness]) -> None:
    """No traceparent or tracestate: the callback carries a valid new traceparent."""
    _traceparent(_run(suite, [])[0])


def test_w3c_valid_traceparent_is_continued(suite: tuple[str, Harness]) -> None:
    """Same trace id, a new parent id; header names in any casing."""
    for name in ("traceparent", "TraceParent", "TrAcEpArEnT", "TRACEPARENT"):
        trace_id, parent = _traceparent(_run(suite, [(name, VALID)])[0])
        assert trace_id == TRACE
        assert parent != PARENT


@pytest.mark.parametrize(
    "headers",
    [
        [("traceparent", f"00-{TRACE[:-1]}1-{PARENT}-01"), ("traceparent", VALID)],
        [("trace-parent", VALID)],
        [("trace.parent", VALID)],
        [("traceparent", f"{VALID}.")],
        [("traceparent", f"{VALID}-what-the-future-will-be-like")],
        [("traceparent", f"cc-{TRACE}-{PARENT}-01.what-the-future-will-be-like")],
        [("traceparent", f"ff-{TRACE}-{PARENT}-01")],
        [("traceparent", f"0.-{TRACE}-{PARENT}-01")],
        [("traceparent", f"0000-{TRACE}-{PARENT}-01")],
        [("traceparent", f"0-{TRACE}-{PARENT}-01")],
        [("traceparent", f"00-1234567890123456789012345678901.-{PARENT}-01")],
        [("traceparent", f"00-{TRACE}3-{PARENT}-01")],
        [("traceparent", f"00-{TRACE[:-1]}-{PARENT}-01")],
        [("traceparent", f"00-{TRACE}-0000000000000000-01")],
        [("traceparent", f"00-{TRACE}-123456789012345.-01")],
        [("traceparent", f"00-{TRACE}-{PARENT}7-01")],
        [("traceparent", f"00-{TRACE}-{PARENT[:-1]}-01")],
        [("traceparent", f"00-{TRACE}-{PARENT}-0.")],
        [("traceparent", f"00-{TRACE}-{PARENT}-001")],
        [("traceparent", f"00-{TRACE}-{PARENT}-1")],
    ],
)
def test_w3c_invalid_traceparent_starts_a_new_trace(
    suite: tuple[str, Harness], headers: list[tuple[str, str]]
) -> None:
    """Duplicated, misnamed or malformed traceparent: a new trace id, never the inbound one."""
    assert _trace_of(suite, headers) not in (TRACE, TRACE[:-1] + "1")


def test_w3c_all_zero_trace_id_is_replaced(suite: tuple[str, Harness]) -> None:
    """An all-zero trace id is invalid: a new, non-zero trace id is used."""
    assert _trace_of(suite, [("traceparent", f"00-{ZERO_TRACE}-{PARENT}-01")]) != ZERO_TRACE


def test_w3c_future_version_is_read_leniently(suite: tuple[str, Harness]) -> None:
    """Version 0xcc, with or without future fields after '-': same trace id."""
    assert _trace_of(suite, [("traceparent", f"cc-{TRACE}-{PARENT}-01")]) == TRACE
    future = f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like"
    assert _trace_of(suite, [("traceparent", future)]) == TRACE


def test_w3c_traceparent_ows_is_ignored(suite: tuple[str, Harness]) -> None:
    """Leading and trailing spaces and tabs around traceparent are ignored."""
    for value in (f" {VALID}", f"\t{VALID}", f"{VALID} ", f"{VALID}\t", f"\t {VALID} \t"):
        assert _trace_of(suite, [("traceparent", value)]) == TRACE


def _state_of(suite: tuple[str, Harness], *states: tuple[str, str]) -> dict[str, str]:
    headers = [("traceparent", f"00-{TRACE}-{PARENT}-00"), *states]
    callback = _run(suite, headers)[0]
    assert _traceparent(callback)[0] == TRACE
    return _tracestate(callback)


def test_w3c_tracestate_is_inherited(suite: tuple[str, Harness]) -> None:
    """A valid tracestate with a valid traceparent is propagated; header names any casing."""
    assert _state_of(suite, ("tracestate", "foo=1,bar=2")) == {"foo": "1", "bar": "2"}
    for name in ("TraceState", "TrAcEsTaTe", "TRACESTATE"):
        assert _state_of(suite, (name, "foo=1")) == {"foo": "1"}


def test_w3c_tracestate_without_traceparent_is_discarded(suite: tuple[str, Harness]) -> None:
    """tracestate alone is dropped: two different ones lead to the same (empty) state."""
    first = _tracestate(_run(suite, [("tracestate", "foo=1")])[0])
    second = _tracestate(_run(suite, [("tracestate", "foo=1,bar=2")])[0])
    assert first == second == {}


def test_w3c_tracestate_misnamed_header_is_ignored(suite: tuple[str, Harness]) -> None:
    """'trace-state' and 'trace.state' are not tracestate."""
    assert "foo" not in _state_of(suite, ("trace-state", "foo=1"))
    assert "foo" not in _state_of(suite, ("trace.state", "foo=1"))


def test_w3c_tracestate_empty_and_multiple_headers(suite: tuple[str, Harness]) -> None:
    """Empty tracestate headers add nothing; several headers combine in order."""
    assert _state_of(suite, ("tracestate", "")) == {}
    assert _state_of(suite, ("tracestate", "foo=1"), ("tracestate", "")) == {"foo": "1"}
    assert _state_of(suite, ("tracestate", ""), ("tracestate", "foo=1")) == {"foo": "1"}
    headers = [
        ("tracestate", "foo=1,bar=2"),
        ("tracestate", "rojo=1,congo=2"),
        ("tracestate", "baz=3"),
    ]
    state = _state_of(suite, *headers)
    assert list(state.items()) == [
        ("foo", "1"),
        ("bar", "2"),
        ("rojo", "1"),
        ("congo", "2"),
        ("baz", "3"),
    ]


@pytest.mark.parametrize(
    "states",
    [
        [("tracestate", "foo=1,foo=1")],
        [("tracestate", "foo=1,foo=2")],
        [("tracestate", "foo=1"), ("tracestate", "foo=1")],
        [("tracestate", "foo=1"), ("tracestate", "foo=2")],
        [("tracestate", "foo =1")],
        [("tracestate", "FOO=1")],
        [("tracestate", "foo.bar=1")],
        [("tracestate", "foo@=1,bar=2")],
        [("tracestate", "@foo=1,bar=2")],
        [("tracestate", "foo@@bar=1,bar=2")],
        [("tracestate", "foo@bar@baz=1,bar=2")],
        [("tracestate", "foo=bar=baz")],
        [("tracestate", "foo=,bar=3")],
        [("tracestate", "foo=1"), ("tracestate", "z" * 257 + "=1")],
        [("tracestate", "foo=1"), ("tracestate", "t" * 242 + "@v=1")],
        [("tracestate", "foo=1"), ("tracestate", "t@" + "v" * 15 + "=1")],
        [("tracestate", ",".join(f"bar{i:02}={i:02}" for i in range(1, 34)))],
    ],
)
def test_w3c_invalid_tracestate_is_discarded(
    suite: tuple[str, Harness], states: list[tuple[str, str]]
) -> None:
    """Duplicated keys, illegal keys/values/vendor format, too many members: no tracestate,
    and the trace itself is still continued."""
    assert _state_of(suite, *states) == {}


def test_w3c_tracestate_limits_are_accepted(suite: tuple[str, Harness]) -> None:
    """32 members across headers, 256-character keys, tenant@vendor keys at their limits."""
    members = [f"bar{i:02}={i:02}" for i in range(1, 33)]
    headers = [("tracestate", ",".join(members[i : i + 10])) for i in range(0, 32, 10)]
    state = _state_of(suite, *headers)
    assert len(state) == 32
    assert state["bar01"] == "01"
    assert _state_of(suite, ("tracestate", "foo=1"), ("tracestate", "z" * 256 + "=1"))["foo"] == "1"
    vendor = "t" * 241 + "@" + "v" * 14 + "=1"
    assert _state_of(suite, ("tracestate", "foo=1"), ("tracestate", vendor))["foo"] == "1"


def test_w3c_tracestate_all_allowed_characters_and_ows(suite: tuple[str, Harness]) -> None:
    """Every legal key and value character survives; OWS around members is ignored."""
    key = "".join(map(chr, range(0x61, 0x7B))) + "0123456789_-*/"
    value = "".join(map(chr, range(0x20, 0x2C))) + "".join(map(chr, range(0x2D, 0x3D)))
    value += "".join(map(chr, range(0x3E, 0x7F)))
    assert _state_of(suite, ("tracestate", f"{key}={value}"))[key] == value
    expected = {"foo": "1", "bar": "2", "baz": "3"}
    assert _state_of(suite, ("tracestate", "foo=1 \t , \t bar=2, \t baz=3")) == expected
    assert _state_of(suite, ("tracestate", "\t foo=1 \t")) == {"foo": "1"}


def test_w3c_multiple_callbacks_share_the_trace(suite: tuple[str, Harness]) -> None:
    """Three callbacks: one trace id (the inbound one), three different parent ids."""
    callbacks = _run(suite, [("traceparent", VALID)], count=3)
    pairs = [_traceparent(c) for c in callbacks]
    assert {t for t, _ in pairs} == {TRACE}
    assert len({p for _, p in pairs}) == 3


def test_w3c_multiple_callbacks_without_or_with_illegal_traceparent(
    suite: tuple[str, Harness],
) -> None:
    """Without a (valid) traceparent: one new non-zero trace, three parent ids."""
    for headers in ([], [("traceparent", f"00-{ZERO_TRACE}-{PARENT}-01")]):
        pairs = [_traceparent(c) for c in _run(suite, headers, count=3)]
        assert len({t for t, _ in pairs}) == 1
        assert len({p for _, p in pairs}) == 3


def test_unsampled_trace_through_a_fastapi_service(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """An inbound ``traceparent`` with sampled=0 (as most of the suite's tracestate cases send)
    through a FastAPI service, with FastAPI's native telemetry enabled by a global SDK provider:
    the callback continues the trace, unsampled, with the tracestate, and the request keeps its
    context (the native telemetry does not replace it with one extracted from the headers, which
    would also adopt the untrusted baggage); nothing is recorded."""
    harness = Harness()
    client = httpx.AsyncClient(timeout=5.0)
    HTTPXClientInstrumentor.instrument_client(client)
    api = FastAPI()

    @api.post("/test")
    async def test(request: Request) -> dict[str, Any]:
        for call in await request.json():
            await client.post(call["url"], json=[])
        return {"fields": dict(bridge.current())}

    headers = [
        ("traceparent", f"00-{TRACE}-{PARENT}-00"),
        ("tracestate", "foo=1,bar=2"),
        ("x-request-id", "rid-w3c"),
        ("baggage", "tenant_id=evil"),
    ]
    with serve(harness.app()) as harness_url, serve(instrument_asgi(api, bridge)) as url:
        harness.url = harness_url
        (callback,) = _run((url + "/test", harness), headers)
    values = dict(callback)
    assert values["traceparent"].startswith(f"00-{TRACE}-")
    assert values["traceparent"].endswith("-00")
    assert _tracestate(callback) == {"foo": "1", "bar": "2"}
    assert values["baggage"] == "request_id=rid-w3c"
    assert spans.get_finished_spans() == ()


TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("headers", "as_they_came"),
    [
        ([(b"host", b"a"), (b"traceparent", TP)], True),
        ([(b"traceparent", TP), (b"tracestate", b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")], True),
        ([(b"traceparent", TP.upper())], False),  # invalid: refused, a new trace
        ([(b"traceparent", b" " + TP)], False),  # valid once its spaces go
        ([(b"traceparent", TP), (b"traceparent", TP)], False),  # duplicated: invalid
        ([(b"traceparent", TP), (b"tracestate", b"a=1, b=2")], False),  # normalised
        ([(b"traceparent", TP), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")], False),
        ([(b"traceparent", TP), (b"tracestate", b"A=1")], False),  # invalid: dropped
        ([(b"traceparent", TP), (b"baggage", b"a=1")], False),  # baggage: hidden
        ([(b"traceparent", TP), (b"x-secret", b"s")], False),  # the trust secret: hidden
        ([(b"traceparent", TP), (b"x-note", b"a\\x")], False),  # a backslash: checked
        ([(b"tracestate", b"a=1")], False),  # no traceparent: tracestate goes
        ([(b"traceparent", TP), (b"Traceparent", TP)], False),  # OTel reads names lowered
    ],
)
async def test_trace_header_shield_passes_ready_trace_headers_as_they_came(
    headers: list[tuple[bytes, bytes]], as_they_came: bool
) -> None:
    """A request whose only trace headers are one ``traceparent`` (and one ``tracestate``)
    already in the form the shield would give them reaches OTel's middleware as it came (no
    copy of the scope); anything the shield changes or hides goes through it, and the
    headers OTel sees are the same either way."""
    from otel_ctxbridge import _shield
    from otel_ctxbridge._inbound import ORIGINAL_HEADERS
    from otel_ctxbridge._shield import TraceHeaderShield

    seen: list[dict[str, Any]] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)

    shield = TraceHeaderShield(inner, hidden=("x-secret",))
    scope: dict[str, Any] = {"type": "http", "headers": list(headers)}
    await shield(scope, None, None)
    assert (seen[-1] is scope) is as_they_came
    assert (ORIGINAL_HEADERS not in seen[-1]) is as_they_came
    if as_they_came:  # what the full path would give OTel: the same trace headers
        full = _shield.shield_headers(headers, frozenset({b"x-secret"}))
        trace = {b"traceparent", b"tracestate"}
        assert sorted(h for h in full if h[0] in trace) == sorted(
            h for h in headers if h[0] in trace
        )


def test_trace_header_shield_reads_header_names_as_otel_does() -> None:
    """Header names in another case (from a server that does not lower them, as ASGI asks)
    are read lowered, as OTel's getter reads them: a second ``Traceparent`` makes the pair
    duplicated (a new trace), and a ``Baggage`` header is hidden like ``baggage``."""
    from otel_ctxbridge._shield import shield_headers, trace_headers

    headers = [(b"traceparent", TP), (b"Traceparent", TP), (b"Baggage", b"tenant_id=evil")]
    assert trace_headers(headers, frozenset({b"baggage"})) is None  # the full path
    assert shield_headers(headers) == []
    assert shield_headers([(b"Host", b"a"), (b"TraceParent", TP)]) == [
        (b"Host", b"a"),
        (b"traceparent", TP),
    ]
