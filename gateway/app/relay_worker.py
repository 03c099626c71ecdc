"""A relay worker process's entry point: ``python -m gateway.app.relay_worker``.

A composition root, started by the daemon's :class:`~gateway.app.workers.WorkerPool`
(``pam gateway run --workers N``). It opens the store from the state directory
exactly as the daemon does (settings, master key, store URL), and builds what a
connection's life needs: the credentials, the audit runtime (a journal of its
own, ``audit-journal-worker-<index>``, read by an audit writer process of its
own as the daemon's is, or on its store thread: each journal has one writer),
the connection records and the refusal recorder. Then it serves the
connections the daemon hands it over the channel (an inherited Unix socket,
``--channel-fd``; see :mod:`gateway.app.workers` for the messages), each in a
shadow door of its grant: an :class:`~gateway.net.listener.AccessListener`
never started, so that ending, cutting, notices, idle limits and cancels work
exactly as they do in the daemon. A tunnel socket comes before its TLS
handshake: this process does the handshake (the gateway's tunnel certificate,
the CA's check of the client's), asks the daemon which grant the certificate
names (``admit``; failover's take-over happens there), and relays it in that
grant's shadow door or answers the client with the daemon's refusal.

Invariants:
* The grants are the daemon's: this process never ends a session, it only ends
  connections when told to (or when the daemon is gone).
* A grant's own upstream target (an ephemeral account's role) is held here from
  its first connection until the daemon releases the grant.
* It ignores SIGINT and SIGTERM (sent to the whole process group): the daemon
  stops it with ``shutdown`` once its grants' connections are over; if the
  daemon goes away (its channel closes) it ends every connection with 57P01,
  flushes its audit trail and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from gateway.app.logging import configure_logging
from gateway.app.relaying import Relaying
from gateway.app.runtime import event_loop_factory
from gateway.audit.journal import JOURNAL_DIR
from gateway.audit.sink import AuditSink
from gateway.audit.stats import WriteStats
from gateway.config import GatewaySettings, load_settings, store_url
from gateway.credentials import keyring, pki
from gateway.credentials.secretbox import SecretBox
from gateway.errors import GatewayError
from gateway.net.fdchannel import FdChannel, Message
from gateway.net.listener import AccessListener
from gateway.net.ports import GrantInfo
from gateway.net.relay import Termination
from gateway.net.relays import (
    cancel_from_json,
    cancel_to_json,
    grant_from_json,
    target_from_json,
    termination_from_json,
)
from gateway.net.tls import ensure_local_certificate, server_context
from gateway.net.tunnel import TunnelEndpoint
from gateway.protocol.sqlstate import SqlState
from gateway.protocol.startup import CancelRequest
from gateway.reasons import ConnectionEndReason
from gateway.refusal import Refusal
from gateway.store import Store

log = structlog.get_logger(__name__)

#: How a worker ends what is left when it stops or loses the daemon.
SHUTDOWN: Final = Termination(
    ConnectionEndReason.GATEWAY_SHUTDOWN,
    SqlState.ADMIN_SHUTDOWN,
    "terminating connection because the pam gateway is shutting down",
    hint="reconnect once the gateway is back, with a new `pam db access`",
)
SHUTDOWN_GRACE_SECONDS: Final = 3.0
#: How long a cancel routed through the daemon may take to be placed.
CANCEL_TIMEOUT_SECONDS: Final = 15.0
#: How long a tunnel connection waits for the daemon to admit its certificate
#: (a failover take-over reads and writes the store).
ADMIT_TIMEOUT_SECONDS: Final = 30.0
#: What a tunnel client hears when the daemon does not answer in time.
NOT_ADMITTED: Final = Termination(
    ConnectionEndReason.GATEWAY_SHUTDOWN,
    SqlState.CANNOT_CONNECT_NOW,
    "the pam gateway did not look this connection's grant up in time",
    hint="reconnect; if it persists, see the gateway's log",
)


def journal_dir(home: Path, index: int) -> Path:
    """Worker *index*'s own audit journal (one writer per journal)."""
    return home / f"{JOURNAL_DIR}-worker-{index}"


