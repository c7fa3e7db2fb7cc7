"""The request headers the application (and any middleware inside the bridge) is given: as they
came, less what is for the bridge only (the trust secret) and, from an untrusted peer, less what
only a trusted one may send. Used by :class:`~otel_ctxbridge.asgi.ContextBridgeMiddleware`."""

from __future__ import annotations

from ._foreign_baggage import baggage_prefixes, without_prefixed
from ._inbound import ORIGINAL_HEADERS, UNTRUSTED_HEADERS, Scope
from .trust import TrustPolicy

__all__ = ["headers_for_app", "hide_unchecked"]


def headers_for_app(scope: Scope, trust: TrustPolicy, secret: bytes | None) -> None:
    """Set ``scope["headers"]`` for the application: the headers as they came (the shield's
    changes were for OTel), without the trust ``secret`` header, and from an untrusted peer
    without the headers :class:`~otel_ctxbridge._inbound.InboundReader` named under
    :data:`UNTRUSTED_HEADERS` (``baggage``, ``inbound="trusted"`` fields' own) and baggage in
    other propagators' formats: nothing inside (the app, or an OTel middleware misplaced
    there) can read a tenant from them."""
    original = scope.pop(ORIGINAL_HEADERS, None)
    if original is not None:
        scope["headers"] = original
    foreign = without_prefixed(scope.get("headers") or (), baggage_prefixes())
    if foreign is not None and not trust.trusts(scope):  # decided before the secret goes
        scope["headers"] = foreign
    hidden: frozenset[bytes] = scope.pop(UNTRUSTED_HEADERS, None) or frozenset()
    if secret is not None:
        hidden = hidden | {secret}
    if hidden and any(name.lower() in hidden for name, _ in scope.get("headers") or ()):
        scope["headers"] = [h for h in scope["headers"] if h[0].lower() not in hidden]


def hide_unchecked(scope: Scope, restricted: frozenset[bytes], secret: bytes | None) -> None:
    """The headers for an application run without a request context (building it failed):
    whoever the peer is, without ``restricted`` headers, the ``secret`` header and baggage in
    other propagators' formats, since no trust was decided. Never raises."""
    try:
        scope.pop(UNTRUSTED_HEADERS, None)
        headers = scope.pop(ORIGINAL_HEADERS, None) or scope.get("headers") or ()
        kept = without_prefixed(headers, baggage_prefixes())
        headers = kept if kept is not None else list(headers)
        hidden = restricted | {secret} if secret is not None else restricted
        scope["headers"] = [(name, value) for name, value in headers if name.lower() not in hidden]
    except Exception:  # a scope this cannot read: the app gets no headers rather than those
        scope["headers"] = []
