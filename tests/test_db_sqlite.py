"""The aiosqlite pool (the demo's default) behind the same tenant pools and transactions."""

from __future__ import annotations

import asyncio
import sqlite3
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import otel_ctxbridge as cb
from otel_ctxbridge.integrations.db import TenantPoolError, TenantPools, Transactions
from otel_ctxbridge.integrations.sqlite import SQLitePool, _sql, create_sqlite_pool

TENANTS = ("acme", "globex")


class Boom(Exception):
    """The failure a request raises on purpose."""


@pytest.fixture
async def pools(bridge: cb.ContextBridge, tmp_path: Path) -> AsyncIterator[TenantPools[Any]]:
    """One SQLite file per tenant, each with ``orders`` and ``inventory``."""
    registry = TenantPools(
        bridge,
        {t: f"sqlite:///{tmp_path / t}.db" for t in TENANTS},
        max_size=3,
        connect=create_sqlite_pool,
    )
    for tenant in TENANTS:
        with bridge.scope(tenant_id=tenant):
            async with registry.acquire() as conn:
                await conn.execute(
                    "CREATE TABLE orders (id INTEGER PRIMARY KEY, sku TEXT, note TEXT)"
                )
                await conn.execute("CREATE TABLE inventory (sku TEXT PRIMARY KEY, quantity INT)")
                await conn.execute("INSERT INTO inventory VALUES ('book', 100)")
    yield registry
    await registry.close()


async def _skus(pools: TenantPools[Any], bridge: cb.ContextBridge, tenant: str) -> list[str]:
    with bridge.scope(tenant_id=tenant):
        async with pools.acquire() as conn:
            return [r["sku"] for r in await conn.fetch("SELECT sku FROM orders ORDER BY id")]


async def test_asyncpg_placeholders_work_and_quoted_dollars_are_left_alone(
    bridge: cb.ContextBridge, pools: TenantPools[Any]
) -> None:
    """``$1``/``$2`` bind by position (reused numbers too); ``'$1'`` inside a literal stays
    text; no DeprecationWarning from sqlite3 about placeholders."""
    with bridge.scope(tenant_id="acme"), warnings.catch_warnings():
        warnings.simplefilter("error")
        async with pools.acquire() as conn:
            status = await conn.execute(
                "INSERT INTO orders(sku, note) VALUES ($2, '$1 costs ' || $1)", "5", "pen"
            )
            assert status == "OK 1"
            row = await conn.fetchrow("SELECT sku, note FROM orders WHERE sku = $1", "pen")
            assert tuple(row) == ("pen", "$1 costs 5")
            assert await conn.fetchval("SELECT count(*) FROM orders WHERE sku = $1", "x") == 0
            assert await conn.fetchrow("SELECT * FROM orders WHERE sku = $1", "x") is None


async def test_executemany_binds_each_row_and_prepares_even_without_rows(
    bridge: cb.ContextBridge, pools: TenantPools[Any]
) -> None:
    """``executemany`` binds every row of a generator in placeholder order; with no rows it
    still prepares the statement (bad SQL raises, as asyncpg does), and a row with the wrong
    number of arguments is refused."""
    with bridge.scope(tenant_id="acme"):
        async with pools.acquire() as conn:
            rows = ((f"note {i}", f"sku-{i}") for i in range(3))
            await conn.executemany("INSERT INTO orders(sku, note) VALUES ($2, $1)", rows)
            found = await conn.fetch("SELECT sku, note FROM orders ORDER BY sku")
            assert [tuple(r) for r in found] == [(f"sku-{i}", f"note {i}") for i in range(3)]
            with pytest.raises(sqlite3.OperationalError):
                await conn.executemany("INSERT INTO no_such_table VALUES ($1)", [])
            with pytest.raises(sqlite3.ProgrammingError):
                await conn.executemany("INSERT INTO orders(sku) VALUES ($1)", [("a", "b")])


