"""How access sessions end: expiry, signals to the CLI and the daemon, crashes.

Real daemon and CLI processes, a real PostgreSQL 15 and real clients. Waits are
bounded polls (``wait_for``) or joins with a deadline, never timing assertions.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from harness import Gateway, connect_error, wait_for

from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration

#: A hang guard, not a timing assertion (no wall-clock thresholds in tests): the
#: daemon's own bound is its heartbeat timeout (6 s by default), which the test
#: checks through the recorded end detail.
KILLED_CLI_DEADLINE_SECONDS = 60.0


class Sleeper:
    """A psycopg connection running ``select pg_sleep(600)`` in a thread."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.backend_pid = self.conn.info.backend_pid
        self.error: psycopg.Error | None = None
        self.thread = threading.Thread(target=self._sleep, name="pg_sleep", daemon=True)
        self.thread.start()

    def _sleep(self) -> None:
        try:
            self.conn.execute("select pg_sleep(600)")
        except psycopg.Error as exc:
            self.error = exc

    def wait_until_sleeping(self, pg: TempCluster) -> None:
        wait_for(
            lambda: (
                pg.admin_sql(
                    f"select wait_event from pg_stat_activity where pid = {self.backend_pid}"
                )
                == "PgSleep"
            )
        )

    def join(self, timeout: float = 30.0) -> psycopg.Error:
        """The error that ended the query; fails if it is still running."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "pg_sleep(600) is still running"
        self.conn.close()
        assert self.error is not None, "pg_sleep(600) returned instead of being cut"
        return self.error


def backend_is_gone(pg: TempCluster, pid: int) -> bool:
    return pg.admin_sql(f"select count(*) from pg_stat_activity where pid = {pid}") == "0"


def session_detail(gateway: Gateway, session: str) -> dict[str, Any]:
    detail: dict[str, Any] = gateway.cli_json("sessions", "show", session)
    return detail


def ended_session(gateway: Gateway, session: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll until the session and all its connections are recorded as ended."""

    def ended() -> dict[str, Any] | None:
        detail = session_detail(gateway, session)
        done = detail["session"]["ended_at"] and all(c["ended_at"] for c in detail["connections"])
        return detail if done else None

    result: dict[str, Any] = wait_for(ended, timeout=timeout)
    return result


def live_connections(gateway: Gateway, session: str, count: int) -> Callable[[], bool]:
    return lambda: session_detail(gateway, session)["live_connections"] == count


def api_url(gateway: Gateway) -> str:
    url: str = json.loads(gateway.config_path.read_text())["api_url"]
    return url


def utc_text(iso: str) -> str:
    """A timestamp as the gateway's messages show it."""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- expiry ------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_expiry_cuts_a_live_query_and_the_cli_reports_it(gateway: Gateway, pg: TempCluster) -> None:
    access = gateway.access(duration="4s").wait_ready()
    sleeper = Sleeper(access.dsn(application_name="sleeper"))
    sleeper.wait_until_sleeping(pg)

    error = sleeper.join(timeout=60)

    detail = ended_session(gateway, access.session_prefix)
    session = detail["session"]
    assert isinstance(error, psycopg.OperationalError)
    assert error.sqlstate == "57P01"
    assert error.diag.severity_nonlocalized == "FATAL"
    assert error.diag.message_primary == (
        f"access grant for prod/scram expired at {utc_text(session['expires_at'])}"
    )
    assert error.diag.message_hint == (
        "request new access with `pam db access --resource prod --account scram`"
    )
    wait_for(lambda: backend_is_gone(pg, sleeper.backend_pid))
    assert access.wait(30) == 0
    assert "Access expired" in access.stdout.text()
    assert access.stderr.text() == ""
    assert session["end_reason"] == "expired"
    assert [(c["application_name"], c["end_reason"]) for c in detail["connections"]] == [
        ("sleeper", "expired")
    ]
    assert detail["connections"][0]["backend_pid"] == sleeper.backend_pid


