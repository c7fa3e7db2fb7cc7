"""W3C Baggage encoding, parsing and the size limits OpenTelemetry enforces on injection.

OpenTelemetry Python encodes values with ``quote_plus`` (a space becomes ``+``) and keeps
``;property`` metadata as part of an extracted value. This module does what the W3C Baggage
specification says: properties are metadata, ``+`` is a literal plus, values are percent-decoded
UTF-8, and outbound values are percent-encoded so that both a W3C parser and OpenTelemetry
Python read them back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "encode_value",
    "encoded_member_size",
    "format_baggage",
    "is_valid_key",
    "parse_baggage",
]

MAX_MEMBERS = 180
"""List members OpenTelemetry keeps in one ``baggage`` header."""
MAX_MEMBER_BYTES = 4096
"""Bytes of one encoded ``key=value`` member."""
MAX_HEADER_BYTES = 8192
"""Bytes of the whole ``baggage`` header."""

# RFC 7230 token: the W3C baggage key grammar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# baggage-octet per W3C, plus "%" which introduces an escape.
_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
# Characters left as they are when encoding: baggage-octets minus "%" (escape) and "+"
# (OpenTelemetry Python decodes "+" as a space).
_SAFE = "!#$&'()*-./:<=>?@[]^_`{|}~"
_OWS = " \t"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def is_valid_key(key: str) -> bool:
    """Return True when ``key`` is a valid W3C baggage key (an RFC 7230 token)."""
    return _TOKEN.fullmatch(key) is not None


def encode_value(value: str) -> str:
    """Percent-encode a baggage value (UTF-8; a space as ``%20``, ``+`` as ``%2B``)."""
    return quote(value, safe=_SAFE)


def format_baggage(entries: Mapping[str, object]) -> str:
    """Format a ``baggage`` header; members with invalid keys or past the limits are left out."""
    parts: list[str] = []
    total = 0
    for key, value in entries.items():
        if not is_valid_key(key):
            continue
        member = f"{key}={encode_value(str(value))}"
        size = len(member)
        if size > MAX_MEMBER_BYTES:
            continue
        if len(parts) >= MAX_MEMBERS or total + size + (1 if parts else 0) > MAX_HEADER_BYTES:
            break
        total += size + (1 if parts else 0)
        parts.append(member)
    return ",".join(parts)


def parse_baggage(headers: str | Iterable[str]) -> tuple[dict[str, str], int]:
    """Parse one or more ``baggage`` header values as W3C Baggage says.

    Returns the decoded members (key -> value, the last occurrence of a key wins) and how many
    members were dropped as malformed or past the limits. Never raises.
    """
    values = [headers] if isinstance(headers, str) else list(headers)
    result: dict[str, str] = {}
    dropped = 0
    total = 0
    for header in values:
        for raw in header.split(","):
            member = raw.strip(_OWS)
            if not member:
                continue
            total += len(member.encode("utf-8", "surrogateescape")) + (1 if total else 0)
            if (
                len(result) >= MAX_MEMBERS
                or len(member) > MAX_MEMBER_BYTES
                or total > MAX_HEADER_BYTES
            ):
                dropped += 1
                continue
            decoded = _parse_member(member)
            if decoded is None:
                dropped += 1
                continue
            result[decoded[0]] = decoded[1]
    return result, dropped


def _parse_member(member: str) -> tuple[str, str] | None:
    pair, _, properties = member.partition(";")
    key, sep, value = pair.partition("=")
    key = key.strip(_OWS)
    value = value.strip(_OWS)
    if not sep or not _TOKEN.fullmatch(key) or not _VALUE.fullmatch(value):
        return None
    if properties and not all(_valid_property(p) for p in properties.split(";")):
        return None
    if _BAD_ESCAPE.search(value):
        return None
    try:
        return key, unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _valid_property(prop: str) -> bool:
    key, sep, value = prop.partition("=")
    key = key.strip(_OWS)
    if not _TOKEN.fullmatch(key):
        return False
    return not sep or _VALUE.fullmatch(value.strip(_OWS)) is not None


def encoded_member_size(key: str, value: str) -> int:
    """Bytes of ``key=value`` once encoded for the ``baggage`` header."""
    return len(key) + 1 + len(encode_value(value))
