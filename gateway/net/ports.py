"""What a grant's door needs from the service that owns it, as ports.

:class:`ConnectionHost` is implemented by the grant service (gateway.access),
:class:`ConnectionMetrics` by the daemon's metrics (gateway.app.metrics),
:class:`ConnectionAuditTap` by the audit (gateway.audit.tap); :class:`GrantInfo`
is the part of an access session a door checks connections against. Declared
here, below the packages that implement them, so dependencies point one way.
"""

from __future__ import annotations

import ssl
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from gateway.net.relay import StatementAudit, Termination
from gateway.net.upstream import UpstreamTarget
from gateway.refusal import Refusal


class ConnectionAuditTap(StatementAudit, Protocol):
    """The audit of one connection: the relay's statement tap plus the
    connection's own start and end (implemented by ``gateway.audit.tap``)."""

    def connection_event(
        self,
        kind: Literal["connection_start", "connection_end"],
        detail: dict[str, str | int | float | None],
        *,
        now_ns: int,
    ) -> None: ...


class ConnectionMetrics(Protocol):
    """What a connection tells the gateway's metrics: a handful of calls per
    connection, none per message or per chunk (the relay's byte counts are read
    once, at the end)."""

    def upstream_connected(self, seconds: float, *, ok: bool) -> None:
        """An upstream sign-in took *seconds* (TCP, TLS and authentication)."""
        ...

    def error_sent(self, sqlstate: str) -> None:
        """The gateway itself sent the client an ErrorResponse with *sqlstate*
        (not one of the server's, which are relayed as they are)."""
        ...

    def connection_ended(self, reason: str, bytes_from_client: int, bytes_from_server: int) -> None:
        """A connection's record ended with *reason*, having relayed these bytes."""
        ...


class ConnectionHost(Protocol):
    """What a grant's listener needs from the service that owns it."""

    @property
    def startup_timeout(self) -> float: ...

    @property
    def connect_timeout(self) -> float: ...

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        """Server-side TLS for local clients that ask for it; None answers ``N``."""
        ...

    async def upstream_target(
        self, resource: str, account: str, *, session_id: str | None = None
    ) -> UpstreamTarget:
        """Where and as whom to sign in for a connection of grant *session_id*
        (a grant of an ephemeral account signs in as a role of its own)."""
        ...

    async def retry_target(self, failed: UpstreamTarget) -> UpstreamTarget | None:
        """Another password to try once after *failed* got 28P01 (rotated meanwhile,
        or a rotation in flight), or None."""
        ...

    def connection_audit(
        self, session_id: str, connection_id: str, secrets: tuple[str, ...]
    ) -> ConnectionAuditTap | None:
        """The statement audit tap for a new connection (None: audit is off)."""
        ...

    def refusal(self) -> Termination | None:
        """Why the gateway as a whole refuses new connections right now, if it does."""
        ...

    def refused(self, refusal: Refusal) -> None:
        """Put a turned-away connection on record (never blocks; it also logs)."""
        ...

    @property
    def metrics(self) -> ConnectionMetrics | None:
        """Where the connection's counts go (None: nowhere)."""
        ...

    def scram_cache(self, target: UpstreamTarget) -> MutableMapping[tuple[bytes, int], bytes]:
        """Salted passwords of this target's credentials, by (salt, iterations)."""
        ...

    async def record_connection_start(
        self,
        session_id: str,
        client_addr: str,
        application_name: str | None,
        *,
        backend_pid: int | None,
        started_at: datetime,
    ) -> str: ...

    async def record_connection_end(
        self,
        connection_id: str,
        *,
        reason: str,
        bytes_from_client: int,
        bytes_from_server: int,
        error: tuple[str, str] | None,
    ) -> None: ...


@dataclass
class GrantInfo:
    """The parts of an access session a listener checks connections against."""

    session_id: str
    resource: str
    account: str
    username: str
    database: str
    expires_at: datetime
    #: cut a connection idle (no traffic either way, no query running) this long
    idle_timeout_seconds: float | None = None
    #: the policy that set the idle limit, named in the FATAL
    idle_policy: str | None = None