@pytest.mark.timeout(120)
def test_a_new_connection_after_expiry_is_refused_with_the_expiry_time(
    gateway: Gateway,
) -> None:
    # The control API directly, holding the grant with heartbeats, so the
    # expired grant's listener stays up until the test lets go of it (the CLI
    # lets go within one heartbeat, too soon to connect reliably).
    with gateway.api() as api:
        session = api.post(
            "/v1/access",
            {"resource": "prod", "account": "scram", "duration_seconds": 3, "requester": "test"},
        )
        state = wait_for(
            lambda: (s := api.post(f"/v1/access/{session['id']}/heartbeat"))["ended_at"] and s,
            timeout=60,
            interval=0.5,
        )

        error = connect_error(session["listen_port"], "app_scram", "appdb")

        api.post(f"/v1/access/{session['id']}/end", {})
    assert state["end_reason"] == "expired"
    assert (error.severity, error.sqlstate) == ("FATAL", "28000")
    assert error.message == (
        f"access grant for prod/scram expired at {utc_text(session['expires_at'])}"
    )
    assert error.hint == "request new access with `pam db access --resource prod --account scram`"
    assert session_detail(gateway, session["id"])["connections"] == []


# --- the CLI ending --------------------------------------------------------------------


def test_sigterm_to_the_cli_ends_the_session_like_ctrl_c(gateway: Gateway, pg: TempCluster) -> None:
    access = gateway.access().wait_ready()
    sleeper = Sleeper(access.dsn())
    sleeper.wait_until_sleeping(pg)

    code = access.stop(signal.SIGTERM)

    error = sleeper.join()
    assert code == 0
    assert error.sqlstate == "57P01"
    assert error.diag.message_primary == (
        f"terminating connection because access session {access.session_prefix}"
        " was ended by its owner"
    )
    assert f"Session {access.session_prefix} ended (client_ended)" in access.stdout.text()
    assert access.stderr.text() == ""
    detail = ended_session(gateway, access.session_prefix)
    assert detail["session"]["end_reason"] == "client_ended"
    assert detail["session"]["end_detail"] is None
    assert [c["end_reason"] for c in detail["connections"]] == ["session_ended"]


@pytest.mark.timeout(120)
def test_a_killed_cli_lets_the_daemon_end_the_session_and_its_connections(
    gateway: Gateway, pg: TempCluster
) -> None:
    access = gateway.access().wait_ready()
    sleeper = Sleeper(access.dsn())
    sleeper.wait_until_sleeping(pg)

    access.proc.kill()
    assert access.wait() == -signal.SIGKILL

    detail = wait_for(
        lambda: (d := session_detail(gateway, access.session_prefix))["session"]["ended_at"] and d,
        timeout=KILLED_CLI_DEADLINE_SECONDS,
    )
    session = detail["session"]
    assert session["end_reason"] == "client_ended"
    assert session["end_detail"] == ("the pam CLI holding the grant stopped responding for 6s")
    error = sleeper.join()
    assert error.sqlstate == "57P01"
    assert error.diag.message_primary == (
        f"terminating connection because access session {access.session_prefix} was ended:"
        " the pam CLI holding the grant stopped responding for 6s"
    )
    wait_for(lambda: backend_is_gone(pg, sleeper.backend_pid))
    detail = ended_session(gateway, access.session_prefix)
    assert [c["end_reason"] for c in detail["connections"]] == ["session_ended"]


