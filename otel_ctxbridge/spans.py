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
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from . import _runtime as rt
from ._state import EMPTY, MISSING, State

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["ContextSpanProcessor"]

_logger = logging.getLogger("otel_ctxbridge")
_SCALARS = (str, bool, int, float)


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


class FieldReader:
    """Reads every declared field of a bridge from an OTel context in one pass.

    The result honours the request frame's late ``update()`` values like
    ``bridge.values_in``; values come back as spans and logs show them (redacted).
    A redactor that raises hides the value (it is never shown in clear) and is logged once.
    """

    def __init__(self, bridge: ContextBridge) -> None:
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
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def read(self, ctx: Context) -> list[Any]:
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
        return values

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
        self._reader = FieldReader(bridge)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Set the fields of ``parent_context`` on ``span`` (never overwriting)."""
        try:
            reader = self._reader
            ctx = parent_context if parent_context is not None else rt.get_current()
            values = reader.read(ctx)
            attributes: dict[str, Any] = {}
            for entry, value in zip(reader.entries, values, strict=True):
                if value is not MISSING and isinstance(value, _SCALARS):
                    attributes[entry.attribute] = value
            if not attributes:
                return
            existing = span.attributes
            if existing:
                attributes = {k: v for k, v in attributes.items() if k not in existing}
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
