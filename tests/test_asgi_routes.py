"""instrument_asgi with FastAPI as a user runs it, on a real uvicorn server: the request context
survives requests OTel does not record (unsampled, excluded URLs) without FastAPI's native
telemetry replacing it, and the server span is named after the matched route."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _servers import serve
from fastapi import APIRouter, FastAPI
from opentelemetry import baggage
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_asgi import server_spans
from test_asgi_foreign_baggage import reporting_app

import otel_ctxbridge as cb
from otel_ctxbridge.asgi import instrument_asgi
from otel_ctxbridge.trust import TrustPolicy

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
UNSAMPLED = f"00-{TRACE}-00f067aa0ba902b7-00"
SAMPLED = f"00-{TRACE}-00f067aa0ba902b7-01"
HOSTILE_BAGGAGE = "tenant_id=evil,is_admin=true"


def make_api(bridge: cb.ContextBridge) -> FastAPI:
    """Routes that answer with what they see of the context; a path parameter; a mounted app."""
    api = FastAPI()

    @api.get("/seen")
    async def seen() -> dict[str, Any]:
        return {
            "fields": dict(bridge.current()),
            "baggage": dict(baggage.get_all()),
            "outbound": bridge.inject({}),
        }

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"fields": dict(bridge.current()), "baggage": dict(baggage.get_all())}

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    sub = FastAPI()

    @sub.get("/hello/{name}")
    async def hello(name: str) -> dict[str, str]:
        return {"hello": name}

    users = APIRouter()

    @users.get("/{uid}")
    async def user(uid: str) -> dict[str, str]:
        return {"user": uid}

    api.include_router(users, prefix="/users")  # FastAPI keeps the prefix apart (0.120+)
    sub.include_router(users, prefix="/members")
    api.mount("/sub", sub)
    api.mount("/t/{tenant}", sub)  # a prefix with a parameter: its template, not the value

    async def plain(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.path_params["user"]})

    api.mount("/plain", Starlette(routes=[Route("/users/{user}", plain)]))
    return api


@pytest.fixture
def url(bridge: cb.ContextBridge, spans: InMemorySpanExporter) -> Iterator[str]:
    """The app under instrument_asgi (trust nobody), /health excluded from tracing."""
    with serve(instrument_asgi(make_api(bridge), bridge, excluded_urls="health")) as base:
        yield base


def test_unsampled_request_keeps_its_context_and_refuses_untrusted_baggage(
    url: str, spans: InMemorySpanExporter
) -> None:
    """An inbound traceparent with sampled=0 makes OTel's server span non-recording; FastAPI's
    native telemetry must still not start its own span on a context extracted afresh from the
    headers: the handler sees the request id, untrusted baggage never becomes the tenant nor
    goes downstream, the trace id and the unsampled flag go on, and no span is recorded."""
    response = httpx.get(
        url + "/seen",
        headers={"traceparent": UNSAMPLED, "x-request-id": "rid-1", "baggage": HOSTILE_BAGGAGE},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["fields"] == {"request_id": "rid-1"}
    assert body["baggage"] == {"request_id": "rid-1"}
    assert body["outbound"]["baggage"] == "request_id=rid-1"
    _, trace_id, _, flags = body["outbound"]["traceparent"].split("-")
    assert (trace_id, flags) == (TRACE, "00")
    assert response.headers["x-request-id"] == "rid-1"
    httpx.get(url + "/seen", headers={"traceparent": SAMPLED})  # a recorded one, as a marker
    (server,) = server_spans(spans)
    assert server.name == "GET /seen"
    assert [s.name for s in spans.get_finished_spans()] == ["GET /seen"]


def test_excluded_url_keeps_its_context_and_records_nothing(
    url: str, spans: InMemorySpanExporter
) -> None:
    """A URL excluded from OTel's middleware still gets the request context, and FastAPI's
    native telemetry records nothing for it nor adopts the inbound baggage."""
    response = httpx.get(
        url + "/health",
        headers={"traceparent": SAMPLED, "x-request-id": "rid-h", "baggage": HOSTILE_BAGGAGE},
    )
    assert response.json() == {
        "fields": {"request_id": "rid-h"},
        "baggage": {"request_id": "rid-h"},
    }
    assert response.headers["x-request-id"] == "rid-h"
    httpx.get(url + "/seen")  # a recorded one, as a marker
    server_spans(spans)
    assert [s.name for s in spans.get_finished_spans()] == ["GET /seen"]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/items/42", "GET /items/{item_id}"),
        ("/sub/hello/bob", "GET /sub/hello/{name}"),
        ("/plain/users/u-1", "GET /plain/users/{user}"),
        ("/t/acme/hello/bob", "GET /t/{tenant}/hello/{name}"),
        ("/users/u-1", "GET /users/{uid}"),
        ("/sub/members/u-1", "GET /sub/members/{uid}"),
        ("/t/acme/members/u-1", "GET /t/{tenant}/members/{uid}"),
    ],
)
def test_server_span_is_named_after_the_matched_route(
    url: str, spans: InMemorySpanExporter, path: str, name: str
) -> None:
    """Like FastAPI's own instrumentation, the server span is named ``METHOD route-template``
    (not the raw path, whose ids would make a span name per request) and has ``http.route``."""
    assert httpx.get(url + path).status_code == 200
    (server,) = server_spans(spans)
    assert server.name == name
    assert server.attributes is not None
    assert server.attributes["http.route"] == name.split(" ", 1)[1]


def test_unmatched_request_is_named_after_its_method_alone(
    url: str, spans: InMemorySpanExporter
) -> None:
    """A 404 that matched no route is named after its method alone, as FastAPI's own
    instrumentation names unmatched requests (a scanner's random paths make no span name
    each); the path stays in the span's attributes, and there is no ``http.route``."""
    assert httpx.get(url + "/nowhere/1").status_code == 404
    (server,) = server_spans(spans)
    assert server.name == "GET"
    assert server.attributes is not None
    assert "http.route" not in server.attributes
    assert "/nowhere/1" in server.attributes.values()


