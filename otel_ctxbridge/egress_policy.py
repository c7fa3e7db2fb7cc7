"""Egress policy: the destinations (hosts, suffixes, CIDR ranges) allowed to receive baggage.

An :class:`EgressPolicy` answers one question, :meth:`EgressPolicy.allows`, for a URL,
``httpx.URL``, host or ``host:port``; :mod:`otel_ctxbridge.egress` applies it to the HTTP
client instrumentations. Host names are compared as written (case-insensitive, internationalised
names in their ASCII ``xn--`` form, as sent on the wire), never resolved; IP literal hosts are
also matched against the policy's CIDR ranges.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from .errors import ContextBridgeError

__all__ = ["EgressConfigError", "EgressPolicy"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST_NAME = re.compile(
    r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*"
)
"""A host name in ASCII form: dot-separated labels (``_`` allowed, as in service records)."""


class EgressConfigError(ContextBridgeError, ValueError):
    """An :class:`EgressPolicy` or HTTP client instrumentation is misconfigured."""


class EgressPolicy:
    """The destinations allowed to receive baggage; every other host gets none.

    Args:
        hosts: host names (case-insensitive, exact) and suffixes: ``".internal"`` (or
            ``"*.internal"``) matches ``orders.internal`` and ``a.b.internal``.
            IP literals are allowed as exact entries too. A host only: an entry with a
            scheme, port, path or user (``"http://orders"``, ``"orders:8080"``) would never
            match and raises :class:`EgressConfigError`.
        networks: CIDR ranges (``"10.0.0.0/8"``, ``"fd00::/8"``) matched against IP literal
            hosts. Names are not resolved: ``localhost`` matches only a ``hosts`` entry.
        request_id_only_elsewhere: hosts outside the policy still get the request id in its
            header (for example ``x-request-id``), never baggage.
        request_id_field: the field whose header ``request_id_only_elsewhere`` sends.
    """

    __slots__ = (
        "_exact",
        "_networks",
        "_suffixes",
        "request_id_field",
        "request_id_only_elsewhere",
    )

    def __init__(
        self,
        hosts: Iterable[str] = (),
        networks: Iterable[str] = (),
        *,
        request_id_only_elsewhere: bool = False,
        request_id_field: str = "request_id",
    ) -> None:
        if isinstance(hosts, str) or isinstance(networks, str):
            raise EgressConfigError("hosts and networks must be lists of strings, not a string")
        exact: set[str] = set()
        suffixes: list[str] = []
        for entry in hosts:
            if not isinstance(entry, str) or not entry.strip(". *"):
                raise EgressConfigError(f"invalid egress host entry {entry!r}")
            name = _normal_host(entry.strip().removeprefix("*"))
            if not _is_host(name.removeprefix(".")):
                raise EgressConfigError(
                    f"invalid egress host entry {entry!r}: give a host name, a '.suffix' or an "
                    "IP address, without scheme, port or path"
                )
            if name.startswith("."):
                suffixes.append(name)
            else:
                exact.add(name)
        parsed: list[_Network] = []
        for cidr in networks:
            try:
                parsed.append(ipaddress.ip_network(cidr, strict=False))
            except (TypeError, ValueError):
                raise EgressConfigError(f"invalid egress network {cidr!r}") from None
        self._exact = frozenset(exact)
        self._suffixes = tuple(suffixes)
        self._networks = tuple(parsed)
        self.request_id_only_elsewhere = bool(request_id_only_elsewhere)
        """Whether hosts outside the policy get the request id header."""
        self.request_id_field = request_id_field
        """The field sent to hosts outside the policy when ``request_id_only_elsewhere``."""

    def allows(self, destination: object) -> bool:
        """True when ``destination`` (a URL, ``httpx.URL``, host or ``host:port``) may receive
        baggage. Anything unreadable is refused."""
        host = _host_of(destination)
        if not host:
            return False
        if host in self._exact or any(host.endswith(suffix) for suffix in self._suffixes):
            return True
        if not self._networks:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def __repr__(self) -> str:
        hosts = sorted(self._exact) + list(self._suffixes)
        networks = [str(n) for n in self._networks]
        return (
            f"EgressPolicy(hosts={hosts!r}, networks={networks!r}, "
            f"request_id_only_elsewhere={self.request_id_only_elsewhere!r})"
        )


def _normal_host(host: str) -> str:
    """Lower case, no trailing dot or IPv6 brackets, internationalised labels in ASCII."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host.isascii():
        dot = "." if host.startswith(".") else ""
        host = dot + _idna(host.removeprefix("."))
    return host


def _idna(name: str) -> str:
    """``name`` in the ASCII form HTTP clients send (IDNA 2008 as httpx and requests do, with
    the standard library's IDNA 2003 as the fallback); unchanged when it has none."""
    try:
        import idna  # noqa: PLC0415 - a dependency of httpx and requests, needed rarely

        return str(idna.encode(name, uts46=True).decode("ascii"))
    except Exception:  # not installed, or not a valid IDNA 2008 name
        pass
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def _is_host(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return _HOST_NAME.fullmatch(name) is not None


def _host_of(destination: object) -> str:
    try:
        raw_host = getattr(destination, "raw_host", None)  # httpx.URL: the host as sent
        if isinstance(raw_host, bytes):
            return _normal_host(raw_host.decode("ascii"))
        host = getattr(destination, "host", None)
        if isinstance(host, str):
            return _normal_host(host)
        if isinstance(destination, tuple) and len(destination) >= 2:  # raw (scheme, host, ..)
            raw = destination[1]
            return _normal_host(raw.decode("ascii") if isinstance(raw, bytes) else str(raw))
        text = destination.decode("ascii") if isinstance(destination, bytes) else destination
        if not isinstance(text, str):
            return ""
        if "://" not in text:
            text = "//" + text
        return _normal_host(urlsplit(text).hostname or "")
    except (UnicodeDecodeError, ValueError):
        return ""
