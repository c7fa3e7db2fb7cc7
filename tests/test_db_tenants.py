"""Tenant-routed connections on the real PostgreSQL at 127.0.0.1:5432 (one schema per tenant).

Each tenant's DSN sets ``search_path`` to that tenant's schema, so every tenant sees a table
``items`` of its own: a row written through the wrong pool shows up in the wrong schema.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from opentelemetry import baggage, context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from otel_ctxbridge.integrations.db import (
    PoolLike,
    TenantPoolError,
    TenantPools,
    UnknownTenantError,
)
from tests._postgres import SERVER, admin_now, require_postgres

TENANTS = ("acme", "globex")


@pytest.fixture(scope="module")
def dsns() -> Iterator[dict[str, str]]:
    """A fresh schema per tenant with an ``items`` table; dropped after the module."""
    prefix = f"ctxb_{uuid.uuid4().hex[:10]}"
    require_postgres()
    ddl = "".join(
        f"CREATE SCHEMA {prefix}_{t}; CREATE TABLE {prefix}_{t}.items "
        f"(id bigserial PRIMARY KEY, owner text NOT NULL, note text NOT NULL);"
        for t in TENANTS
    )
    admin_now(ddl)
    try:
        yield {t: f"{SERVER}?search_path={prefix}_{t}" for t in TENANTS}
    finally:
        admin_now("".join(f"DROP SCHEMA IF EXISTS {prefix}_{t} CASCADE;" for t in TENANTS))


@pytest.fixture
async def pools(bridge: cb.ContextBridge, dsns: dict[str, str]) -> AsyncIterator[TenantPools[Any]]:
    """A registry of the two tenants' pools (at most 5 connections each), closed after."""
    registry = TenantPools(bridge, dsns, min_size=1, max_size=5)
    yield registry
    await registry.close()


