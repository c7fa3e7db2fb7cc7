"""Egress policy: baggage reaches only allowed hosts, through OTel's httpx and requests
instrumentations (MockTransport clients and real servers), with no double injection."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import requests
from _servers import serve
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime
from otel_ctxbridge.egress import (
    EgressConfigError,
    EgressPolicy,
    HttpEgress,
    instrument_http_clients,
    use_default_propagator_if_unset,
)

FOLLOWING_REDIRECTS: tuple[Callable[[str], object], ...] = (
    lambda url: requests.get(url, timeout=10),  # redirects outside the instrumentation
    lambda url: httpx.get(url, follow_redirects=True),  # each hop instrumented
)
"""GET a URL, following redirects, with each instrumented client."""

# -- a real server that records the headers it receives -----------------------------------


class Recorder:
    """An ASGI app answering 200 and keeping each request's raw headers."""

    def __init__(self) -> None:
        self.requests: list[list[tuple[str, str]]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests.append([(k.decode(), v.decode("latin-1")) for k, v in scope["headers"]])
        if scope["path"] == "/redirect":  # /redirect?to=URL answers 302 to URL
            location = unquote(scope["query_string"].decode().removeprefix("to="))
            headers = [(b"location", location.encode())]
            await send({"type": "http.response.start", "status": 302, "headers": headers})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def last(self, index: int = -1) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, value in self.requests[index]:
            out.setdefault(key, []).append(value)
        return out


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[Recorder, int]]:
    """A real uvicorn server on 127.0.0.1 (free port) recording headers, stopped at the end."""
    app = Recorder()
    with serve(app, lifespan="off") as base_url:
        yield app, httpx.URL(base_url).port or 80


@pytest.fixture
def egress(bridge: cb.ContextBridge, spans: InMemorySpanExporter) -> Iterator[HttpEgress]:
    """httpx and requests instrumented with a policy allowing ``localhost`` only."""
    handle = instrument_http_clients(bridge, EgressPolicy(hosts=["localhost"]))
    yield handle
    handle.uninstrument()


def _client_span_traceparent(spans: InMemorySpanExporter) -> str:
    client = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.CLIENT][-1]
    ctx = client.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}"


# -- the policy --------------------------------------------------------------------------


def test_policy_matches_exact_names_suffixes_and_networks() -> None:
    """Exact names (case-insensitive), ``.suffix`` and ``*.suffix`` entries, CIDRs for IP
    literals; names are never resolved, and anything unreadable is refused."""
    policy = EgressPolicy(
        hosts=["Orders", ".internal", "*.svc.cluster.local", "192.0.2.7"],
        networks=["10.0.0.0/8", "fd00::/8"],
    )
    allowed = [
        "http://orders/x",
        "https://ORDERS.:8443/x",
        "http://billing.internal/v1",
        "http://a.b.internal",
        "http://pay.ns.svc.cluster.local/",
        "http://10.1.2.3:8080/",
        "http://[fd00::1]:80/",
        "http://192.0.2.7/",
        "orders",
        "orders:8080",
        httpx.URL("http://x.internal/"),
        (b"http", b"orders", 80, b"/"),
    ]
    refused = [
        "http://internal/",  # a suffix entry matches subdomains only
        "http://evilinternal/",
        "http://orders.evil.com/",
        "http://11.0.0.1/",
        "http://localhost/",
        "http://[::1]/",
        "https://api.stripe.com/v1",
        "",
        None,
        12,
        b"\xff\xfe",
    ]
    assert [u for u in allowed if not policy.allows(u)] == []
    assert [u for u in refused if policy.allows(u)] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hosts": "orders"}, "lists of strings"),
        ({"hosts": [""]}, "invalid egress host"),
        ({"hosts": ["*."]}, "invalid egress host"),
        ({"networks": ["10.0.0.0/33"]}, "invalid egress network"),
        ({"networks": ["orders"]}, "invalid egress network"),
        ({"hosts": ["http://orders"]}, "without scheme, port or path"),
        ({"hosts": ["orders:8002"]}, "without scheme, port or path"),
        ({"hosts": ["localhost:8002"]}, "without scheme, port or path"),
        ({"hosts": ["orders/api"]}, "without scheme, port or path"),
        ({"hosts": ["user@orders"]}, "without scheme, port or path"),
        ({"hosts": ["orders..internal"]}, "without scheme, port or path"),
    ],
)
def test_policy_refuses_bad_configuration(kwargs: dict[str, Any], message: str) -> None:
    """A misconfigured policy raises EgressConfigError (a ValueError) at construction."""
    with pytest.raises(EgressConfigError, match=message):
        EgressPolicy(**kwargs)


