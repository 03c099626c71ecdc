"""The state store: resources, accounts, access sessions and connection records.

Role: the gateway's only persistent state, behind a small synchronous API that the
service layer calls from one worker thread or via ``asyncio.to_thread``. The same
code runs on SQLite (the default, a single file) and on PostgreSQL.

Invariants:

* A new SQLite store file is created with mode 0600 (its -wal and -shm files
  take the same mode): it holds sealed passwords and the audit trail.
* :meth:`Store.open` brings the schema to the newest alembic revision before
  anything else touches it; opening an up-to-date database changes nothing.
* Every public method is one database transaction: a multi-row change is either
  wholly visible or not at all. Names are resolved inside the same transaction
  that uses them, with row locks on PostgreSQL, so "remove a resource" and
  "start a session on it" cannot interleave into a session without a resource.
* Passwords are sealed by :class:`~gateway.credentials.secretbox.SecretBox` with associated data
  ``b"pam/account/" + account_id`` before they reach SQL, so the database (and its
  WAL, backups and logs) only ever holds ciphertext bound to its own row. SQL
  parameters are hidden from SQLAlchemy's error messages, and no error raised
  here contains a password.
* Ending a session or a connection is idempotent: the first end wins and later
  calls return the record unchanged.
* Input is validated here, at the boundary, and refused with
  :class:`~gateway.errors.InvalidRequest` naming the field; the database is never
  the first line of validation.
* The audit trail is append-only: nothing here updates or deletes an
  ``audit_events`` row. Each session's records are numbered ``seq`` 1, 2, 3, ...
  and hash-chained under a key derived from the master key
  (:mod:`gateway.audit.chain`); appends to one session are serialised by a lock
  on its session row (PostgreSQL) or by ``BEGIN IMMEDIATE`` (SQLite), so two
  processes appending to one session still produce one unbroken chain. Ending a
  session seals its trail (count, head hash, HMAC) so that truncation shows.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
import sqlite3
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Self, get_args

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from cryptography import x509
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, bindparam, create_engine, event, func, select, text
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from gateway.audit.chain import (
    AUDIT_KEY_INFO,
    CHAIN_VERSION,
    EVENT_FIELDS,
    GENESIS_HASH,
    AuditChain,
    ChainProblem,
    SessionVerifier,
    canonical_json,
)
from gateway.audit.records import (
    AUDIT_KINDS,
    AUDIT_PROTOCOLS,
    AUDIT_STATUSES,
    COPY_DIRECTIONS,
    MAX_BIGINT,
    PARAMETER_FORMATS,
    SQLSTATE_PATTERN,
    AuditEvent,
    EventRow,
    Parameter,
    event_rows,
    iso_from_micros,
    row_event,
)
from gateway.credentials.secretbox import SecretBox, SecretDecryptError
from gateway.errors import (
    AlreadyExists,
    ConfigError,
    GatewayError,
    InvalidRequest,
    NotFound,
    StoreError,
)
from gateway.reasons import CONNECTION_REASON_AT_SESSION_END, SessionEndReason
from gateway.store.models import (
    CONNECTION_END_REASONS,
    NAME_PATTERN,
    SESSION_END_REASONS,
    SSL_MODES,
    AccessSession,
    Account,
    AuditRecord,
    ConnectionRecord,
    Resource,
)
from gateway.store.schema import (
    ID_LENGTH,
    UtcTimestamp,
    accounts,
    audit_events,
    connections,
    resources,
    sessions,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    #: A result row of any shape (SQLAlchemy 2.1 types rows by their column tuple).
    _AnyRow: TypeAlias = Row[*tuple[Any, ...]]

__all__ = ["SqliteSynchronous", "Store", "StoreError"]

#: SQLite's ``synchronous`` setting for the store file (see :meth:`Store.open`).
SqliteSynchronous = Literal["normal", "full"]

_MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

#: How long SQLite waits for another process's write lock before giving up.
_SQLITE_BUSY_TIMEOUT_MS: Final = 5_000
#: Mode of a new SQLite store file (and so of its -wal and -shm files).
_STORE_FILE_MODE: Final = 0o600
#: Execution option telling the SQLite ``begin`` hook how to start a transaction.
_SQLITE_BEGIN_OPTION: Final = "pam_sqlite_begin"
#: Key of the PostgreSQL advisory lock that serialises concurrent migrations
#: (two gateways starting against one empty database). Arbitrary but fixed.
_PG_MIGRATION_LOCK_KEY: Final = 0x70616D_73746F7265  # "pam" "store"

_SESSION_ID_MIN_PREFIX: Final = 6
_ID_CHARS: Final = re.compile(r"[0-9a-f]{1,32}")

#: Sessions whose last (seq, hash) the store remembers. The memory is a
#: tripwire, not the source of truth (see Store._chain_head), so forgetting the
#: least recently used is always safe.
_AUDIT_HEAD_CACHE_SIZE: Final = 4096
#: Rows fetched per round trip when verify streams a trail.
_AUDIT_STREAM_ROWS: Final = 2000
#: PostgreSQL OIDs are unsigned 32-bit.
_MAX_OID: Final = 0xFFFF_FFFF
#: Escape character for LIKE patterns built from user text.
_LIKE_ESCAPE: Final = "/"

_NAME_RULE: Final = (
    "use 1-63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit"
)


@dataclass(frozen=True, slots=True)
class ConnectionStart:
    """A client connection to record as started (:meth:`Store.record_connections`)."""

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


def _start_row(start: ConnectionStart, now: datetime) -> dict[str, Any]:
    _required_text("client_addr", start.client_addr)
    _check_text("application_name", start.application_name, required=False)
    pid = start.backend_pid
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        raise InvalidRequest(f"backend_pid must be a non-negative integer, not {pid!r}")
    return {
        "id": _new_id(),
        "session_id": start.session_id,
        "client_addr": start.client_addr,
        "application_name": start.application_name,
        "backend_pid": pid,
        "started_at": now
        if start.started_at is None
        else _check_time("started_at", start.started_at),
        "bytes_from_client": 0,
        "bytes_from_server": 0,
    }


def _end_values(end: ConnectionEnd, now: datetime) -> dict[str, Any]:
    _check_reason("connection", end.reason, CONNECTION_END_REASONS)
    _check_count("bytes_from_client", end.bytes_from_client)
    _check_count("bytes_from_server", end.bytes_from_server)
    if end.error_sqlstate is not None and not SQLSTATE_PATTERN.fullmatch(end.error_sqlstate):
        raise InvalidRequest("error_sqlstate must be a 5-character SQLSTATE code")
    _check_text("error_message", end.error_message, required=False)
    return {
        "end_id": end.connection_id,
        "end_ended_at": now if end.ended_at is None else _check_time("ended_at", end.ended_at),
        "end_reason": end.reason,
        "end_bytes_from_client": end.bytes_from_client,
        "end_bytes_from_server": end.bytes_from_server,
        "end_error_sqlstate": end.error_sqlstate,
        "end_error_message": end.error_message,
    }


# Built once: a statement built per call costs SQLAlchemy its construction and
# cache-key work each time (about a third of a connection record's CPU).
_INSERT_CONNECTION: Final = connections.insert()
#: Whether a session has ended, with the row lock (PostgreSQL) that keeps it from
#: ending until the new connection's row is in.
_SESSION_ENDED_AT: Final = (
    select(sessions.c.ended_at).where(sessions.c.id == bindparam("sid")).with_for_update(read=True)
)
# Bind names differ from the column names, as SQLAlchemy requires in a SET clause.
_END_CONNECTION: Final = (
    connections.update()
    .where(connections.c.id == bindparam("end_id"), connections.c.ended_at.is_(None))
    .values(
        ended_at=bindparam("end_ended_at"),
        end_reason=bindparam("end_reason"),
        bytes_from_client=bindparam("end_bytes_from_client"),
        bytes_from_server=bindparam("end_bytes_from_server"),
        error_sqlstate=bindparam("end_error_sqlstate"),
        error_message=bindparam("end_error_message"),
    )
)


def _new_id() -> str:
    return uuid.uuid4().hex


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _account_aad(account_id: str) -> bytes:
    # Binding the ciphertext to its row means a blob copied onto another account
    # (by a bug, or by someone with write access to the database) fails to open
    # instead of silently handing out the wrong password.
    return b"pam/account/" + account_id.encode()


# -- validation -----------------------------------------------------------------


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidRequest(f"invalid {kind} name {value!r}: {_NAME_RULE}")
    return value


def _check_text(field: str, value: str | None, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise InvalidRequest(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string")
    if required and not value.strip():
        raise InvalidRequest(f"{field} must not be empty")
    # PostgreSQL text cannot hold NUL; refusing it here keeps both backends alike.
    if "\x00" in value:
        raise InvalidRequest(f"{field} must not contain a NUL character")
    return value


def _required_text(field: str, value: str) -> str:
    checked = _check_text(field, value)
    assert checked is not None
    return checked


def _check_port(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidRequest(f"{field} must be an integer from 1 to 65535, not {value!r}")
    return value


def _check_count(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{field} must be a non-negative integer, not {value!r}")
    return value


def _check_time(field: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequest(f"{field} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def _check_ssl_mode(value: str) -> str:
    if value not in SSL_MODES:
        allowed = ", ".join(sorted(SSL_MODES))
        raise InvalidRequest(f"invalid ssl_mode {value!r}: use one of {allowed}")
    return value


def _check_ca_cert(value: str | None) -> str | None:
    if value is None:
        return None
    _required_text("ca_cert", value)
    # Parse now so a bad certificate is refused when it is added, not when the first
    # user tries to connect.
    try:
        x509.load_pem_x509_certificates(value.encode())
    except ValueError:
        raise InvalidRequest("ca_cert is not a PEM-encoded X.509 certificate (or bundle)") from None
    return value


def _check_password(value: str) -> str:
    # The value itself never goes into a message.
    if not isinstance(value, str) or not value:
        raise InvalidRequest("password must be a non-empty string")
    if "\x00" in value:
        raise InvalidRequest("password must not contain a NUL character")
    return value


def _check_reason(kind: str, value: str, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise InvalidRequest(
            f"invalid {kind} end reason {value!r}: use one of {', '.join(sorted(allowed))}"
        )
    return value


def _check_limit(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"limit must be a positive integer, not {value!r}")
    return value


def _check_optional_time(field: str, value: datetime | None) -> datetime | None:
    return None if value is None else _check_time(field, value)


def _check_choice(field: str, value: object, allowed: frozenset[str]) -> None:
    if value is not None and (not isinstance(value, str) or value not in allowed):
        raise InvalidRequest(f"{field} must be one of {', '.join(sorted(allowed))}")


def _check_optional_count(field: str, value: object) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BIGINT
    ):
        raise InvalidRequest(f"{field} must be a non-negative 64-bit integer")


def _check_parameter(where: str, parameter: object) -> None:
    if not isinstance(parameter, Parameter):
        raise InvalidRequest(f"{where} is not a Parameter")
    index = parameter.index
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        raise InvalidRequest(f"{where} index must be a positive integer")
    oid = parameter.type_oid
    if oid is not None and (
        isinstance(oid, bool) or not isinstance(oid, int) or not 0 <= oid <= _MAX_OID
    ):
        raise InvalidRequest(f"{where} type_oid must be an unsigned 32-bit integer")
    _check_choice(f"{where} format", parameter.format, PARAMETER_FORMATS)
    _check_text(f"{where} value", parameter.value, required=False)
    if not isinstance(parameter.truncated, bool):
        raise InvalidRequest(f"{where} truncated must be a bool")


def _check_detail(where: str, detail: object) -> None:
    if detail is None:
        return
    if not isinstance(detail, dict):
        raise InvalidRequest(f"{where} detail must be a dict")
    for key, value in detail.items():
        _required_text(f"{where} detail key", key)
        field = f"{where} detail[{key!r}]"
        if value is None or isinstance(value, str):
            _check_text(field, value, required=False)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{field} must be a string, a number or None")
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"{field} must be a finite number")


def _row_values(position: int, row: EventRow) -> tuple[Any, ...]:
    """Validate one event row; return its stored columns in ``EVENT_FIELDS`` order,
    which are also what the chain (version 2) MACs.

    Messages name the event's position and the field, never a value: values may
    hold data a client sent. Runs once per statement in the audit writer, so the
    common case (every field of the right type) takes one pass of inline checks,
    without helper calls or copies; the precise per-field checks run only to name
    what is wrong.
    """
    if type(row) is not tuple or len(row) != len(EVENT_FIELDS):
        _explain_invalid_row(f"audit event {position}", row)
    (
        session_id,
        connection_id,
        kind,
        micros,
        protocol,
        sql,
        statement_name,
        portal_name,
        parameters,
        command_tag,
        rows,
        status,
        sqlstate,
        error_message,
        duration_ms,
        copy_direction,
        copy_bytes,
        detail,
    ) = row
    try:
        # A text is None or a str without NUL (which PostgreSQL text cannot hold);
        # an id is not blank (``not x.isspace()`` is ``x.strip()`` without the copy).
        plausible = (
            type(session_id) is str
            and bool(session_id)
            and not session_id.isspace()
            and "\x00" not in session_id
            and type(connection_id) is str
            and 0 < len(connection_id) <= ID_LENGTH
            and not connection_id.isspace()
            and "\x00" not in connection_id
            and kind in AUDIT_KINDS
            and type(micros) is int
            and (protocol is None or protocol in AUDIT_PROTOCOLS)
            and (status is None or status in AUDIT_STATUSES)
            and (copy_direction is None or copy_direction in COPY_DIRECTIONS)
            and (sql is None or (type(sql) is str and "\x00" not in sql))
            and (
                statement_name is None
                or (type(statement_name) is str and "\x00" not in statement_name)
            )
            and (portal_name is None or (type(portal_name) is str and "\x00" not in portal_name))
            and (command_tag is None or (type(command_tag) is str and "\x00" not in command_tag))
            and (
                error_message is None
                or (type(error_message) is str and "\x00" not in error_message)
            )
            and (
                sqlstate is None
                or (type(sqlstate) is str and bool(SQLSTATE_PATTERN.fullmatch(sqlstate)))
            )
            and (rows is None or (type(rows) is int and 0 <= rows <= MAX_BIGINT))
            and (copy_bytes is None or (type(copy_bytes) is int and 0 <= copy_bytes <= MAX_BIGINT))
            and (
                duration_ms is None
                or (type(duration_ms) in (float, int) and 0 <= duration_ms < math.inf)
            )
            and (
                parameters is None
                or (
                    type(parameters) in (tuple, list)
                    and all(_plausible_parameter_row(p) for p in parameters)
                )
            )
            and (detail is None or type(detail) is dict)
        )
    except TypeError:  # an unhashable value where a choice belongs
        plausible = False
    if not plausible:
        _explain_invalid_row(f"audit event {position}", row)
    if detail is not None:
        _check_detail(f"audit event {position}", detail)
    try:
        occurred_at = iso_from_micros(micros)
    except (OverflowError, ValueError):
        raise InvalidRequest(f"audit event {position} occurred_at is out of range") from None
    return (
        session_id,
        connection_id,
        kind,
        occurred_at,
        protocol,
        sql,
        statement_name,
        portal_name,
        None
        if parameters is None
        else canonical_json(
            [
                {"index": i, "type_oid": oid, "format": f, "value": v, "truncated": cut}
                for i, oid, f, v, cut in parameters
            ]
        ),
        command_tag,
        rows,
        status,
        sqlstate,
        error_message,
        # A float column reads back 5 as 5.0; normalising here keeps the hash stable.
        None if duration_ms is None else float(duration_ms),
        copy_direction,
        copy_bytes,
        None if detail is None else canonical_json(detail),
    )


def _plain_text(value: object) -> bool:
    """None, or a str without NUL (which PostgreSQL text cannot hold)."""
    return value is None or (type(value) is str and "\x00" not in value)


def _stand_in(position: int, row: object, problem: InvalidRequest) -> tuple[Any, ...] | None:
    """The stored columns of a record saying that event *position* could not be
    recorded as it was, and why; None when not even its session, connection and
    time are usable. :class:`InvalidRequest` messages name fields, never values."""
    if not isinstance(row, tuple | list) or len(row) != len(EVENT_FIELDS):
        return None
    reason = problem.message.removeprefix(f"audit event {position} ")
    kind = row[2] if isinstance(row[2], str) and row[2] in AUDIT_KINDS else "statement"
    stand_in: list[Any] = [None] * len(EVENT_FIELDS)
    stand_in[:4] = [row[0], row[1], kind, row[_OCCURRED_AT]]
    stand_in[_STATUS] = "incomplete" if kind == "statement" else None
    stand_in[_ERROR_MESSAGE] = f"pam could not record this event as it was: {reason}"
    try:
        return _row_values(position, tuple(stand_in))
    except InvalidRequest:
        return None


def _plausible_parameter_row(parameter: object) -> bool:
    if type(parameter) is not tuple or len(parameter) != _PARAMETER_FIELDS:
        return False
    index, oid, format_, value, truncated = parameter
    return (
        type(index) is int
        and index >= 1
        and (oid is None or (type(oid) is int and 0 <= oid <= _MAX_OID))
        and format_ in PARAMETER_FORMATS
        and _plain_text(value)
        and type(truncated) is bool
    )


def _explain_invalid_row(where: str, row: object) -> None:
    """Raise :class:`InvalidRequest` naming the first invalid field of *row*; return
    if it is valid after all (a subclass of a valid type, which the fast path refuses)."""
    if not isinstance(row, tuple | list) or len(row) != len(EVENT_FIELDS):
        raise InvalidRequest(f"{where} is not an audit event")
    micros, parameters = row[_OCCURRED_AT], row[_PARAMETERS]
    if isinstance(micros, bool) or not isinstance(micros, int):
        raise InvalidRequest(f"{where} occurred_at must be an integer of microseconds")
    if parameters is not None and not isinstance(parameters, tuple | list):
        raise InvalidRequest(f"{where} parameters must be a tuple of Parameter")
    for number, parameter in enumerate(parameters or (), 1):
        if not isinstance(parameter, tuple | list) or len(parameter) != _PARAMETER_FIELDS:
            raise InvalidRequest(f"{where} parameter {number} is not a Parameter")
    try:
        event = row_event(tuple(row))
    except (OverflowError, ValueError, TypeError):
        raise InvalidRequest(f"{where} occurred_at is out of range") from None
    _explain_invalid_audit_event(where, event)
    for number, parameter in enumerate(event.parameters or (), 1):
        _check_parameter(f"{where} parameter {number}", parameter)


def _explain_invalid_audit_event(where: str, event: AuditEvent) -> None:
    """Raise :class:`InvalidRequest` naming the first invalid field of *event*."""
    _required_text(f"{where} session_id", event.session_id)
    _required_text(f"{where} connection_id", event.connection_id)
    if len(event.connection_id) > ID_LENGTH:
        raise InvalidRequest(f"{where} connection_id is longer than {ID_LENGTH} characters")
    _check_choice(f"{where} kind", event.kind, AUDIT_KINDS)
    if event.kind is None:
        raise InvalidRequest(f"{where} kind is required")
    _check_time(f"{where} occurred_at", event.occurred_at)
    _check_choice(f"{where} protocol", event.protocol, AUDIT_PROTOCOLS)
    _check_choice(f"{where} status", event.status, AUDIT_STATUSES)
    _check_choice(f"{where} copy_direction", event.copy_direction, COPY_DIRECTIONS)
    for name in ("sql", "statement_name", "portal_name", "command_tag", "error_message"):
        _check_text(f"{where} {name}", getattr(event, name), required=False)
    if event.sqlstate is not None and (
        not isinstance(event.sqlstate, str) or not SQLSTATE_PATTERN.fullmatch(event.sqlstate)
    ):
        raise InvalidRequest(f"{where} sqlstate must be a 5-character SQLSTATE code")
    _check_optional_count(f"{where} rows", event.rows)
    _check_optional_count(f"{where} copy_bytes", event.copy_bytes)
    duration = event.duration_ms
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not math.isfinite(duration)
        or duration < 0
    ):
        raise InvalidRequest(f"{where} duration_ms must be a finite, non-negative number")
    if event.parameters is not None and not isinstance(event.parameters, tuple | list):
        raise InvalidRequest(f"{where} parameters must be a tuple of Parameter")
    # A subclass of a valid type (a str or datetime subclass, say) is refused by
    # the fast path only to be accepted here: still valid.


#: Columns of an inserted audit row, in the order of append_audit_rows's tuples:
#: the event's fields as the chain lists them, then what the store adds.
_AUDIT_INSERT_COLUMNS: Final = (
    *EVENT_FIELDS,
    "seq",
    "recorded_at",
    "prev_hash",
    "hash",
    "chain_version",
)
_OCCURRED_AT: Final = EVENT_FIELDS.index("occurred_at")
_PARAMETERS: Final = EVENT_FIELDS.index("parameters")
_STATUS: Final = EVENT_FIELDS.index("status")
_ERROR_MESSAGE: Final = EVENT_FIELDS.index("error_message")
_PARAMETER_FIELDS: Final = 5
#: Rows per INSERT statement: 23 parameters each stays under SQLite's (32,766)
#: and PostgreSQL's (65,535) limit on parameters per statement.
_AUDIT_ROWS_PER_INSERT: Final = 500


@functools.lru_cache(maxsize=16)
def _audit_insert_sql(paramstyle: str, count: int) -> str:
    """``INSERT INTO audit_events (...) VALUES (...), (...)`` for *count* rows."""
    mark = "?" if paramstyle == "qmark" else "%s"
    columns = ", ".join(f'"{name}"' for name in _AUDIT_INSERT_COLUMNS)
    one = "(" + ", ".join([mark] * len(_AUDIT_INSERT_COLUMNS)) + ")"
    return f"INSERT INTO audit_events ({columns}) VALUES " + ", ".join([one] * count)


def _json_text(value: object) -> str | None:
    # The same spelling the chain MACs, so the column holds exactly what was hashed.
    if value is None:
        return None
    return canonical_json(value)


def _json_value(text: str | None) -> Any:
    """A JSON column's value; the raw text if it no longer parses (verify then
    reports the record as changed instead of failing)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _escape_like(value: str) -> str:
    return (
        value.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2)
        .replace("%", _LIKE_ESCAPE + "%")
        .replace("_", _LIKE_ESCAPE + "_")
    )


