"""The refusal record: refused API calls and grant connections, and their counts.

Implements :class:`gateway.audit.refusals.RefusalLog`. Also answers, for a
refused API call, whose a token was and why it no longer counts
(:meth:`RefusalStore.token_standing`), so the record names who tried.

Invariants:

* Append-only: rows are inserted, never updated or deleted (triggers refuse it).
* A batch is one transaction and never refused for its content: what came from
  outside (a user name given to ``pam login``) is cut to a bounded length and
  freed of NUL characters, so one odd refusal cannot lose the others' counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

from sqlalchemy import insert, select

from gateway.audit.refusals import RefusalEntry
from gateway.store.engine import StoreBase
from gateway.store.schema import principals, refusals, tokens
from gateway.store.validation import check_time

__all__ = ["RefusalStore"]

#: longest text kept in a refusal's columns (a message, a claimed user name)
_MAX_TEXT: Final = 1000
#: most rows one read returns
MAX_REFUSALS_PAGE: Final = 10_000


def _clean(value: str | None, limit: int = _MAX_TEXT) -> str | None:
    if value is None:
        return None
    return value.replace("\x00", "\ufffd")[:limit]


class RefusalStore(StoreBase):
    def add_refusals(self, entries: Sequence[RefusalEntry]) -> int:
        """Append *entries* in one transaction; returns how many were written."""
        if not entries:
            return 0
        now = self._now()
        rows = [
            {
                "first_at": check_time("first_at", e.first_at),
                "last_at": check_time("last_at", e.last_at),
                "place": e.place[:16],
                "session_id": _clean(e.session_id, 32),
                "source_addr": _clean(e.source) or "unknown",
                "who": _clean(e.who),
                "reason": e.reason[:32],
                "message": _clean(e.message) or "",
                "count": max(1, e.count),
                "recorded_at": now,
            }
            for e in entries
        ]
        with self._transaction(write=True) as conn:
            conn.execute(insert(refusals), rows)
        return len(rows)

    def refusals(self, *, since: datetime | None = None, limit: int = 1000) -> list[RefusalEntry]:
        """Refusal records whose last occurrence is at or after *since*, newest first."""
        query = select(refusals).order_by(refusals.c.last_at.desc(), refusals.c.id.desc())
        if since is not None:
            query = query.where(refusals.c.last_at >= check_time("since", since))
        query = query.limit(max(1, min(limit, MAX_REFUSALS_PAGE)))
        with self._transaction(write=False) as conn:
            rows = conn.execute(query).all()
        return [
            RefusalEntry(
                first_at=row.first_at,
                last_at=row.last_at,
                place=row.place,
                reason=row.reason,
                message=row.message,
                source=row.source_addr,
                who=row.who,
                session_id=row.session_id,
                count=row._mapping["count"],  # Row.count is a tuple method
            )
            for row in rows
        ]

    def token_standing(self, digest: str, *, now: datetime) -> tuple[str, str] | None:
        """Whose token *digest* is and why it does not count: ``revoked``,
        ``disabled``, ``expired`` (or ``live``); None for a token never issued."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                select(
                    principals.c.name,
                    principals.c.disabled_at,
                    tokens.c.revoked_at,
                    tokens.c.expires_at,
                )
                .join(principals, principals.c.id == tokens.c.principal_id)
                .where(tokens.c.digest == digest)
            ).first()
        if row is None:
            return None
        if row.disabled_at is not None:
            return row.name, "disabled"
        if row.revoked_at is not None:
            return row.name, "revoked"
        if row.expires_at is not None and row.expires_at <= now:
            return row.name, "expired"
        return row.name, "live"