# --- the daemon ending ------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_killed_daemon_leaves_its_session_closed_as_gateway_crash_after_restart(
    gateway: Gateway, pg: TempCluster
) -> None:
    access = gateway.access().wait_ready()
    conn = psycopg.connect(access.dsn(application_name="crash-witness"), autocommit=True)
    backend_pid = conn.info.backend_pid
    wait_for(live_connections(gateway, access.session_prefix, 1))

    assert gateway.stop(signal.SIGKILL) == -signal.SIGKILL

    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    wait_for(lambda: backend_is_gone(pg, backend_pid))
    # The CLI gives up once its heartbeats stop reaching the daemon.
    assert access.wait(60) == 1
    assert access.stderr.text().splitlines() == [
        f"error: lost contact with the pam gateway: cannot reach the pam gateway at"
        f" {api_url(gateway)} (hint: the gateway ends the session when it stops"
        " hearing from this command)"
    ]

    gateway.start()

    detail = session_detail(gateway, access.session_prefix)
    assert detail["session"]["end_reason"] == "gateway_crash"
    assert detail["session"]["ended_at"] is not None
    assert [
        (c["application_name"], c["backend_pid"], c["end_reason"], c["ended_at"] is not None)
        for c in detail["connections"]
    ] == [("crash-witness", backend_pid, "gateway_crash", True)]
    assert detail["live_connections"] == 0
    assert gateway.cli_json("sessions", "list", "--active") == []
    orphans = [e for e in gateway.log_events() if e.get("event") == "closed_orphaned_sessions"]
    assert [(e["count"], e["reason"]) for e in orphans] == [(1, "gateway_crash")]


@pytest.mark.timeout(180)
def test_sigterm_to_the_daemon_tells_live_clients_and_the_cli_gives_up(
    gateway: Gateway, pg: TempCluster
) -> None:
    access = gateway.access().wait_ready()
    sleeper = Sleeper(access.dsn())
    sleeper.wait_until_sleeping(pg)
    session_id = session_detail(gateway, access.session_prefix)["session"]["id"]

    assert gateway.stop(signal.SIGTERM) == 0

    error = sleeper.join()
    assert error.sqlstate == "57P01"
    assert error.diag.message_primary == (
        "terminating connection because the pam gateway is shutting down"
    )
    wait_for(lambda: backend_is_gone(pg, sleeper.backend_pid))
    assert access.wait(60) == 1
    stderr = access.stderr.text()
    assert stderr.startswith("error: lost contact with the pam gateway: ")
    assert len(stderr.splitlines()) == 1
    assert "Traceback" not in stderr

    gateway.start()

    detail = session_detail(gateway, session_id)
    assert detail["session"]["end_reason"] == "gateway_shutdown"
    assert [c["end_reason"] for c in detail["connections"]] == ["gateway_shutdown"]
    assert not [e for e in gateway.log_events() if e.get("event") == "closed_orphaned_sessions"]


# --- the session log ---------------------------------------------------------------------


def local_address(conn: psycopg.Connection[Any]) -> str:
    """The client side of a connection's socket, as the gateway sees the peer."""
    with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as sock:
        host, port = sock.getsockname()
    return f"{host}:{port}"


def test_the_session_log_records_every_connection_in_full(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    seen = {}
    for name in ("report-writer", "dashboard"):
        with psycopg.connect(access.dsn(application_name=name), autocommit=True) as conn:
            (pid,) = conn.execute("select pg_backend_pid()").fetchone() or (None,)
            conn.execute("select repeat('x', 10000)").fetchone()
            seen[name] = (local_address(conn), pid)
    wait_for(live_connections(gateway, access.session_prefix, 0))
    assert access.stop(signal.SIGINT) == 0

    detail = ended_session(gateway, access.session_prefix)

    session = detail["session"]
    connections = detail["connections"]
    assert session["end_reason"] == "client_ended"
    assert [c["application_name"] for c in connections] == ["report-writer", "dashboard"]
    for record in connections:
        client_addr, backend_pid = seen[record["application_name"]]
        assert record["session_id"] == session["id"]
        assert record["client_addr"] == client_addr
        assert record["backend_pid"] == backend_pid
        started = datetime.fromisoformat(record["started_at"])
        ended = datetime.fromisoformat(record["ended_at"])
        assert datetime.fromisoformat(session["started_at"]) <= started < ended
        assert ended <= datetime.fromisoformat(session["ended_at"])
        assert record["duration_seconds"] == (ended - started).total_seconds()
        assert record["bytes_from_client"] > 0
        assert record["bytes_from_server"] > 10000
        assert record["end_reason"] == "client_closed"
        assert record["error_sqlstate"] is None
        assert record["error_message"] is None
