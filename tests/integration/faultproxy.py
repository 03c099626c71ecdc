"""A TCP proxy that injects network faults on command, for integration tests.

:class:`FaultProxy` listens on a loopback port and relays raw bytes to one
target host:port, so it can sit between a client and the gateway or between the
gateway and PostgreSQL; TLS passes through it untouched (it never looks at the
bytes). A test tells it, while connections are live, to:

* **drop**: close both sides with a FIN, as a peer that exits does;
* **reset**: ``SO_LINGER`` 0 then close, so both sides get an RST, as a peer
  whose host vanished or a middlebox that gave up does;
* **delay**: sleep before forwarding each chunk (latency per chunk);
* **stall**: stop forwarding in one direction or both without closing (a hung
  peer or a black-holed route: the bytes wait in the proxy, EOF included);
* **resume**: undo stall and delay.

Drop and reset act on the connections live at that moment; stall, delay and
resume on the proxy apply to live connections and to those accepted later, and
each :class:`ProxiedConnection` takes the same commands for itself alone.

The proxy runs its own asyncio loop in a daemon thread; every public method is
called from the test's thread and waits (bounded) until the loop has done it, so
after ``link.stall()`` returns no further byte is forwarded on that link.
Invariants: a chunk is forwarded whole and in order, once; a stalled direction
holds what it has read (counted in :meth:`ProxiedConnection.held`) and the
kernel's buffers push back on the sender beyond that; :meth:`FaultProxy.stop`
closes every socket it opened (tests run with warnings as errors, so a leaked
socket would fail them).

Written for this project after reading how psycopg (``tests/fix_proxy.py``,
which drives an external proxy process) and asyncpg (``TCPFuzzingProxy`` in its
test base, a loop in a thread) do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Direction", "FaultProxy", "ProxiedConnection"]

#: How long a command from the test's thread may wait for the proxy's loop.
COMMAND_TIMEOUT = 30.0
READ_SIZE = 64 * 1024
_T = TypeVar("_T")


class Direction(enum.Flag):
    """Which way bytes flow, seen from the proxy's client."""

    #: from the proxy's client to the target
    TO_SERVER = enum.auto()
    #: from the target back to the proxy's client
    TO_CLIENT = enum.auto()
    BOTH = TO_SERVER | TO_CLIENT


_ONE_WAY = (Direction.TO_SERVER, Direction.TO_CLIENT)


class _Faults:
    """Stall and delay state for one direction set (a link, or the proxy's
    defaults for links to come). Touched only on the proxy's loop."""

    def __init__(self) -> None:
        self.flowing = {d: asyncio.Event() for d in _ONE_WAY}
        for event in self.flowing.values():
            event.set()
        self.delay = dict.fromkeys(_ONE_WAY, 0.0)

    def copy_from(self, other: _Faults) -> None:
        for d in _ONE_WAY:
            self.set_flowing(d, other.flowing[d].is_set())
            self.delay[d] = other.delay[d]

    def set_flowing(self, direction: Direction, flowing: bool) -> None:
        for d in _ONE_WAY:
            if d in direction:
                (self.flowing[d].set if flowing else self.flowing[d].clear)()

    def set_delay(self, direction: Direction, seconds: float) -> None:
        for d in _ONE_WAY:
            if d in direction:
                self.delay[d] = seconds