def test_internationalised_names_match_as_the_clients_send_them() -> None:
    """An IDN entry matches however it is written (Unicode or ``xn--``), and as httpx and
    requests send it (IDNA 2008: ``faß`` is ``xn--fa-hia``, not ``fass``)."""
    policy = EgressPolicy(hosts=["bücher.example", ".xn--fa-hia.de"])
    url = "http://bücher.example/x"
    allowed = [
        url,
        "http://xn--bcher-kva.example/x",
        httpx.URL(url),
        requests.Request("GET", url).prepare().url,
        httpx.URL("http://shop.faß.de/"),
        requests.Request("GET", "http://shop.faß.de/").prepare().url,
    ]
    assert [u for u in allowed if not policy.allows(u)] == []
    assert not policy.allows("http://shop.fass.de/")
    assert not policy.allows("http://evil.example/bücher.example")


def test_request_id_only_elsewhere_needs_a_request_id_header(bridge: cb.ContextBridge) -> None:
    """``request_id_only_elsewhere`` names a field with a header, checked when wired."""
    policy = EgressPolicy(request_id_only_elsewhere=True, request_id_field="user_id")
    with pytest.raises(EgressConfigError, match="user_id"):
        HttpEgress(bridge, policy)


# -- MockTransport clients ---------------------------------------------------------------


def _mock_client(
    egress: HttpEgress, seen: list[httpx.Request], *, asynchronous: bool = False
) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    transport = httpx.MockTransport(handler)
    client: Any = (
        httpx.AsyncClient(transport=transport)
        if asynchronous
        else httpx.Client(transport=transport)
    )
    egress.instrument_client(client)
    return client


