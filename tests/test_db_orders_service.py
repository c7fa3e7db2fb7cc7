"""The orders example over HTTP: a real uvicorn server, the real PostgreSQL, OTel's asyncpg spans.

Clients reach the service through a "gateway" that is trusted because it sends the shared
secret; the test process itself (127.0.0.1) is an untrusted peer otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from _servers import serve
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_ctxbridge.spans import ContextSpanProcessor
from otel_ctxbridge.trust import TrustPolicy
from tests._postgres import SERVER, admin, admin_now, require_postgres

TENANTS = ("acme", "globex")
SECRET = "gateway-secret-for-tests"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "orders_service.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("orders_service_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


class Service:
    """The running example: its base URL, registry, spans and schemas."""

    def __init__(self, url: str, app: Any, spans: InMemorySpanExporter, schemas: dict[str, str]):
        self.url = url
        self.pools = app.fastapi.state.pools
        self.spans = spans
        self.schemas = schemas

    def client(self) -> httpx.AsyncClient:
        """An HTTP client with room for many concurrent requests."""
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        return httpx.AsyncClient(base_url=self.url, limits=limits, timeout=30)

    async def orders(self, tenant: str) -> list[tuple[str, str]]:
        """(sku, request_id) of the tenant's stored orders, read directly from its schema."""
        rows = await admin(
            f"SELECT sku, request_id FROM {self.schemas[tenant]}.orders WHERE id > $1", 0
        )
        return [(r["sku"], r["request_id"]) for r in rows]

    async def stock(self, tenant: str, sku: str) -> int:
        """The tenant's stock of ``sku``, read directly from its schema."""
        rows = await admin(
            f"SELECT quantity FROM {self.schemas[tenant]}.inventory WHERE sku = $1", sku
        )
        return int(rows[0]["quantity"])


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """The example on PostgreSQL (a schema per tenant, created by the service) behind uvicorn,
    with asyncpg query spans and the bridge's span processor; schemas dropped afterwards."""
    require_postgres()
    prefix = f"ctxb_{uuid.uuid4().hex[:10]}"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(ContextSpanProcessor(example.bridge))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AsyncPGInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    app = example.create_app(
        database_url=f"{SERVER}?search_path={prefix}_{{tenant}}",
        tenants=TENANTS,
        trust=TrustPolicy(secret=SECRET),
        pool_size=5,
        tracer_provider=provider,
    )
    try:
        with serve(app) as url:
            yield Service(url, app, exporter, {t: f"{prefix}_{t}" for t in TENANTS})
        assert app.fastapi.state.pools.tenants() == []  # closed on shutdown
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
        admin_now("".join(f"DROP SCHEMA IF EXISTS {prefix}_{t} CASCADE;" for t in TENANTS))


def _gateway(tenant: str, request_id: str) -> dict[str, str]:
    return {"x-ctxbridge-secret": SECRET, "x-tenant-id": tenant, "x-request-id": request_id}


async def test_200_concurrent_requests_alternating_tenants_see_only_their_own_tenant(
    service: Service,
) -> None:
    """200 concurrent HTTP requests alternating tenants: each creates an order and lists its
    tenant's orders, which hold only that tenant's request ids; each schema gets its 100."""

    async def request(client: httpx.AsyncClient, i: int) -> tuple[str, list[str]]:
        tenant = TENANTS[i % 2]
        headers = _gateway(tenant, f"c200-{tenant}-{i}")
        created = await client.post("/orders", json={"sku": "pen", "quantity": 1}, headers=headers)
        assert created.status_code == 201, created.text
        assert created.headers["x-request-id"] == headers["x-request-id"]
        listed = await client.get("/orders", headers=headers)
        assert listed.status_code == 200
        return tenant, [o["request_id"] for o in listed.json()]

    async with service.client() as client:
        results = await asyncio.gather(*(request(client, i) for i in range(200)))
    for tenant, request_ids in results:
        mine = [r for r in request_ids if r.startswith("c200-")]
        assert mine
        assert all(r.startswith(f"c200-{tenant}-") for r in mine)
    for tenant in TENANTS:
        stored = [rid for _, rid in await service.orders(tenant) if rid.startswith("c200-")]
        assert len(stored) == 100
        assert all(rid.startswith(f"c200-{tenant}-") for rid in stored)


