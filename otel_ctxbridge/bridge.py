"""ContextBridge: the field registry and the store API over OpenTelemetry's context."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry.context import Context, create_key
from opentelemetry.propagators.textmap import CarrierT
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _runtime as rt
from ._carrier import read_fields
from ._runtime import BAGGAGE_KEY as _BAGGAGE
from ._runtime import get_current as _get_current
from ._scope import Scope, stamp
from ._state import EMPTY, MISSING, Frame, State, next_generation
from .errors import ContextValueError, MissingContextError, UnknownFieldError
from .fields import Field, resolve_fields
from .limits import MAX_MEMBER_BYTES, check_baggage_limits, format_baggage, may_exceed_limits

if TYPE_CHECKING:
    from .storage import AsyncLocalStorage

__all__ = ["ContextBridge"]

R = TypeVar("R")
_logger = logging.getLogger("otel_ctxbridge")
_TRACE = TraceContextTextMapPropagator()


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
        # name -> (baggage key or None, max_length, whether the default printable check applies)
        self._plans: dict[str, tuple[str | None, int, bool]] = {
            f.name: (self._where[f.name], f.max_length, f.validator is None)
            for f in resolved.values()
        }
        # current(): the last answer and the (baggage, state) it was computed from.
        self._last: tuple[object, object, Mapping[str, Any]] = (MISSING, MISSING, EMPTY)
        self._drops: dict[str, int] = {}
        self._drop_lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------

    def get(self, name: str, default: Any = None) -> Any:
        """The value of field ``name`` in the current context, or ``default`` when unset."""
        key = self._where.get(name, MISSING)
        ctx = _get_current()
        state: State | None = ctx.get(self._key)  # type: ignore[assignment] # our own key
        if state is None:
            if key is None:
                return default
            if key is MISSING:
                raise UnknownFieldError(f"no field named {name!r}")
            bag: Any = ctx.get(_BAGGAGE)
            return bag.get(key, default) if bag else default
        if key is MISSING:
            raise UnknownFieldError(f"no field named {name!r}")
        if key is None:
            value = state.local.get(name, MISSING)
        else:
            bag = ctx.get(_BAGGAGE)
            value = bag.get(key, MISSING) if bag else MISSING
        if state.frame is not None and state.frame.updates:
            update = state.frame.updates.get(name)
            if update is not None and update[1] > state.generation:
                value = update[0]
        return default if value is MISSING else value

    def current(self) -> Mapping[str, Any]:
        """A read-only mapping of the declared fields set in the current context."""
        ctx = _get_current()
        bag = ctx.get(_BAGGAGE)
        state = ctx.get(self._key)
        last = self._last
        if last[0] is bag and last[1] is state:
            return last[2]
        view = MappingProxyType(self.values_in(ctx))
        if state is None or state.frame is None:  # type: ignore[attr-defined] # our State
            # Contexts are immutable, so the same (baggage, state) pair gives the same answer;
            # holding them keeps their identities from being reused.
            self._last = (bag, state, view)
        return view

    def values_in(self, ctx: Context) -> dict[str, Any]:
        """The declared fields set in ``ctx`` (with the request's late updates), by name."""
        state: State | None = ctx.get(self._key)  # type: ignore[assignment] # our own key
        bag: Any = ctx.get(rt.BAGGAGE_KEY) or EMPTY
        local = state.local if state is not None else EMPTY
        values: dict[str, Any] = {}
        for name, key in self._where.items():
            value = local.get(name, MISSING) if key is None else bag.get(key, MISSING)
            if value is not MISSING:
                values[name] = value
        if state is not None and state.frame is not None and state.frame.updates:
            for name, (value, generation) in list(state.frame.updates.items()):
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

    def scope(self, **values: Any) -> Scope:
        """A scope setting ``values`` (``None`` unsets a field): ``with``, ``async with``,
        or a decorator of sync and async functions. Nested scopes overlay and restore.

        Values are validated when the scope is entered (or when it decorates a function):
        :class:`ContextValueError` and :class:`UnknownFieldError` name the field."""
        return Scope(self, values)

    def update(self, **values: Any) -> None:
        """Change fields for the rest of the current request or scope.

        The values reach the current span and, inside a request handled by the ASGI
        middleware, its server span, its access-log line and the rest of the handler, even
        when ``update`` runs in a worker thread or under a nested span.
        """
        ctx = rt.get_current()
        new = self.derive(ctx, values)
        state: State | None = new.get(self._key)  # type: ignore[assignment] # our own key
        rt.attach(new)  # no token: the change lasts until the enclosing scope restores
        if state is not None and state.frame is not None:
            state.frame.record(
                {k: MISSING if v is None else v for k, v in values.items()}, state.generation
            )
            for span in state.frame.spans:
                stamp(self, span, values)
        stamp(self, new.get(rt.SPAN_KEY), values)

    def run(self, values: Mapping[str, Any], fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` inside a scope of ``values`` and return its result.

        With an async function the result is an awaitable that runs the whole coroutine
        inside the scope."""
        ctx = self.derive(rt.get_current(), values)
        stamp(self, ctx.get(rt.SPAN_KEY), values)
        return rt.call_in(ctx, fn, *args, **kwargs)

    def bind(self, fn: Callable[..., R]) -> Callable[..., R]:
        """Capture the current context now; the returned callable runs ``fn`` inside it
        (for threads, executors and callbacks, which do not inherit the context)."""
        return rt.bind_context(fn)

    def storage(self) -> AsyncLocalStorage[dict[str, Any]]:
        """An :class:`AsyncLocalStorage` whose store is a dict of this bridge's fields."""
        from .storage import BridgedStorage  # noqa: PLC0415 - storage imports this module

        return BridgedStorage(self)

    def derive(  # noqa: PLR0912 - the hot path of scope entry, kept as one inlined loop
        self, ctx: Context, values: Mapping[str, Any], frame: Frame | None = None
    ) -> Context:
        """A copy of ``ctx`` with ``values`` written (``None`` unsets); validates them.

        ``frame`` starts a request frame (used by the ASGI middleware)."""
        state: State | None = ctx.get(self._key)  # type: ignore[assignment] # our own key
        bag: dict[str, object] | None = None
        local: dict[str, object] | None = None
        plans = self._plans
        chars = 0  # characters written to baggage, for the cheap limits bound
        for name, value in values.items():
            plan = plans.get(name)
            if plan is None:
                raise UnknownFieldError(f"no field named {name!r}")
            key, max_length, printable_only = plan
            if value is not None:
                if value.__class__ is str and printable_only:
                    if len(value) > max_length or not value.isprintable():
                        raise ContextValueError(name, str(self.fields[name].problem(value)))
                else:
                    problem = self.fields[name].problem(value)
                    if problem is not None:
                        raise ContextValueError(name, problem)
            if key is None:
                if local is None:
                    local = dict(state.local) if state is not None else {}
                target = local
                key = name
            else:
                if bag is None:
                    old: Any = ctx.get(_BAGGAGE)
                    if old:
                        bag = dict(old)
                        chars = -1  # unknown: measure the whole bag below
                    else:
                        bag = {}
                target = bag
                if chars >= 0 and value is not None:
                    chars += len(value) + len(key) + 2
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
        unsure = bag is not None and (chars < 0 or 12 * chars > MAX_MEMBER_BYTES)
        if unsure and may_exceed_limits(bag):  # type: ignore[arg-type] # unsure => bag set
            self._check_limits(bag, values)  # type: ignore[arg-type] # unsure => bag set
        new = Context(ctx)
        if bag is not None:
            dict.__setitem__(new, _BAGGAGE, bag)
        frame = frame if frame is not None else (state.frame if state is not None else None)
        if local is not None or frame is not None:
            own = local if local is not None else (state.local if state is not None else EMPTY)
            dict.__setitem__(new, self._key, State(own, frame, next_generation()))
        return new

    def _check_limits(self, bag: Mapping[str, object], values: Mapping[str, Any]) -> None:
        written = [
            (name, str(self._where[name]))
            for name, value in values.items()
            if value is not None and self._where[name] is not None
        ]
        check_baggage_limits(bag, written)

    # -- carriers --------------------------------------------------------------------------

    def inject(self, carrier: CarrierT) -> CarrierT:
        """Write ``traceparent``/``tracestate`` and ``baggage`` into a dict-like carrier."""
        ctx = rt.get_current()
        _TRACE.inject(carrier, context=ctx)
        bag: dict[str, object] = dict(ctx.get(rt.BAGGAGE_KEY) or EMPTY)  # type: ignore[call-overload]
        for name, value in self.values_in(ctx).items():
            key = self._where[name]
            if key is not None:
                bag[key] = value
        header = format_baggage(bag)
        if header and isinstance(carrier, MutableMapping):
            carrier["baggage"] = header
        return carrier

    def extract(self, carrier: Mapping[str, Any], trusted: bool = False) -> Mapping[str, str]:
        """Validated field values from a carrier's field headers and ``baggage``. Never raises.

        A field is read when its ``inbound`` policy is ``"always"``, or ``"trusted"`` and
        ``trusted`` is True. Invalid values are dropped, counted and logged without the value.
        """
        try:
            return read_fields(self, carrier, trusted)
        except Exception:  # telemetry never throws on the request path
            _logger.exception("otel_ctxbridge: could not read a carrier; no fields taken")
            return {}

    def count_drop(self, name: str, reason: str) -> None:
        """Count an inbound value of field ``name`` that was refused; log the first one.

        Malformed or oversized ``baggage`` members are counted under ``"baggage"``."""
        with self._drop_lock:
            count = self._drops.get(name, 0) + 1
            self._drops[name] = count
        if count == 1:
            _logger.warning("otel_ctxbridge: dropped an inbound value of %r: %s", name, reason)

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
