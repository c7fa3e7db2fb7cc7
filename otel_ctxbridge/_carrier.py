"""Carriers (HTTP headers, queue headers): a bridge's fields read by field policy, and written
with the trace context."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import CarrierT, Setter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _runtime as rt
from ._state import EMPTY
from .limits import format_baggage, parse_baggage

if TYPE_CHECKING:
    from .bridge import ContextBridge

_TRACE = TraceContextTextMapPropagator()


def write_fields(
    bridge: ContextBridge, ctx: Context, carrier: CarrierT, setter: Setter[CarrierT]
) -> None:
    """Write ``ctx``'s ``traceparent``/``tracestate`` and ``baggage`` (the propagated fields
    with the frame's late updates, over the other members) into ``carrier``."""
    _TRACE.inject(carrier, context=ctx, setter=setter)
    bag: dict[str, object] = dict(ctx.get(rt.BAGGAGE_KEY) or EMPTY)  # type: ignore[call-overload]
    values = bridge.values_in(ctx)  # with the frame's late updates, removals included
    for name, field in bridge.fields.items():
        if field.propagate:
            key = str(field.baggage_key)
            if name in values:
                bag[key] = values[name]
            else:
                bag.pop(key, None)
    header = format_baggage(bag)
    if header:
        setter.set(carrier, "baggage", header)


def read_fields(
    bridge: ContextBridge, carrier: Mapping[Any, Any] | Iterable[tuple[Any, Any]], trusted: bool
) -> dict[str, str]:
    """Validated field values from ``carrier``: each field's header first, then ``baggage``.

    A field is read when its ``inbound`` policy is ``"always"``, or ``"trusted"`` and
    ``trusted`` is True. Refused values are counted with ``bridge.count_drop``."""
    headers = header_lists(carrier)
    members: dict[str, str] = {}
    if "baggage" in headers:
        members, dropped = parse_baggage(headers["baggage"])
        if dropped:
            bridge.count_drop("baggage", f"{dropped} malformed or oversized baggage members")
    found: dict[str, str] = {}
    for name, field in bridge.fields.items():
        if field.inbound == "never" or (field.inbound == "trusted" and not trusted):
            continue
        candidates: list[str] = []
        if field.header is not None and field.header in headers:
            candidates.extend(headers[field.header])
        if field.propagate and field.baggage_key in members:
            candidates.append(members[str(field.baggage_key)])
        for candidate in candidates:
            problem = field.problem(candidate)
            if problem is None:
                found[name] = candidate
                break
            bridge.count_drop(name, problem)
    return found


def header_lists(carrier: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> dict[str, list[str]]:
    """Lower-cased header name -> its values, from a mapping or ``(name, value)`` pairs.

    Names and values may be str or bytes (latin-1, as HTTP carries them); a value may be a
    list or tuple of them (a repeated header). None values and names of other types are
    skipped."""
    items = getattr(carrier, "items", None)
    pairs: Iterable[tuple[Any, Any]] = items() if callable(items) else carrier
    headers: dict[str, list[str]] = {}
    for raw_name, value in pairs:
        if isinstance(raw_name, bytes):
            name = raw_name.decode("latin-1")
        elif isinstance(raw_name, str):
            name = raw_name
        else:
            continue
        values = texts(value)
        if values:
            headers.setdefault(name.lower(), []).extend(values)
    return headers


def texts(value: Any) -> list[str]:
    """A header value (str, bytes, or a list of them) as a list of str; None gives none."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [
            v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in value if v is not None
        ]
    return [str(value)]
