"""Access requests and the access trail: the record of every request's state changes.

Implements :class:`gateway.access.approvals.RequestStore`.

Invariants:

* A request's state and the trail record of the change that led to it are
  written in one transaction: there is never a state without its record, nor a
  record without its state.
* A transition is written only over the version it was computed from
  (compare-and-set on ``version``); a request changed meanwhile (another
  approver, another gateway) refuses the write, and nothing is written.
* The access trail is one keyed hash chain for the whole gateway
  (:meth:`gateway.audit.chain.AuditChain.access_event_hash`): record ``seq``
  covers its fields, its seq and the hash of record ``seq - 1``. Its sealed head
  (``access_event_head``: count, last hash, HMAC) is moved in the same
  transaction, and appends lock it, so gateways sharing a PostgreSQL store
  chain one after another and records cut off the end show.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, insert, or_, select, update

from gateway.access.requests import AccessRequest, Approval, RequestState, StateChange
from gateway.audit.chain import ACCESS_TRAIL, GENESIS_HASH, canonical_json, is_same_digest
from gateway.audit.verify import ChainProblem
from gateway.errors import InvalidRequest, NotFound
from gateway.store.engine import StoreBase
from gateway.store.rows import resolve_id
from gateway.store.schema import access_event_head, access_events, access_requests
from gateway.store.validation import check_limit, check_time

__all__ = ["AccessTrailRecord", "RequestStore"]

#: the one row of ``access_event_head``
_HEAD_ID: Final = 1


class AccessTrailRecord:
    """A stored record of the access trail."""

    __slots__ = ("actor", "at", "detail", "kind", "request_id", "seq", "state")

    def __init__(self, row: Any) -> None:
        self.seq: int = row.seq
        self.request_id: str = row.request_id
        self.kind: str = row.kind
        self.actor: str = row.actor
        self.at: datetime = row.occurred_at
        self.state: str = row.state
        self.detail: dict[str, Any] = json.loads(row.detail)


class RequestStore(StoreBase):
    def create_request(
        self, request: AccessRequest, changes: Sequence[StateChange]
    ) -> AccessRequest:
        """Insert *request* and append *changes* to the trail, in one transaction."""
        with self._transaction(write=True) as conn:
            conn.execute(insert(access_requests).values(**_values(request)))
            self._append(conn, changes)
        return request

    def save_transition(
        self, after: AccessRequest, change: StateChange, *, expected_version: int
    ) -> AccessRequest:
        """Write *after* over the row still at *expected_version* and append
        *change*; refused when the request changed meanwhile."""
        values = _values(after)
        del values["id"]
        with self._transaction(write=True) as conn:
            done = conn.execute(
                update(access_requests)
                .where(access_requests.c.id == after.id)
                .where(access_requests.c.version == expected_version)
                .values(**values)
            )
            if done.rowcount != 1:
                raise InvalidRequest(
                    f"request {after.id[:8]} changed while this was decided",
                    hint="look at it again with `pam requests show` and retry",
                )
            self._append(conn, [change])
        return after

    def get_request(self, request_id: str) -> AccessRequest:
        """A request by full id, or by a unique prefix of at least 6 characters."""
        with self._transaction(write=False) as conn:
            full = resolve_id(conn, access_requests.c.id, "request", request_id)
            row = conn.execute(
                select(access_requests).where(access_requests.c.id == full)
            ).one_or_none()
        if row is None:
            raise NotFound(f"request '{request_id}' not found")
        return _request(row)

    def list_requests(
        self,
        *,
        states: Sequence[RequestState] | None = None,
        requester_id: str | None = None,
        projects: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[AccessRequest]:
        """Requests, newest first; *projects* None means every project."""
        check_limit(limit)
        query = select(access_requests).order_by(
            access_requests.c.created_at.desc(), access_requests.c.id.desc()
        )
        if states:
            query = query.where(access_requests.c.state.in_([s.value for s in states]))
        if requester_id is not None:
            query = query.where(access_requests.c.requester_id == requester_id)
        if projects is not None:
            query = query.where(access_requests.c.project.in_(list(projects)))
        with self._transaction(write=False) as conn:
            return [_request(row) for row in conn.execute(query.limit(limit))]

    def due_requests(self, now: datetime) -> list[AccessRequest]:
        """Pending requests past their deadline, and approved ones not opened in time."""
        now = check_time("now", now)
        query = select(access_requests).where(
            or_(
                (access_requests.c.state == RequestState.PENDING.value)
                & (access_requests.c.expires_at <= now),
                (access_requests.c.state == RequestState.APPROVED.value)
                & (access_requests.c.use_by <= now),
            )
        )
        with self._transaction(write=False) as conn:
            return [_request(row) for row in conn.execute(query)]

    def access_trail(
        self, *, request_id: str | None = None, limit: int = 1000
    ) -> list[AccessTrailRecord]:
        """The access trail's records, oldest first (of one request, or all)."""
        check_limit(limit)
        query = select(access_events).order_by(access_events.c.seq)
        with self._transaction(write=False) as conn:
            if request_id is not None:
                full = resolve_id(conn, access_requests.c.id, "request", request_id)
                query = query.where(access_events.c.request_id == full)
            return [AccessTrailRecord(row) for row in conn.execute(query.limit(limit))]

    def verify_access_trail(self) -> list[ChainProblem]:
        """Recompute the access trail's chain and check its sealed head; every
        problem found, each naming the record (``session_id`` is
        :data:`~gateway.audit.chain.ACCESS_TRAIL`)."""
        problems: list[ChainProblem] = []

        def problem(seq: int | None, kind: Any, detail: str) -> None:
            problems.append(
                ChainProblem(session_id=ACCESS_TRAIL, seq=seq, problem=kind, detail=detail)
            )

        with self._transaction(write=False, snapshot=True) as conn:
            expected_seq, prev = 1, GENESIS_HASH
            for row in conn.execute(select(access_events).order_by(access_events.c.seq)):
                if row.seq != expected_seq:
                    problem(
                        expected_seq,
                        "removed",
                        f"records {expected_seq}..{row.seq - 1} are missing",
                    )
                what = f"seq {row.seq} ({row.kind} of request {row.request_id[:8]})"
                if not is_same_digest(row.prev_hash, prev):
                    problem(row.seq, "reordered", f"{what} does not follow the record before it")
                if not self._is_event_intact(row):
                    problem(row.seq, "changed", f"{what} was edited")
                expected_seq, prev = row.seq + 1, row.hash
            head = conn.execute(
                select(
                    access_event_head.c.count.label("length"),
                    access_event_head.c.head,
                    access_event_head.c.seal,
                )
            ).one_or_none()
        count = expected_seq - 1
        if head is None:
            problem(None, "seal", "the access trail's sealed head was removed")
        elif head.length == 0 and count == 0:
            pass
        elif head.seal is None or not self._chain.is_valid_seal(
            ACCESS_TRAIL, head.length, head.head, head.seal
        ):
            problem(None, "seal", "the access trail's sealed head was edited")
        elif head.length > count:
            problem(
                count + 1, "truncated", f"records {count + 1}..{head.length} were cut off the end"
            )
        elif head.length < count or not is_same_digest(head.head, prev):
            problem(None, "seal", "the access trail does not end where its seal says")
        return problems

    # -- appending -------------------------------------------------------------

    def _append(self, conn: Connection, changes: Sequence[StateChange]) -> None:
        head = conn.execute(
            select(access_event_head).where(access_event_head.c.id == _HEAD_ID).with_for_update()
        ).one()
        seq, prev = int(head._mapping["count"]), str(head.head)
        rows = []
        for change in changes:
            seq += 1
            row: dict[str, Any] = {
                "seq": seq,
                "request_id": change.request_id,
                "kind": change.kind.value,
                "actor": change.actor,
                "occurred_at": check_time("occurred_at", change.at),
                "state": change.state.value,
                "detail": canonical_json(change.detail),
                "prev_hash": prev,
            }
            row["hash"] = self._chain.access_event_hash(seq, prev, _covered(row))
            prev = row["hash"]
            rows.append(row)
        if not rows:
            return
        conn.execute(insert(access_events), rows)
        conn.execute(
            update(access_event_head)
            .where(access_event_head.c.id == _HEAD_ID)
            .values(count=seq, head=prev, seal=self._chain.seal(ACCESS_TRAIL, seq, prev))
        )

    def _is_event_intact(self, row: Any) -> bool:
        """Whether *row*'s hash verifies (under the audit key of any master key
        version: the trail may span a rotation)."""
        covered = _covered(row._mapping)
        return self._chain.verifies(
            lambda chain: chain.access_event_hash(row.seq, row.prev_hash, covered), row.hash
        )


