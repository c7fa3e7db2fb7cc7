"""What an inbound request says: its trace headers, made safe for OpenTelemetry, and the
context fields it may set under the field policies and the :class:`TrustPolicy`.

:class:`TraceHeaderShield` runs *outside* OpenTelemetry's ASGI middleware. OTel extracts the
parent span from the request headers with the global propagator, which (0.66b1) answers 500
when a tracing header holds bytes that are neither UTF-8 nor a valid backslash escape, keeps the
first of duplicated ``traceparent`` headers, logs raw malformed values, and would put every
inbound ``baggage`` member into the server span's context. The shield hands OTel a copy of the
scope whose headers hold only a W3C-valid ``traceparent``/``tracestate`` pair, no ``baggage``,
no shared-secret header and no header OTel cannot decode; the original headers travel in the
scope under :data:`ORIGINAL_HEADERS` and :class:`~otel_ctxbridge.asgi.ContextBridgeMiddleware`
puts them back before the application runs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from ._accel import speedups
from ._foreign_baggage import baggage_prefixes, without_prefixed
from .fields import REQUEST_ID_PATTERN, Field
from .limits import parse_baggage
from .tracecontext import parse_traceparent, parse_tracestate

if TYPE_CHECKING:
    from .bridge import ContextBridge
    from .trust import TrustPolicy

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

ORIGINAL_HEADERS = "otel_ctxbridge.original_headers"
"""Scope key under which the shield passes the headers as received to the inner middleware."""
UNTRUSTED_HEADERS = "otel_ctxbridge.untrusted_headers"
"""Scope key under which :class:`InboundReader` names the headers an untrusted peer sent but may
not set (``baggage``, the headers of ``inbound="trusted"`` fields): removed before the app."""

_logger = logging.getLogger("otel_ctxbridge.asgi")
_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"
_BAGGAGE = b"baggage"
_BACKSLASH = 0x5C
"""``_BACKSLASH in raw`` scans the bytes with memchr; ``b"\\" in raw`` costs 5x more on
CPython 3.11 (it first tries the needle as an int, raising and clearing a TypeError)."""
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_collect_headers = speedups.collect_headers if speedups is not None else None
_trace_headers = speedups.trace_headers if speedups is not None else None
_traceparent_ready = speedups.traceparent_ready if speedups is not None else None
_request_id_ready = speedups.request_id_ready if speedups is not None else None


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
        shown = without_prefixed(headers, baggage_prefixes())  # Jaeger's, OT's baggage headers
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


class InboundReader:
    """Reads the declared fields a request may set, per field policy and trust policy."""

    def __init__(self, bridge: ContextBridge, trust: TrustPolicy, request_id_field: str) -> None:
        self.bridge = bridge
        self.trust = trust
        self._secret = trust.secret_header.encode("latin-1") if trust.has_secret else None
        self._readers: list[tuple[str, Field, bytes | None, str | None]] = []
        self._declared: set[str] = set()
        wanted: set[bytes] = {_BAGGAGE}
        for name, field in bridge.fields.items():
            # Members named like a declared field (process-local ones too) are never forwarded
            # as they came: a field's value is whatever this service accepted for it.
            self._declared.update((name, str(field.baggage_key)))
            if field.inbound == "never":
                continue
            header = field.header.encode("latin-1") if field.header else None
            if header is not None:
                wanted.add(header)
            key = str(field.baggage_key) if field.propagate else None
            self._readers.append((name, field, header, key))
        if self._secret is not None:
            wanted.add(self._secret)
        self._wanted = frozenset(wanted)
        self.restricted = frozenset(
            {_BAGGAGE}
            | {h for _, f, h, _ in self._readers if f.inbound == "trusted" and h is not None}
        )
        """The headers only a trusted peer may send (``baggage``, the headers of
        ``inbound="trusted"`` fields): hidden from the application (and from any middleware
        inside, which could extract them) when an untrusted one sends them."""
        rid = bridge.fields.get(request_id_field)
        # A request id goes back out in a response header: without a validator of its own,
        # hold it to the safe-token pattern (no spaces, no control characters, <= 128).
        self._rid_strict = request_id_field if rid is not None and rid.validator is None else None

    def read(self, scope: Scope) -> tuple[dict[str, str], dict[str, object] | None]:
        """``(field values, extra baggage)``: the valid values this request may set, and for a
        trusted peer the valid undeclared baggage members to forward downstream."""
        headers = scope.get(ORIGINAL_HEADERS) or scope.get("headers") or ()
        found = _collect_headers(headers, self._wanted) if _collect_headers is not None else None
        if found is NotImplemented or _collect_headers is None:  # the same loop, in Python
            found = None
            for name, value in headers:
                if name in self._wanted:
                    if found is None:
                        found = {}
                    found.setdefault(name, []).append(value)
        if found is None:
            return {}, None
        return self._values(scope, found)

    def _values(
        self, scope: Scope, found: dict[bytes, list[bytes]]
    ) -> tuple[dict[str, str], dict[str, object] | None]:
        raw_baggage = found.get(_BAGGAGE)
        members = self._members(raw_baggage) if raw_baggage else _NO_MEMBERS
        trusted: bool | None = None
        values: dict[str, str] = {}
        for name, field, header, key in self._readers:
            raws = found.get(header) if header is not None else None
            member = members.get(key) if key is not None else None
            if raws is None and member is None:
                continue
            if field.inbound == "trusted":
                if trusted is None:
                    trusted = self._trusted(scope, found)
                if not trusted:
                    continue
            if (
                raws is not None
                and len(raws) == 1
                and member is None
                and name == self._rid_strict
                and _request_id_ready is not None
            ):  # the commonest inbound value: a request id from its header alone
                ready = _request_id_ready(raws[0], field.max_length)
                if ready is not None:  # a safe token: valid (else the checks below say why)
                    values[name] = ready
                    continue
            candidates: list[str | None] = [_utf8(v) for v in raws] if raws else []
            if member is not None:
                candidates.append(member)
            value = self._first_valid(name, field, candidates)
            if value is not None:
                values[name] = value
        return values, self._forwarded(scope, found, members, trusted)

    def _forwarded(
        self,
        scope: Scope,
        found: dict[bytes, list[bytes]],
        members: dict[str, str],
        trusted: bool | None,
    ) -> dict[str, object] | None:
        """A trusted peer's undeclared baggage members (to forward downstream); from an
        untrusted one, the headers it may not set are named under :data:`UNTRUSTED_HEADERS`."""
        if trusted is None:
            if self.restricted.isdisjoint(found):
                return None
            trusted = self._trusted(scope, found)
        if not trusted:
            scope[UNTRUSTED_HEADERS] = self.restricted.intersection(found)
            return None
        return {k: v for k, v in members.items() if k not in self._declared} if members else None

    def _members(self, raw: list[bytes]) -> dict[str, str]:
        texts = [_utf8(v) for v in raw]
        members, dropped = parse_baggage([t for t in texts if t is not None])
        if dropped or None in texts:
            self.bridge.count_drop(
                "baggage", "baggage members dropped: malformed, or past 180 members or 8192 bytes"
            )
        return members

    def _first_valid(self, name: str, field: Field, candidates: list[str | None]) -> str | None:
        for candidate in candidates:
            if candidate is None:
                problem: str | None = "not UTF-8"
            else:
                problem = field.problem(candidate)
                if (
                    problem is None
                    and name == self._rid_strict
                    and not _REQUEST_ID.fullmatch(candidate)
                ):
                    problem = "not a safe request-id token"
            if problem is None:
                return candidate
            self.bridge.count_drop(name, problem)
        return None

    def _trusted(self, scope: Scope, found: dict[bytes, list[bytes]]) -> bool:
        trust = self.trust
        client = scope.get("client")
        if client and trust.trusts_address(client[0]):
            return True
        if self._secret is not None:
            secrets = found.get(self._secret) or []
            return len(secrets) == 1 and trust.trusts_secret(secrets[0])
        return False


_NO_MEMBERS: dict[str, str] = {}
"""The baggage members of a request without ``baggage`` (shared: never written to)."""


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
