"""`pam db access`: hold a grant, show how to connect, end it on Ctrl+C.

The daemon does the relaying; this process holds the grant by calling in every
``HEARTBEAT_SECONDS`` (a ``kill -9`` of this process lets the daemon end the
grant within its heartbeat timeout) and shows the grant's state through a
:class:`cli.live.View`: the time left, an extension (``e`` on a terminal, or
`pam grant extend` from anywhere, seen in the next heartbeat), the expiry
warnings, the end. Ctrl+C or SIGTERM ends the session: live connections get a
FATAL from the daemon.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import click

from cli.approval import wait_for_approval
from cli.client import AccessJson, ApiClient, ApiError, PendingApproval, SessionJson
from cli.live import ExpiryWatch, JsonEvents, KeyReader, TextView, View, expires_at
from cli.mfa import with_second_factor
from cli.render import parse_time

if TYPE_CHECKING:
    from cli.forwarder import Forwarder

if TYPE_CHECKING:
    from cli.forwarder import Forwarder

HEARTBEAT_SECONDS = 2.0
#: how often the status line (and the expiry events) are brought up to date
TICK_SECONDS = 1.0
#: what the ``e`` key (and ``--extend-by``) extends a grant by, by default
DEFAULT_EXTEND_SECONDS = 30 * 60
EXTEND_KEYS = frozenset({"e", "E"})
#: consecutive failed heartbeats before the CLI gives up on an unreachable daemon
MAX_MISSED_HEARTBEATS = 3
_DURATION = re.compile(
    r"^(?:(?P<w>\d+)w)?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$"
)
_UNIT_SECONDS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> int:
    """'1h', '30m', '1h30m', '90s', '7d', '2w' or plain seconds, to seconds.

    The one duration parser: ``pam sessions``/``pam audit`` use it for ``--since 7d``.
    """
    value = text.strip().lower()
    if value.isdigit():
        seconds = int(value)
    else:
        match = _DURATION.match(value)
        if not value or match is None:
            raise click.BadParameter(f"{text!r} is not a duration like 1h, 30m, 1h30m or 90s")
        seconds = sum(int(match[unit] or 0) * size for unit, size in _UNIT_SECONDS.items())
    if seconds <= 0:
        raise click.BadParameter("the duration must be positive")
    return seconds


@dataclass(frozen=True)
class ConnectionInfo:
    url: str
    psql: str
    jdbc: str


#: pgjdbc reaches a Unix socket through junixsocket's socket factory.
JUNIXSOCKET_FACTORY = "org.newsclub.net.unix.AFUNIXSocketFactory$FactoryArg"


def connection_info(session: SessionJson) -> ConnectionInfo:
    host = session["listen_host"]
    port = session["listen_port"]
    user = quote(session["username"], safe="")
    database = quote(session["database"], safe="")
    if host.startswith("/"):
        # A Unix socket directory, as libpq's host= takes it (--socket).
        return _socket_connection_info(host, port, user, database)
    url = f"postgresql://{user}@{host}:{port}/{database}?sslmode=disable"
    return ConnectionInfo(
        url=url,
        psql=f'psql "{url}"',
        jdbc=f"jdbc:postgresql://{host}:{port}/{database}?user={user}&sslmode=disable",
    )


def _socket_connection_info(
    directory: str, port: int | None, user: str, database: str
) -> ConnectionInfo:
    url = f"postgresql://{user}@/{database}?host={quote(directory, safe='')}&port={port}"
    socket_path = quote(f"{directory}/.s.PGSQL.{port}", safe="")
    return ConnectionInfo(
        url=url,
        psql=f'psql "{url}"',
        jdbc=f"jdbc:postgresql://localhost/{database}?user={user}&sslmode=disable"
        f"&socketFactory={JUNIXSOCKET_FACTORY}&socketFactoryArg={socket_path}",
    )


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def is_remote(client: ApiClient) -> bool:
    """Whether the gateway is on another host (its API is not on loopback)."""
    host = urlsplit(client.config.api_url).hostname or ""
    return host not in ("localhost", "127.0.0.1", "::1")


def hold_access(
    client: ApiClient,
    *,
    resource: str | None,
    account: str | None,
    duration_seconds: int | None,
    port: int | None,
    ready: threading.Event | None = None,
    reason: str | None = None,
    socket_dir: str | None = None,
    tunnel: bool = False,
    request_id: str | None = None,
    break_glass: bool = False,
    json_events: bool = False,
    extend_by: int = DEFAULT_EXTEND_SECONDS,
    otp: str | None = None,
) -> int:
    """Open a grant and hold it until Ctrl+C/SIGTERM or its end; returns an exit code.

    With ``tunnel`` this process serves the local port itself and carries its
    connections to the gateway's tunnel (:mod:`cli.forwarder`). When a policy
    wants the access approved, this waits for the approval first
    (:func:`cli.approval.wait_for_approval`); *request_id* opens an approved
    request instead of asking anew. With ``json_events`` stdout is JSON lines
    (:class:`cli.live.JsonEvents`). Otherwise, on a terminal, the ``e`` key
    extends the grant by ``extend_by`` seconds. A second-factor code (*otp*,
    else asked for once if the gateway wants one) goes with the request
    (:func:`cli.mfa.with_second_factor`)."""

    def open_grant(request: str | None, code: str | None) -> tuple[AccessJson, Forwarder | None]:
        if tunnel:
            from cli.forwarder import open_tunnel_access

            return open_tunnel_access(
                client,
                resource=resource,
                account=account,
                duration_seconds=duration_seconds,
                port=port,
                reason=reason,
                request_id=request,
                break_glass=break_glass,
                otp=code,
            )
        session = client.open_access(
            resource=resource,
            account=account,
            duration_seconds=duration_seconds,
            port=port,
            reason=reason,
            client_host=socket.gethostname(),
            socket_dir=socket_dir,
            request_id=request,
            break_glass=break_glass,
            otp=code,
        )
        return session, None

    try:
        session, forwarder = with_second_factor(lambda code: open_grant(request_id, code), otp)
    except PendingApproval as pending:
        # The second factor, if asked, was proven with the request.
        approved = wait_for_approval(client, pending.request, json_lines=json_events)
        session, forwarder = open_grant(approved, None)
    # Scripts get JSON lines and no keys: the terminal is left as it is.
    keys = None if json_events else KeyReader.for_stdin()
    view: View = JsonEvents() if json_events else TextView(extend_by=extend_by if keys else None)
    try:
        return _hold(client, session, view, keys, ready, extend_by, forwarder)
    finally:
        if forwarder is not None:
            forwarder.stop()


def _hold(
    client: ApiClient,
    session: AccessJson,
    view: View,
    keys: KeyReader | None,
    ready: threading.Event | None,
    extend_by: int,
    forwarder: Forwarder | None,
) -> int:
    # The handlers are in place before the URL is shown: a Ctrl+C the moment it
    # appears still ends the session in order (exit 0), not with exit 130.
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    holding = _Holding(client, session, view, keys, extend_by, forwarder)
    try:
        view.granted(session, connection_info(session))
        if ready is not None:
            ready.set()
        with keys or contextlib.nullcontext():
            ended_by_gateway = holding.until_ended()
    except (KeyboardInterrupt, _Stop):
        ended_by_gateway = None
    finally:
        view.stop()
        signal.signal(signal.SIGTERM, previous)
    if ended_by_gateway is not None:
        view.ended_by_gateway(ended_by_gateway)
        # Release the listener that still answers late connections with a refusal.
        client.end_access(ended_by_gateway["id"])
        return 0
    ended = client.end_access(session["id"])
    view.ended_by_client(ended, _elapsed(ended))
    return 0


class _Holding:
    """The watch over a held grant: heartbeats, keys, expiry events."""

    def __init__(
        self,
        client: ApiClient,
        session: AccessJson,
        view: View,
        keys: KeyReader | None,
        extend_by: int,
        forwarder: Forwarder | None,
    ) -> None:
        self.client = client
        self.state: SessionJson = session
        self.view = view
        self.keys = keys
        self.extend_by = extend_by
        self.forwarder = forwarder
        self.expiry = ExpiryWatch(
            session.get("expiry_notice_seconds") or (), expires_at(session), datetime.now(UTC)
        )

    def until_ended(self) -> SessionJson:
        """Call in every HEARTBEAT_SECONDS until the gateway says the session
        ended (expiry, an administrator); Ctrl+C or SIGTERM interrupt it."""
        missed = 0
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        while True:
            wait = min(next_beat - time.monotonic(), TICK_SECONDS)
            if self.keys is not None:
                if self.keys.next_key(wait) in EXTEND_KEYS:
                    self._extend()
            elif wait > 0:
                time.sleep(wait)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + HEARTBEAT_SECONDS
                try:
                    state = self.client.heartbeat(self.state["id"])
                    missed = 0
                except ApiError as exc:
                    if exc.status is not None:
                        raise
                    missed += 1
                    if missed >= MAX_MISSED_HEARTBEATS:
                        raise ApiError(
                            f"lost contact with the pam gateway: {exc.message}",
                            hint="the gateway ends the session when it stops hearing from"
                            " this command",
                        ) from None
                    continue
                if state.get("ended_at"):
                    return state
                if self.forwarder is not None:  # the tunnel goes where the heartbeats go
                    self.forwarder.follow(self.client.endpoints.current)
                self._update(state)
            for lead in self.expiry.due(datetime.now(UTC)):
                self.view.expiring(self.state, lead)
            self.view.tick(self.state)

    def _extend(self) -> None:
        try:
            state = self.client.extend_access(self.state["id"], self.extend_by)
        except PendingApproval as pending:
            # Applied by the gateway once approved: the heartbeat shows it then.
            request = pending.request
            self.view.warn(
                f"the extension needs approval: request {request['id'][:8]}",
                f"an approver runs `pam requests approve {request['id'][:8]}`",
            )
            return
        except ApiError as exc:
            self.view.warn(f"not extended: {exc.message}", exc.hint)
            return
        self._update(state)

    def _update(self, state: SessionJson) -> None:
        """A newer state of the session: an extension shows, and a tunnel's
        forwarder takes the certificate re-issued for the new expiry."""
        previous = self.state["expires_at"]
        self.state = state
        if expires_at(state) == parse_time(previous):
            return
        self.expiry.reset(expires_at(state), datetime.now(UTC))
        if self.forwarder is not None:
            try:
                self.forwarder.renew(self.client.access_certificate(state["id"])["certificate"])
            except ApiError as exc:
                self.view.warn(
                    f"the tunnel's certificate was not renewed: {exc.message}",
                    "connections opened after the old expiry may be refused",
                )
        self.view.extended(state, previous)


def _elapsed(session: SessionJson) -> str:
    from cli.render import human_duration

    seconds = session.get("duration_seconds")
    if seconds is None:
        started = parse_time(session.get("started_at"))
        seconds = (datetime.now(UTC) - started).total_seconds() if started else None
    return human_duration(seconds)
