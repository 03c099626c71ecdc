"""Playbook support for the relay's unit tests: both peers scripted, no sockets.

After mitmproxy's ``tutils.Playbook``: a test plays the client and the server
against a real :class:`~gateway.net.relay.Relay` and asserts what each of them
receives. The relay runs on a real event loop, but its two transports are
:class:`MemoryTransport` stand-ins:

* ``send`` / ``send_eof`` / ``reset`` are what the far peer does; the relay sees
  them through the protocol callbacks it installed (``data_received``,
  ``eof_received``, ``connection_lost``), as from a socket.
* ``written`` is every byte the relay wrote (``writes`` keeps each ``write``
  call, so "one write per read" can be checked); ``read`` is the peer
  consuming them, which drains the write buffer.
* Flow control follows asyncio's own transports: passing the high-water mark
  calls the protocol's ``pause_writing`` once, draining to the low-water mark
  calls ``resume_writing``; while reading is paused, what the peer sends waits
  (as in a socket buffer) and arrives after ``resume_reading``.
* ``close`` flushes first: ``connection_lost`` comes once the peer has read
  everything buffered; ``abort`` drops the buffer.

Time is the event loop's own: :func:`virtual_time` runs a test on a loop whose
clock jumps to the next timer whenever nothing is ready, so a grace period of a
second passes in no wall-clock time and exactly (no wall-clock thresholds), and
a scenario that would wait for ever fails at once with :class:`Stalled`.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import selectors
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from gateway.net.relay import IdleLimit, Relay, Termination
from gateway.protocol.framing import BoundaryTracker, TappedMessage
from gateway.protocol.messages import encode_message

#: Loop iterations :meth:`Playbook.settle` lets pass: enough for a callback
#: scheduled by a callback scheduled by the step under test (resume_reading ->
#: delivery -> write), with room to spare.
_SETTLE_ROUNDS = 8


class Stalled(RuntimeError):
    """The loop has nothing ready and no timer: the scenario would wait for ever."""


class _VirtualClockSelector(selectors.DefaultSelector):
    """Never blocks: when nothing is ready, moves the loop's clock to the next timer."""

    def __init__(self, clock: VirtualClockLoop) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise Stalled("nothing is ready and no timer is set: the scenario would hang")
        self._clock.advance(timeout)
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` advances only when the loop would sleep."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(selector=_VirtualClockSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def virtual_time(
    test: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., None]:
    """Run an ``async def`` test on a :class:`VirtualClockLoop`.

    The wrapper is a plain function (pytest-asyncio leaves it alone) with the
    test's signature, so ``pytest.mark.parametrize`` still works.
    """

    async def scenario(*args: Any, **kwargs: Any) -> None:
        await test(*args, **kwargs)
        # A relay still running would be cancelled by the runner, which is not
        # what any test means to check: each scenario ends its relays.
        left = [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, f"tasks left running: {left}"

    def run(*args: Any, **kwargs: Any) -> None:
        with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
            runner.run(scenario(*args, **kwargs))

    run.__name__ = test.__name__
    run.__qualname__ = test.__qualname__
    run.__doc__ = test.__doc__
    run.__module__ = test.__module__
    run.__signature__ = inspect.signature(test)  # type: ignore[attr-defined]
    return run


class MemoryTransport(asyncio.Transport):
    """One end of a connection, held by the relay; its far peer is the test."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str,
        *,
        high: int,
        low: int,
        peer_reads: bool = True,
    ) -> None:
        super().__init__()
        self._loop = loop
        self.name = name
        #: the peer reads what is written at once (no write buffer builds up);
        #: False for flow-control tests, which call read() themselves
        self.peer_reads = peer_reads
        self._protocol: asyncio.BaseProtocol | None = None
        self._high, self._low = high, low
        #: every byte the relay wrote, in order
        self.written = bytearray()
        #: each write() call's bytes, in order
        self.writes: list[bytes] = []
        #: writes that came after close() or abort()
        self.writes_after_close = 0
        self._buffered = 0
        self._writing_paused = False
        self._reading = True
        #: what the peer sent while reading was paused (a socket buffer)
        self._inbound: list[bytes] = []
        self._delivery: asyncio.Handle | None = None
        self._closing = False
        self.lost = False
        self.aborted = False
        self.pause_reading_calls = 0
        self.resume_reading_calls = 0

    # --- the relay's side (asyncio.Transport) -----------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self.name, 0)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # What goes to a transport is bytes (STYLE.md: a live view or a
        # bytearray that changes later would corrupt what is sent).
        if type(data) is not bytes:
            raise TypeError(f"{self.name}: write() got {type(data).__name__}, not bytes")
        if self._closing:
            self.writes_after_close += 1
            if self.lost:
                return
        self.written += data
        self.writes.append(data)
        if self.peer_reads:
            return
        self._buffered += len(data)
        if not self._writing_paused and self._buffered > self._high:
            self._writing_paused = True
            self._protocol_callback("pause_writing")

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high
        self._low = low if low is not None else self._high // 4

    def can_write_eof(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        self.pause_reading_calls += 1
        self._reading = False

    def resume_reading(self) -> None:
        self.resume_reading_calls += 1
        self._reading = True
        if self._inbound and self._delivery is None:
            # Like a socket becoming readable again: on a later loop iteration,
            # never inside the call that resumed.
            self._delivery = self._loop.call_soon(self._deliver)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._buffered == 0:
            self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self._buffered = 0
        if not self._closing:
            self._closing = True
        if not self.lost:
            self.lost = True  # at once, so no second connection_lost is queued
            self._loop.call_soon(self._protocol_callback, "connection_lost", None)

    # --- the far peer's side (driven by the test) -------------------------------

    @property
    def reading(self) -> bool:
        """Whether the relay is reading what this peer sends."""
        return self._reading

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def send(self, *chunks: bytes) -> None:
        """The peer sends ``chunks``; each is one ``data_received`` when read."""
        if self._closing:
            return  # a closed transport reads no more
        self._inbound.extend(chunks)
        if self._reading and self._delivery is None:
            self._deliver()

    def send_eof(self) -> None:
        """The peer half-closes (FIN); the transport closes unless told to keep open."""
        assert not self._inbound, "send_eof with undelivered data"
        protocol = self.get_protocol()
        assert isinstance(protocol, asyncio.Protocol)
        if not protocol.eof_received():
            self.close()

    def reset(self, exc: Exception) -> None:
        """The connection breaks (RST): ``connection_lost(exc)`` at once."""
        self._closing = True
        self._buffered = 0
        self._connection_lost(exc)

    def read(self, size: int | None = None) -> None:
        """The peer reads ``size`` bytes (all when None) of what the relay wrote."""
        self._buffered -= self._buffered if size is None else min(size, self._buffered)
        if self._writing_paused and self._buffered <= self._low:
            self._writing_paused = False
            self._protocol_callback("resume_writing")
        if self._closing and self._buffered == 0:
            self._loop.call_soon(self._connection_lost, None)

    # --- helpers ---------------------------------------------------------------

    def _deliver(self) -> None:
        self._delivery = None
        protocol = self.get_protocol()
        assert isinstance(protocol, asyncio.Protocol)
        while self._inbound and self._reading and not self._closing:
            protocol.data_received(self._inbound.pop(0))

    def _connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._protocol_callback("connection_lost", exc)

    def _protocol_callback(self, name: str, *args: Any) -> None:
        getattr(self.get_protocol(), name)(*args)


class RecordingAudit:
    """A StatementAudit that records what the relay taps; congestion on demand."""

    def __init__(
        self,
        *,
        client_tap: Iterable[int] = b"QPBE",
        server_tap: Iterable[int] = b"CEZ",
        server_measure: Iterable[int] = b"D",
    ) -> None:
        self.client_tap = frozenset(client_tap)
        self.client_measure: frozenset[int] = frozenset()
        self.server_tap = frozenset(server_tap)
        self.server_measure = frozenset(server_measure)
        self.from_client: list[TappedMessage] = []
        self.from_server: list[TappedMessage] = []
        #: each on_server call's batch, to see that batches follow chunks
        self.server_batches: list[list[TappedMessage]] = []
        self.congested = False
        self.room_waits = 0
        self._room = asyncio.Event()
        #: what on_client answers (a Termination: the journal write failed)
        self.refusal: Termination | None = None
        #: called at each on_client, its results kept (what the server had by then)
        self.probe: Callable[[], object] | None = None
        self.probed: list[object] = []

    def on_client(self, tapped: list[TappedMessage], now_ns: int) -> Termination | None:
        if self.probe is not None:
            self.probed.append(self.probe())
        if self.refusal is None:
            self.from_client.extend(tapped)
        return self.refusal

    def on_server(self, tapped: list[TappedMessage], now_ns: int) -> Termination | None:
        self.from_server.extend(tapped)
        self.server_batches.append(list(tapped))
        return None

    async def wait_for_room(self) -> None:
        self.room_waits += 1
        self._room.clear()
        await self._room.wait()

    def make_room(self) -> None:
        """The audit writer caught up."""
        self.congested = False
        self._room.set()


class Playbook:
    """A relay between two scripted peers.

    ``client`` and ``server`` are the relay's transports; their peer-side
    methods play the client and the server. Bytes left unread in the handshake
    streams (``client_pending``/``server_pending``) and an EOF seen there are
    what :meth:`Relay.run` takes over.
    """

    def __init__(
        self,
        *,
        audit: RecordingAudit | None = None,
        high: int = 64 * 1024,
        low: int = 16 * 1024,
        peers_read: bool = True,
        client_pending: bytes = b"",
        server_pending: bytes = b"",
        idle: IdleLimit | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.audit = audit
        flow = {"high": high, "low": low, "peer_reads": peers_read}
        self.client = MemoryTransport(loop, "client", **flow)  # type: ignore[arg-type]
        self.server = MemoryTransport(loop, "server", **flow)  # type: ignore[arg-type]
        # The streams are kept, as the listener keeps them: a StreamWriter that
        # is collected closes its transport, which would end the relay.
        self.streams = [
            _stream(loop, t, pending)
            for t, pending in ((self.client, client_pending), (self.server, server_pending))
        ]
        (client_reader, client_writer), (server_reader, server_writer) = self.streams
        self.relay = Relay(
            client_reader,
            client_writer,
            server_reader,
            server_writer,
            name="playbook",
            audit=audit,
            idle=idle,
        )
        self.task: asyncio.Task[Any] | None = None

    async def start(self) -> Playbook:
        """Run the relay; returns once it has taken both transports over."""
        self.task = asyncio.get_running_loop().create_task(self.relay.run(), name="relay")
        await self.settle()
        return self

    async def settle(self) -> None:
        """Let callbacks the last step scheduled run (no time passes)."""
        for _ in range(_SETTLE_ROUNDS):
            await asyncio.sleep(0)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def ended(self) -> Any:
        """The relay's end reason, once it has closed both sides."""
        assert self.task is not None
        return await self.task


def _stream(
    loop: asyncio.AbstractEventLoop, transport: MemoryTransport, pending: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if pending:
        reader.feed_data(pending)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


# --- PostgreSQL messages for the scripts ------------------------------------------


def message(type_char: str, body: bytes = b"") -> bytes:
    return encode_message(ord(type_char), body)


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def ends_at_boundary(stream: bytes) -> bool:
    """Whether ``stream`` is whole typed messages only."""
    tracker = BoundaryTracker(max_length=1 << 30)
    tracker.feed(stream)
    return tracker.at_boundary


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (empty pieces dropped)."""
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]
