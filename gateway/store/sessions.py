"""Access sessions: created on an account, ended once, sealed when they end.

Invariants:

* A session copies its resource's database and its account's username when it
  is created, so the trail stays true after either changes. A session of an
  ephemeral account gets the name of its own role instead
  (``pam_<requester>_<first 8 of its id>``), sealed with the other start fields.
* A live session's expiry may move later (an extension); its start seal is
  recomputed in the statement that moves it.
* Ending a session is idempotent: the first end wins and later calls return the
  record unchanged. Ending it ends its open connections in the same transaction
  and seals its audit trail (count, head hash, HMAC) so that truncation shows.
* A session records the gateway that opened it (``gateway_id``, sealed), which
  relays all its connections. :meth:`SessionStore.close_orphans` ends the open
  sessions of gateways whose presence lease has lapsed (and the caller's own,
  left by its previous run, at its start), at that gateway's last renewal,
  sealing each trail as it stands. It never ends a live gateway's session.
* Every end and every extension is announced to the other gateways on the store
  in its own transaction (:func:`gateway.store.changes.announce`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Connection, and_, exists, func, or_, select

from gateway.credentials.ephemeral.sql import ephemeral_role_name
from gateway.credentials.schedule import presence_lease
from gateway.errors import InvalidRequest, NotFound
from gateway.identity.principals import DEFAULT_PROJECT
from gateway.reasons import CONNECTION_REASON_AT_SESSION_END, SessionEndReason
from gateway.store.batches import holds_failed_statement
from gateway.store.changes import ChangeTopic, announce
from gateway.store.models import (
    REQUEST_FIELDS,
    SESSION_END_REASONS,
    AccessSession,
)
from gateway.store.rows import account_row, new_id, resolve_session_id, resource_row, session_row
from gateway.store.schema import audit_events, connections, leases, sessions
from gateway.store.sealing import CONNECTION_END, SESSION_END, SESSION_START, seal
from gateway.store.trail import TrailStore
from gateway.store.validation import (
    check_limit,
    check_optional_time,
    check_port,
    check_reason,
    check_text,
    check_time,
    required_text,
)

if TYPE_CHECKING:
    from gateway.store.rows import AnyRow

__all__ = ["SessionStore"]


def session_of(row: AnyRow) -> AccessSession:
    """The record of a ``sessions`` row."""
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
        gateway_id=row.gateway_id,
        holder_id=row.holder_id,
        client_public_key=row.client_public_key,
        idle_timeout_seconds=row.idle_timeout_seconds,
        idle_policy=row.idle_policy,
        **{name: getattr(row, name) for name in REQUEST_FIELDS},
    )


def _connection_count(conn: Connection, session_id: str) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(connections)
            .where(connections.c.session_id == session_id)
        ).scalar_one()
    )


class SessionStore(TrailStore):
    """Access sessions and their ends."""

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
    ) -> AccessSession:
        """Start an access session, copying the database and username into it.
        *request*: what it records of who asked (keys of :data:`REQUEST_FIELDS`);
        *gateway_id*: the gateway opening it (it holds it until another takes it
        over); *client_public_key*: a tunnel grant's client key (PEM); the
        allowing policy's idle timeout and its name."""
        required_text("requester", requester)
        asked = dict.fromkeys(REQUEST_FIELDS) | (request or {})
        if asked.keys() != set(REQUEST_FIELDS):
            unknown = sorted(set(asked) - set(REQUEST_FIELDS))
            raise InvalidRequest(f"unknown request fields {unknown}")
        for name, value in asked.items():
            check_text(name, value, required=False)
        required_text("listen_host", listen_host)
        check_text("gateway_id", gateway_id, required=False)
        check_text("client_public_key", client_public_key, required=False)
        check_text("idle_policy", idle_policy, required=False)
        expires = check_time("expires_at", expires_at)
        started = self._now() if started_at is None else check_time("started_at", started_at)
        if expires <= started:
            raise InvalidRequest("expires_at must be later than started_at")
        with self._transaction(write=True) as conn:
            parent = resource_row(conn, resource, lock="share")
            login = account_row(conn, resource, account, lock="share")
            session_id = new_id()
            row = {
                "id": session_id,
                "requester": requester,
                "resource_name": resource,
                "account_name": account,
                "database": parent.database,
                "username": login.username
                if login.template_role is None
                else ephemeral_role_name(requester, session_id),
                "listen_host": listen_host,
                "listen_port": None,
                "started_at": started,
                "expires_at": expires,
                **asked,
                "gateway_id": gateway_id,
            }
            sealed = seal(self._chain, "sessions", "start", row["id"], row, SESSION_START)
            held = {
                "holder_id": gateway_id,
                "client_public_key": client_public_key,
                "idle_timeout_seconds": idle_timeout_seconds,
                "idle_policy": idle_policy,
            }
            conn.execute(sessions.insert().values({**row, **held, "start_seal": sealed}))
        return AccessSession.model_validate(row | held)

    def set_session_port(self, session_id: str, port: int) -> None:
        """Record the local port the session's listener is bound to."""
        check_port("port", port)
        with self._transaction(write=True) as conn:
            result = conn.execute(
                sessions.update().where(sessions.c.id == session_id).values(listen_port=port)
            )
            if result.rowcount == 0:
                raise NotFound(f"session '{session_id}' not found")

    def extend_session(
        self, session_id: str, *, expires_at: datetime, previous: datetime | None = None
    ) -> AccessSession:
        """Move a live session's expiry to *expires_at* (later than the current
        one), re-sealing its start seal in the same statement, so the seal
        covers the new expiry and a hand edit of ``expires_at`` still shows.
        With *previous*, refused unless the current expiry is still that one
        (another gateway's extension landed meanwhile: not overwritten)."""
        expires = check_time("expires_at", expires_at)
        with self._transaction(write=True) as conn:
            current = session_row(conn, session_id, lock="update")
            if current.ended_at is not None:
                raise InvalidRequest(
                    f"access session {session_id[:8]} is not live (it ended: {current.end_reason})"
                )
            if previous is not None and current.expires_at != check_time("previous", previous):
                raise InvalidRequest(
                    f"access session {session_id[:8]} was extended meanwhile",
                    hint="see its new expiry (`pam sessions show`), then extend again if needed",
                )
            if expires <= current.expires_at:
                raise InvalidRequest("an extension must move expires_at later")
            row = {**current._mapping, "expires_at": expires}
            sealed = seal(self._chain, "sessions", "start", session_id, row, SESSION_START)
            conn.execute(
                sessions.update()
                .where(sessions.c.id == session_id, sessions.c.ended_at.is_(None))
                .values(expires_at=expires, start_seal=sealed)
            )
            announce(conn, ChangeTopic.SESSION, session_id)
            return session_of(session_row(conn, session_id))

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
        check_reason("session", reason, SESSION_END_REASONS)
        check_text("detail", detail, required=False)
        ended = self._now() if ended_at is None else check_time("ended_at", ended_at)
        with self._transaction(write=True) as conn:
            # The row lock keeps appends out while the seal is computed.
            current = session_row(conn, session_id, lock="update")
            if current.ended_at is None:
                self._end_row(conn, session_id, ended, reason, detail)
            return session_of(session_row(conn, session_id))

    def get_session(self, session_id: str) -> AccessSession:
        """A session by full id, or by a unique prefix of at least 6 characters."""
        with self._transaction(write=False) as conn:
            return session_of(session_row(conn, resolve_session_id(conn, session_id)))

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
        visible_to: tuple[str, frozenset[str]] | None = None,
        project: str | None = None,
        end_reason: str | None = None,
        has_errors: bool | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[AccessSession]:
        """Sessions, newest first (by start, then id).

        *active* selects only active (True) or ended (False) sessions; *resource*,
        *account*, *requester*, *project* and *end_reason* match exactly; *since*
        (inclusive) and *until* (exclusive) bound ``started_at``. *visible_to*
        (principal id, projects) keeps the principal's own sessions and those of
        the projects (a session from before projects counts as ``default``'s).
        *has_errors* keeps the sessions with (True) or without (False) a failed
        statement (:data:`~gateway.store.batches.FAILED_STATUS_BYTES`). *before*
        (started_at, id), the last row of the previous page, is a keyed cursor:
        only the sessions after it in this order.
        """
        check_limit(limit)
        since = check_optional_time("since", since)
        until = check_optional_time("until", until)
        if end_reason is not None:
            check_reason("session", end_reason, SESSION_END_REASONS)
        query = select(sessions).order_by(sessions.c.started_at.desc(), sessions.c.id.desc())
        if project is not None:
            query = query.where(func.coalesce(sessions.c.project, DEFAULT_PROJECT) == project)
        if end_reason is not None:
            query = query.where(sessions.c.end_reason == end_reason)
        if before is not None:
            at, last_id = check_time("before", before[0]), before[1]
            query = query.where(
                or_(
                    sessions.c.started_at < at,
                    and_(sessions.c.started_at == at, sessions.c.id < last_id),
                )
            )
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
        if visible_to is not None:
            principal_id, projects = visible_to
            query = query.where(
                or_(
                    sessions.c.principal_id == principal_id,
                    func.coalesce(sessions.c.project, DEFAULT_PROJECT).in_(sorted(projects)),
                )
            )
        with self._transaction(write=False) as conn:
            if has_errors is not None:
                failed = or_(
                    holds_failed_statement(conn, sessions.c.id),
                    exists().where(
                        audit_events.c.session_id == sessions.c.id,
                        audit_events.c.kind == "statement",
                        audit_events.c.status == "error",
                    ),
                )
                query = query.where(failed if has_errors else ~failed)
            return [session_of(r) for r in conn.execute(query.limit(limit))]

    def close_orphans(
        self, gateway_id: str, *, starting: bool = False, ended: list[str] | None = None
    ) -> int:
        """End the open sessions of gone gateways as ``gateway_crash``, with their
        open connections; returns how many sessions this call ended, and appends
        their ids to *ended* if given (their webhooks are told).

        A session is its holder's (``holder_id``: the gateway that opened it, or
        the one that took it over since). A gateway is gone when its presence
        lease (``gateway/<id>``) has lapsed
        or is not there (a session from before revision 0017 has no gateway and
        counts as a gone one's). *gateway_id* is the caller's: with *starting*
        (the caller's own start-up) its own sessions count as gone too, left by
        its previous run; otherwise they are left alone like any live gateway's.
        Each session ends at its gateway's last lease renewal (the last time it
        was known alive), not now; at its start if it started after that, and now
        when the gateway has no lease. Each audit trail is sealed as it stands.

        One transaction. The gone gateways' lease rows are locked (in name order)
        before their sessions, so a gateway coming back cannot renew in between,
        and every end is conditional (``WHERE ended_at IS NULL``): two gateways
        recovering at once end each session once. A live gateway's rows are
        neither read for update nor written.
        """
        required_text("gateway_id", gateway_id)
        now = self._now()
        with self._transaction(write=True) as conn:
            owners = set(
                conn.execute(
                    select(sessions.c.holder_id).where(sessions.c.ended_at.is_(None)).distinct()
                ).scalars()
            )
            if not starting:
                # The caller is alive: its own sessions are never a gone
                # gateway's, even when a renewal stalled past the lease (taken
                # with a start time from before the stall) left its row expired.
                owners.discard(gateway_id)
            restarting = gateway_id if starting else None
            gone = self._gone_gateways(conn, owners, restarting, now, lock=False)
            if not gone:
                return 0
            # Again over the candidates' lease rows, locked: one renewed since is live.
            gone = self._gone_gateways(conn, set(gone), restarting, now, lock=True)
            if not gone:
                return 0
            known = [g for g in gone if g is not None]
            whose: ColumnElement[bool] = sessions.c.holder_id.in_(known)
            if None in gone:
                whose = or_(whose, sessions.c.holder_id.is_(None))
            orphans = conn.execute(
                select(sessions.c.id, sessions.c.holder_id, sessions.c.started_at)
                .where(sessions.c.ended_at.is_(None), whose)
                .order_by(sessions.c.id)
                .with_for_update()
            ).all()
            closed = 0
            for orphan in orphans:
                last_seen = gone[orphan.holder_id] or now
                if self._end_row(
                    conn,
                    orphan.id,
                    max(last_seen, orphan.started_at),
                    SessionEndReason.GATEWAY_CRASH,
                    None,
                ):
                    closed += 1
                    if ended is not None:
                        ended.append(orphan.id)
            return closed

    @staticmethod
    def _gone_gateways(
        conn: Connection,
        owners: set[str | None],
        restarting: str | None,
        now: datetime,
        *,
        lock: bool,
    ) -> dict[str | None, datetime | None]:
        """Which of *owners* (gateway ids of open sessions) are gone, each with its
        last lease renewal (None when unknown); with *lock*, their lease rows
        are locked, in name order (two recoveries at once cannot deadlock)."""
        gone: dict[str | None, datetime | None] = {}
        if None in owners:
            gone[None] = None
        names = {presence_lease(g): g for g in owners if g is not None}
        if not names:
            return gone
        query = (
            select(leases.c.name, leases.c.holder, leases.c.expires_at, leases.c.renewed_at)
            .where(leases.c.name.in_(sorted(names)))
            .order_by(leases.c.name)
        )
        rows = {row.name: row for row in conn.execute(query.with_for_update() if lock else query)}
        for name, owner in names.items():
            row = rows.get(name)
            if row is None or row.holder != owner:
                gone[owner] = None
            elif row.expires_at <= now or owner == restarting:
                gone[owner] = row.renewed_at
        return gone

    def _end_row(
        self, conn: Connection, session_id: str, ended: datetime, reason: str, detail: str | None
    ) -> bool:
        """End one session row and its open connections, sealing its end and its
        trail; False (and nothing written) when it had ended already.

        "WHERE ended_at IS NULL" makes the first end win, even against a
        concurrent caller. Its open connections end at the session's end (or
        their start, if later), with the reason
        :data:`~gateway.reasons.CONNECTION_REASON_AT_SESSION_END` maps *reason*
        to.
        """
        end = {
            "ended_at": ended,
            "end_reason": reason,
            "end_detail": detail,
            "connection_count": _connection_count(conn, session_id),
        }
        done = conn.execute(
            sessions.update()
            .where(sessions.c.id == session_id, sessions.c.ended_at.is_(None))
            .values(
                ended_at=end["ended_at"],
                end_reason=end["end_reason"],
                end_detail=end["end_detail"],
                end_seal=seal(self._chain, "sessions", "end", session_id, end, SESSION_END),
                **self._seal_values(session_id, self._chain_head(conn, session_id)),
            )
            .returning(sessions.c.id)
        ).first()
        if done is None:
            return False
        announce(conn, ChangeTopic.SESSION, session_id)
        self._end_open_connections(
            conn,
            connections.c.session_id == session_id,
            ended,
            CONNECTION_REASON_AT_SESSION_END[SessionEndReason(reason)],
        )
        return True

    def _end_open_connections(
        self, conn: Connection, where: ColumnElement[bool], ended: datetime, reason: str
    ) -> None:
        """End the open connections *where* selects (a session's, or every one),
        each with its end seal; byte counts stay as they are (unknown)."""
        open_ids = (
            conn.execute(select(connections.c.id).where(where, connections.c.ended_at.is_(None)))
            .scalars()
            .all()
        )
        for connection_id in open_ids:
            row = conn.execute(select(connections).where(connections.c.id == connection_id)).one()
            # Never before it started (a crash's end is the gateway's last renewal).
            at = max(ended, row.started_at)
            end = {**row._mapping, "ended_at": at, "end_reason": reason}
            conn.execute(
                connections.update()
                .where(connections.c.id == connection_id, connections.c.ended_at.is_(None))
                .values(
                    ended_at=at,
                    end_reason=reason,
                    end_seal=seal(
                        self._chain, "connections", "end", connection_id, end, CONNECTION_END
                    ),
                )
            )
