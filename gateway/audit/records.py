"""Audit events as the relay produces them: plain, immutable, cheap to build.

Role: the hot-path value that the statement tracker emits and the store's
:meth:`~gateway.store.Store.append_audit` persists. Deliberately a slotted
dataclass, not pydantic: one is built per statement on the relay's path. The
read-back form (with ``seq`` and the hash chain) is the pydantic
:class:`gateway.store.models.AuditRecord`.

Invariants:

* ``occurred_at`` is timezone-aware (UTC); for a statement it is when the
  client's message was seen, so ``duration_ms`` runs from there to the server's
  completion.
* ``sql``, ``parameters`` and ``error_message`` are already redacted by the
  producer: nothing downstream masks secrets again.
* ``parameters`` is ``None`` when parameters are not logged at all; an empty
  tuple means the statement had none. Parameter values are never interpolated
  into ``sql``.
* Nothing here validates; the store validates at its boundary (and refuses a
  whole batch if one event is malformed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, get_args

__all__ = [
    "AUDIT_KINDS",
    "AUDIT_PROTOCOLS",
    "AUDIT_STATUSES",
    "COPY_DIRECTIONS",
    "PARAMETER_FORMATS",
    "AuditEvent",
    "AuditKind",
    "AuditProtocol",
    "AuditStatus",
    "CopyDirection",
    "DetailValue",
    "Parameter",
    "ParameterFormat",
]

#: What an audit event records.
AuditKind = Literal["connection_start", "connection_end", "statement"]
AUDIT_KINDS: Final[frozenset[str]] = frozenset(get_args(AuditKind))

#: The protocol path a statement took (PostgreSQL docs, 55.2 "Message Flow"):
#: simple Query, Parse/Bind/Execute, or the legacy FunctionCall. COPY is not a
#: path of its own; it shows up as ``copy_direction`` on the statement.
AuditProtocol = Literal["simple", "extended", "function_call"]
AUDIT_PROTOCOLS: Final[frozenset[str]] = frozenset(get_args(AuditProtocol))

#: How a statement ended. ``skipped``: the server skipped it after an earlier
#: error in the same extended-protocol batch (55.2.3); ``incomplete``: the
#: connection ended before an outcome arrived.
AuditStatus = Literal["ok", "error", "skipped", "cancelled", "incomplete"]
AUDIT_STATUSES: Final[frozenset[str]] = frozenset(get_args(AuditStatus))

CopyDirection = Literal["in", "out"]
COPY_DIRECTIONS: Final[frozenset[str]] = frozenset(get_args(CopyDirection))

#: A parameter's wire format (Bind's format codes, 55.7), or ``null`` for a NULL.
ParameterFormat = Literal["text", "binary", "null"]
PARAMETER_FORMATS: Final[frozenset[str]] = frozenset(get_args(ParameterFormat))

#: Values allowed in :attr:`AuditEvent.detail`: whatever JSON round-trips unchanged.
DetailValue = str | int | float | None


@dataclass(frozen=True, slots=True)
class Parameter:
    """One bound parameter of a statement, as logged."""

    #: 1-based, as in ``$1`` .. ``$N``.
    index: int
    type_oid: int | None
    format: ParameterFormat
    #: Text (possibly truncated), base64 for binary, ``None`` for NULL or when
    #: only types are logged.
    value: str | None
    truncated: bool = False


@dataclass(slots=True)
class AuditEvent:
    """One connection start or end, or one statement with its outcome.

    Treated as immutable (nothing assigns to one after it is built) but not
    frozen: a frozen dataclass's ``__init__`` goes through ``object.__setattr__``
    for each of these 18 fields, four times the cost, once per statement on the
    relay's path.
    """

    session_id: str
    connection_id: str
    kind: AuditKind
    occurred_at: datetime
    protocol: AuditProtocol | None = None
    #: Already redacted by the producer.
    sql: str | None = None
    statement_name: str | None = None
    portal_name: str | None = None
    #: ``None``: parameters are not logged.
    parameters: tuple[Parameter, ...] | None = None
    #: e.g. ``INSERT 0 5``, ``SELECT 3``, ``COPY 10``.
    command_tag: str | None = None
    #: Rows affected or returned, parsed from the command tag(s).
    rows: int | None = None
    status: AuditStatus | None = None
    sqlstate: str | None = None
    error_message: str | None = None
    duration_ms: float | None = None
    copy_direction: CopyDirection | None = None
    copy_bytes: int | None = None
    #: Free-form extras; connection events carry client_addr, application_name,
    #: backend_pid, end_reason and the bytes each way.
    detail: dict[str, DetailValue] | None = None
