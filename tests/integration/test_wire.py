"""Protocol fidelity on the local port, driven by hand where no client goes:
protocol versions and negotiation, cancel keys, encryption requests, bad input."""

from __future__ import annotations

import random
import socket
import ssl
import struct
from typing import Any

import psycopg
import pytest
from harness import Gateway, RawClient, error_fields, wait_for

from gateway.protocol import messages
from gateway.protocol.constants import (
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    SSL_REQUEST_CODE,
)
from gateway.protocol.messages import parse_backend_key_data
from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    """These tests only open access sessions: one daemon serves the module."""
    return shared_gateway


USER = "app_scram"
DB = "appdb"
GREASE = (3 << 16) | 9999


def _by_type(msgs: list, kind: bytes) -> list:
    return [m for m in msgs if m.type == kind[0]]


def test_a_grease_version_and_unknown_options_are_negotiated_down(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        msgs = client.startup(USER, DB, version=GREASE, **{"_pq_.grease_opt": "on"})
        negotiate = msgs[0]
        assert negotiate.type == ord("v")
        newest, count = struct.unpack_from("!II", negotiate.body)
        assert newest == PROTOCOL_3_2
        assert count == 1
        assert negotiate.body[8:] == b"_pq_.grease_opt\x00"
        assert msgs[1].type == ord("R") and msgs[1].body == b"\x00\x00\x00\x00"
        key = parse_backend_key_data(_by_type(msgs, b"K")[0].body)
        assert len(key.secret) == 32
        rows = _by_type(client.query("select 6 * 7"), b"D")
        assert rows[0].body == b"\x00\x01\x00\x00\x00\x0242"


def test_protocol_3_0_clients_get_a_four_byte_key_and_no_negotiation(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        msgs = client.startup(USER, DB, version=PROTOCOL_3_0)
        assert _by_type(msgs, b"v") == []
        key = parse_backend_key_data(_by_type(msgs, b"K")[0].body)
        assert len(key.secret) == 4
        pid_row = _by_type(client.query("select pg_backend_pid()"), b"D")[0]
        assert int(pid_row.body[6:]) == key.pid


def _cancel_packet(pid: int, secret: bytes) -> bytes:
    return messages.cancel_request(pid, secret)


@pytest.mark.parametrize("version", [PROTOCOL_3_0, PROTOCOL_3_2], ids=["3.0", "3.2"])
def test_a_cancel_with_the_gateway_key_stops_the_query_and_a_wrong_key_does_not(
    gateway: Gateway, pg: TempCluster, version: int
) -> None:
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        key = parse_backend_key_data(
            _by_type(client.startup(USER, DB, version=version), b"K")[0].body
        )
        client.send(messages.encode_message(ord("Q"), b"select pg_sleep(60)\x00"))
        wait_for(
            lambda: (
                pg.admin_sql(f"select state from pg_stat_activity where pid = {key.pid}")
                == "active"
            )
        )
        wrong = bytes([key.secret[0] ^ 1]) + key.secret[1:]
        for secret in (wrong, b"\x00" * len(key.secret)):
            with socket.create_connection(("127.0.0.1", access.port), timeout=30) as other:
                other.sendall(_cancel_packet(key.pid, secret))
                assert other.recv(100) == b""  # dropped silently, as the server does
        assert pg.admin_sql(f"select state from pg_stat_activity where pid = {key.pid}") == "active"
        with socket.create_connection(("127.0.0.1", access.port), timeout=30) as other:
            other.sendall(_cancel_packet(key.pid, key.secret))
            assert other.recv(100) == b""
        msgs = client.read_until(b"Z")
        assert error_fields(_by_type(msgs, b"E")[0])["C"] == "57014"
        assert _by_type(client.query("select 1"), b"D")[0].body.endswith(b"1")


def test_gssenc_requests_are_refused_with_n_and_startup_continues(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        client.send(struct.pack("!II", 8, GSSENC_REQUEST_CODE))
        assert client.recv_raw(1) == b"N"
        msgs = client.startup(USER, DB)
        assert msgs[-1].type == ord("Z")


def test_bytes_after_an_ssl_request_close_the_connection(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        client.send(
            struct.pack("!II", 8, SSL_REQUEST_CODE) + messages.startup_message({"user": USER})
        )
        msgs = client.read_all_until_close()
        assert [m.type for m in msgs] == [ord("E")]
        assert error_fields(msgs[0])["C"] == "08P01"


def _direct_tls(port: int, alpn: list[str]) -> RawClient:
    """A client that opens with a TLS ClientHello (sslnegotiation=direct)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    client = RawClient(port)
    client.sock = ctx.wrap_socket(client.sock, server_hostname="localhost")
    return client


def test_direct_tls_with_the_postgresql_alpn_is_served(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with _direct_tls(access.port, ["postgresql"]) as client:
        assert client.sock.selected_alpn_protocol() == "postgresql"
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        msgs = client.startup(USER, DB)
        assert msgs[-1].type == ord("Z")
        rows = _by_type(client.query("select 6 * 7"), b"D")
        assert rows[0].body == b"\x00\x01\x00\x00\x00\x0242"


def test_direct_tls_without_the_postgresql_alpn_is_refused_over_tls(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with _direct_tls(access.port, []) as client:
        # Refused right after the handshake, before a startup packet is read.
        msgs = client.read_all_until_close()
    assert [m.type for m in msgs] == [ord("E")]
    fields = error_fields(msgs[0])
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert "ALPN" in fields["M"]


def test_terminate_before_the_startup_packet_is_closed_without_a_reply(gateway: Gateway) -> None:
    # node-postgres's quick-disconnect sends Terminate first. Its length word,
    # 0x58000000, cannot be a startup packet: PostgreSQL logs "invalid length of
    # startup packet" and closes without a byte, and so does pam.
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        client.send(b"X\x00\x00\x00\x04")
        assert client.recv_raw() == b""
    wait_for(lambda: "invalid startup packet length 1476395008" in gateway.log())

    # The trail keeps it too: a connection that ended in an error, with the reason.
    def recorded() -> list[dict[str, Any]]:
        detail: dict[str, Any] = gateway.cli_json("sessions", "show", access.session_prefix)
        return [c for c in detail["connections"] if c["ended_at"]]

    [record] = wait_for(recorded)
    assert (record["end_reason"], record["error_sqlstate"]) == ("error", "08P01")
    assert "invalid startup packet length 1476395008" in record["error_message"]
    assert (record["bytes_from_client"], record["bytes_from_server"]) == (0, 0)


def test_a_client_that_closes_before_sending_a_byte_leaves_no_record(gateway: Gateway) -> None:
    # A TCP probe (connect, close) is no connection: PostgreSQL logs nothing.
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        client.sock.shutdown(socket.SHUT_WR)
        assert client.recv_raw() == b""
    with psycopg.connect(access.dsn()) as conn:  # a real one, recorded after the probe
        conn.execute("select 1")
    detail: dict[str, Any] = gateway.cli_json("sessions", "show", access.session_prefix)
    assert len(detail["connections"]) == 1


def test_an_oversized_startup_packet_is_closed_without_a_reply_before_its_body(
    gateway: Gateway,
) -> None:
    # As PostgreSQL does for a length it will not read ("invalid length of
    # startup packet"): no reply, the reason in the log.
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        client.send(struct.pack("!II", 10 * 1024 * 1024, PROTOCOL_3_0))
        assert client.recv_raw() == b""
    wait_for(lambda: "invalid startup packet length 10485760" in gateway.log())


def test_an_oversized_message_after_startup_ends_only_that_connection(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    bystander = psycopg.connect(access.dsn())
    with RawClient(access.port) as client:
        client.startup(USER, DB)
        client.send(b"Q" + struct.pack("!I", 0x7FFFFFFF))
        msgs = client.read_all_until_close()
    fields = error_fields(msgs[-1])
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert "invalid length" in fields["M"]
    assert bystander.execute("select 'unaffected'").fetchone() == ("unaffected",)
    bystander.close()


def test_random_bytes_are_closed_or_refused_and_other_sessions_keep_working(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    bystander = psycopg.connect(access.dsn(), autocommit=True)
    rng = random.Random(20261123)
    answered = 0
    for _ in range(25):
        garbage = rng.randbytes(rng.randint(8, 4096))
        with RawClient(access.port) as client:
            client.send(garbage)
            try:
                msgs = client.read_all_until_close()
            except ConnectionResetError:
                msgs = []
        # Either one 08P01 ErrorResponse (for a packet of a valid length that is
        # no valid startup packet), or a silent close (for a length that cannot
        # be a startup packet, as PostgreSQL does, or a CancelRequest-shaped
        # packet); never a hang, never a crash.
        if msgs:
            assert [m.type for m in msgs] == [ord("E")], msgs
            fields = error_fields(msgs[0])
            assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
            answered += 1
    # This seed's packets all declare a length far past the startup limit, so
    # none is answered.
    assert answered == 0
    assert bystander.execute("select 'alive'").fetchone() == ("alive",)
    bystander.close()


def test_a_client_that_sends_nothing_is_closed_after_the_startup_timeout(
    pg: TempCluster, tmp_path
) -> None:
    import json

    gw = Gateway(tmp_path)
    gw.init()
    settings = json.loads((gw.home / "gateway.json").read_text())
    settings["client_startup_timeout_seconds"] = 1.0
    (gw.home / "gateway.json").write_text(json.dumps(settings))
    gw.start()
    try:
        gw.cli(
            "resource",
            "add",
            "p",
            "--host",
            pg.host,
            "--port",
            str(pg.port),
            "--database",
            DB,
            "--ca-cert",
            str(pg.ca_cert_path),
        )
        gw.cli(
            "account",
            "add",
            "p",
            "a",
            "--username",
            USER,
            "--password-stdin",
            input="s3cret-scram-Pw!\n",
        )
        access = gw.access(resource="p", account="a").wait_ready()
        with RawClient(access.port) as client:
            msgs = client.read_all_until_close()
        fields = error_fields(msgs[0])
        assert fields["C"] == "08P01"
        assert fields["M"] == "timed out waiting for the startup packet"
    finally:
        gw.close()


def test_an_upstream_asking_for_gssapi_gets_a_fatal_naming_the_method(
    gateway: Gateway, pg: TempCluster
) -> None:
    pg.create_role("gss_user", "unused-password")
    gateway.cli(
        "account",
        "add",
        "prod",
        "gss",
        "--username",
        "gss_user",
        "--password-stdin",
        # The check would meet the same gssapi request: stored unchecked.
        "--no-verify",
        input="unused-password\n",
    )
    access = gateway.access(account="gss").wait_ready()
    with RawClient(access.port) as client:
        client.send(messages.startup_message({"user": "gss_user", "database": DB}))
        msgs = client.read_all_until_close()
    fields = error_fields(msgs[0])
    assert fields["S"] == "FATAL"
    assert "requested GSSAPI authentication" in fields["M"]
    assert "scram-sha-256" in fields["M"]


def test_a_non_ascii_password_is_saslprepped_like_the_server_does(
    gateway: Gateway, pg: TempCluster
) -> None:
    # U+2168 (ROMAN NUMERAL NINE) becomes "IX" and U+00AD (soft hyphen) vanishes
    # under SASLprep; the server normalised the same way when storing the verifier.
    password = "p\u00e4ss-\u2168-w\u00f6rd\u00ad-\u00f1"
    pg.admin_sql(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE intl_user LOGIN PASSWORD '"
        + password
        + "'; GRANT CONNECT ON DATABASE appdb TO intl_user;"
    )
    gateway.cli(
        "account",
        "add",
        "prod",
        "intl",
        "--username",
        "intl_user",
        "--password-stdin",
        input=password + "\n",
    )
    access = gateway.access(account="intl").wait_ready()
    with psycopg.connect(access.dsn()) as conn:
        assert conn.execute("select current_user").fetchone() == ("intl_user",)


def test_scram_channel_binding_is_used_over_verified_tls(gateway: Gateway) -> None:
    result = gateway.cli_json("resource", "verify", "prod", "--account", "scram")
    assert result[0]["ok"] is True
    assert result[0]["auth_method"] == "scram-sha-256-plus"
    assert result[0]["tls_version"] in ("TLSv1.2", "TLSv1.3")


def test_a_local_client_that_requires_tls_is_served_and_can_verify_the_gateway(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    cert = gateway.home / "local-tls.crt"
    with psycopg.connect(
        access.dsn(sslmode="verify-full", host="localhost", sslrootcert=str(cert))
    ) as conn:
        assert conn.execute("select 2").fetchone() == (2,)


def test_a_function_call_message_is_relayed_and_answered(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        client.startup(USER, DB)
        oid_row = _by_type(client.query("select 'int4pl'::regproc::oid"), b"D")[0]
        oid = int(oid_row.body[6:])
        # FunctionCall (55.7): oid, 1 arg format (text), 2 args, result format text
        body = struct.pack("!IhhhI", oid, 1, 0, 2, 2) + b"40" + struct.pack("!I", 1) + b"2"
        body += struct.pack("!h", 0)
        client.send(messages.encode_message(ord("F"), body))
        msgs = client.read_until(b"Z")
        result = _by_type(msgs, b"V")[0]
        assert result.body == struct.pack("!I", 2) + b"42"
