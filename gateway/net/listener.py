"""The door of an access grant: a listener on 127.0.0.1 (or a Unix socket) for
one grant's port.

The listener accepts connections and keeps the set of live ones, so that the
grant service can end them (:meth:`AccessListener.end`,
:meth:`AccessListener.terminate_live`) and wait for or close them; it forwards
a client's CancelRequest to the upstream backend its key was mapped to. One
connection's life (startup, grant check, upstream, records, relay) is
:class:`~gateway.net.connection.ConnectionLife`.

Nobody is authenticated locally: the grant is the authorisation, and the port is
bound to loopback. With :attr:`AccessListener.owner_uid` set, only processes of
that OS user are served: every accepted connection's owner is looked up in the
kernel (:mod:`gateway.net.peercred`) before a byte of it is read, and any other
(or one whose owner cannot be found) is answered with FATAL 28000 and recorded,
never relayed; its CancelRequests are dropped. With
:attr:`AccessListener.unix_path` the door is a Unix socket (mode 0600, owned by
the owner) instead of a TCP port, removed when the listener closes.
:class:`ConnectionHost` and :class:`GrantInfo` (declared in
:mod:`gateway.net.ports`) are exported here for the grant service.

With :attr:`AccessListener.relays` set (``--workers N``), a connection the door
admits is handed to a relay worker process instead of served here (see
:mod:`gateway.net.relays`); it stays in :attr:`AccessListener.connections` as a
placeholder until the worker says it is over, so counts and waits cover it.
Ending, cutting and notices reach the workers' connections too; a CancelRequest
whose key no connection here handed out is tried in the workers. A worker runs
each connection it is given in a shadow door of the grant (never started:
:meth:`AccessListener.serve_accepted`), which asks the daemon
(:attr:`AccessListener.cancel_elsewhere`) to route a cancel it cannot place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import os
import pwd
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from gateway.errors import GatewayError, InvalidRequest
from gateway.net.acceptor import LISTEN_BACKLOG, Acceptor, listening_socket
from gateway.net.connection import ConnectionLife, LiveConnection
from gateway.net.peercred import socket_peer_owner
from gateway.net.ports import ConnectionAuditTap, ConnectionHost, GrantInfo
from gateway.net.relay import Termination
from gateway.net.relays import RelayPool
from gateway.net.upstream import send_cancel
from gateway.protocol.sqlstate import SqlState
from gateway.protocol.startup import CancelRequest
from gateway.reasons import ConnectionEndReason
from gateway.refusal import Refusal, RefusalPlace, RefusalReason

log = structlog.get_logger(__name__)

#: The port a Unix socket is named after when none is asked for (libpq's default).
DEFAULT_SOCKET_PORT = 5432
#: sun_path's size on Linux, its terminating NUL included (unix(7)).
_SUN_PATH_MAX = 108

__all__ = [
    "DEFAULT_SOCKET_PORT",
    "AccessListener",
    "ConnectionAuditTap",
    "ConnectionHost",
    "GrantInfo",
    "LiveConnection",
]


@dataclass
class AccessListener:
    """Serves one grant's local port."""

    grant: GrantInfo
    host: ConnectionHost
    listen_host: str = "127.0.0.1"
    port: int = 0
    #: set once the grant has ended; new connections get this FATAL
    refusal: Termination | None = None
    connections: set[LiveConnection] = field(default_factory=set)
    #: the OS user whose processes alone are served; None serves any local process
    owner_uid: int | None = None
    #: serve on this Unix socket path instead of a TCP port (``port`` names it)
    unix_path: str | None = None
    #: relay worker processes to hand admitted connections to (None: served here)
    relays: RelayPool | None = None
    #: in a worker's shadow door: forwards a CancelRequest no connection here
    #: handed out to the connection of another process that did; True if one did
    cancel_elsewhere: Callable[[CancelRequest, str], Awaitable[bool]] | None = None
    _unix_inode: int | None = None
    _owner_name: str = ""
    _doors: Acceptor = field(init=False)

    def __post_init__(self) -> None:
        self._doors = Acceptor(f"grant-{self.grant.session_id[:8]}")

    async def start(self) -> int:
        # A socket of our own rather than asyncio.start_server: a connection's
        # first byte is peeked before any transport reads it (direct TLS).
        # An IPv6 literal needs its family said (create_server defaults to IPv4).
        if self.owner_uid is not None:
            self._owner_name = _user_name(self.owner_uid)
        if self.unix_path is not None:
            sock = _bind_unix(self.unix_path, self.owner_uid)
            self._unix_inode = os.stat(self.unix_path).st_ino
        else:
            sock = listening_socket(self.listen_host, self.port)
            self.port = sock.getsockname()[1]
        self._doors.start(sock, lambda client, _address, number: self._serve(client, number))
        return self.port

    def end(self, termination: Termination) -> None:
        """Refuse new connections and end every live one with ``termination``."""
        self.refusal = termination
        self._terminate_here(termination)
        if self.relays is not None:
            self.relays.cut(self.grant.session_id, termination, ended=True)

    def terminate_live(self, termination: Termination) -> None:
        """End every live connection, but keep accepting new ones."""
        self._terminate_here(termination)
        if self.relays is not None:
            self.relays.cut(self.grant.session_id, termination, ended=False)

    def _terminate_here(self, termination: Termination) -> None:
        for conn in list(self.connections):
            if conn.relay is not None:
                conn.relay.terminate(termination)
            else:
                conn.pending_termination = termination

    def notify_live(self, notice: bytes) -> int:
        """Send every relaying connection *notice* (a NoticeResponse) at its next
        server message boundary; returns how many got it. A connection still
        starting up is skipped: it had not been greeted yet."""
        sent = 0
        for conn in list(self.connections):
            if conn.relay is not None:
                conn.relay.notify(notice)
                sent += 1
            elif conn.handed_off:  # told through the pool, below
                sent += 1
        if self.relays is not None:
            self.relays.notify(self.grant.session_id, notice)
        return sent

    async def wait_idle(self, timeout: float) -> None:
        """Wait (bounded) until no connection handler is running."""
        await self._doors.wait(timeout)
        if self.relays is not None:
            await self.relays.drain(self.grant.session_id, timeout)

    async def close(self, *, wait: float = 3.0) -> None:
        """Stop listening and wait (bounded) for connection handlers to finish."""
        await self._doors.stop_accepting()
        if self.unix_path is not None and self._unix_inode is not None:
            # Only the socket this listener made: a file put there since stays.
            with contextlib.suppress(OSError):
                if os.lstat(self.unix_path).st_ino == self._unix_inode:
                    os.unlink(self.unix_path)
            self._unix_inode = None
        await self._doors.cancel_after(wait)
        if self.relays is not None:
            await self.relays.drain(self.grant.session_id, wait)
            self.relays.release(self.grant.session_id)

    def serve_accepted(self, sock: socket.socket, number: int) -> asyncio.Task[None]:
        """Serve a connection accepted elsewhere (a worker's shadow door: the
        daemon's door accepted it, checked its owner, and numbered it)."""
        return self._doors.track(self._serve(sock, number), number)

    async def _serve(self, sock: socket.socket, number: int) -> None:
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            client_addr = _LOCAL_CLIENT
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                peer = sock.getpeername()
            except OSError:  # the client is already gone
                peer = None
            client_addr = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        conn = LiveConnection(number, client_addr)
        bound = log.bind(session_id=self.grant.session_id, connection=number, client=client_addr)
        try:
            refusal, peer_uid = await self._check_owner(sock, bound)
        except BaseException:  # cancelled (close) while the kernel was asked
            sock.close()
            raise
        if refusal is None and self._hand_off(sock, conn):
            return
        life = ConnectionLife(
            self,
            conn,
            sock,
            log=bound,
            refusal=refusal,
            refused_who=f"uid:{peer_uid}" if peer_uid is not None else None,
        )
        self.connections.add(conn)
        try:
            await life.serve()
        finally:
            self.connections.discard(conn)

    def _hand_off(self, sock: socket.socket, conn: LiveConnection) -> bool:
        """Give an admitted connection to a relay worker, if there are any and
        it would not be refused here anyway; True once given."""
        if self.relays is None or self.refusal is not None or self.host.refusal() is not None:
            return False
        if not self.relays.hand_off(self.grant, sock, conn, self.connections):
            return False
        sock.close()  # the worker has its own copy
        conn.handed_off = True
        self.connections.add(conn)  # until the worker says it is over
        return True

    def ended_refusal(self) -> Termination | None:
        """What a new connection hears once the grant has ended (28000, the
        end's own words), or None while it is live."""
        ended = self.refusal
        if ended is None:
            return None
        return Termination(
            ConnectionEndReason.SESSION_ENDED,
            SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
            ended.message,
            ended.hint,
        )

    def admit_elsewhere(self, number: int, client_addr: str) -> LiveConnection | Termination:
        """Admit a tunnel connection that a relay worker carries (its TLS and its
        relay are the worker's): the FATAL it gets, if this door or the gateway
        refuses it now, else its placeholder in the live set (as for a hand-off)."""
        refusal = self.host.refusal() or self.ended_refusal()
        if refusal is not None:
            return refusal
        conn = LiveConnection(number, client_addr, handed_off=True)
        self.connections.add(conn)  # until the worker says it is over
        return conn

    async def _check_owner(
        self, sock: socket.socket, bound: structlog.typing.FilteringBoundLogger
    ) -> tuple[Termination | None, int | None]:
        """None if the connecting process belongs to the owner (or nobody owns
        the door); else the refusal it gets. With the uid found, if any."""
        if self.owner_uid is None:
            return None, None
        try:
            # Reading /proc/net/tcp is blocking work proportional to the host's
            # socket count: off the loop, so a burst does not stall the relays.
            uid = await asyncio.to_thread(socket_peer_owner, sock)
        except (OSError, ValueError) as exc:
            bound.warning("owner_lookup_failed", error=str(exc))
            uid = None
        if uid == self.owner_uid:
            return None, uid
        return owner_refusal(self.owner_uid, self._owner_name, uid), uid

    def serve_tunnelled(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_addr: str,
        number: int | None = None,
    ) -> asyncio.Task[None]:
        """Serve a connection that came through the tunnel, as one of this door's own
        (same life, same live set, cut and cancelled the same way); ``client_addr``
        is the tunnel's peer, the laptop, not a loopback forwarder. *number* is
        the tunnel's for it (in a worker, the daemon's), else a new one."""
        if number is None:
            number = Acceptor.next_number()
        return self._doors.track(
            self._serve_streams(reader, writer, client_addr, number), number, kind="t"
        )

    async def _serve_streams(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_addr: str,
        number: int,
    ) -> None:
        conn = LiveConnection(number, client_addr)
        bound = log.bind(
            session_id=self.grant.session_id, connection=number, client=client_addr, tunnel=True
        )
        life = ConnectionLife(self, conn, (reader, writer), log=bound)
        self.connections.add(conn)
        try:
            await life.serve()
        finally:
            self.connections.discard(conn)

    async def forward_cancel(self, request: CancelRequest, source: str = "unknown") -> None:
        """Forward a CancelRequest whose key this listener handed out.

        Each client key maps to its upstream backend's real key; anything else
        is dropped without a reply, as the server itself does (55.2.7). A key
        handed out in another process (a relay worker, or the daemon for a
        worker) is forwarded there.
        """
        if await self.cancel_here(request):
            return
        if self.relays is not None and await self.relays.cancel(
            self.grant.session_id, request, source=source
        ):
            return
        if self.cancel_elsewhere is not None and await self.cancel_elsewhere(request, source):
            return
        # Dropped without a reply; on record, a flood of them summarised.
        self.host.refused(
            Refusal(
                RefusalPlace.LISTENER,
                RefusalReason.UNKNOWN_CANCEL_KEY,
                "CancelRequest dropped: its key was not handed out by this grant",
                source,
                session_id=self.grant.session_id,
                event="cancel_ignored_unknown_key",
            )
        )

    async def cancel_here(self, request: CancelRequest) -> bool:
        """Forward *request* if a connection served in this process handed out
        its key; True if one did."""
        for conn in list(self.connections):
            client_key = conn.client_key
            upstream = conn.upstream
            if (
                client_key is None
                or upstream is None
                or upstream.handshake.backend_key is None
                or client_key.pid != request.pid
                or not hmac.compare_digest(client_key.secret, request.secret)
            ):
                continue
            real = upstream.handshake.backend_key
            target = await self.host.upstream_target(
                self.grant.resource, self.grant.account, session_id=self.grant.session_id
            )
            try:
                await send_cancel(target, real.pid, real.secret)
            except (GatewayError, OSError, TimeoutError) as exc:
                log.warning(
                    "cancel_forward_failed", session_id=self.grant.session_id, error=str(exc)
                )
            else:
                log.info("cancel_forwarded", session_id=self.grant.session_id, backend_pid=real.pid)
            return True
        return False


