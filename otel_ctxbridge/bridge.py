"""ContextBridge: the field registry and the store API over OpenTelemetry's context."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry.context import Context, create_key
from opentelemetry.propagators.textmap import CarrierT, Setter, default_setter
from opentelemetry.trace import Span

from . import _runtime as rt
from ._carrier import read_fields, write_fields
from ._derive import derive_context
from ._runtime import BAGGAGE_KEY as _BAGGAGE
from ._runtime import get_current as _get_current
from ._scope import Scope, entered, stamp, use_compiled
from ._state import (
    CACHE_LOCK,
    CHANGES,
    EMPTY,
    MISSING,
    Frame,
    frame_of,
    state_in,
)
from .errors import MissingContextError, UnknownFieldError
from .fields import Field, resolve_fields

if TYPE_CHECKING:
    from .storage import AsyncLocalStorage

__all__ = ["ContextBridge"]

R = TypeVar("R")
_logger = logging.getLogger("otel_ctxbridge")


class ContextBridge:
    """The registry of declared fields and the store API over OpenTelemetry's context.

    Propagated fields are stored as OTel baggage under their baggage key, so every OTel
    propagator and ``opentelemetry.baggage.get_baggage`` see them; process-local fields are
    stored under a private context key and never reach a carrier.
    """

    def __init__(self, fields: Iterable[Field], *, attribute_prefix: str = "app.") -> None:
        resolved = resolve_fields(fields, attribute_prefix)
        self.fields: Mapping[str, Field] = MappingProxyType(resolved)
        """The declared fields by name, with attribute names resolved."""
        self.attribute_prefix = attribute_prefix
        self._key = create_key("otel_ctxbridge.state")
        # name -> baggage key for propagated fields, None for process-local ones.
        self._where: dict[str, str | None] = {
            f.name: (f.baggage_key if f.propagate else None) for f in resolved.values()
        }
        # name -> (baggage key or None, max_length, quick check): how a plain ASCII str
        # within max_length is checked on the hot path: True for the default printable
        # check, a regex validator's fullmatch (a match: valid), False for Field.problem().
        self._plans: dict[str, tuple[str | None, int, Callable[[str], object] | bool]] = {
            f.name: (self._where[f.name], f.max_length, _quick_check(f)) for f in resolved.values()
        }
        # name -> span attribute of the fields whose text values spans show as they are
        # (not redacted): stamp() writes those without a look at the field.
        self._plain_attributes: dict[str, str] = {
            f.name: str(f.attribute) for f in resolved.values() if not f.redacted
        }
        # get() and current(): the last context read twice in a row, every field's value in it
        # (MISSING when unset) and a view of the set ones; _missed: the context of the last
        # read that found another one cached.
        self._last: tuple[object, Mapping[str, Any], Mapping[str, Any]] = (MISSING, EMPTY, EMPTY)
        self._missed: object = MISSING
        self._drops: dict[str, int] = {}
        self._drop_lock = threading.Lock()
        use_compiled(self, ContextBridge)  # the compiled scope() and get(), when built

    # -- reading ---------------------------------------------------------------------------

    def get(self, name: str, default: Any = None) -> Any:
        """The value of field ``name`` in the current context, or ``default`` when unset."""
        last = self._last
        if last[0] is _get_current():  # this context's values are cached
            try:
                value = last[1][name]  # every declared field, MISSING when unset
            except KeyError:
                pass  # not a declared field: _lookup raises
            else:
                return default if value is MISSING else value
        return self._lookup(name, default)

    def _lookup(self, name: str, default: Any) -> Any:
        key = self._where.get(name, MISSING)
        if key is MISSING:
            raise UnknownFieldError(f"no field named {name!r} (declared: {', '.join(self.fields)})")
        ctx = _get_current()
        if ctx is self._missed and ctx is not self._last[0]:  # read twice in a row: cache it
            value = self._cached(ctx)[0][name]
            return default if value is MISSING else value
        self._missed = ctx
        state = state_in(ctx, self._key)
        if key is None:  # a process-local field
            value = state.local.get(name, MISSING) if state is not None else MISSING
        else:
            bag: Any = ctx.get(_BAGGAGE)
            value = bag.get(key, MISSING) if bag else MISSING
        if state is not None and state.frame is not None:
            update = state.frame.updates.get(name)
            if update is not None and update[1] > state.generation:
                value = update[0]
        return default if value is MISSING else value

    def current(self) -> Mapping[str, Any]:
        """A read-only mapping of the declared fields set in the current context."""
        ctx = _get_current()
        last = self._last
        if last[0] is ctx:
            return last[2]
        return self._cached(ctx)[1]

    def _cached(self, ctx: Context) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """The values of ``ctx`` and a view of them, kept as the cached context's.

        Contexts are immutable, and what one holds changes only when ``update()`` records
        into its frame, which clears the cache after it. An answer computed while an update
        was being recorded is not kept (``CHANGES`` moved), so no stale answer outlives the
        update; holding the context keeps its identity from being reused."""
        changes = CHANGES[0]
        values = self.values_in(ctx)
        lookup = dict.fromkeys(self._where, MISSING)
        lookup.update(values)
        view = MappingProxyType(values)
        with CACHE_LOCK:
            if CHANGES[0] is changes:
                self._last = (ctx, lookup, view)
        return lookup, view

    def values_in(self, ctx: Context) -> dict[str, Any]:
        """The declared fields set in ``ctx`` (with the request's late updates), by name."""
        state = state_in(ctx, self._key)
        bag: Any = ctx.get(rt.BAGGAGE_KEY) or EMPTY
        local = state.local if state is not None else EMPTY
        values: dict[str, Any] = {}
        for name, key in self._where.items():
            value = local.get(name, MISSING) if key is None else bag.get(key, MISSING)
            if value is not MISSING:
                values[name] = value
        if state is not None and state.frame is not None and state.frame.updates:
            for name, (value, generation) in state.frame.updates.items():
                if generation > state.generation:
                    if value is MISSING:
                        values.pop(name, None)
                    else:
                        values[name] = value
        return values

    def require(self, name: str) -> Any:
        """The value of field ``name``; raises :class:`MissingContextError` when unset."""
        value = self.get(name, MISSING)
        if value is MISSING:
            raise MissingContextError(f"field {name!r} is not set in the current context")
        return value

    # -- writing ---------------------------------------------------------------------------

    def scope(self, /, **values: Any) -> Scope:
        """A scope setting ``values`` (``None`` unsets a field): ``with``, ``async with``,
        or a decorator of sync and async functions. Nested scopes overlay and restore.

        Values are validated when the scope is entered (or when it decorates a function):
        :class:`ContextValueError` and :class:`UnknownFieldError` name the field."""
        return Scope(self, values)

    def update(self, /, **values: Any) -> None:
        """Change fields (``None`` unsets) for the rest of the current request or scope.

        Inside a request handled by the ASGI middleware the change reaches the whole request:
        the rest of the handler (also after a nested span, scope or ``async with`` block
        ends), its server span and access-log line, and everything running in its context (a
        FastAPI dependency in a worker thread, ``bind``, tasks). Outside a request it reaches
        the rest of the innermost scope the same way, and ends with that scope. The current
        span is stamped too. Between concurrent updates the newest write wins.

        The bridge's readers (``get``, ``current``, ``inject``, the span and log processors,
        the egress hook of instrumented HTTP clients) all see the change. Raw OTel baggage
        (``opentelemetry.baggage.get_baggage``) shows it in the context where ``update``
        ran, but no longer once a nested span or ``attach`` that was open then is closed.

        Raises:
            MissingContextError: there is no enclosing scope or request. Outside one the
                values would stay in the thread's context for whatever runs there next (the
                next job of a worker thread); use ``bridge.scope(...)``, ``bridge.run(...)``,
                or, to set them for the rest of the current context on purpose,
                ``bridge.storage().enter_with(...)``.
            ContextValueError, UnknownFieldError: a value is refused; nothing is changed.
        """
        ctx = rt.get_current()
        state = state_in(ctx, self._key)
        if state is None:
            raise MissingContextError(
                "update() outside any scope or request: use bridge.scope(...) or "
                "bridge.run(...) around the work (or storage().enter_with(...) on purpose); "
                "in a thread or callback started from a request, wrap its function with "
                "bridge.bind(fn) (or use ContextExecutor) so that it runs in the request's "
                "context"
            )
        if not values:
            return
        frame = frame_of(state)  # a scope's frame is made by its first update
        new = self.derive(ctx, values, frame)  # folds in the frame's earlier updates
        generation: int = new[self._key].generation  # type: ignore[attr-defined] # our State
        rt.attach(new)  # no token: the frame carries the change until the scope restores
        frame.record({k: MISSING if v is None else v for k, v in values.items()}, generation)
        self._last = (MISSING, EMPTY, EMPTY)  # after the record: see _cached
        for span in frame.spans:
            stamp(self, span, values)
        current = new.get(rt.SPAN_KEY)
        if current is not None and current not in frame.spans:
            stamp(self, current, values)

    def run(
        self, values: Mapping[str, Any], fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> R:
        """Call ``fn(*args, **kwargs)`` inside a scope of ``values`` and return its result.

        When ``fn`` returns a coroutine (an async ``fn``), the result is an awaitable that
        runs the whole coroutine inside the scope. Other awaitables (a future, a task, an
        object with ``__await__``) are returned as they are and run outside it."""
        return rt.call_in(entered(self, rt.get_current(), values), fn, *args, **kwargs)

    def bind(self, fn: Callable[..., R]) -> Callable[..., R]:
        """Capture the current context now; the returned callable runs ``fn`` inside it
        (for threads, executors and callbacks, which do not inherit the context)."""
        return rt.bind_context(fn)

    def storage(self) -> AsyncLocalStorage[dict[str, Any]]:
        """An :class:`AsyncLocalStorage` whose store is a dict of this bridge's fields."""
        from .storage import BridgedStorage  # noqa: PLC0415 - storage imports this module

        return BridgedStorage(self)

    def derive(
        self, ctx: Context, values: Mapping[str, Any], frame: Frame | None = None
    ) -> Context:
        """A copy of ``ctx`` with ``values`` written (``None`` unsets); validates them.

        ``frame`` starts a request frame (the ASGI middleware passes one per request). By
        default the copy keeps ``ctx``'s request frame, if any (scopes inside a request share
        it), else it is a scope of its own. Updates that ``ctx``'s frame recorded after
        ``ctx`` was made are carried into the copy."""
        return derive_context(self, ctx, values, frame)

    # -- carriers --------------------------------------------------------------------------

    def inject(self, carrier: CarrierT, setter: Setter[CarrierT] = default_setter) -> CarrierT:
        """Write ``traceparent``/``tracestate`` and ``baggage`` into ``carrier`` and return it.

        ``setter`` writes a header (default: ``carrier[name] = value``, for a dict, message
        headers or any object with item assignment); pass an OTel ``Setter`` for others.
        Process-local fields are never written."""
        write_fields(self, rt.get_current(), carrier, setter)
        return carrier

    def extract(
        self, carrier: Mapping[Any, Any] | Iterable[tuple[Any, Any]], trusted: bool = False
    ) -> Mapping[str, str]:
        """Validated field values from a carrier's field headers and ``baggage``. Never raises.

        The carrier is a mapping or an iterable of ``(name, value)`` pairs (ASGI's
        ``scope["headers"]``); names and values may be str or bytes, a value also a list of
        them (a repeated header); None values and other names are skipped. A field is read
        when its ``inbound`` policy is ``"always"``, or ``"trusted"`` and ``trusted`` is True.
        Invalid values are dropped, counted and logged once without the value; an unreadable
        carrier gives no fields and is counted under ``"carrier"``.
        """
        try:
            return read_fields(self, carrier, trusted)
        except Exception as exc:  # telemetry never throws on the request path
            self.count_drop("carrier", f"unreadable carrier ({type(exc).__name__})")
            _logger.debug("otel_ctxbridge: unreadable carrier", exc_info=True)
            return {}

    def count_drop(self, name: str, reason: str) -> None:
        """Count an inbound value of field ``name`` that was refused, and log it rate-limited:
        the 1st, 10th, 100th, ... drop of a field (with the count), never the raw value.

        Malformed or oversized ``baggage`` members are counted under ``"baggage"``, carriers
        that could not be read at all under ``"carrier"``."""
        with self._drop_lock:
            count = self._drops.get(name, 0) + 1
            self._drops[name] = count
        if count == 1 or _is_power_of_ten(count):
            _logger.warning(
                "otel_ctxbridge: dropped an inbound value of %r: %s (%d dropped so far)",
                name,
                reason,
                count,
            )

    def drop_counts(self) -> Mapping[str, int]:
        """How many inbound values were dropped, by field name."""
        with self._drop_lock:
            return dict(self._drops)

    def generated(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` plus a generated value for each unset field that has ``generate``."""
        out = dict(values)
        for name, field in self.fields.items():
            if field.generate is not None and out.get(name) is None:
                out[name] = field.generate()
        return out

    def new_frame(self, spans: tuple[Span, ...]) -> Frame:
        """A request frame whose late ``update()`` values will also reach ``spans``."""
        return Frame(spans)

    def __repr__(self) -> str:
        return f"ContextBridge(fields={list(self.fields)!r})"


def _quick_check(field: Field) -> Callable[[str], object] | bool:
    if field.validator is None:
        return True
    return field._check if isinstance(field.validator, (str, re.Pattern)) else False


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1
