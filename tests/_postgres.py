"""The test PostgreSQL server (127.0.0.1:5432, user postgres, database test) for the db tests."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tests._services import unavailable

SERVER = "postgresql://postgres@127.0.0.1:5432/test"


async def admin(sql: str, *args: Any) -> Any:
    """Run ``sql`` on a connection of its own: a query's rows, or a script's status."""
    conn = await asyncpg.connect(SERVER, timeout=5)
    try:
        if args or sql.lstrip().upper().startswith("SELECT"):
            return await conn.fetch(sql, *args)
        return await conn.execute(sql)
    finally:
        await conn.close()


def admin_now(sql: str) -> Any:
    """:func:`admin` from synchronous setup and teardown (outside the tests' event loops)."""
    return asyncio.run(admin(sql))


def require_postgres() -> None:
    """Fail (under CI) or skip when the server does not answer."""
    try:
        admin_now("SELECT 1")
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        unavailable(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc!r}")
