"""ContextSpanProcessor: the bridge's fields on every span, from the span's parent context.

Install it on the SDK ``TracerProvider`` (``configure()`` does)::

    provider.add_span_processor(ContextSpanProcessor(bridge))

Each span gets the declared fields set in its parent context as attributes (``app.request_id``
with the default prefix), redacted where a field says so. An attribute the span already has
(passed to ``start_span``) is kept. A value set *after* a span started reaches it when a scope
is entered or ``bridge.update()`` runs while it is the current span, and, inside a request
handled by the ASGI middleware, on the request's server span.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from . import _runtime as rt
from ._span_write import write_attributes
from ._state import CHANGES, EMPTY, MISSING, state_in
from .fields import attribute_value

if TYPE_CHECKING:
    from .bridge import ContextBridge
    from .fields import Field

__all__ = ["ContextSpanProcessor"]

_logger = logging.getLogger("otel_ctxbridge")
_SCALARS = (str, bool, int, float)
T = TypeVar("T")
_MEMO_SLOTS = 64


class _Entry:
    """One field as the hot paths need it."""

    __slots__ = ("attribute", "log_key", "name", "problem", "redact", "where")

    def __init__(self, field: Field) -> None:
        self.name = field.name
        # baggage key of a propagated field, None for a process-local one
        self.where = field.baggage_key if field.propagate else None
        self.attribute = str(field.attribute)
        self.log_key = str(field.log_key)
        self.redact: Callable[[str], object] | None = field.shown if field.redacted else None
        self.problem = field.problem


class FieldReader(Generic[T]):
    """Reads every declared field of a bridge from an OTel context in one pass, and caches
    what a consumer builds from them (attributes, log keys) per context.

    ``build(values, ctx)`` gets the shown value of each entry (``MISSING`` when unset). The
    values honour the request frame's late ``update()`` values like ``bridge.values_in``, and
    are redacted where a field says so; a redactor that raises hides the value (never shown
    in clear) and is logged once. Baggage values that bypassed the bridge (a raw OTel
    extract, ``baggage.set_baggage``) are validated like inbound data: an invalid one, or one
    whose validator raises, is dropped and counted (``bridge.count_drop``, logged once,
    without the value). The product is cached for the last context seen: contexts
    are immutable, so the same context gives the same product until a frame records an
    update (``CHANGES[0]`` moves); and per (baggage, state, frame updates) objects, which
    the contexts of one request's spans share.
    """

    def __init__(
        self,
        bridge: ContextBridge,
        build: Callable[[tuple[Any, ...], Context], T],
        *,
        uses_context: bool = True,
    ) -> None:
        self.bridge = bridge
        self.key: str = bridge._key  # the bridge's private State key (same package)
        self.entries: tuple[_Entry, ...] = tuple(_Entry(f) for f in bridge.fields.values())
        self._index = {e.name: i for i, e in enumerate(self.entries)}
        self._build = build
        self._uses_context = uses_context  # False: the product depends on the values only
        self._redacted = tuple(i for i, e in enumerate(self.entries) if e.redact is not None)
        self.last: tuple[object, object, Any] = (MISSING, MISSING, None)
        """``(context, CHANGES[0] then, product)``: the product is current while
        ``last[0] is ctx and last[1] is CHANGES[0]`` (consumers may check that inline)."""
        # id(baggage or State) -> (baggage, State, frame updates, values, product). The contexts
        # of one request's spans share both objects; a few slots serve concurrent requests.
        self._memo: dict[int, tuple[object, object, object, tuple[Any, ...], Any]] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def get(self, ctx: Context) -> T:
        """What ``build`` makes of the fields in ``ctx`` (cached for the last context)."""
        last = self.last
        if last[0] is ctx and last[1] is CHANGES[0]:
            return last[2]  # type: ignore[no-any-return] # built by self._build
        changes = CHANGES[0]
        bag = ctx.get(rt.BAGGAGE_KEY)
        state: Any = state_in(ctx, self.key)
        frame = state.frame if state is not None else None
        mark = frame.updates if frame is not None else None
        slot = id(bag if bag is not None else state)
        hit = self._memo.get(slot)
        if hit is not None and hit[0] is bag and hit[1] is state and hit[2] is mark:
            product = self._build(hit[3], ctx) if self._uses_context else hit[4]
        else:
            values = self._read(bag, state)
            product = self._build(values, ctx)
            if len(self._memo) >= _MEMO_SLOTS:
                self._memo.clear()
            self._memo[slot] = (bag, state, mark, values, product)
        self.last = (ctx, changes, product)  # one tuple swap: thread-safe
        return product

    def read(self, ctx: Context) -> tuple[Any, ...]:
        """The shown value of each entry in ``ctx`` (``MISSING`` when unset), in entry order."""
        return self._read(ctx.get(rt.BAGGAGE_KEY), state_in(ctx, self.key))

    def _read(self, bag: Any, state: Any) -> tuple[Any, ...]:
        bag = bag or EMPTY
        local = state.local if state is not None else EMPTY
        values: list[Any] = []
        for entry in self.entries:
            if entry.where is None:
                values.append(local.get(entry.name, MISSING))
                continue
            value = bag.get(entry.where, MISSING)
            if value is not MISSING:
                # Baggage may have been written around the bridge (a raw propagator
                # extract, baggage.set_baggage): check it like inbound data.
                problem = entry.problem(value)
                if problem is not None:
                    self.bridge.count_drop(entry.name, problem)
                    value = MISSING
            values.append(value)
        if state is not None and state.frame is not None and state.frame.updates:
            for name, (value, generation) in state.frame.updates.items():
                if generation > state.generation and name in self._index:
                    values[self._index[name]] = value
        for i in self._redacted:
            if values[i] is not MISSING:
                values[i] = self.shown(self.entries[i], values[i])
        return tuple(values)

    def shown(self, entry: _Entry, value: Any) -> Any:
        """``value`` redacted by ``entry``'s redactor; ``MISSING`` when the redactor fails."""
        try:
            return entry.redact(value) if entry.redact is not None else value
        except Exception as exc:  # a user redactor must never break telemetry nor leak
            self.warn_once(
                f"redact:{entry.name}",
                "the redactor of field %r raised %s; value hidden",
                entry.name,
                type(exc).__name__,
            )
            return MISSING

    def warn_once(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` the first time ``key`` comes up in this reader."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        _logger.warning("otel_ctxbridge: " + message, *args)


def attributes_of(entries: tuple[_Entry, ...], values: tuple[Any, ...]) -> dict[str, Any]:
    """The set values as ``attribute -> value``, only those that are attribute values (str,
    bool, int, float; an int beyond 64 bits as its text)."""
    attributes: dict[str, Any] = {}
    for entry, value in zip(entries, values, strict=True):
        if value is not MISSING:
            shown = value if value.__class__ is str else attribute_value(value)
            if shown is not None:
                attributes[entry.attribute] = shown
    return attributes


class ContextSpanProcessor(SpanProcessor):
    """Copies the bridge's declared fields onto every span as attributes when it starts.

    Values come from the parent context given to ``on_start`` (the current context when the
    span was started without one). Attribute names are the fields' ``attribute`` (the bridge's
    ``attribute_prefix`` + name by default); an attribute the span already has is never
    overwritten; redacted fields are set redacted; values that are not attribute values (a
    connection held in a process-local field) are left out, and an int beyond 64 bits is
    set as its text. Never raises into the caller.
    """

    def __init__(self, bridge: ContextBridge) -> None:
        self.bridge = bridge
        self._reader = FieldReader(bridge, self._attributes, uses_context=False)

    def _attributes(self, values: tuple[Any, ...], ctx: Context) -> dict[str, Any]:
        return attributes_of(self._reader.entries, values)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Set the fields of ``parent_context`` on ``span`` (never overwriting)."""
        try:
            attributes = self._reader.get(
                parent_context if parent_context is not None else rt.get_current()
            )
            if not attributes:
                return
            write_attributes(span, attributes, overwrite=False)  # a new span: recording
        except Exception as exc:  # telemetry never throws on the request path
            self._reader.warn_once(
                "on_start", "ContextSpanProcessor failed on a span (%s)", type(exc).__name__
            )

    def on_end(self, span: ReadableSpan) -> None:
        """Nothing to do when a span ends."""

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered: always True."""
        return True