# -- rows to records --------------------------------------------------------------


def _resource(row: _AnyRow) -> Resource:
    return Resource(
        id=row.id,
        name=row.name,
        host=row.host,
        port=row.port,
        database=row.database,
        ssl_mode=row.ssl_mode,
        ca_cert=row.ca_cert,
        created_at=row.created_at,
    )


def _account(row: _AnyRow) -> Account:
    return Account(
        id=row.id,
        resource_id=row.resource_id,
        resource_name=row.resource_name,
        name=row.name,
        username=row.username,
        created_at=row.created_at,
        password_updated_at=row.password_updated_at,
    )


def _session(row: _AnyRow) -> AccessSession:
    return AccessSession(
        id=row.id,
        requester=row.requester,
        resource_name=row.resource_name,
        account_name=row.account_name,
        database=row.database,
        username=row.username,
        listen_host=row.listen_host,
        listen_port=row.listen_port,
        started_at=row.started_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
        end_reason=row.end_reason,
        end_detail=row.end_detail,
    )


def _connection(row: _AnyRow) -> ConnectionRecord:
    return ConnectionRecord(
        id=row.id,
        session_id=row.session_id,
        client_addr=row.client_addr,
        application_name=row.application_name,
        backend_pid=row.backend_pid,
        started_at=row.started_at,
        ended_at=row.ended_at,
        bytes_from_client=row.bytes_from_client,
        bytes_from_server=row.bytes_from_server,
        end_reason=row.end_reason,
        error_sqlstate=row.error_sqlstate,
        error_message=row.error_message,
    )


