"""examples/request_logging_service.py: JSON log lines carrying the request's fields."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from pathlib import Path
from typing import Any

import httpx
from _servers import serve
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_asgi import wait_until


def _example() -> Any:
    path = Path(__file__).resolve().parent.parent / "examples" / "request_logging_service.py"
    spec = importlib.util.spec_from_file_location("request_logging_service", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_request_logging_example_writes_json_lines_with_fields(
    spans: InMemorySpanExporter,
) -> None:
    """App lines, the access line and the error line are JSON objects with the request id,
    the trusted tenant, the user set in a sync dependency and the trace ids."""
    example = _example()
    stream = io.StringIO()
    handler = example.json_handler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with serve(example.build_app()) as base:
            ok = httpx.get(
                base + "/hello/ada",
                headers={"x-request-id": "demo-1", "authorization": "Bearer ada"},
            )
            assert ok.json() == {"hello": "ada", "request_id": "demo-1", "user": "ada"}
            failed = httpx.get(base + "/fail", headers={"x-tenant-id": "acme"})
            assert failed.status_code == 500

            def lines() -> list[dict[str, Any]]:
                return [json.loads(line) for line in stream.getvalue().splitlines()]

            assert wait_until(
                lambda: sum(1 for line in lines() if line["logger"] == "otel_ctxbridge.access") == 2
            )
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    records = lines()
    greeting = next(r for r in records if r["message"] == "greeting ada")
    assert (greeting["request_id"], greeting["user_id"], greeting["level"]) == (
        "demo-1",
        "ada",
        "INFO",
    )
    assert len(greeting["trace_id"]) == 32
    first, second = (r for r in records if r["logger"] == "otel_ctxbridge.access")
    assert first["message"].startswith("GET /hello/ada 200 ")
    assert (first["request_id"], first["user_id"], first["status_code"]) == ("demo-1", "ada", 200)
    assert first["trace_id"] == greeting["trace_id"]
    assert (second["path"], second["status_code"], second["tenant_id"]) == ("/fail", 500, "acme")
    assert second["request_id"] == failed.headers["x-request-id"]
    error = next(r for r in records if r["logger"] == "otel_ctxbridge.asgi")
    assert error["request_id"] == failed.headers["x-request-id"]
    assert "RuntimeError: something broke" in error["exc_info"]
