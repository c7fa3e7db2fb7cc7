"""1,000 concurrent requests with distinct ids through a real uvicorn server: every response,
log line and span carries its own request's id, never another's."""

from __future__ import annotations

import asyncio
import logging
import random

import httpx
from _servers import serve
from fastapi import Depends, FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from test_asgi import Records, wait_until

import otel_ctxbridge as cb
from otel_ctxbridge.asgi import ACCESS_LOGGER, instrument_asgi

REQUESTS = 1000


def make_app(bridge: cb.ContextBridge, provider: TracerProvider) -> FastAPI:
    api = FastAPI()
    tracer = provider.get_tracer("tests.isolation")
    log = logging.getLogger("tests.isolation")

    def user_from_thread(rid: str) -> None:  # a sync dependency: runs in a worker thread
        bridge.update(user_id=f"user-{rid}")

    @api.get("/work/{rid}", dependencies=[Depends(user_from_thread)])
    async def work(rid: str) -> dict[str, str]:
        await asyncio.sleep(random.uniform(0, 0.02))
        log.info("working on %s", rid)
        with tracer.start_as_current_span("work"):
            await asyncio.sleep(random.uniform(0, 0.02))
            log.info("still on %s", rid)
        return {"request_id": bridge.get("request_id"), "user_id": bridge.get("user_id")}

    return api


async def test_concurrent_requests_never_mix_their_ids(bridge: cb.ContextBridge) -> None:
    """Each of 1,000 concurrent requests sees, echoes, logs and traces its own id (and the user
    its sync dependency set in a worker thread), in the handler, in app log lines (through
    ContextLogFilter), in the access log, on its server span and on its child span."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(cb.ContextSpanProcessor(bridge))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = instrument_asgi(make_app(bridge, provider), bridge, tracer_provider=provider)
    ids = [f"rid-{i:04d}-{random.getrandbits(32):08x}" for i in range(REQUESTS)]
    with Records("tests.isolation", ACCESS_LOGGER) as records:
        records.addFilter(cb.ContextLogFilter(bridge))
        with serve(app, limit_concurrency=None, backlog=4096) as base:
            limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

                async def one(rid: str) -> httpx.Response:
                    return await client.get(f"/work/{rid}", headers={"x-request-id": rid})

                responses = await asyncio.gather(*(one(rid) for rid in ids))
            assert wait_until(lambda: len(records.named(ACCESS_LOGGER)) >= REQUESTS, 20)
            assert wait_until(lambda: len(exporter.get_finished_spans()) >= 2 * REQUESTS, 20)
    provider.shutdown()

    for rid, response in zip(ids, responses, strict=True):
        assert response.status_code == 200
        assert response.headers["x-request-id"] == rid
        assert response.json() == {"request_id": rid, "user_id": f"user-{rid}"}

    app_lines = records.named("tests.isolation")
    assert len(app_lines) == 2 * REQUESTS
    for record in app_lines:
        assert record.request_id == record.args[0]  # type: ignore[index] # ("working on %s", rid)
        assert record.user_id == f"user-{record.args[0]}"  # type: ignore[index]

    access = records.named(ACCESS_LOGGER)
    assert sorted(r.request_id for r in access) == sorted(ids)
    for record in access:
        assert record.path == f"/work/{record.request_id}"
        assert record.user_id == f"user-{record.request_id}"

    spans = exporter.get_finished_spans()
    servers = {s.context.trace_id: s for s in spans if s.kind is SpanKind.SERVER}
    assert len(servers) == REQUESTS
    for server in servers.values():
        rid = server.attributes["app.request_id"]
        assert server.attributes["http.target"] == f"/work/{rid}"
        assert server.attributes["app.user_id"] == f"user-{rid}"
    children = [s for s in spans if s.name == "work"]
    assert len(children) == REQUESTS
    for child in children:
        server = servers[child.context.trace_id]
        assert child.attributes["app.request_id"] == server.attributes["app.request_id"]
        assert child.attributes["app.user_id"] == server.attributes["app.user_id"]
        assert child.parent is not None
        assert child.parent.span_id == server.context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN
