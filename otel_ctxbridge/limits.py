"""W3C Baggage encoding, parsing and the size limits OpenTelemetry enforces on injection.

OpenTelemetry Python encodes values with ``quote_plus`` (a space becomes ``+``) and keeps
``;property`` metadata as part of an extracted value. This module does what the W3C Baggage
specification says: properties are metadata, ``+`` is a literal plus, values are percent-decoded
UTF-8, and outbound values are percent-encoded so that both a W3C parser and OpenTelemetry
Python read them back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple
from urllib.parse import quote, quote_plus, unquote_to_bytes

from .errors import ContextValueError

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "BaggageEntry",
    "check_baggage_limits",
    "check_written",
    "encode_value",
    "encoded_member_size",
    "format_baggage",
    "format_baggage_entries",
    "is_valid_key",
    "may_exceed_limits",
    "parse_baggage",
    "parse_baggage_entries",
]

MAX_MEMBERS = 180
"""List members OpenTelemetry keeps in one ``baggage`` header."""
MAX_MEMBER_BYTES = 4096
"""Bytes of one encoded ``key=value`` member OpenTelemetry Python keeps (on extract and inject).

Writes are held to it so that OTel-based services downstream keep the value; the parser and
formatter here accept longer members, as W3C Baggage requires (8192 bytes in all)."""
MAX_HEADER_BYTES = 8192
"""Bytes of the whole ``baggage`` header."""

# RFC 7230 token: the W3C baggage key grammar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# baggage-octet per W3C, plus "%" which introduces an escape.
_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
# Characters left as they are when encoding, besides letters, digits and "_.-~": what the W3C
# Baggage reference implementation (urllib.parse.quote) leaves; "+" is escaped (OpenTelemetry
# Python decodes it as a space), and so is every other baggage-octet.
_SAFE = "/"
_OWS = " \t"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def is_valid_key(key: str) -> bool:
    """Return True when ``key`` is a valid W3C baggage key (an RFC 7230 token)."""
    return _TOKEN.fullmatch(key) is not None


def encode_value(value: str) -> str:
    """Percent-encode a baggage value as the W3C reference implementation does (UTF-8; a
    space as ``%20``, ``+`` as ``%2B``; only letters, digits and ``_.-~/`` as they are)."""
    return quote(value, safe=_SAFE)


def _otel_size(text: str) -> int:
    """Bytes of ``text`` as OpenTelemetry Python's baggage propagator encodes it
    (``quote_plus``: ``/`` escaped too, a space as ``+``)."""
    return len(quote_plus(text))


class BaggageEntry(NamedTuple):
    """One W3C baggage list-member: key, decoded value and its properties (metadata)."""

    key: str
    value: str
    properties: tuple[tuple[str, str | None], ...] = ()


def format_baggage(entries: Mapping[str, object]) -> str:
    """Format a ``baggage`` header from key -> value; see :func:`format_baggage_entries`."""
    return format_baggage_entries(BaggageEntry(k, str(v)) for k, v in entries.items())


def format_baggage_entries(entries: Iterable[BaggageEntry]) -> str:
    """Format a ``baggage`` header: values percent-encoded, properties kept.

    Members with invalid keys are left out; members past 180 or past 8192 bytes in all are
    left out too (W3C requires at least 64 members and 8192 bytes to be propagated)."""
    parts: list[str] = []
    total = 0
    for entry in entries:
        if not is_valid_key(entry.key):
            continue
        member = f"{entry.key}={encode_value(entry.value)}"
        for prop_key, prop_value in entry.properties:
            if not is_valid_key(prop_key):
                continue
            member += (
                f";{prop_key}" if prop_value is None else f";{prop_key}={encode_value(prop_value)}"
            )
        size = len(member) + (1 if parts else 0)
        if len(parts) >= MAX_MEMBERS or total + size > MAX_HEADER_BYTES:
            continue
        total += size
        parts.append(member)
    return ",".join(parts)


def parse_baggage(headers: str | Iterable[str]) -> tuple[dict[str, str], int]:
    """Parse ``baggage`` header values into key -> value (the last of a repeated key wins).

    Returns the members and how many were dropped; see :func:`parse_baggage_entries`."""
    entries, dropped = parse_baggage_entries(headers)
    return {entry.key: entry.value for entry in entries}, dropped


def parse_baggage_entries(headers: str | Iterable[str]) -> tuple[list[BaggageEntry], int]:
    """Parse one or more ``baggage`` header values as W3C Baggage says. Never raises.

    Optional whitespace is trimmed; values and property values are percent-decoded UTF-8
    (escaped bytes that are not UTF-8 become U+FFFD, as the specification requires); ``+``
    stays a plus. A malformed member is dropped without losing the others; so are members
    past 180, or past 8192 bytes of header in all. Returns the entries in order and how many
    members were dropped."""
    values = [headers] if isinstance(headers, str) else list(headers)
    entries: list[BaggageEntry] = []
    dropped = 0
    total = 0
    for header in values:
        for raw in header.split(","):
            member = raw.strip(_OWS)
            if not member:
                continue
            size = len(member.encode("utf-8", "surrogateescape")) + (1 if total else 0)
            if len(entries) >= MAX_MEMBERS or total + size > MAX_HEADER_BYTES:
                dropped += 1
                continue
            entry = _parse_member(member)
            if entry is None:
                dropped += 1
                continue
            total += size
            entries.append(entry)
    return entries, dropped


def _decode(value: str) -> str | None:
    if not _VALUE.fullmatch(value) or _BAD_ESCAPE.search(value):
        return None  # a raw "%" (it MUST be sent as %25): not in the format, dropped
    # Escapes that are not UTF-8 become U+FFFD, as W3C Baggage requires (the member is kept).
    return unquote_to_bytes(value).decode("utf-8", "replace")


def _parse_member(member: str) -> BaggageEntry | None:
    pair, *raw_properties = member.split(";")
    key, sep, raw_value = pair.partition("=")
    key = key.strip(_OWS)
    value = _decode(raw_value.strip(_OWS))
    if not sep or not _TOKEN.fullmatch(key) or value is None:
        return None
    properties: list[tuple[str, str | None]] = []
    for prop in raw_properties:
        prop_key, prop_sep, prop_raw = prop.partition("=")
        prop_key = prop_key.strip(_OWS)
        if not _TOKEN.fullmatch(prop_key):
            return None
        prop_value = _decode(prop_raw.strip(_OWS)) if prop_sep else None
        if prop_sep and prop_value is None:
            return None
        properties.append((prop_key, prop_value))
    return BaggageEntry(key, value, tuple(properties))


def _size_bound(text: str) -> int:
    """An upper bound of the bytes of ``text`` encoded by either propagator: an ASCII
    character encodes to at most 3 bytes (%XX), any other to 12 (4 UTF-8 bytes)."""
    return len(text) * (3 if text.isascii() else 12)


def encoded_member_size(key: str, value: str) -> int:
    """Bytes of ``key=value`` once encoded for the ``baggage`` header, by this library's
    propagator or by OpenTelemetry Python's (the larger: a service may use either)."""
    return 1 + max(len(key) + len(encode_value(value)), _otel_size(key) + _otel_size(value))


