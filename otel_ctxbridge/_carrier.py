"""Reading a bridge's fields from a carrier (HTTP headers, queue headers) by field policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .limits import parse_baggage

if TYPE_CHECKING:
    from .bridge import ContextBridge


def read_fields(bridge: ContextBridge, carrier: Mapping[str, Any], trusted: bool) -> dict[str, str]:
    """Validated field values from ``carrier``: each field's header first, then ``baggage``.

    A field is read when its ``inbound`` policy is ``"always"``, or ``"trusted"`` and
    ``trusted`` is True. Refused values are counted with ``bridge.count_drop``."""
    lowered = {str(k).lower(): v for k, v in carrier.items()}
    raw_baggage = lowered.get("baggage")
    members: dict[str, str] = {}
    if raw_baggage:
        members, dropped = parse_baggage(texts(raw_baggage))
        if dropped:
            bridge.count_drop("baggage", f"{dropped} malformed or oversized baggage members")
    found: dict[str, str] = {}
    for name, field in bridge.fields.items():
        if field.inbound == "never" or (field.inbound == "trusted" and not trusted):
            continue
        candidates: list[str] = []
        if field.header is not None and field.header in lowered:
            candidates.extend(texts(lowered[field.header]))
        if field.propagate and field.baggage_key in members:
            candidates.append(members[str(field.baggage_key)])
        for candidate in candidates:
            problem = field.problem(candidate)
            if problem is None:
                found[name] = candidate
                break
            bridge.count_drop(name, problem)
    return found


def texts(value: Any) -> list[str]:
    """A header value (str, bytes, or a list of them) as a list of str."""
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in value]
    return [str(value)]