async def test_500_requests_with_failures_roll_back_and_return_every_connection(
    service: Service,
) -> None:
    """500 requests, a third of them failing after the order insert (out of stock, 409): no
    failed order is stored, stock moves by exactly the successes, and afterwards no connection
    is lent out and every pool has all its connections idle, within its bound."""
    before = {t: await service.stock(t, "pen") for t in TENANTS}

    async def request(client: httpx.AsyncClient, i: int) -> tuple[str, str, int]:
        tenant, rid = TENANTS[i % 2], f"p500-{i}"
        body = {"sku": "lamp", "quantity": 1000} if i % 3 == 0 else {"sku": "pen", "quantity": 1}
        response = await client.post("/orders", json=body, headers=_gateway(tenant, rid))
        return tenant, rid, response.status_code

    async with service.client() as client:
        results = await asyncio.gather(*(request(client, i) for i in range(500)))
    assert {status for _, _, status in results} == {201, 409}
    for tenant in TENANTS:
        stored = {rid for _, rid in await service.orders(tenant) if rid.startswith("p500-")}
        ok = {rid for t, rid, status in results if t == tenant and status == 201}
        assert stored == ok
        assert before[tenant] - await service.stock(tenant, "pen") == len(ok)
    assert service.pools.in_use() == 0
    pools = service.pools.open_pools()
    assert sorted(pools) == sorted(TENANTS)
    for pool in pools.values():
        assert 1 <= pool.get_size() <= 5
        assert pool.get_idle_size() == pool.get_size()


async def test_untrusted_baggage_or_header_cannot_reach_another_tenant(
    service: Service,
) -> None:
    """A client sending ``baggage: tenant_id=globex`` (or ``x-tenant-id``) from an untrusted
    peer, or with a wrong secret, gets 400 (no tenant) and writes nothing anywhere."""
    hostile = [
        {"baggage": "tenant_id=globex"},
        {"baggage": "tenant_id=globex", "x-tenant-id": "globex"},
        {"x-tenant-id": "globex", "x-ctxbridge-secret": "guessed"},
    ]
    before = {t: len(await service.orders(t)) for t in TENANTS}
    async with service.client() as client:
        for headers in hostile:
            posted = await client.post(
                "/orders", json={"sku": "pen", "quantity": 1}, headers=headers
            )
            assert posted.status_code == 400, posted.text
            listed = await client.get("/orders", headers=headers)
            assert listed.status_code == 400
    assert {t: len(await service.orders(t)) for t in TENANTS} == before


