"""Transactions held in context, on the real PostgreSQL at 127.0.0.1:5432.

The seed's use case 3: ``create_order`` and ``update_inventory`` reach the same transaction
through ``tx.current_connection()``, without a client parameter. Each tenant has its own schema
with ``orders`` and ``inventory`` tables (the DSN sets ``search_path``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

import otel_ctxbridge as cb
from otel_ctxbridge.integrations.db import TenantPools, Transactions, TransactionScopeError
from tests._postgres import SERVER, admin, admin_now, require_postgres

TENANTS = ("acme", "globex")
APP = f"ctxb-tx-{uuid.uuid4().hex[:8]}"  # application_name of this module's pooled sessions


class Boom(Exception):
    """The failure a request raises on purpose."""


@pytest.fixture(scope="module")
def schemas() -> Iterator[dict[str, str]]:
    """A fresh schema per tenant; dropped after the module."""
    prefix = f"ctxb_{uuid.uuid4().hex[:10]}"
    require_postgres()
    for tenant in TENANTS:
        admin_now(f"CREATE SCHEMA {prefix}_{tenant}")
    try:
        yield {t: f"{prefix}_{t}" for t in TENANTS}
    finally:
        for tenant in TENANTS:
            admin_now(f"DROP SCHEMA IF EXISTS {prefix}_{tenant} CASCADE")


@pytest.fixture
async def pools(
    bridge: cb.ContextBridge, schemas: dict[str, str]
) -> AsyncIterator[TenantPools[Any]]:
    """Both tenants' pools (at most 5 connections each) over freshly created tables."""
    for schema in schemas.values():
        await admin(
            f"DROP TABLE IF EXISTS {schema}.orders, {schema}.inventory;"
            f"CREATE TABLE {schema}.orders (id bigserial PRIMARY KEY, sku text NOT NULL,"
            f" quantity int NOT NULL, request_id text);"
            f"CREATE TABLE {schema}.inventory (sku text PRIMARY KEY, quantity int NOT NULL);"
            f"INSERT INTO {schema}.inventory VALUES ('book', 1000000), ('pen', 1000000);"
        )
    dsns = {t: f"{SERVER}?search_path={schema}" for t, schema in schemas.items()}
    registry = TenantPools(
        bridge, dsns, min_size=1, max_size=5, server_settings={"application_name": APP}
    )
    yield registry
    await registry.close()


@pytest.fixture
def tx(pools: TenantPools[Any]) -> Transactions[Any]:
    """Transactions over the tenant pools."""
    return Transactions(pools)


async def _count(schema: str, table: str) -> int:
    rows = await admin(f"SELECT count(*) AS n FROM {schema}.{table}")
    return int(rows[0]["n"])


async def _stock(schema: str, sku: str) -> int:
    rows = await admin(f"SELECT quantity FROM {schema}.inventory WHERE sku = $1", sku)
    return int(rows[0]["quantity"])


def _service(tx: Transactions[Any], bridge: cb.ContextBridge) -> Any:
    """The seed's service layer: no connection parameter anywhere."""

    async def update_inventory(sku: str, quantity: int) -> None:
        await tx.current_connection().execute(
            "UPDATE inventory SET quantity = quantity - $1 WHERE sku = $2", quantity, sku
        )

    async def create_order(sku: str, quantity: int, fail: bool = False) -> int:
        conn = tx.current_connection()
        order_id = await conn.fetchval(
            "INSERT INTO orders(sku, quantity, request_id) VALUES ($1, $2, $3) RETURNING id",
            sku,
            quantity,
            bridge.get("request_id"),
        )
        await update_inventory(sku, quantity)
        if fail:
            raise Boom("after two writes")
        return int(order_id)

    return tx.transaction()(create_order)


async def test_a_request_raising_after_two_writes_leaves_no_rows_and_a_good_one_commits_both(
    bridge: cb.ContextBridge, tx: Transactions[Any], schemas: dict[str, str]
) -> None:
    """create_order writes the order, update_inventory (reaching the same transaction through
    the context) updates the stock; raising afterwards rolls both back, success commits both."""
    create_order = _service(tx, bridge)
    acme = schemas["acme"]
    with bridge.scope(request_id="r-fail", tenant_id="acme"), pytest.raises(Boom):
        await create_order("book", 3, fail=True)
    assert await _count(acme, "orders") == 0
    assert await _stock(acme, "book") == 1000000

    with bridge.scope(request_id="r-ok", tenant_id="acme"):
        order_id = await create_order("book", 3)
    rows = await admin(f"SELECT id, request_id FROM {acme}.orders")
    assert [(r["id"], r["request_id"]) for r in rows] == [(order_id, "r-ok")]
    assert await _stock(acme, "book") == 1000000 - 3
    assert await _count(schemas["globex"], "orders") == 0


