"""An asyncpg-shaped connection pool over ``aiosqlite``, the embedded default for demos.

:func:`create_sqlite_pool` is a ``connect`` factory for
:class:`~otel_ctxbridge.integrations.tenants.TenantPools` (one SQLite file per tenant), and its
connections work with :class:`~otel_ctxbridge.integrations.transactions.Transactions`:

- ``execute``, ``executemany``, ``fetch``, ``fetchrow``, ``fetchval`` take asyncpg's ``$1``
  placeholders (rewritten to SQLite's ``?`` outside quoted literals, the arguments in the order
  they are used); rows are ``sqlite3.Row``.
- ``transaction()`` begins ``BEGIN IMMEDIATE`` (writers queue on SQLite's lock, up to
  ``busy_timeout`` seconds, instead of failing halfway) and, nested, a ``SAVEPOINT``.
- A connection comes back to the pool rolled back if it was left inside a transaction.

SQLite serialises writers: this suits a demo and tests, not a busy multi-writer service.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from otel_ctxbridge.errors import requires_extra
from otel_ctxbridge.integrations.tenants import TenantPoolError

if TYPE_CHECKING:
    import aiosqlite

__all__ = ["SQLiteConnection", "SQLitePool", "SQLiteTransaction", "create_sqlite_pool"]

_PLACEHOLDER = re.compile(
    r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/|\$(\d+)", re.DOTALL
)
"""A quoted literal or identifier, or a comment (left as they are), or a ``$N`` placeholder."""
_savepoints = itertools.count(1)


def _placeholders(query: str) -> tuple[str, tuple[int, ...]]:
    """``query`` with asyncpg's ``$N`` placeholders as SQLite's nameless ``?`` (outside quoted
    literals, identifiers and comments), and the ``N`` of each in order of use. (SQLite's own
    ``?N`` would do, but CPython 3.12.0-3.12.3 warn that it is a named placeholder:
    python/cpython#117995.)"""
    used: list[int] = []

    def positional(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group(0)  # a literal, an identifier or a comment: as it is
        used.append(int(match.group(1)))
        return "?"

    return _PLACEHOLDER.sub(positional, query), tuple(used)


def _bind(used: tuple[int, ...], args: Sequence[Any]) -> tuple[Any, ...]:
    """``args`` in the order the placeholders use them. Like asyncpg, a query takes as many
    arguments as its highest ``$N``: more or fewer raise ``sqlite3.ProgrammingError``."""
    takes = max(used, default=0)
    if len(args) != takes or 0 in used:
        raise sqlite3.ProgrammingError(
            f"the query takes {takes} argument(s) ($1..${takes}), {len(args)} were given"
        )
    return tuple(args[n - 1] for n in used)


def _sql(query: str, args: Sequence[Any]) -> tuple[str, tuple[Any, ...]]:
    """The SQLite statement and its arguments for an asyncpg-style ``query`` and ``args``."""
    sql, used = _placeholders(query)
    return sql, _bind(used, args)


class SQLiteTransaction:
    """``BEGIN IMMEDIATE`` / ``COMMIT`` / ``ROLLBACK``, or a savepoint when nested."""

    __slots__ = ("_conn", "_savepoint")

    def __init__(self, conn: SQLiteConnection) -> None:
        self._conn = conn
        self._savepoint: str | None = None

    async def start(self) -> None:
        """Begin the transaction (a savepoint inside an open one)."""
        if self._conn.depth == 0:
            await self._conn.raw.execute("BEGIN IMMEDIATE")
        else:
            self._savepoint = f"ctxbridge_sp{next(_savepoints)}"
            await self._conn.raw.execute(f"SAVEPOINT {self._savepoint}")
        self._conn.depth += 1

    async def commit(self) -> None:
        """Commit (release the savepoint when nested)."""
        self._conn.depth -= 1
        if self._savepoint is None:
            await self._conn.raw.execute("COMMIT")
        else:
            await self._conn.raw.execute(f"RELEASE SAVEPOINT {self._savepoint}")

    async def rollback(self) -> None:
        """Roll back (to the savepoint when nested)."""
        self._conn.depth -= 1
        if self._savepoint is None:
            await self._conn.raw.execute("ROLLBACK")
        else:
            await self._conn.raw.execute(f"ROLLBACK TO SAVEPOINT {self._savepoint}")
            await self._conn.raw.execute(f"RELEASE SAVEPOINT {self._savepoint}")


class SQLiteConnection:
    """One ``aiosqlite`` connection (autocommit mode) with asyncpg's query method names."""

    __slots__ = ("depth", "raw")

    def __init__(self, raw: aiosqlite.Connection) -> None:
        self.raw = raw
        """The underlying ``aiosqlite.Connection``."""
        self.depth = 0
        """How many transaction levels are open (0: none)."""

    def transaction(self) -> SQLiteTransaction:
        """A transaction (or, inside one, a savepoint) to ``start()``."""
        return SQLiteTransaction(self)

    def is_in_transaction(self) -> bool:
        """True while a transaction is open on this connection."""
        return bool(self.raw.in_transaction)

    async def execute(self, query: str, *args: Any) -> str:
        """Run one statement; returns ``"OK <rows changed>"``."""
        cursor = await self.raw.execute(*_sql(query, args))
        await cursor.close()
        return f"OK {cursor.rowcount}"

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per argument tuple."""
        sql, used = _placeholders(query)
        await self.raw.executemany(sql, (_bind(used, row) for row in args))

    async def fetch(self, query: str, *args: Any) -> list[sqlite3.Row]:
        """All result rows."""
        async with self.raw.execute(*_sql(query, args)) as cursor:
            return list(await cursor.fetchall())

    async def fetchrow(self, query: str, *args: Any) -> sqlite3.Row | None:
        """The first row, or None."""
        async with self.raw.execute(*_sql(query, args)) as cursor:
            return await cursor.fetchone()

    async def fetchval(self, query: str, *args: Any, column: int = 0) -> Any:
        """One value of the first row, or None."""
        row = await self.fetchrow(query, *args)
        return None if row is None else row[column]


class SQLitePool:
    """A bounded pool of :class:`SQLiteConnection` to one database file."""

    def __init__(
        self, path: str, *, min_size: int = 1, max_size: int = 5, busy_timeout: float = 10.0
    ) -> None:
        if path == ":memory:" or path.startswith("file::memory:"):
            raise ValueError("SQLitePool needs a file: each connection of :memory: is separate")
        self.path = path
        self._min_size = min_size
        self._max_size = max_size
        self._busy_ms = int(busy_timeout * 1000)
        self._idle: list[SQLiteConnection] = []
        self._size = 0
        self._slots = asyncio.Semaphore(max_size)
        self._closed = False

    async def _open(self) -> SQLiteConnection:
        with requires_extra("sqlite", "the SQLite pool"):
            import aiosqlite  # noqa: PLC0415 - optional dependency, needed only here

        raw = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            raw.row_factory = sqlite3.Row
            await raw.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            await raw.execute("PRAGMA journal_mode = WAL")
            await raw.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            await raw.close()
            raise
        self._size += 1
        return SQLiteConnection(raw)

    async def start(self) -> SQLitePool:
        """Open ``min_size`` connections."""
        while self._size < self._min_size:
            self._idle.append(await self._open())
        return self

    def acquire(self) -> AbstractAsyncContextManager[SQLiteConnection]:
        """``async with pool.acquire() as conn``: waits while ``max_size`` are lent out."""
        return self._lease()

    @asynccontextmanager
    async def _lease(self) -> AsyncIterator[SQLiteConnection]:
        if self._closed:
            raise TenantPoolError("SQLitePool is closed")
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._open()
            try:
                yield conn
            finally:
                await self._release(conn)

    async def _release(self, conn: SQLiteConnection) -> None:
        try:
            if conn.raw.in_transaction:  # left open: roll back, like asyncpg's reset
                await conn.raw.execute("ROLLBACK")
            conn.depth = 0
        except BaseException:
            self._size -= 1
            await conn.raw.close()
            raise
        if self._closed:
            self._size -= 1
            await conn.raw.close()
        else:
            self._idle.append(conn)

    def get_size(self) -> int:
        """Connections open now (lent out and idle)."""
        return self._size

    def get_idle_size(self) -> int:
        """Connections open and waiting in the pool."""
        return len(self._idle)

    async def close(self) -> None:
        """Close the idle connections now and lent ones when they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._size -= 1
            await conn.raw.close()


async def create_sqlite_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 5, busy_timeout: float = 10.0
) -> SQLitePool:
    """A ``connect`` factory for ``TenantPools``: ``dsn`` is a file path or ``sqlite:///path``."""
    path = dsn.removeprefix("sqlite:///") if dsn.startswith("sqlite:///") else dsn
    pool = SQLitePool(path, min_size=min_size, max_size=max_size, busy_timeout=busy_timeout)
    return await pool.start()
