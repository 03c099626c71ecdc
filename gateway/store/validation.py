"""Checks of what callers hand the store, and of audit events as the writer sends them.

Role: the store's boundary. Every public method checks its input here before any
SQL runs; :func:`row_values` turns an audit event row into its stored columns.

Invariants:

* Input is refused with :class:`~gateway.errors.InvalidRequest` naming the
  field; the database is never the first line of validation. Text never holds a
  NUL (PostgreSQL text cannot), so both backends accept the same values.
* A message names the field (and an audit event's position), never a value: a
  value may be a password or data a client sent.
* An audit row is checked in one pass of inline tests (the audit writer's hot
  path); the precise per-field explainers run only to name what is wrong, and
  accept what the fast path refused only if it is valid after all (a subclass of
  a valid type).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Final

from cryptography import x509

from gateway.audit.chain import EVENT_FIELDS
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
    datetime_micros,
    row_event,
)
from gateway.errors import InvalidRequest
from gateway.store.models import NAME_PATTERN, SSL_MODES
from gateway.store.schema import ID_LENGTH

__all__ = [
    "OCCURRED_AT",
    "check_ca_cert",
    "check_choice",
    "check_count",
    "check_limit",
    "check_name",
    "check_optional_time",
    "check_password",
    "check_port",
    "check_reason",
    "check_ssl_mode",
    "check_text",
    "check_time",
    "required_text",
    "row_values",
    "stand_in_row",
]


_NAME_RULE: Final = (
    "use 1-63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit"
)

#: PostgreSQL OIDs are unsigned 32-bit.
_MAX_OID: Final = 0xFFFF_FFFF


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidRequest(f"invalid {kind} name {value!r}: {_NAME_RULE}")
    return value


def check_text(field: str, value: str | None, *, required: bool = True) -> str | None:
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


def required_text(field: str, value: str) -> str:
    checked = check_text(field, value)
    assert checked is not None
    return checked


def check_port(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidRequest(f"{field} must be an integer from 1 to 65535, not {value!r}")
    return value


def check_count(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{field} must be a non-negative integer, not {value!r}")
    return value


def check_time(field: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequest(f"{field} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def check_ssl_mode(value: str) -> str:
    if value not in SSL_MODES:
        allowed = ", ".join(sorted(SSL_MODES))
        raise InvalidRequest(f"invalid ssl_mode {value!r}: use one of {allowed}")
    return value


def check_ca_cert(value: str | None) -> str | None:
    if value is None:
        return None
    required_text("ca_cert", value)
    # Parse now so a bad certificate is refused when it is added, not when the first
    # user tries to connect.
    try:
        x509.load_pem_x509_certificates(value.encode())
    except ValueError:
        raise InvalidRequest("ca_cert is not a PEM-encoded X.509 certificate (or bundle)") from None
    return value


def check_password(value: str) -> str:
    # The value itself never goes into a message.
    if not isinstance(value, str) or not value:
        raise InvalidRequest("password must be a non-empty string")
    if "\x00" in value:
        raise InvalidRequest("password must not contain a NUL character")
    return value


def check_reason(kind: str, value: str, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise InvalidRequest(
            f"invalid {kind} end reason {value!r}: use one of {', '.join(sorted(allowed))}"
        )
    return value


def check_limit(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"limit must be a positive integer, not {value!r}")
    return value


def check_optional_time(field: str, value: datetime | None) -> datetime | None:
    return None if value is None else check_time(field, value)


def check_choice(field: str, value: object, allowed: frozenset[str]) -> None:
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
    check_choice(f"{where} format", parameter.format, PARAMETER_FORMATS)
    check_text(f"{where} value", parameter.value, required=False)
    if not isinstance(parameter.truncated, bool):
        raise InvalidRequest(f"{where} truncated must be a bool")


def _check_detail(where: str, detail: object) -> None:
    if detail is None:
        return
    if not isinstance(detail, dict):
        raise InvalidRequest(f"{where} detail must be a dict")
    for key, value in detail.items():
        required_text(f"{where} detail key", key)
        field = f"{where} detail[{key!r}]"
        if value is None or isinstance(value, str):
            check_text(field, value, required=False)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{field} must be a string, a number or None")
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"{field} must be a finite number")


OCCURRED_AT: Final = EVENT_FIELDS.index("occurred_at")
#: The fields only a statement may set (a connection event's body is its detail).
_STATEMENT_ONLY: Final = slice(OCCURRED_AT + 1, len(EVENT_FIELDS) - 1)
#: The range of a datetime, in microseconds since the epoch.
_MIN_MICROS: Final = datetime_micros(datetime.min.replace(tzinfo=UTC))
_MAX_MICROS: Final = datetime_micros(datetime.max.replace(tzinfo=UTC))
_PARAMETERS: Final = EVENT_FIELDS.index("parameters")
_STATUS: Final = EVENT_FIELDS.index("status")
_ERROR_MESSAGE: Final = EVENT_FIELDS.index("error_message")
_PARAMETER_FIELDS: Final = 5


def row_values(position: int, row: EventRow) -> tuple[Any, ...]:
    """Validate one event row; return its session id and its record body as chain
    version 3 encodes it: ``(session_id, kind, occurred_at, connection_id,
    *body)``, the body being the fields of its kind
    (:data:`gateway.audit.batch.BODY_FIELDS`).

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
    if not _MIN_MICROS <= micros <= _MAX_MICROS:
        raise InvalidRequest(f"audit event {position} occurred_at is out of range")
    if kind != "statement":
        if any(value is not None for value in row[_STATEMENT_ONLY]):
            raise InvalidRequest(f"audit event {position} is a {kind} with statement fields")
        return (session_id, kind, micros, connection_id, detail)
    return (
        session_id,
        kind,
        micros,
        connection_id,
        protocol,
        sql,
        statement_name,
        portal_name,
        parameters if parameters is None or type(parameters) is tuple else tuple(parameters),
        command_tag,
        rows,
        status,
        sqlstate,
        error_message,
        # Always a float, whatever the caller passed: 5 and 5.0 are one duration.
        None if duration_ms is None else float(duration_ms),
        copy_direction,
        copy_bytes,
        detail,
    )