async def test_connections_return_to_the_pool_after_500_requests_including_failing_ones(
    bridge: cb.ContextBridge,
    pools: TenantPools[Any],
    tx: Transactions[Any],
    schemas: dict[str, str],
) -> None:
    """500 concurrent requests over two tenants, a third of them failing after their writes
    and some cancelled mid-transaction: every connection is back in its pool, no server
    session is left in a transaction, and exactly the successful orders are stored."""
    create_order = _service(tx, bridge)
    gate = asyncio.Event()

    @tx.transaction()
    async def stuck(sku: str) -> None:
        await tx.current_connection().execute(
            "INSERT INTO orders(sku, quantity) VALUES ($1, 1)", sku
        )
        await gate.wait()  # cancelled here, inside the transaction

    async def request(i: int) -> str:
        with bridge.scope(request_id=f"r-{i}", tenant_id=TENANTS[i % 2]):
            try:
                await create_order("pen", 1, fail=i % 3 == 0)
            except Boom:
                return "failed"
            return "ok"

    outcomes = await asyncio.gather(*(request(i) for i in range(500)))
    with bridge.scope(tenant_id="acme"):
        stuck_tasks = [asyncio.create_task(stuck("pen")) for _ in range(3)]
    await asyncio.sleep(0.2)
    for task in stuck_tasks:
        task.cancel()
    await asyncio.gather(*stuck_tasks, return_exceptions=True)

    assert pools.in_use() == 0
    for tenant in TENANTS:
        pool: Any = await pools.pool(tenant)
        assert pool.get_idle_size() == pool.get_size() <= 5
    states = await admin("SELECT state FROM pg_stat_activity WHERE application_name = $1", APP)
    assert states
    assert {r["state"] for r in states} == {"idle"}  # none left "idle in transaction"
    for t, tenant in enumerate(TENANTS):
        ok = sum(1 for i, o in enumerate(outcomes) if o == "ok" and i % 2 == t)
        assert await _count(schemas[tenant], "orders") == ok
        assert await _stock(schemas[tenant], "pen") == 1000000 - ok


async def test_concurrent_requests_never_share_a_transaction(
    bridge: cb.ContextBridge, tx: Transactions[Any]
) -> None:
    """Five requests held open at once (a barrier inside their transactions) each have their
    own connection, server backend and transaction id; 100 more all see distinct ids."""
    opened: list[object] = []
    all_open = asyncio.Event()  # (asyncio.Barrier is Python 3.11+)

    @tx.transaction()
    async def held_open() -> tuple[int, int, int]:
        conn = tx.current_connection()
        opened.append(conn)
        if len(opened) == 5:
            all_open.set()
        await asyncio.wait_for(all_open.wait(), 30)  # all five transactions are open now
        txid = await conn.fetchval("SELECT txid_current()")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert tx.current_connection() is conn
        return id(conn), int(pid), int(txid)

    with bridge.scope(tenant_id="acme"):
        results = await asyncio.gather(*(held_open() for _ in range(5)))
    for position in range(3):
        assert len({r[position] for r in results}) == 5

    @tx.transaction()
    async def txid() -> int:
        await asyncio.sleep(0)
        return int(await tx.current_connection().fetchval("SELECT txid_current()"))

    async def request(i: int) -> int:
        with bridge.scope(tenant_id=TENANTS[i % 2]):
            return await txid()

    ids = await asyncio.gather(*(request(i) for i in range(100)))
    assert len(set(ids)) == 100


async def test_a_thread_is_told_it_cannot_use_the_transaction(
    bridge: cb.ContextBridge, tx: Transactions[Any]
) -> None:
    """From a worker thread (``asyncio.to_thread`` copies the context), using the request's
    transaction raises TransactionScopeError saying a thread cannot use it, not the advice for
    tasks (``tx.shared``, which wraps coroutine functions)."""
    with bridge.scope(tenant_id="acme"):
        async with tx.transaction():
            with pytest.raises(TransactionScopeError, match="a thread cannot use it") as raised:
                await asyncio.to_thread(tx.current_connection)
    assert "tx.shared" not in str(raised.value)


