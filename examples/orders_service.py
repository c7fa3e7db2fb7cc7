"""Orders service: the seed article's three use cases with otel_ctxbridge and FastAPI.

1. Request logging: every log line carries the request id, tenant and trace id, without
   passing them (``ContextLogFilter`` + JSON lines from python-json-logger); one access-log
   line per request comes from the ASGI middleware.
2. Tenant databases: ``TenantPools`` picks the tenant's database from the request's
   ``tenant_id``, which only a trusted gateway may set (``x-tenant-id`` or baggage from a
   trusted network or with the gateway secret). A request without a tenant gets 400, an
   unknown tenant 404; an untrusted client cannot pick one.
3. Transactions: ``POST /orders`` creates the order and updates the inventory in one
   transaction that the service functions reach through the context; out of stock rolls the
   order back (409).

Run it (SQLite files per tenant by default, in ``$ORDERS_DATA_DIR`` or a temporary directory)::

    python examples/orders_service.py
    curl -s localhost:8000/products -H 'x-tenant-id: acme'          # localhost is trusted
    curl -s localhost:8000/orders -H 'x-tenant-id: acme' -H 'content-type: application/json' \\
        -d '{"sku": "book", "quantity": 2}'                         # 201, the order
    curl -s localhost:8000/orders -H 'x-tenant-id: acme'            # the tenant's orders

On PostgreSQL, give a DSN template with ``{tenant}`` (a database or a schema per tenant; a
``search_path`` schema is created at startup)::

    ORDERS_DATABASE_URL='postgresql://postgres@127.0.0.1:5432/test?search_path=orders_{tenant}' \\
        python examples/orders_service.py

Other settings: ``ORDERS_TENANTS`` (``acme,globex``), ``ORDERS_TRUSTED_NETWORKS``
(``127.0.0.1/32,::1/128``), ``ORDERS_GATEWAY_SECRET`` (none), ``ORDERS_PORT`` (8000), and the
standard ``OTEL_*`` variables (spans and logs go to ``OTEL_EXPORTER_OTLP_ENDPOINT`` if set).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic import Field as Check
from pythonjsonlogger.json import JsonFormatter

import otel_ctxbridge as cb
from otel_ctxbridge.asgi import instrument_asgi
from otel_ctxbridge.integrations.db import TenantPools, Transactions, UnknownTenantError
from otel_ctxbridge.integrations.sqlite import create_sqlite_pool
from otel_ctxbridge.logs import ContextLogFilter
from otel_ctxbridge.sdk import configure
from otel_ctxbridge.trust import TrustPolicy

bridge = cb.ContextBridge(
    fields=[
        cb.Field(
            "request_id",
            header="x-request-id",
            generate=cb.new_request_id,
            inbound="always",
            validator=cb.REQUEST_ID_PATTERN,
        ),
        cb.Field(
            "tenant_id", header="x-tenant-id", inbound="trusted", validator=r"[a-z0-9-]{1,63}"
        ),
        cb.Field("user_id", propagate=False),
    ],
    attribute_prefix="app.",
)
log = logging.getLogger("orders")
log.addFilter(ContextLogFilter(bridge))  # use case 1: every line of this logger has the fields

SCHEMA = {
    "postgresql": [
        "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, sku TEXT NOT NULL,"
        " quantity INT NOT NULL, request_id TEXT)",
        "CREATE TABLE IF NOT EXISTS inventory (sku TEXT PRIMARY KEY, quantity INT NOT NULL)",
    ],
    "sqlite": [
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, sku TEXT NOT NULL,"
        " quantity INT NOT NULL, request_id TEXT)",
        "CREATE TABLE IF NOT EXISTS inventory (sku TEXT PRIMARY KEY, quantity INT NOT NULL)",
    ],
}
STOCK = {"book": 1000, "pen": 5000, "lamp": 3}


class OutOfStockError(Exception):
    """The inventory cannot cover an order; the order is rolled back with it."""


class OrderIn(BaseModel):
    """The body of ``POST /orders``."""

    sku: str = Check(min_length=1, max_length=64)
    quantity: int = Check(gt=0, le=1000)


class Orders:
    """The service layer of the seed: no request id, tenant or connection parameters."""

    def __init__(self, pools: TenantPools[Any]) -> None:
        self.pools = pools
        self.tx: Transactions[Any] = Transactions(pools)

    async def products(self) -> list[dict[str, Any]]:
        """Use case 2: the current tenant's inventory, from the tenant's own database."""
        async with self.pools.acquire() as conn:
            rows = await conn.fetch("SELECT sku, quantity FROM inventory ORDER BY sku")
        return [{"sku": r["sku"], "quantity": r["quantity"]} for r in rows]

    async def list_orders(self) -> list[dict[str, Any]]:
        """The current tenant's orders."""
        async with self.pools.acquire() as conn:
            rows = await conn.fetch("SELECT id, sku, quantity, request_id FROM orders ORDER BY id")
        return [
            {
                "id": r["id"],
                "sku": r["sku"],
                "quantity": r["quantity"],
                "request_id": r["request_id"],
            }
            for r in rows
        ]

    async def create_order(self, sku: str, quantity: int) -> dict[str, Any]:
        """Use case 3: the order and the inventory change commit together, or neither does."""
        async with self.tx.transaction():
            conn = self.tx.current_connection()
            order_id = await conn.fetchval(
                "INSERT INTO orders(sku, quantity, request_id) VALUES ($1, $2, $3) RETURNING id",
                sku,
                quantity,
                bridge.get("request_id"),
            )
            log.info("order %s created", order_id, extra={"sku": sku})
            remaining = await self.update_inventory(sku, quantity)
        return {"id": order_id, "sku": sku, "quantity": quantity, "remaining": remaining}

    async def update_inventory(self, sku: str, quantity: int) -> int:
        """Runs inside the caller's transaction, found through the context."""
        remaining = await self.tx.current_connection().fetchval(
            "UPDATE inventory SET quantity = quantity - $1"
            " WHERE sku = $2 AND quantity >= $1 RETURNING quantity",
            quantity,
            sku,
        )
        if remaining is None:
            log.warning("not enough %s for %s; rolling back", sku, quantity)
            raise OutOfStockError(sku)
        return int(remaining)


