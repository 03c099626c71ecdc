"""Every refusal on record, floods summarised, bursts accepted: a real daemon
(``python -m cli gateway run``), a real PostgreSQL and real sockets.

1,000 random CancelRequests and 1,000 API calls with a made-up token give two
records and two log lines each (the first, then one summary), their counts
adding up to exactly 1,000; each kind of refusal names who (when known), from
where and why; 2,000 connections opened at once through a grant are all
accepted by a port whose backlog takes them, and all served.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import struct
import subprocess
from typing import Any

import pytest
from harness import Gateway, RawClient, error_fields

from cli.client import ApiClient, ApiError
from gateway.config import GATEWAY_FILE
from gateway.protocol import messages
from gateway.protocol.constants import CANCEL_REQUEST_CODE, PROTOCOL_3_0

MEMBER_PASSWORD = "member-pw-" + secrets.token_hex(6)


def _restart_with(gateway: Gateway, **settings: Any) -> None:
    gateway.stop()
    path = gateway.home / GATEWAY_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    gateway.start()


def _client(gateway: Gateway, token: str) -> ApiClient:
    with gateway.api() as api:
        profile = api.config.model_copy(update={"token": token})
    return ApiClient(profile, timeout=30)


def _random_cancel(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            struct.pack("!III", 16, CANCEL_REQUEST_CODE, secrets.randbelow(1 << 31))
            + secrets.token_bytes(4)
        )
        return sock.recv(1)


def _logged(gateway: Gateway, reason: str) -> list[dict[str, Any]]:
    return [e for e in gateway.log_events() if e.get("reason") == reason and "count" in e]


def test_a_flood_of_cancels_and_bad_tokens_is_a_handful_of_records(gateway: Gateway) -> None:
    # One interval for the whole test: the read below ends it.
    _restart_with(gateway, refusal_interval_seconds=3600)
    access = gateway.access().wait_ready()
    for _ in range(1000):
        assert _random_cancel(access.port) == b""  # dropped without a word, as PostgreSQL does
    with _client(gateway, "pam_" + secrets.token_hex(20)) as stranger:
        for _ in range(1000):
            with pytest.raises(ApiError) as refused:
                stranger.get("/v1/sessions")
            assert refused.value.status == 401
    records = gateway.cli_json("audit", "refusals")
    for reason, place in (("unknown_cancel_key", "listener"), ("bad_token", "api")):
        mine = [r for r in records if r["reason"] == reason]
        assert sorted(r["count"] for r in mine) == [1, 999], mine
        assert {(r["place"], r["source"]) for r in mine} == {(place, "127.0.0.1")}
        lines = _logged(gateway, reason)
        assert len(lines) == 2
        assert sum(line["count"] for line in lines) == 1000
    cancels = [r for r in records if r["reason"] == "unknown_cancel_key"]
    assert {r["session_id"] for r in cancels} == {
        next(
            s["id"]
            for s in gateway.cli_json("sessions", "list")
            if s["id"].startswith(access.session_prefix)
        )
    }
    text = gateway.cli("audit", "refusals", "--since", "1h").stdout
    assert any("x999  unknown_cancel_key  listener session" in line for line in text.splitlines())
    assert any("x999  bad_token  api  from 127.0.0.1" in line for line in text.splitlines())


def _member(gateway: Gateway, name: str) -> ApiClient:
    with gateway.api() as admin:
        admin.post("/v1/users", {"name": name, "role": "member", "password": MEMBER_PASSWORD})
        token = admin.post("/v1/login", {"user": name, "password": MEMBER_PASSWORD})["token"]
    return _client(gateway, token)


def test_each_refusal_names_who_where_and_why(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with RawClient(access.port) as client:
        client.send(
            messages.startup_message({"user": "mallory", "database": access.database}, PROTOCOL_3_0)
        )
        assert error_fields(client.read_message())["C"] == "28000"
    with RawClient(access.port) as client:
        client.send(
            messages.startup_message({"user": access.user, "database": "postgres"}, PROTOCOL_3_0)
        )
        assert error_fields(client.read_message())["C"] == "3D000"
    with RawClient(access.port) as client:
        client.send(b"GET / HTTP/1.1\r\n\r\n")
        client.read_all_until_close()
    with _client(gateway, "") as anonymous, pytest.raises(ApiError):
        anonymous.get("/v1/resources")
    name = "bob" + secrets.token_hex(3)
    with _member(gateway, name) as bob:
        with _client(gateway, "") as anonymous, pytest.raises(ApiError):
            anonymous.post("/v1/login", {"user": name, "password": "not-his-password"})
        with pytest.raises(ApiError) as forbidden:
            bob.post("/v1/resources", {"name": "x", "host": "h", "port": 5432, "database": "d"})
        assert forbidden.value.status == 403
        with pytest.raises(ApiError) as no_policy:
            bob.post("/v1/access", {"resource": "prod", "account": "scram", "duration_seconds": 60})
        assert no_policy.value.status == 403
        bob.post("/v1/logout")
        with pytest.raises(ApiError):
            bob.get("/v1/whoami")
    records = {r["reason"]: r for r in gateway.cli_json("audit", "refusals")}
    assert "mallory" in records["wrong_user"]["message"]
    assert records["wrong_user"]["place"] == "listener"
    assert records["wrong_database"]["session_id"].startswith(access.session_prefix)
    assert records["startup_garbage"]["source"] == "127.0.0.1"
    assert records["no_token"]["who"] is None
    assert records["bad_password"]["who"] == name
    assert records["forbidden"]["who"] == name
    assert records["no_policy"]["who"] == name
    assert "no policy allows" in records["no_policy"]["message"]
    assert records["revoked_token"]["who"] == name
    assert all(r["count"] == 1 for r in records.values())
    assert MEMBER_PASSWORD.encode() not in gateway.transcript.text() + gateway.log().encode()


def _listen_backlog(port: int) -> int:
    """The backlog of the listening socket on *port*, as the kernel reports it
    (``ss``: Send-Q of a LISTEN socket)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[2])


async def _burst(port: int, user: str, database: str, count: int) -> list[bytes]:
    # Every connection is opened at once; the protocol then runs a bounded
    # number at a time, so PostgreSQL's max_connections is not the limit tested.
    streams = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(count))
    )
    gate = asyncio.Semaphore(64)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        async with gate:
            writer.write(
                messages.startup_message({"user": user, "database": database}, PROTOCOL_3_0)
            )
            await reader.readuntil(b"Z\x00\x00\x00\x05I")
            writer.write(messages.encode_message(ord("Q"), b"select 1\x00"))
            reply = await reader.readuntil(b"Z\x00\x00\x00\x05I")
            writer.write(messages.encode_message(ord("X"), b""))
            writer.close()
            await writer.wait_closed()
            return reply

    return await asyncio.gather(*(serve(r, w) for r, w in streams))


def test_two_thousand_connections_opened_at_once_are_all_accepted_and_served(
    gateway: Gateway,
) -> None:
    # Connections wait for their turn after being accepted: no startup deadline then.
    _restart_with(gateway, client_startup_timeout_seconds=3600)
    access = gateway.access().wait_ready()
    assert _listen_backlog(access.port) >= 2000
    replies = asyncio.run(_burst(access.port, access.user, access.database, 2000))
    assert len(replies) == 2000
    assert all(b"SELECT 1" in reply for reply in replies)