async def test_nested_transaction_is_a_savepoint_by_default_or_joins_or_is_new(
    bridge: cb.ContextBridge, tx: Transactions[Any], schemas: dict[str, str]
) -> None:
    """Nested (default): an error inside rolls back to the savepoint only. ``nested="join"``:
    the inner block is the outer transaction. ``nested="new"``: another connection, committed
    on its own even when the outer transaction rolls back."""
    acme = schemas["acme"]

    async def insert(sku: str) -> None:
        await tx.current_connection().execute(
            "INSERT INTO orders(sku, quantity) VALUES ($1, 1)", sku
        )

    with bridge.scope(tenant_id="acme"):
        async with tx.transaction() as outer:
            await insert("kept")
            with pytest.raises(Boom):
                async with tx.transaction() as inner:
                    assert inner is outer
                    await insert("savepoint-rolled-back")
                    raise Boom
            await insert("kept-too")
        with pytest.raises(Boom):
            async with tx.transaction():
                await insert("joined-rolled-back")
                async with tx.transaction(nested="join") as joined:
                    assert joined is tx.current_connection()
                    await insert("joined-rolled-back")
                raise Boom
        with pytest.raises(Boom):
            async with tx.transaction() as outer:
                async with tx.transaction(nested="new") as independent:
                    assert independent is not outer
                    assert tx.current_connection() is independent
                    await insert("independent")
                assert tx.current_connection() is outer
                await insert("outer-rolled-back")
                raise Boom
    rows = await admin(f"SELECT sku FROM {acme}.orders ORDER BY id")
    assert [r["sku"] for r in rows] == ["kept", "kept-too", "independent"]


async def test_outside_a_transaction_current_connection_raises_missing_context_error(
    bridge: cb.ContextBridge, tx: Transactions[Any]
) -> None:
    """Service code called without a transaction gets a clear MissingContextError; the block
    leaves no context behind."""
    with pytest.raises(cb.MissingContextError, match="no transaction"):
        tx.current_connection()
    assert not tx.in_transaction()
    with bridge.scope(tenant_id="acme"):
        async with tx.transaction():
            assert tx.in_transaction()
    assert not tx.in_transaction()
    with pytest.raises(TypeError):
        tx.transaction()(lambda: None)  # type: ignore[arg-type,return-value] # a sync function


async def test_a_task_spawned_inside_does_not_see_the_transaction_unless_shared(
    bridge: cb.ContextBridge, tx: Transactions[Any], schemas: dict[str, str]
) -> None:
    """A task created inside a transaction inherits the context but may not use the
    connection (asyncpg forbids concurrent use): current_connection() and transaction() raise
    TransactionScopeError there, and a task started after the block ended is refused too."""

    async def child() -> None:
        assert not tx.in_transaction()
        with pytest.raises(TransactionScopeError, match=r"tx\.shared"):
            tx.current_connection()
        with pytest.raises(TransactionScopeError):
            async with tx.transaction():
                pass
        async with tx.transaction(nested="new") as own:  # its own transaction is fine
            await own.execute("INSERT INTO orders(sku, quantity) VALUES ('child-own', 1)")

    with bridge.scope(tenant_id="acme"):
        async with tx.transaction():
            await asyncio.create_task(child())

    async def after_end(ready: asyncio.Event) -> None:
        await ready.wait()
        with pytest.raises(TransactionScopeError, match="ended"):
            tx.current_connection()

    ready = asyncio.Event()
    with bridge.scope(tenant_id="acme"):
        async with tx.transaction():
            task = asyncio.create_task(after_end(ready))
    ready.set()
    await task
    rows = await admin(f"SELECT sku FROM {schemas['acme']}.orders")
    assert [r["sku"] for r in rows] == ["child-own"]


