"""Collector outage: the real rotel collector dies (SIGKILL) while the gateway and downstream
examples (their own processes, exporting over OTLP) keep serving; it comes back on the same
ports and telemetry flows again. The services' export queues are the OTel SDK's batch
processors, bounded here at 64 items (``OTEL_BSP_MAX_QUEUE_SIZE`` / ``OTEL_BLRP_MAX_QUEUE_SIZE``)
so that an outage overflows them within a short test."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._services import running_demo_stack

GATEWAY, ORDERS = "gateway", "orders-downstream"
QUEUE = 64
SMALL_QUEUES = {
    "OTEL_BSP_MAX_QUEUE_SIZE": str(QUEUE),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16",
    "OTEL_BLRP_MAX_QUEUE_SIZE": str(QUEUE),
    "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE": "16",
}
NO_REUSE = httpx.Limits(max_keepalive_connections=0)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Any]:
    """The collector, its sink and both services (small export queues), started."""
    with running_demo_stack(tmp_path, env=SMALL_QUEUES) as stack:
        yield stack


def _has(records: list[dict[str, Any]], service: str, rid: str) -> bool:
    key = "app.request_id" if service == GATEWAY else "request_id"
    return any(r["service"] == service and r["attributes"].get(key) == rid for r in records)


def _arrived(sink: Any, rids: list[str]) -> bool:
    """Each request's spans and log records of both services are in the sink."""
    spans, logs = sink.spans(), sink.logs()
    return all(
        _has(records, service, rid)
        for rid in rids
        for records in (spans, logs)
        for service in (GATEWAY, ORDERS)
    )


def _get(client: httpx.Client, rid: str) -> float:
    """One checkout through both services; returns its latency (asserts a 200 and the echo)."""
    started = time.monotonic()
    response = client.get("/checkout/1", headers={"x-request-id": rid})
    elapsed = time.monotonic() - started
    assert (response.status_code, response.headers["x-request-id"]) == (200, rid)
    return elapsed


async def _burst(gateway_url: str, count: int, concurrency: int = 8) -> list[int]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30, limits=NO_REUSE) as client:

        async def one(i: int) -> int:
            async with limit:
                response = await client.get(f"/checkout/{i}", headers={"x-request-id": f"b-{i}"})
                return response.status_code

        return await asyncio.gather(*(one(i) for i in range(count)))


async def test_services_keep_answering_through_a_collector_outage_and_telemetry_resumes(
    stack: Any,
) -> None:
    """The collector is killed mid-run: requests keep succeeding (200 with their request id)
    without waiting on exports (median latency well under the exporter's first 1 s retry
    backoff), the SDK drops telemetry at its queue bound instead of buffering without limit
    (both services log "Queue full"), both services stay up, and once the collector is back on
    the same ports new requests' spans and logs from both services arrive again."""
    sink, collector = stack.sink, stack.collector
    with httpx.Client(base_url=stack.gateway_url, timeout=30, limits=NO_REUSE) as client:
        before = [f"before-{i}" for i in range(3)]
        for rid in before:
            _get(client, rid)
        assert sink.wait_for(lambda s: _arrived(s, before), timeout=15)

        assert collector.pid is not None
        os.kill(collector.pid, signal.SIGKILL)  # the collector dies, no goodbye
        deadline = time.monotonic() + 5
        while collector.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not collector.running

        latencies = [_get(client, f"down-{i}") for i in range(20)]
        # A request that waited for one export to the dead collector would take >= ~0.8 s.
        assert statistics.median(latencies) < 0.5, latencies
        statuses = await _burst(stack.gateway_url, 120)
        assert statuses == [200] * 120

        for name, proc in stack.procs.items():
            assert proc.poll() is None, f"{name} exited"
            output = stack.output(name, lines=100_000)
            assert "Queue full" in output or "Queue is full" in output, output[-3000:]

        collector.restart()  # same ports: the services' exporters find it again
        resumed = None
        for attempt in range(60):  # bounded: up to ~30 s
            rid = f"probe-{attempt}"
            _get(client, rid)
            if sink.wait_for(lambda s, rid=rid: _arrived(s, [rid]), timeout=0.5):
                resumed = rid
                break
        assert resumed is not None, stack.output(GATEWAY)

        after = [f"after-{i}" for i in range(10)]
        for rid in after:
            _get(client, rid)
        assert sink.wait_for(lambda s: _arrived(s, after), timeout=15)
    assert sink.bad_requests == 0