def tenant_pools(
    database_url: str | None, tenants: Sequence[str], data_dir: Path, pool_size: int
) -> Any:
    """PostgreSQL pools from a ``{tenant}`` DSN template, else one SQLite file per tenant."""
    if database_url:
        dsns = {t: database_url.replace("{tenant}", t) for t in tenants}
        return TenantPools(bridge, dsns, min_size=1, max_size=pool_size)
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {t: str(data_dir / f"{t}.db") for t in tenants}
    return TenantPools(bridge, files, max_size=pool_size, connect=create_sqlite_pool)


async def prepare(pools: TenantPools[Any], tenants: Sequence[str], dialect: str) -> None:
    """Create each tenant's tables (and its ``search_path`` schema) and seed the stock."""
    for tenant in tenants:
        with bridge.scope(tenant_id=tenant):
            async with pools.acquire() as conn:
                if dialect == "postgresql":
                    schema = await conn.fetchval("SHOW search_path")
                    if re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
                        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                for statement in SCHEMA[dialect]:
                    await conn.execute(statement)
                for sku, quantity in STOCK.items():
                    await conn.execute(
                        "INSERT INTO inventory VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        sku,
                        quantity,
                    )


def create_app(
    *,
    database_url: str | None = None,
    tenants: Sequence[str] = ("acme", "globex"),
    data_dir: Path | None = None,
    trust: TrustPolicy | None = None,
    pool_size: int = 10,
    **otel_kwargs: Any,
) -> Any:
    """The service as an ASGI app: FastAPI inside ``instrument_asgi`` (``otel_kwargs`` go to
    it). The inner FastAPI app is the result's ``.fastapi``; its ``state.pools`` is the tenant
    registry, at most ``pool_size`` connections per tenant."""
    dialect = "postgresql" if database_url else "sqlite"
    where = data_dir or Path(tempfile.mkdtemp(prefix="orders-"))
    pools = tenant_pools(database_url, tenants, where, pool_size)
    orders = Orders(pools)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await prepare(pools, tenants, dialect)
        log.info("orders service ready (%s, tenants %s)", dialect, ",".join(tenants))
        yield
        await pools.close()  # every tenant pool closed on shutdown

    api = FastAPI(title="orders", lifespan=lifespan)
    api.state.pools = pools
    api.state.orders = orders

    @api.get("/products")
    async def products() -> list[dict[str, Any]]:
        log.info("listing products")
        return await orders.products()

    @api.get("/orders")
    async def list_orders() -> list[dict[str, Any]]:
        return await orders.list_orders()

    @api.post("/orders", status_code=201)
    async def create_order(order: OrderIn) -> dict[str, Any]:
        return await orders.create_order(order.sku, order.quantity)

    @api.exception_handler(cb.MissingContextError)
    async def no_tenant(request: Request, exc: cb.MissingContextError) -> JSONResponse:
        return JSONResponse({"error": "no tenant: send x-tenant-id via the gateway"}, 400)

    @api.exception_handler(UnknownTenantError)
    async def unknown_tenant(request: Request, exc: UnknownTenantError) -> JSONResponse:
        return JSONResponse({"error": "unknown tenant"}, 404)

    @api.exception_handler(OutOfStockError)
    async def out_of_stock(request: Request, exc: OutOfStockError) -> JSONResponse:
        return JSONResponse({"error": f"out of stock: {exc}"}, 409)

    app = instrument_asgi(api, bridge, trust=trust, **otel_kwargs)
    app.fastapi = api  # type: ignore[attr-defined] # handy for tests and introspection
    return app


