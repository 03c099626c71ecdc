"""Failures a person can act on: on the wire, through `pam resource verify`, and in the CLI.

Each upstream failure is checked three ways: the ErrorResponse a client gets
through `pam db access` (SQLSTATE, message, hint), `pam resource verify` (one
line on stderr, exit 1) and `pam resource verify --json`. The daemon, the CLI,
PostgreSQL 15 and the clients are all real processes.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import (
    Gateway,
    assert_one_error_line,
    connect_error,
    edit_store,
    free_port,
    unique,
    wait_for,
)

from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

#: Bound on every raw-socket read, so a missing reply fails the test instead of hanging it.
SOCKET_TIMEOUT = 30.0
PROTOCOL_2_0 = 0x0002_0000
PROTOCOL_3_0 = 0x0003_0000


# --- helpers ------------------------------------------------------------------------


def add_resource(
    gateway: Gateway,
    name: str,
    *,
    host: str,
    port: int,
    ssl_mode: str = "verify-full",
    ca_cert: Path | None = None,
) -> None:
    args = ["resource", "add", name, "--host", host, "--port", str(port)]
    args += ["--database", APP_DATABASE, "--ssl-mode", ssl_mode]
    if ca_cert is not None:
        args += ["--ca-cert", str(ca_cert)]
    gateway.cli(*args)


def add_account(gateway: Gateway, resource: str, name: str, username: str, password: str) -> None:
    # Unchecked: these accounts are broken on purpose, to see the failure at connect.
    gateway.cli(
        "account",
        "add",
        resource,
        name,
        "--username",
        username,
        "--password-stdin",
        "--no-verify",
        input=password + "\n",
    )


def verify(gateway: Gateway, resource: str, account: str) -> subprocess.CompletedProcess[str]:
    return gateway.cli("resource", "verify", resource, "--account", account, check=False)


def verify_json(gateway: Gateway, resource: str, account: str | None = None) -> list[Any]:
    args = ["resource", "verify", resource, "--json"]
    if account is not None:
        args += ["--account", account]
    result = gateway.cli(*args, check=False)
    assert "Traceback" not in result.stderr
    results: list[Any] = json.loads(result.stdout)
    assert result.returncode == (0 if all(r["ok"] for r in results) else 1)
    return results


def db_access(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """`pam db access` on prod/scram that is expected to fail before holding a grant."""
    return gateway.cli(
        "db", "access", "--resource", "prod", "--account", "scram", *args, check=False
    )


def startup_packet(version: int = PROTOCOL_3_0, **params: str) -> bytes:
    body = struct.pack("!I", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def read_messages(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    """Every backend message until the server closes the connection: (type, body)."""
    sock.settimeout(SOCKET_TIMEOUT)
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    messages = []
    offset = 0
    while offset < len(data):
        mtype = bytes(data[offset : offset + 1])
        (length,) = struct.unpack_from("!I", data, offset + 1)
        messages.append((mtype, bytes(data[offset + 5 : offset + 1 + length])))
        offset += 1 + length
    assert offset == len(data), f"truncated message in {bytes(data)!r}"
    return messages


def error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse fields by their one-letter code (55.8 "Error and Notice Message Fields")."""
    fields = {}
    for item in body.rstrip(b"\0").split(b"\0"):
        fields[chr(item[0])] = item[1:].decode()
    return fields


def raw_exchange(port: int, payload: bytes) -> list[tuple[bytes, bytes]]:
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(payload)
        return read_messages(sock)


def only_error(messages: list[tuple[bytes, bytes]]) -> dict[str, str]:
    assert [mtype for mtype, _ in messages] == [b"E"], messages
    return error_fields(messages[0][1])