class ProxiedConnection:
    """One accepted client and its connection to the target."""

    def __init__(
        self,
        proxy: FaultProxy,
        number: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.number = number
        self._proxy = proxy
        self._client = client
        self._server = server
        self._faults = _Faults()
        self._faults.copy_from(proxy._defaults)
        self._pumps: list[asyncio.Task[None]] = []
        self._failed = False
        self._closing = False
        # Written on the loop, read from the test's thread: plain ints are
        # safe to read under the GIL and only ever grow.
        self._received = dict.fromkeys(_ONE_WAY, 0)
        self._forwarded = dict.fromkeys(_ONE_WAY, 0)
        #: set once both sides are closed (by a fault, an EOF or :meth:`FaultProxy.stop`)
        self.closed = threading.Event()

    def __repr__(self) -> str:
        return (
            f"<ProxiedConnection {self.number} forwarded={self._forwarded[Direction.TO_SERVER]}"
            f"/{self._forwarded[Direction.TO_CLIENT]} closed={self.closed.is_set()}>"
        )

    # --- what the test reads -----------------------------------------------------------

    def forwarded(self, direction: Direction) -> int:
        """Bytes passed on in *direction* so far."""
        return sum(self._forwarded[d] for d in _ONE_WAY if d in direction)

    def held(self, direction: Direction) -> int:
        """Bytes read in *direction* and not (yet) passed on: what a stall holds."""
        return sum(self._received[d] - self._forwarded[d] for d in _ONE_WAY if d in direction)

    # --- commands from the test's thread ------------------------------------------------

    def drop(self) -> None:
        """Close both sides (FIN), dropping anything held."""
        self._proxy._call(self._close(reset=False))

    def reset(self) -> None:
        """Reset both sides (RST), dropping anything held."""
        self._proxy._call(self._close(reset=True))

    def stall(self, direction: Direction = Direction.BOTH) -> None:
        """Stop forwarding in *direction*; nothing is closed."""
        self._proxy._call_soon(lambda: self._faults.set_flowing(direction, False))

    def delay(self, seconds: float, direction: Direction = Direction.BOTH) -> None:
        """Wait *seconds* before forwarding each chunk in *direction*."""
        self._proxy._call_soon(lambda: self._faults.set_delay(direction, seconds))

    def resume(self) -> None:
        """Forward normally again in both directions (held bytes go first)."""

        def clear() -> None:
            self._faults.set_flowing(Direction.BOTH, True)
            self._faults.set_delay(Direction.BOTH, 0.0)

        self._proxy._call_soon(clear)

    # --- on the proxy's loop -------------------------------------------------------------

    async def run(self) -> None:
        """Pump both ways until both have ended, then close both sides."""
        loop = asyncio.get_running_loop()
        for direction, (reader, _), (_, writer) in (
            (Direction.TO_SERVER, self._client, self._server),
            (Direction.TO_CLIENT, self._server, self._client),
        ):
            name = f"faultproxy-{self.number}-{direction.name}"
            self._pumps.append(loop.create_task(self._pump(direction, reader, writer), name=name))
        await asyncio.wait(self._pumps)
        await self._close(reset=self._failed)

    async def _pump(
        self, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        flowing = self._faults.flowing[direction]
        try:
            while True:
                data = await reader.read(READ_SIZE)
                self._received[direction] += len(data)
                # Checked after the read, so a stall set while this task was
                # waiting for data still holds the chunk it then gets.
                if self._faults.delay[direction]:
                    await asyncio.sleep(self._faults.delay[direction])
                await flowing.wait()
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                self._forwarded[direction] += len(data)
            # EOF from one side: pass the half-close on, as TCP would.
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except (ConnectionError, OSError):
            # One side failed (an RST, most often): the other side gets one too,
            # as the peer behind a dead middlebox would see it.
            self._failed = True
            for pump in self._pumps:
                if pump is not asyncio.current_task():
                    pump.cancel()

    async def _close(self, *, reset: bool) -> None:
        if self._closing:
            return  # a fault and the end of the pumps may both ask
        self._closing = True
        for _, writer in (self._client, self._server):
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None and sock.fileno() != -1:
                    # l_onoff=1, l_linger=0: close() sends RST and drops unsent data.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for _, writer in (self._client, self._server):
            # A reset side is closed all the same.
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        self._proxy._forget(self)
        self.closed.set()


class FaultProxy:
    """Listens on *listen_host* (a free port) and relays each connection to
    *target_host*:*target_port*. Use as a context manager, or start and stop."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="faultproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._numbers = itertools.count(1)
        self._accepted: list[ProxiedConnection] = []
        self._live: set[ProxiedConnection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        # asyncio.Event binds to a loop on first use, not here.
        self._defaults = _Faults()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.listen_host}:{self.port} -> {self.target[0]}:{self.target[1]}>"

    # --- life --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close the listener and every connection (RST), then the loop. Idempotent."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(COMMAND_TIMEOUT)
        self._loop.close()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._close_all(reset=True)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    # --- what the test reads -----------------------------------------------------------

    @property
    def connections(self) -> list[ProxiedConnection]:
        """Every connection accepted so far, oldest first (closed ones included)."""
        return list(self._accepted)

    def wait_for_connections(self, count: int, tries: int = 600) -> list[ProxiedConnection]:
        """The first *count* connections, once that many have been accepted
        (polled at most *tries* times, 50 ms apart)."""
        for _ in range(tries):
            if len(self._accepted) >= count:
                return self._accepted[:count]
            time.sleep(0.05)
        raise AssertionError(f"{self!r} accepted {len(self._accepted)} of {count} connections")

    # --- commands from the test's thread ------------------------------------------------

    def drop(self) -> None:
        """Close every live connection on both sides (FIN)."""
        self._call(self._close_all(reset=False))

    def reset(self) -> None:
        """Reset every live connection on both sides (RST)."""
        self._call(self._close_all(reset=True))

    def stall(self, direction: Direction = Direction.BOTH) -> None:
        """Stop forwarding in *direction*, now and on connections to come."""
        self._call_soon(lambda: self._apply(lambda f: f.set_flowing(direction, False)))

    def delay(self, seconds: float, direction: Direction = Direction.BOTH) -> None:
        """Add *seconds* before each chunk in *direction*, now and on connections to come."""
        self._call_soon(lambda: self._apply(lambda f: f.set_delay(direction, seconds)))

    def resume(self) -> None:
        """Forward normally again, on every connection."""

        def clear(faults: _Faults) -> None:
            faults.set_flowing(Direction.BOTH, True)
            faults.set_delay(Direction.BOTH, 0.0)

        self._call_soon(lambda: self._apply(clear))

    # --- on the proxy's loop -------------------------------------------------------------

    async def _close_all(self, *, reset: bool) -> None:
        for link in list(self._live):
            await link._close(reset=reset)

    def _apply(self, change: Callable[[_Faults], None]) -> None:
        change(self._defaults)
        for link in self._live:
            change(link._faults)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(
            self._connect(reader, writer), name="faultproxy-connect"
        )
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server = await asyncio.open_connection(*self.target)
        except OSError:
            # Like a target that refuses: the client sees its connection reset.
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
            return
        link = ProxiedConnection(self, next(self._numbers), (reader, writer), server)
        self._accepted.append(link)
        self._live.add(link)
        await link.run()

    def _forget(self, link: ProxiedConnection) -> None:
        self._live.discard(link)

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(COMMAND_TIMEOUT)

    def _call_soon(self, change: Callable[[], None]) -> None:
        async def apply() -> None:
            change()

        self._call(apply())
