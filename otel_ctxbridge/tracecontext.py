"""Inbound ``traceparent`` / ``tracestate`` validation as W3C Trace Context Level 1 says.

OpenTelemetry Python's propagator reads only the first of duplicated ``traceparent`` headers,
logs raw header values when they are malformed, and (in the ASGI middleware) fails on bytes
that are not UTF-8. These functions decide what a request's trace headers mean before OTel
sees them: a header pair that is valid comes back normalised, anything else comes back as
None (start a new trace, drop ``tracestate``).

- ``traceparent``: exactly one header field; surrounding spaces and tabs are ignored;
  ``version`` two lower-case hex digits, never ``ff``; version ``00`` is exactly
  ``00-<32 hex>-<16 hex>-<2 hex>``; a higher version is read leniently (its first 55
  characters in the version-00 format, then only ``-`` and more); all-zero trace or parent ids
  are invalid.
- ``tracestate``: read only with a valid ``traceparent``; multiple header fields are combined
  in order; empty members are skipped; at most 32 members; each member ``key=value`` in the
  specification's grammar; a duplicated key, a malformed member or too many members discard
  the whole ``tracestate``. Past 512 characters members longer than 128 characters are
  removed first, then members from the end, as the specification recommends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "MAX_TRACESTATE_MEMBERS",
    "TRACESTATE_PROPAGATED_CHARS",
    "parse_traceparent",
    "parse_tracestate",
]

MAX_TRACESTATE_MEMBERS = 32
"""List members a valid ``tracestate`` may hold."""
TRACESTATE_PROPAGATED_CHARS = 512
"""Characters of ``tracestate`` propagated; longer ones are truncated by whole members."""
_MAX_INPUT_CHARS = 8192  # longer inputs are refused before parsing
_LONG_MEMBER = 128

_OWS = " \t"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_KEY = re.compile(
    r"[a-z][_0-9a-z\-*/]{0,255}"
    r"|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
)
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


def parse_traceparent(values: Sequence[str]) -> str | None:
    """The normalised ``traceparent`` (``00-<trace>-<parent>-<flags>``) of a request whose
    ``traceparent`` header fields are ``values``, or None when it has none or it is invalid."""
    if len(values) != 1:
        return None  # absent, or duplicated: the specification makes duplicates invalid
    value = values[0].strip(_OWS)
    version = value[:2]
    if version == "00":
        valid_length = len(value) == 55
    else:  # a future version: its first 55 characters, then only "-" and more
        valid_length = version != "ff" and (len(value) == 55 or value[55:56] == "-")
    match = _TRACEPARENT.fullmatch(value, 0, 55) if valid_length else None
    if match is None:
        return None
    _, trace_id, span_id, flags = match.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def parse_tracestate(values: Sequence[str]) -> str | None:
    """The normalised ``tracestate`` of header fields ``values`` (combined in order), or None
    when there is nothing to propagate or it is invalid. Call it only for a valid
    ``traceparent``: without one, ``tracestate`` is discarded."""
    if not values:
        return None
    if sum(len(v) + 1 for v in values) > _MAX_INPUT_CHARS:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for header in values:
        for raw in header.split(","):
            member = raw.strip(_OWS)
            if not member:
                continue
            key, sep, value = member.partition("=")
            if (
                not sep
                or _KEY.fullmatch(key) is None
                or _VALUE.fullmatch(value) is None
                or key in keys
            ):
                return None
            keys.add(key)
            members.append(member)
            if len(members) > MAX_TRACESTATE_MEMBERS:
                return None
    if not members:
        return None
    return _truncate(members)


def _truncate(members: list[str]) -> str | None:
    header = ",".join(members)
    if len(header) <= TRACESTATE_PROPAGATED_CHARS:
        return header
    kept = list(members)
    # First drop members longer than 128 characters, from the end; then members from the end.
    for index in range(len(kept) - 1, -1, -1):
        if len(",".join(kept)) <= TRACESTATE_PROPAGATED_CHARS:
            break
        if len(kept[index]) > _LONG_MEMBER:
            del kept[index]
    while kept and len(",".join(kept)) > TRACESTATE_PROPAGATED_CHARS:
        kept.pop()
    return ",".join(kept) or None
