"""A test service for the W3C Trace Context test suite (https://github.com/w3c/trace-context).

The suite's harness (``test/test.py``) POSTs to the service a JSON list of
``{"url": ..., "arguments": [...]}``; the service must POST ``arguments`` as JSON to each
``url``, propagating the trace context it received. Here the inbound side is
``instrument_asgi`` (``traceparent``/``tracestate`` checked as W3C Trace Context Level 1 says)
and the outbound side is OpenTelemetry's httpx instrumentation, which gives every call its own
client span and injects ``traceparent``/``tracestate`` from it.

Run the service, then the suite against it::

    python examples/w3c_test_service.py --port 5000
    git clone https://github.com/w3c/trace-context && cd trace-context/test
    python test.py http://127.0.0.1:5000/test

``tests/test_tracecontext.py`` runs the suite's key cases against this service.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import otel_ctxbridge as cb
from otel_ctxbridge.asgi import instrument_asgi

BRIDGE = cb.ContextBridge(
    [
        cb.Field(
            "request_id",
            header="x-request-id",
            generate=cb.new_request_id,
            inbound="always",
            validator=cb.REQUEST_ID_PATTERN,
        )
    ]
)


def build_app(bridge: cb.ContextBridge = BRIDGE, tracer_provider: Any = None) -> Any:
    """The test service: ``POST /test`` calls back each ``url`` of the JSON list it receives
    (``tracer_provider``: the provider for its spans; default: the global one)."""
    client = httpx.AsyncClient(timeout=5.0)
    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=tracer_provider)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    async def test(request: Request) -> JSONResponse:
        try:
            calls = await request.json()
        except ValueError:
            return JSONResponse({"error": "expected a JSON list"}, status_code=400)
        if not isinstance(calls, list):
            return JSONResponse({"error": "expected a JSON list"}, status_code=400)
        for call in calls:
            if isinstance(call, dict) and isinstance(call.get("url"), str):
                await client.post(call["url"], json=call.get("arguments", []))
        return JSONResponse({"calls": len(calls)})

    api = Starlette(routes=[Route("/test", test, methods=["POST"])], lifespan=lifespan)
    return instrument_asgi(api, bridge, access_log=False, tracer_provider=tracer_provider)


def main() -> None:
    """Serve the test service with an SDK tracer provider (spans are not exported)."""
    import uvicorn  # noqa: PLC0415 - only when run as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    trace.set_tracer_provider(TracerProvider())
    propagate.set_global_textmap(cb.default_propagator())
    uvicorn.run(build_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
