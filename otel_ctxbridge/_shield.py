"""The trace headers of an inbound request, made safe for OpenTelemetry.

:class:`TraceHeaderShield` runs *outside* OpenTelemetry's ASGI middleware. OTel extracts the
parent span from the request headers with the global propagator, which (0.66b1) answers 500
when a tracing header holds bytes that are neither UTF-8 nor a valid backslash escape, keeps the
first of duplicated ``traceparent`` headers, logs raw malformed values, and would put every
inbound ``baggage`` member into the server span's context. The shield hands OTel a copy of the
scope whose headers hold only a W3C-valid ``traceparent``/``tracestate`` pair, no ``baggage``
(nor other configured propagators' baggage headers), no shared-secret header and no header OTel
cannot decode; the original headers travel in the scope under
:data:`~otel_ctxbridge._inbound.ORIGINAL_HEADERS` and
:class:`~otel_ctxbridge.asgi.ContextBridgeMiddleware` puts them back before the application
runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ._accel import speedups
from ._foreign_baggage import baggage_prefixes, without_prefixed
from ._inbound import _BAGGAGE, ORIGINAL_HEADERS, ASGIApp, Headers, Receive, Scope, Send
from .tracecontext import parse_traceparent, parse_tracestate

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["TraceHeaderShield", "shield_headers", "trace_headers", "traceparent_ready"]

_logger = logging.getLogger("otel_ctxbridge.asgi")
_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"
_BACKSLASH = 0x5C
"""``_BACKSLASH in raw`` scans the bytes with memchr; ``b"\\" in raw`` costs 5x more on
CPython 3.11 (it first tries the needle as an int, raising and clearing a TypeError)."""
_trace_headers = speedups.trace_headers if speedups is not None else None
_traceparent_ready = speedups.traceparent_ready if speedups is not None else None


def _undecodable(raw: bytes) -> bool:
    """True when OTel's ``_decode_header_item`` would raise on ``raw``."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            raw.decode("unicode_escape")
        except UnicodeDecodeError:
            return True
    return False


def shield_headers(
    headers: Iterable[tuple[bytes, bytes]],
    hidden: frozenset[bytes] = frozenset(),
    bridge: ContextBridge | None = None,
) -> Headers:
    """The headers OpenTelemetry may see (for headers :func:`trace_headers` refused, or whose
    trace headers need a change)."""
    kept: Headers = []
    parents: list[str] = []
    states: list[str] = []
    for name, value in headers:
        lowered = name.lower()  # as OTel reads them (ASGI asks servers for lower case)
        if lowered == _TRACEPARENT:
            parents.append(value.decode("latin-1"))
        elif lowered == _TRACESTATE:
            states.append(value.decode("latin-1"))
        elif lowered == _BAGGAGE or lowered in hidden:
            continue
        elif (_BACKSLASH in value and _undecodable(value)) or (
            _BACKSLASH in name and _undecodable(name)
        ):
            continue  # OTel would answer 500 if it read this header
        else:
            kept.append((name, value))
    if parents:
        kept.extend(_trace_pair(parents, states, bridge))
    return kept


def trace_headers(
    headers: Iterable[tuple[bytes, bytes]], others: frozenset[bytes]
) -> tuple[Sequence[bytes], Sequence[bytes]] | None:
    """The ``traceparent`` and ``tracestate`` values of ``headers`` in order, or None when a
    header is named in ``others``, has a name not in lower case (OTel reads names lowered),
    or has a backslash in its name or value (OTel would try to decode it as an escape
    sequence): then the shield rewrites them."""
    if _trace_headers is not None:  # the same loop, compiled
        found: tuple[Sequence[bytes], Sequence[bytes]] | None = _trace_headers(headers, others)
        if found is not None or type(headers) in (list, tuple):
            return found
    parents: list[bytes] = []
    states: list[bytes] = []
    for name, value in headers:
        if name in others or _BACKSLASH in value or _BACKSLASH in name or name != name.lower():
            return None
        if name == _TRACEPARENT:
            parents.append(value)
        elif name == _TRACESTATE:
            states.append(value)
    return parents, states