def _stored_fields(row: _AnyRow) -> dict[str, Any]:
    """Rebuild, from a stored row, the mapping :func:`event_fields` made at append."""
    occurred_at: datetime = row.occurred_at
    return {
        "session_id": row.session_id,
        "connection_id": row.connection_id,
        "kind": row.kind,
        "occurred_at": occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "protocol": row.protocol,
        "sql": row.sql,
        "statement_name": row.statement_name,
        "portal_name": row.portal_name,
        "parameters": _json_value(row.parameters),
        "command_tag": row.command_tag,
        "rows": row.rows,
        "status": row.status,
        "sqlstate": row.sqlstate,
        "error_message": row.error_message,
        "duration_ms": None if row.duration_ms is None else float(row.duration_ms),
        "copy_direction": row.copy_direction,
        "copy_bytes": row.copy_bytes,
        "detail": _json_value(row.detail),
    }


def _stored_values(row: _AnyRow) -> tuple[Any, ...]:
    """Rebuild, from a stored row, the values :meth:`AuditChain.row_hash` MACed at append."""
    occurred_at: datetime = row.occurred_at
    return (
        row.session_id,
        row.connection_id,
        row.kind,
        occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        row.protocol,
        row.sql,
        row.statement_name,
        row.portal_name,
        row.parameters,
        row.command_tag,
        row.rows,
        row.status,
        row.sqlstate,
        row.error_message,
        None if row.duration_ms is None else float(row.duration_ms),
        row.copy_direction,
        row.copy_bytes,
        row.detail,
    )


