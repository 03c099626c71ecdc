"""Relays in other processes: the port a grant's door hands connections to, and
the wire form of what crosses to a relay worker.

With ``--workers N`` the daemon keeps every grant's door (the accept loop, the
owner check) and hands each accepted connection's socket to a relay worker
process (``gateway.app.workers`` implements :class:`RelayPool`); the worker runs
the connection's life in a shadow door of the same grant. Declared here, below
the app that implements it, so dependencies point one way.

Invariants:
* A door hands a connection off only while its grant is live and the gateway
  admits new connections; anything else (a refusal) is answered by the door
  itself, in the daemon.
* What a door does to its live connections (end, cut, notify, wait, close) it
  also asks of the pool for the grant's connections in the workers.
"""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Any, Protocol

from gateway.net.connection import LiveConnection
from gateway.net.ports import GrantInfo
from gateway.net.relay import Termination
from gateway.protocol.startup import CancelRequest
from gateway.reasons import ConnectionEndReason

__all__ = [
    "RelayPool",
    "cancel_from_json",
    "cancel_to_json",
    "grant_from_json",
    "grant_to_json",
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
