"""Client connections within a session: started and ended, in group commits.

Invariants:

* A connection starts only in a session that exists and has not ended; the
  session row is read with a share lock (PostgreSQL), so it cannot end until the
  new connection's row is in.
* Ending a connection is idempotent: the first end wins and later calls change
  nothing.
* :meth:`ConnectionStore.record_connections` applies a batch in order in one
  transaction; each change gets its own outcome, and an invalid change refuses
  only itself. The daemon's connection records go through it, so it and the
  checks it calls stay free of per-change work that is not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, bindparam, select

# The changes are the access package's vocabulary: declared with its SessionStore port.
from gateway.access.ports import ConnectionEnd, ConnectionStart
from gateway.audit.records import SQLSTATE_PATTERN
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.store.engine import StoreBase
from gateway.store.models import CONNECTION_END_REASONS, ConnectionRecord
from gateway.store.rows import new_id, session_row
from gateway.store.schema import connections, sessions
from gateway.store.sealing import CONNECTION_END, CONNECTION_START, seal
from gateway.store.validation import (
    check_count,
    check_reason,
    check_text,
    check_time,
    required_text,
)

if TYPE_CHECKING:
    from gateway.store.rows import AnyRow

__all__ = ["ConnectionEnd", "ConnectionStart", "ConnectionStore"]


def _start_row(start: ConnectionStart, now: datetime) -> dict[str, Any]:
    required_text("client_addr", start.client_addr)
    check_text("application_name", start.application_name, required=False)
    pid = start.backend_pid
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        raise InvalidRequest(f"backend_pid must be a non-negative integer, not {pid!r}")
    return {
        "id": new_id(),
        "session_id": start.session_id,
        "client_addr": start.client_addr,
        "application_name": start.application_name,
        "backend_pid": pid,
        "started_at": now
        if start.started_at is None
        else check_time("started_at", start.started_at),
        "bytes_from_client": 0,
        "bytes_from_server": 0,
    }


def _end_values(end: ConnectionEnd, now: datetime) -> dict[str, Any]:
    check_reason("connection", end.reason, CONNECTION_END_REASONS)
    check_count("bytes_from_client", end.bytes_from_client)
    check_count("bytes_from_server", end.bytes_from_server)
    if end.error_sqlstate is not None and not SQLSTATE_PATTERN.fullmatch(end.error_sqlstate):
        raise InvalidRequest("error_sqlstate must be a 5-character SQLSTATE code")
    check_text("error_message", end.error_message, required=False)
    return {
        "end_id": end.connection_id,
        "end_ended_at": now if end.ended_at is None else check_time("ended_at", end.ended_at),
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
        end_seal=bindparam("end_end_seal"),
    )
)


def _connection(row: AnyRow) -> ConnectionRecord:
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


class ConnectionStore(StoreBase):
    """Connection starts and ends, one at a time or grouped."""

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
        sealed = seal(self._chain, "connections", "start", row["id"], row, CONNECTION_START)
        conn.execute(_INSERT_CONNECTION, {**row, "start_seal": sealed})
        return ConnectionRecord.model_validate(row)

    def _update_connection_end(
        self, conn: Connection, values: dict[str, Any]
    ) -> GatewayError | None:
        connection_id = values["end_id"]
        # The end's fields under their column names (the bind names carry
        # "end_", except end_reason's, which is its own column name).
        end = {
            name: values[name if name == "end_reason" else "end_" + name] for name in CONNECTION_END
        }
        sealed = seal(self._chain, "connections", "end", connection_id, end, CONNECTION_END)
        updated = conn.execute(_END_CONNECTION, {**values, "end_end_seal": sealed})
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
            session_row(conn, session_id)
            rows = conn.execute(
                select(connections)
                .where(connections.c.session_id == session_id)
                .order_by(connections.c.started_at, connections.c.id)
            ).all()
        return [_connection(r) for r in rows]
