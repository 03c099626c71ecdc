"""Admission: which grant requests may be opened, and the gateway-wide refusal
(the first check that refuses wins)."""

from __future__ import annotations

import pytest

from gateway.access.admission import Admission, check_grant_request
from gateway.errors import InvalidRequest
from gateway.net.relay import Termination
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason


def test_a_grant_request_needs_a_duration_within_the_limit_and_a_port_in_range() -> None:
    check_grant_request(duration_seconds=60, port=None, max_grant_seconds=60, closing=False)
    check_grant_request(duration_seconds=1, port=65535, max_grant_seconds=60, closing=False)
    with pytest.raises(InvalidRequest, match="between 1 second and 0:01:00") as too_long:
        check_grant_request(duration_seconds=61, port=None, max_grant_seconds=60, closing=False)
    assert too_long.value.hint == "ask for a shorter --duration"
    with pytest.raises(InvalidRequest, match="port 65536 is out of range"):
        check_grant_request(duration_seconds=1, port=65536, max_grant_seconds=60, closing=False)
    with pytest.raises(InvalidRequest, match="the gateway is shutting down"):
        check_grant_request(duration_seconds=1, port=None, max_grant_seconds=60, closing=True)


def test_the_first_gateway_wide_refusal_wins() -> None:
    first = Termination(ConnectionEndReason.AUDIT_UNAVAILABLE, SqlState.CANNOT_CONNECT_NOW, "one")
    second = Termination(ConnectionEndReason.ERROR, SqlState.CANNOT_CONNECT_NOW, "two")
    assert Admission().refusal() is None
    assert Admission(checks=(lambda: None, lambda: first, lambda: second)).refusal() is first
