"""Records returned by the state store: immutable pydantic models.

Role: the typed, validated view of a row that the rest of the gateway (service,
API, CLI, audit) works with. The store builds them; nobody mutates them.

Invariants:

* Every model is frozen. Unknown input fields are ignored rather than refused so
  that a record's own JSON (which includes the computed ``duration_seconds``)
  validates back into an equal record.
* Every timestamp is timezone-aware and normalised to UTC, whatever offset the
  caller used, so records compare and serialise the same on every backend.
* No model carries a password or any other secret: :class:`Account` describes an
  upstream login, and only :meth:`gateway.store.Store.reveal_password` returns the
  password itself.
* ``duration_seconds`` is derived from ``started_at``/``ended_at`` and cannot
  disagree with them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Final

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, computed_field

from gateway.audit.records import (
    AuditKind,
    AuditProtocol,
    AuditStatus,
    CopyDirection,
    DetailValue,
    ParameterFormat,
)
from gateway.net.upstream import SSL_MODES, SslMode
from gateway.reasons import (
    CONNECTION_END_REASONS,
    SESSION_END_REASONS,
    ConnectionEndReason,
    SessionEndReason,
)

__all__ = [
    "CONNECTION_END_REASONS",
    "NAME_PATTERN",
    "REQUEST_FIELDS",
    "SESSION_END_REASONS",
    "SSL_MODES",
    "AccessSession",
    "Account",
    "AuditParameter",
    "AuditRecord",
    "ConnectionEndReason",
    "ConnectionRecord",
    "Resource",
    "SessionCounts",
    "SessionEndReason",
    "SslMode",
    "UtcDatetime",
]

#: Resource and account names: short, lower case, safe in URLs, file names and
#: ``resource/account`` strings without quoting.
NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


#: An aware datetime, converted to UTC on the way in.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


def _duration(started_at: datetime, ended_at: datetime | None) -> float | None:
    if ended_at is None:
        return None
    return (ended_at - started_at).total_seconds()


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class SessionCounts(_Record):
    """What a session's row in a list shows of its trail."""

    connections: int
    statements: int
    #: statements whose status is ``error``
    errors: int


class Resource(_Record):
    """An upstream PostgreSQL database that sessions can be granted to."""

    id: str
    name: str
    host: str
    port: int
    database: str
    ssl_mode: SslMode = "verify-full"
    #: PEM text of the CA that signs the server certificate; ``None`` means the
    #: system trust store.
    ca_cert: str | None = None
    created_at: UtcDatetime
    #: the project its accounts and policies belong to
    project: str = "default"
    #: the role that changes its accounts' passwords upstream (its password is
    #: stored sealed and never in a record); None: each account rotates itself
    rotation_username: str | None = None
    #: who gets what a grant's own role owned (REASSIGN OWNED); None: the rotation role
    reassign_to: str | None = None


class Account(_Record):
    """An upstream login on a resource. Deliberately has no password field."""

    id: str
    resource_id: str
    resource_name: str
    name: str
    username: str
    created_at: UtcDatetime
    password_updated_at: UtcDatetime
    #: pam generates its password and nobody knows it (``--managed``)
    managed: bool = False
    #: a rotation's new password is stored and not yet promoted or dropped
    rotation_pending: bool = False
    #: when the last rotation (or stored password) ended, and how
    last_rotation_at: UtcDatetime | None = None
    last_rotation_outcome: str | None = None
    #: the rotation schedule (``pam account rotate --every``), None when off;
    #: when it is next due, and its attempts failed in a row
    rotation_interval_seconds: int | None = None
    next_rotation_at: UtcDatetime | None = None
    rotation_failures: int = 0
    #: an ephemeral account (no password): each grant signs in as a role of its
    #: own, made in this template role (``username`` names it too)
    template_role: str | None = None
    #: an ephemeral account's role is dropped this long after its grant (None: at its end)
    cleanup_after_seconds: int | None = None


#: What a session records of the request that opened it (revision 0005).
REQUEST_FIELDS: Final = (
    "principal_id",
    "token_id",
    "project",
    "policy_name",
    "reason",
    "api_client_addr",
    "reported_host",
    "request_id",
)