def may_exceed_limits(bag: Mapping[str, object]) -> bool:
    """False when ``bag`` surely fits OTel's baggage limits (a cheap bound), else True."""
    if len(bag) > MAX_MEMBERS:
        return True
    try:
        chars = sum(map(len, bag.values()))  # type: ignore[arg-type] # TypeError handled
        # Keys too: baggage extracted by other code may have any (OTel decodes %XX in keys).
        chars += sum(map(len, bag))
    except TypeError:  # a non-str value put in baggage by other code
        return True
    # A character encodes to at most 12 bytes (4 UTF-8 bytes, each as %XX).
    return 12 * chars + 2 * len(bag) > MAX_MEMBER_BYTES


def check_baggage_limits(bag: Mapping[str, object], written: Sequence[tuple[str, str]]) -> None:
    """Raise :class:`ContextValueError` when ``bag`` breaks a limit OTel enforces on inject.

    ``written`` lists the (field name, baggage key) pairs just written: the error names the
    first one (or the one whose member is too long)."""
    if not written:
        return
    first = written[0][0]
    if len(bag) > MAX_MEMBERS:
        raise ContextValueError(
            first,
            f"baggage would exceed {MAX_MEMBERS} members ({len(bag)}, {len(written)} of them "
            "written here)",
        )
    for name, key in written:
        text = str(bag[key])
        if _size_bound(key) + 1 + _size_bound(text) <= MAX_MEMBER_BYTES:  # surely fits
            continue
        if encoded_member_size(key, text) > MAX_MEMBER_BYTES:
            raise ContextValueError(name, f"encoded baggage member over {MAX_MEMBER_BYTES} B")
    bound = 0
    for key, value in bag.items():
        text = value if isinstance(value, str) else str(value)
        bound += _size_bound(str(key)) + 2 + _size_bound(text)
    if bound <= MAX_HEADER_BYTES:
        return
    pairs = [(str(k), str(v)) for k, v in bag.items()]
    ours = sum(len(k) + 1 + len(encode_value(v)) for k, v in pairs)
    otel = sum(_otel_size(k) + 1 + _otel_size(v) for k, v in pairs)
    exact = len(pairs) - 1 + max(ours, otel)  # the header as either propagator writes it
    if exact > MAX_HEADER_BYTES:
        # Name the largest value written here: the likeliest one to shorten.
        largest = max(written, key=lambda nk: encoded_member_size(nk[1], str(bag[nk[1]])))[0]
        raise ContextValueError(
            largest,
            f"baggage header would exceed {MAX_HEADER_BYTES} B ({exact} B; this field's value "
            "is the largest written here)",
        )


def check_written(
    bag: Mapping[str, object], values: Mapping[str, object], keys: Mapping[str, str | None]
) -> None:
    """:func:`check_baggage_limits` for ``values`` just written into ``bag``; ``keys`` maps a
    field name to its baggage key (None for a process-local field, which is not checked)."""
    written = [
        (name, str(keys[name]))
        for name, value in values.items()
        if value is not None and keys[name] is not None
    ]
    check_baggage_limits(bag, written)