def test_unrouted_app_keeps_the_default_span_name(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """An application without a router (no route in its scope) answering other than 404/405
    keeps OTel's default span name."""

    async def plain(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(instrument_asgi(plain, bridge)) as base:
        assert httpx.get(base + "/plain/7").status_code == 200
    (server,) = server_spans(spans)
    assert server.name == "GET /plain/7"


def test_span_name_of_a_custom_span_details_hook_is_kept(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A span name chosen by the user's own ``default_span_details`` is never replaced."""

    def details(scope: Any) -> tuple[str, dict[str, Any]]:
        return "custom", {}

    app = instrument_asgi(make_api(bridge), bridge, default_span_details=details)
    with serve(app) as base:
        assert httpx.get(base + "/items/7").status_code == 200
        (server,) = server_spans(spans)
    assert server.name == "custom"
    assert server.kind is SpanKind.SERVER


def test_middleware_added_outside_otels_warns_and_inside_does_not(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """``app.add_middleware(ContextBridgeMiddleware)`` after OTel's ``OpenTelemetryMiddleware``
    puts the bridge outside OTel's, which attaches a fresh context under it: the application
    silently sees no request context, so the first request logs a warning saying how to order
    them. The right order (and instrument_asgi) log nothing and keep the context."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    right, wrong = make_api(bridge), make_api(bridge)
    right.add_middleware(cb.ContextBridgeMiddleware, bridge=bridge)
    right.add_middleware(OpenTelemetryMiddleware)
    wrong.add_middleware(OpenTelemetryMiddleware)
    wrong.add_middleware(cb.ContextBridgeMiddleware, bridge=bridge)
    headers = {"x-request-id": "rid-order"}
    with caplog.at_level(logging.WARNING, logger="otel_ctxbridge.asgi"):
        with serve(right) as base:
            body = httpx.get(base + "/seen", headers=headers).json()
            assert body["fields"] == {"request_id": "rid-order"}
        with serve(instrument_asgi(make_api(bridge), bridge)) as base:
            httpx.get(base + "/seen", headers=headers)
        assert not caplog.records
        with serve(wrong) as base:
            assert httpx.get(base + "/seen", headers=headers).json()["fields"] == {}
            httpx.get(base + "/seen", headers=headers)
    (record,) = caplog.records
    assert "outside OpenTelemetry" in record.getMessage()
    assert "instrument_asgi" in record.getMessage()


@pytest.mark.parametrize("own_hook", [False, True], ids=["default-hook", "user-hook"])
def test_trace_headers_are_shielded_with_either_span_details_hook(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, own_hook: bool
) -> None:
    """With OTel's span-details hook set by ``instrument_asgi`` or by the user, the header
    shield outside OTel's middleware continues a valid ``traceparent``, starts a new trace
    for duplicated ones, and keeps untrusted baggage out of the request's context."""
    kwargs: dict[str, Any] = {}
    if own_hook:
        kwargs["default_span_details"] = lambda scope: ("custom", {})
    app = instrument_asgi(make_api(bridge), bridge, **kwargs)
    with serve(app) as base:
        kept = httpx.get(base + "/seen", headers={"traceparent": SAMPLED})
        both = [("traceparent", SAMPLED), ("traceparent", SAMPLED.replace("-01", "-00"))]
        duplicated = httpx.get(base + "/seen", headers=both)
        hostile = httpx.get(
            base + "/seen", headers={"traceparent": SAMPLED, "baggage": HOSTILE_BAGGAGE}
        )
        continued, restarted, with_baggage = server_spans(spans, 3)
    assert kept.status_code == duplicated.status_code == hostile.status_code == 200
    assert format(continued.context.trace_id, "032x") == TRACE
    assert format(restarted.context.trace_id, "032x") != TRACE
    assert format(with_baggage.context.trace_id, "032x") == TRACE
    assert "tenant_id" not in hostile.json()["fields"]
    assert hostile.json()["baggage"] == {"request_id": hostile.headers["x-request-id"]}


def test_starlette_mounts_name_spans_after_the_mount_template(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, tmp_path: Any
) -> None:
    """Under a Starlette ``Mount`` (a sub-router, static files) the span is named after the
    route inside it when one matched, else after the mount's own template, its prefix
    counted once (the mount has already added it to ``root_path``). Under a mount with
    parameters in its prefix (``/t/{tenant}``) the template is the mounts' templates followed
    from the router, never the request's values (a tenant id in a span name)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    (tmp_path / "a.css").write_text("x")

    async def item(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Mount("/api", routes=[Route("/x/{y}", item)]),
            Mount("/static", StaticFiles(directory=tmp_path)),
            Mount(
                "/t/{tenant}",
                routes=[
                    Route("/x/{y}", item),
                    Mount("/v1/{region}", routes=[Route("/z", item, methods=["POST"])]),
                    Mount("/files", StaticFiles(directory=tmp_path)),  # plain, inside
                    Route("/o/{tenant}/z", item),  # reuses the mount's parameter name
                ],
            ),
            Mount("/n/{tenant:int}", routes=[Route("/x/{y}", item)]),  # a converter
        ]
    )
    expected = {
        "/api/x/1": ("GET /api/x/{y}", 200),
        "/api/nope": ("GET /api/{path}", 404),
        "/static/a.css": ("GET /static/{path}", 200),
        "/t/acme/x/1": ("GET /t/{tenant}/x/{y}", 200),
        "/t/acme/v1/eu/z": ("GET /t/{tenant}/v1/{region}/z", 405),  # a partial match
        "/t/acme/nope": ("GET /t/{tenant}/{path}", 404),  # the sub-router's 404
        "/t/acme/files/a.css": ("GET /t/{tenant}/files/{path}", 200),
        "/t/acme/files/none.css": ("GET /t/{tenant}/files/{path}", 404),
        "/t/acme/o/globex/z": ("GET /t/{tenant}/o/{tenant}/z", 200),
        "/n/42/x/1": ("GET /n/{tenant}/x/{y}", 200),
    }
    with serve(instrument_asgi(app, bridge)) as base:
        for path, (_, status) in expected.items():
            assert httpx.get(base + path).status_code == status
    found = [
        (s.name, (s.attributes or {}).get("http.route")) for s in server_spans(spans, len(expected))
    ]
    assert found == [(name, name.split(" ", 1)[1]) for name, _ in expected.values()]


def test_route_template_follows_the_router_and_gives_up_without_a_guess() -> None:
    """Under a mount with a parameter the mounts' templates come from the router's tree as the
    request went down it; when the mounts there do not account for the root path (a scope
    assembled by other code) or matching raises, the answer is "" (the span keeps OTel's
    name), never a template holding the request's values."""
    from starlette.routing import Mount, Router

    from otel_ctxbridge._routes import route_template

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({})

    inner = Route("/x/{y}", endpoint)
    router = Router(routes=[Mount("/t/{tenant}", routes=[inner])])
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/t/acme/x/1",
        "root_path": "/t/acme",
        "app_root_path": "",  # a Starlette mount records where it started
        "headers": [],
        "path_params": {"tenant": "acme", "y": "1"},
        "router": router,
        "route": inner,
    }
    assert route_template(scope) == "/t/{tenant}/x/{y}"
    # A root path the router's mounts do not make: no guess.
    assert route_template({**scope, "path": "/z/acme/x/1", "root_path": "/z/acme"}) == ""

    class Broken(Route):
        def matches(self, scope: Any) -> Any:
            raise RuntimeError("matching failed")

    broken = Router(routes=[Broken("/t/{tenant}/x/{y}", endpoint), *router.routes])
    assert route_template({**scope, "router": broken}) == ""


def test_a_misplaced_otel_middleware_cannot_give_the_app_an_untrusted_tenant(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """OTel's middleware inside the bridge (added after it by mistake) extracts baggage from
    the headers it is given: from an untrusted client those carry neither ``baggage`` nor the
    trusted fields' headers any more, so the app reads no tenant, through the bridge, OTel's
    baggage or the raw headers. A trusted peer's headers pass as they came."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    api = reporting_app(bridge)
    api.add_middleware(OpenTelemetryMiddleware)
    api.add_middleware(cb.ContextBridgeMiddleware, bridge=bridge, trust=TrustPolicy(secret="s3"))
    attack = {"baggage": "tenant_id=globex,role=admin", "x-tenant-id": "globex"}
    with serve(api) as base:
        body = httpx.get(base + "/", headers=attack).json()
        assert (body["tenant"], body["baggage"]) == (None, {})
        assert not {"baggage", "x-tenant-id"} & set(body["headers"])
        trusted = httpx.get(base + "/", headers={**attack, "x-ctxbridge-secret": "s3"}).json()
        assert trusted["tenant"] == "globex"
        assert {"baggage", "x-tenant-id"} <= set(trusted["headers"])
        assert "x-ctxbridge-secret" not in trusted["headers"]


@pytest.mark.parametrize("headers_type", [list, tuple])
async def test_header_names_not_in_lower_case_are_matched_as_lower_case(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, headers_type: type
) -> None:
    """A server (or a middleware) sending names that are not in lower case, against the ASGI
    spec's advice: the bridge matches them as OTel and the trust policy do. An untrusted
    ``Baggage``/``X-Tenant-Id`` sets no tenant (even for an OTel middleware misplaced inside)
    and never reaches the app; a trusted peer's ``X-Ctxbridge-Secret`` is recognised and hidden."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        names = sorted(n.lower() for n, _ in scope["headers"])
        seen.append({"tenant": bridge.get("tenant_id"), "names": names})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    trust = TrustPolicy(secret="s3")
    misplaced = cb.ContextBridgeMiddleware(OpenTelemetryMiddleware(app), bridge, trust)
    plain = cb.ContextBridgeMiddleware(app, bridge, trust)

    async def call(stack: Any, headers: list[tuple[bytes, bytes]]) -> None:
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "raw_path": b"/",
            "query_string": b"",
            "headers": headers_type(headers),
            "client": ("203.0.113.9", 5000),
            "server": ("127.0.0.1", 8000),
            "scheme": "http",
            "http_version": "1.1",
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        await stack(scope, receive, send)

    untrusted_headers = [
        (b"Baggage", b"tenant_id=evil"),
        (b"X-Tenant-Id", b"evil"),
        (b"Host", b"x"),
    ]
    await call(misplaced, untrusted_headers)
    await call(plain, [(b"X-Ctxbridge-Secret", b"s3"), (b"X-Tenant-Id", b"acme"), (b"Host", b"x")])
    untrusted, trusted = seen
    assert untrusted == {"tenant": None, "names": [b"host"]}
    assert trusted == {"tenant": "acme", "names": [b"host", b"x-tenant-id"]}