def _json_logging() -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ContextLogFilter(bridge))
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level"},
        )
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def main() -> None:
    """Run the service with uvicorn, with JSON logs and OTel spans (and asyncpg's)."""
    _json_logging()
    database_url = os.environ.get("ORDERS_DATABASE_URL") or None
    telemetry = _telemetry()
    if database_url:
        from opentelemetry.instrumentation.asyncpg import (  # noqa: PLC0415 - needs asyncpg
            AsyncPGInstrumentor,
        )

        # query spans; the bridge's span processor adds the fields to them
        AsyncPGInstrumentor().instrument()  # type: ignore[no-untyped-call] # unannotated package
    networks = os.environ.get("ORDERS_TRUSTED_NETWORKS", "127.0.0.1/32,::1/128")
    trust = TrustPolicy(
        networks=_items(networks),
        secret=os.environ.get("ORDERS_GATEWAY_SECRET") or None,
    )
    data_dir = os.environ.get("ORDERS_DATA_DIR")
    app = create_app(
        database_url=database_url,
        tenants=_items(os.environ.get("ORDERS_TENANTS", "acme,globex")),
        data_dir=Path(data_dir) if data_dir else None,
        trust=trust,
    )
    try:
        port = int(os.environ.get("ORDERS_PORT", "8000"))
        uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    finally:
        telemetry.shutdown()


def _items(setting: str) -> list[str]:
    """A comma-separated setting as a list: ``"acme, globex"`` is ``["acme", "globex"]``."""
    return [item.strip() for item in setting.split(",") if item.strip()]


def _telemetry() -> Any:
    """Tracer and logger providers with the bridge's processors; OTLP only when configured."""
    endpoint = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return configure(bridge, service_name="orders", otlp=endpoint, bridge_logging=endpoint)


if __name__ == "__main__":
    main()
