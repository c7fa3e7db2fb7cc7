"""The seed's database use cases: tenant-routed connections and transactions held in context.

::

    from otel_ctxbridge.integrations.db import TenantPools, Transactions

    pools = TenantPools(bridge, {"acme": "postgresql://db/acme", "globex": "postgresql://db/gx"})
    tx = Transactions(pools)

    @tx.transaction()
    async def create_order(item: str) -> int:
        conn = tx.current_connection()          # this tenant's connection, in the transaction
        order_id = await conn.fetchval("INSERT INTO orders(item) VALUES ($1) RETURNING id", item)
        await update_inventory(item)            # same transaction, no parameter
        return order_id

    async def update_inventory(item: str) -> None:
        await tx.current_connection().execute(
            "UPDATE inventory SET quantity = quantity - 1 WHERE item = $1", item)

    with bridge.scope(tenant_id="acme"):        # set by the ASGI middleware from a trusted peer
        await create_order("book")
    await pools.close()                         # on shutdown

The tenant pools are in :mod:`.tenants`, the transactions in :mod:`.transactions`; both import
asyncpg only when a pool is created with the default factory. Query spans come from
``opentelemetry-instrumentation-asyncpg``; the bridge's span processor puts the fields on them.
"""

from __future__ import annotations

from otel_ctxbridge.integrations.tenants import (
    PoolLike,
    TenantPoolError,
    TenantPools,
    UnknownTenantError,
)
from otel_ctxbridge.integrations.transactions import (
    NestedMode,
    Transactions,
    TransactionScope,
    TransactionScopeError,
)

__all__ = [
    "NestedMode",
    "PoolLike",
    "TenantPoolError",
    "TenantPools",
    "TransactionScope",
    "TransactionScopeError",
    "Transactions",
    "UnknownTenantError",
]
