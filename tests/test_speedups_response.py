"""The compiled steps of a request's way in and out (``request_id_ready``,
``response_started``, ``stamp_plain``) do what their Python twins do, or hand the case back to
them (None, NotImplemented)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from starlette.routing import Mount, Route

import otel_ctxbridge as cb
from otel_ctxbridge import _accel, _exchange, _runtime, _scope
from otel_ctxbridge._derive import derive_context
from otel_ctxbridge._span_write import write_attributes
from otel_ctxbridge._state import Frame
from otel_ctxbridge.asgi import ContextBridgeMiddleware

pytestmark = pytest.mark.skipif(_accel.speedups is None, reason="the accelerator is not built")

RID = "3f1c2a9e-8d6b-4c1e-9a2f-7b5d3e4c1a90"
PROVIDER = TracerProvider()
TRACER = PROVIDER.get_tracer("test")


async def _endpoint(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - unused
    pass


ITEM = Route("/items/{item_id}", _endpoint)
MOUNT = Mount("/t/{tenant}", routes=[ITEM])


def _bridge() -> cb.ContextBridge:
    return cb.ContextBridge(
        [
            cb.Field("request_id", header="x-request-id", generate=cb.new_request_id),
            cb.Field("tenant_id"),
            cb.Field("user_id", propagate=False),
            cb.Field("email", redact=lambda v: "***"),
        ]
    )


BRIDGE = _bridge()
MW = ContextBridgeMiddleware(_endpoint, BRIDGE)

SCOPES: dict[str, dict[str, Any]] = {
    "a route": {"route": ITEM, "root_path": ""},
    "a route, server root path": {"route": ITEM, "root_path": "/api"},
    "a route, Starlette router": {"route": ITEM, "root_path": "/api", "app_root_path": "/api"},
    "under a mount": {"route": ITEM, "root_path": "/t/acme", "app_root_path": ""},
    "the mount itself": {"route": MOUNT, "root_path": "", "app_root_path": ""},
    "FastAPI": {"route": ITEM, "root_path": "", "fastapi": {}},
    "no route": {"root_path": ""},
    "no root path": {"route": ITEM},
}
MESSAGES: dict[str, Callable[[], dict[str, Any]]] = {
    "no headers": lambda: {"type": "http.response.start", "status": 200},
    "headers": lambda: {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain")],
    },
    "the app's own id": lambda: {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"X-Request-ID", b"mine")],
    },
    "a 404": lambda: {"type": "http.response.start", "status": 404},
}


def _exchange_for(scope: dict[str, Any], how: str) -> _exchange.Exchange:
    span: Any = TRACER.start_span("GET /items/42", kind=SpanKind.SERVER)
    frame = Frame((span,))
    named = "GET /items/42"
    echo: bytes | None = RID.encode()
    if how == "renamed since":
        span.update_name("custom")
    elif how == "ended":
        span.end()
    elif how == "no echo":
        echo = None
    elif how == "not named":
        named = None  # type: ignore[assignment] # the hook did not name it
    ctx = derive_context(BRIDGE, Context(), {"request_id": RID}, frame)
    if how == "updated":
        token = _runtime.attach(ctx)
        try:
            BRIDGE.update(request_id="changed-by-update")
        finally:
            _runtime.detach(token)
    exchange = _exchange.Exchange(MW, {"type": "http", **scope}, _endpoint, ctx, frame, echo, named)
    return exchange


def _result(exchange: _exchange.Exchange, message: dict[str, Any]) -> tuple[Any, ...]:
    span: Any = exchange.frame.spans[0]
    return span.name, dict(span.attributes or {}), message.get("headers")


HOW = ["as it comes", "renamed since", "ended", "no echo", "not named", "updated"]


def _cases() -> Iterator[tuple[str, str, str]]:
    for scope in SCOPES:
        for message in MESSAGES:
            for how in HOW:
                yield scope, message, how


@pytest.mark.parametrize(("scope", "message", "how"), list(_cases()))
def test_a_compiled_response_start_does_what_python_does_or_hands_it_back(
    scope: str, message: str, how: str
) -> None:
    """Echo, rename and ``http.route``: where the compiled step answers True, the span and the
    message are as the Python ``_started`` leaves them; where it cannot tell, it says
    NotImplemented (and the Python step, run after it, still gives the same result)."""
    expected_exchange = _exchange_for(SCOPES[scope], how)
    expected_message = MESSAGES[message]()
    expected_exchange.status = expected_message["status"]
    expected_exchange._started(expected_message)
    expected = _result(expected_exchange, expected_message)

    exchange = _exchange_for(SCOPES[scope], how)
    sent = MESSAGES[message]()
    exchange.status = sent["status"]
    answer = _accel.speedups.response_started(exchange, sent)  # type: ignore[union-attr]
    assert answer is True or answer is NotImplemented
    if answer is NotImplemented:
        exchange._started(sent)
    assert _result(exchange, sent) == expected


def test_the_plain_cases_are_done_compiled() -> None:
    """The common requests never fall back: a route outside any mount, with or without the
    server's root path (and Starlette's router), with the id echoed or the app's own kept."""
    for scope in ("a route", "a route, server root path", "a route, Starlette router"):
        for message in ("no headers", "headers", "the app's own id"):
            exchange = _exchange_for(SCOPES[scope], "as it comes")
            sent = MESSAGES[message]()
            assert _accel.speedups.response_started(exchange, sent) is True  # type: ignore[union-attr]
    exchange = _exchange_for(SCOPES["a route, server root path"], "as it comes")
    sent = MESSAGES["no headers"]()
    _accel.speedups.response_started(exchange, sent)  # type: ignore[union-attr]
    assert _result(exchange, sent) == (
        "GET /api/items/{item_id}",
        {"http.route": "/api/items/{item_id}"},
        [(b"x-request-id", RID.encode())],
    )