def _traceparent_ready_in_python(raw: bytes) -> bool:
    text = raw.decode("latin-1")
    return parse_traceparent([text]) == text


traceparent_ready: Callable[[bytes], bool] = (
    _traceparent_ready if _traceparent_ready is not None else _traceparent_ready_in_python
)
"""True when the ``traceparent`` value ``raw`` is already in the normalised form the shield
would give it (:func:`~otel_ctxbridge.tracecontext.parse_traceparent` returns it unchanged):
OTel may then read it as it came. Compiled where the accelerator is built."""


def _tracestate_ready(raw: bytes) -> bool:
    state = raw.decode("latin-1")
    return parse_tracestate([state]) == state


def _trace_pair(parents: list[str], states: list[str], bridge: ContextBridge | None) -> Headers:
    parent = parse_traceparent(parents)
    if parent is None:
        if bridge is not None:
            bridge.count_drop("traceparent", "invalid or duplicated; a new trace is started")
        return []
    pair = [(_TRACEPARENT, parent.encode("ascii"))]
    state = parse_tracestate(states)
    if state is not None:
        pair.append((_TRACESTATE, state.encode("ascii")))
    elif bridge is not None and any(s.strip(" \t,") for s in states):
        bridge.count_drop("tracestate", "invalid per W3C Trace Context; discarded")
    return pair


class TraceHeaderShield:
    """ASGI middleware for *outside* OpenTelemetry's: validates ``traceparent``/``tracestate``
    per W3C Trace Context Level 1 and hides ``baggage`` (and baggage in the formats of other
    configured propagators, see :mod:`~otel_ctxbridge._foreign_baggage`), the ``hidden``
    headers (the trust secret) and undecodable headers from it (see the module
    documentation). When it changes the headers, the headers as received travel under
    :data:`ORIGINAL_HEADERS` for the
    :class:`~otel_ctxbridge.asgi.ContextBridgeMiddleware` inside, which restores them for the
    application. ``bridge`` counts refused trace headers. Lifespan and other scopes pass
    through."""

    def __init__(
        self, app: ASGIApp, bridge: ContextBridge | None = None, hidden: Iterable[str] = ()
    ) -> None:
        self.app = app
        self._bridge = bridge
        self._hidden = frozenset(h.lower().encode("latin-1") for h in hidden)
        self._rewrite = frozenset((_BAGGAGE,)) | self._hidden  # always hidden from OTel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the wrapped app with a scope whose tracing headers are safe for OTel."""
        kind = scope["type"]
        if kind != "http" and kind != "websocket":  # noqa: PLR1714 - the fast comparison
            return await self.app(scope, receive, send)
        headers = scope.get("headers")
        if not headers:
            return await self.app(scope, receive, send)
        try:
            shown = without_prefixed(headers, baggage_prefixes())  # Jaeger's, OT's baggage
        except Exception:  # header names of another type: hide all rather than check them
            shown = []
        found = trace_headers(headers, self._rewrite) if shown is None else None
        if found is not None:  # nothing to hide: may OTel read the trace headers as they came?
            parents, states = found
            if not parents:
                if not states:  # the commonest case (a tracestate alone is dropped below)
                    return await self.app(scope, receive, send)
            elif (  # a single pair already in the normalised form the shield would give it
                len(parents) == 1
                and len(states) <= 1
                and traceparent_ready(parents[0])
                and (not states or _tracestate_ready(states[0]))
            ):
                return await self.app(scope, receive, send)
        try:
            cleaned = shield_headers(
                headers if shown is None else shown, self._hidden, self._bridge
            )
        except Exception:  # telemetry never throws on the request path
            _logger.exception("otel_ctxbridge: could not check the trace headers; hiding them")
            cleaned = []
        inner = dict(scope)
        inner["headers"] = cleaned
        inner[ORIGINAL_HEADERS] = headers
        return await self.app(inner, receive, send)
