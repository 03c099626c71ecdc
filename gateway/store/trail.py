"""Where each session's audit chain continues, and the seal of an ended trail.

Role: shared by :mod:`gateway.store.sessions` (ending a session seals its trail)
and :mod:`gateway.store.audit` (appending chains each record to the one before
it, and re-seals an ended session's trail).

Invariants:

* The database's last record of a session is the truth; the heads this store
  remembers are a tripwire: when the database is behind them, rows this store
  wrote have disappeared, and chaining on from the remembered head keeps that
  visible to verify instead of papering over it. Forgetting a head is always safe.
* A remembered head only moves forward.
* A seal is (count, head hash, HMAC under the audit key), so that truncating a
  sealed trail shows.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import Connection, select

from gateway.audit.chain import GENESIS_HASH
from gateway.store.batches import batch_head
from gateway.store.engine import StoreBase
from gateway.store.schema import audit_events

__all__ = ["TrailStore"]


#: Sessions whose last (seq, hash) the store remembers. The memory is a
#: tripwire, not the source of truth (see TrailStore._chain_head), so forgetting the
#: least recently used is always safe.
_AUDIT_HEAD_CACHE_SIZE: Final = 4096


class TrailStore(StoreBase):
    """The audit trail's heads and seals (the state is set up by :class:`StoreBase`)."""

    def _chain_head(self, conn: Connection, session_id: str) -> tuple[int, str]:
        """(seq, hash) to chain the next record of *session_id* to.

        The database's last row is the truth when it is at or beyond what this
        store remembers: another process may have appended since. If it is
        behind, rows this store wrote have disappeared; chaining on from the
        remembered head keeps that visible (verify reports the gap) instead of
        papering over it.
        """
        stored = batch_head(conn, session_id)
        if stored is None:  # a trail begun before chain version 3, or none yet
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
