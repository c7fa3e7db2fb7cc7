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

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from . import _runtime as rt
from ._state import EMPTY, MISSING, Frame, State

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["ContextSpanProcessor"]

_logger = logging.getLogger("otel_ctxbridge")
_SCALARS = (str, bool, int, float)
T = TypeVar("T")


class _Entry:
    """One field as the hot paths need it."""

    __slots__ = ("attribute", "log_key", "name", "redact", "where")

    def __init__(
        self,
        name: str,
        where: str | None,
        attribute: str,
        log_key: str,
        redact: Callable[[str], object] | None,
    ) -> None:
        self.name = name
        self.where = where  # baggage key of a propagated field, None for a process-local one
        self.attribute = attribute
        self.log_key = log_key
        self.redact = redact


def _mark(frame: Frame) -> object:
    # Frame.record stores a new (value, generation) tuple on every update.
    return tuple(frame.updates.values()) if frame.updates else None


class FieldReader(Generic[T]):
    """Reads every declared field of a bridge from an OTel context in one pass, and caches
    what a consumer builds from them (attributes, log keys) per context.

    ``build(values, ctx)`` gets the shown value of each entry (``MISSING`` when unset). The
    values honour the request frame's late ``update()`` values like ``bridge.values_in``, and
    are redacted where a field says so; a redactor that raises hides the value (never shown
    in clear) and is logged once. The product is cached for the last context seen: contexts
    are immutable, so the same context gives the same product until its request frame
    records an update, which the cache key includes.
    """

    def __init__(self, bridge: ContextBridge, build: Callable[[tuple[Any, ...], Context], T]):
        self.bridge = bridge
        self.key: str = bridge._key  # the bridge's private State key (same package)
        self.entries: tuple[_Entry, ...] = tuple(
            _Entry(
                f.name,
                f.baggage_key if f.propagate else None,
                str(f.attribute),
                str(f.log_key),
                f.shown if f.redacted else None,
            )
            for f in bridge.fields.values()
        )
        self._index = {e.name: i for i, e in enumerate(self.entries)}
        self._build = build
        self.last: tuple[object, Frame | None, object, Any] = (MISSING, None, None, None)
        """``(context, its request frame, the frame's updates then, product)``: a context
        without a frame always gives the same product (consumers may check that inline)."""
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def get(self, ctx: Context) -> T:
        """What ``build`` makes of the fields in ``ctx`` (cached for the last context)."""
        last = self.last
        if last[0] is ctx:
            frame = last[1]
            if frame is None or _mark(frame) == last[2]:
                return last[3]  # type: ignore[no-any-return] # built by self._build
        state: Any = ctx.get(self.key)
        frame = state.frame if state is not None else None
        mark = _mark(frame) if frame is not None else None
        product = self._build(self.read(ctx), ctx)
        self.last = (ctx, frame, mark, product)  # one tuple swap: safe across threads
        return product

    def read(self, ctx: Context) -> tuple[Any, ...]:
        """The shown value of each entry in ``ctx`` (``MISSING`` when unset), in entry order."""
        bag: Any = ctx.get(rt.BAGGAGE_KEY) or EMPTY
        state: State | None = ctx.get(self.key)  # type: ignore[assignment] # our own key
        local = state.local if state is not None else EMPTY
        values = [
            bag.get(e.where, MISSING) if e.where is not None else local.get(e.name, MISSING)
            for e in self.entries
        ]
        if state is not None and state.frame is not None and state.frame.updates:
            for name, (value, generation) in list(state.frame.updates.items()):
                if generation > state.generation and name in self._index:
                    values[self._index[name]] = value
        for i, entry in enumerate(self.entries):
            if entry.redact is not None and values[i] is not MISSING:
                values[i] = self.shown(entry, values[i])
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


class ContextSpanProcessor(SpanProcessor):
    """Copies the bridge's declared fields onto every span as attributes when it starts.

    Values come from the parent context given to ``on_start`` (the current context when the
    span was started without one). Attribute names are the fields' ``attribute`` (the bridge's
    ``attribute_prefix`` + name by default); an attribute the span already has is never
    overwritten; redacted fields are set redacted. Never raises into the caller.
    """

    def __init__(self, bridge: ContextBridge) -> None:
        self.bridge = bridge
        self._reader = FieldReader(bridge, self._attributes)

    def _attributes(self, values: tuple[Any, ...], ctx: Context) -> dict[str, Any]:
        return {
            entry.attribute: value
            for entry, value in zip(self._reader.entries, values, strict=True)
            if value is not MISSING and isinstance(value, _SCALARS)
        }

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Set the fields of ``parent_context`` on ``span`` (never overwriting)."""
        try:
            attributes = self._reader.get(
                parent_context if parent_context is not None else rt.get_current()
            )
            if not attributes:
                return
            # Fast path. In on_start the span is not yet visible to any other code, and the
            # values were validated when written (scalars, at most max_length characters), so
            # they go straight into the SDK's attribute store when it has the expected shape
            # and no limit could apply; anything else takes the public, validating path.
            store: Any = getattr(span, "_attributes", None)
            if (
                type(store) is BoundedAttributes
                and store.max_value_len is None
                and (store.maxlen is None or len(store) + len(attributes) <= store.maxlen)
            ):
                existing = store._dict
                if existing:
                    for key, value in attributes.items():
                        if key not in existing:
                            existing[key] = value
                else:
                    existing.update(attributes)
                return
            present = span.attributes
            if present:
                attributes = {k: v for k, v in attributes.items() if k not in present}
            if attributes:
                span.set_attributes(attributes)
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