def _covered(row: Any) -> list[Any]:
    """The fields a record's hash covers, as the chain spells them."""
    at = row["occurred_at"]
    return [
        row["request_id"],
        row["kind"],
        row["actor"],
        at.astimezone(UTC).isoformat(timespec="microseconds"),
        row["state"],
        row["detail"],
    ]


def _values(request: AccessRequest) -> dict[str, Any]:
    return {
        "id": request.id,
        "project": request.project,
        "requester_id": request.requester_id,
        "requester": request.requester,
        "resource_name": request.resource,
        "account_name": request.account,
        "duration_seconds": request.duration_seconds,
        "reason": request.reason,
        "policy_name": request.policy_name,
        "approvals_required": request.approvals_required,
        "approvers": json.dumps(list(request.approvers)),
        "break_glass": int(request.break_glass),
        "state": request.state.value,
        "created_at": check_time("created_at", request.created_at),
        "expires_at": check_time("expires_at", request.expires_at),
        "open_within_seconds": request.open_within_seconds,
        "approvals": json.dumps(
            [
                {"by_id": a.by_id, "by": a.by, "at": a.at.isoformat(), "comment": a.comment}
                for a in request.approvals
            ]
        ),
        "approved_at": request.approved_at,
        "use_by": request.use_by,
        "decided_by": request.decided_by,
        "decision_note": request.decision_note,
        "session_id": request.session_id,
        "extends": int(request.extends),
        "version": request.version,
    }


def _request(row: Any) -> AccessRequest:
    return AccessRequest(
        id=row.id,
        project=row.project,
        requester_id=row.requester_id,
        requester=row.requester,
        resource=row.resource_name,
        account=row.account_name,
        duration_seconds=row.duration_seconds,
        reason=row.reason,
        policy_name=row.policy_name,
        approvals_required=row.approvals_required,
        approvers=tuple(json.loads(row.approvers)),
        created_at=row.created_at,
        expires_at=row.expires_at,
        open_within_seconds=row.open_within_seconds,
        state=RequestState(row.state),
        break_glass=bool(row.break_glass),
        approvals=tuple(
            Approval(a["by_id"], a["by"], datetime.fromisoformat(a["at"]), a["comment"])
            for a in json.loads(row.approvals)
        ),
        approved_at=row.approved_at,
        use_by=row.use_by,
        decided_by=row.decided_by,
        decision_note=row.decision_note,
        session_id=row.session_id,
        extends=bool(row.extends),
        version=row.version,
    )
