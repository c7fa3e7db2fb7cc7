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

Stores live in OpenTelemetry's context under a private key per instance, so they travel with
``bind``, ``snapshot`` and every OTel context hand-off; they are never put in baggage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from opentelemetry.context import create_key

from . import _runtime as rt

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["AsyncLocalStorage"]

T = TypeVar("T")
R = TypeVar("R")


class AsyncLocalStorage(Generic[T]):
    """A store that follows the flow of execution, like Node's ``AsyncLocalStorage``.

    Several instances are independent of each other.
    """

    def __init__(self) -> None:
        self._key = create_key("otel_ctxbridge.als")
        self._enabled = True

    def run(self, store: T, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` with ``store`` as the store and return its result."""
        self._enabled = True
        return rt.call_in(rt.with_entry(rt.get_current(), self._key, store), fn, *args, **kwargs)

    def get_store(self) -> T | None:
        """The current store, or None outside ``run``/``enter_with`` or after ``disable()``."""
        if not self._enabled:
            return None
        return rt.get_current().get(self._key)  # type: ignore[return-value] # our own key

    def enter_with(self, store: T) -> None:
        """Make ``store`` the store for the rest of the current task or thread's context."""
        self._enabled = True
        rt.attach(rt.with_entry(rt.get_current(), self._key, store))

    def exit(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` outside any store (``get_store()`` is None there)."""
        return rt.call_in(rt.with_entry(rt.get_current(), self._key, None), fn, *args, **kwargs)

    def disable(self) -> None:
        """Turn the instance off: ``get_store()`` answers None until the next run/enter_with."""
        self._enabled = False

    @staticmethod
    def bind(fn: Callable[..., R]) -> Callable[..., R]:
        """Wrap ``fn`` to run in the context current now (all stores and OTel state)."""
        return rt.bind_context(fn)

    @staticmethod
    def snapshot() -> Callable[..., Any]:
        """Capture the current context; returns ``runner(fn, *args, **kwargs)`` running in it."""
        captured = rt.get_current()

        def runner(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
            return rt.call_in(captured, fn, *args, **kwargs)

        return runner


class BridgedStorage(AsyncLocalStorage[dict[str, Any]]):
    """An :class:`AsyncLocalStorage` whose store is a dict of a bridge's declared fields.

    The values go where the bridge puts them (baggage or the process-local slot), so spans,
    logs and downstream calls see them. ``get_store()`` returns a fresh dict each time:
    change values with ``run``, ``enter_with`` or the bridge's ``update``.
    """

    def __init__(self, bridge: ContextBridge) -> None:
        super().__init__()
        self._bridge = bridge

    def _cleared(self, store: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = dict.fromkeys(self._bridge.fields)
        values.update(store)
        return values

    def run(self, store: Mapping[str, Any], fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Call ``fn`` with exactly the fields of ``store`` set (others unset)."""
        self._enabled = True
        return self._bridge.run(self._cleared(store), fn, *args, **kwargs)

    def get_store(self) -> dict[str, Any] | None:
        """A dict of the declared fields set now, or None when none is set or disabled."""
        if not self._enabled:
            return None
        values = self._bridge.values_in(rt.get_current())
        return values or None

    def enter_with(self, store: Mapping[str, Any]) -> None:
        """Set exactly the fields of ``store`` for the rest of the current context."""
        self._enabled = True
        rt.attach(self._bridge.derive(rt.get_current(), self._cleared(store)))

    def exit(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Call ``fn`` with every declared field unset."""
        ctx = self._bridge.derive(rt.get_current(), self._cleared({}))
        return rt.call_in(ctx, fn, *args, **kwargs)