class AccessSession(_Record):
    """A time-limited grant of one account on one resource to one requester.

    ``database`` and ``username`` are copied from the resource and account when the
    session is created, so the audit trail stays true after either is changed or
    removed.
    """

    id: str
    requester: str
    resource_name: str
    account_name: str
    database: str
    username: str
    listen_host: str
    listen_port: int | None = None
    started_at: UtcDatetime
    expires_at: UtcDatetime
    ended_at: UtcDatetime | None = None
    end_reason: SessionEndReason | None = None
    #: who asked (all None for sessions from before users existed): the
    #: authenticated principal, the token it used, the project, the policy
    #: that allowed it, the reason given, the API client's address and the host
    #: name the CLI reported (reported, not verified)
    principal_id: str | None = None
    token_id: str | None = None
    project: str | None = None
    policy_name: str | None = None
    reason: str | None = None
    api_client_addr: str | None = None
    reported_host: str | None = None
    #: the access request it was opened from (approval, break-glass), if any
    request_id: str | None = None
    end_detail: str | None = None
    #: the gateway that opened it (None before 0017)
    gateway_id: str | None = None
    #: the gateway holding it now: its door, expiry and heartbeat watch (the
    #: opener's until another takes it over after the CLI failed over to it)
    holder_id: str | None = None
    #: a tunnel grant's client public key (PEM): the only key the fleet admits for it
    client_public_key: str | None = None
    #: the allowing policy's idle timeout, kept for a gateway that takes it over
    idle_timeout_seconds: int | None = None
    idle_policy: str | None = None

    # mypy does not understand a decorated property; pydantic documents this ignore.
    @computed_field  # type: ignore[prop-decorator]
    @property
    def duration_seconds(self) -> float | None:
        """Seconds from start to end, or ``None`` while the session is active."""
        return _duration(self.started_at, self.ended_at)

    @property
    def is_active(self) -> bool:
        """True until the session has been ended (expiry alone does not end it)."""
        return self.ended_at is None


class ConnectionRecord(_Record):
    """One client connection relayed within an access session."""

    id: str
    session_id: str
    client_addr: str
    application_name: str | None = None
    backend_pid: int | None = None
    started_at: UtcDatetime
    ended_at: UtcDatetime | None = None
    bytes_from_client: int = 0
    bytes_from_server: int = 0
    end_reason: ConnectionEndReason | None = None
    error_sqlstate: str | None = None
    error_message: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def duration_seconds(self) -> float | None:
        """Seconds from start to end, or ``None`` while the connection is open."""
        return _duration(self.started_at, self.ended_at)


class AuditParameter(_Record):
    """A bound parameter of an audited statement (see ``gateway.audit.records.Parameter``)."""

    index: int
    type_oid: int | None = None
    format: ParameterFormat
    value: str | None = None
    truncated: bool = False


class AuditRecord(_Record):
    """One stored audit event, with its place in the session's hash chain.

    The event fields are those of :class:`gateway.audit.records.AuditEvent`;
    ``resource_name``, ``account_name`` and ``requester`` are joined from the
    session so that a record stands on its own in a search or an export.
    """

    session_id: str
    #: Always set by the store; ``None`` only in a row written by something else.
    connection_id: str | None = None
    #: 1-based position in the session's trail.
    seq: int
    kind: AuditKind
    occurred_at: UtcDatetime
    #: When the store wrote the row (not covered by the hash chain).
    recorded_at: UtcDatetime
    protocol: AuditProtocol | None = None
    sql: str | None = None
    statement_name: str | None = None
    portal_name: str | None = None
    parameters: tuple[AuditParameter, ...] | None = None
    command_tag: str | None = None
    rows: int | None = None
    status: AuditStatus | None = None
    sqlstate: str | None = None
    error_message: str | None = None
    duration_ms: float | None = None
    copy_direction: CopyDirection | None = None
    copy_bytes: int | None = None
    detail: dict[str, DetailValue] | None = None
    prev_hash: str
    hash: str
    resource_name: str
    account_name: str
    requester: str
