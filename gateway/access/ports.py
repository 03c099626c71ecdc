"""What the access package needs from the outside, as ports.

:class:`SessionStore` is the store operations the grant service and the
connection records use; ``gateway.store.Store`` implements it structurally
(nothing here imports the store: only the composition root in ``gateway.app``
does). :class:`ConnectionStart` and :class:`ConnectionEnd` are the changes the
connection records hand the store; they are declared here, with the port, and
the store imports them. :class:`StoreThread` runs a blocking store call off the
event loop (one thread, so SQLite writes are serialised).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from gateway.errors import GatewayError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConnectionStart:
    """A client connection to record as started (``record_connections``)."""

    session_id: str
    client_addr: str
    application_name: str | None = None
    #: the upstream server's process id, once the upstream session is up
    backend_pid: int | None = None
    #: defaults to now
    started_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ConnectionEnd:
    """A client connection to record as ended, with its byte counts."""

    connection_id: str
    reason: str
    bytes_from_client: int
    bytes_from_server: int
    error_sqlstate: str | None = None
    error_message: str | None = None
    #: defaults to now
    ended_at: datetime | None = None


class SessionRecord(Protocol):
    """An access session as the store keeps it (read-only here)."""

    @property
    def id(self) -> str: ...
    @property
    def requester(self) -> str: ...
    @property
    def project(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def resource_name(self) -> str: ...
    @property
    def account_name(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def ended_at(self) -> datetime | None: ...
    @property
    def principal_id(self) -> str | None: ...
    @property
    def end_reason(self) -> str | None: ...
    @property
    def end_detail(self) -> str | None: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def holder_id(self) -> str | None: ...
    @property
    def client_public_key(self) -> str | None: ...
    @property
    def idle_timeout_seconds(self) -> int | None: ...
    @property
    def idle_policy(self) -> str | None: ...


class StoredGrantState(Protocol):
    """What the store says of a grant a gateway holds (``grant_states``): another
    gateway may have ended it, moved its expiry or disabled its principal."""

    @property
    def expires_at(self) -> datetime: ...
    @property
    def ended_at(self) -> datetime | None: ...
    @property
    def disabled_principal(self) -> str | None: ...
    @property
    def holder_id(self) -> str | None: ...


class StartedConnection(Protocol):
    """The record of a connection just started: only its id is needed."""

    @property
    def id(self) -> str: ...


class SessionStore(Protocol):
    """Sessions and connection records (``gateway.store.Store`` implements it)."""

    def create_session(
        self,
        *,
        requester: str,
        resource: str,
        account: str,
        listen_host: str,
        expires_at: datetime,
        started_at: datetime | None = None,
        request: dict[str, str | None] | None = None,
        gateway_id: str | None = None,
        client_public_key: str | None = None,
        idle_timeout_seconds: int | None = None,
        idle_policy: str | None = None,
    ) -> SessionRecord: ...

    def set_session_port(self, session_id: str, port: int) -> None: ...

    def end_session(
        self,
        session_id: str,
        *,
        reason: str,
        detail: str | None = None,
        ended_at: datetime | None = None,
    ) -> SessionRecord: ...

    def extend_session(
        self, session_id: str, *, expires_at: datetime, previous: datetime | None = None
    ) -> SessionRecord: ...

    def get_session(self, session_id: str) -> SessionRecord: ...

    def close_orphans(
        self, gateway_id: str, *, starting: bool = ..., ended: list[str] | None = ...
    ) -> int: ...

    def take_over_session(
        self, session_id: str, gateway_id: str
    ) -> tuple[SessionRecord, str | None]: ...

    def hand_over_session(self, session_id: str, gateway_id: str) -> str | None: ...

    def grant_states(self, session_ids: Sequence[str]) -> Mapping[str, StoredGrantState]: ...

    def record_connections(
        self, changes: Sequence[ConnectionStart | ConnectionEnd]
    ) -> Sequence[StartedConnection | GatewayError | None]: ...


class StoreThread(Protocol):
    """Runs a blocking store call on the store's own thread."""

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...
