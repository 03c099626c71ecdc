"""A grant's door with relay workers (``--workers``): what it hands off, and what it
asks of the pool when it ends, cuts, warns, waits, closes or places a cancel.

The pool is a fake that records the calls; the door is real, on a real port.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.net.connection import LiveConnection
from gateway.net.listener import AccessListener, GrantInfo
from gateway.net.relay import Termination
from gateway.protocol.startup import CancelRequest
from gateway.reasons import ConnectionEndReason
from gateway.refusal import RefusalReason

SESSION = "s" * 32
CUT = Termination(ConnectionEndReason.SESSION_ENDED, "57P01", "revoked")


class FakePool:
    def __init__(self, *, takes: bool = True, cancels: bool = False) -> None:
        self.takes = takes
        self.cancels = cancels
        self.calls: list[tuple[Any, ...]] = []
        self.handed: list[tuple[socket.socket, LiveConnection, set[LiveConnection]]] = []

    def hand_off(
        self, grant: GrantInfo, sock: socket.socket, conn: LiveConnection, live: set[LiveConnection]
    ) -> bool:
        self.calls.append(("hand_off", grant.session_id, conn.number))
        if self.takes:
            self.handed.append((socket.socket(fileno=sock.dup().detach()), conn, live))
        return self.takes

    def cut(self, session_id: str, termination: Termination, *, ended: bool) -> None:
        self.calls.append(("cut", session_id, termination.message, ended))

    def notify(self, session_id: str, notice: bytes) -> None:
        self.calls.append(("notify", session_id, notice))

    async def drain(self, session_id: str, timeout: float) -> None:
        self.calls.append(("drain", session_id))

    def release(self, session_id: str) -> None:
        self.calls.append(("release", session_id))

    async def cancel(self, session_id: str, request: CancelRequest, *, source: str) -> bool:
        self.calls.append(("cancel", session_id, request.pid))
        return self.cancels


class Host:
    startup_timeout = 10.0
    connect_timeout = 10.0
    client_tls = None
    metrics = None

    def __init__(self, refusing: Termination | None = None) -> None:
        self.refusing = refusing
        self.refused_calls: list[Any] = []

    def refusal(self) -> Termination | None:
        return self.refusing

    def refused(self, refusal: Any) -> None:
        self.refused_calls.append(refusal)


def door(pool: FakePool, host: Host | None = None) -> AccessListener:
    grant = GrantInfo(
        session_id=SESSION,
        resource="prod",
        account="ro",
        username="app",
        database="appdb",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    return AccessListener(grant, host or Host(), relays=pool)  # type: ignore[arg-type]


async def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_an_admitted_connection_is_handed_off_and_counted_until_the_pool_lets_go() -> None:
    pool = FakePool()
    listener = door(pool)
    port = await listener.start()
    client = await connect(port)
    try:
        for _ in range(100):
            if pool.handed:
                break
            await asyncio.sleep(0.02)
        [(worker_copy, conn, live)] = pool.handed
        assert conn.handed_off and live is listener.connections and conn in live
        # A notice for it goes through the pool, and it counts as told.
        assert listener.notify_live(b"N") == 1
        assert pool.calls[-1] == ("notify", SESSION, b"N")
        loop = asyncio.get_running_loop()
        worker_copy.sendall(b"from the worker")
        assert await loop.sock_recv(client, 64) == b"from the worker"
        # The door kept no copy: once the worker's closes, the client sees the end.
        worker_copy.close()
        assert await asyncio.wait_for(loop.sock_recv(client, 64), 10) == b""
        live.discard(conn)  # the pool, once the worker says it is over
        assert not listener.connections
    finally:
        client.close()
        await listener.close()


async def test_what_the_door_does_to_its_connections_it_asks_of_the_pool() -> None:
    pool = FakePool()
    listener = door(pool)
    listener.terminate_live(CUT)
    assert listener.notify_live(b"N") == 0
    await listener.wait_idle(1.0)
    listener.end(CUT)
    await listener.close()
    assert pool.calls == [
        ("cut", SESSION, "revoked", False),
        ("notify", SESSION, b"N"),
        ("drain", SESSION),
        ("cut", SESSION, "revoked", True),
        ("drain", SESSION),
        ("release", SESSION),
    ]


async def test_an_ended_door_or_a_refusing_gateway_answers_itself() -> None:
    for refusing, ended in ((CUT, False), (None, True)):
        pool = FakePool()
        listener = door(pool, Host(refusing))
        if ended:
            listener.end(CUT)
        port = await listener.start()
        client = await connect(port)
        try:
            client.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest: answered here
            answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, 1), 10)
            assert answer == b"N"
            assert not [c for c in pool.calls if c[0] == "hand_off"]
        finally:
            client.close()
            await listener.close()


async def test_a_cancel_no_connection_here_handed_out_is_tried_in_the_workers() -> None:
    refused = {}
    for cancels in (True, False):
        pool, host = FakePool(cancels=cancels), Host()
        await door(pool, host).forward_cancel(CancelRequest(42, b"key!"), "127.0.0.1")
        assert pool.calls == [("cancel", SESSION, 42)]
        refused[cancels] = [r.reason for r in host.refused_calls]
    # Dropped and on record only when no worker had it.
    assert refused == {True: [], False: [RefusalReason.UNKNOWN_CANCEL_KEY]}


async def test_a_shadow_door_asks_the_daemon_to_place_a_cancel() -> None:
    asked: list[int] = []

    async def elsewhere(request: CancelRequest, source: str) -> bool:
        asked.append(request.pid)
        return request.pid == 7

    host = Host()
    grant = door(FakePool()).grant
    shadow = AccessListener(grant, host, cancel_elsewhere=elsewhere)  # type: ignore[arg-type]
    await shadow.forward_cancel(CancelRequest(7, b"key!"), "127.0.0.1")
    assert asked == [7] and not host.refused_calls
    await shadow.forward_cancel(CancelRequest(8, b"key!"), "127.0.0.1")
    assert asked == [7, 8]
    [refused] = host.refused_calls
    assert refused.reason is RefusalReason.UNKNOWN_CANCEL_KEY


def test_a_tunnel_connection_a_worker_carries_is_admitted_as_a_placeholder() -> None:
    listener = door(FakePool())
    placed = listener.admit_elsewhere(7, "192.0.2.10:50000")
    assert isinstance(placed, LiveConnection)
    assert (placed.number, placed.client_addr, placed.handed_off) == (7, "192.0.2.10:50000", True)
    assert placed in listener.connections  # counted and waited for until the worker lets go


def test_a_tunnel_connection_to_an_ended_grant_or_a_refusing_gateway_is_refused() -> None:
    refusing = Termination(ConnectionEndReason.STORE_UNAVAILABLE, "57P03", "store unreachable")
    assert door(FakePool(), Host(refusing)).admit_elsewhere(1, "x") is refusing
    ended = door(FakePool())
    ended.end(Termination(ConnectionEndReason.EXPIRED, "57P01", "expired at noon", "renew"))
    refusal = ended.admit_elsewhere(2, "x")
    # Worded as the end, recorded as the grant's end (tunnel.refusal_reason).
    assert refusal == Termination(
        ConnectionEndReason.SESSION_ENDED, "28000", "expired at noon", "renew"
    )
    assert not ended.connections
