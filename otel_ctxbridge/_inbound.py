"""What an inbound request may set: the context fields it carries (its field headers and W3C
``baggage``) under the field policies and the :class:`TrustPolicy`, and the ASGI types and
scope keys the middlewares share. The trace headers are made safe for OpenTelemetry by
:class:`~otel_ctxbridge._shield.TraceHeaderShield`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from ._accel import speedups
from .fields import REQUEST_ID_PATTERN, Field
from .limits import parse_baggage

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
_BAGGAGE = b"baggage"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_collect_headers = speedups.collect_headers if speedups is not None else None
_request_id_ready = speedups.request_id_ready if speedups is not None else None


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
                lowered = name.lower()  # ASGI asks servers for lower case; OTel lowers them too
                if lowered in self._wanted:
                    if found is None:
                        found = {}
                    found.setdefault(lowered, []).append(value)
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
