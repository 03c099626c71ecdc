"""Rotation schedules: each account's interval, next due time and failures in a row.

Implements :class:`gateway.credentials.schedule.ScheduleStore`.

Invariants:

* Setting a schedule is one statement on the account's row; turning it off
  clears the due time and the failure count with it.
* The scheduler changes a due time only over the one it read
  (:meth:`ScheduleStore.claim_rotation`, :meth:`ScheduleStore.reschedule_rotation`
  are compare-and-set on ``next_rotation_at``): a schedule set meanwhile wins,
  and two claims of one due time cannot both succeed.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update

from gateway.credentials.schedule import ScheduledRotation
from gateway.errors import InvalidRequest
from gateway.store.engine import StoreBase
from gateway.store.models import Account
from gateway.store.resources import account_record
from gateway.store.rows import ACCOUNTS_JOIN, account_row, last_rotations
from gateway.store.schema import accounts, resources
from gateway.store.validation import check_limit, check_time

__all__ = ["ScheduleStore"]


class ScheduleStore(StoreBase):
    def set_rotation_schedule(
        self,
        resource: str,
        account: str,
        interval_seconds: int | None,
        next_at: datetime | None = None,
    ) -> Account:
        """Rotate *account* every *interval_seconds*, first at *next_at*; None
        turns its schedule off."""
        if interval_seconds is not None:
            if interval_seconds <= 0:
                raise InvalidRequest("a rotation interval is a positive number of seconds")
            if next_at is None:
                raise InvalidRequest("a rotation schedule needs its first time")
            next_at = check_time("next_at", next_at)
        else:
            next_at = None
        with self._transaction(write=True) as conn:
            row = account_row(conn, resource, account, lock="update")
            if interval_seconds is not None and row.template_role is not None:
                raise InvalidRequest(
                    f"account '{account}' of resource '{resource}' is ephemeral: it has no"
                    " password to rotate (each grant gets a role of its own)"
                )
            conn.execute(
                update(accounts)
                .where(accounts.c.id == row.id)
                .values(
                    rotation_interval_seconds=interval_seconds,
                    next_rotation_at=next_at,
                    rotation_failures=0,
                )
            )
            row = account_row(conn, resource, account)
            return account_record(row, last_rotations(conn, [row.id]).get(row.id))

    def due_rotations(self, now: datetime, limit: int = 100) -> list[ScheduledRotation]:
        """Scheduled accounts due at *now*, the longest overdue first."""
        now = check_time("now", now)
        check_limit(limit)
        query = (
            select(
                resources.c.name.label("resource_name"),
                accounts.c.name,
                accounts.c.rotation_interval_seconds,
                accounts.c.next_rotation_at,
                accounts.c.rotation_failures,
            )
            .select_from(ACCOUNTS_JOIN)
            .where(
                accounts.c.rotation_interval_seconds.is_not(None),
                accounts.c.next_rotation_at <= now,
            )
            .order_by(accounts.c.next_rotation_at)
            .limit(limit)
        )
        with self._transaction(write=False) as conn:
            rows = conn.execute(query).all()
        return [
            ScheduledRotation(
                resource=row.resource_name,
                account=row.name,
                interval_seconds=row.rotation_interval_seconds,
                next_at=row.next_rotation_at,
                failures=row.rotation_failures,
            )
            for row in rows
        ]

    def claim_rotation(
        self, resource: str, account: str, *, expected_next_at: datetime, next_at: datetime
    ) -> bool:
        """Move *account*'s due time from *expected_next_at* to *next_at*; False
        (and nothing changed) when it is no longer *expected_next_at*."""
        return self._move(resource, account, expected_next_at, next_at, None)

    def reschedule_rotation(
        self,
        resource: str,
        account: str,
        *,
        expected_next_at: datetime,
        next_at: datetime,
        failures: int,
    ) -> bool:
        """After a scheduled run: the next due time and the failures in a row,
        over the claimed *expected_next_at*; False when the schedule changed."""
        if failures < 0:
            raise InvalidRequest("failures in a row cannot be negative")
        return self._move(resource, account, expected_next_at, next_at, failures)

    def _move(
        self,
        resource: str,
        account: str,
        expected: datetime,
        next_at: datetime,
        failures: int | None,
    ) -> bool:
        expected = check_time("expected_next_at", expected)
        values: dict[str, object] = {"next_rotation_at": check_time("next_at", next_at)}
        if failures is not None:
            values["rotation_failures"] = failures
        with self._transaction(write=True) as conn:
            row = account_row(conn, resource, account)
            done = conn.execute(
                update(accounts)
                .where(
                    accounts.c.id == row.id,
                    accounts.c.rotation_interval_seconds.is_not(None),
                    accounts.c.next_rotation_at == expected,
                )
                .values(**values)
            )
            return done.rowcount == 1