def current_user(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("select current_user").fetchone()
    assert row is not None
    return str(row[0])


# --- upstream failures ----------------------------------------------------------------


def test_an_unreachable_upstream_is_08001_naming_host_port_and_cause(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    closed = free_port()
    add_resource(gateway, "down", host="127.0.0.1", port=closed, ca_cert=pg.ca_cert_path)
    add_account(gateway, "down", "scram", pg_roles["scram"].name, pg_roles["scram"].password)
    access = gateway.access(resource="down").wait_ready()

    error = connect_error(access.port, access.user, access.database)
    assert (error.severity, error.sqlstate) == ("FATAL", "08001")
    assert error.message == (
        f"could not connect to upstream down at 127.0.0.1:{closed}: connection refused"
    )
    assert error.hint == "is PostgreSQL running there and accepting TCP connections on that port?"
    with pytest.raises(psycopg.OperationalError, match=f"127.0.0.1:{closed}: connection refused"):
        psycopg.connect(access.dsn())

    line = assert_one_error_line(verify(gateway, "down", "scram"))
    assert line.startswith(f"FAILED  down/scram at 127.0.0.1:{closed}: [refused, 08001]")
    assert "connection refused" in line
    [result] = verify_json(gateway, "down", "scram")
    assert result["ok"] is False
    assert (result["error_kind"], result["error_sqlstate"]) == ("refused", "08001")
    assert result["address"] == f"127.0.0.1:{closed}"


def test_an_unresolvable_host_is_08001_naming_the_host(
    gateway: Gateway, pg_roles: Mapping[str, PgRole]
) -> None:
    # RFC 6761 reserves .invalid: it never resolves.
    add_resource(gateway, "nxdomain", host="no-such-host.invalid", port=5432)
    add_account(gateway, "nxdomain", "scram", pg_roles["scram"].name, pg_roles["scram"].password)
    access = gateway.access(resource="nxdomain").wait_ready()

    error = connect_error(access.port, access.user, access.database)
    assert (error.severity, error.sqlstate) == ("FATAL", "08001")
    assert error.message.startswith(
        "could not resolve host name 'no-such-host.invalid' of upstream nxdomain:"
    )
    assert error.hint == "check the resource's --host"
    line = assert_one_error_line(verify(gateway, "nxdomain", "scram"))
    assert "[dns, 08001] could not resolve host name 'no-such-host.invalid'" in line
    [result] = verify_json(gateway, "nxdomain", "scram")
    assert (result["ok"], result["error_kind"]) == (False, "dns")


def test_verify_of_an_unknown_resource_or_account_or_none_at_all_is_one_error_line(
    gateway: Gateway, pg: TempCluster
) -> None:
    result = gateway.cli("resource", "verify", "nope", check=False)
    assert assert_one_error_line(result) == "error: resource 'nope' not found"
    result = gateway.cli("resource", "verify", "prod", "--account", "nope", check=False)
    assert assert_one_error_line(result) == "error: account 'nope' not found on resource 'prod'"
    add_resource(gateway, "empty", host=pg.host, port=pg.port, ca_cert=pg.ca_cert_path)
    result = gateway.cli("resource", "verify", "empty", check=False)
    assert assert_one_error_line(result) == (
        "error: resource 'empty' has no accounts to verify with"
        " (hint: add one with `pam account add empty NAME --username USER`)"
    )


def test_a_wrong_stored_password_is_28p01_naming_resource_and_account_but_not_the_password(
    gateway: Gateway, pg_roles: Mapping[str, PgRole]
) -> None:
    wrong = "not-the-Password-" + secrets.token_hex(6)
    add_account(gateway, "prod", "stale", pg_roles["scram"].name, wrong)
    access = gateway.access(account="stale").wait_ready()

    error = connect_error(access.port, access.user, access.database)
    assert (error.severity, error.sqlstate) == ("FATAL", "28P01")
    assert error.message.startswith(
        "upstream prod rejected the stored credentials of account 'stale' (user 'app_scram'):"
    )
    assert "password authentication failed" in error.message
    assert error.hint is not None
    assert "pam resource verify prod --account stale" in error.hint
    assert "pam account rotate prod stale" in error.hint
    assert wrong not in error.message + error.hint

    line = assert_one_error_line(verify(gateway, "prod", "stale"))
    assert "[auth, 28P01]" in line
    assert wrong not in line
    # The hint names the next step, not the command just run.
    assert "pam account rotate prod stale" in line
    assert "pam resource verify" not in line
    [result] = verify_json(gateway, "prod", "stale")
    assert (result["ok"], result["error_kind"], result["error_sqlstate"]) == (
        False,
        "auth",
        "28P01",
    )

    gateway.cli(
        "account",
        "rotate",
        "prod",
        "stale",
        "--password-stdin",
        input=pg_roles["scram"].password + "\n",
    )
    assert access.proc.poll() is None
    assert current_user(access.dsn()) == "app_scram"
    assert wrong.encode() not in gateway.transcript.text()


def test_a_server_certificate_from_another_ca_is_08001_certificate_verify_failed(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    add_resource(gateway, "otherca", host=pg.host, port=pg.port, ca_cert=pg.other_ca_cert_path)
    add_account(gateway, "otherca", "scram", pg_roles["scram"].name, pg_roles["scram"].password)
    access = gateway.access(resource="otherca").wait_ready()

    error = connect_error(access.port, access.user, access.database)
    assert (error.severity, error.sqlstate) == ("FATAL", "08001")
    assert error.message.startswith(
        f"TLS verification of upstream otherca at {pg.host}:{pg.port} failed:"
    )
    assert error.message.endswith(
        "failed: certificate verify failed: unable to get local issuer certificate"
    )
    assert error.hint is not None and "--ca-cert" in error.hint

    line = assert_one_error_line(verify(gateway, "otherca", "scram"))
    assert "[tls, 08001]" in line and "certificate verify failed" in line
    [result] = verify_json(gateway, "otherca", "scram")
    assert (result["ok"], result["error_kind"], result["error_sqlstate"]) == (False, "tls", "08001")


def test_verify_full_by_host_name_works_because_the_certificate_names_localhost(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    add_resource(gateway, "byname", host="localhost", port=pg.port, ca_cert=pg.ca_cert_path)
    add_account(gateway, "byname", "scram", pg_roles["scram"].name, pg_roles["scram"].password)

    [result] = verify_json(gateway, "byname", "scram")
    assert result["ok"] is True, result
    assert result["address"] == f"localhost:{pg.port}"
    assert result["ssl_mode"] == "verify-full"
    assert result["tls_version"].startswith("TLSv1.")
    access = gateway.access(resource="byname").wait_ready()
    assert current_user(access.dsn()) == "app_scram"


# --- authentication methods -------------------------------------------------------------


def test_verify_reports_the_auth_method_and_tls_of_each_stored_account(gateway: Gateway) -> None:
    results = {r["account"]: r for r in verify_json(gateway, "prod")}

    assert sorted(results) == ["md5", "plain", "scram"]
    assert all(r["ok"] for r in results.values()), results
    assert results["md5"]["auth_method"] == "md5"
    assert results["scram"]["auth_method"] in ("scram-sha-256", "scram-sha-256-plus")
    assert results["plain"]["auth_method"] == "password"
    for result in results.values():
        assert result["tls_version"].startswith("TLSv1.")
        assert result["cipher"]
        assert result["server_version"].startswith("15")
        assert result["error_kind"] is None
    text = gateway.cli("resource", "verify", "prod")
    assert [line.split()[:2] for line in text.stdout.splitlines()] == [
        ["ok", "prod/md5"],
        ["ok", "prod/plain"],
        ["ok", "prod/scram"],
    ]


@pytest.mark.parametrize(("account", "user"), [("md5", "md5_app"), ("plain", "plain_app")])
def test_md5_and_cleartext_accounts_work_through_the_gateway(
    gateway: Gateway, account: str, user: str
) -> None:
    access = gateway.access(account=account).wait_ready()
    assert current_user(access.dsn()) == user


def test_a_cleartext_password_is_never_sent_without_tls(gateway: Gateway, pg: TempCluster) -> None:
    role = unique("plainnossl_")
    password = "nossl-Pw-" + secrets.token_hex(6)
    pg.create_role(role, password)
    pg.admin_sql(f'GRANT CONNECT ON DATABASE {APP_DATABASE} TO "{role}";')
    add_resource(gateway, "nossl", host=pg.host, port=pg.port, ssl_mode="disable")
    add_account(gateway, "nossl", "plain", role, password)
    access = gateway.access(resource="nossl", account="plain").wait_ready()

    error = connect_error(access.port, access.user, access.database)
    assert (error.severity, error.sqlstate) == ("FATAL", "28000")
    assert error.message == (
        f"upstream nossl at {pg.host}:{pg.port}: upstream server requested cleartext password"
        " authentication, which pam only sends over TLS; set the resource's ssl mode to"
        " require or verify-full, or use scram-sha-256 in pg_hba.conf"
    )
    line = assert_one_error_line(verify(gateway, "nossl", "plain"))
    assert "[unsupported_auth, 28000]" in line
    [result] = verify_json(gateway, "nossl", "plain")
    assert (result["ok"], result["error_kind"]) == (False, "unsupported_auth")

    # The same role over TLS: the gateway sends the password, the server accepts it.
    add_resource(gateway, "withssl", host=pg.host, port=pg.port, ca_cert=pg.ca_cert_path)
    add_account(gateway, "withssl", "plain", role, password)
    [result] = verify_json(gateway, "withssl", "plain")
    assert (result["ok"], result["auth_method"]) == (True, "password")
    assert password.encode() not in gateway.transcript.text()


# --- refused grants -----------------------------------------------------------------------


def test_a_grant_for_an_unknown_resource_or_account_is_one_error_line(gateway: Gateway) -> None:
    result = gateway.cli("db", "access", "--resource", "nope", "--account", "x", check=False)
    assert assert_one_error_line(result) == "error: resource 'nope' not found"
    result = gateway.cli("db", "access", "--resource", "prod", "--account", "x", check=False)
    assert assert_one_error_line(result) == "error: account 'x' not found on resource 'prod'"


def test_a_malformed_duration_is_a_usage_error(gateway: Gateway) -> None:
    result = db_access(gateway, "--duration", "5x")
    assert result.returncode == 2
    assert "'5x' is not a duration like 1h, 30m, 1h30m or 90s" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_duration_over_the_maximum_is_refused_naming_the_limit(gateway: Gateway) -> None:
    result = db_access(gateway, "--duration", "100h")
    line = assert_one_error_line(result)
    assert line == (
        "error: duration must be between 1 second and 12:00:00 (hint: ask for a shorter --duration)"
    )
    assert gateway.cli_json("sessions", "list", "--active") == []


def test_a_port_already_in_use_is_refused_with_a_clear_message(gateway: Gateway) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = db_access(gateway, "--port", str(port))
    line = assert_one_error_line(result)
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line
    assert line.endswith("(hint: pick another --port, or omit it for a free one)")
    [session] = gateway.cli_json("sessions", "list")
    assert session["end_reason"] == "error"
    assert session["ended_at"] is not None


# --- misbehaving local clients ----------------------------------------------------------------


def test_a_protocol_2_startup_gets_08p01_and_the_session_keeps_working(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()

    error = only_error(raw_exchange(access.port, struct.pack("!II", 8, PROTOCOL_2_0)))
    assert (error["S"], error["C"]) == ("FATAL", "08P01")
    assert error["M"] == (
        "unsupported frontend protocol 2.0: this gateway supports protocol 3.0 and later 3.x"
    )
    result = subprocess.run(
        ["psql", access.url, "-X", "-At", "-c", "select 'still open'"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "still open\n"), result.stderr


def test_a_client_that_sends_nothing_is_closed_after_the_startup_timeout(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> None:
    gateway = Gateway(tmp_path)
    gateway.init()
    settings_path = gateway.home / "gateway.json"
    settings = json.loads(settings_path.read_text())
    settings["client_startup_timeout_seconds"] = 0.5
    settings_path.write_text(json.dumps(settings))
    gateway.start()
    try:
        add_resource(gateway, "prod", host=pg.host, port=pg.port, ca_cert=pg.ca_cert_path)
        add_account(gateway, "prod", "scram", pg_roles["scram"].name, pg_roles["scram"].password)
        access = gateway.access().wait_ready()

        error = only_error(raw_exchange(access.port, b""))
        assert (error["S"], error["C"]) == ("FATAL", "08P01")
        assert error["M"] == "timed out waiting for the startup packet"
        # A half-sent startup packet is no different from silence.
        error = only_error(raw_exchange(access.port, startup_packet(user="app_scram")[:6]))
        assert error["M"] == "timed out waiting for the startup packet"
        assert current_user(access.dsn()) == "app_scram"
    finally:
        gateway.close()


def test_a_replication_connection_is_refused_with_0a000(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()

    for value in ("database", "true"):
        packet = startup_packet(user=access.user, database=access.database, replication=value)
        error = only_error(raw_exchange(access.port, packet))
        assert (error["S"], error["C"]) == ("FATAL", "0A000")
        assert error["M"] == "replication connections are not allowed through pam"
    result = subprocess.run(
        ["psql", f"{access.url}&replication=database", "-X", "-At", "-c", "IDENTIFY_SYSTEM"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "replication connections are not allowed through pam" in result.stderr
    # Refused before anything was relayed: no connection was opened upstream.
    assert gateway.cli_json("sessions", "show", access.session_prefix)["connections"] == []


def test_a_connection_the_store_cannot_record_is_refused_with_57p03_and_its_upstream_closed(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    role = pg_roles["scram"].name
    count = f"select count(*) from pg_stat_activity where usename = '{role}'"
    before = pg.admin_sql(count).strip()
    access = gateway.access().wait_ready()
    edit_store(
        gateway,
        "create trigger connections_test_block before insert on connections"
        " begin select raise(abort, 'blocked by the test'); end",
    )
    refused = connect_error(access.port, access.user, access.database)
    assert (refused.severity, refused.sqlstate) == ("FATAL", "57P03")
    assert refused.message == (
        "pam cannot record this connection, so it refuses it: the gateway's store is not writable"
    )
    # The upstream session it had opened is closed, not left behind.
    wait_for(lambda: pg.admin_sql(count).strip() == before)
    edit_store(gateway, "drop trigger connections_test_block")
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        assert conn.execute("select 'recorded'").fetchone() == ("recorded",)
    access.stop()
    detail = gateway.cli_json("sessions", "show", access.session_prefix, "--all")
    assert len(detail["connections"]) == 1
    assert detail["connections"][0]["backend_pid"] is not None
