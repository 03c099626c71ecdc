"""`pam db access` end to end: real daemon, real PostgreSQL 15, psql and psycopg."""

from __future__ import annotations

import signal
import subprocess
import threading

import psycopg
import pytest
from harness import Gateway, connect_error, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    """These tests only open access sessions: one daemon serves the module."""
    return shared_gateway


def psql(url: str, *commands: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    args = ["psql", url, "-X", "-At", "-v", "ON_ERROR_STOP=0", *extra]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_psql_runs_queries_through_the_gateway_as_the_stored_account(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    result = psql(
        access.url,
        "select current_user, current_database()",
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        "select 40 + 2",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["app_scram|appdb", "t", "42"]


def test_an_sql_error_leaves_the_session_usable(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        assert conn.execute("select 'still here'").fetchone() == ("still here",)
    result = psql(access.url, "select 1/0", "select 'after error'")
    assert "division by zero" in result.stderr
    assert result.stdout.strip() == "after error"


def test_one_client_closing_leaves_the_others_and_the_tunnel_working(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    first = psycopg.connect(access.dsn(application_name="first"))
    second = psycopg.connect(access.dsn(application_name="second"))
    pids = {first.info.backend_pid, second.info.backend_pid}
    assert len(pids) == 2
    first.close()
    assert second.execute("select count(*) from generate_series(1, 1000)").fetchone() == (1000,)
    third = psycopg.connect(access.dsn(application_name="third"))
    assert third.execute("select 3").fetchone() == (3,)
    second.close()
    third.close()
    detail = wait_for(lambda: _ended_connections(gateway, access.session_prefix, 3))
    names = sorted(c["application_name"] for c in detail["connections"])
    assert names == ["first", "second", "third"]
    assert {c["end_reason"] for c in detail["connections"]} == {"client_closed"}
    assert {c["backend_pid"] for c in detail["connections"]} >= pids
    assert all(
        c["bytes_from_client"] > 0 and c["bytes_from_server"] > 0 for c in detail["connections"]
    )


def _ended_connections(gateway: Gateway, session: str, count: int) -> dict | None:
    detail = gateway.cli_json("sessions", "show", session)
    ended = [c for c in detail["connections"] if c["ended_at"]]
    return detail if len(ended) == count else None


def test_ctrl_c_ends_the_session_and_live_connections_get_a_fatal(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    conn = psycopg.connect(access.dsn(), autocommit=True)
    failure: list[BaseException] = []

    def sleep() -> None:
        try:
            conn.execute("select pg_sleep(600)")
        except BaseException as exc:
            failure.append(exc)

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    wait_for(
        lambda: gateway.cli_json("sessions", "show", access.session_prefix)["live_connections"] == 1
    )
    code = access.stop(signal.SIGINT)
    sleeper.join(30)
    assert code == 0
    assert not sleeper.is_alive()
    assert isinstance(failure[0], psycopg.OperationalError)
    assert "ended by its owner" in str(failure[0])
    assert failure[0].sqlstate == "57P01"
    assert "Session" in access.stdout.text() and "ended" in access.stdout.text()
    session = gateway.cli_json("sessions", "show", access.session_prefix)["session"]
    assert session["end_reason"] == "client_ended"
    assert session["ended_at"] is not None
    assert session["duration_seconds"] > 0
    conn.close()


def test_the_database_name_is_never_rewritten(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    error = connect_error(access.port, "app_scram", "postgres")
    assert (error.severity, error.sqlstate) == ("FATAL", "3D000")
    assert error.message == (
        "database 'postgres' is not available through this access session;"
        " resource 'prod' allows database 'appdb'"
    )
    assert error.hint == "connect with dbname=appdb"
    with pytest.raises(psycopg.OperationalError, match="allows database 'appdb'"):
        psycopg.connect(access.dsn(dbname="postgres"))


def test_a_user_other_than_the_accounts_is_refused(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    error = connect_error(access.port, "postgres", "appdb")
    assert (error.severity, error.sqlstate) == ("FATAL", "28000")
    assert error.message == "this access session is for user 'app_scram', not 'postgres'"
