"""`pam sessions revoke` (issue 14, live control): an admin or the owner ends a live
grant now; its connections get FATAL 57P01 naming who and why, new ones are refused,
and the session records it."""

from __future__ import annotations

import psycopg
import pytest
from harness import Gateway, connect_error

from gateway.protocol.sqlstate import SqlState

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    return shared_gateway


def test_revoking_cuts_live_connections_naming_who_and_why(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    conn = psycopg.connect(access.dsn(), autocommit=True)
    try:
        assert conn.execute("select 1").fetchone() == (1,)
        sessions = gateway.cli_json("sessions", "list", "--active")
        session_id = next(s["id"] for s in sessions if s["id"].startswith(access.session_prefix))
        who = gateway.cli_json("whoami")["name"]
        result = gateway.cli("sessions", "revoke", session_id[:8], "--reason", "INC-7 [red]x")
        assert result.stdout.strip() == (
            f"Revoked session {session_id[:8]} (revoked by {who}: INC-7 [red]x)"
        )
        with pytest.raises(psycopg.errors.AdminShutdown) as cut:
            conn.execute("select 2")
        assert f"was revoked by {who}: INC-7 [red]x" in str(cut.value)
    finally:
        conn.close()
    # New connections are refused with the same reason while the CLI holds on.
    error = connect_error(access.port, "app_scram", "appdb")
    assert (error.severity, error.sqlstate) == (
        "FATAL",
        SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
    ), error
    assert f"was revoked by {who}: INC-7 [red]x" in error.message, error
    ended = gateway.cli_json("sessions", "show", session_id, "--json")["session"]
    assert (ended["end_reason"], ended["end_detail"]) == (
        "revoked",
        f"revoked by {who}: INC-7 [red]x",
    )
    access.wait()
    # An ended session cannot be revoked again: one line, non-zero.
    again = gateway.cli("sessions", "revoke", session_id, check=False)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"error: access session {session_id[:8]} is not live (it ended: revoked)"
    )
