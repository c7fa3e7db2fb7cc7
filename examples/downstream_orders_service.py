"""A downstream orders service that does NOT use otel_ctxbridge: plain OpenTelemetry only.

It reads the caller's request id and tenant with ``opentelemetry.baggage.get_baggage`` and logs
them with the trace id: everything it needs arrives in the standard ``traceparent`` and
``baggage`` headers, extracted by OpenTelemetry's own ASGI middleware and default propagator.
(The caller, ``gateway_service.py``, sends baggage here because its egress policy allows this
host; the user id it holds is process-local and never arrives.)

OpenTelemetry's own baggage processors (``opentelemetry-processor-baggage``) copy those two
baggage entries onto every span and OTel log record it makes (attributes ``request_id`` and
``tenant_id``); its server span also lists the baggage keys that arrived
(``orders.baggage_keys``). ``GET /orders/fail`` logs, then fails with a 500, to show a failing
request end to end.

Run it (port ``DOWNSTREAM_PORT``, default 8002)::

    python examples/downstream_orders_service.py
    curl -s localhost:8002/orders/7 -H 'baggage: request_id=r-1,tenant_id=acme%20corp'

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans and log records go to that collector over OTLP
(service name ``orders-downstream`` unless ``OTEL_SERVICE_NAME`` says otherwise).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from opentelemetry import baggage, trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

log = logging.getLogger("orders.downstream")
CONTEXT_KEYS = frozenset({"request_id", "tenant_id"})
"""Baggage entries copied onto this service's spans and log records (never all of baggage:
it comes from the caller)."""
FAILING_ORDER = "fail"
"""``GET /orders/fail`` logs, then raises: an unhandled error (500), as a broken dependency."""


def create_app() -> Any:
    """The FastAPI app behind OpenTelemetry's ASGI middleware (server spans, context)."""
    # OTel's ASGI middleware (below) makes the server span; FastAPI's own telemetry (newer
    # releases) would start a second one (older releases ignore this setting).
    api = FastAPI(title="downstream orders", telemetry={"tracing": False})

    @api.get("/orders/{order_id}")
    async def get_order(order_id: str, request: Request) -> dict[str, Any]:
        request_id = baggage.get_baggage("request_id")
        tenant_id = baggage.get_baggage("tenant_id")
        span = trace.get_current_span()  # the server span of OTel's ASGI middleware
        span.set_attribute("orders.baggage_keys", sorted(baggage.get_all()))  # what arrived
        context = span.get_span_context()
        trace_id = f"{context.trace_id:032x}" if context.is_valid else None
        log.info(
            "order %s requested: request_id=%s tenant_id=%s trace_id=%s",
            order_id,
            request_id,
            tenant_id,
            trace_id,
            extra={"request_id": request_id, "tenant_id": tenant_id},
        )
        if order_id == FAILING_ORDER:  # a broken dependency, for the demo: answered 500
            raise RuntimeError(f"order {order_id}: the order store is unavailable")
        return {
            "order_id": order_id,
            "request_id": request_id,
            "tenant_id": tenant_id,
            "user_id": baggage.get_baggage("user_id"),
            "trace_id": trace_id,
            "traceparent": request.headers.get("traceparent"),  # as received, for the demo
            "uses_otel_ctxbridge": "otel_ctxbridge" in sys.modules,
        }

    return OpenTelemetryMiddleware(api, exclude_spans=["receive", "send"])


def setup_telemetry() -> Any:
    """A plain OTel SDK: a tracer provider (OTLP export and logs when an endpoint is set)."""
    from opentelemetry.processor.baggage import BaggageSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - startup only
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415 - startup only

    name = os.environ.get("OTEL_SERVICE_NAME", "orders-downstream")
    resource = Resource.create({"service.name": name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BaggageSpanProcessor(CONTEXT_KEYS.__contains__))
    trace.set_tracer_provider(provider)
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return provider
    from opentelemetry._logs import set_logger_provider  # noqa: PLC0415 - only with a collector
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # noqa: PLC0415
        OTLPLogExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.instrumentation.logging.handler import (  # noqa: PLC0415
        LoggingHandler,
    )
    from opentelemetry.processor.baggage import BaggageLogProcessor  # noqa: PLC0415
    from opentelemetry.sdk._logs import LoggerProvider  # noqa: PLC0415
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(BaggageLogProcessor(CONTEXT_KEYS.__contains__))
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
    set_logger_provider(logger_provider)
    log.addHandler(LoggingHandler(logger_provider=logger_provider))
    return provider


def main() -> None:
    """Serve on 127.0.0.1:``DOWNSTREAM_PORT`` with plain-text logs on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    provider = setup_telemetry()
    try:
        port = int(os.environ.get("DOWNSTREAM_PORT", "8002"))
        uvicorn.run(create_app(), host="127.0.0.1", port=port, log_config=None, access_log=False)
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