#: what a Unix socket client's address is recorded as (PostgreSQL's own log term)
_LOCAL_CLIENT = "[local]"


def owner_refusal(owner_uid: int, owner_name: str, peer_uid: int | None) -> Termination:
    """The FATAL a process of another OS user (or of none found) gets."""
    who = (
        f"the connecting process runs as uid {peer_uid}"
        if peer_uid is not None
        else "pam could not find which OS user the connecting process runs as"
    )
    return Termination(
        ConnectionEndReason.ERROR,
        SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
        "connection refused: this pam grant's port accepts connections only from OS user"
        f" {owner_name} (uid {owner_uid}); {who}",
        hint=f"connect as OS user {owner_name}, or open a grant of your own with `pam db access`",
    )


def unix_socket_path(directory: str, port: int, owner_uid: int) -> str:
    """``directory/.s.PGSQL.<port>`` (libpq's name, so ``host=DIR port=N`` finds
    it), once ``directory`` is a 0700 directory of ``owner_uid``'s; created so if
    missing and this process runs as that user. Else :class:`InvalidRequest`."""
    if not os.path.isabs(directory):
        raise InvalidRequest(f"the socket directory {directory!r} is not an absolute path")
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        info = _make_socket_dir(directory, owner_uid)
    hint = f"use a directory of your own: mkdir -m 700 DIR (and chmod 700 {directory})"
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidRequest(
            f"the socket directory {directory} is not a directory (a symbolic link is refused)",
            hint=hint,
        )
    if info.st_uid != owner_uid:
        raise InvalidRequest(
            f"the socket directory {directory} belongs to uid {info.st_uid}, not to the OS user"
            f" asking for access (uid {owner_uid})",
            hint=hint,
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        raise InvalidRequest(
            f"the socket directory {directory} has mode {stat.S_IMODE(info.st_mode):04o}; it must"
            " be 0700 so that no other OS user can reach the socket",
            hint=f"chmod 700 {directory}",
        )
    path = os.path.join(directory, f".s.PGSQL.{port}")
    if len(os.fsencode(path)) >= _SUN_PATH_MAX:
        raise InvalidRequest(
            f"the socket path {path} is longer than a Unix socket's {_SUN_PATH_MAX - 1} bytes",
            hint="pick a shorter --socket directory",
        )
    return path


def _make_socket_dir(directory: str, owner_uid: int) -> os.stat_result:
    if os.geteuid() != owner_uid:
        raise InvalidRequest(
            f"the socket directory {directory} does not exist",
            hint=f"create it: mkdir -m 700 {directory}",
        )
    try:
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)  # whatever the umask
    except OSError as exc:
        raise InvalidRequest(
            f"cannot create the socket directory {directory}: {exc.strerror or exc}"
        ) from None
    return os.lstat(directory)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no passwd entry (a container's, say)
        return f"#{uid}"


def _bind_unix(path: str, owner_uid: int | None) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, owned by ``owner_uid``.

    A socket file left by a listener that died (nothing accepts on it) is
    replaced; anything else there is an error (EADDRINUSE), never removed.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode) or _is_served(path):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    try:
        # Connecting needs write permission on the file (unix(7)): 0600 lets in
        # its owner alone. The directory (0700, the owner's) already keeps
        # others out between bind and chmod.
        os.chmod(path, 0o600)
        if owner_uid is not None and os.geteuid() != owner_uid:
            os.chown(path, owner_uid, -1)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock


def _is_served(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True
    return True
