"""The daemon-worker channel: messages with descriptors, in order, never blocking."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from gateway.net.fdchannel import MAX_MESSAGE_BYTES, FdChannel


def pair() -> tuple[FdChannel, FdChannel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return FdChannel(a), FdChannel(b)


async def test_a_message_arrives_with_the_descriptor_it_carries() -> None:
    left, right = pair()
    reader, writer = os.pipe()
    try:
        assert left.send({"op": "conn", "number": 7}, [writer])
        os.close(writer)  # the receiver has its own copy
        received = await right.receive()
        assert received is not None
        message, fds = received
        assert message == {"op": "conn", "number": 7}
        assert len(fds) == 1
        os.write(fds[0], b"through")
        os.close(fds[0])
        assert os.read(reader, 16) == b"through"
    finally:
        os.close(reader)
        left.close()
        right.close()


async def test_what_the_socket_cannot_take_is_queued_and_sent_in_order() -> None:
    left, right = pair()
    count = 2000  # far beyond the socket's buffer: some sends are queued
    reader, writer = os.pipe()
    try:
        for number in range(count):
            left.send({"n": number, "pad": "x" * 1000}, [writer] if number == count - 1 else [])
        assert left._outbox  # the last ones (and their descriptor) wait for room
        os.close(writer)
        seen = []
        fds: list[int] = []
        for _ in range(count):
            received = await asyncio.wait_for(right.receive(), 10)
            assert received is not None
            seen.append(received[0]["n"])
            fds += received[1]
        assert seen == list(range(count))
        assert len(fds) == 1  # the queued copy reached the peer
        os.close(fds[0])
        # Every write end is closed, the queued duplicate too: the pipe is at its end.
        os.set_blocking(reader, False)
        assert os.read(reader, 1) == b""
    finally:
        os.close(reader)
        left.close()
        right.close()


async def test_receive_returns_none_once_the_peer_is_gone() -> None:
    left, right = pair()
    left.send({"op": "last"})
    left.close()
    first = await right.receive()
    assert first is not None and first[0] == {"op": "last"}
    assert await right.receive() is None
    assert await right.receive() is None
    assert not right.send({"op": "late"})


async def test_a_message_that_is_not_a_json_object_is_dropped() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    right = FdChannel(b)
    try:
        a.send(b"not json")
        a.send(b"[1, 2]")
        a.send(b'{"op": "ok"}')
        received = await right.receive()
        assert received is not None and received[0] == {"op": "ok"}
    finally:
        a.close()
        right.close()


async def test_an_oversized_message_is_refused_by_the_sender() -> None:
    left, right = pair()
    try:
        with pytest.raises(ValueError, match="too long"):
            left.send({"pad": "x" * MAX_MESSAGE_BYTES})
    finally:
        left.close()
        right.close()


async def test_a_request_gets_its_reply_and_the_reply_never_reaches_receive() -> None:
    left, right = pair()
    try:
        asked = asyncio.create_task(left.ask({"op": "cancel", "pid": 7}, 10))
        received = await asyncio.wait_for(right.receive(), 10)
        assert received is not None
        request, fds = received
        assert request == {"op": "cancel", "pid": 7, "id": request["id"]} and fds == []
        right.send({"op": "reply", "id": request["id"] + 1, "found": False})  # nobody's
        assert right.reply(request, found=True)
        right.send({"op": "after"})
        assert await asyncio.wait_for(asked, 10) == {
            "op": "reply",
            "id": request["id"],
            "found": True,
        }
        # Replies went to the request (or were dropped), not to the inbox.
        assert await asyncio.wait_for(left.receive(), 10) == ({"op": "after"}, [])
    finally:
        left.close()
        right.close()


async def test_a_request_without_a_reply_times_out_and_a_late_reply_is_dropped() -> None:
    left, right = pair()
    try:
        with pytest.raises(TimeoutError):
            await left.ask({"op": "drain"}, 0.05)
        received = await asyncio.wait_for(right.receive(), 10)
        assert received is not None
        right.reply(received[0])
        right.send({"op": "after"})
        assert await asyncio.wait_for(left.receive(), 10) == ({"op": "after"}, [])
    finally:
        left.close()
        right.close()


async def test_a_request_waiting_when_the_peer_goes_is_answered_none() -> None:
    left, right = pair()
    asked = asyncio.create_task(left.ask({"op": "drain"}, 10))
    assert await asyncio.wait_for(right.receive(), 10) is not None
    right.close()
    assert await asyncio.wait_for(asked, 10) is None
    assert await left.ask({"op": "drain"}, 10) is None  # closed: not even sent