async def test_query_spans_and_log_lines_carry_the_request_fields(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """One order: its INSERT and UPDATE spans (from opentelemetry-instrumentation-asyncpg) sit
    in the request's trace and carry its request id and tenant; the service's log line too."""
    service.spans.clear()
    with caplog.at_level(logging.INFO, logger="orders"):
        async with service.client() as client:
            response = await client.post(
                "/orders", json={"sku": "book", "quantity": 2}, headers=_gateway("globex", "q-1")
            )
    assert response.status_code == 201
    for _ in range(500):  # the server span ends just after the response is sent
        spans = service.spans.get_finished_spans()
        mine = [s for s in spans if (s.attributes or {}).get("app.request_id") == "q-1"]
        server = [s for s in mine if s.kind.name == "SERVER"]
        if server:
            break
        await asyncio.sleep(0.01)
    queries = {s.name: s for s in mine if s.kind.name == "CLIENT"}
    assert len(server) == 1
    assert {"INSERT", "UPDATE"} <= set(queries)
    for span in queries.values():
        assert span.context.trace_id == server[0].context.trace_id
        assert (span.attributes or {})["app.tenant_id"] == "globex"
        assert (span.attributes or {})["db.system"] == "postgresql"
    created = [r for r in caplog.records if r.name == "orders" and "created" in r.getMessage()]
    assert [(r.request_id, r.tenant_id) for r in created] == [("q-1", "globex")]  # type: ignore[attr-defined]


async def test_the_example_runs_on_sqlite_by_default(tmp_path: Path) -> None:
    """Without a DSN: one SQLite file per tenant; an order commits, an impossible one rolls
    back (409), tenants stay apart, an unknown tenant is 404."""
    app = example.create_app(data_dir=tmp_path, trust=TrustPolicy(secret=SECRET))
    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            ok = await client.post(
                "/orders", json={"sku": "lamp", "quantity": 2}, headers=_gateway("acme", "s-1")
            )
            assert ok.status_code == 201
            assert ok.json()["remaining"] == 1
            too_many = await client.post(
                "/orders", json={"sku": "lamp", "quantity": 2}, headers=_gateway("acme", "s-2")
            )
            assert too_many.status_code == 409
            acme = (await client.get("/orders", headers=_gateway("acme", "s-3"))).json()
            assert [o["request_id"] for o in acme] == ["s-1"]
            globex = (await client.get("/orders", headers=_gateway("globex", "s-4"))).json()
            assert globex == []
            unknown = await client.get("/orders", headers=_gateway("initech", "s-5"))
            assert unknown.status_code == 404
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["acme.db", "globex.db"]


def _documented_curl_commands() -> list[list[str]]:
    """The ``curl`` commands of the example's docstring (its SQLite "Run it" block), as argv."""
    text = (example.__doc__ or "").split("On PostgreSQL")[0]
    commands, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if pending or line.startswith("curl "):
            pending += " " + line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            commands.append(shlex.split(pending, comments=True))
            pending = ""
    return commands


def test_the_documented_curl_commands_work_as_written(tmp_path: Path) -> None:
    """Each ``curl`` command of the example's docstring, run with the real curl against the
    example as ``main()`` configures it (localhost trusted): none is refused (a POST sent as
    curl's default form encoding would get 422), and the order it creates is listed."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    commands = _documented_curl_commands()
    assert len(commands) == 3, commands
    app = example.create_app(
        data_dir=tmp_path, trust=TrustPolicy(networks=["127.0.0.1/32", "::1/128"])
    )
    outputs = []
    with serve(app) as url:
        for documented in commands:
            argv = [curl] + [
                url + a.removeprefix("localhost:8000") if a.startswith("localhost:") else a
                for a in documented[1:]
            ]
            done = subprocess.run(
                [*argv, "-w", "\n%{http_code}"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            body, _, status = done.stdout.rpartition("\n")
            assert done.returncode == 0, done.stderr
            assert int(status) < 400, (argv, status, body)
            outputs.append(json.loads(body))
    products, created, listed = outputs
    assert {p["sku"] for p in products} == set(example.STOCK)
    assert (created["sku"], created["quantity"]) == ("book", 2)
    assert [(o["id"], o["sku"]) for o in listed] == [(created["id"], "book")]


def test_comma_separated_settings_allow_spaces() -> None:
    """``ORDERS_TRUSTED_NETWORKS="127.0.0.1/32, ::1/128"`` (a space after the comma) used to
    stop the service at startup, and ``ORDERS_TENANTS="acme, globex"`` made a tenant
    ``" globex"``."""
    networks = example._items("127.0.0.1/32, ::1/128 ,")
    assert networks == ["127.0.0.1/32", "::1/128"]
    TrustPolicy(networks=networks)
    assert example._items("acme, globex") == ["acme", "globex"]