async def test_shared_tasks_use_the_same_transaction_one_at_a_time(
    bridge: cb.ContextBridge, tx: Transactions[Any], schemas: dict[str, str]
) -> None:
    """Functions wrapped with tx.shared() run in gathered tasks inside the same transaction
    (same txid), take turns on the connection, and roll back with it."""

    async def write(sku: str) -> int:
        conn = tx.current_connection()
        await conn.execute("INSERT INTO orders(sku, quantity) VALUES ($1, 1)", sku)
        await asyncio.sleep(0.001)  # a turn is the whole call: nobody else enters here
        async with tx.transaction():  # a savepoint inside the shared call
            await conn.execute("UPDATE inventory SET quantity = quantity - 1 WHERE sku = 'pen'")
        return int(await conn.fetchval("SELECT txid_current()"))

    with bridge.scope(tenant_id="acme"):
        async with tx.transaction() as conn:
            mine = int(await conn.fetchval("SELECT txid_current()"))
            shared = tx.shared(write)
            seen = await asyncio.gather(*(shared(f"s{i}") for i in range(4)))
        assert set(seen) == {mine}
        with pytest.raises(Boom):
            async with tx.transaction():
                await asyncio.gather(*(tx.shared(write)(f"gone{i}") for i in range(3)))
                raise Boom
    rows = await admin(f"SELECT sku FROM {schemas['acme']}.orders ORDER BY sku")
    assert [r["sku"] for r in rows] == ["s0", "s1", "s2", "s3"]
    assert await _stock(schemas["acme"], "pen") == 1000000 - 4


async def test_the_commit_waits_for_a_running_shared_call_and_later_ones_are_refused(
    bridge: cb.ContextBridge, tx: Transactions[Any], schemas: dict[str, str]
) -> None:
    """A shared call still running when the block ends finishes inside the transaction before
    the commit; one that starts after the end raises TransactionScopeError."""
    started = asyncio.Event()

    async def slow_write() -> None:
        started.set()
        await asyncio.sleep(0.05)
        await tx.current_connection().execute(
            "INSERT INTO orders(sku, quantity) VALUES ('slow', 1)"
        )

    with bridge.scope(tenant_id="acme"):
        async with tx.transaction():
            running = asyncio.create_task(tx.shared(slow_write)())
            await started.wait()
            late = tx.shared(slow_write)
    await running
    with pytest.raises(TransactionScopeError, match="ended"):
        await late()
    rows = await admin(f"SELECT sku FROM {schemas['acme']}.orders")
    assert [r["sku"] for r in rows] == ["slow"]


async def test_a_transaction_is_never_used_for_another_tenant(
    bridge: cb.ContextBridge, tx: Transactions[Any], schemas: dict[str, str]
) -> None:
    """Inside acme's transaction, a scope switching to globex cannot reach acme's connection;
    ``nested="new"`` opens a transaction on globex's own pool."""
    with bridge.scope(tenant_id="acme"):
        async with tx.transaction():
            with bridge.scope(tenant_id="globex"):
                with pytest.raises(TransactionScopeError, match="tenant"):
                    tx.current_connection()
                with pytest.raises(TransactionScopeError, match="tenant"):
                    async with tx.transaction():
                        pass
                async with tx.transaction(nested="new") as conn:
                    await conn.execute("INSERT INTO orders(sku, quantity) VALUES ('g', 1)")
            await tx.current_connection().execute(
                "INSERT INTO orders(sku, quantity) VALUES ('a', 1)"
            )
    assert [r["sku"] for r in await admin(f"SELECT sku FROM {schemas['globex']}.orders")] == ["g"]
    assert [r["sku"] for r in await admin(f"SELECT sku FROM {schemas['acme']}.orders")] == ["a"]


async def test_transactions_over_a_plain_asyncpg_pool(
    bridge: cb.ContextBridge, schemas: dict[str, str]
) -> None:
    """Without tenants, Transactions works over an asyncpg.Pool directly; options such as
    ``isolation`` reach asyncpg."""
    pool = await asyncpg.create_pool(
        f"{SERVER}?search_path={schemas['acme']}", min_size=1, max_size=2
    )
    try:
        plain: Transactions[Any] = Transactions(pool)
        async with plain.transaction(isolation="serializable") as conn:
            level = await conn.fetchval("SHOW transaction_isolation")
            assert plain.current_connection() is conn
        assert level == "serializable"
        assert pool.get_idle_size() == pool.get_size()
    finally:
        await pool.close()


async def test_one_transaction_block_object_is_entered_once_at_a_time(
    bridge: cb.ContextBridge, tx: Transactions[Any]
) -> None:
    """Entering the same ``tx.transaction()`` object while it is entered raises RuntimeError
    (use the decorator or call ``transaction()`` per block); after the block it may be reused."""
    block = tx.transaction()
    with bridge.scope(tenant_id="acme"):
        async with block:
            with pytest.raises(RuntimeError, match="already entered"):
                async with block:
                    pass
            assert tx.in_transaction()
        async with block as conn:
            assert await conn.fetchval("SELECT 1") == 1
