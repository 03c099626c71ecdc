"""Rows inside a transaction: new ids, and finding resources, accounts and sessions.

Role: the look-ups more than one aggregate makes (a session is created on a
resource's account; connections and audit records belong to a session).

Invariants:

* Names are resolved inside the same transaction that uses them, with row locks
  on PostgreSQL when the caller asks, so "remove a resource" and "start a session
  on it" cannot interleave into a session without a resource.
* A missing row is :class:`~gateway.errors.NotFound` naming what is missing (the
  resource, when an account's resource does not exist).
* A session id may be given as a unique prefix of at least
  ``_SESSION_ID_MIN_PREFIX`` characters; an ambiguous or short one is refused.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, func, select
from sqlalchemy.engine import Row

from gateway.errors import InvalidRequest, NotFound
from gateway.store.schema import accounts, resources, rotations, sessions

if TYPE_CHECKING:
    from typing import TypeAlias

    #: A result row of any shape (SQLAlchemy 2.1 types rows by their column tuple).
    AnyRow: TypeAlias = Row[*tuple[Any, ...]]

__all__ = [
    "ACCOUNTS_JOIN",
    "ACCOUNT_COLUMNS",
    "AnyRow",
    "account_row",
    "count_active_sessions",
    "existing_session_id",
    "last_rotations",
    "new_id",
    "resolve_session_id",
    "resource_row",
    "session_row",
]


_SESSION_ID_MIN_PREFIX: Final = 6
_ID_CHARS: Final = re.compile(r"[0-9a-f]{1,32}")


def new_id() -> str:
    return uuid.uuid4().hex


# Accounts are always read with their resource's name.
ACCOUNT_COLUMNS: Final = (
    accounts.c.id,
    accounts.c.resource_id,
    resources.c.name.label("resource_name"),
    accounts.c.name,
    accounts.c.username,
    accounts.c.created_at,
    accounts.c.password_updated_at,
    accounts.c.managed,
    accounts.c.pending_rotation_id,
    accounts.c.rotation_interval_seconds,
    accounts.c.next_rotation_at,
    accounts.c.rotation_failures,
    accounts.c.template_role,
    accounts.c.cleanup_after_seconds,
)

ACCOUNTS_JOIN: Final = accounts.join(resources, accounts.c.resource_id == resources.c.id)


def last_rotations(
    conn: Connection, account_ids: list[str] | None = None
) -> dict[str, tuple[datetime, str]]:
    """When each account's last rotation ended and how, by account id (of
    *account_ids*, or of every account)."""
    newest = select(func.max(rotations.c.id)).group_by(rotations.c.account_id)
    if account_ids is not None:
        newest = newest.where(rotations.c.account_id.in_(account_ids))
    rows = conn.execute(
        select(rotations.c.account_id, rotations.c.ended_at, rotations.c.outcome).where(
            rotations.c.id.in_(newest.scalar_subquery())
        )
    ).all()
    return {row.account_id: (row.ended_at, row.outcome) for row in rows}


def resource_row(conn: Connection, name: str, *, lock: str | None = None) -> AnyRow:
    query = select(resources).where(resources.c.name == name)
    # Row locks only matter on PostgreSQL; SQLite's BEGIN IMMEDIATE already
    # serialises writers and SQLAlchemy renders nothing for it there.
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    row = conn.execute(query).one_or_none()
    if row is None:
        raise NotFound(f"resource '{name}' not found")
    return row


def account_row(conn: Connection, resource: str, name: str, *, lock: str | None = None) -> AnyRow:
    query = (
        select(*ACCOUNT_COLUMNS)
        .select_from(ACCOUNTS_JOIN)
        .where(resources.c.name == resource, accounts.c.name == name)
    )
    if lock is not None:
        query = query.with_for_update(read=lock == "share", of=accounts)
    row = conn.execute(query).one_or_none()
    if row is None:
        # Say which part is missing; "account not found" on a mistyped resource
        # name sends people looking in the wrong place.
        resource_row(conn, resource)
        raise NotFound(f"account '{name}' not found on resource '{resource}'")
    return row


def session_row(conn: Connection, session_id: str, *, lock: str | None = None) -> AnyRow:
    query = select(sessions).where(sessions.c.id == session_id)
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    row = conn.execute(query).one_or_none()
    if row is None:
        raise NotFound(f"session '{session_id}' not found")
    return row


def resolve_session_id(conn: Connection, session_id: str) -> str:
    return resolve_id(conn, sessions.c.id, "session", session_id)


def resolve_id(conn: Connection, column: Any, noun: str, given: str) -> str:
    """The full id in *column* that *given* (a full id, or a unique prefix of at
    least 6 characters) names; *noun* names the kind in errors."""
    key = given.strip().lower()
    if not _ID_CHARS.fullmatch(key):
        raise NotFound(f"{noun} '{given}' not found")
    if len(key) == 32:
        return key
    if len(key) < _SESSION_ID_MIN_PREFIX:
        raise InvalidRequest(
            f"{noun} id prefix '{given}' is too short: give at least "
            f"{_SESSION_ID_MIN_PREFIX} characters"
        )
    # Ids are lower-case hex (checked above), so the prefix has no LIKE wildcards.
    matches = conn.execute(select(column).where(column.startswith(key)).limit(2)).scalars().all()
    if not matches:
        raise NotFound(f"{noun} '{given}' not found")
    if len(matches) > 1:
        raise InvalidRequest(
            f"{noun} id prefix '{given}' matches more than one {noun}; give more characters"
        )
    return str(matches[0])


def existing_session_id(conn: Connection, session_id: str) -> str:
    full_id = resolve_session_id(conn, session_id)
    session_row(conn, full_id)
    return full_id


def count_active_sessions(conn: Connection, condition: Any) -> int:
    count = conn.execute(
        select(func.count()).select_from(sessions).where(condition, sessions.c.ended_at.is_(None))
    ).scalar_one()
    return int(count)
