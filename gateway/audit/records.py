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

:data:`EventRow` is the same event as a plain tuple: what the journal's reader
(:mod:`gateway.audit.replay`) builds and
:meth:`~gateway.store.Store.append_audit_rows` appends, without a datetime or an
object per event.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args

from gateway.errors import InvalidRequest

__all__ = [
    "AUDIT_KINDS",
    "AUDIT_PROTOCOLS",
    "AUDIT_STATUSES",
    "COPY_DIRECTIONS",
    "MAX_BIGINT",
    "PARAMETER_FORMATS",
    "SQLSTATE_PATTERN",
    "AuditEvent",
    "AuditKind",
    "AuditProtocol",
    "AuditStatus",
    "CopyDirection",
    "DetailValue",
    "EventRow",
    "Parameter",
    "ParameterFormat",
    "datetime_micros",
    "event_rows",
    "micros_datetime",
    "row_event",
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

#: What the store accepts as a SQLSTATE, and as a row or byte count (BIGINT).
SQLSTATE_PATTERN: Final = re.compile(r"[0-9A-Z]{5}")
MAX_BIGINT: Final = 2**63 - 1

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


#: An :class:`AuditEvent` as a plain tuple: its fields in order, except that
#: ``occurred_at`` is an int of microseconds since the epoch (UTC: all the store
#: keeps of a time) and each parameter is an ``(index, type_oid, format, value,
#: truncated)`` tuple.
EventRow = tuple[Any, ...]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def datetime_micros(value: datetime) -> int:
    """An aware datetime as microseconds since the epoch: how an EventRow and a
    sealed batch keep time. Raises ``TypeError`` for a naive one."""
    return (value - _EPOCH) // _MICROSECOND


def micros_datetime(micros: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime (the inverse).
    Raises ``OverflowError`` beyond what a datetime holds."""
    return _EPOCH + timedelta(microseconds=micros)


#: An event's fields in their dataclass order: the order of EventRow too.
_FIELDS: Final = tuple(AuditEvent.__dataclass_fields__)
_FIELD_VALUES: Final = operator.attrgetter(*_FIELDS)
_OCCURRED_AT: Final = _FIELDS.index("occurred_at")
_PARAMETERS: Final = _FIELDS.index("parameters")


def event_rows(events: Sequence[AuditEvent]) -> list[EventRow]:
    """*events* as :data:`EventRow` tuples.

    Raises :class:`InvalidRequest`, naming the event's position, for one that is
    not an AuditEvent or whose time has no zone (the store would refuse it anyway).
    """
    rows = []
    for position, e in enumerate(events):
        if not isinstance(e, AuditEvent):
            raise InvalidRequest(f"audit event {position} is not an AuditEvent")
        try:
            micros = datetime_micros(e.occurred_at)
        except TypeError:
            raise InvalidRequest(
                f"audit event {position} occurred_at must be a timezone-aware datetime"
            ) from None
        row = list(_FIELD_VALUES(e))
        row[_OCCURRED_AT] = micros
        if e.parameters is not None:
            row[_PARAMETERS] = tuple(
                (p.index, p.type_oid, p.format, p.value, p.truncated) for p in e.parameters
            )
        rows.append(tuple(row))
    return rows


def row_event(row: EventRow) -> AuditEvent:
    """The inverse of :func:`event_rows` for one row (``occurred_at`` in UTC).

    Raises ``TypeError``, ``ValueError`` or ``OverflowError`` for a row of the
    wrong shape.
    """
    fields = list(row)
    if len(fields) != len(_FIELDS):
        raise ValueError(f"an event row has {len(_FIELDS)} fields")
    fields[_OCCURRED_AT] = micros_datetime(fields[_OCCURRED_AT])
    parameters = fields[_PARAMETERS]
    if parameters is not None:
        fields[_PARAMETERS] = tuple(Parameter(*p) for p in parameters)
    return AuditEvent(*fields)
