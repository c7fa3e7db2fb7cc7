"""Baggage in formats other than W3C ``baggage``: the header-name prefixes the global
propagator reads baggage from (Jaeger's ``uberctx-``, OpenTracing's ``ot-baggage-``).

The bridge reads fields only from W3C ``baggage``, under its trust policy. Headers in those
other formats are therefore hidden from OpenTelemetry's ASGI middleware (which would extract
their values, unchecked, into the server span's context) and, from untrusted peers, from the
application (and any middleware inside that could extract them). Only propagators known here
are recognised: a custom propagator reading baggage from other headers is not.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import propagate

__all__ = ["baggage_prefixes", "without_prefixed"]

_PREFIX_BY_TYPE = {"JaegerPropagator": b"uberctx-", "OTTracePropagator": b"ot-baggage-"}
_cache: tuple[object, tuple[bytes, ...]] = (None, ())


def baggage_prefixes() -> tuple[bytes, ...]:
    """The header-name prefixes (lower case) the global propagator reads baggage from besides
    W3C ``baggage``; empty for the default propagators. Worked out once per global textmap."""
    global _cache  # noqa: PLW0603 - a cache keyed by the global textmap's identity
    textmap = propagate.get_global_textmap()
    cached = _cache
    if cached[0] is textmap:
        return cached[1]
    found = {_prefix_of(member) for member in _members(textmap, 0)}
    prefixes = tuple(sorted(p for p in found if p is not None))
    _cache = (textmap, prefixes)
    return prefixes


def without_prefixed(
    headers: Iterable[tuple[bytes, bytes]], prefixes: tuple[bytes, ...]
) -> list[tuple[bytes, bytes]] | None:
    """``headers`` without those whose (lower-cased) name starts with one of ``prefixes``, or
    None when there is none of them."""
    if not prefixes:
        return None
    headers = list(headers)
    kept = [(n, v) for n, v in headers if not n.lower().startswith(prefixes)]
    return kept if len(kept) != len(headers) else None


def _members(textmap: object, depth: int) -> list[object]:
    # A CompositePropagator keeps its members in ``_propagators`` (its constructor argument).
    inner = getattr(textmap, "_propagators", None)
    if isinstance(inner, (list, tuple)) and depth < 8:
        return [m for p in inner for m in _members(p, depth + 1)]
    return [textmap]


def _prefix_of(propagator: object) -> bytes | None:
    prefix = getattr(type(propagator), "BAGGAGE_PREFIX", None)  # Jaeger's, as a class attribute
    if isinstance(prefix, str) and prefix:
        return prefix.lower().encode("latin-1")
    for cls in type(propagator).__mro__:  # subclasses of the known propagators too
        known = _PREFIX_BY_TYPE.get(cls.__name__)
        if known is not None:
            return known
    return None
