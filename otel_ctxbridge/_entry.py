"""A request's context where the common way does not go: values refused on the way in, and
field values a span processor copied from baggage no trust policy had seen. Used by
:class:`~otel_ctxbridge.asgi.ContextBridgeMiddleware`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context

from . import _runtime as rt
from ._derive import derive_context
from ._scope import span_attributes
from ._span_write import remove_attributes
from ._state import Frame
from .errors import ContextValueError
from .fields import attribute_value

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["derive_dropping", "forget_copied"]


def derive_dropping(
    bridge: ContextBridge,
    base: Context,
    values: dict[str, Any],
    extra: dict[str, object] | None,
    frame: Frame,
) -> Context:
    """The request context when a value would not go in: the trusted peer's extra baggage
    first, then each refused value, is dropped (counted) until the rest does."""
    for _ in range(len(values) + 2):
        try:
            return derive_context(bridge, base, values, frame)
        except ContextValueError as exc:
            bridge.count_drop(exc.field, exc.reason)
            if extra:
                extra = None
                base = rt.with_entry(base, rt.BAGGAGE_KEY, {})
            else:
                values.pop(exc.field, None)
    values.clear()  # pragma: no cover - every value dropped above
    return derive_context(bridge, base, {}, frame)  # pragma: no cover


def forget_copied(bridge: ContextBridge, span: Any, values: dict[str, Any], inbound: Any) -> None:
    """Remove from the server span the field values a span processor
    (``ContextSpanProcessor``) copied from the baggage OTel's middleware extracted as it came,
    before the trust policy saw it, where this request did not write its own: an attribute
    whose value is still the copied one (a hook's own value stays, unless it is the very value
    the baggage carried: the two cannot be told apart)."""
    written = span_attributes(bridge, values)
    copied: dict[str, object] = {}
    for field in bridge.fields.values():
        if not field.propagate:
            continue
        raw = inbound.get(str(field.baggage_key))
        attribute = str(field.attribute)
        if raw is None or attribute in written:
            continue
        try:
            shown = attribute_value(field.shown(raw))
        except Exception:  # a redactor that raises: the processor hid the value too
            continue
        if shown is not None:
            copied[attribute] = shown
    if copied:
        remove_attributes(span, copied)
