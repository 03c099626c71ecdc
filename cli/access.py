"""`pam db access`: hold a grant, show how to connect, end it on Ctrl+C.

The daemon does the relaying; this process holds the grant by calling in every
``HEARTBEAT_SECONDS`` (a ``kill -9`` of this process lets the daemon end the
grant within its heartbeat timeout) and shows the grant's state. Ctrl+C or
SIGTERM ends the session: live connections get a FATAL from the daemon.
"""

from __future__ import annotations

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

from cli.client import ApiClient, ApiError, SessionJson
from cli.mfa import with_second_factor
from cli.render import console, local_time, parse_time

if TYPE_CHECKING:
    from cli.forwarder import Forwarder

HEARTBEAT_SECONDS = 2.0
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
    resource: str,
    account: str,
    duration_seconds: int,
    port: int | None,
    ready: threading.Event | None = None,
    reason: str | None = None,
    socket_dir: str | None = None,
    tunnel: bool = False,
    otp: str | None = None,
) -> int:
    """Open a grant and hold it until Ctrl+C/SIGTERM or expiry; returns an exit code.

    With ``tunnel`` this process serves the local port itself and carries its
    connections to the gateway's tunnel (:mod:`cli.forwarder`). A second-factor
    code (*otp*, else asked for once if the gateway wants one) goes with the
    request (:func:`cli.mfa.with_second_factor`)."""

    def request(code: str | None) -> tuple[SessionJson, Forwarder | None]:
        if tunnel:
            from cli.forwarder import open_tunnel_access

            return open_tunnel_access(
                client,
                resource=resource,
                account=account,
                duration_seconds=duration_seconds,
                port=port,
                reason=reason,
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
            otp=code,
        )
        return session, None

    session, forwarder = with_second_factor(request, otp)
    try:
        return _hold(client, session, resource, account, ready)
    finally:
        if forwarder is not None:
            forwarder.stop()


def _hold(
    client: ApiClient,
    session: SessionJson,
    resource: str,
    account: str,
    ready: threading.Event | None,
) -> int:
    # The handlers are in place before the URL is shown: a Ctrl+C the moment it
    # appears still ends the session in order (exit 0), not with exit 130.
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        _print_grant(session, resource, account)
        if ready is not None:
            ready.set()
        ended_by_gateway = _heartbeat_until_ended(client, session["id"])
    except (KeyboardInterrupt, _Stop):
        ended_by_gateway = None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if ended_by_gateway is not None:
        return _report_end(client, ended_by_gateway)
    ended = client.end_access(session["id"])
    console.print(
        f"Session {ended['id'][:8]} ended"
        f" ({ended.get('end_reason') or 'client_ended'}) after"
        f" {_elapsed(ended)}."
    )
    return 0


def _print_grant(session: SessionJson, resource: str, account: str) -> None:
    info = connection_info(session)
    console.print(
        f"[bold green]Access granted[/]: session {session['id'][:8]} for"
        f" {resource}/{account}, expires {local_time(session['expires_at'])}"
    )
    console.print(f"  URL   {info.url}")
    console.print(f"  psql  {info.psql}")
    console.print(f"  JDBC  {info.jdbc}")
    if session["listen_host"].startswith("/"):
        console.print("  (JDBC over a Unix socket needs junixsocket on the classpath)")
    console.print(
        "No password is needed: the gateway signs in to the database for you."
        " Press Ctrl+C to end the session."
    )
    console.file.flush()  # the URL must reach a pipe or file at once, not at exit


def _heartbeat_until_ended(client: ApiClient, session_id: str) -> SessionJson:
    """Call in every HEARTBEAT_SECONDS until the gateway says the session ended
    (expiry, an administrator); Ctrl+C or SIGTERM interrupt it."""
    missed = 0
    while True:
        time.sleep(HEARTBEAT_SECONDS)
        try:
            state = client.heartbeat(session_id)
            missed = 0
        except ApiError as exc:
            if exc.status is not None:
                raise
            missed += 1
            if missed >= MAX_MISSED_HEARTBEATS:
                raise ApiError(
                    f"lost contact with the pam gateway: {exc.message}",
                    hint="the gateway ends the session when it stops hearing from this command",
                ) from None
            continue
        if state.get("ended_at"):
            return state


def _report_end(client: ApiClient, state: SessionJson) -> int:
    reason = state.get("end_reason")
    if reason == "expired":
        console.print(
            f"[bold yellow]Access expired[/] at {local_time(state['expires_at'])};"
            " live connections were closed."
        )
    else:
        detail = f": {state['end_detail']}" if state.get("end_detail") else ""
        console.print(f"[bold yellow]Session ended by the gateway[/] ({reason}{detail}).")
    # Release the listener that still answers late connections with a refusal.
    client.end_access(state["id"])
    return 0


def _elapsed(session: SessionJson) -> str:
    from cli.render import human_duration

    seconds = session.get("duration_seconds")
    if seconds is None:
        started = parse_time(session.get("started_at"))
        seconds = (datetime.now(UTC) - started).total_seconds() if started else None
    return human_duration(seconds)
