"""Tenant-routed connection pools: the pool is chosen from the ``tenant_id`` in the context.

Each tenant gets its own pool (asyncpg by default), created on first use, closed by
:meth:`TenantPools.close`. The tenant is read from the bridge's scope, which a server fills only
from trusted sources (the ASGI middleware's trust policy or server-side code): a field routed on
here must not be settable by untrusted clients (``inbound="always"`` is refused).

asyncpg is imported only when a pool is created without a custom ``connect`` factory, so this
module and the core package never require it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, overload

from otel_ctxbridge import _runtime as rt
from otel_ctxbridge._state import state_in
from otel_ctxbridge.errors import (
    ContextBridgeError,
    FieldConfigError,
    MissingContextError,
    requires_extra,
)

if TYPE_CHECKING:
    from asyncpg import Record
    from asyncpg.pool import PoolConnectionProxy

    from otel_ctxbridge.bridge import ContextBridge

__all__ = ["PoolLike", "TenantPoolError", "TenantPools", "UnknownTenantError"]

C = TypeVar("C")
C_co = TypeVar("C_co", covariant=True)


class UnknownTenantError(ContextBridgeError, LookupError):
    """The tenant in the context has no database in the registry (never another's pool)."""


class TenantPoolError(ContextBridgeError, RuntimeError):
    """The registry is closed, or every tenant pool it may keep is busy."""


class PoolLike(Protocol[C_co]):
    """What a ``connect`` factory returns: ``asyncpg.Pool`` or any pool of that shape."""

    def acquire(self) -> AbstractAsyncContextManager[C_co]:
        """An async context manager lending one connection."""

    async def close(self) -> None:
        """Close every connection (waiting for borrowed ones to come back)."""


class _Entry:
    """One tenant's pool: being created (``ready``), and how many borrowers hold it now."""

    __slots__ = ("leases", "ready")

    def __init__(self, ready: asyncio.Future[Any]) -> None:
        self.ready = ready
        self.leases = 0


class TenantPools(Generic[C]):
    """A registry of per-tenant connection pools chosen from the context's tenant field.

    Args:
        bridge: the bridge whose ``field`` names the tenant.
        dsn_for_tenant: a mapping from tenant to DSN, or a callable returning the DSN or None
            for an unknown tenant. Unknown tenants raise :class:`UnknownTenantError`.
        field: the declared field holding the tenant (default ``"tenant_id"``); it must not
            have ``inbound="always"``, or any client could choose its tenant.
        min_size, max_size: bounds of each tenant's pool.
        max_pools: most pools kept open at once; opening one more closes the least recently
            used idle pool, or raises :class:`TenantPoolError` when all are in use.
        acquire_timeout: seconds :meth:`acquire` waits for a free connection of the tenant's
            pool before it raises :class:`TenantPoolError` (None: as long as it takes). A
            task that holds one connection and asks for another (``nested="new"``
            transactions) needs ``max_size`` >= 2, or it would wait for itself.
        connect: ``asyncpg.create_pool``-compatible factory,
            ``connect(dsn, min_size=..., max_size=..., **pool_options) -> Awaitable[pool]``.
        pool_options: more keyword arguments for ``connect`` (``command_timeout``, ``init``...).

    Use in one event loop; ``async with TenantPools(...)`` closes the pools at the end.
    """

    @overload
    def __init__(
        self: TenantPools[PoolConnectionProxy[Record]],
        bridge: ContextBridge,
        dsn_for_tenant: Mapping[str, str] | Callable[[str], str | None],
        *,
        field: str = ...,
        min_size: int = ...,
        max_size: int = ...,
        max_pools: int = ...,
        acquire_timeout: float | None = ...,
        connect: None = ...,
        **pool_options: Any,
    ) -> None: ...

    @overload
    def __init__(
        self,
        bridge: ContextBridge,
        dsn_for_tenant: Mapping[str, str] | Callable[[str], str | None],
        *,
        field: str = ...,
        min_size: int = ...,
        max_size: int = ...,
        max_pools: int = ...,
        acquire_timeout: float | None = ...,
        connect: Callable[..., Awaitable[PoolLike[C]]],
        **pool_options: Any,
    ) -> None: ...

    def __init__(
        self,
        bridge: ContextBridge,
        dsn_for_tenant: Mapping[str, str] | Callable[[str], str | None],
        *,
        field: str = "tenant_id",
        min_size: int = 1,
        max_size: int = 10,
        max_pools: int = 100,
        acquire_timeout: float | None = 30.0,
        connect: Callable[..., Awaitable[PoolLike[Any]]] | None = None,
        **pool_options: Any,
    ) -> None:
        declared = bridge.fields.get(field)
        if declared is None:
            raise FieldConfigError(f"TenantPools: the bridge declares no field {field!r}")
        if declared.inbound == "always":
            raise FieldConfigError(
                f"TenantPools: field {field!r} has inbound='always', so any client could pick "
                "its tenant; declare it inbound='trusted' or inbound='never'"
            )
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("TenantPools: need 0 <= min_size <= max_size and max_size >= 1")
        if max_pools < 1:
            raise ValueError("TenantPools: max_pools must be at least 1")
        if acquire_timeout is not None and not acquire_timeout > 0:
            raise ValueError("TenantPools: acquire_timeout must be positive seconds or None")
        if not (isinstance(dsn_for_tenant, Mapping) or callable(dsn_for_tenant)):
            raise TypeError("TenantPools: dsn_for_tenant must be a mapping or a callable")
        if connect is None:
            with requires_extra("postgres", "TenantPools"):
                import asyncpg  # noqa: PLC0415 - optional dependency, needed only by default

            connect = cast(Callable[..., Awaitable[PoolLike[Any]]], asyncpg.create_pool)
        self._bridge = bridge
        self._field = field
        self._dsns = dsn_for_tenant
        self._connect = connect
        self._options: dict[str, Any] = {"min_size": min_size, "max_size": max_size}
        self._options.update(pool_options)
        self._max_pools = max_pools
        self._acquire_timeout = acquire_timeout
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._closing: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def field(self) -> str:
        """The name of the field the tenant is read from."""
        return self._field

    def current_tenant(self) -> str | None:
        """The tenant in the current context, or None when there is none.

        Only a tenant that came through the bridge counts (its ASGI middleware and trust
        policy, a scope, ``continue_from``, ...): a value in OTel baggage that other code
        extracted and attached as it came (an instrumentation continuing a request or message
        without this library) is not routed on. Known limit: the check is that the bridge made
        the context; baggage extracted *onto* a bridge's context (a propagator given none
        starts from the current one: OTel's W3C baggage propagator alone, or listed first in
        ``OTEL_PROPAGATORS``) keeps the bridge's state and is not told apart."""
        value, accepted = self._read()
        return value if accepted else None

    def tenant(self) -> str:
        """The tenant in the current context; raises :class:`MissingContextError` without one."""
        value, accepted = self._read()
        if value is not None and accepted:
            return value
        if value is not None:
            raise MissingContextError(
                f"{self._field!r} in the current context did not come through otel_ctxbridge "
                "(OTel baggage that other code extracted and attached as it came, which no "
                "trust policy checked): TenantPools routes only on a tenant the bridge "
                "accepted (its ASGI middleware, bridge.scope(), continue_from())"
            )
        raise MissingContextError(
            f"no tenant in the current context: TenantPools routes on field "
            f"{self._field!r}, which a trusted source (the ASGI middleware or "
            f"bridge.scope()) must set before a connection is taken"
        )

    def _read(self) -> tuple[str | None, bool]:
        """(the tenant in the current context, whether the bridge made that context: it keeps
        its state there, which a context other code extracts from a carrier never holds)."""
        ctx = rt.get_current()
        value = self._bridge.values_in(ctx).get(self._field)
        if not isinstance(value, str):
            return None, True
        return value, state_in(ctx, self._bridge._key) is not None  # the bridge's own entry

    def _dsn(self, tenant: str) -> str:
        dsns = self._dsns
        dsn = dsns.get(tenant) if isinstance(dsns, Mapping) else dsns(tenant)
        if not isinstance(dsn, str) or not dsn:
            shown = self._bridge.fields[self._field].shown(tenant)
            raise UnknownTenantError(f"tenant {shown!r} has no database in this registry")
        return dsn

    def _entry(self, tenant: str) -> _Entry:
        """The tenant's entry, creating its pool in the background when there is none."""
        if self._closed:
            raise TenantPoolError("TenantPools is closed")
        entry = self._entries.get(tenant)
        if entry is not None:
            self._entries.move_to_end(tenant)
            return entry
        dsn = self._dsn(tenant)
        if len(self._entries) >= self._max_pools:
            self._evict_one()
        entry = _Entry(asyncio.ensure_future(self._connect(dsn, **self._options)))
        entry.ready.add_done_callback(lambda f: self._forget_failed(tenant, entry, f))
        self._entries[tenant] = entry
        return entry

    def _forget_failed(self, tenant: str, entry: _Entry, future: asyncio.Future[Any]) -> None:
        if (future.cancelled() or future.exception() is not None) and self._entries.get(
            tenant
        ) is entry:
            del self._entries[tenant]  # the next request tries again

    def _evict_one(self) -> None:
        for tenant, entry in self._entries.items():
            if entry.leases == 0 and entry.ready.done():
                del self._entries[tenant]
                self._close_later(entry)
                return
        raise TenantPoolError(
            f"all {self._max_pools} tenant pools are in use; raise max_pools or retry later"
        )

    def _close_later(self, entry: _Entry) -> None:
        if entry.ready.cancelled() or entry.ready.exception() is not None:
            return
        closing = asyncio.ensure_future(cast(PoolLike[Any], entry.ready.result()).close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def pool(self, tenant: str | None = None) -> PoolLike[C]:
        """The pool of ``tenant`` (default: the current tenant), created on first use.

        For inspection and pool-level calls; borrow connections with :meth:`acquire`, which
        also keeps the pool from being evicted (``max_pools``) while it is in use."""
        entry = self._entry(self.tenant() if tenant is None else tenant)
        return cast(PoolLike[C], await asyncio.shield(entry.ready))

    def acquire(self) -> AbstractAsyncContextManager[C]:
        """``async with pools.acquire() as conn``: a connection of the current tenant's pool,
        returned to that pool when the block ends (also on errors and cancellation).

        Raises :class:`MissingContextError` without a tenant, :class:`UnknownTenantError`
        for a tenant the registry does not know, and :class:`TenantPoolError` when no
        connection comes free within ``acquire_timeout``."""
        return self._lease(self.tenant())

    @asynccontextmanager
    async def _lease(self, tenant: str) -> AsyncIterator[C]:
        entry = self._entry(tenant)
        entry.leases += 1  # counted before any await: an entry in use is never evicted
        try:
            pool = cast(PoolLike[C], await asyncio.shield(entry.ready))
            async with AsyncExitStack() as lent:
                borrow = lent.enter_async_context(pool.acquire())
                timeout = self._acquire_timeout  # None: wait_for just awaits
                started = asyncio.get_running_loop().time()
                try:
                    connection = await asyncio.wait_for(borrow, timeout)
                except asyncio.TimeoutError:
                    waited = asyncio.get_running_loop().time() - started
                    if timeout is None or waited < timeout:
                        raise  # the pool's own (a connect timeout), not the wait's
                    raise TenantPoolError(
                        f"no connection of tenant {tenant!r}'s pool came free within "
                        f"{timeout:g} s (max_size={self._options['max_size']}); a task that "
                        "holds one and asks for another (nested='new') needs max_size >= 2"
                    ) from None
                yield connection
        finally:
            entry.leases -= 1

    def in_use(self, tenant: str | None = None) -> int:
        """How many connections are lent out now, for ``tenant`` or for all tenants."""
        if tenant is not None:
            entry = self._entries.get(tenant)
            return entry.leases if entry is not None else 0
        return sum(entry.leases for entry in self._entries.values())

    def tenants(self) -> list[str]:
        """The tenants that have a pool now, least recently used first."""
        return list(self._entries)

    def open_pools(self) -> dict[str, PoolLike[C]]:
        """The pools created so far, by tenant (for metrics and health checks)."""
        return {
            tenant: cast(PoolLike[C], entry.ready.result())
            for tenant, entry in self._entries.items()
            if entry.ready.done() and not entry.ready.cancelled() and not entry.ready.exception()
        }

    async def close(self) -> None:
        """Close every pool (asyncpg waits for lent connections to come back). Idempotent;
        afterwards :meth:`acquire` raises :class:`TenantPoolError`."""
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            await asyncio.wait([entry.ready])
            self._close_later(entry)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def __aenter__(self) -> TenantPools[C]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"TenantPools(field={self._field!r}, pools={len(self._entries)})"
