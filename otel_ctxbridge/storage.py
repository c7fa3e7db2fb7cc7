"""AsyncLocalStorage: Node's store API over Python's ``contextvars`` and OTel's context.

Mapping of Node's semantics onto Python:

- ``run(store, fn)`` sets the store for ``fn`` and everything it calls or starts; with a
  coroutine function the whole coroutine runs inside, not just its creation.
- asyncio tasks copy the context when they are *created*: a task started inside ``run`` keeps
  the store even after ``run`` returns, and ``enter_with`` inside a task does not leak into
  its parent.
- Unlike Node's async hooks, threads (``threading.Thread``), ``loop.run_in_executor`` and plain
  callbacks handed to other libraries start with an empty context: wrap them with
  ``AsyncLocalStorage.bind(fn)`` (or use ``asyncio.to_thread``, which copies the context).
- ``disable()`` makes ``get_store()`` return None in every context until the next ``run`` or
  ``enter_with`` of the same instance.

A plain instance keeps its store in a ``ContextVar`` of its own (never in baggage); ``bind`` and
``snapshot`` capture every context variable, OTel's context included. ``bridge.storage()``
returns an instance whose store is the bridge's fields, kept where the bridge keeps them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from . import _runtime as rt
from ._runtime import PLAIN_TYPES
from ._scope import entered

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["AsyncLocalStorage"]

T = TypeVar("T")
R = TypeVar("R")


class AsyncLocalStorage(Generic[T]):
    """A store that follows the flow of execution, like Node's ``AsyncLocalStorage``.

    Each instance keeps its store in a ``ContextVar`` of its own, so instances are
    independent, and the store never enters OTel baggage.
    """

    def __init__(self) -> None:
        self._var: ContextVar[T | None] = ContextVar(f"otel_ctxbridge.als.{id(self):x}")
        self._enabled = True

    def run(self, store: T, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` with ``store`` as the store and return its result.

        When ``fn`` returns a coroutine (an async ``fn``) the result is an awaitable running
        the whole coroutine with the store."""
        if not self._enabled:
            self._enabled = True
        var = self._var
        token = var.set(store)
        try:
            result = fn(*args, **kwargs)
        finally:
            var.reset(token)
        cls = result.__class__  # rt.is_coroutine, inlined
        if cls is CoroutineType or (cls not in PLAIN_TYPES and isinstance(result, Coroutine)):
            return cast(R, _with_store(var, store, cast(Coroutine[Any, Any, R], result)))
        return result

    def get_store(self) -> T | None:
        """The current store, or None outside ``run``/``enter_with`` or after ``disable()``."""
        if not self._enabled:
            return None
        return self._var.get(None)

    def enter_with(self, store: T) -> None:
        """Make ``store`` the store for the rest of the current task or thread's context."""
        self._enabled = True
        self._var.set(store)

    def exit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` outside any store (``get_store()`` is None there)."""
        return self.run(None, fn, *args, **kwargs)  # type: ignore[arg-type] # None = no store

    def disable(self) -> None:
        """Turn the instance off: ``get_store()`` answers None until the next run/enter_with."""
        self._enabled = False

    @staticmethod
    def bind(fn: Callable[..., R]) -> Callable[..., R]:
        """Wrap ``fn`` to run in the context current now: every store, OTel's context and
        all other context variables."""
        return rt.bind_context(fn)

    @staticmethod
    def snapshot() -> Callable[..., Any]:
        """Capture the current context; returns ``runner(fn, *args, **kwargs)`` running in it."""
        captured = contextvars.copy_context()

        def runner(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
            return rt.run_in_snapshot(captured, fn, *args, **kwargs)

        return runner


async def _with_store(var: ContextVar[T | None], store: T, coro: Coroutine[Any, Any, R]) -> R:
    token = var.set(store)
    try:
        return await coro
    finally:
        var.reset(token)


_READ_ONLY = (
    "the store of bridge.storage() is a snapshot of the fields: change them with "
    "bridge.update(name=value) (or run/enter_with a new store)"
)


class _FieldsSnapshot(dict[str, Any]):
    """What ``BridgedStorage.get_store()`` returns: a dict (JSON, ``**`` and ``dict()`` work)
    that refuses changes with a ``TypeError`` naming ``bridge.update``, since changing a copy
    would change nothing where the fields live. Copies and pickles are plain dicts."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise TypeError(_READ_ONLY)

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        return dict, (dict(self),)

    def copy(self) -> dict[str, Any]:
        """A plain, changeable dict of the same fields."""
        return dict(self)


def _mapping(method: str, store: object) -> Mapping[str, Any]:
    if not isinstance(store, Mapping):
        raise TypeError(
            f"storage().{method}(store, ...): the store must be a mapping of field names to "
            f"values, not {type(store).__name__}"
        )
    return store


class BridgedStorage(AsyncLocalStorage[dict[str, Any]]):
    """An :class:`AsyncLocalStorage` whose store is a dict of a bridge's declared fields.

    The values go where the bridge puts them (baggage or the process-local slot), so spans,
    logs and downstream calls see them; ``run`` and ``enter_with`` start a scope of their own
    (like ``bridge.scope``: the current span is stamped, ``bridge.update`` works inside).
    ``get_store()`` returns a fresh read-only dict each time (changing it raises
    ``TypeError``): change values with ``run``, ``enter_with`` or the bridge's ``update``.
    ``disable()`` only makes ``get_store()`` answer None; the fields still reach spans, logs
    and carriers.
    """

    def __init__(self, bridge: ContextBridge) -> None:
        super().__init__()
        self._bridge = bridge

    def _cleared(self, store: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = dict.fromkeys(self._bridge.fields)
        values.update(store)
        return values

    def run(
        self, store: Mapping[str, Any], fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> R:
        """Call ``fn`` with exactly the fields of ``store`` set (others unset)."""
        values = self._cleared(_mapping("run", store))
        self._enabled = True
        return self._bridge.run(values, fn, *args, **kwargs)

    def get_store(self) -> dict[str, Any] | None:
        """A read-only dict of the declared fields set now, or None when none is set or
        disabled."""
        if not self._enabled:
            return None
        values = self._bridge.values_in(rt.get_current())
        return _FieldsSnapshot(values) if values else None

    def enter_with(self, store: Mapping[str, Any]) -> None:
        """Set exactly the fields of ``store`` for the rest of the current context."""
        values = self._cleared(_mapping("enter_with", store))
        self._enabled = True
        rt.attach(entered(self._bridge, rt.get_current(), values))

    def exit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn`` with every declared field unset."""
        ctx = entered(self._bridge, rt.get_current(), self._cleared({}))
        return rt.call_in(ctx, fn, *args, **kwargs)
