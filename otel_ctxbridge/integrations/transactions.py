"""Transactions held in context: service functions reach the open transaction without a parameter.

``tx.transaction()`` borrows a connection (from :class:`~.tenants.TenantPools` for the current
tenant, or from any pool with ``acquire()``), starts a transaction and keeps it in a
process-local entry of OpenTelemetry's context (like :class:`~otel_ctxbridge.AsyncLocalStorage`;
never baggage, never sent anywhere). ``tx.current_connection()`` returns it anywhere below.
The block commits when it ends normally, rolls back when it raises (cancellation included), and
always gives the connection back.

Rules:

- Nested ``transaction()`` in the same task makes a savepoint (``nested="savepoint"``, the
  default; an error inside rolls back to it and propagates), joins the outer transaction
  (``nested="join"``), or opens an independent transaction on another connection
  (``nested="new"``).
- One connection serves one task. asyncio tasks copy the context when they are created, so a
  task spawned inside a transaction inherits the entry, but cannot use it:
  ``current_connection()`` and ``transaction()`` there raise :class:`TransactionScopeError`.
  To let a task use the transaction, pass it a function wrapped with ``tx.shared(fn)``: shared
  calls take turns (each holds the connection for its whole call), the owner must await them
  before using the connection again, and the commit waits for a running shared call.
- With :class:`~.tenants.TenantPools`, the transaction belongs to the tenant it was opened for:
  under a scope with another tenant, ``current_connection()`` and nested ``transaction()``
  raise :class:`TransactionScopeError` (``nested="new"`` opens one for the new tenant).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, Literal, Protocol, TypeVar, cast

from opentelemetry.context import Context, create_key

from otel_ctxbridge import _runtime as rt
from otel_ctxbridge.errors import ContextBridgeError, MissingContextError

__all__ = ["NestedMode", "TransactionScope", "TransactionScopeError", "Transactions"]

C = TypeVar("C")
C_co = TypeVar("C_co", covariant=True)
R = TypeVar("R")
NestedMode = Literal["savepoint", "join", "new"]
_logger = logging.getLogger("otel_ctxbridge")


class TransactionScopeError(ContextBridgeError, RuntimeError):
    """The transaction in this context may not be used here: another task or tenant owns it,
    a shared call is using it, or it has already ended."""


class _Source(Protocol[C_co]):
    def acquire(self) -> AbstractAsyncContextManager[C_co]: ...


class _DbTransaction(Protocol):
    async def start(self) -> None: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...


class _Root:
    """One top-level transaction: open or ended, and the shared call using it now."""

    __slots__ = ("holder", "lock", "open")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.open = True
        self.holder: asyncio.Task[Any] | None = None


class _Held:
    """The context entry: a connection in a transaction, for one task (and tenant)."""

    __slots__ = ("connection", "owner", "root", "shared", "tenant")

    def __init__(
        self, connection: Any, owner: asyncio.Task[Any] | None, tenant: str | None, root: _Root
    ) -> None:
        self.connection = connection
        self.owner = owner
        self.tenant = tenant
        self.root = root
        self.shared = False


def _this_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running event loop
        return None


class Transactions(Generic[C]):
    """Transactions held in context over ``source``: a :class:`~.tenants.TenantPools`
    (the current tenant's pool) or any pool with ``acquire()`` (``asyncpg.Pool``...)."""

    def __init__(self, source: _Source[C]) -> None:
        self._source = source
        current_tenant = getattr(source, "current_tenant", None)
        self._tenant: Callable[[], str | None] | None = (
            current_tenant if callable(current_tenant) else None
        )
        self._key = create_key("otel_ctxbridge.transaction")

    def transaction(
        self, *, nested: NestedMode = "savepoint", **options: Any
    ) -> TransactionScope[C]:
        """A transaction block: ``async with tx.transaction() as conn`` or, as a decorator of
        async functions, one transaction per call. ``options`` go to the driver's
        ``connection.transaction()`` (asyncpg: ``isolation``, ``readonly``, ``deferrable``)."""
        if nested not in ("savepoint", "join", "new"):
            raise ValueError("nested must be 'savepoint', 'join' or 'new'")
        return TransactionScope(self, nested, options)

    def current_connection(self) -> C:
        """The connection of the transaction open here. Raises :class:`MissingContextError`
        outside a transaction and :class:`TransactionScopeError` where it may not be used."""
        held = self._entry(rt.get_current())
        if held is None:
            raise MissingContextError(
                "no transaction is open in this context; run the call inside "
                "`async with tx.transaction()` or a function decorated with it"
            )
        self._check(held)
        return cast(C, held.connection)

    def in_transaction(self) -> bool:
        """True when :meth:`current_connection` would return a connection here."""
        held = self._entry(rt.get_current())
        if held is None:
            return False
        try:
            self._check(held)
        except TransactionScopeError:
            return False
        return True

    def shared(self, fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        """Wrap async ``fn`` so that it may use the current transaction from another task
        (``asyncio.gather``, ``create_task``). Calls take turns on the connection; a call
        starting after the transaction ended raises :class:`TransactionScopeError`."""
        held = self._entry(rt.get_current())
        if held is None:
            raise MissingContextError("tx.shared() needs an open transaction to share")
        self._check(held, using=False)
        if held.shared:
            raise TransactionScopeError("a shared call cannot share the transaction further")
        root = held.root

        @functools.wraps(fn)
        async def shared_call(*args: Any, **kwargs: Any) -> R:
            async with root.lock:
                if not root.open:
                    raise TransactionScopeError("the shared transaction has already ended")
                me = _this_task()
                entry = _Held(held.connection, me, held.tenant, root)
                entry.shared = True
                root.holder = me
                token = rt.attach(rt.with_entry(rt.get_current(), self._key, entry))
                try:
                    return await fn(*args, **kwargs)
                finally:
                    rt.detach(token)
                    root.holder = None

        return shared_call

    def _entry(self, ctx: Context) -> _Held | None:
        return cast("_Held | None", ctx.get(self._key))

    def _check(self, held: _Held, *, using: bool = True) -> None:
        root = held.root
        if not root.open:
            raise TransactionScopeError("the transaction in this context has already ended")
        me = _this_task()
        if held.owner is not me:
            if me is None:  # a worker thread (asyncio.to_thread, an executor)
                raise TransactionScopeError(
                    "the transaction in this context belongs to the task that opened it; a "
                    "thread cannot use it (the connection belongs to its event loop): run the "
                    "query in that task, awaiting it there"
                )
            raise TransactionScopeError(
                "the transaction in this context belongs to the task that opened it; a task "
                "spawned inside may use it only through tx.shared(fn)"
            )
        if using and root.holder is not None and root.holder is not me:
            raise TransactionScopeError(
                "a shared call is using this transaction's connection; await it first"
            )
        if self._tenant is not None and self._tenant() != held.tenant:
            raise TransactionScopeError(
                "the transaction in this context was opened for another tenant"
            )


class TransactionScope(Generic[C]):
    """What :meth:`Transactions.transaction` returns: an async context manager (entered once
    at a time) and a decorator of async functions."""

    __slots__ = ("_entered", "_lease", "_nested", "_options", "_root", "_token", "_tx", "_txn")

    def __init__(self, tx: Transactions[C], nested: NestedMode, options: dict[str, Any]) -> None:
        self._tx = tx
        self._nested = nested
        self._options = options
        self._lease: AbstractAsyncContextManager[C] | None = None
        self._txn: _DbTransaction | None = None
        self._root: _Root | None = None
        self._token: Any = None
        self._entered = False

    async def __aenter__(self) -> C:
        if self._entered:
            raise RuntimeError("this transaction block is already entered; call transaction()")
        self._entered = True
        try:
            return await self._enter()
        except BaseException:
            self._entered = False
            raise

    async def _enter(self) -> C:
        tx = self._tx
        held = tx._entry(rt.get_current())
        if held is not None and self._nested != "new":
            tx._check(held)
            if self._nested == "savepoint":
                self._txn = await _begin(held.connection, self._options)
            return cast(C, held.connection)
        tenant = tx._tenant() if tx._tenant is not None else None
        lease = tx._source.acquire()
        connection = await lease.__aenter__()
        try:
            self._txn = await _begin(connection, self._options)
        except BaseException as exc:
            await lease.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._lease = lease
        self._root = root = _Root()
        entry = _Held(connection, _this_task(), tenant, root)
        self._token = rt.attach(rt.with_entry(rt.get_current(), tx._key, entry))
        return connection

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        txn, self._txn = self._txn, None
        lease, self._lease = self._lease, None
        root, self._root = self._root, None
        token, self._token = self._token, None
        locked = False
        try:
            if root is not None:
                await root.lock.acquire()  # a running shared call finishes first
                locked = True
            if txn is not None:
                await _finish(txn, failed=exc is not None)
        finally:
            if root is not None:
                root.open = False
                if locked:
                    root.lock.release()
            if token is not None:
                rt.detach(token)
            try:
                if lease is not None:
                    await lease.__aexit__(exc_type, exc, tb)
            finally:
                self._entered = False

    def __call__(self, fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        """Decorate async ``fn``: every call runs inside its own transaction block."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError("transaction() decorates async functions only")
        tx, nested, options = self._tx, self._nested, self._options

        @functools.wraps(fn)
        async def transactional(*args: Any, **kwargs: Any) -> R:
            async with TransactionScope(tx, nested, options):
                return await fn(*args, **kwargs)

        return transactional


async def _begin(connection: Any, options: dict[str, Any]) -> _DbTransaction:
    txn = cast(_DbTransaction, connection.transaction(**options))
    await txn.start()
    return txn


async def _finish(txn: _DbTransaction, *, failed: bool) -> None:
    if not failed:
        await txn.commit()
        return
    try:
        await txn.rollback()
    except Exception:  # the body's error matters more; the pool resets the connection
        _logger.warning("otel_ctxbridge: rollback failed", exc_info=True)
