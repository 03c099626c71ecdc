"""Accepting on a listening socket, and the handler tasks that follow: what a
grant's port and the tunnel endpoint share.

Invariants:
* An accept error (out of descriptors, say) never closes the door: it is
  logged and accepting resumes after ``ACCEPT_RETRY_DELAY``, as asyncio's own
  server does.
* Every handler task is tracked until it finishes, so closing can wait for (or
  cancel) what is still running; nothing is left behind unowned.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Final

import structlog

__all__ = ["ACCEPT_RETRY_DELAY", "LISTEN_BACKLOG", "Acceptor", "listening_socket"]

log = structlog.get_logger(__name__)

#: The listen() backlog of a grant's port and the tunnel. asyncio's default (100)
#: turned a burst of 2,000 connections into SYN retransmissions (18.4 s to accept
#: them all); the kernel caps this at net.core.somaxconn (4096 since Linux 5.4).
LISTEN_BACKLOG: Final = 4096
#: Seconds before accepting again after an accept error (asyncio's own value).
ACCEPT_RETRY_DELAY: Final = 1.0

_numbers = itertools.count(1)

Handler = Callable[[socket.socket, Any, int], Coroutine[Any, Any, None]]


def listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket listening on host:port (port 0: a free one).
    An IPv6 literal needs its family said (create_server defaults to IPv4)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class Acceptor:
    """Accepts on one listening socket and runs ``handler(sock, address, number)``
    as a task per connection; *name* prefixes the tasks' names."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks: set[asyncio.Task[None]] = set()
        self._listening: socket.socket | None = None
        self._loop_task: asyncio.Task[None] | None = None

    def start(self, sock: socket.socket, handler: Handler) -> None:
        sock.setblocking(False)
        self._listening = sock
        self._loop_task = asyncio.create_task(
            self._accept(sock, handler), name=f"{self.name}-accept"
        )

    def track(
        self, coro: Coroutine[Any, Any, None], number: int, *, kind: str = "c"
    ) -> asyncio.Task[None]:
        """Run *coro* as one of this door's handler tasks (connection *number*)."""
        task = asyncio.create_task(coro, name=f"{self.name}-{kind}{number}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @staticmethod
    def next_number() -> int:
        """A connection number, unique in this process."""
        return next(_numbers)

    async def _accept(self, sock: socket.socket, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, address = await loop.sock_accept(sock)
            except OSError as exc:
                log.warning("accept_failed", door=self.name, error=str(exc))
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            number = next(_numbers)
            self.track(handler(client, address, number), number)

    async def stop_accepting(self) -> None:
        """Stop accepting and close the listening socket; handlers go on."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._listening is not None:
            self._listening.close()
            self._listening = None

    async def wait(self, timeout: float) -> None:
        """Wait (bounded) until no handler is running."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    async def cancel_after(self, timeout: float) -> None:
        """Wait (bounded) for the handlers, then cancel what is still running."""
        if not self.tasks:
            return
        _done, pending = (
            await asyncio.wait(set(self.tasks), timeout=timeout)
            if timeout > 0
            else (set(), set(self.tasks))
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
