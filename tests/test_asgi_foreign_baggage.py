"""Baggage in other propagators' formats (Jaeger's ``uberctx-*``, OpenTracing's
``ot-baggage-*``), configured with ``OTEL_PROPAGATORS`` or ``set_global_textmap``: the bridge
never reads fields from it, so it never reaches the request's context or the server span
unchecked. It is hidden from OTel's middleware and, from untrusted peers, from the application
(and from an OTel middleware misplaced inside the bridge)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _servers import serve
from fastapi import FastAPI, Request
from opentelemetry import baggage, propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.processor.baggage import ALLOW_ALL_BAGGAGE_KEYS, BaggageSpanProcessor
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.jaeger import JaegerPropagator
from opentelemetry.propagators.ot_trace import OTTracePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import otel_ctxbridge as cb
from otel_ctxbridge._foreign_baggage import baggage_prefixes
from otel_ctxbridge._shield import TraceHeaderShield
from otel_ctxbridge.asgi import instrument_asgi
from otel_ctxbridge.trust import TrustPolicy

FOREIGN = {
    "uberctx-tenant_id": "globex",
    "uber-trace-id": "4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1",
    "ot-baggage-tenant_id": "globex",
    "ot-baggage-role": "admin",
    "ot-tracer-traceid": "4bf92f3577b34da6a3ce929d0e0e4736",  # without them OpenTracing's
    "ot-tracer-spanid": "00f067aa0ba902b7",  # propagator reads no baggage at all
    "ot-tracer-sampled": "true",
}
SECRET = {"x-ctxbridge-secret": "s3"}


@pytest.fixture(autouse=True)
def foreign_propagators() -> None:
    """W3C Trace Context and Baggage, Jaeger and OpenTracing (conftest restores the global)."""
    propagate.set_global_textmap(
        CompositePropagator(
            [
                TraceContextTextMapPropagator(),
                W3CBaggagePropagator(),
                JaegerPropagator(),
                OTTracePropagator(),
            ]
        )
    )


@pytest.fixture
def provider(bridge: cb.ContextBridge) -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider whose span processors copy baggage onto every span: the fields
    (``ContextSpanProcessor``) and every member as it is (OTel's ``BaggageSpanProcessor``)."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(cb.ContextSpanProcessor(bridge))
    tracer_provider.add_span_processor(BaggageSpanProcessor(ALLOW_ALL_BAGGAGE_KEYS))
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracer_provider, exporter
    tracer_provider.shutdown()


def reporting_app(bridge: cb.ContextBridge) -> FastAPI:
    """A FastAPI app whose ``/`` answers the tenant, the baggage and the header names it sees."""
    api = FastAPI()

    @api.get("/")
    async def index(request: Request) -> dict[str, Any]:
        return {
            "tenant": bridge.get("tenant_id"),
            "baggage": dict(baggage.get_all()),
            "headers": sorted(request.headers.keys()),
        }

    return api


def _no_foreign_value(exporter: InMemorySpanExporter) -> None:
    for span in exporter.get_finished_spans():
        assert "globex" not in str(dict(span.attributes or {})), span.name


def test_the_prefixes_follow_the_global_propagator() -> None:
    """Jaeger's and OpenTracing's baggage prefixes while they are configured; none with the
    default propagators."""
    assert baggage_prefixes() == (b"ot-baggage-", b"uberctx-")
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    assert baggage_prefixes() == ()


def test_under_instrument_asgi_foreign_baggage_reaches_neither_context_nor_span(
    bridge: cb.ContextBridge, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """From an untrusted client: no tenant, no baggage, no such headers in the app, and no
    copied value on the server span. From a trusted peer the headers reach the app as they
    came, but still set no field and no span attribute (fields come from W3C baggage only)."""
    tracer_provider, exporter = provider
    app = instrument_asgi(
        reporting_app(bridge),
        bridge,
        trust=TrustPolicy(secret="s3"),
        tracer_provider=tracer_provider,
    )
    with serve(app) as base:
        body = httpx.get(base + "/", headers=FOREIGN).json()
        assert body["tenant"] is None
        assert not {"tenant_id", "role"} & set(body["baggage"])
        assert not [h for h in body["headers"] if h.startswith(("uberctx-", "ot-baggage-"))]
        trusted = httpx.get(base + "/", headers={**FOREIGN, **SECRET}).json()
        assert trusted["tenant"] is None
        assert not {"tenant_id", "role"} & set(trusted["baggage"])
        assert "uberctx-tenant_id" in trusted["headers"]
    _no_foreign_value(exporter)


def test_a_misplaced_otel_middleware_gets_no_foreign_baggage_from_an_untrusted_peer(
    bridge: cb.ContextBridge, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """OTel's middleware inside the bridge (added after it by mistake) extracts with the global
    propagator: an untrusted client's Jaeger and OpenTracing baggage headers are gone before
    it sees them, so the app reads no tenant and the spans carry none."""
    tracer_provider, exporter = provider
    api = reporting_app(bridge)
    api.add_middleware(OpenTelemetryMiddleware, tracer_provider=tracer_provider)
    api.add_middleware(cb.ContextBridgeMiddleware, bridge=bridge, trust=TrustPolicy(secret="s3"))
    with serve(api) as base:
        body = httpx.get(base + "/", headers=FOREIGN).json()
    assert body["tenant"] is None
    assert not {"tenant_id", "role"} & set(body["baggage"])
    _no_foreign_value(exporter)


async def test_the_shield_never_raises_on_header_names_it_cannot_check() -> None:
    """A scope whose header names are not bytes (no server sends one, the ASGI spec forbids
    it) with prefixes to look for: the shield hides every header from OTel rather than raise
    on the request path."""
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["headers"])

    scope = {"type": "http", "headers": [("uberctx-tenant_id", "globex"), (b"host", b"x")]}
    await TraceHeaderShield(app)(scope, None, None)  # type: ignore[arg-type] # never called
    assert seen == [[]]
