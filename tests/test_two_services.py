"""Two real services on 127.0.0.1: the gateway example (otel_ctxbridge, uvicorn in a thread)
calls the downstream orders example (plain OpenTelemetry, uvicorn in its own process), which
reads the caller's request id and tenant through the plain baggage API, in the same trace; a
third party outside the egress policy (a real server recording headers) gets no baggage."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import free_port, serve, wait_for_port
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_ctxbridge.egress import EgressPolicy, HttpEgress, instrument_http_clients

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Recorder:
    """A third party: answers 200 and keeps each request's raw headers."""

    def __init__(self) -> None:
        self.requests: list[list[tuple[str, str]]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests.append([(k.decode(), v.decode("latin-1")) for k, v in scope["headers"]])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture(scope="module")
def gateway_module() -> Any:
    """``examples/gateway_service.py``, imported."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import gateway_service
    finally:
        sys.path.remove(str(EXAMPLES))
    return gateway_service


@pytest.fixture(scope="module")
def downstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """``examples/downstream_orders_service.py`` in its own process: (port, log file)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("downstream") / "downstream.log"
    env = {**os.environ, "DOWNSTREAM_PORT": str(port)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "downstream_orders_service.py")],
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        wait_for_port(port, timeout=30, process=process)
        yield port, log_path
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def services(
    gateway_module: Any, downstream: tuple[int, Path], spans: InMemorySpanExporter
) -> Iterator[dict[str, Any]]:
    """The gateway (egress policy: ``localhost`` only) calling the downstream at ``localhost``
    and a recording third party at ``127.0.0.1``."""
    port, log_path = downstream
    orders_url = f"http://localhost:{port}"
    partner = Recorder()
    egress: HttpEgress = instrument_http_clients(
        gateway_module.bridge, EgressPolicy(hosts=["localhost"])
    )
    try:
        with serve(partner, lifespan="off") as partner_url:
            app = gateway_module.create_app(orders_url, partner_url=f"{partner_url}/pay")
            with serve(app) as gateway_url:
                yield {"gateway": gateway_url, "partner": partner, "log": log_path}
    finally:
        egress.uninstrument()


def _get(url: str, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """A request from a plain (uninstrumented) client: only the headers given."""
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read()), dict(response.headers)


def _wait_for_log_line(path: Path, needle: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        time.sleep(0.05)
    pytest.fail(f"{needle!r} not in the downstream log:\n{path.read_text()[-3000:]}")


def test_downstream_reads_request_id_and_tenant_with_plain_baggage_api(
    services: dict[str, Any], spans: InMemorySpanExporter
) -> None:
    """The downstream (no otel_ctxbridge loaded) reads the caller's request id and tenant (a
    space survives) through ``baggage.get_baggage``, in the caller's trace, as a child of the
    gateway's client span, and logs them; the process-local user never arrives."""
    body, headers = _get(
        f"{services['gateway']}/checkout/7",
        {
            "x-request-id": "r-two-1",
            "x-tenant-id": "acme corp",
            "x-user": "u-secret",
            "traceparent": TRACEPARENT,
        },
    )
    orders = body["orders"]
    assert orders["uses_otel_ctxbridge"] is False
    assert (orders["request_id"], orders["tenant_id"], orders["user_id"]) == (
        "r-two-1",
        "acme corp",
        None,
    )
    assert orders["trace_id"] == TRACE_ID
    assert body["gateway"] == {
        "request_id": "r-two-1",
        "tenant_id": "acme corp",
        "user_id": "u-secret",
    }
    assert headers["x-request-id"] == "r-two-1"
    client_spans = [
        s
        for s in spans.get_finished_spans()
        if s.kind == trace.SpanKind.CLIENT and "/orders/7" in str(s.attributes)
    ]
    (client_span,) = client_spans
    assert orders["traceparent"].split("-")[2] == f"{client_span.context.span_id:016x}"
    line = _wait_for_log_line(services["log"], "order 7 requested")
    assert f"request_id=r-two-1 tenant_id=acme corp trace_id={TRACE_ID}" in line


def test_third_party_outside_the_egress_policy_gets_no_baggage(
    services: dict[str, Any],
) -> None:
    """The same request's call to a host outside the policy, checked at a real server that
    records headers: ``traceparent`` of the same trace, no ``baggage``, nothing of the fields."""
    _get(
        f"{services['gateway']}/checkout/8",
        {"x-request-id": "r-two-2", "x-tenant-id": "acme", "traceparent": TRACEPARENT},
    )
    (received,) = services["partner"].requests
    names = [name for name, _ in received]
    values = " ".join(value for _, value in received)
    assert "baggage" not in names
    assert names.count("traceparent") == 1
    assert dict(received)["traceparent"].startswith(f"00-{TRACE_ID}-")
    assert "r-two-2" not in values
    assert "acme" not in values


async def test_concurrent_requests_never_mix_ids_across_services(
    services: dict[str, Any],
) -> None:
    """60 concurrent requests through the gateway, half with a request id and half with one
    generated: the downstream sees each request's own id and tenant."""

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str, dict[str, Any]]:
        headers = {"x-tenant-id": f"tenant-{i}"}
        if i % 2 == 0:
            headers["x-request-id"] = f"r-c-{i}"
        response = await client.get(f"{services['gateway']}/checkout/{i}", headers=headers)
        response.raise_for_status()
        return i, response.headers["x-request-id"], response.json()["orders"]

    async with httpx.AsyncClient(timeout=30) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(60)))
    for i, echoed, orders in results:
        if i % 2 == 0:
            assert echoed == f"r-c-{i}"
        assert (orders["order_id"], orders["request_id"], orders["tenant_id"]) == (
            str(i),
            echoed,
            f"tenant-{i}",
        )
    assert len({echoed for _, echoed, _ in results}) == 60