class ForwardedMetrics:
    """The connection metrics, sent to the daemon's ``/metrics`` over the channel."""

    def __init__(self, channel: FdChannel) -> None:
        self._channel = channel

    def upstream_connected(self, seconds: float, *, ok: bool) -> None:
        self._send("upstream_connected", seconds=seconds, ok=ok)

    def error_sent(self, sqlstate: str) -> None:
        self._send("error_sent", sqlstate=sqlstate)

    def connection_ended(self, reason: str, bytes_from_client: int, bytes_from_server: int) -> None:
        self._send(
            "connection_ended",
            reason=reason,
            bytes_from_client=bytes_from_client,
            bytes_from_server=bytes_from_server,
        )

    def audit_written(self, stats: WriteStats) -> None:
        self._send("audit_written", stats=stats.to_json())

    def refused(self, refusal: Refusal) -> None:
        self._send("refused", place=str(refusal.place), reason=str(refusal.reason))

    def _send(self, kind: str, **values: Any) -> None:
        self._channel.send({"op": "metric", "kind": kind} | values)


class RelayWorker:
    """The worker's shadow doors, fed by the daemon's messages."""

    def __init__(
        self,
        index: int,
        settings: GatewaySettings,
        store: Store,
        channel: FdChannel,
        home: Path,
        *,
        sink: AuditSink | None = None,
        box: SecretBox | None = None,
        tunnel_tls: ssl.SSLContext | None = None,
    ) -> None:
        #: the master key ring, followed as the daemon's is (master key rotation)
        self.box = box
        self.home = home
        self.index = index
        self.settings = settings
        self.store = store
        self.channel = channel
        self.relaying = Relaying.build(
            store, settings, sink=sink, journal_dir=journal_dir(home, index)
        )
        self.db = self.relaying.db
        self.audit = self.relaying.audit
        self.audit.cut_live = self._cut_all
        self.records = self.relaying.records
        self.refusals = self.relaying.refusals
        self.metrics = ForwardedMetrics(channel)
        cert, key = ensure_local_certificate(home)
        self.host = self.relaying.host(settings, self.metrics, client_tls=server_context(cert, key))
        self.doors: dict[str, AccessListener] = {}
        #: the tunnel's TLS (None: the gateway has no CA, so no tunnel)
        self.tunnel_tls = tunnel_tls
        #: tunnel connections waiting for the daemon's ``admitted``, by number
        self._admissions: dict[int, asyncio.Future[AccessListener | Termination]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.relaying.start(self.settings, self.metrics)
        if self.box is not None:
            self._track(self._follow_master_key())
        self.channel.send({"op": "ready", "pid": os.getpid()})
        log.info("relay_worker_ready", worker=self.index, pid=os.getpid())

    async def _follow_master_key(self) -> None:
        """Every presence renewal's interval: the keys copied here since, and the
        store's active version (the daemon reports and re-seals; this follows)."""
        assert self.box is not None
        while True:
            await asyncio.sleep(self.settings.presence_renew_seconds)
            try:
                await self.db(keyring.follow, self.home, self.box, self.store)
            except Exception as exc:  # tried again at the next interval
                log.warning("relay_worker_master_key_sync_failed", error=repr(exc))

    async def serve(self) -> None:
        """Handle the daemon's messages until it says shutdown or goes away."""
        while (received := await self.channel.receive()) is not None:
            message, fds = received
            op = message.get("op")
            if op == "conn" and len(fds) == 1:
                self._serve_connection(message, fds[0])
                continue
            if op == "tunnel" and len(fds) == 1:
                self._serve_tunnel(message, fds[0])
                continue
            for fd in fds:
                os.close(fd)
            if op == "shutdown":
                log.info("relay_worker_stopping", worker=self.index)
                return
            try:
                self._handle(op, message)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("relay_worker_message_malformed", op=op, error=repr(exc))
        log.error("relay_worker_daemon_gone", worker=self.index)

    async def close(self) -> None:
        """End what is left, record it, flush the trail, close the store thread."""
        self._cut_all(SHUTDOWN)
        doors = list(self.doors.values())
        await asyncio.gather(
            *(d.close(wait=SHUTDOWN_GRACE_SECONDS) for d in doors), return_exceptions=True
        )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.records.close()
        await self.audit.close()
        await self.refusals.close()
        self.db.shutdown()

    def _serve_connection(self, message: Message, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        try:
            grant = grant_from_json(message["grant"])
            number = int(message["number"])
        except (KeyError, TypeError, ValueError) as exc:
            sock.close()
            log.error("relay_worker_message_malformed", op="conn", error=repr(exc))
            return
        door = self._door(grant, message.get("target"))
        task = door.serve_accepted(sock, number)
        task.add_done_callback(lambda _t: self._gone(number))

    def _door(self, grant: GrantInfo, target: Any) -> AccessListener:
        """The grant's shadow door here, opened on its first connection (with
        its own upstream target, when the daemon sent one)."""
        if target is not None:
            self.relaying.credentials.set_grant_target(grant.session_id, target_from_json(target))
        door = self.doors.get(grant.session_id)
        if door is None:
            door = AccessListener(
                grant, self.host, cancel_elsewhere=self._cancel_elsewhere(grant.session_id)
            )
            self.doors[grant.session_id] = door
        return door

    def _gone(self, number: int) -> None:
        self.channel.send({"op": "gone", "number": number})

    def _serve_tunnel(self, message: Message, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        try:
            number, client_addr = int(message["number"]), str(message["client"])
        except (KeyError, TypeError, ValueError) as exc:
            sock.close()
            log.error("relay_worker_message_malformed", op="tunnel", error=repr(exc))
            return
        if self.tunnel_tls is None:  # the daemon has a tunnel only with a CA
            sock.close()
            self._gone(number)
            log.error("relay_worker_no_tunnel_tls", worker=self.index)
            return
        endpoint = TunnelEndpoint(
            tls=self.tunnel_tls,
            admit=functools.partial(self._admit, number, client_addr),
            startup_timeout=self.settings.client_startup_timeout_seconds,
            on_refusal=self.refusals.refused,
        )
        self._track(self._tunnel(endpoint, sock, client_addr, number))

    async def _tunnel(
        self, endpoint: TunnelEndpoint, sock: socket.socket, client_addr: str, number: int
    ) -> None:
        task = None
        try:
            task = await endpoint.serve_accepted(sock, client_addr, number)
        finally:
            if task is None:
                self._gone(number)  # refused (or failed): the daemon placed nothing
            else:
                task.add_done_callback(lambda _t: self._gone(number))

    async def _admit(
        self, number: int, client_addr: str, der: bytes | None
    ) -> AccessListener | Termination:
        """Ask the daemon which grant the tunnel peer's certificate names; its
        answer arrives as ``admitted`` (see :meth:`_admitted`)."""
        future: asyncio.Future[AccessListener | Termination] = (
            asyncio.get_running_loop().create_future()
        )
        self._admissions[number] = future
        message = {
            "op": "admit",
            "number": number,
            "client": client_addr,
            "der": None if der is None else der.hex(),
        }
        try:
            if not self.channel.send(message):
                return SHUTDOWN
            async with asyncio.timeout(ADMIT_TIMEOUT_SECONDS):
                return await future
        except TimeoutError:
            log.warning("tunnel_admit_timeout", worker=self.index, connection=number)
            return NOT_ADMITTED
        finally:
            self._admissions.pop(number, None)

    def _admitted(self, message: Message) -> None:
        """The daemon's answer to a tunnel connection's ``admit``: its grant's
        shadow door is opened now, in channel order, so a ``cut`` sent after
        it finds the door."""
        number = int(message["number"])
        refusal = message.get("refusal")
        outcome: AccessListener | Termination = (
            termination_from_json(refusal)
            if refusal is not None
            else self._door(grant_from_json(message["grant"]), message.get("target"))
        )
        future = self._admissions.get(number)
        if future is not None and not future.done():
            future.set_result(outcome)

    def _handle(self, op: object, message: Message) -> None:
        session_id = str(message.get("session", ""))
        door = self.doors.get(session_id)
        if op == "admitted":
            self._admitted(message)
        elif op == "cut":
            if door is not None:
                termination = termination_from_json(message["termination"])
                if message.get("ended"):
                    door.end(termination)
                else:
                    door.terminate_live(termination)
        elif op == "notify":
            if door is not None:
                door.notify_live(bytes.fromhex(message["notice"]))
        elif op == "release":
            self.relaying.credentials.drop_grant_target(session_id)
            if door is not None:
                self.doors.pop(session_id, None)
                self._track(door.close(wait=0))
        elif op == "drain":
            self._track(self._drain(door, message))
        elif op == "cancel":
            self._track(self._cancel(door, message))
        elif op == "refresh_secrets":
            self._track(self._refresh_secrets())

    def _track(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, door: AccessListener | None, message: Message) -> None:
        """The grant's connections here are over, their ends recorded and their
        audit in the store: then the daemon hears so."""
        if door is not None:
            await door.wait_idle(float(message.get("timeout", SHUTDOWN_GRACE_SECONDS)))
            await self.audit.drain()
            await self.records.write_unwritten_ends()
        self.channel.reply(message)

    async def _cancel(self, door: AccessListener | None, message: Message) -> None:
        found = door is not None and await door.cancel_here(cancel_from_json(message))
        self.channel.reply(message, found=found)

    def _cancel_elsewhere(self, session_id: str) -> Callable[[CancelRequest, str], Awaitable[bool]]:
        async def route(request: CancelRequest, source: str) -> bool:
            """Ask the daemon to try the other workers' connections."""
            message = cancel_to_json(session_id, request, source)
            try:
                reply = await self.channel.ask(message, CANCEL_TIMEOUT_SECONDS)
            except TimeoutError:
                return False
            return reply is not None and bool(reply.get("found"))

        return route

    async def _refresh_secrets(self) -> None:
        if self.box is not None:  # a secret sealed under a version just activated
            await self.db(keyring.follow, self.home, self.box, self.store)
        await self.relaying.refresh_secrets()

    def _cut_all(self, termination: Termination) -> None:
        for door in self.doors.values():
            door.terminate_live(termination)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.app.relay_worker")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--log-format", choices=["console", "json"], default="json")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # The daemon decides when we stop (after its grants have ended our connections).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging("json" if args.log_format == "json" else "console", args.log_level)
    structlog.contextvars.bind_contextvars(worker=args.index, worker_pid=os.getpid())
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(
            _run(args.home, args.index, args.channel_fd, args.log_format, args.log_level)
        )


async def _run(home: Path, index: int, channel_fd: int, log_format: str, log_level: str) -> int:
    channel = FdChannel(socket.socket(fileno=channel_fd))
    try:
        settings = load_settings(home)
        box = keyring.open_box(home)
        tunnel_tls = _tunnel_tls(home, box)
        store = Store.open(
            store_url(home, settings), box, sqlite_synchronous=settings.store_sqlite_synchronous
        )
    except GatewayError as exc:
        channel.send({"op": "error", "message": exc.message})
        return 1
    # As in the daemon: the trail is written by a process of its own (one per
    # worker, reading the worker's journal), not on the relay's GIL.
    sink = (
        AuditSink(
            home, log_format=log_format, log_level=log_level, journal_dir=journal_dir(home, index)
        )
        if settings.audit_enabled and settings.audit_writer_process
        else None
    )
    worker = RelayWorker(
        index, settings, store, channel, home, sink=sink, box=box, tunnel_tls=tunnel_tls
    )
    try:
        await worker.start()
        await worker.serve()
    finally:
        await worker.close()
        channel.close()
        store.close()
    log.info("relay_worker_stopped", worker=index)
    return 0


def _tunnel_tls(home: Path, box: SecretBox) -> ssl.SSLContext | None:
    """The tunnel's server TLS, as the daemon builds it; None without a gateway CA."""
    if not (home / pki.CA_CERT_FILE).exists():
        return None
    return pki.tunnel_server_context(
        pki.load_server_identity(home, box), pki.load_ca_certificate(home)
    )


if __name__ == "__main__":
    sys.exit(main())