def _audit_record(row: _AnyRow) -> AuditRecord:
    fields = _stored_fields(row)
    fields["occurred_at"] = row.occurred_at
    try:
        return AuditRecord(
            **fields,
            seq=row.seq,
            recorded_at=row.recorded_at,
            prev_hash=row.prev_hash,
            hash=row.hash,
            resource_name=row.resource_name,
            account_name=row.account_name,
            requester=row.requester,
        )
    except ValidationError:
        raise StoreError(
            f"audit record seq {row.seq} of session '{row.session_id}' is malformed",
            hint="run 'pam audit verify' on the session",
        ) from None


# Accounts are always read with their resource's name.
_ACCOUNT_COLUMNS: Final = (
    accounts.c.id,
    accounts.c.resource_id,
    resources.c.name.label("resource_name"),
    accounts.c.name,
    accounts.c.username,
    accounts.c.created_at,
    accounts.c.password_updated_at,
)
_ACCOUNTS_JOIN: Final = accounts.join(resources, accounts.c.resource_id == resources.c.id)


# -- engine set-up ----------------------------------------------------------------


def _create_engine(url: str, sqlite_synchronous: SqliteSynchronous) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not echoing the URL: a malformed one may still contain a password.
        raise ConfigError(
            "invalid state store URL",
            hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; pam ships with psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    safe_url = parsed.render_as_string(hide_password=True)
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported state store URL {safe_url}: use sqlite:///PATH or "
            "postgresql+psycopg://..."
        )
    try:
        if backend == "sqlite":
            return _create_sqlite_engine(parsed.database, sqlite_synchronous)
        return create_engine(parsed, hide_parameters=True, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigError(f"cannot use state store URL {safe_url}: {exc}") from None


def _create_sqlite_engine(database: str | None, synchronous: SqliteSynchronous) -> Engine:
    _bind_none_directly()
    if not database or database == ":memory:":
        # One shared connection, or every thread would see its own empty database.
        engine = create_engine(
            "sqlite://",
            hide_parameters=True,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
    else:
        _create_private_file(database)
        engine = create_engine(
            f"sqlite:///{database}",
            hide_parameters=True,
            connect_args={"check_same_thread": False},
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself: the sqlite3
        # module's implicit transactions start too late and always DEFERRED.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets readers (the CLI) run while the gateway writes.
        cursor.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit survives the process dying, and the file is never
        # corrupted, but the last commits before a power loss or OS crash may be
        # rolled back; FULL also fsyncs every commit (see Store.open).
        cursor.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A write transaction takes the write lock up front (IMMEDIATE): a DEFERRED
        # one that reads and then writes can fail with SQLITE_BUSY at once, without
        # honouring busy_timeout, if another process wrote in between.
        mode = connection.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _create_private_file(path: str) -> None:
    """Create the store file *path*, empty and mode 0600, unless it exists.

    It holds sealed passwords and the audit trail (SQL text and parameters), so
    it is private like ``master.key``. SQLite gives its -wal and -shm files the
    main file's mode, so they follow. Created with the mode in ``open()``, never
    chmod-ed later, so it is not readable by others even for a moment; SQLite
    takes an empty file as an empty database. An existing file keeps the mode
    its operator gave it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _STORE_FILE_MODE)
    except OSError:
        # It exists (the usual case), or the directory is missing or not
        # writable, which SQLite reports next in its own words.
        return
    try:
        # A restrictive umask can only remove bits; this makes the mode exactly 0600.
        os.fchmod(fd, _STORE_FILE_MODE)
    finally:
        os.close(fd)


def _bind_none_directly() -> None:
    """Register ``None``'s adapter with the sqlite3 module: a NULL without the search.

    For every ``None`` it binds, CPython's sqlite3 (3.11) looks for an adapter,
    asks the protocol and then the value for one, and each miss on the protocol
    formats and clears an ``AttributeError``: about 0.5 µs per NULL, and an audit
    row binds ten or more. A registered adapter ends the search at the first
    lookup. ``{}.get`` maps ``None`` to ``None`` in C (a lambda costs a Python
    call); the module then binds NULL exactly as before. Process-wide, and the
    same for every user of sqlite3: ``None`` still means NULL.
    """
    sqlite3.register_adapter(type(None), _NONE_TO_NONE)


#: ``_NONE_TO_NONE(None) is None``
_NONE_TO_NONE: Final = dict[None, None]().get


def _upgrade_schema(connection: Connection) -> None:
    config = Config()
    # ConfigParser interpolates '%'; a path containing one must be escaped.
    config.set_main_option("script_location", str(_MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class Store:
    """Synchronous access to the gateway's persistent state. See the module docstring."""

    def __init__(
        self,
        engine: Engine,
        box: SecretBox,
        *,
        clock: Callable[[], datetime] = _utcnow,
        audit_key: bytes | None = None,
    ) -> None:
        """Wrap an engine whose schema is already at head; use :meth:`open` instead."""
        self._engine = engine
        self._box = box
        self._clock = clock
        self._closed = False
        self._chain = AuditChain(
            audit_key if audit_key is not None else box.derive_key(AUDIT_KEY_INFO)
        )
        # session id -> (seq, hash) of the last record this store wrote or saw.
        self._heads: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._heads_lock = threading.Lock()
        # Audit rows are inserted as driver SQL (see _insert_audit_rows), so their
        # timestamps take the column type's conversion by hand.
        self._timestamp_param = functools.partial(
            UtcTimestamp().process_bind_param, dialect=engine.dialect
        )
        self._iso_timestamps = engine.dialect.name != "postgresql"
        # SQLite allows one writer per file anyway; serialising this process's
        # threads here turns lock contention into a short wait instead of an error,
        # and makes the shared in-memory connection safe. PostgreSQL needs no lock.
        self._lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    @classmethod
    def open(
        cls,
        url: str,
        box: SecretBox,
        *,
        clock: Callable[[], datetime] | None = None,
        audit_key: bytes | None = None,
        sqlite_synchronous: SqliteSynchronous = "normal",
    ) -> Store:
        """Connect to the store at *url* and migrate its schema to the newest revision.

        *url* is ``sqlite:///PATH`` or ``postgresql+psycopg://...`` (a bare
        ``postgresql://`` means psycopg 3). *clock* returns the current time as an
        aware datetime; tests pass a fake one. *audit_key* is the audit chain's HMAC
        key; by default it is derived from *box*'s master key
        (``box.derive_key(AUDIT_KEY_INFO)``), which is what every process sharing
        the store must use to append and verify. *sqlite_synchronous* is SQLite's
        ``synchronous`` setting: ``normal`` (the default, what SQLite recommends
        with WAL: nothing is lost when the process dies, the last commits can be
        when the machine loses power) or ``full`` (every commit is fsynced, which
        costs about half a millisecond of CPU each on a virtual disk). Raises
        :class:`ConfigError` if the database cannot be opened or has a schema
        newer than this code.
        """
        # Checked before connecting, so a bad key leaves nothing open.
        chain_key = audit_key if audit_key is not None else box.derive_key(AUDIT_KEY_INFO)
        AuditChain(chain_key)
        if sqlite_synchronous not in get_args(SqliteSynchronous):
            raise ConfigError(
                f"sqlite_synchronous must be 'normal' or 'full', not {sqlite_synchronous!r}"
            )
        engine = _create_engine(url, sqlite_synchronous)
        safe_url = engine.url.render_as_string(hide_password=True)
        try:
            with engine.connect() as connection:
                connection.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
                with connection.begin():
                    if engine.dialect.name == "postgresql":
                        # Transaction-scoped: released by the commit below.
                        connection.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"),
                            {"key": _PG_MIGRATION_LOCK_KEY},
                        )
                    _upgrade_schema(connection)
        except CommandError as exc:
            engine.dispose()
            raise ConfigError(
                f"cannot migrate the state store {safe_url}: {exc}",
                hint="was it created by a newer version of pam?",
            ) from None
        except DBAPIError as exc:
            engine.dispose()
            raise ConfigError(f"cannot open the state store {safe_url}: {exc.orig}") from None
        return cls(engine, box, clock=clock if clock is not None else _utcnow, audit_key=chain_key)

    def close(self) -> None:
        """Release every database connection. The store cannot be used afterwards."""
        self._closed = True
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._engine.url.render_as_string(hide_password=True)!r})"

    @contextlib.contextmanager
    def _transaction(
        self, *, write: bool, snapshot: bool = False, conflicts: bool = False
    ) -> Iterator[Connection]:
        """One transaction; commits if the block returns, rolls back if it raises.

        *conflicts*: the caller turns a constraint violation into its own error
        (a duplicate name into :class:`AlreadyExists`), so ``IntegrityError`` is
        re-raised as it is. Otherwise it is a :class:`StoreError` like any other
        database failure (a trigger, a constraint added by hand).

        *snapshot* (read-only, for long reads such as verify): every statement sees
        the same state of the database (PostgreSQL: REPEATABLE READ; SQLite's WAL
        readers always do), and on a SQLite file the transaction does not take
        this process's lock, so appends from other threads are not held up.
        """
        if self._closed:
            raise ConfigError("the state store has been closed")
        # The in-memory database is one shared connection: everything must queue.
        lock = (
            contextlib.nullcontext()
            if snapshot and not write and not isinstance(self._engine.pool, StaticPool)
            else self._lock
        )
        try:
            with lock, self._engine.connect() as connection:
                if write:
                    connection.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
                if snapshot and connection.dialect.name == "postgresql":
                    # Reset when the connection goes back to the pool.
                    connection.execution_options(isolation_level="REPEATABLE READ")
                with connection.begin():
                    yield connection
        except IntegrityError as exc:
            if conflicts:
                raise
            raise StoreError(f"state store error: {exc.orig}") from exc
        except DBAPIError as exc:
            # Parameters are hidden (hide_parameters=True), so this cannot leak a
            # ciphertext, let alone a password.
            raise StoreError(f"state store error: {exc.orig}") from exc

    def _now(self) -> datetime:
        return _check_time("clock()", self._clock())

    # -- resources ------------------------------------------------------------------

    def add_resource(
        self,
        name: str,
        host: str,
        port: int,
        database: str,
        ssl_mode: str = "verify-full",
        ca_cert: str | None = None,
    ) -> Resource:
        """Register an upstream database. Raises :class:`AlreadyExists` for a taken name."""
        row = {
            "id": _new_id(),
            "name": _check_name("resource", name),
            "host": _required_text("host", host),
            "port": _check_port("port", port),
            "database": _required_text("database", database),
            "ssl_mode": _check_ssl_mode(ssl_mode),
            "ca_cert": _check_ca_cert(ca_cert),
            "created_at": self._now(),
        }
        try:
            with self._transaction(write=True, conflicts=True) as conn:
                conn.execute(resources.insert().values(row))
        except IntegrityError:
            raise AlreadyExists(f"resource '{name}' already exists") from None
        return Resource.model_validate(row)

    def get_resource(self, name: str) -> Resource:
        with self._transaction(write=False) as conn:
            return _resource(self._resource_row(conn, name))

    def list_resources(self) -> list[Resource]:
        """Every resource, ordered by name."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(select(resources)).all()
        # Sorted here rather than in SQL: PostgreSQL orders text by the database's
        # collation (which may ignore '-' and '.'), SQLite by bytes.
        return sorted((_resource(r) for r in rows), key=lambda r: r.name)

    def remove_resource(self, name: str) -> None:
        """Delete a resource and its accounts; refused while a session on it is active."""
        with self._transaction(write=True) as conn:
            resource = self._resource_row(conn, name, lock="update")
            active = self._count_active_sessions(conn, sessions.c.resource_name == name)
            if active:
                raise InvalidRequest(
                    f"resource '{name}' has {active} active session(s); end them first"
                )
            conn.execute(accounts.delete().where(accounts.c.resource_id == resource.id))
            conn.execute(resources.delete().where(resources.c.id == resource.id))

    # -- accounts -------------------------------------------------------------------

    def add_account(self, resource: str, name: str, username: str, password: str) -> Account:
        """Add an upstream login to *resource*; the password is stored sealed."""
        _check_name("account", name)
        _required_text("username", username)
        _check_password(password)
        account_id = _new_id()
        now = self._now()
        sealed = self._box.encrypt(password.encode(), aad=_account_aad(account_id))
        try:
            with self._transaction(write=True, conflicts=True) as conn:
                parent = self._resource_row(conn, resource, lock="share")
                conn.execute(
                    accounts.insert().values(
                        id=account_id,
                        resource_id=parent.id,
                        name=name,
                        username=username,
                        password_ciphertext=sealed,
                        created_at=now,
                        password_updated_at=now,
                    )
                )
        except IntegrityError:
            raise AlreadyExists(
                f"account '{name}' already exists on resource '{resource}'"
            ) from None
        return Account(
            id=account_id,
            resource_id=parent.id,
            resource_name=resource,
            name=name,
            username=username,
            created_at=now,
            password_updated_at=now,
        )

    def get_account(self, resource: str, name: str) -> Account:
        with self._transaction(write=False) as conn:
            return _account(self._account_row(conn, resource, name))

    def list_accounts(self, resource: str | None = None) -> list[Account]:
        """Accounts of *resource* (which must exist), or of every resource.

        Ordered by resource name, then account name.
        """
        with self._transaction(write=False) as conn:
            query = select(*_ACCOUNT_COLUMNS).select_from(_ACCOUNTS_JOIN)
            if resource is not None:
                parent = self._resource_row(conn, resource)
                query = query.where(accounts.c.resource_id == parent.id)
            rows = conn.execute(query).all()
        return sorted((_account(r) for r in rows), key=lambda a: (a.resource_name, a.name))

    def reveal_password(self, resource: str, name: str) -> str:
        """Decrypt and return an account's password.

        Only the upstream connector should call this, right before authenticating.
        Raises :class:`SecretDecryptError` if the stored value cannot be opened.
        """
        with self._transaction(write=False) as conn:
            row = self._account_row(conn, resource, name)
            sealed = conn.execute(
                select(accounts.c.password_ciphertext).where(accounts.c.id == row.id)
            ).scalar_one()
        try:
            return self._box.decrypt(bytes(sealed), aad=_account_aad(row.id)).decode()
        except SecretDecryptError as exc:
            raise SecretDecryptError(
                f"cannot decrypt the password of account '{name}' on resource "
                f"'{resource}': {exc.message}",
                hint="check that the gateway uses the master key the password was "
                "stored with, or set the password again",
            ) from None

    def rotate_password(self, resource: str, name: str, password: str) -> Account:
        """Replace an account's stored password."""
        _check_password(password)
        now = self._now()
        with self._transaction(write=True) as conn:
            row = self._account_row(conn, resource, name, lock="update")
            # A fresh nonce, so the new ciphertext shares nothing with the old one.
            sealed = self._box.encrypt(password.encode(), aad=_account_aad(row.id))
            conn.execute(
                accounts.update()
                .where(accounts.c.id == row.id)
                .values(password_ciphertext=sealed, password_updated_at=now)
            )
        return _account(row).model_copy(update={"password_updated_at": now})

    def remove_account(self, resource: str, name: str) -> None:
        """Delete an account; refused while a session using it is active."""
        with self._transaction(write=True) as conn:
            row = self._account_row(conn, resource, name, lock="update")
            active = self._count_active_sessions(
                conn,
                (sessions.c.resource_name == resource) & (sessions.c.account_name == name),
            )
            if active:
                raise InvalidRequest(
                    f"account '{name}' on resource '{resource}' has {active} active "
                    "session(s); end them first"
                )
            conn.execute(accounts.delete().where(accounts.c.id == row.id))

    # -- sessions -------------------------------------------------------------------

    def create_session(
        self,
        *,
        requester: str,
        resource: str,
        account: str,
        listen_host: str,
        expires_at: datetime,
        started_at: datetime | None = None,
    ) -> AccessSession:
        """Start an access session, copying the database and username into it."""
        _required_text("requester", requester)
        _required_text("listen_host", listen_host)
        expires = _check_time("expires_at", expires_at)
        started = self._now() if started_at is None else _check_time("started_at", started_at)
        if expires <= started:
            raise InvalidRequest("expires_at must be later than started_at")
        with self._transaction(write=True) as conn:
            parent = self._resource_row(conn, resource, lock="share")
            login = self._account_row(conn, resource, account, lock="share")
            row = {
                "id": _new_id(),
                "requester": requester,
                "resource_name": resource,
                "account_name": account,
                "database": parent.database,
                "username": login.username,
                "listen_host": listen_host,
                "listen_port": None,
                "started_at": started,
                "expires_at": expires,
            }
            conn.execute(sessions.insert().values(row))
        return AccessSession.model_validate(row)

    def set_session_port(self, session_id: str, port: int) -> None:
        """Record the local port the session's listener is bound to."""
        _check_port("port", port)
        with self._transaction(write=True) as conn:
            result = conn.execute(
                sessions.update().where(sessions.c.id == session_id).values(listen_port=port)
            )
            if result.rowcount == 0:
                raise NotFound(f"session '{session_id}' not found")

    def end_session(
        self,
        session_id: str,
        *,
        reason: str,
        detail: str | None = None,
        ended_at: datetime | None = None,
    ) -> AccessSession:
        """End a session and seal its audit trail. If it has already ended, return it unchanged.

        End each connection first where you know how it ended: a connection of
        the session still open here is ended in the same transaction, at the
        session's end, with the reason :data:`~gateway.reasons.CONNECTION_REASON_AT_SESSION_END`
        maps *reason* to, and no byte counts (they are unknown), so an ended
        session never shows a live connection. A later end of such a connection
        changes nothing. Flush the session's audit events before calling this;
        events appended later are accepted and re-seal the trail.
        """
        _check_reason("session", reason, SESSION_END_REASONS)
        _check_text("detail", detail, required=False)
        ended = self._now() if ended_at is None else _check_time("ended_at", ended_at)
        with self._transaction(write=True) as conn:
            # The row lock keeps appends out while the seal is computed.
            current = self._session_row(conn, session_id, lock="update")
            if current.ended_at is None:
                # "WHERE ended_at IS NULL" makes the first end win, even against a
                # concurrent caller; the select then reports whichever end that was.
                conn.execute(
                    sessions.update()
                    .where(sessions.c.id == session_id, sessions.c.ended_at.is_(None))
                    .values(
                        ended_at=ended,
                        end_reason=reason,
                        end_detail=detail,
                        **self._seal_values(session_id, self._chain_head(conn, session_id)),
                    )
                )
                conn.execute(
                    connections.update()
                    .where(connections.c.session_id == session_id, connections.c.ended_at.is_(None))
                    .values(
                        ended_at=ended,
                        end_reason=CONNECTION_REASON_AT_SESSION_END[SessionEndReason(reason)],
                    )
                )
            return _session(self._session_row(conn, session_id))

    def get_session(self, session_id: str) -> AccessSession:
        """A session by full id, or by a unique prefix of at least 6 characters."""
        with self._transaction(write=False) as conn:
            return _session(self._session_row(conn, self._resolve_session_id(conn, session_id)))

    def list_sessions(
        self,
        *,
        active: bool | None = None,
        limit: int = 100,
        resource: str | None = None,
        account: str | None = None,
        requester: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[AccessSession]:
        """Sessions, newest first.

        *active* selects only active (True) or ended (False) sessions; *resource*,
        *account* and *requester* match exactly; *since* (inclusive) and *until*
        (exclusive) bound ``started_at``.
        """
        _check_limit(limit)
        since = _check_optional_time("since", since)
        until = _check_optional_time("until", until)
        query = select(sessions).order_by(sessions.c.started_at.desc(), sessions.c.id.desc())
        if active is True:
            query = query.where(sessions.c.ended_at.is_(None))
        elif active is False:
            query = query.where(sessions.c.ended_at.is_not(None))
        if resource is not None:
            query = query.where(sessions.c.resource_name == resource)
        if account is not None:
            query = query.where(sessions.c.account_name == account)
        if requester is not None:
            query = query.where(sessions.c.requester == requester)
        if since is not None:
            query = query.where(sessions.c.started_at >= since)
        if until is not None:
            query = query.where(sessions.c.started_at < until)
        with self._transaction(write=False) as conn:
            return [_session(r) for r in conn.execute(query.limit(limit))]

    def close_orphans(self, reason: str = "gateway_crash") -> int:
        """End every session and connection still open; returns the sessions closed.

        Called when the gateway starts: anything still open was left behind by a
        gateway that stopped without recording it (crash, kill -9, power loss).
        Each session's audit trail is sealed as it stands.
        """
        _check_reason("session", reason, SESSION_END_REASONS)
        _check_reason("connection", reason, CONNECTION_END_REASONS)
        now = self._now()
        with self._transaction(write=True) as conn:
            orphans = (
                conn.execute(
                    select(sessions.c.id)
                    .where(sessions.c.ended_at.is_(None))
                    .order_by(sessions.c.id)
                    .with_for_update()
                )
                .scalars()
                .all()
            )
            conn.execute(
                connections.update()
                .where(connections.c.ended_at.is_(None))
                .values(ended_at=now, end_reason=reason)
            )
            for session_id in orphans:
                conn.execute(
                    sessions.update()
                    .where(sessions.c.id == session_id, sessions.c.ended_at.is_(None))
                    .values(
                        ended_at=now,
                        end_reason=reason,
                        **self._seal_values(session_id, self._chain_head(conn, session_id)),
                    )
                )
            return len(orphans)

    # -- connections ----------------------------------------------------------------

    def create_connection(
        self,
        session_id: str,
        *,
        client_addr: str,
        application_name: str | None = None,
        backend_pid: int | None = None,
        started_at: datetime | None = None,
    ) -> ConnectionRecord:
        """Record a new client connection in an active session.

        *backend_pid* is the upstream server's process id (for pg_stat_activity),
        when the upstream session is already up; *started_at* defaults to now.
        """
        start = ConnectionStart(session_id, client_addr, application_name, backend_pid, started_at)
        (result,) = self.record_connections([start])
        if isinstance(result, GatewayError):
            raise result
        assert isinstance(result, ConnectionRecord)
        return result

    def end_connection(
        self,
        connection_id: str,
        *,
        reason: str,
        bytes_from_client: int,
        bytes_from_server: int,
        error_sqlstate: str | None = None,
        error_message: str | None = None,
        ended_at: datetime | None = None,
    ) -> ConnectionRecord:
        """End a connection with its byte counts. If already ended, return it unchanged."""
        end = ConnectionEnd(
            connection_id,
            reason,
            bytes_from_client,
            bytes_from_server,
            error_sqlstate,
            error_message,
            ended_at,
        )
        (result,) = self.record_connections([end])
        if isinstance(result, GatewayError):
            raise result
        with self._transaction(write=False) as conn:
            return _connection(
                conn.execute(select(connections).where(connections.c.id == connection_id)).one()
            )

    def record_connections(
        self, changes: Sequence[ConnectionStart | ConnectionEnd]
    ) -> list[ConnectionRecord | GatewayError | None]:
        """Apply connection starts and ends in order, in one transaction.

        The daemon's group commit: the changes that queued up while the previous
        transaction ran go in the next one, so a burst of connections costs a few
        transactions instead of two each. Each change gets its own outcome, in
        order: the new :class:`ConnectionRecord` for a start, ``None`` for an
        end (ending an ended connection changes nothing), or the
        :class:`InvalidRequest` / :class:`NotFound` that refused that change
        alone. A database failure raises :class:`StoreError` for all of them.
        """
        now = self._now()
        checked: list[tuple[bool, dict[str, Any] | GatewayError]] = []
        for change in changes:
            is_start = isinstance(change, ConnectionStart)
            try:
                checked.append(
                    (
                        is_start,
                        # isinstance again, not is_start: mypy narrows only on the call
                        _start_row(change, now)
                        if isinstance(change, ConnectionStart)
                        else _end_values(change, now),
                    )
                )
            except InvalidRequest as exc:
                checked.append((is_start, exc))
        results: list[ConnectionRecord | GatewayError | None] = []
        with self._transaction(write=True) as conn:
            session_open: dict[str, bool] = {}
            for is_start, prepared in checked:
                if isinstance(prepared, GatewayError):
                    results.append(prepared)
                elif is_start:
                    results.append(self._insert_connection(conn, prepared, session_open))
                else:
                    results.append(self._update_connection_end(conn, prepared))
        return results

    def _insert_connection(
        self, conn: Connection, row: dict[str, Any], session_open: dict[str, bool]
    ) -> ConnectionRecord | GatewayError:
        session_id = row["session_id"]
        if session_id not in session_open:
            parent = conn.execute(_SESSION_ENDED_AT, {"sid": session_id}).one_or_none()
            if parent is None:
                return NotFound(f"session '{session_id}' not found")
            session_open[session_id] = parent.ended_at is None
        if not session_open[session_id]:
            return InvalidRequest(f"session '{session_id}' has ended")
        conn.execute(_INSERT_CONNECTION, row)
        return ConnectionRecord.model_validate(row)

    @staticmethod
    def _update_connection_end(conn: Connection, values: dict[str, Any]) -> GatewayError | None:
        connection_id = values["end_id"]
        updated = conn.execute(_END_CONNECTION, values)
        if updated.rowcount == 0 and (
            conn.execute(
                select(connections.c.id).where(connections.c.id == connection_id)
            ).one_or_none()
            is None
        ):
            return NotFound(f"connection '{connection_id}' not found")
        return None

    def list_connections(self, session_id: str) -> list[ConnectionRecord]:
        """The connections of a session, oldest first."""
        with self._transaction(write=False) as conn:
            self._session_row(conn, session_id)
            rows = conn.execute(
                select(connections)
                .where(connections.c.session_id == session_id)
                .order_by(connections.c.started_at, connections.c.id)
            ).all()
        return [_connection(r) for r in rows]

    # -- audit trail ----------------------------------------------------------------

    def append_audit(self, events: Sequence[AuditEvent]) -> int:
        """Append *events* to their sessions' trails, in order; returns how many.

        All or nothing: an invalid event (:class:`InvalidRequest`) or an unknown
        session (:class:`NotFound`) refuses the whole batch, and a database failure
        raises :class:`StoreError` (the caller decides whether to fail closed).
        Each event gets the next ``seq`` of its session and is chained to the
        record before it, whoever wrote that one. Appending to an ended session
        is allowed (late events) and re-seals its trail.
        """
        return self.append_audit_rows(event_rows(events))

    def append_audit_rows(
        self, rows: Sequence[EventRow], *, substitute_invalid: bool = False
    ) -> int:
        """:meth:`append_audit` for events as :data:`~gateway.audit.records.EventRow`
        tuples, as the audit writer process receives them.

        *substitute_invalid* (the audit writer's mode): an event the store cannot
        take is recorded as a stand-in instead of refusing the batch, which would
        be refused again on every retry while the sessions wait. The stand-in keeps
        the event's session, connection, kind and time, has status ``incomplete``
        (for a statement) and says in ``error_message`` which field was refused
        (never its value). Events that cannot be attributed even so (no valid
        session, connection or time, or a session the store does not hold) are
        left out; the return value, the number written, then falls short.
        """
        # (position in rows, stored columns) of each event that will be written
        prepared: list[tuple[int, tuple[Any, ...]]] = []
        for position, row in enumerate(rows):
            try:
                prepared.append((position, _row_values(position, row)))
            except InvalidRequest as exc:
                if not substitute_invalid:
                    raise
                stand_in = _stand_in(position, row, exc)
                if stand_in is not None:
                    prepared.append((position, stand_in))
        if not prepared:
            return 0
        recorded_at = self._timestamp_param(self._now())
        session_ids = sorted({values[0] for _, values in prepared})
        heads: dict[str, tuple[int, str]] = {}
        row_hash = self._chain.row_hash
        with self._transaction(write=True) as conn:
            # Locked in id order, so two batches never wait on each other in a
            # cycle; the lock orders every append to a session (and its end).
            found = conn.execute(
                select(sessions.c.id, sessions.c.ended_at)
                .where(sessions.c.id.in_(session_ids))
                .order_by(sessions.c.id)
                .with_for_update()
            ).all()
            known = {row.id: row.ended_at is not None for row in found}
            for session_id in session_ids:
                if session_id not in known:
                    if not substitute_invalid:
                        raise NotFound(f"session '{session_id}' not found")
                    prepared = [p for p in prepared if p[1][0] != session_id]
                    continue
                heads[session_id] = self._chain_head(conn, session_id)
            inserted = []
            for position, values in prepared:
                session_id = values[0]
                seq, prev_hash = heads[session_id]
                seq += 1
                try:
                    digest = row_hash(prev_hash, seq, values)
                except ValueError:
                    # Lone surrogates and the like: not representable in UTF-8.
                    problem = InvalidRequest(
                        f"audit event {position} holds text that is not valid Unicode"
                    )
                    stand_in = _stand_in(position, rows[position], problem)
                    if not substitute_invalid or stand_in is None:
                        raise problem from None
                    values = stand_in
                    try:
                        digest = row_hash(prev_hash, seq, values)
                    except ValueError:  # the connection id itself, then
                        raise problem from None
                if not self._iso_timestamps:
                    values = (
                        *values[:_OCCURRED_AT],
                        datetime.fromisoformat(values[_OCCURRED_AT]),
                        *values[_OCCURRED_AT + 1 :],
                    )
                inserted.append((*values, seq, recorded_at, prev_hash, digest, CHAIN_VERSION))
                heads[session_id] = (seq, digest)
            self._insert_audit_rows(conn, inserted)
            for session_id, is_ended in known.items():
                if is_ended:
                    conn.execute(
                        sessions.update()
                        .where(sessions.c.id == session_id)
                        .values(**self._seal_values(session_id, heads[session_id]))
                    )
        self._remember_heads(heads)
        return len(inserted)

    def list_audit(
        self,
        session_id: str,
        *,
        after_seq: int = 0,
        limit: int = 1000,
        kinds: Iterable[str] | None = None,
    ) -> list[AuditRecord]:
        """A session's records with ``seq > after_seq``, in seq order (one page).

        *session_id* may be a unique prefix. *kinds* keeps only those kinds. Page
        with ``after_seq=records[-1].seq``.
        """
        _check_count("after_seq", after_seq)
        _check_limit(limit)
        wanted = self._check_kinds(kinds)
        with self._transaction(write=False) as conn:
            full_id = self._existing_session_id(conn, session_id)
            query = (
                self._audit_query()
                .where(audit_events.c.session_id == full_id, audit_events.c.seq > after_seq)
                .order_by(audit_events.c.seq, audit_events.c.id)
                .limit(limit)
            )
            if wanted is not None:
                query = query.where(audit_events.c.kind.in_(wanted))
            rows = conn.execute(query).all()
        return [_audit_record(r) for r in rows]

    def count_audit(self, session_id: str, kind: str | None = None) -> int:
        """How many records a session's trail holds (of *kind*, if given)."""
        _check_choice("kind", kind, AUDIT_KINDS)
        with self._transaction(write=False) as conn:
            full_id = self._existing_session_id(conn, session_id)
            query = (
                select(func.count())
                .select_from(audit_events)
                .where(audit_events.c.session_id == full_id)
            )
            if kind is not None:
                query = query.where(audit_events.c.kind == kind)
            return int(conn.execute(query).scalar_one())

    def search_audit(
        self,
        text: str | None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        resource: str | None = None,
        account: str | None = None,
        requester: str | None = None,
        session_id: str | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Records across sessions, newest first.

        *text* is a case-insensitive substring of the SQL (``%`` and ``_`` are
        literal characters; SQLite folds only ASCII case); ``None`` matches every
        record, with or without SQL. *since* (inclusive) and *until* (exclusive)
        bound ``occurred_at``; *resource*, *account*, *requester* and *status*
        match exactly; *session_id* may be a unique prefix.
        """
        _check_text("text", text, required=False)
        since = _check_optional_time("since", since)
        until = _check_optional_time("until", until)
        _check_choice("status", status, AUDIT_STATUSES)
        _check_limit(limit)
        query = self._audit_query()
        if text is not None:
            pattern = "%" + _escape_like(text) + "%"
            query = query.where(
                func.lower(audit_events.c.sql).like(func.lower(pattern), escape=_LIKE_ESCAPE)
            )
        if since is not None:
            query = query.where(audit_events.c.occurred_at >= since)
        if until is not None:
            query = query.where(audit_events.c.occurred_at < until)
        if resource is not None:
            query = query.where(sessions.c.resource_name == resource)
        if account is not None:
            query = query.where(sessions.c.account_name == account)
        if requester is not None:
            query = query.where(sessions.c.requester == requester)
        if status is not None:
            query = query.where(audit_events.c.status == status)
        query = query.order_by(audit_events.c.occurred_at.desc(), audit_events.c.id.desc())
        with self._transaction(write=False) as conn:
            if session_id is not None:
                full_id = self._existing_session_id(conn, session_id)
                query = query.where(audit_events.c.session_id == full_id)
            rows = conn.execute(query.limit(limit)).all()
        return [_audit_record(r) for r in rows]

    def verify_audit(self, session_id: str | None = None) -> list[ChainProblem]:
        """Recompute the hash chain of one session (id or unique prefix) or of all.

        Returns every problem found, each naming its session and record; an empty
        list means every trail checked is intact. Reads one consistent snapshot
        and streams the records, so memory does not grow with the trail.
        """
        problems: list[ChainProblem] = []
        with self._transaction(write=False, snapshot=True) as conn:
            session_query = select(
                sessions.c.id,
                sessions.c.ended_at,
                sessions.c.audit_count,
                sessions.c.audit_head,
                sessions.c.audit_seal,
            )
            record_query = select(audit_events)
            if session_id is not None:
                full_id = self._existing_session_id(conn, session_id)
                session_query = session_query.where(sessions.c.id == full_id)
                record_query = record_query.where(audit_events.c.session_id == full_id)
            ends = {row.id: row for row in conn.execute(session_query)}
            records = conn.execute(
                record_query.order_by(
                    audit_events.c.session_id, audit_events.c.seq, audit_events.c.id
                ).execution_options(yield_per=_AUDIT_STREAM_ROWS)
            )
            checked: set[str] = set()
            for sid, group in itertools.groupby(records, key=lambda row: str(row.session_id)):
                verifier = SessionVerifier(self._chain, sid)
                for row in group:
                    if row.chain_version == CHAIN_VERSION:
                        # Hashed over its columns; the fields only name it in a report.
                        values, fields = _stored_values(row), {"kind": row.kind, "sql": row.sql}
                    else:
                        values, fields = (), _stored_fields(row)
                    verifier.feed(
                        row.id,
                        row.seq,
                        row.prev_hash,
                        row.hash,
                        fields,
                        version=row.chain_version,
                        values=values,
                    )
                problems.extend(self._finish(verifier, ends.get(sid)))
                checked.add(sid)
            for sid, end in ends.items():
                if sid not in checked:
                    problems.extend(self._finish(SessionVerifier(self._chain, sid), end))
        return problems

    @staticmethod
    def _finish(verifier: SessionVerifier, end: _AnyRow | None) -> list[ChainProblem]:
        if end is None:
            # The foreign key makes this impossible unless it was bypassed.
            return verifier.finish(ended=False, count=None, head=None, seal=None)
        return verifier.finish(
            ended=end.ended_at is not None,
            count=end.audit_count,
            head=end.audit_head,
            seal=end.audit_seal,
        )

    @staticmethod
    def _check_kinds(kinds: Iterable[str] | None) -> list[str] | None:
        if kinds is None:
            return None
        if isinstance(kinds, str):
            kinds = [kinds]
        wanted = list(kinds)
        for kind in wanted:
            _check_choice("kinds", kind, AUDIT_KINDS)
        return wanted

    @staticmethod
    def _audit_query() -> Any:
        return select(
            audit_events,
            sessions.c.resource_name,
            sessions.c.account_name,
            sessions.c.requester,
        ).select_from(audit_events.join(sessions, audit_events.c.session_id == sessions.c.id))

    def _insert_audit_rows(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Insert *rows* with one multi-row INSERT per chunk.

        Not ``executemany``: the sqlite3 module releases and retakes the GIL
        around every row it steps, and under load each of those hand-offs waits
        for the event loop's thread, which made the audit writer cost the relay
        more than the writing itself. One statement per few hundred rows is one
        hand-off, on both backends.
        """
        for start in range(0, len(rows), _AUDIT_ROWS_PER_INSERT):
            chunk = rows[start : start + _AUDIT_ROWS_PER_INSERT]
            statement = _audit_insert_sql(conn.dialect.paramstyle, len(chunk))
            conn.exec_driver_sql(statement, tuple(itertools.chain.from_iterable(chunk)))

    def _chain_head(self, conn: Connection, session_id: str) -> tuple[int, str]:
        """(seq, hash) to chain the next record of *session_id* to.

        The database's last row is the truth when it is at or beyond what this
        store remembers: another process may have appended since. If it is
        behind, rows this store wrote have disappeared; chaining on from the
        remembered head keeps that visible (verify reports the gap) instead of
        papering over it.
        """
        row = conn.execute(
            select(audit_events.c.seq, audit_events.c.hash)
            .where(audit_events.c.session_id == session_id)
            .order_by(audit_events.c.seq.desc())
            .limit(1)
        ).one_or_none()
        stored = (0, GENESIS_HASH) if row is None else (int(row.seq), str(row.hash))
        with self._heads_lock:
            remembered = self._heads.get(session_id)
        if remembered is not None and remembered[0] > stored[0]:
            return remembered
        return stored

    def _remember_heads(self, heads: dict[str, tuple[int, str]]) -> None:
        with self._heads_lock:
            for session_id, head in heads.items():
                known = self._heads.get(session_id)
                # Only forward: a slower thread must not move a head back.
                if known is None or head[0] > known[0]:
                    self._heads[session_id] = head
                self._heads.move_to_end(session_id)
            while len(self._heads) > _AUDIT_HEAD_CACHE_SIZE:
                self._heads.popitem(last=False)

    def _seal_values(self, session_id: str, head: tuple[int, str]) -> dict[str, Any]:
        count, digest = head
        return {
            "audit_count": count,
            "audit_head": digest,
            "audit_seal": self._chain.seal(session_id, count, digest),
        }

    def _existing_session_id(self, conn: Connection, session_id: str) -> str:
        full_id = self._resolve_session_id(conn, session_id)
        self._session_row(conn, full_id)
        return full_id

    # -- helpers (inside a transaction) -------------------------------------------------

    @staticmethod
    def _resource_row(conn: Connection, name: str, *, lock: str | None = None) -> _AnyRow:
        query = select(resources).where(resources.c.name == name)
        # Row locks only matter on PostgreSQL; SQLite's BEGIN IMMEDIATE already
        # serialises writers and SQLAlchemy renders nothing for it there.
        if lock is not None:
            query = query.with_for_update(read=lock == "share")
        row = conn.execute(query).one_or_none()
        if row is None:
            raise NotFound(f"resource '{name}' not found")
        return row

    @staticmethod
    def _account_row(
        conn: Connection, resource: str, name: str, *, lock: str | None = None
    ) -> _AnyRow:
        query = (
            select(*_ACCOUNT_COLUMNS)
            .select_from(_ACCOUNTS_JOIN)
            .where(resources.c.name == resource, accounts.c.name == name)
        )
        if lock is not None:
            query = query.with_for_update(read=lock == "share", of=accounts)
        row = conn.execute(query).one_or_none()
        if row is None:
            # Say which part is missing; "account not found" on a mistyped resource
            # name sends people looking in the wrong place.
            Store._resource_row(conn, resource)
            raise NotFound(f"account '{name}' not found on resource '{resource}'")
        return row

    @staticmethod
    def _session_row(conn: Connection, session_id: str, *, lock: str | None = None) -> _AnyRow:
        query = select(sessions).where(sessions.c.id == session_id)
        if lock is not None:
            query = query.with_for_update(read=lock == "share")
        row = conn.execute(query).one_or_none()
        if row is None:
            raise NotFound(f"session '{session_id}' not found")
        return row

    @staticmethod
    def _resolve_session_id(conn: Connection, session_id: str) -> str:
        key = session_id.strip().lower()
        if not _ID_CHARS.fullmatch(key):
            raise NotFound(f"session '{session_id}' not found")
        if len(key) == 32:
            return key
        if len(key) < _SESSION_ID_MIN_PREFIX:
            raise InvalidRequest(
                f"session id prefix '{session_id}' is too short: give at least "
                f"{_SESSION_ID_MIN_PREFIX} characters"
            )
        # Ids are lower-case hex (checked above), so the prefix has no LIKE wildcards.
        matches = (
            conn.execute(select(sessions.c.id).where(sessions.c.id.startswith(key)).limit(2))
            .scalars()
            .all()
        )
        if not matches:
            raise NotFound(f"session '{session_id}' not found")
        if len(matches) > 1:
            raise InvalidRequest(
                f"session id prefix '{session_id}' matches more than one session; "
                "give more characters"
            )
        return str(matches[0])

    @staticmethod
    def _count_active_sessions(conn: Connection, condition: Any) -> int:
        count = conn.execute(
            select(func.count())
            .select_from(sessions)
            .where(condition, sessions.c.ended_at.is_(None))
        ).scalar_one()
        return int(count)
