"""Shared by the audit trail tests: writing trails of earlier chain versions by
hand, and tampering with sealed batches the way an intruder with write access to
the database would (raw SQL, after dropping the append-only triggers).

An intruder does not hold the audit key: every edit here changes stored bytes
and leaves the digests and MACs as they were.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import Connection, Engine, text

from gateway.audit.batch import BODY_FIELDS, decode_records, encoded_records
from gateway.audit.chain import GENESIS_HASH, RECORD_DIGEST_BYTES, AuditChain, canonical_json
from gateway.audit.records import AuditEvent, event_rows, micros_datetime

_HEAD = ("seq", "kind", "occurred_at", "connection_id")


def drop_triggers(conn: Connection) -> None:
    """Drop the append-only triggers of both trail tables."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update_delete ON audit_events"))
        conn.execute(text("DROP TRIGGER IF EXISTS audit_batches_no_update_delete ON audit_batches"))
    else:
        for table in ("audit_events", "audit_batches"):
            conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_update"))
            conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_delete"))


def append_version_2(
    raw: Engine, chain: AuditChain, events: list[AuditEvent], *, seq: int = 0, prev: str = ""
) -> tuple[int, str]:
    """Write *events* (one session) as rows of chain version 2, as the store did
    before version 3; returns the new (seq, hash) head."""
    prev = prev or GENESIS_HASH
    with raw.begin() as conn:
        postgres = conn.dialect.name == "postgresql"
        for event, row in zip(events, event_rows(events), strict=True):
            seq += 1
            params = row[8]
            values = [
                *row[:3],
                micros_datetime(row[3]).isoformat(timespec="microseconds"),
                *row[4:8],
                None
                if params is None
                else canonical_json(
                    [
                        {"index": i, "type_oid": o, "format": f, "value": v, "truncated": t}
                        for i, o, f, v, t in params
                    ]
                ),
                *row[9:14],
                None if row[14] is None else float(row[14]),
                row[15],
                row[16],
                None if row[17] is None else canonical_json(row[17]),
            ]
            digest = chain.row_hash(prev, seq, values)
            at = event.occurred_at if postgres else values[3]
            conn.execute(
                text(
                    "INSERT INTO audit_events (session_id, connection_id, kind, occurred_at,"
                    " protocol, sql, statement_name, portal_name, parameters, command_tag,"
                    " rows, status, sqlstate, error_message, duration_ms, copy_direction,"
                    " copy_bytes, detail, seq, recorded_at, prev_hash, hash, chain_version)"
                    " VALUES (:v0, :v1, :v2, :at, :v4, :v5, :v6, :v7, :v8, :v9, :v10, :v11,"
                    " :v12, :v13, :v14, :v15, :v16, :v17, :seq, :at, :prev, :hash, 2)"
                ),
                {
                    **{f"v{n}": value for n, value in enumerate(values)},
                    "at": at,
                    "seq": seq,
                    "prev": prev,
                    "hash": digest,
                },
            )
            prev = digest
    return seq, prev


def _batch_of(conn: Connection, session_id: str, seq: int) -> Any:
    return conn.execute(
        text(
            "SELECT id, first_seq, records, digests FROM audit_batches"
            " WHERE session_id = :sid AND first_seq <= :seq AND last_seq >= :seq"
        ),
        {"sid": session_id, "seq": seq},
    ).one()


def _store(conn: Connection, batch_id: int, records: list[list[Any]], digests: bytes) -> None:
    conn.execute(
        text("UPDATE audit_batches SET records = :r, digests = :d WHERE id = :id"),
        {"r": msgspec.msgpack.encode(records), "d": digests, "id": batch_id},
    )


def edit_record(raw: Engine, session_id: str, which: int, **changes: Any) -> None:
    """Change fields of record seq *which* inside its batch (digests untouched)."""
    with raw.begin() as conn:
        drop_triggers(conn)
        batch = _batch_of(conn, session_id, which)
        records = decode_records(bytes(batch.records))
        for record in records:
            if record[0] == which:
                names = (*_HEAD, *BODY_FIELDS[record[1]])
                for name, value in changes.items():
                    record[names.index(name)] = value
        _store(conn, batch.id, records, bytes(batch.digests))


def delete_record(raw: Engine, session_id: str, seq: int, *, digest_too: bool = True) -> None:
    """Remove record *seq* from its batch (and its digest, unless told not to)."""
    with raw.begin() as conn:
        drop_triggers(conn)
        batch = _batch_of(conn, session_id, seq)
        records = decode_records(bytes(batch.records))
        index = [r[0] for r in records].index(seq)
        del records[index]
        digests = bytes(batch.digests)
        if digest_too:
            size = RECORD_DIGEST_BYTES
            digests = digests[: index * size] + digests[(index + 1) * size :]
        _store(conn, batch.id, records, digests)


def swap_records(raw: Engine, session_id: str, first: int, second: int) -> None:
    """Swap two records' places in their batch (each keeps its seq and digest slot)."""
    with raw.begin() as conn:
        drop_triggers(conn)
        batch = _batch_of(conn, session_id, first)
        parts = encoded_records(bytes(batch.records))
        seqs = [r[0] for r in decode_records(bytes(batch.records))]
        a, b = seqs.index(first), seqs.index(second)
        parts[a], parts[b] = parts[b], parts[a]
        raws = [msgspec.Raw(part) for part in parts]
        conn.execute(
            text("UPDATE audit_batches SET records = :r WHERE id = :id"),
            {"r": msgspec.msgpack.encode(raws), "id": batch.id},
        )


def set_batch_column(raw: Engine, session_id: str, seq: int, column: str, value: Any) -> None:
    """Set a column of the batch that holds record *seq*."""
    with raw.begin() as conn:
        drop_triggers(conn)
        batch = _batch_of(conn, session_id, seq)
        conn.execute(
            text(f"UPDATE audit_batches SET {column} = :v WHERE id = :id"),
            {"v": value, "id": batch.id},
        )
