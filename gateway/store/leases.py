"""Leases: a name held by one gateway at a time, until it expires unless renewed.

Implements :class:`gateway.credentials.schedule.LeaseStore`. Gateways sharing a
store use them to take turns: the rotation scheduler runs on the gateway that
holds ``rotation-scheduler``, and each gateway holds ``gateway/<its id>`` while
it runs (its presence: recovery leaves the rotations of a present gateway alone).

Invariants:

* Taking or renewing a lease is one statement, atomic on SQLite and
  PostgreSQL alike: an upsert that writes only where the lease is free, expired,
  or already the caller's (``INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE``).
  Two gateways asking at once cannot both get it; the one whose statement
  returned no row did not.
* Releasing deletes the row only if the caller holds it.
* ``renewed_at`` is the holder's last take or renewal (revision 0017; NULL on
  a row from before it): a lapsed presence lease says when its gateway was last
  known alive, which is when crash recovery ends that gateway's sessions.
* Expiry is judged by the store's clock (the gateway's): gateways sharing a
  store need clocks that agree to well within a lease's length (NTP).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, case, delete, literal, select
from sqlalchemy.dialects import postgresql, sqlite

from gateway.errors import InvalidRequest
from gateway.store.engine import StoreBase
from gateway.store.schema import leases

__all__ = ["LeaseStore", "is_lease_held"]

#: longest lease name (the column's width)
_MAX_NAME = 128


def is_lease_held(conn: Connection, name: str, holder: str, now: datetime) -> bool:
    """Whether *holder* holds lease *name* at *now*, inside *conn*'s transaction."""
    row = conn.execute(
        select(leases.c.holder, leases.c.expires_at).where(leases.c.name == name)
    ).one_or_none()
    return row is not None and row.holder == holder and row.expires_at > now


class LeaseStore(StoreBase):
    def acquire_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take lease *name* for *holder* for *seconds*, or renew it if it is
        *holder*'s already; False when another holder's lease has not expired."""
        if not name or len(name) > _MAX_NAME or not holder:
            raise InvalidRequest("a lease needs a name (at most 128 characters) and a holder")
        if seconds <= 0:
            raise InvalidRequest("a lease lasts a positive time")
        with self._transaction(write=True) as conn:
            # The time once the store is in hand, not before: a call that waited
            # (for the store, or this process's lock) past *seconds* would write
            # a lease already lapsed, and other gateways would take a live one
            # for gone.
            now = self._now()
            values = {
                "name": name,
                "holder": holder,
                "acquired_at": now,
                "expires_at": now + timedelta(seconds=seconds),
                "renewed_at": now,
            }
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            statement = dialect.insert(leases).values(**values)
            free = (leases.c.holder == holder) | (leases.c.expires_at <= now)
            statement = statement.on_conflict_do_update(
                index_elements=[leases.c.name],
                set_={
                    "holder": statement.excluded.holder,
                    "expires_at": statement.excluded.expires_at,
                    "renewed_at": statement.excluded.renewed_at,
                    # A renewal keeps when the holder took it.
                    "acquired_at": _acquired_at(leases.c.holder == holder, now),
                },
                where=free,
            )
            # RETURNING, not rowcount: psycopg reports no row count for an upsert.
            return conn.execute(statement.returning(leases.c.name)).first() is not None

    def release_lease(self, name: str, holder: str) -> bool:
        """Give lease *name* up, if *holder* holds it; True when it did."""
        with self._transaction(write=True) as conn:
            done = conn.execute(
                delete(leases)
                .where(leases.c.name == name, leases.c.holder == holder)
                .returning(leases.c.name)
            )
            return done.first() is not None

    def lease_holders(self, prefix: str = "") -> dict[str, str]:
        """The holder of every unexpired lease whose name starts with *prefix*,
        by name."""
        now = self._now()
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                select(leases.c.name, leases.c.holder).where(
                    leases.c.expires_at > now, leases.c.name.startswith(prefix, autoescape=True)
                )
            ).all()
        return {row.name: row.holder for row in rows}


def _acquired_at(renewal: ColumnElement[bool], now: datetime) -> ColumnElement[datetime]:
    """``acquired_at`` in the upsert: kept on a renewal, *now* on a takeover."""
    return case((renewal, leases.c.acquired_at), else_=literal(now, leases.c.acquired_at.type))
