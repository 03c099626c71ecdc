"""Relays in other processes: the ports a grant's door and the tunnel hand
connections to, and the wire form of what crosses to a relay worker.

With ``--workers N`` the daemon keeps every grant's door (the accept loop, the
owner check) and hands each accepted connection's socket to a relay worker
process (``gateway.app.workers`` implements :class:`RelayPool`); the worker runs
the connection's life in a shadow door of the same grant. The tunnel's listener
hands each accepted TCP socket over before its TLS handshake
(:class:`TunnelRelays`): the worker does the handshake and the relay, and asks
the daemon which grant the peer's certificate names. Declared here, below the
app that implements it, so dependencies point one way.

Invariants:
* A door hands a connection off only while its grant is live and the gateway
  admits new connections; anything else (a refusal) is answered by the door
  itself, in the daemon. A tunnel connection is admitted by the daemon under
  the same rule, and refused by the worker with the daemon's answer.
* What a door does to its live connections (end, cut, notify, wait, close) it
  also asks of the pool for the grant's connections in the workers.
* A grant with an upstream target of its own (an ephemeral account's role) has
  it sent with each connection (:func:`target_to_json`): the password crosses
  only the daemon's socketpair with its own worker, never a log or a file.
"""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Any, Protocol, cast

from gateway.net.connection import LiveConnection
from gateway.net.ports import GrantInfo
from gateway.net.relay import Termination
from gateway.net.upstream import SSL_MODES, SslMode, UpstreamTarget
from gateway.protocol.startup import CancelRequest
from gateway.reasons import ConnectionEndReason

__all__ = [
    "RelayPool",
    "TunnelRelays",
    "cancel_from_json",
    "cancel_to_json",
    "grant_from_json",
    "grant_to_json",
    "target_from_json",
    "target_to_json",
    "termination_from_json",
    "termination_to_json",
]


class RelayPool(Protocol):
    """Relay worker processes, as a grant's door in the daemon sees them."""

    def hand_off(
        self,
        grant: GrantInfo,
        sock: socket.socket,
        conn: LiveConnection,
        live: set[LiveConnection],
    ) -> bool:
        """Give an accepted connection's socket to a worker; False when none can
        take it (the door serves it itself). The caller closes its copy and adds
        *conn* to *live*, the door's set; the pool takes it out once it is over."""
        ...

    def cut(self, session_id: str, termination: Termination, *, ended: bool) -> None:
        """End the grant's connections in the workers (``ended``: refuse new ones too)."""
        ...

    def notify(self, session_id: str, notice: bytes) -> None:
        """Send the grant's relaying connections in the workers *notice*."""
        ...

    async def drain(self, session_id: str, timeout: float) -> None:
        """Wait (bounded) until the grant's connections in the workers are over,
        their ends recorded and their audit in the store."""
        ...

    def release(self, session_id: str) -> None:
        """The grant's door is closed: the workers let go of its shadow."""
        ...

    async def cancel(self, session_id: str, request: CancelRequest, *, source: str) -> bool:
        """Forward *request* to the backend of whichever worker's connection of
        the grant handed out its key; True if one did."""
        ...


class TunnelRelays(Protocol):
    """Relay worker processes, as the tunnel's listener in the daemon sees them."""

    def hand_off_tunnel(self, sock: socket.socket, client_addr: str, number: int) -> bool:
        """Give an accepted tunnel socket (before its TLS handshake) to a worker;
        False when none can take it (the daemon serves it itself). The caller
        closes its copy."""
        ...


def cancel_to_json(session_id: str, request: CancelRequest, source: str) -> dict[str, Any]:
    """A CancelRequest to place in grant *session_id*'s connections elsewhere
    (either way: the daemon asks the workers, a worker asks the daemon)."""
    return {
        "op": "cancel",
        "session": session_id,
        "pid": request.pid,
        "secret": request.secret.hex(),
        "source": source,
    }


def cancel_from_json(data: dict[str, Any]) -> CancelRequest:
    return CancelRequest(int(data["pid"]), bytes.fromhex(data["secret"]))


def termination_to_json(termination: Termination) -> dict[str, Any]:
    return {
        "reason": str(termination.reason),
        "sqlstate": termination.sqlstate,
        "message": termination.message,
        "hint": termination.hint,
    }


def termination_from_json(data: dict[str, Any]) -> Termination:
    return Termination(
        ConnectionEndReason(data["reason"]),
        str(data["sqlstate"]),
        str(data["message"]),
        None if data.get("hint") is None else str(data["hint"]),
    )


def grant_to_json(grant: GrantInfo) -> dict[str, Any]:
    return {
        "session_id": grant.session_id,
        "resource": grant.resource,
        "account": grant.account,
        "username": grant.username,
        "database": grant.database,
        "expires_at": grant.expires_at.isoformat(),
        "idle_timeout_seconds": grant.idle_timeout_seconds,
        "idle_policy": grant.idle_policy,
    }


def grant_from_json(data: dict[str, Any]) -> GrantInfo:
    idle = data.get("idle_timeout_seconds")
    return GrantInfo(
        session_id=str(data["session_id"]),
        resource=str(data["resource"]),
        account=str(data["account"]),
        username=str(data["username"]),
        database=str(data["database"]),
        expires_at=datetime.fromisoformat(data["expires_at"]),
        idle_timeout_seconds=None if idle is None else float(idle),
        idle_policy=data.get("idle_policy"),
    )


def target_to_json(target: UpstreamTarget) -> dict[str, Any]:
    """A grant's own upstream target, password included: for a worker's channel only."""
    return {
        "resource": target.resource,
        "account": target.account,
        "host": target.host,
        "port": target.port,
        "database": target.database,
        "username": target.username,
        "password": target.password,
        "ssl_mode": target.ssl_mode,
        "ca_cert": target.ca_cert,
    }


def target_from_json(data: dict[str, Any]) -> UpstreamTarget:
    ca_cert, ssl_mode = data.get("ca_cert"), data["ssl_mode"]
    if ssl_mode not in SSL_MODES:
        raise ValueError(f"unknown ssl_mode {ssl_mode!r}")
    return UpstreamTarget(
        resource=str(data["resource"]),
        account=str(data["account"]),
        host=str(data["host"]),
        port=int(data["port"]),
        database=str(data["database"]),
        username=str(data["username"]),
        password=str(data["password"]),
        ssl_mode=cast(SslMode, ssl_mode),
        ca_cert=None if ca_cert is None else str(ca_cert),
    )