async def _rows(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [(r["owner"], r["note"]) for r in await conn.fetch("SELECT owner, note FROM items")]
    finally:
        await conn.close()


async def _our_backends(app_name: str) -> int:
    conn = await asyncpg.connect(SERVER)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        return int(count)
    finally:
        await conn.close()


async def test_two_tenants_200_concurrent_requests_write_and_read_only_their_own_data(
    bridge: cb.ContextBridge, pools: TenantPools[Any], dsns: dict[str, str]
) -> None:
    """200 concurrent request tasks alternating tenants: each writes one row through
    ``pools.acquire()`` and reads back only rows of its own tenant; each schema ends with
    exactly its own 100 rows."""

    async def request(i: int) -> list[str]:
        tenant = TENANTS[i % 2]
        with bridge.scope(request_id=f"r-{i}", tenant_id=tenant):
            async with pools.acquire() as conn:
                await conn.execute("INSERT INTO items(owner, note) VALUES ($1, $2)", tenant, str(i))
            await asyncio.sleep(0)  # let other tenants' requests interleave
            async with pools.acquire() as conn:
                return [r["owner"] for r in await conn.fetch("SELECT owner FROM items")]

    seen = await asyncio.gather(*(request(i) for i in range(200)))
    for i, owners in enumerate(seen):
        assert owners, f"request {i} read nothing back"
        assert set(owners) == {TENANTS[i % 2]}, f"request {i} read another tenant's rows"
    for tenant in TENANTS:
        rows = await _rows(dsns[tenant])
        assert len(rows) >= 100
        assert {owner for owner, _ in rows} == {tenant}
    assert pools.in_use() == 0
    assert sorted(pools.tenants()) == sorted(TENANTS)


async def test_no_tenant_in_context_raises_missing_context_error(pools: TenantPools[Any]) -> None:
    """Without a tenant in the scope, taking a connection raises MissingContextError naming
    the field, and no pool is created."""
    with pytest.raises(cb.MissingContextError, match="tenant_id"):
        pools.acquire()
    with pytest.raises(cb.MissingContextError):
        await pools.pool()
    assert pools.tenants() == []


async def test_unknown_tenant_gets_a_clear_error_never_another_tenants_pool(
    bridge: cb.ContextBridge, pools: TenantPools[Any], dsns: dict[str, str]
) -> None:
    """A tenant missing from the mapping (or for which the callable answers None) raises
    UnknownTenantError, a ContextBridgeError; no pool is made for it."""
    with bridge.scope(tenant_id="initech"), pytest.raises(UnknownTenantError, match="initech"):
        async with pools.acquire():
            pass
    assert isinstance(UnknownTenantError("x"), cb.ContextBridgeError)
    assert pools.tenants() == []

    by_callable = TenantPools(bridge, dsns.get, max_size=1)
    try:
        with bridge.scope(tenant_id="initech"), pytest.raises(UnknownTenantError):
            await by_callable.pool()
        with bridge.scope(tenant_id="acme"):
            async with by_callable.acquire() as conn:
                assert await conn.fetchval("SELECT current_schema()") == dsns["acme"].split("=")[-1]
    finally:
        await by_callable.close()


async def test_untrusted_baggage_cannot_switch_tenant(
    bridge: cb.ContextBridge, pools: TenantPools[Any], dsns: dict[str, str]
) -> None:
    """``baggage: tenant_id=other`` (and an ``x-tenant-id`` header) from an untrusted peer is
    not taken: the request keeps the tenant the server set, or has none at all; the same
    carrier from a trusted peer does route (and an unknown tenant is refused)."""
    hostile = {"baggage": "tenant_id=globex,request_id=r-hostile", "x-tenant-id": "globex"}
    taken = bridge.extract(hostile, trusted=False)
    assert "tenant_id" not in taken
    assert taken["request_id"] == "r-hostile"

    with bridge.scope(tenant_id="acme"), bridge.scope(**taken):
        async with pools.acquire() as conn:
            await conn.execute("INSERT INTO items(owner, note) VALUES ('acme', 'hostile')")
    with bridge.scope(**taken), pytest.raises(cb.MissingContextError):
        pools.acquire()
    assert ("acme", "hostile") in await _rows(dsns["acme"])
    assert all(note != "hostile" for _, note in await _rows(dsns["globex"]))

    trusted = bridge.extract({"baggage": "tenant_id=globex"}, trusted=True)
    with bridge.scope(**trusted):
        assert pools.tenant() == "globex"
    other = bridge.extract({"baggage": "tenant_id=other"}, trusted=True)
    with bridge.scope(**other), pytest.raises(UnknownTenantError):
        async with pools.acquire():
            pass


async def test_a_tenant_in_baggage_other_code_extracted_is_not_routed_on(
    bridge: cb.ContextBridge, pools: TenantPools[Any]
) -> None:
    """A context OTel's own propagator extracted from a carrier and attached (what an
    instrumentation continuing a request or message without this library does) holds a tenant
    in baggage that no trust policy saw: ``bridge.get`` reads it, but TenantPools does not route
    on it and says why. A bridge scope's context whose baggage other code changed afterwards
    still routes."""
    token = context.attach(W3CBaggagePropagator().extract({"baggage": "tenant_id=globex"}))
    try:
        assert bridge.get("tenant_id") == "globex"
        assert pools.current_tenant() is None
        with pytest.raises(cb.MissingContextError, match="did not come through otel_ctxbridge"):
            pools.acquire()
    finally:
        context.detach(token)
    with bridge.scope(tenant_id="acme"):
        token = context.attach(baggage.set_baggage("other", "x"))
        try:
            assert pools.tenant() == "acme"
        finally:
            context.detach(token)
    assert pools.tenants() == []


def test_a_tenant_field_any_client_may_set_is_refused(dsns: dict[str, str]) -> None:
    """Routing on a field with ``inbound="always"`` (or an undeclared one) fails at
    construction with FieldConfigError."""
    open_bridge = cb.ContextBridge([cb.Field("tenant_id", inbound="always")])
    with pytest.raises(cb.FieldConfigError, match="inbound='always'"):
        TenantPools(open_bridge, dsns)
    with pytest.raises(cb.FieldConfigError, match="org_id"):
        TenantPools(open_bridge, dsns, field="org_id")


async def test_pools_are_lazy_bounded_and_closed_on_shutdown(
    bridge: cb.ContextBridge, dsns: dict[str, str]
) -> None:
    """No connection before first use; one pool per tenant even when 30 requests arrive at
    once; never more than ``max_size`` connections; ``close()`` ends every server backend and
    later use raises TenantPoolError."""
    app_name = f"ctxb-{uuid.uuid4().hex[:8]}"
    made: list[str] = []

    async def connect(dsn: str, **options: Any) -> PoolLike[Any]:
        made.append(dsn)
        return await asyncpg.create_pool(dsn, **options)  # type: ignore[no-any-return] # stubs

    registry = TenantPools(
        bridge,
        dsns,
        min_size=0,
        max_size=3,
        connect=connect,
        server_settings={"application_name": app_name},
    )
    assert made == []
    assert await _our_backends(app_name) == 0
    peak = 0

    async def request() -> None:
        nonlocal peak
        with bridge.scope(tenant_id="acme"):
            async with registry.acquire() as conn:
                peak = max(peak, registry.in_use("acme"))
                await conn.execute("SELECT pg_sleep(0.005)")

    await asyncio.gather(*(request() for _ in range(30)))
    assert made == [dsns["acme"]]
    assert peak == 30  # borrowers counted, but ...
    assert 1 <= await _our_backends(app_name) <= 3  # ... connections stay within max_size
    pool: Any = await registry.pool("acme")
    assert pool.get_size() <= 3
    assert pool.get_idle_size() == pool.get_size()

    await registry.close()
    await registry.close()  # idempotent
    assert await _our_backends(app_name) == 0
    with bridge.scope(tenant_id="acme"), pytest.raises(TenantPoolError, match="closed"):
        async with registry.acquire():
            pass


async def test_max_pools_evicts_the_idle_pool_and_refuses_when_all_are_busy(
    bridge: cb.ContextBridge, dsns: dict[str, str]
) -> None:
    """With ``max_pools=1``, a second tenant's first request closes the first tenant's idle
    pool; while the first tenant's connection is lent out, the second gets TenantPoolError."""
    registry = TenantPools(bridge, dsns, max_size=1, max_pools=1)
    try:
        with bridge.scope(tenant_id="acme"):
            async with registry.acquire() as conn:
                await conn.execute("SELECT 1")
                with bridge.scope(tenant_id="globex"), pytest.raises(TenantPoolError, match="use"):
                    async with registry.acquire():
                        pass
        with bridge.scope(tenant_id="globex"):
            async with registry.acquire() as conn:
                assert await conn.fetchval("SELECT 1") == 1
        assert registry.tenants() == ["globex"]
    finally:
        await registry.close()


async def test_waiting_for_a_connection_is_bounded_by_acquire_timeout(
    bridge: cb.ContextBridge, dsns: dict[str, str]
) -> None:
    """A tenant's pool with every connection lent out makes the next borrower wait at most
    ``acquire_timeout``, then raise TenantPoolError naming the tenant and ``max_size``; a
    transaction that holds the only connection and opens ``nested="new"`` gets the same
    error instead of waiting for itself forever. Nothing stays lent out afterwards."""
    from otel_ctxbridge.integrations.db import Transactions

    registry = TenantPools(bridge, dsns, max_size=1, acquire_timeout=0.3)
    tx = Transactions(registry)
    try:
        with bridge.scope(tenant_id="acme"):
            async with registry.acquire() as conn:
                await conn.execute("SELECT 1")
                started = asyncio.get_running_loop().time()
                with pytest.raises(TenantPoolError, match=r"'acme'.*0\.3 s \(max_size=1\)"):
                    async with registry.acquire():
                        pass
                assert asyncio.get_running_loop().time() - started < 5
            async with tx.transaction():
                with pytest.raises(TenantPoolError, match="nested='new'"):
                    async with tx.transaction(nested="new"):
                        pass
            async with registry.acquire() as conn:  # the pool is whole again
                assert await conn.fetchval("SELECT 1") == 1
        assert registry.in_use() == 0
    finally:
        await registry.close()


def test_acquire_timeout_must_be_positive_or_none(
    bridge: cb.ContextBridge, dsns: dict[str, str]
) -> None:
    """A zero or negative ``acquire_timeout`` is refused at construction."""
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="acquire_timeout"):
            TenantPools(bridge, dsns, acquire_timeout=bad)
    TenantPools(bridge, dsns, acquire_timeout=None)


