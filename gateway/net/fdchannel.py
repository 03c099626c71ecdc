"""A message channel between the daemon and one relay worker process: small JSON
messages, each optionally carrying file descriptors (SCM_RIGHTS), over one end
of a Unix ``SOCK_SEQPACKET`` socketpair.

Invariants:
* One datagram is one message: the descriptors it carries arrive with it or not
  at all (a message whose payload or descriptors were truncated is dropped, and
  the descriptors that did arrive are closed).
* Sending never blocks the event loop: what the socket cannot take now is
  queued, in order, with duplicates of its descriptors (the caller may close its
  own at once), and sent when the socket is writable again.
* :meth:`FdChannel.receive` returns None once the peer is gone (end of file, or
  a reset); every descriptor it returns is the caller's to close.
* A request (:meth:`FdChannel.ask`) carries an ``id``; the peer answers it with
  :meth:`FdChannel.reply`. A reply goes to the request waiting for it, never to
  :meth:`FdChannel.receive` (one nobody waits for any more is dropped), and a
  request still waiting when the channel closes gets None.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["MAX_MESSAGE_BYTES", "FdChannel", "Message"]

#: The largest message (JSON) sent or accepted; every message is a few hundred bytes.
MAX_MESSAGE_BYTES: Final = 64 * 1024
#: The most descriptors one message carries (a handed-off connection carries one).
MAX_FDS: Final = 4

Message = dict[str, Any]


class FdChannel:
    """One end of a daemon-worker socketpair, on the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[tuple[Message, list[int]] | None] = asyncio.Queue()
        self._outbox: deque[tuple[bytes, list[int]]] = deque()
        #: the requests waiting for their reply, by id
        self._asked: dict[int, asyncio.Future[Message | None]] = {}
        self._ids = itertools.count(1)
        self._writing = False
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def is_closed(self) -> bool:
        return self._closed

    def send(self, message: Message, fds: Sequence[int] = ()) -> bool:
        """Send *message* (with *fds*); False when the channel is closed."""
        if self._closed:
            return False
        data = json.dumps(message, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"a channel message of {len(data)} bytes is too long")
        if not self._outbox and self._try_send(data, fds):
            return True
        self._outbox.append((data, [os.dup(fd) for fd in fds]))
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._writable)
        return True

    async def ask(self, message: Message, timeout: float) -> Message | None:
        """Send *message* as a request and wait for its reply; None if the
        channel is or gets closed first. TimeoutError after *timeout* seconds."""
        request_id = next(self._ids)
        future: asyncio.Future[Message | None] = self._loop.create_future()
        self._asked[request_id] = future
        try:
            if not self.send(message | {"id": request_id}):
                return None
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._asked.pop(request_id, None)

    def reply(self, request: Message, **values: Any) -> bool:
        """Answer *request* (received from the peer's :meth:`ask`) with *values*."""
        return self.send({"op": "reply", "id": request["id"]} | values)

    async def receive(self) -> tuple[Message, list[int]] | None:
        """The next message and its descriptors, or None once the peer is gone."""
        if self._closed and self._inbox.empty():
            return None
        item = await self._inbox.get()
        if item is None:
            self._inbox.put_nowait(None)  # every later receive sees the end too
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        if self._writing:
            self._loop.remove_writer(self._sock.fileno())
        for _data, fds in self._outbox:
            _close_all(fds)
        self._outbox.clear()
        self._sock.close()
        self._inbox.put_nowait(None)
        for future in self._asked.values():
            if not future.done():
                # Answered as "no reply" (never cancelled: that would cancel
                # whoever waits on the request, say a grant's end).
                future.set_result(None)

    def _try_send(self, data: bytes, fds: Sequence[int]) -> bool:
        try:
            socket.send_fds(self._sock, [data], list(fds))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # the peer is gone: its end is reported by the reader
            self.close()
        return True

    def _writable(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            if not self._try_send(data, fds):
                return
            if self._closed:
                return
            self._outbox.popleft()
            _close_all(fds)
        self._writing = False
        self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        while not self._closed:
            try:
                data, fds, flags, _addr = socket.recv_fds(
                    self._sock, MAX_MESSAGE_BYTES + 1, MAX_FDS
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data and not fds:
                self.close()
                return
            message = _decode(data, flags)
            if message is None:
                _close_all(fds)
                continue
            if message.get("op") == "reply":
                _close_all(fds)  # a reply carries none
                self._answer(message)
                continue
            self._inbox.put_nowait((message, fds))

    def _answer(self, reply: Message) -> None:
        request_id = reply.get("id")
        future = self._asked.get(request_id) if isinstance(request_id, int) else None
        if future is not None and not future.done():
            future.set_result(reply)


def _decode(data: bytes, flags: int) -> Message | None:
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
