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
"""

from __future__ import annotations

import asyncio
import contextlib
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
            self._inbox.put_nowait((message, fds))


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