async def test_a_failed_pool_creation_is_retried_by_the_next_request(
    bridge: cb.ContextBridge, dsns: dict[str, str]
) -> None:
    """A pool that cannot be created (its database does not exist) raises the driver's error
    to the request and is forgotten, so the next request tries again."""
    broken = {"acme": SERVER.rsplit("/", 1)[0] + f"/ctxb_missing_{uuid.uuid4().hex[:6]}"}
    registry = TenantPools(bridge, broken, max_size=1)
    try:
        with bridge.scope(tenant_id="acme"):
            for _ in range(2):
                with pytest.raises(asyncpg.InvalidCatalogNameError):
                    async with registry.acquire():
                        pass
                assert registry.tenants() == []
    finally:
        await registry.close()


async def test_query_spans_carry_the_fields(
    bridge: cb.ContextBridge, pools: TenantPools[Any]
) -> None:
    """With opentelemetry-instrumentation-asyncpg and the bridge's ContextSpanProcessor, each
    query's client span carries the request id and tenant of the scope it ran in."""
    from otel_ctxbridge.spans import ContextSpanProcessor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(ContextSpanProcessor(bridge))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AsyncPGInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:

        async def request(i: int) -> None:
            with bridge.scope(request_id=f"r-q{i}", tenant_id=TENANTS[i % 2]):
                async with pools.acquire() as conn:
                    await conn.fetchval(f"SELECT {i}")

        await asyncio.gather(*(request(i) for i in range(6)))
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    ours = re.compile(r"SELECT (\d+)")  # the pool's reset query on release is a span too
    queries = [
        (int(m.group(1)), dict(s.attributes or {}))
        for s in exporter.get_finished_spans()
        if (m := ours.fullmatch(str((s.attributes or {}).get("db.statement", ""))))
    ]
    assert len(queries) == 6
    for i, attrs in queries:
        assert attrs["db.system"] == "postgresql"
        assert attrs["app.request_id"] == f"r-q{i}"
        assert attrs["app.tenant_id"] == TENANTS[i % 2]


def test_the_integration_imports_without_loading_a_driver() -> None:
    """Importing the db and sqlite integrations loads neither asyncpg nor aiosqlite: the
    drivers are optional extras, imported when a pool is first created."""
    code = (
        "import sys, otel_ctxbridge.integrations.db, otel_ctxbridge.integrations.sqlite;"
        "print(sorted(m for m in ('asyncpg', 'aiosqlite') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
