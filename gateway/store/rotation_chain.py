"""Tamper evidence for the rotation record: one keyed hash chain over every rotation.

The ``rotations`` table refuses UPDATE and DELETE by trigger (revision 0014);
someone who can drop a trigger, or write the file, still could. So every entry
also carries (revision 0015) its place in one chain for the whole gateway, as
the access trail does (:mod:`gateway.store.requests`): ``seq`` (1, 2, 3, ...),
the hash of the entry before it (``prev_hash``) and its own ``hash``, an HMAC
under the audit key (:meth:`gateway.audit.chain.AuditChain.rotation_hash`) over
its seq, that previous hash and every field of the row. The chain's length and
last hash are sealed in ``rotation_head`` (one row), moved in the transaction
that appends.

Invariants:

* An entry is appended only with the head row locked (``SELECT ... FOR
  UPDATE``; SQLite's write transaction is exclusive anyway), so gateways sharing
  a store chain one after another and seq has no gap and no repeat.
* :func:`rotation_problems` names what it finds by seq and account, in the
  words ``pam audit verify`` prints: an edited entry (its hash no longer
  matches), a removed one (a gap in seq), entries cut off the end (the sealed
  head says more), a seal that was removed from a row written after the first
  sealed one, and an edited or removed head.
* Entries from before revision 0015 have no seq and are not covered: the key
  is not in the database, so the migration could not seal them.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, insert, select, update

from gateway.audit.chain import GENESIS_HASH, ROTATION_RECORD, AuditChain, is_same_digest
from gateway.audit.verify import ChainProblem, ChainProblemKind
from gateway.credentials.records import RotationEntry
from gateway.store.schema import rotation_head, rotations

__all__ = ["append_rotation", "rotation_problems"]

#: the one row of ``rotation_head``
_HEAD_ID: Final = 1


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _covered(row: Any) -> list[Any]:
    """The fields an entry's hash covers, in this order (a row or its values)."""
    return [
        row["rotation_id"],
        row["account_id"],
        row["resource_name"],
        row["account_name"],
        row["username"],
        row["method"],
        row["via"],
        row["started_by"],
        _iso(row["started_at"]),
        _iso(row["ended_at"]),
        row["outcome"],
        row["detail"],
        row["gateway_id"],
    ]


def append_rotation(
    chain: AuditChain, conn: Connection, account_id: str, entry: RotationEntry
) -> RotationEntry:
    """Append *entry* to the record and the chain, in *conn*'s transaction;
    returns it with its seq."""
    head = conn.execute(
        select(rotation_head).where(rotation_head.c.id == _HEAD_ID).with_for_update()
    ).one()
    seq, prev = int(head._mapping["count"]) + 1, str(head.head)
    values: dict[str, Any] = {
        "rotation_id": entry.rotation_id,
        "account_id": account_id,
        "resource_name": entry.resource,
        "account_name": entry.account,
        "username": entry.username,
        "method": entry.method,
        "via": entry.via,
        "started_by": entry.started_by,
        "started_at": entry.started_at,
        "ended_at": entry.ended_at,
        "outcome": entry.outcome,
        "detail": entry.detail,
        "gateway_id": entry.gateway_id,
        "seq": seq,
        "prev_hash": prev,
    }
    values["hash"] = chain.rotation_hash(seq, prev, _covered(values))
    conn.execute(insert(rotations).values(**values))
    conn.execute(
        update(rotation_head)
        .where(rotation_head.c.id == _HEAD_ID)
        .values(
            count=seq, head=values["hash"], seal=chain.seal(ROTATION_RECORD, seq, values["hash"])
        )
    )
    return dataclasses.replace(entry, seq=seq)


def _is_intact(chain: AuditChain, row: Any) -> bool:
    """Whether a rotation record's hash verifies (under any master key
    version's audit key: the record may span a rotation)."""
    covered = _covered(row._mapping)
    seq, prev = row.seq, row.prev_hash or ""
    return chain.verifies(lambda key: key.rotation_hash(seq, prev, covered), row.hash or "")


def rotation_problems(chain: AuditChain, conn: Connection) -> list[ChainProblem]:
    """Recompute the rotation record's chain and check its sealed head; every
    problem found (``session_id`` is :data:`~gateway.audit.chain.ROTATION_RECORD`)."""
    problems: list[ChainProblem] = []

    def problem(seq: int | None, kind: ChainProblemKind, detail: str) -> None:
        problems.append(
            ChainProblem(session_id=ROTATION_RECORD, seq=seq, problem=kind, detail=detail)
        )

    first_sealed_id: int | None = None
    sealed = []
    for row in conn.execute(select(rotations).order_by(rotations.c.id)):
        if row.seq is not None:
            first_sealed_id = row.id if first_sealed_id is None else first_sealed_id
            sealed.append(row)
        elif first_sealed_id is not None:
            # Written after sealing began, so it had a seal: someone took it off.
            problem(
                None,
                "changed",
                f"a rotation record of {row.resource_name}/{row.account_name} (rotation"
                f" {row.rotation_id[:8]}, ended {_iso(row.ended_at)}) was edited: its seal"
                " was removed",
            )
    expected, prev = 1, GENESIS_HASH
    for row in sorted(sealed, key=lambda r: r.seq):
        what = f"rotation record {row.seq} of {row.resource_name}/{row.account_name}"
        if row.seq != expected:
            gap = (
                f"rotation record {expected} was"
                if row.seq == expected + 1
                else f"rotation records {expected}..{row.seq - 1} were"
            )
            problem(expected, "removed", f"{gap} removed")
        elif not is_same_digest(row.prev_hash or "", prev):
            problem(row.seq, "reordered", f"{what} does not follow the record before it")
        if not _is_intact(chain, row):
            problem(row.seq, "changed", f"{what} was edited")
        expected, prev = row.seq + 1, row.hash or ""
    count = expected - 1
    head = conn.execute(
        select(
            rotation_head.c.count.label("length"), rotation_head.c.head, rotation_head.c.seal
        ).where(rotation_head.c.id == _HEAD_ID)
    ).one_or_none()
    if head is None:
        problem(None, "seal", "the rotation record's sealed head was removed")
    elif head.length == 0 and count == 0:
        pass
    elif head.seal is None or not chain.is_valid_seal(
        ROTATION_RECORD, head.length, head.head, head.seal
    ):
        problem(None, "seal", "the rotation record's sealed head was edited")
    elif head.length > count:
        cut = (
            f"rotation record {head.length} was"
            if head.length == count + 1
            else f"rotation records {count + 1}..{head.length} were"
        )
        problem(count + 1, "truncated", f"{cut} cut off the end")
    elif head.length < count or not is_same_digest(head.head, prev):
        problem(None, "seal", "the rotation record does not end where its seal says")
    return problems