STAMPS: dict[str, dict[str, Any]] = {
    "plain text": {"request_id": RID, "tenant_id": "acme"},
    "process-local text": {"user_id": "u-1"},
    "an unset value": {"request_id": RID, "tenant_id": None},
    "a redacted field": {"email": "a@example.com", "tenant_id": "acme"},
    "an object": {"user_id": object()},
    "a number": {"user_id": 7},
    "nothing": {},
}


@pytest.mark.parametrize("values", list(STAMPS))
@pytest.mark.parametrize("ended", [False, True])
def test_a_compiled_stamp_writes_what_python_writes_or_hands_it_back(
    values: str, ended: bool
) -> None:
    """``stamp_plain`` writes the same attributes as ``span_attributes`` + ``write_attributes``
    for plain text of fields shown as they are, and hands every other value back."""
    expected_span: Any = TRACER.start_span("GET /", attributes={"http.method": "GET"})
    span: Any = TRACER.start_span("GET /", attributes={"http.method": "GET"})
    if ended:
        expected_span.end()
        span.end()
    attributes = _scope.span_attributes(BRIDGE, STAMPS[values])
    if attributes:
        write_attributes(expected_span, attributes)
    stamp_plain = _accel.speedups.stamp_plain  # type: ignore[union-attr]
    answer = stamp_plain(span, BRIDGE._plain_attributes, dict(STAMPS[values]))
    assert answer is True or answer is NotImplemented
    if answer is NotImplemented:
        assert values in ("a redacted field", "an object", "a number")
        if attributes:
            write_attributes(span, attributes)
    assert dict(span.attributes) == dict(expected_span.attributes)


@settings(max_examples=500, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=140),
        st.text(alphabet="Az09._:+/=@- \t\r\n%\u00e9", max_size=140).map(str.encode),
        st.from_regex(cb.REQUEST_ID_PATTERN, fullmatch=True).map(str.encode),
    ),
    max_length=st.sampled_from([8, 36, 128, 256]),
)
def test_a_compiled_request_id_check_accepts_exactly_what_the_python_checks_accept(
    raw: bytes, max_length: int
) -> None:
    """``request_id_ready`` takes an inbound request id as valid only where the field's own
    check and the safe-token pattern both would, with the same text (else the Python checks
    run and count the refusal)."""
    field = cb.Field("request_id", header="x-request-id", max_length=max_length)
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    python_ok = (
        text is not None
        and field.problem(text) is None
        and re.fullmatch(cb.REQUEST_ID_PATTERN, text) is not None
    )
    ready = _accel.speedups.request_id_ready(raw, max_length)  # type: ignore[union-attr]
    assert ready == (text if python_ok else None)
