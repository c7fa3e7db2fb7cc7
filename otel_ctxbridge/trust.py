"""TrustPolicy: which inbound peers may set ``inbound="trusted"`` fields and forward baggage.

Nothing is trusted until configured. A peer is trusted when its address (the ASGI
``scope["client"]``, that is the TCP peer) is inside one of ``networks``, or when it sends the
shared secret in ``secret_header``.

The address is never read from ``X-Forwarded-For`` or ``Forwarded``: any client can write those.
Behind a reverse proxy, let the server rewrite ``scope["client"]`` only for requests that come
from the proxy itself (uvicorn: ``--proxy-headers --forwarded-allow-ips=<proxy address>``), or
trust the proxy's network here and make the proxy strip the context headers (``x-tenant-id``,
``baggage``, the secret header) that clients send.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import FieldConfigError

__all__ = ["TrustPolicy"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHE_SIZE = 1024


class TrustPolicy:
    """Who counts as a trusted peer for inbound context.

    Args:
        networks: CIDRs (``"10.0.0.0/8"``, ``"fd00::/8"``, ``"127.0.0.1/32"``) of trusted peers.
        secret: a shared secret (or several, to rotate) that a trusted peer sends in
            ``secret_header``; compared in constant time. None: no secret is accepted.
        secret_header: the request header carrying the secret. The middleware hides it from
            OpenTelemetry and from the application.

    Bad configuration (an invalid CIDR, an empty secret) raises
    :class:`~otel_ctxbridge.FieldConfigError` at construction.
    """

    __slots__ = ("_cache", "_secrets", "networks", "secret_header")

    def __init__(
        self,
        networks: Iterable[str] = (),
        secret: str | bytes | Iterable[str | bytes] | None = None,
        secret_header: str = "x-ctxbridge-secret",
    ) -> None:
        if isinstance(networks, (str, bytes)):
            raise FieldConfigError("TrustPolicy: networks must be a list of CIDRs, not a string")
        parsed: list[_Network] = []
        for cidr in networks:
            try:
                parsed.append(ipaddress.ip_network(cidr, strict=False))
            except (ValueError, TypeError):
                raise FieldConfigError(
                    f"TrustPolicy: {cidr!r} is not a network (CIDR) address"
                ) from None
        self.networks: tuple[_Network, ...] = tuple(parsed)
        """The trusted networks."""
        if not isinstance(secret_header, str) or not secret_header.strip():
            raise FieldConfigError("TrustPolicy: secret_header must be a header name")
        self.secret_header = secret_header.strip().lower()
        """The (lower-case) header that carries the shared secret."""
        self._secrets = _secrets(secret)
        self._cache: dict[str, bool] = {}

    @property
    def trusts_anyone(self) -> bool:
        """True when some peer can be trusted (a network or a secret is configured)."""
        return bool(self.networks or self._secrets)

    @property
    def has_secret(self) -> bool:
        """True when a shared secret is configured."""
        return bool(self._secrets)

    def trusts_address(self, host: str | None) -> bool:
        """True when ``host`` (an IP address as text) is inside a trusted network."""
        if not host or not self.networks:
            return False
        cached = self._cache.get(host)
        if cached is not None:
            return cached
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            result = False  # a unix socket path, a test client's name: not an address
        else:
            mapped = getattr(address, "ipv4_mapped", None)
            candidates = (address,) if mapped is None else (address, mapped)
            result = any(a in net for a in candidates for net in self.networks)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[host] = result
        return result

    def trusts_secret(self, presented: bytes | str | None) -> bool:
        """True when ``presented`` equals a configured secret (constant-time comparison)."""
        if presented is None or not self._secrets:
            return False
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "surrogateescape")
        presented = presented.strip(b" \t")
        ok = False
        for secret in self._secrets:
            ok |= hmac.compare_digest(presented, secret)
        return ok

    def trusts(self, scope: Mapping[str, Any]) -> bool:
        """True when the peer of an ASGI connection ``scope`` is trusted: its address is in a
        trusted network, or it sends exactly one secret header holding a configured secret
        (as :class:`~otel_ctxbridge.ContextBridgeMiddleware` decides). Never raises."""
        try:
            client = scope.get("client")
            if client and self.trusts_address(client[0]):
                return True
            if self._secrets:
                wanted = self.secret_header.encode("latin-1")
                sent = [v for n, v in scope.get("headers") or () if n.lower() == wanted]
                return len(sent) == 1 and self.trusts_secret(sent[0])
        except Exception:  # a malformed scope trusts nobody
            return False
        return False

    def __repr__(self) -> str:
        nets = [str(n) for n in self.networks]
        return (
            f"TrustPolicy(networks={nets!r}, secret={'<set>' if self._secrets else None}, "
            f"secret_header={self.secret_header!r})"
        )


def _secrets(secret: str | bytes | Iterable[str | bytes] | None) -> tuple[bytes, ...]:
    if secret is None:
        return ()
    items = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    out: list[bytes] = []
    for item in items:
        if not isinstance(item, (str, bytes)):
            raise FieldConfigError("TrustPolicy: a secret must be a str or bytes")
        raw = item.encode("utf-8") if isinstance(item, str) else item
        if not raw.strip():
            raise FieldConfigError("TrustPolicy: a secret must not be empty")
        out.append(raw.strip(b" \t"))
    return tuple(out)
