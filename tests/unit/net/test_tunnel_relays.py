"""What crosses to a relay worker for the tunnel: a grant's own upstream target,
and how a refusal the daemon sends back is recorded."""

from __future__ import annotations

import pytest

from gateway.net.relay import Termination
from gateway.net.relays import target_from_json, target_to_json
from gateway.net.tunnel import refusal_reason
from gateway.net.upstream import UpstreamTarget
from gateway.reasons import ConnectionEndReason
from gateway.refusal import RefusalReason


def test_a_grants_own_target_crosses_whole() -> None:
    target = UpstreamTarget(
        resource="prod",
        account="eph",
        host="db.internal",
        port=5433,
        database="appdb",
        username="pam_ada_1234abcd",
        password="s3cret-generated",
        ssl_mode="verify-ca",
        ca_cert="-----BEGIN CERTIFICATE-----\n...",
    )
    assert target_from_json(target_to_json(target)) == target
    # repr never shows the password (a malformed message is logged by repr).
    assert "s3cret" not in repr(target)


def test_a_target_with_an_unknown_ssl_mode_is_refused() -> None:
    data = target_to_json(
        UpstreamTarget("prod", "eph", "h", 5432, "appdb", "u", "p", ssl_mode="require")
    )
    with pytest.raises(ValueError, match="ssl_mode"):
        target_from_json(data | {"ssl_mode": "allow-anything"})


@pytest.mark.parametrize(
    ("termination", "expected"),
    [
        (
            Termination(ConnectionEndReason.SESSION_ENDED, "28000", "access session ended"),
            RefusalReason.GRANT_ENDED,
        ),
        (
            Termination(ConnectionEndReason.ERROR, "28000", "names no pam grant"),
            RefusalReason.CERTIFICATE_REFUSED,
        ),
        (
            Termination(ConnectionEndReason.AUDIT_UNAVAILABLE, "57P03", "audit unavailable"),
            RefusalReason.GATEWAY_REFUSING,
        ),
        (
            Termination(ConnectionEndReason.ERROR, "XX000", "lookup failed"),
            RefusalReason.GATEWAY_REFUSING,
        ),
    ],
)
def test_a_refused_tunnel_connection_is_recorded_by_why(
    termination: Termination, expected: RefusalReason
) -> None:
    assert refusal_reason(termination) is expected
