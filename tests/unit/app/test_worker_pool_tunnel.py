"""The daemon's side of a tunnel connection a relay worker carries: the hand-off
of the socket, the admission (its placeholder in the grant's live set) and the
answer, and a worker that gave up before the daemon answered.

The worker is played by the other end of a real socketpair (an FdChannel); the
grant's door is a real AccessListener, never started.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.app.workers import WorkerPool
from gateway.net.fdchannel import FdChannel, Message
from gateway.net.listener import AccessListener, GrantInfo
from gateway.net.relay import Termination
from gateway.reasons import ConnectionEndReason

SESSION = "t" * 32
WAIT = 10.0


class Host:
    def refusal(self) -> Termination | None:
        return None


@dataclass
class Daemon:
    pool: WorkerPool
    door: AccessListener
    #: the worker's end of its channel
    worker: FdChannel
    #: set to let the daemon's admission answer (it waits on this)
    answer: asyncio.Event
    #: what the admission was asked, by certificate
    asked: list[bytes | None]


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    grant = GrantInfo(
        session_id=SESSION,
        resource="prod",
        account="ro",
        username="app",
        database="appdb",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    door = AccessListener(grant, Host())  # type: ignore[arg-type]
    answer, asked = asyncio.Event(), []

    async def admit(der: bytes | None) -> AccessListener | Termination:
        asked.append(der)
        await answer.wait()
        return door

    pool = WorkerPool(tmp_path, 1, admit_tunnel=admit)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = pool._workers[0]
    worker.channel = FdChannel(ours)
    worker.track(pool._read(worker, worker.channel))
    peer = FdChannel(theirs)
    try:
        yield Daemon(pool, door, peer, answer, asked)
    finally:
        peer.close()
        worker.channel.close()
        await asyncio.gather(*worker.tasks, return_exceptions=True)


async def receive(channel: FdChannel) -> tuple[Message, list[int]]:
    received = await asyncio.wait_for(channel.receive(), WAIT)
    assert received is not None
    return received


async def handed_tunnel(d: Daemon, number: int) -> None:
    """A tunnel socket handed to the worker, which gets it with its number."""
    client, accepted = socket.socketpair()
    try:
        assert d.pool.hand_off_tunnel(accepted, "192.0.2.7:50001", number)
        message, fds = await receive(d.worker)
        assert (message["op"], message["number"], message["client"]) == (
            "tunnel",
            number,
            "192.0.2.7:50001",
        )
        assert len(fds) == 1
        socket.socket(fileno=fds[0]).close()
    finally:
        client.close()
        accepted.close()


async def wait_until(predicate: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_an_admitted_tunnel_connection_is_counted_until_the_worker_says_it_is_over(
    daemon: Daemon,
) -> None:
    d = daemon
    await handed_tunnel(d, 7)
    d.worker.send({"op": "admit", "number": 7, "client": "192.0.2.7:50001", "der": "c0ffee"})
    await wait_until(lambda: d.asked)
    assert d.asked == [bytes.fromhex("c0ffee")]
    d.answer.set()
    message, _ = await receive(d.worker)
    assert (message["op"], message["number"], message["grant"]["session_id"]) == (
        "admitted",
        7,
        SESSION,
    )
    [placeholder] = d.door.connections
    assert (placeholder.number, placeholder.client_addr, placeholder.handed_off) == (
        7,
        "192.0.2.7:50001",
        True,
    )
    assert d.pool.live_count() == 1
    d.worker.send({"op": "gone", "number": 7})
    await wait_until(lambda: not d.door.connections)
    assert d.pool.live_count() == 0


async def test_a_worker_that_gave_up_before_the_answer_leaves_nothing_counted(
    daemon: Daemon,
) -> None:
    d = daemon
    await handed_tunnel(d, 8)
    d.worker.send({"op": "admit", "number": 8, "client": "192.0.2.7:50001", "der": None})
    await wait_until(lambda: d.asked)
    d.worker.send({"op": "gone", "number": 8})  # it timed out and answered its client
    await wait_until(lambda: not d.pool._workers[0].tunnels)
    d.answer.set()
    # The admission finishes: only the channel's reader is left running.
    await wait_until(lambda: len(d.pool._workers[0].tasks) == 1)
    assert not d.door.connections and d.pool.live_count() == 0
    # Nothing was answered: the next message the worker gets is the next one sent.
    d.pool.cut(SESSION, Termination(ConnectionEndReason.SESSION_ENDED, "57P01", "x"), ended=True)
    message, _ = await receive(d.worker)
    assert message["op"] == "cut"


async def test_a_refused_admission_is_answered_with_the_refusal_and_counts_nothing(
    daemon: Daemon,
) -> None:
    d = daemon
    d.door.end(Termination(ConnectionEndReason.EXPIRED, "57P01", "expired at noon", "renew"))
    d.answer.set()
    await handed_tunnel(d, 9)
    d.worker.send({"op": "admit", "number": 9, "client": "192.0.2.7:50001", "der": None})
    message, _ = await receive(d.worker)
    assert message["op"] == "admitted" and "grant" not in message
    assert message["refusal"]["sqlstate"] == "28000"
    assert message["refusal"]["reason"] == "session_ended"
    assert message["refusal"]["message"] == "expired at noon"
    assert not d.door.connections and d.pool.live_count() == 0
