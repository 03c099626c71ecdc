"""The asyncio shell of a client's start, against a listener with no PostgreSQL
behind it: silent closes are silent and logged, and a direct TLS ClientHello is
served when the port offers TLS and answered with a TLS alert when it does not."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.net.listener import AccessListener, GrantInfo
from gateway.net.tls import ensure_local_certificate, server_context
from gateway.protocol import messages
from gateway.protocol.client_startup import TLS_ALERT_HANDSHAKE_FAILURE

GRANT = GrantInfo(
    session_id="s" * 32,
    resource="prod",
    account="ro",
    username="app",
    database="appdb",
    expires_at=datetime.now(UTC) + timedelta(hours=1),
)


class Host:
    """A service that refuses every connection once its startup is read."""

    startup_timeout = 30.0
    connect_timeout = 30.0
    metrics = None

    def __init__(self, client_tls: ssl.SSLContext | None) -> None:
        self.client_tls = client_tls
        #: connection records written, as (call, arguments)
        #: refusals handed to the refusal recorder
        self.refused_calls: list[Any] = []
        self.records: list[tuple[str, dict[str, Any]]] = []

    async def record_connection_start(self, session_id: str, *args: Any, **kwargs: Any) -> str:
        self.records.append(("start", {"session_id": session_id, **kwargs}))
        return f"c{len(self.records)}"

    async def record_connection_end(self, connection_id: str, **kwargs: Any) -> None:
        self.records.append(("end", {"connection_id": connection_id, **kwargs}))

    def refused(self, refusal: Any) -> None:
        self.refused_calls.append(refusal)

    def refusal(self) -> Any:
        from gateway.net.relay import Termination
        from gateway.protocol.sqlstate import SqlState
        from gateway.reasons import ConnectionEndReason

        return Termination(ConnectionEndReason.ERROR, SqlState.CANNOT_CONNECT_NOW, "test stop")


def client_hello() -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def exchange(listener: AccessListener, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(data)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    return reply


@pytest.mark.asyncio
async def test_terminate_before_startup_gets_no_reply_and_a_log_line() -> None:
    host = Host(None)
    listener = AccessListener(GRANT, host)  # type: ignore[arg-type]
    await listener.start()
    try:
        with capture_logs() as logs:
            assert await exchange(listener, b"X\x00\x00\x00\x04") == b""
            await listener.wait_idle(30)
    finally:
        await listener.close()
    [line] = [entry for entry in logs if entry["event"] == "client_startup_closed"]
    assert line["reason"] == "invalid startup packet length 1476395008 (allowed 8..10000)"
    assert line["session_id"] == GRANT.session_id
    # ... and the trail: a connection that ended in an error, with the reason.
    assert [call for call, _ in host.records] == ["start", "end"]
    end = host.records[1][1]
    assert end["reason"] == "error"
    assert end["error"] == ("08P01", line["reason"])


@pytest.mark.asyncio
async def test_a_client_that_sends_nothing_leaves_no_record() -> None:
    host = Host(None)
    listener = AccessListener(GRANT, host)  # type: ignore[arg-type]
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write_eof()  # connect, then close: a TCP probe
        assert await reader.read() == b""
        writer.close()
        await listener.wait_idle(30)
    finally:
        await listener.close()
    assert host.records == []


@pytest.mark.asyncio
async def test_a_listener_on_an_ipv6_address_accepts_connections() -> None:
    host = Host(None)
    listener = AccessListener(GRANT, host, listen_host="::1")  # type: ignore[arg-type]
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("::1", listener.port)
        writer.write(b"X\x00\x00\x00\x04")
        assert await reader.read() == b""
        writer.close()
        await listener.wait_idle(30)
    finally:
        await listener.close()
    assert [call for call, _ in host.records] == ["start", "end"]


@pytest.mark.asyncio
async def test_a_client_hello_without_tls_on_offer_gets_a_tls_alert() -> None:
    listener = AccessListener(GRANT, Host(None))  # type: ignore[arg-type]
    await listener.start()
    try:
        assert await exchange(listener, client_hello()) == TLS_ALERT_HANDSHAKE_FAILURE
    finally:
        await listener.close()


@pytest.mark.asyncio
async def test_direct_tls_is_served_when_the_port_offers_tls(tmp_path: Path) -> None:
    listener = AccessListener(GRANT, Host(server_context(*ensure_local_certificate(tmp_path))))  # type: ignore[arg-type]
    await listener.start()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listener.port, ssl=ctx, server_hostname="localhost"
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "postgresql"
        writer.write(messages.startup_message({"user": "app", "database": "appdb"}))
        reply = await reader.read()
        writer.close()
    finally:
        await listener.close()
    # Served over TLS up to the grant check, whose refusal is an ErrorResponse.
    assert reply[:1] == b"E"
    assert b"test stop" in reply
