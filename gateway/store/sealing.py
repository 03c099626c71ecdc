"""Seals on session and connection rows: who asked, from where, how it ended.

The trail's records are chained (:mod:`gateway.audit.chain`); the rows that say
who opened a session and from where live in ``sessions`` and ``connections``,
which the gateway updates (a session ends, a connection ends). Each row
carries two seals (revision 0007): ``start_seal`` when it is written, over the
fields fixed from then on, and ``end_seal`` when it ends, over the end's
fields. A seal is JSON ``{"fields": {...}, "mac": HEX}``: a copy of the sealed
fields and an HMAC (the audit key) over the table, the part, the row id and
that copy.

Invariants:
* A seal is computed from the values being written, in the same statement
  that writes them: no extra read on the connection path.
* ``pam audit verify`` (:func:`check_row`) names each field whose column no
  longer matches its sealed copy; a copy that no longer matches its MAC is
  reported as the seal itself being edited. A row from before revision 0007
  has no seal and is not checked; a seal missing beside sealed rows of the
  same session (or an ended row with a start seal and no end seal) was removed,
  and is reported. A session whose every seal was removed (its connections'
  too) reads as one from before the seals: that much an editor with write
  access can hide.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, select

from gateway.audit.chain import AuditChain
from gateway.audit.verify import ChainProblem
from gateway.store.models import REQUEST_FIELDS
from gateway.store.schema import connections, sessions

__all__ = [
    "CONNECTION_END",
    "CONNECTION_START",
    "SESSION_END",
    "SESSION_START",
    "check_row",
    "row_problems",
    "seal",
]

#: What each seal covers (column names).
SESSION_START: Final = (
    "requester",
    "resource_name",
    "account_name",
    "database",
    "username",
    "started_at",
    "expires_at",
    *REQUEST_FIELDS,
    # Revision 0017: which gateway relays it, and so whose crash ends it. A seal
    # written before has no copy of it, and a field not in a seal is not checked
    # (as with ``request_id`` before revision 0010): older rows still verify.
    "gateway_id",
)
#: ``connection_count`` is not a column: the connection rows the session had
#: when it ended, so that a deleted one shows.
SESSION_END: Final = ("ended_at", "end_reason", "end_detail", "connection_count")
CONNECTION_START: Final = (
    "session_id",
    "client_addr",
    "application_name",
    "backend_pid",
    "started_at",
)
CONNECTION_END: Final = (
    "ended_at",
    "end_reason",
    "bytes_from_client",
    "bytes_from_server",
    "error_sqlstate",
    "error_message",
)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


def _fields_json(fields: Mapping[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def seal(
    chain: AuditChain,
    table: str,
    part: str,
    row_id: str,
    values: Mapping[str, Any],
    names: tuple[str, ...],
) -> str:
    """The seal of *names* of *values* (a row being written)."""
    fields = {name: _plain(values.get(name)) for name in names}
    body = _fields_json(fields)
    return json.dumps({"fields": fields, "mac": chain.row_mac(table, part, row_id, body)})


def check_row(
    chain: AuditChain, table: str, part: str, row_id: str, row: Mapping[str, Any], sealed: str
) -> list[str]:
    """What of *row* disagrees with its seal: edited column names, or
    ``["<seal>"]`` when the seal itself was edited; empty when intact."""
    try:
        stored = json.loads(sealed)
        fields = stored["fields"]
        mac = stored["mac"]
        if not isinstance(fields, dict) or not isinstance(mac, str):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        return ["<seal>"]
    body = _fields_json(fields)
    if not chain.verifies(lambda key: key.row_mac(table, part, row_id, body), mac):
        return ["<seal>"]
    return [name for name, value in fields.items() if _plain(row.get(name)) != value]


_PARTS: Final = (("start", "start_seal"), ("end", "end_seal"))


def row_problems(
    chain: AuditChain,
    conn: Connection,
    session_id: str,
    started_connections: Mapping[str, int] | None = None,
) -> list[ChainProblem]:
    """Every edit of *session_id*'s row and its connections' rows that their
    seals show, each named (``changed``, no seq: these are not trail records);
    and connection rows deleted since the session ended (``removed``, named by
    the trail's connection_start records, id -> seq, when it has them)."""
    problems = []
    session = conn.execute(select(sessions).where(sessions.c.id == session_id)).one()
    rows = [("sessions", "session", session)]
    rows += [
        ("connections", "connection", row)
        for row in conn.execute(
            select(connections)
            .where(connections.c.session_id == session_id)
            .order_by(connections.c.started_at, connections.c.id)
        )
    ]
    present = {row.id for table, _, row in rows if table == "connections"}
    # Rows from before revision 0007 have no seals; from then on every row has
    # its start seal and, once ended, its end seal. A seal missing where its
    # neighbours show the rows are sealed was removed.
    sealed_rows = any(row.start_seal is not None for _, _, row in rows)
    for table, noun, row in rows:
        values = dict(row._mapping)
        if table == "sessions":
            values["connection_count"] = len(present)
        for part, column in _PARTS:
            sealed = values[column]
            if sealed is None:
                due = row.ended_at is not None if part == "end" else True
                if sealed_rows and due:
                    problems.append(
                        ChainProblem(
                            session_id=session_id,
                            seq=None,
                            problem="changed",
                            detail=f"the {noun} record {row.id[:8]} was edited:"
                            f" its {part} seal was removed",
                        )
                    )
                continue
            edited = check_row(chain, table, part, row.id, values, sealed)
            if "connection_count" in edited:
                edited.remove("connection_count")
                problems.append(_deleted_connections(session_id, present, started_connections))
            if edited:
                what = (
                    "its seal was edited"
                    if edited == ["<seal>"]
                    else f"{', '.join(edited)} no longer match{'es' if len(edited) == 1 else ''}"
                    " what was sealed"
                )
                problems.append(
                    ChainProblem(
                        session_id=session_id,
                        seq=None,
                        problem="changed",
                        detail=f"the {noun} record {row.id[:8]} was edited: {what}",
                    )
                )
    return problems


def _deleted_connections(
    session_id: str, present: set[str], started: Mapping[str, int] | None
) -> ChainProblem:
    """The session's end sealed more connection rows than there are: which ones
    the trail knows of (by their connection_start records), if any."""
    missing = sorted((seq, cid) for cid, seq in (started or {}).items() if cid not in present)
    named = ", ".join(f"{cid[:8]} (started at seq {seq})" for seq, cid in missing)
    return ChainProblem(
        session_id=session_id,
        seq=missing[0][0] if missing else None,
        problem="removed",
        detail="connection records were deleted" + (f": {named}" if named else ""),
    )
