"""The remote path on loopback: CLI forwarder -> TLS 1.3 tunnel -> gateway -> PostgreSQL.

A real daemon, a real PostgreSQL 15, psql and psycopg; certificates from the
gateway's own CA (issued through the API for an in-test key) or from another CA.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest
from harness import Gateway, connect_error, forward_tunnel, wait_for

from cli.forwarder import Forwarder
from gateway.credentials import pki
from gateway.credentials.secretbox import SecretBox
from gateway.protocol.sqlstate import SqlState
from gateway.testing.net import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    return shared_gateway


def psql(url: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["psql", url, "-X", "-At", "-v", "ON_ERROR_STOP=0"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _open_with_key(
    gateway: Gateway, key: pki.ec.EllipticCurvePrivateKey, seconds: int = 3600
) -> dict[str, object]:
    with gateway.api() as api:
        return dict(
            api.open_access(
                resource="prod",
                account="scram",
                duration_seconds=seconds,
                port=None,
                reason="test",
                csr=pki.csr_for(key),
            )
        )


def _session_connections(gateway: Gateway, session_id: str) -> list[dict[str, object]]:
    with gateway.api() as api:
        detail = api.get(f"/v1/sessions/{session_id}")
    return list(detail["connections"])


def test_psql_and_psycopg_reach_the_database_through_the_tunnel(gateway: Gateway) -> None:
    access = gateway.access("--tunnel").wait_ready()
    result = psql(access.url, "select current_user, current_database()", "select 40 + 2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["app_scram|appdb", "42"]
    with psycopg.connect(access.dsn(application_name="tunnelled")) as conn:
        assert conn.execute("select count(*) from generate_series(1, 5000)").fetchone() == (5000,)
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as own:
            local = own.getsockname()
        second = psycopg.connect(access.dsn(application_name="second"))
        assert second.execute("select 1").fetchone() == (1,)
        second.close()
    sessions = gateway.cli_json("sessions", "list")
    session = next(s for s in sessions if s["id"].startswith(access.session_prefix))
    assert session["listen_port"] is None  # the gateway opened no local port for it
    addrs = {c["client_addr"] for c in _session_connections(gateway, session["id"])}
    # Recorded: the tunnel's peer, not the local client the forwarder served.
    assert f"{local[0]}:{local[1]}" not in addrs
    assert all(a.startswith("127.0.0.1:") for a in addrs)
    assert access.stop() == 0


def test_a_client_that_insists_on_tls_gets_it_from_the_forwarder(gateway: Gateway) -> None:
    # sslmode=require encrypts and verifies nothing: the forwarder answers the
    # SSLRequest itself with a throwaway certificate, the tunnel being TLS already.
    access = gateway.access("--tunnel").wait_ready()
    with psycopg.connect(access.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 40 + 2").fetchone() == (42,)
    result = psql(access.url.replace("sslmode=disable", "sslmode=require"), "select 7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["7"]
    assert access.stop() == 0


def test_a_cancel_goes_through_the_tunnel(gateway: Gateway) -> None:
    access = gateway.access("--tunnel").wait_ready()
    with psycopg.connect(access.dsn()) as conn:
        timer = threading.Timer(1.0, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(60)")
        timer.join()
        conn.rollback()
        assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)


def _active(url: str, application_name: str) -> bool:
    query = (
        "select count(*) from pg_stat_activity"
        f" where application_name = '{application_name}' and query like 'select pg_sleep%'"
    )
    return psql(url, query).stdout.strip() == "1"


def test_the_forwarder_survives_a_clients_ctrl_c_and_a_killed_client(gateway: Gateway) -> None:
    access = gateway.access("--tunnel").wait_ready()
    sleeper = subprocess.Popen(
        ["psql", f"{access.url}&application_name=sleeper", "-X", "-c", "select pg_sleep(60)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: _active(access.url, "sleeper"))
    sleeper.send_signal(signal.SIGINT)  # psql sends a CancelRequest, through the tunnel
    _out, err = sleeper.communicate(timeout=60)
    assert "canceling statement due to user request" in err
    killed = subprocess.Popen(
        ["psql", f"{access.url}&application_name=killed", "-X", "-c", "select pg_sleep(60)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _active(access.url, "killed"))
    killed.kill()
    killed.wait()
    result = psql(access.url, "select 'still serving'")
    assert result.stdout.strip() == "still serving", result.stderr
    assert access.proc.poll() is None


def test_an_expired_grants_certificate_gets_the_fatal_naming_the_expiry(
    gateway: Gateway, forwarders: list[Forwarder]
) -> None:
    key = pki.new_key()
    session = _open_with_key(gateway, key, seconds=2)
    cert, ca = str(session["certificate"]).encode(), str(session["ca_cert_pem"]).encode()
    port = forward_tunnel(forwarders, cert, key, ca, int(str(session["tunnel_port"])))
    with gateway.api() as api:
        wait_for(lambda: api.get(f"/v1/sessions/{session['id']}")["session"]["ended_at"])
    error = connect_error(port, "app_scram", "appdb")
    assert (error.severity, error.sqlstate) == (
        "FATAL",
        SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
    )
    assert "expired" in error.message


def test_an_ended_grants_certificate_gets_the_fatal_with_the_reason(
    gateway: Gateway, forwarders: list[Forwarder]
) -> None:
    key = pki.new_key()
    session = _open_with_key(gateway, key)
    cert, ca = str(session["certificate"]).encode(), str(session["ca_cert_pem"]).encode()
    port = forward_tunnel(forwarders, cert, key, ca, int(str(session["tunnel_port"])))
    with psycopg.connect(
        host="127.0.0.1", port=port, user="app_scram", dbname="appdb", sslmode="disable"
    ) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with gateway.api() as api:
        api.end_access(str(session["id"]))
    error = connect_error(port, "app_scram", "appdb")
    assert (error.severity, error.sqlstate) == (
        "FATAL",
        SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
    )
    assert "has ended" in error.message and "client_ended" in error.message
    # On record as a refusal of the tunnel, naming the grant's end.
    refused = [
        r
        for r in gateway.cli_json("audit", "refusals")
        if (r["place"], r["reason"]) == ("tunnel", "grant_ended")
    ]
    assert refused and "has ended" in refused[0]["message"]


def test_a_certificate_of_another_ca_is_refused_with_28000(
    gateway: Gateway, forwarders: list[Forwarder], tmp_path: Path
) -> None:
    key = pki.new_key()
    session = _open_with_key(gateway, key)
    ca = str(session["ca_cert_pem"]).encode()
    other = pki.ensure_pki(tmp_path, SecretBox(bytes(32)), ())
    forged = other.issue_grant(
        key.public_key(), str(session["id"]), dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    )
    port = forward_tunnel(forwarders, forged, key, ca, int(str(session["tunnel_port"])))
    error = connect_error(port, "app_scram", "appdb")
    assert (error.severity, error.sqlstate) == (
        "FATAL",
        SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
    )
    assert "refused this access's certificate" in error.message
    wait_for(
        lambda: any(e.get("event") == "tunnel_handshake_refused" for e in gateway.log_events())
    )
    refused = [
        r
        for r in gateway.cli_json("audit", "refusals")
        if (r["place"], r["reason"]) == ("tunnel", "tunnel_handshake")
    ]
    assert refused and refused[0]["source"] == "127.0.0.1"


def test_an_unreachable_gateway_is_08001_naming_it(
    gateway: Gateway, forwarders: list[Forwarder]
) -> None:
    key = pki.new_key()
    session = _open_with_key(gateway, key)
    cert, ca = str(session["certificate"]).encode(), str(session["ca_cert_pem"]).encode()
    dead = free_port()
    port = forward_tunnel(forwarders, cert, key, ca, dead)
    error = connect_error(port, "app_scram", "appdb")
    assert error.sqlstate == SqlState.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, error
    assert f"127.0.0.1:{dead}" in error.message
