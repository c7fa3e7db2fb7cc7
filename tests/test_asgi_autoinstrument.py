"""instrument_asgi in a FastAPI service started under ``opentelemetry-instrument``: one server
span (no duplicate from FastAPI's native telemetry or auto-instrumentation), the fields on it,
and the auto-instrumented httpx client carrying the trace and the request id downstream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import free_port, serve, wait_for_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_asgi import wait_until

APP = """
import json, os
import httpx
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
import otel_ctxbridge as cb
from otel_ctxbridge.asgi import instrument_asgi


class FileExporter(SpanExporter):
    def export(self, spans):
        with open(os.environ["SPANS_FILE"], "a") as out:
            for s in spans:
                out.write(json.dumps({
                    "name": s.name,
                    "kind": s.kind.name,
                    "trace_id": format(s.context.trace_id, "032x"),
                    "attributes": dict(s.attributes),
                }) + "\\n")
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
trace.set_tracer_provider(provider)
bridge = cb.ContextBridge([
    cb.Field("request_id", header="x-request-id", generate=cb.new_request_id, inbound="always"),
])
api = FastAPI()


@api.get("/hop")
async def hop():
    async with httpx.AsyncClient() as client:
        response = await client.get(os.environ["ECHO_URL"])
    return response.json()


app = instrument_asgi(api, bridge)
"""

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def echo_url() -> Iterator[str]:
    """A downstream service that answers with the headers it received."""

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(dict(request.headers))

    with serve(Starlette(routes=[Route("/", echo)])) as base:
        yield base + "/"


def test_service_under_opentelemetry_instrument(tmp_path: Path, echo_url: str) -> None:
    """Under auto-instrumentation: exactly one SERVER span, continuing the inbound trace and
    carrying the request id; the auto-instrumented httpx call sends the same trace and the
    request id as baggage downstream."""
    (tmp_path / "auto_app.py").write_text(APP)
    spans_file = tmp_path / "spans.jsonl"
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "SPANS_FILE": str(spans_file),
        "ECHO_URL": echo_url,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    command = [
        str(bin_dir / "opentelemetry-instrument"),
        sys.executable,
        "-m",
        "uvicorn",
        "auto_app:app",
        "--app-dir",
        str(tmp_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=30, process=process)
        response = httpx.get(
            f"http://127.0.0.1:{port}/hop",
            headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01", "x-request-id": "rid-auto"},
            timeout=10,
        )
        assert response.status_code == 200
        downstream: dict[str, Any] = response.json()

        def spans() -> list[dict[str, Any]]:
            if not spans_file.exists():
                return []
            return [json.loads(line) for line in spans_file.read_text().splitlines()]

        assert wait_until(lambda: any(s["kind"] == "SERVER" for s in spans()), 10)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    recorded = spans()
    servers = [s for s in recorded if s["kind"] == "SERVER"]
    assert len(servers) == 1, recorded
    assert servers[0]["trace_id"] == TRACE
    assert servers[0]["attributes"]["app.request_id"] == "rid-auto"
    clients = [s for s in recorded if s["kind"] == "CLIENT"]
    assert len(clients) == 1
    assert clients[0]["trace_id"] == TRACE
    assert downstream["traceparent"].split("-")[1] == TRACE
    assert "request_id=rid-auto" in downstream["baggage"]
    assert response.headers["x-request-id"] == "rid-auto"