def _plain_text(value: object) -> bool:
    """None, or a str without NUL (which PostgreSQL text cannot hold)."""
    return value is None or (type(value) is str and "\x00" not in value)


def stand_in_row(position: int, row: object, problem: InvalidRequest) -> tuple[Any, ...] | None:
    """The :func:`row_values` of a record saying that event *position* could not be
    recorded as it was, and why; None when not even its session, connection and
    time are usable. :class:`InvalidRequest` messages name fields, never values."""
    if not isinstance(row, tuple | list) or len(row) != len(EVENT_FIELDS):
        return None
    reason = problem.message.removeprefix(f"audit event {position} ")
    kind = row[2] if isinstance(row[2], str) and row[2] in AUDIT_KINDS else "statement"
    stand_in: list[Any] = [None] * len(EVENT_FIELDS)
    stand_in[:4] = [row[0], row[1], kind, row[OCCURRED_AT]]
    message = f"pam could not record this event as it was: {reason}"
    if kind == "statement":
        stand_in[_STATUS] = "incomplete"
        stand_in[_ERROR_MESSAGE] = message
    else:  # a connection event's body is its detail
        stand_in[-1] = {"pam_error": message}
    try:
        return row_values(position, tuple(stand_in))
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
    micros, parameters = row[OCCURRED_AT], row[_PARAMETERS]
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
    required_text(f"{where} session_id", event.session_id)
    required_text(f"{where} connection_id", event.connection_id)
    if len(event.connection_id) > ID_LENGTH:
        raise InvalidRequest(f"{where} connection_id is longer than {ID_LENGTH} characters")
    check_choice(f"{where} kind", event.kind, AUDIT_KINDS)
    if event.kind is None:
        raise InvalidRequest(f"{where} kind is required")
    check_time(f"{where} occurred_at", event.occurred_at)
    check_choice(f"{where} protocol", event.protocol, AUDIT_PROTOCOLS)
    check_choice(f"{where} status", event.status, AUDIT_STATUSES)
    check_choice(f"{where} copy_direction", event.copy_direction, COPY_DIRECTIONS)
    for name in ("sql", "statement_name", "portal_name", "command_tag", "error_message"):
        check_text(f"{where} {name}", getattr(event, name), required=False)
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
