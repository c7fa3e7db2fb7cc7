"""TrustPolicy: who may set ``inbound="trusted"`` fields; nobody until configured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

import otel_ctxbridge as cb
from otel_ctxbridge.trust import TrustPolicy


def _scope(
    client: tuple[str, int] | None, headers: Sequence[tuple[bytes, bytes]] = ()
) -> dict[str, Any]:
    return {"type": "http", "client": client, "headers": list(headers)}


def test_default_policy_trusts_nobody() -> None:
    """A TrustPolicy with no networks and no secret trusts no peer, loopback included."""
    policy = TrustPolicy()
    assert not policy.trusts_anyone
    assert not policy.trusts(_scope(("127.0.0.1", 5000)))
    assert not policy.trusts(_scope(("10.1.2.3", 5000), [(b"x-ctxbridge-secret", b"")]))


def test_networks_trust_peers_inside_them_only() -> None:
    """Peers inside a configured CIDR are trusted; peers outside are not; IPv6 works."""
    policy = TrustPolicy(networks=["10.0.0.0/8", "fd00::/8", "127.0.0.1/32"])
    assert policy.trusts(_scope(("10.20.30.40", 1)))
    assert policy.trusts(_scope(("127.0.0.1", 1)))
    assert policy.trusts(_scope(("fd00::1", 1)))
    assert not policy.trusts(_scope(("11.0.0.1", 1)))
    assert not policy.trusts(_scope(("127.0.0.2", 1)))
    assert not policy.trusts(_scope(("2001:db8::1", 1)))


def test_ipv4_mapped_ipv6_peer_matches_ipv4_network() -> None:
    """A dual-stack socket's ``::ffff:10.0.0.1`` peer is inside ``10.0.0.0/8``."""
    assert TrustPolicy(networks=["10.0.0.0/8"]).trusts_address("::ffff:10.0.0.1")


def test_missing_or_unparsable_client_is_untrusted() -> None:
    """No client (unix socket, some test clients) or a non-IP client name is never trusted."""
    policy = TrustPolicy(networks=["0.0.0.0/0", "::/0"])
    assert not policy.trusts(_scope(None))
    assert not policy.trusts(_scope(("testclient", 50000)))
    assert policy.trusts(_scope(("203.0.113.9", 1)))


def test_forwarded_for_headers_are_never_read() -> None:
    """X-Forwarded-For / Forwarded from an untrusted peer do not make it trusted."""
    policy = TrustPolicy(networks=["10.0.0.0/8"])
    headers = [(b"x-forwarded-for", b"10.0.0.1"), (b"forwarded", b"for=10.0.0.1")]
    assert not policy.trusts(_scope(("198.51.100.7", 1), headers))


def test_shared_secret_header_trusts_the_peer() -> None:
    """The right secret in the secret header trusts any peer; a wrong or missing one does not."""
    policy = TrustPolicy(secret="s3cret-value")
    assert policy.has_secret
    assert policy.trusts(_scope(("198.51.100.7", 1), [(b"x-ctxbridge-secret", b"s3cret-value")]))
    assert not policy.trusts(_scope(("198.51.100.7", 1), [(b"x-ctxbridge-secret", b"wrong")]))
    assert not policy.trusts(_scope(("198.51.100.7", 1), [(b"x-other", b"s3cret-value")]))
    assert not policy.trusts(_scope(("198.51.100.7", 1)))


def test_duplicated_secret_header_is_not_trusted() -> None:
    """Two secret headers make the peer untrusted, whatever they hold and in any order, as the
    middleware decides (one of them is not the configured secret, or it was sent twice)."""
    policy = TrustPolicy(secret="s3cret-value")
    right, wrong = (b"x-ctxbridge-secret", b"s3cret-value"), (b"x-ctxbridge-secret", b"wrong")
    assert not policy.trusts(_scope(("198.51.100.7", 1), [right, wrong]))
    assert not policy.trusts(_scope(("198.51.100.7", 1), [wrong, right]))
    assert not policy.trusts(_scope(("198.51.100.7", 1), [right, right]))


def test_secret_rotation_and_custom_header() -> None:
    """Several secrets may be valid at once (rotation); the header name is configurable."""
    policy = TrustPolicy(secret=["old", b"new"], secret_header="X-Internal-Auth")
    assert policy.secret_header == "x-internal-auth"
    assert policy.trusts(_scope(None, [(b"x-internal-auth", b"old")]))
    assert policy.trusts(_scope(None, [(b"x-internal-auth", b"new")]))
    assert not policy.trusts(_scope(None, [(b"x-internal-auth", b"older")]))


def test_secret_is_not_shown_in_repr() -> None:
    """repr() of a policy never shows the secret."""
    text = repr(TrustPolicy(networks=["10.0.0.0/8"], secret="hunter2"))
    assert "hunter2" not in text
    assert "10.0.0.0/8" in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"networks": ["not-a-network"]},
        {"networks": ["10.0.0.0/33"]},
        {"networks": "10.0.0.0/8"},
        {"secret": ""},
        {"secret": ["ok", "  "]},
        {"secret": [123]},
        {"secret_header": ""},
    ],
)
def test_bad_configuration_raises_at_construction(kwargs: dict[str, Any]) -> None:
    """Invalid CIDRs, a string instead of a list, empty secrets raise FieldConfigError."""
    with pytest.raises(cb.FieldConfigError):
        TrustPolicy(**kwargs)


def test_malformed_scope_trusts_nobody() -> None:
    """A scope whose client or headers are malformed is untrusted, never an exception."""
    policy = TrustPolicy(networks=["10.0.0.0/8"], secret="x")
    assert not policy.trusts({"client": 42, "headers": "nonsense"})
