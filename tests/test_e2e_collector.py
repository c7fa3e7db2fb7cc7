"""End to end through a real OpenTelemetry Collector: the gateway example (otel_ctxbridge) and
the downstream orders example (plain OpenTelemetry) run as their own processes and export spans
and OTel log records over OTLP to the embedded rotel collector, which forwards them to a
recording sink. Every assertion is about what the collector forwarded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests._services import running_demo_stack

GATEWAY, ORDERS = "gateway", "orders-downstream"
N = 20
FAILING = 7  # this request asks for the order the downstream fails on: a 500 end to end


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``examples/demo_stack.Stack``: the collector, its sink and both services, started."""
    with running_demo_stack(tmp_path_factory.mktemp("e2e")) as stack:
        yield stack


def _request(i: int) -> tuple[str, dict[str, str]]:
    """Request ``i``: even ones bring their own request id; all a tenant and a user."""
    headers = {"x-tenant-id": f"tenant-{i % 3}", "x-user": f"secret-user-{i}"}
    if i % 2 == 0:
        headers["x-request-id"] = f"e2e-{i}"
    return (f"/checkout/{'fail' if i == FAILING else i}", headers)


async def _send_all(gateway_url: str) -> list[tuple[int, dict[str, str], httpx.Response]]:
    # A fresh connection per request: uvicorn drops a kept-alive connection after a 500.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30, limits=limits) as client:

        async def one(i: int) -> tuple[int, dict[str, str], httpx.Response]:
            path, headers = _request(i)
            return i, headers, await client.get(path, headers=headers)

        return await asyncio.gather(*(one(i) for i in range(N)))


def _by(records: list[dict[str, Any]], service: str, key: str, rid: str) -> list[dict[str, Any]]:
    return [r for r in records if r["service"] == service and r["attributes"].get(key) == rid]


def _complete(sink: Any, rids: list[str]) -> bool:
    spans, logs = sink.spans(), sink.logs()
    for rid in rids:
        gw_spans = _by(spans, GATEWAY, "app.request_id", rid)
        if {s["kind"] for s in gw_spans} < {"SERVER", "CLIENT"}:
            return False
        if not _by(spans, ORDERS, "request_id", rid):
            return False
        gateway_bodies = [str(r["body"]) for r in _by(logs, GATEWAY, "app.request_id", rid)]
        # The access-log line is written after the response, so it may arrive in a later batch.
        if not any(body.startswith("GET /") for body in gateway_bodies):
            return False
        if not _by(logs, ORDERS, "request_id", rid):
            return False
    return True


def _field(record: dict[str, Any], name: str) -> Any:
    """A field as the gateway names it (``app.<name>``) or as the downstream does (``<name>``,
    the baggage key)."""
    attributes = record["attributes"]
    return attributes.get(f"app.{name}", attributes.get(name))


def _status(span: dict[str, Any]) -> Any:
    attributes = span["attributes"]
    return attributes.get("http.response.status_code", attributes.get("http.status_code"))


async def test_every_request_id_is_in_both_services_spans_and_logs_in_one_trace(
    stack: Any,
) -> None:
    """20 concurrent requests through gateway -> orders (10 with their own X-Request-ID, 10
    with one generated, one failing with a 500): for every request id, as the collector
    forwarded them, the gateway's server and client spans carry it (``app.request_id``), the
    downstream's server span carries what it read from baggage (``request_id``), both services'
    OTel log records carry it, every span and log record of the request shares one trace id
    (and no other request's id), the spans chain gateway server -> gateway client -> downstream
    server, and the process-local user id is on the gateway's records only."""
    results = await _send_all(stack.gateway_url)
    rids: dict[str, tuple[int, dict[str, str]]] = {}
    for i, headers, response in results:
        assert response.status_code == (500 if i == FAILING else 200), response.text
        rid = response.headers["x-request-id"]
        assert rid == headers.get("x-request-id", rid)
        rids[rid] = (i, headers)
    assert len(rids) == N
    complete = stack.sink.wait_for(lambda sink: _complete(sink, list(rids)), timeout=20)
    assert complete, f"telemetry missing; gateway output:\n{stack.output(GATEWAY)}"

    spans, logs = stack.sink.spans(), stack.sink.logs()
    for rid, (i, headers) in rids.items():
        (server,) = [s for s in _by(spans, GATEWAY, "app.request_id", rid) if s["kind"] == "SERVER"]
        (client,) = [s for s in _by(spans, GATEWAY, "app.request_id", rid) if s["kind"] == "CLIENT"]
        (downstream,) = _by(spans, ORDERS, "request_id", rid)
        trace_id = server["trace_id"]
        assert (downstream["kind"], downstream["trace_id"], client["trace_id"]) == (
            "SERVER",
            trace_id,
            trace_id,
        )
        assert client["parent_span_id"] == server["span_id"]
        assert downstream["parent_span_id"] == client["span_id"]
        assert server["attributes"]["app.tenant_id"] == headers["x-tenant-id"]
        assert downstream["attributes"]["tenant_id"] == headers["x-tenant-id"]
        assert sorted(downstream["attributes"]["orders.baggage_keys"]) == [
            "request_id",
            "tenant_id",
        ]
        assert server["attributes"]["app.user_id"] == headers["x-user"]  # stays in the gateway
        assert _status(server) == _status(downstream) == (500 if i == FAILING else 200)

        gateway_logs = _by(logs, GATEWAY, "app.request_id", rid)
        orders_logs = _by(logs, ORDERS, "request_id", rid)
        path = _request(i)[0]
        order = path.rsplit("/", 1)[1]
        bodies = [str(r["body"]) for r in gateway_logs]
        assert any(b.startswith(f"GET {path} {_status(server)} ") for b in bodies)  # access log
        if i == FAILING:
            assert f"unhandled exception in GET {path}" in bodies
        else:
            assert f"checkout of order {order}" in bodies
        assert any(str(r["body"]).startswith(f"order {order} requested") for r in orders_logs)
        for record in (*gateway_logs, *orders_logs):
            assert record["trace_id"] == trace_id
            assert _field(record, "tenant_id") == headers["x-tenant-id"]

        # Everything the collector got in this trace carries this request id and no other.
        in_trace = [r for r in (*spans, *logs) if r["trace_id"] == trace_id]
        for record in in_trace:
            assert _field(record, "request_id") == rid, record

    # The process-local user id never left the gateway: not on any downstream record.
    downstream_records = [r for r in (*spans, *logs) if r["service"] == ORDERS]
    assert downstream_records
    for record in downstream_records:
        text = f"{record['attributes']} {record.get('body', '')} {record['resource']}"
        assert "secret-user-" not in text, record
        assert not any(key.endswith("user_id") for key in record["attributes"]), record