def test_placeholders_become_nameless_with_the_arguments_in_order_of_use() -> None:
    """``$N`` becomes a nameless ``?`` (SQLite's ``?N`` warns on CPython 3.12.0-3.12.3), the
    arguments follow the order of use (a reused number repeats its argument), a ``$1`` inside
    a quoted literal, identifier or comment is left alone, and a count that does not match the
    highest ``$N`` is refused as asyncpg refuses it."""
    sql, bound = _sql("""INSERT INTO "t$1"(a, b) VALUES ($2, '$1 is ' || $1 || $2)""", ("x", "y"))
    assert sql == """INSERT INTO "t$1"(a, b) VALUES (?, '$1 is ' || ? || ?)"""
    assert bound == ("y", "x", "y")
    assert _sql("SELECT 1", ()) == ("SELECT 1", ())
    commented = "SELECT $1 -- not $2\n/* nor $3,\n $4 */"
    assert _sql(commented, ("a",)) == ("SELECT ? -- not $2\n/* nor $3,\n $4 */", ("a",))
    for query, args in (("SELECT $2", ("a",)), ("SELECT $1", ("a", "b")), ("SELECT $0", ())):
        with pytest.raises(sqlite3.ProgrammingError, match="argument"):
            _sql(query, args)


async def test_transactions_commit_roll_back_and_nest_as_savepoints(
    bridge: cb.ContextBridge, pools: TenantPools[Any]
) -> None:
    """The seed's order + inventory writes commit together or not at all; a nested block is a
    savepoint; each tenant's rows land in its own file."""
    tx = Transactions(pools)

    @tx.transaction()
    async def create_order(sku: str, fail: bool = False) -> None:
        conn = tx.current_connection()
        await conn.execute("INSERT INTO orders(sku) VALUES ($1)", sku)
        await conn.execute("UPDATE inventory SET quantity = quantity - 1 WHERE sku = 'book'")
        with pytest.raises(Boom):
            async with tx.transaction():
                await conn.execute("INSERT INTO orders(sku) VALUES ('savepoint')")
                raise Boom
        if fail:
            raise Boom

    with bridge.scope(tenant_id="acme"):
        await create_order("book")
        with pytest.raises(Boom):
            await create_order("lost", fail=True)
        async with pools.acquire() as conn:
            assert await conn.fetchval("SELECT quantity FROM inventory") == 99
    with bridge.scope(tenant_id="globex"):
        await create_order("g-book")
    assert await _skus(pools, bridge, "acme") == ["book"]
    assert await _skus(pools, bridge, "globex") == ["g-book"]


async def test_concurrent_writers_queue_and_connections_come_back(
    bridge: cb.ContextBridge, pools: TenantPools[Any]
) -> None:
    """40 concurrent transactions on one file (writers serialise on SQLite's lock) all commit;
    the pool never opens more than max_size connections and all are idle afterwards."""
    tx = Transactions(pools)

    @tx.transaction()
    async def order(i: int) -> None:
        await tx.current_connection().execute("INSERT INTO orders(sku) VALUES ($1)", f"o{i}")
        await asyncio.sleep(0)

    with bridge.scope(tenant_id="acme"):
        await asyncio.gather(*(order(i) for i in range(40)))
        pool: Any = await pools.pool()
    assert len(await _skus(pools, bridge, "acme")) == 40
    assert pool.get_size() <= 3
    assert pool.get_idle_size() == pool.get_size()


async def test_a_connection_left_in_a_transaction_is_rolled_back_on_release(
    tmp_path: Path,
) -> None:
    """Like asyncpg's reset: a connection returned inside a transaction is rolled back; a
    closed pool refuses new borrowers; :memory: is refused (each connection would differ)."""
    pool = await create_sqlite_pool(str(tmp_path / "x.db"), max_size=1)
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE t (v TEXT)")
        await conn.transaction().start()
        await conn.execute("INSERT INTO t VALUES ('dangling')")
        assert conn.is_in_transaction()
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetch("SELECT v FROM t") == []
    await pool.close()
    assert pool.get_size() == 0
    with pytest.raises(TenantPoolError, match="closed"):
        async with pool.acquire():
            pass
    with pytest.raises(ValueError, match="memory"):
        SQLitePool(":memory:")