def test_sync_client_sends_baggage_only_to_allowed_hosts(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """An allowed host gets traceparent (the client span) and W3C baggage of propagated fields,
    a space as %20; a third party gets traceparent only; process-local fields never leave."""
    egress = HttpEgress(bridge, EgressPolicy(hosts=["orders"]))
    propagate.set_global_textmap(cb.default_propagator())
    seen: list[httpx.Request] = []
    with _mock_client(egress, seen) as client:
        with bridge.scope(request_id="r-1", tenant_id="acme corp", user_id="u-7"):
            client.get("http://orders/api")
            internal_parent = _client_span_traceparent(spans)
            client.get("https://api.thirdparty.example/v1")
            external_parent = _client_span_traceparent(spans)
    egress.uninstrument()
    internal, external = seen
    assert internal.headers["baggage"] == "request_id=r-1,tenant_id=acme%20corp"
    assert internal.headers["traceparent"].startswith(internal_parent)
    assert "baggage" not in external.headers
    assert external.headers["traceparent"].startswith(external_parent)
    assert all("u-7" not in value for r in seen for value in r.headers.values())


async def test_async_client_sends_baggage_only_to_allowed_hosts(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """The same policy holds for httpx.AsyncClient (OTel awaits the async hook)."""
    egress = HttpEgress(bridge, EgressPolicy(hosts=[".internal"]))
    propagate.set_global_textmap(cb.default_propagator())
    seen: list[httpx.Request] = []
    async with _mock_client(egress, seen, asynchronous=True) as client:
        with bridge.scope(request_id="r-2", tenant_id="acme"):
            await asyncio.gather(
                client.get("http://orders.internal/a"), client.get("http://partner.example/b")
            )
    egress.uninstrument()
    by_host = {r.url.host: r.headers for r in seen}
    assert by_host["orders.internal"]["baggage"] == "request_id=r-2,tenant_id=acme"
    assert "baggage" not in by_host["partner.example"]
    assert "traceparent" in by_host["partner.example"]


def test_third_party_gets_no_baggage_header_even_one_already_on_the_request(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A ``baggage`` header already on a request to a host outside the policy (as a redirect
    copies it) is removed; ``request_id_only_elsewhere`` sends the request id header instead."""
    policy = EgressPolicy(hosts=["orders"], request_id_only_elsewhere=True)
    egress = HttpEgress(bridge, policy)
    seen: list[httpx.Request] = []
    with _mock_client(egress, seen) as client, bridge.scope(request_id="r-3", tenant_id="t"):
        client.get("http://cdn.example/x", headers={"baggage": "request_id=r-3,tenant_id=t"})
        client.get("http://orders/x")
    egress.uninstrument()
    external, internal = seen
    assert "baggage" not in external.headers
    assert external.headers["x-request-id"] == "r-3"
    assert "x-request-id" not in internal.headers
    assert internal.headers["baggage"] == "request_id=r-3,tenant_id=t"


def test_redirect_to_a_third_party_carries_no_baggage(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """httpx copies headers onto a redirect; the hop to a host outside the policy drops them."""
    egress = HttpEgress(bridge, EgressPolicy(hosts=["orders"]))
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "orders":
            return httpx.Response(302, headers={"location": "http://elsewhere.example/"})
        return httpx.Response(200)

    client = httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=True)
    egress.instrument_client(client)
    with client, bridge.scope(request_id="r-4", tenant_id="t"):
        client.get("http://orders/start")
    egress.uninstrument()
    assert [r.url.host for r in seen] == ["orders", "elsewhere.example"]
    assert "baggage" in seen[0].headers
    assert "baggage" not in seen[1].headers


def test_update_made_in_a_worker_thread_reaches_later_outbound_calls(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """Inside a request frame, ``update()`` from a thread (a FastAPI sync dependency) changes
    the baggage of calls the request makes afterwards."""
    egress = HttpEgress(bridge, EgressPolicy(hosts=["orders"]))
    seen: list[httpx.Request] = []
    frame = bridge.new_frame(())
    ctx = bridge.derive(_runtime.get_current(), {"request_id": "r-5", "tenant_id": "a"}, frame)
    token = _runtime.attach(ctx)
    try:
        worker = threading.Thread(target=bridge.bind(lambda: bridge.update(tenant_id="b")))
        worker.start()
        worker.join()
        with _mock_client(egress, seen) as client:
            client.get("http://orders/x")
    finally:
        _runtime.detach(token)
    egress.uninstrument()
    assert seen[0].headers["baggage"] == "request_id=r-5,tenant_id=b"


def test_hook_called_outside_its_span_attaches_nothing(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """If an instrumentation ever called the hook outside its span, the hook would refuse to
    attach a context (it would outlive the request) and say so once."""
    egress = HttpEgress(bridge, EgressPolicy(hosts=["orders"]))
    request = httpx.Request("GET", "http://elsewhere.example/")
    with bridge.scope(request_id="r-6"), caplog.at_level(logging.WARNING, "otel_ctxbridge"):
        before = _runtime.get_current()
        egress.request_hook(trace.INVALID_SPAN, request)
        egress.request_hook(trace.INVALID_SPAN, request)
        assert _runtime.get_current() is before
    assert len([r for r in caplog.records if "outside its span" in r.message]) == 1


def test_manual_headers_follow_the_policy(bridge: cb.ContextBridge) -> None:
    """``HttpEgress.headers(url)`` for uninstrumented clients: baggage for allowed hosts only."""
    egress = HttpEgress(
        bridge, EgressPolicy(networks=["10.0.0.0/8"], request_id_only_elsewhere=True)
    )
    with bridge.scope(request_id="r-7", tenant_id="t", user_id="u"):
        inside = egress.headers("http://10.0.0.5:8000/")
        outside = egress.headers("https://example.com/", {"baggage": "leak=1"})
    assert inside == {"baggage": "request_id=r-7,tenant_id=t"}
    assert outside == {"x-request-id": "r-7"}


# -- every client, every kind of policy entry ---------------------------------------------

MATRIX_POLICY = {"hosts": ["orders", ".internal"], "networks": ["10.0.0.0/8", "fd00::/8"]}
MATRIX = [
    ("http://orders/x", True),  # exact name
    ("http://ORDERS.:8080/x", True),  # exact, any case, trailing dot, port
    ("http://billing.internal/x", True),  # suffix
    ("http://a.b.internal/x", True),  # suffix, deeper
    ("http://10.1.2.3:8000/x", True),  # CIDR
    ("http://[fd00::5]/x", True),  # IPv6 CIDR
    ("http://internal/x", False),  # a suffix matches subdomains only
    ("http://orders.evil.example/x", False),
    ("http://ordersinternal/x", False),
    ("http://11.0.0.1/x", False),
    ("http://[fe80::1]/x", False),
    ("https://api.partner.example/x", False),
]


class RecordingAdapter(requests.adapters.BaseAdapter):
    """A requests transport answering 200 without a network, keeping each request's headers."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, str]]] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.seen.append((str(request.url), {k.lower(): v for k, v in request.headers.items()}))
        response = requests.Response()
        response.status_code, response.url, response.request = 200, str(request.url), request
        response._content = b"ok"
        return response

    def close(self) -> None:
        pass


def _assert_policy_held(seen: list[Any], client: str) -> None:
    """``seen``: the headers each destination of MATRIX received from ``client``, in order."""
    assert len(seen) == len(MATRIX), client
    for headers, (url, inside) in zip(seen, MATRIX, strict=True):
        assert ("baggage" in headers) is inside, (client, url)
        if inside:
            assert headers["baggage"] == "request_id=r-m,tenant_id=acme%20corp", (client, url)
        assert len(headers["traceparent"].split(",")) == 1, (client, url)
        assert all("u-secret" not in value for value in headers.values()), (client, url)


async def test_every_client_applies_exact_suffix_and_cidr_entries(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """httpx (sync and async) and requests, one policy with exact names, suffixes and CIDR
    ranges: baggage exactly to the destinations it allows, one traceparent to all, and the
    process-local user to none."""
    egress = instrument_http_clients(bridge, EgressPolicy(**MATRIX_POLICY), httpx=False)
    seen: dict[str, list[tuple[str, Any]]] = {"httpx": [], "httpx-async": [], "requests": []}

    def record(client: str) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            seen[client].append((str(request.url), request.headers))
            return httpx.Response(200)

        return httpx.MockTransport(handler)

    sync_client = httpx.Client(transport=record("httpx"))
    async_client = httpx.AsyncClient(transport=record("httpx-async"))
    egress.instrument_client(sync_client)
    egress.instrument_client(async_client)
    adapter = RecordingAdapter()
    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, adapter)
    try:
        with bridge.scope(request_id="r-m", tenant_id="acme corp", user_id="u-secret"):
            for url, _ in MATRIX:
                sync_client.get(url)
                await async_client.get(url)
                session.get(url, timeout=5)
    finally:
        sync_client.close()
        await async_client.aclose()
        session.close()
        egress.uninstrument()
    seen["requests"] = adapter.seen
    for client, sent in seen.items():
        _assert_policy_held([headers for _, headers in sent], client)


# -- real servers, global instrumentation ------------------------------------------------


def test_httpx_and_requests_to_real_server_follow_the_policy(
    bridge: cb.ContextBridge,
    spans: InMemorySpanExporter,
    egress: HttpEgress,
    recorder: tuple[Recorder, int],
) -> None:
    """With ``instrument_http_clients``: httpx (sync) and requests reach a real server with
    baggage as ``localhost`` (allowed) and without it as ``127.0.0.1`` (not in the policy)."""
    app, port = recorder
    results: dict[str, dict[str, list[str]]] = {}
    with bridge.scope(request_id="r-8", tenant_id="acme corp", user_id="u-9"):
        for name, host in (("allowed", "localhost"), ("other", "127.0.0.1")):
            url = f"http://{host}:{port}/"
            httpx.get(url)
            results[f"httpx-{name}"] = app.last()
            requests.get(url, timeout=10)
            results[f"requests-{name}"] = app.last()
    for key, headers in results.items():
        assert len(headers["traceparent"]) == 1, key
        if key.endswith("allowed"):
            assert headers["baggage"] == ["request_id=r-8,tenant_id=acme%20corp"], key
        else:
            assert "baggage" not in headers, key
        assert all("u-9" not in v for values in headers.values() for v in values), key


async def test_async_httpx_to_real_server_follows_the_policy(
    bridge: cb.ContextBridge,
    spans: InMemorySpanExporter,
    egress: HttpEgress,
    recorder: tuple[Recorder, int],
) -> None:
    """An instrumented ``httpx.AsyncClient`` to a real server: baggage to the allowed host only."""
    app, port = recorder
    async with httpx.AsyncClient() as client:
        with bridge.scope(request_id="r-9", tenant_id="acme"):
            await client.get(f"http://localhost:{port}/")
            allowed = app.last()
            await client.get(f"http://127.0.0.1:{port}/")
            other = app.last()
    assert allowed["baggage"] == ["request_id=r-9,tenant_id=acme"]
    assert "baggage" not in other
    assert "traceparent" in other


def test_manual_headers_plus_instrumentation_inject_once(
    bridge: cb.ContextBridge,
    spans: InMemorySpanExporter,
    egress: HttpEgress,
    recorder: tuple[Recorder, int],
) -> None:
    """Headers from ``egress.headers(url)`` on an instrumented client: one ``traceparent``
    (the client span's) and one ``baggage`` arrive, for httpx and requests alike."""
    app, port = recorder
    url = f"http://localhost:{port}/"
    with bridge.scope(request_id="r-10", tenant_id="t"):
        for send in (
            lambda: httpx.get(url, headers=egress.headers(url)),
            lambda: requests.get(url, headers=egress.headers(url), timeout=10),
        ):
            send()
            headers = app.last()
            assert headers["baggage"] == ["request_id=r-10,tenant_id=t"]
            assert len(headers["traceparent"]) == 1
            assert headers["traceparent"][0].startswith(_client_span_traceparent(spans))


def test_instrumenting_an_already_instrumented_library_is_refused(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """httpx already instrumented without the policy would silently skip it: refused, saying
    how to fix it under ``opentelemetry-instrument``, and nothing is left instrumented."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    HTTPXClientInstrumentor().instrument()
    try:
        with pytest.raises(EgressConfigError, match="HTTPXClientInstrumentor") as raised:
            instrument_http_clients(bridge, EgressPolicy(hosts=["orders"]))
        assert "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=httpx,requests" in str(raised.value)
        assert not RequestsInstrumentor().is_instrumented_by_opentelemetry
    finally:
        HTTPXClientInstrumentor().uninstrument()


def test_instrumenting_twice_says_the_earlier_call_did_it_and_works_after_uninstrument(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A second ``instrument_http_clients`` (an app factory called twice, tests) is refused
    naming the earlier call and ``uninstrument()``, not ``opentelemetry-instrument``; the first
    stays in force, and after its ``uninstrument()`` a new policy can be installed."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    first = instrument_http_clients(bridge, EgressPolicy(hosts=["orders"]))
    try:
        with pytest.raises(EgressConfigError, match="earlier instrument_http_clients") as raised:
            instrument_http_clients(bridge, EgressPolicy(hosts=["billing"]))
        assert "uninstrument()" in str(raised.value)
        assert "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS" not in str(raised.value)
        assert HTTPXClientInstrumentor().is_instrumented_by_opentelemetry  # the first holds
    finally:
        first.uninstrument()
    second = instrument_http_clients(bridge, EgressPolicy(hosts=["billing"]))
    second.uninstrument()
    HTTPXClientInstrumentor().instrument()  # by another tool: the original diagnosis again
    try:
        with pytest.raises(EgressConfigError, match="without the egress policy"):
            instrument_http_clients(bridge, EgressPolicy(hosts=["orders"]))
    finally:
        HTTPXClientInstrumentor().uninstrument()


def test_default_propagator_installed_only_when_unconfigured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTel's default textmap is replaced by ``default_propagator()`` (W3C-correct baggage);
    a propagator the application chose, or ``OTEL_PROPAGATORS``, is left alone."""
    otel_default = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    propagate.set_global_textmap(otel_default)
    monkeypatch.setenv("OTEL_PROPAGATORS", "tracecontext,baggage")
    assert not use_default_propagator_if_unset()
    monkeypatch.delenv("OTEL_PROPAGATORS")
    assert use_default_propagator_if_unset()
    assert propagate.get_global_textmap() is not otel_default
    chosen = TraceContextTextMapPropagator()
    propagate.set_global_textmap(chosen)
    assert not use_default_propagator_if_unset()
    assert propagate.get_global_textmap() is chosen


def test_real_redirects_out_of_the_policy_drop_baggage(
    bridge: cb.ContextBridge,
    spans: InMemorySpanExporter,
    egress: HttpEgress,
    recorder: tuple[Recorder, int],
) -> None:
    """An allowed host redirecting to one outside the policy: the second hop arrives without
    baggage with requests (which copies headers to redirects outside the instrumentation) and
    with httpx; a redirect within the policy keeps it."""
    app, port = recorder
    inside, outside = f"http://localhost:{port}/end", f"http://127.0.0.1:{port}/end"
    with bridge.scope(request_id="r-11", tenant_id="t"):
        for follow in FOLLOWING_REDIRECTS:
            for target, keeps in ((outside, False), (inside, True)):
                follow(f"http://localhost:{port}/redirect?to={quote(target)}")
                assert app.last(-2)["baggage"] == ["request_id=r-11,tenant_id=t"]
                assert ("baggage" in app.last()) is keeps, target
                assert len(app.last()["traceparent"]) == 1


def test_real_redirects_out_of_the_policy_carry_the_request_id_when_asked(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, recorder: tuple[Recorder, int]
) -> None:
    """With ``request_id_only_elsewhere``, the hop a redirect takes out of the policy gets the
    request id header in place of baggage, with requests (whose redirects bypass the
    instrumentation) as with httpx."""
    app, port = recorder
    handle = instrument_http_clients(
        bridge, EgressPolicy(hosts=["localhost"], request_id_only_elsewhere=True)
    )
    try:
        outside = quote(f"http://127.0.0.1:{port}/end")
        with bridge.scope(request_id="r-12", tenant_id="t"):
            for follow in FOLLOWING_REDIRECTS:
                follow(f"http://localhost:{port}/redirect?to={outside}")
                hop = app.last()
                assert "baggage" not in hop
                assert hop.get("x-request-id") == ["r-12"], follow
    finally:
        handle.uninstrument()


def test_a_redirect_from_outside_the_policy_back_inside_carries_baggage_again(
    bridge: cb.ContextBridge,
    spans: InMemorySpanExporter,
    egress: HttpEgress,
    recorder: tuple[Recorder, int],
) -> None:
    """A host outside the policy redirecting to an allowed one: the first hop goes without
    baggage, the hop back inside gets it, with requests (whose redirects bypass the
    instrumentation) as with httpx."""
    app, port = recorder
    inside = quote(f"http://localhost:{port}/end")
    with bridge.scope(request_id="r-13", tenant_id="t"):
        for follow in FOLLOWING_REDIRECTS:
            follow(f"http://127.0.0.1:{port}/redirect?to={inside}")
            assert "baggage" not in app.last(-2)
            assert app.last()["baggage"] == ["request_id=r-13,tenant_id=t"], follow


def test_a_prepared_request_sent_again_carries_its_own_senders_baggage_on_redirects(
    bridge: cb.ContextBridge,
    spans: InMemorySpanExporter,
    egress: HttpEgress,
    recorder: tuple[Recorder, int],
) -> None:
    """One requests ``PreparedRequest`` sent in two scopes (another tenant's, say), each time to
    a host outside the policy redirecting back inside: each hop back inside carries the baggage
    of the scope sending it then, never the first one's."""
    app, port = recorder
    inside = quote(f"http://localhost:{port}/end")
    prepared = requests.Request("GET", f"http://127.0.0.1:{port}/redirect?to={inside}").prepare()
    with requests.Session() as session:
        for tenant in ("tenant-a", "tenant-b"):
            with bridge.scope(request_id=f"r-{tenant}", tenant_id=tenant):
                session.send(prepared.copy(), allow_redirects=True, timeout=10)
                expected = f"request_id=r-{tenant},tenant_id={tenant}"
                assert app.last()["baggage"] == [expected]


def test_a_redirect_adds_no_baggage_when_the_propagators_send_none(
    bridge: cb.ContextBridge,
    spans: InMemorySpanExporter,
    egress: HttpEgress,
    recorder: tuple[Recorder, int],
) -> None:
    """With W3C Trace Context alone as the global propagator (no baggage), a requests redirect
    within the policy gets no ``baggage`` either: the hook injects as the instrumentation does."""
    propagate.set_global_textmap(TraceContextTextMapPropagator())
    app, port = recorder
    inside = quote(f"http://localhost:{port}/end")
    with bridge.scope(request_id="r-14", tenant_id="t"):
        requests.get(f"http://127.0.0.1:{port}/redirect?to={inside}", timeout=10)
    assert "baggage" not in app.last()
    assert "traceparent" in app.last()


def test_other_propagators_baggage_headers_never_reach_a_host_outside_the_policy(
    bridge: cb.ContextBridge,
    spans: InMemorySpanExporter,
    egress: HttpEgress,
    recorder: tuple[Recorder, int],
) -> None:
    """With Jaeger's propagator configured too, the fields also travel as ``uberctx-*``
    headers to allowed hosts; a redirect from there to a host outside the policy carries
    neither those nor ``baggage`` (requests and httpx), and neither does ``headers()``."""
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.propagators.jaeger import JaegerPropagator

    propagate.set_global_textmap(
        CompositePropagator(
            [TraceContextTextMapPropagator(), W3CBaggagePropagator(), JaegerPropagator()]
        )
    )
    app, port = recorder
    outside = quote(f"http://127.0.0.1:{port}/end")
    with bridge.scope(request_id="r-15", tenant_id="acme"):
        for follow in FOLLOWING_REDIRECTS:
            follow(f"http://localhost:{port}/redirect?to={outside}")
            assert app.last(-2)["uberctx-tenant_id"] == ["acme"]
            leaked = [k for k in app.last() if k == "baggage" or k.startswith("uberctx-")]
            assert leaked == [], follow
        manual = egress.headers("http://127.0.0.1/", {"uberctx-tenant_id": "acme"})
    assert "uberctx-tenant_id" not in manual


def test_headers_for_a_host_outside_the_policy_drop_baggage_in_any_case(
    bridge: cb.ContextBridge, egress: HttpEgress
) -> None:
    """``headers()`` given a plain dict that already holds ``Baggage`` (any case) for a host
    outside the policy returns it without; ``traceparent`` is all it adds."""
    with bridge.scope(request_id="r-16", tenant_id="t"):
        out = egress.headers("http://127.0.0.1/", {"Baggage": "tenant_id=t", "Accept": "*/*"})
    assert "Baggage" not in out
    assert out["Accept"] == "*/*"
