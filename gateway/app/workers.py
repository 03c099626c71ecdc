"""The relay worker pool: ``pam gateway run --workers N`` in the daemon's process.

The daemon (the primary) keeps the control API, the grants (expiry, revocation,
heartbeats, failover), every grant's door with its accept loop and owner check,
and the tunnel's listener. It starts N relay worker processes
(:mod:`gateway.app.relay_worker`) and hands each admitted connection's socket to
the one relaying the fewest, over a Unix socketpair (:mod:`gateway.net.fdchannel`,
SCM_RIGHTS): the equivalent of SO_REUSEPORT that also serves grants' ports opened
at run time and Unix-socket grants. A tunnel socket is handed over before its TLS
handshake; the worker asks the daemon to admit the certificate it got.
:class:`WorkerPool` implements :class:`~gateway.net.relays.RelayPool` and
:class:`~gateway.net.relays.TunnelRelays`.

The messages, daemon to worker: ``conn`` (a socket, its grant and number, and
the grant's own upstream target if it has one), ``tunnel`` (a tunnel socket and
its number), ``admitted`` (the answer to ``admit``: the grant, or the refusal),
``cut`` (end or cut a grant's connections, with the Termination), ``notify``
(an expiry notice), ``drain`` (answered once the grant's connections there are
over, their ends recorded and their audit in the store), ``release``,
``cancel`` (answered with whether a connection there handed out the key),
``refresh_secrets`` and ``shutdown``. Worker to daemon: ``ready``, ``admit`` (a
tunnel peer's certificate), ``gone`` (a connection is over), ``cancel`` (a key
it cannot place, routed to the other workers), ``metric`` (connection counts
for ``/metrics``) and ``reply``.

Invariants:
* A connection handed to a worker stays in its door's live set until that
  worker says it is over or dies, so counts, ``/metrics`` and the waits of an
  end cover it; a grant's session ends only after every worker drained it.
* A worker that dies is logged and restarted; only its connections are gone
  (their clients reconnect), and its successor replays the journal it left.
* ``admitted`` is a message, not a reply, so the worker opens the grant's
  shadow door in channel order: a ``cut`` sent after it finds the door.
* Workers ignore SIGINT and SIGTERM (sent to the whole process group): the
  daemon stops them in order, after its grants have ended their connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from gateway.app.metrics import GatewayMetrics
from gateway.app.readiness import Check
from gateway.audit.stats import WriteStats
from gateway.errors import ConfigError
from gateway.net.connection import LiveConnection
from gateway.net.fdchannel import FdChannel, Message
from gateway.net.listener import AccessListener
from gateway.net.ports import GrantInfo
from gateway.net.relay import Termination
from gateway.net.relays import (
    cancel_from_json,
    cancel_to_json,
    grant_to_json,
    target_to_json,
    termination_to_json,
)
from gateway.net.upstream import UpstreamTarget
from gateway.protocol.sqlstate import SqlState
from gateway.protocol.startup import CancelRequest
from gateway.reasons import ConnectionEndReason

log = structlog.get_logger(__name__)

ENTRY_MODULE: Final = "gateway.app.relay_worker"
START_TIMEOUT_SECONDS: Final = 60.0
RESTART_DELAY_SECONDS: Final = 0.5
#: How long a worker may take to stop once its grants' connections are over
#: (flushing its audit trail); then it is killed, its journal replayed next start.
STOP_TIMEOUT_SECONDS: Final = 30.0
#: What a drain may take beyond its wait for connections: recording and the audit flush.
DRAIN_MARGIN_SECONDS: Final = 10.0
CANCEL_TIMEOUT_SECONDS: Final = 10.0


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    channel: FdChannel | None = None
    pid: int | None = None
    #: connection number -> (the door's live set, the placeholder in it)
    handed: dict[int, tuple[set[LiveConnection], LiveConnection]] = field(default_factory=dict)
    #: tunnel sockets handed over and not yet admitted (or refused), by number
    tunnels: set[int] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def is_ready(self) -> bool:
        return self.channel is not None and not self.channel.is_closed

    def track(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        """Run *coro* as one of this worker's tasks until it finishes."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class WorkerPool:
    """N relay worker processes and the daemon's side of their channels."""

    def __init__(
        self,
        home: Path,
        count: int,
        *,
        log_format: str = "json",
        log_level: str = "info",
        metrics: GatewayMetrics | None = None,
        grant_target: Callable[[str], UpstreamTarget | None] = lambda _session_id: None,
        admit_tunnel: Callable[[bytes | None], Awaitable[AccessListener | Termination]]
        | None = None,
    ) -> None:
        self.home = home
        self.log_format = log_format
        self.log_level = log_level
        self.metrics = metrics
        #: a grant's own upstream target (an ephemeral account's role, held
        #: in the daemon's memory), sent with each of its connections
        self.grant_target = grant_target
        #: the door of the grant a tunnel peer's certificate names, or its refusal
        self.admit_tunnel = admit_tunnel
        self._workers = [_Worker(index) for index in range(1, count + 1)]
        self._closing = False
        self._supervisors: set[asyncio.Task[None]] = set()

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids, in worker order."""
        return [w.pid for w in self._workers if w.pid is not None and w.is_ready]

    def live_count(self) -> int:
        """Connections the workers relay (or are starting) right now."""
        return sum(len(w.handed) for w in self._workers)

    def _least_busy(self) -> _Worker | None:
        if self._closing:
            return None
        ready = [w for w in self._workers if w.is_ready]
        return min(ready, key=lambda w: len(w.handed) + len(w.tunnels), default=None)

    def readiness(self) -> Check:
        """``/readyz``'s ``workers`` check: every worker running (one being
        restarted fails it), with how many connections they relay."""
        running = sum(1 for w in self._workers if w.is_ready)
        detail = (
            f"{running} of {len(self._workers)} running, relaying {self.live_count()} connections"
        )
        return Check("workers", running == len(self._workers), detail)

    async def start(self) -> None:
        """Start every worker; each has opened the store and its journal when this returns."""
        for worker in self._workers:
            await self._spawn(worker)
            task = asyncio.create_task(self._supervise(worker), name=f"worker-{worker.index}")
            self._supervisors.add(task)
        log.info("relay_workers_started", workers=len(self._workers), pids=self.pids)

    async def close(self) -> None:
        """Stop every worker (after the grants' shutdown has ended their connections)."""
        if self._closing:
            return
        self._closing = True
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.send({"op": "shutdown"})
        await asyncio.gather(*(self._stop(w) for w in self._workers))
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        log.info("relay_workers_stopped")

    def refresh_secrets(self) -> None:
        """The stored credentials changed: every worker reloads them."""
        self._broadcast({"op": "refresh_secrets"})

    # --- RelayPool ---------------------------------------------------------------

    def hand_off(
        self,
        grant: GrantInfo,
        sock: socket.socket,
        conn: LiveConnection,
        live: set[LiveConnection],
    ) -> bool:
        worker = self._least_busy()
        if worker is None or worker.channel is None:
            return False
        message = {"op": "conn", "number": conn.number} | self._grant_message(grant)
        if not worker.channel.send(message, [sock.fileno()]):
            return False
        worker.handed[conn.number] = (live, conn)
        return True

    def hand_off_tunnel(self, sock: socket.socket, client_addr: str, number: int) -> bool:
        if self.admit_tunnel is None:
            return False
        worker = self._least_busy()
        if worker is None or worker.channel is None:
            return False
        message = {"op": "tunnel", "number": number, "client": client_addr}
        if not worker.channel.send(message, [sock.fileno()]):
            return False
        worker.tunnels.add(number)
        return True

    def _grant_message(self, grant: GrantInfo) -> Message:
        """A grant as a worker gets it: with its own upstream target, if any."""
        target = self.grant_target(grant.session_id)
        message: Message = {"grant": grant_to_json(grant)}
        if target is not None:
            message["target"] = target_to_json(target)
        return message

    def cut(self, session_id: str, termination: Termination, *, ended: bool) -> None:
        self._broadcast(
            {
                "op": "cut",
                "session": session_id,
                "termination": termination_to_json(termination),
                "ended": ended,
            }
        )

    def notify(self, session_id: str, notice: bytes) -> None:
        self._broadcast({"op": "notify", "session": session_id, "notice": notice.hex()})

    async def drain(self, session_id: str, timeout: float) -> None:
        message = {"op": "drain", "session": session_id, "timeout": timeout}
        await asyncio.gather(
            *(
                self._ask(w, message, timeout + DRAIN_MARGIN_SECONDS)
                for w in self._workers
                if w.is_ready
            )
        )

    def release(self, session_id: str) -> None:
        self._broadcast({"op": "release", "session": session_id})

    async def cancel(self, session_id: str, request: CancelRequest, *, source: str) -> bool:
        return await self._cancel_in(session_id, request, source, exclude=None)

    # --- the channels --------------------------------------------------------------

    async def _cancel_in(
        self, session_id: str, request: CancelRequest, source: str, *, exclude: _Worker | None
    ) -> bool:
        message = cancel_to_json(session_id, request, source)
        asked = [w for w in self._workers if w.is_ready and w is not exclude]
        replies = await asyncio.gather(
            *(self._ask(w, message, CANCEL_TIMEOUT_SECONDS) for w in asked)
        )
        return any(reply is not None and reply.get("found") for reply in replies)

    def _broadcast(self, message: Message) -> None:
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.send(message)

    async def _ask(self, worker: _Worker, message: Message, timeout: float) -> Message | None:
        """Ask *worker*; its reply, or None (no answer in time, or the worker
        went away: its channel closed)."""
        if worker.channel is None:
            return None
        try:
            return await worker.channel.ask(message, timeout)
        except TimeoutError:
            log.warning("relay_worker_no_reply", worker=worker.index, op=message.get("op"))
            return None

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                ENTRY_MODULE,
                "--home",
                str(self.home),
                "--index",
                str(worker.index),
                "--channel-fd",
                str(theirs.fileno()),
                "--log-format",
                self.log_format,
                "--log-level",
                self.log_level,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        channel = FdChannel(ours)
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                first = await channel.receive()
        except TimeoutError:
            first = None
        if first is None or first[0].get("op") != "ready":
            channel.close()
            detail = "" if first is None else f": {first[0].get('message', '')}"
            raise ConfigError(
                f"relay worker {worker.index} did not start{detail}",
                hint="see the gateway's log; run with --workers 1 to relay in one process",
            )
        worker.channel, worker.pid = channel, worker.process.pid
        worker.track(self._read(worker, channel), name=f"worker-{worker.index}-rx")

    async def _supervise(self, worker: _Worker) -> None:
        """Restart the worker whenever it dies, until the pool closes."""
        while True:
            process = worker.process
            assert process is not None
            status = await process.wait()
            self._gone(worker)
            if self._closing:
                return
            log.error("relay_worker_died", worker=worker.index, pid=process.pid, status=status)
            await asyncio.sleep(RESTART_DELAY_SECONDS)
            try:
                await self._spawn(worker)
            except ConfigError as exc:
                log.error("relay_worker_restart_failed", worker=worker.index, error=exc.message)
                return
            log.info("relay_worker_restarted", worker=worker.index, pid=worker.pid)

    def _gone(self, worker: _Worker) -> None:
        """The worker's process ended: its connections are over, its questions
        unanswered (closing its channel answers them with None)."""
        if worker.channel is not None:
            worker.channel.close()
        worker.channel, worker.pid = None, None
        for live, conn in worker.handed.values():
            live.discard(conn)
        worker.handed.clear()
        worker.tunnels.clear()

    async def _stop(self, worker: _Worker) -> None:
        process = worker.process
        if process is None or process.returncode is not None:
            return
        try:
            async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
                await process.wait()
        except TimeoutError:
            log.error("relay_worker_stop_timeout", worker=worker.index, pid=process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def _read(self, worker: _Worker, channel: FdChannel) -> None:
        while (received := await channel.receive()) is not None:
            message, fds = received
            for fd in fds:  # a worker sends none; never leak one
                socket.socket(fileno=fd).close()
            try:
                self._handle(worker, message)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("relay_worker_message_malformed", worker=worker.index, error=repr(exc))

    def _handle(self, worker: _Worker, message: Message) -> None:
        op = message.get("op")
        if op == "gone":
            number = int(message["number"])
            worker.tunnels.discard(number)  # refused, or never admitted
            entry = worker.handed.pop(number, None)
            if entry is not None:
                entry[0].discard(entry[1])
        elif op == "admit":
            der = None if message.get("der") is None else bytes.fromhex(message["der"])
            admit = self._admit(worker, int(message["number"]), str(message["client"]), der)
            worker.track(admit)
        elif op == "cancel":
            worker.track(self._route_cancel(worker, message))
        elif op == "metric":
            self._metric(message)

    async def _admit(
        self, worker: _Worker, number: int, client_addr: str, der: bytes | None
    ) -> None:
        """A worker's tunnel connection *number*, its handshake done: the grant
        its peer's certificate (*der*) names, its placeholder put in the door's
        live set, or the refusal the worker answers the client with."""
        assert self.admit_tunnel is not None
        try:
            outcome = await self.admit_tunnel(der)
        except Exception as exc:  # a bug in a lookup must not leave the client waiting
            log.error("tunnel_admit_failed", worker=worker.index, error=repr(exc))
            outcome = _ADMIT_FAILED
        if number not in worker.tunnels or worker.channel is None:
            return  # the worker died, or gave up waiting: nothing to place
        worker.tunnels.discard(number)
        answer: Message = {"op": "admitted", "number": number}
        if isinstance(outcome, AccessListener):
            placed = outcome.admit_elsewhere(number, client_addr)
            if isinstance(placed, LiveConnection):
                worker.handed[number] = (outcome.connections, placed)
                answer |= self._grant_message(outcome.grant)
            else:
                answer["refusal"] = termination_to_json(placed)
        else:
            answer["refusal"] = termination_to_json(outcome)
        worker.channel.send(answer)

    async def _route_cancel(self, worker: _Worker, message: Message) -> None:
        """A worker's CancelRequest with a key none of its connections handed
        out: tried in the other workers, the answer sent back."""
        found = await self._cancel_in(
            str(message["session"]),
            cancel_from_json(message),
            str(message.get("source", "")),
            exclude=worker,
        )
        log.info("cancel_routed", from_worker=worker.index, found=found)
        if worker.channel is not None:
            worker.channel.reply(message, found=found)

    def _metric(self, message: Message) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        kind: Any = message.get("kind")
        if kind == "upstream_connected":
            metrics.upstream_connected(float(message["seconds"]), ok=bool(message["ok"]))
        elif kind == "error_sent":
            metrics.error_sent(str(message["sqlstate"]))
        elif kind == "connection_ended":
            metrics.connection_ended(
                str(message["reason"]),
                int(message["bytes_from_client"]),
                int(message["bytes_from_server"]),
            )
        elif kind == "audit_written":
            metrics.audit_written(WriteStats.from_json(message["stats"]))
        elif kind == "refused":
            metrics.refusals.labels(str(message["place"]), str(message["reason"])).inc()


#: what a worker's tunnel client hears when its admission failed unexpectedly
_ADMIT_FAILED: Final = Termination(
    ConnectionEndReason.ERROR,
    SqlState.INTERNAL_ERROR,
    "the pam gateway could not look up this connection's grant",
    hint="try again; if it persists, see the gateway's log",
)

__all__ = ["WorkerPool"]
