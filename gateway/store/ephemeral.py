"""Ephemeral accounts and the database roles pam made for their grants.

Implements :class:`gateway.credentials.ephemeral.EphemeralRoleStore`.

Invariants:

* An ephemeral account has a template role and no password
  (``password_ciphertext`` NULL); ``username`` names its template role, for
  listings. :meth:`ResourceStore.reveal_password` refuses it in words.
* A grant's role is recorded (:meth:`EphemeralRoleStore.record_ephemeral_role`)
  before it is created upstream; a row is finished once (``dropped_at`` and an
  ``outcome``), and a finished row never changes again.
* A row is due for the janitor only once its grant's session has ended, and
  not before its ``next_attempt_at``. Nothing here holds a password.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import TYPE_CHECKING, Final, get_args

from sqlalchemy import and_, or_, select, update

from gateway.credentials.ephemeral.ports import EphemeralRole, RoleOutcome
from gateway.credentials.ephemeral.sql import check_role_name
from gateway.errors import InvalidRequest, NotFound
from gateway.store.engine import StoreBase
from gateway.store.models import Account, Resource
from gateway.store.resources import insert_account, resource_record
from gateway.store.rows import new_id, resource_row
from gateway.store.schema import ephemeral_roles, resources, sessions
from gateway.store.validation import check_name, required_text

if TYPE_CHECKING:
    from gateway.store.rows import AnyRow

__all__ = ["EphemeralRoleStore"]

_OUTCOMES: Final = frozenset(get_args(RoleOutcome))
#: longest error kept on a row (an upstream error message)
_MAX_ERROR: Final = 2000
#: a year: longer than any sensible wait before dropping a grant's role
MAX_CLEANUP_AFTER_SECONDS: Final = 366 * 86400

_COLUMNS: Final = (
    ephemeral_roles,
    sessions.c.ended_at.label("session_ended_at"),
)


def _role(row: AnyRow) -> EphemeralRole:
    return EphemeralRole(
        id=row.id,
        role=row.role,
        resource=row.resource_name,
        account=row.account_name,
        session_id=row.session_id,
        created_at=row.created_at,
        cleanup_after_seconds=row.cleanup_after_seconds,
        session_ended_at=row.session_ended_at,
        disabled_at=row.disabled_at,
        drop_after=row.drop_after,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
    )


#: a role with its grant's session (outer: a session removed from the store)
_JOINED: Final = ephemeral_roles.outerjoin(sessions, sessions.c.id == ephemeral_roles.c.session_id)


class EphemeralRoleStore(StoreBase):
    """Ephemeral accounts, the REASSIGN OWNED target, and grant roles."""

    # --- accounts and the resource setting ---------------------------------------------

    def add_ephemeral_account(
        self, resource: str, name: str, template_role: str, cleanup_after_seconds: int | None
    ) -> Account:
        """Add an account whose grants each sign in as a role of their own, made
        in *template_role*; dropped *cleanup_after_seconds* after the grant
        (None: at its end). Raises :class:`AlreadyExists` for a taken name."""
        check_name("account", name)
        check_role_name("the template role", template_role)
        if cleanup_after_seconds is not None and not (
            0 < cleanup_after_seconds <= MAX_CLEANUP_AFTER_SECONDS
        ):
            raise InvalidRequest("cleanup_after_seconds must be between 1 second and a year")
        return insert_account(
            self,
            resource,
            account_id=new_id(),
            name=name,
            username=template_role,
            password_ciphertext=None,
            template_role=template_role,
            cleanup_after_seconds=cleanup_after_seconds,
        )

    def set_reassign_owner(self, resource: str, owner: str | None) -> Resource:
        """Who gets what a grant's role owned (None: the rotation role)."""
        if owner is not None:
            check_role_name("--reassign-to", owner)
        with self._transaction(write=True) as conn:
            row = resource_row(conn, resource, lock="update")
            conn.execute(
                update(resources).where(resources.c.id == row.id).values(reassign_to=owner)
            )
            return resource_record(resource_row(conn, resource))

    def reassign_owner(self, resource: str) -> str | None:
        with self._transaction(write=False) as conn:
            return resource_row(conn, resource).reassign_to  # type: ignore[no-any-return]

    # --- grant roles -------------------------------------------------------------------

    def record_ephemeral_role(
        self,
        role: str,
        *,
        resource: str,
        account: str,
        session_id: str,
        cleanup_after_seconds: int | None,
    ) -> EphemeralRole:
        """Record a grant's role before it is created upstream."""
        required_text("role", role)
        row_id, now = new_id(), self._now()
        row = {
            "id": row_id,
            "role": role,
            "resource_name": resource,
            "account_name": account,
            "session_id": session_id,
            "cleanup_after_seconds": cleanup_after_seconds,
            "created_at": now,
            "attempts": 0,
        }
        with self._transaction(write=True) as conn:
            conn.execute(ephemeral_roles.insert().values(row))
        return EphemeralRole(
            id=row_id,
            role=role,
            resource=resource,
            account=account,
            session_id=session_id,
            created_at=now,
            cleanup_after_seconds=cleanup_after_seconds,
            session_ended_at=None,
        )

    def ephemeral_roles_due(self, now: datetime) -> list[EphemeralRole]:
        """Unfinished roles whose grant has ended (or whose session is unknown)
        and that are not waiting for a retry or for ``cleanup_after``, oldest first."""
        query = (
            select(*_COLUMNS)
            .select_from(_JOINED)
            .where(
                ephemeral_roles.c.dropped_at.is_(None),
                or_(sessions.c.id.is_(None), sessions.c.ended_at.is_not(None)),
                or_(
                    ephemeral_roles.c.next_attempt_at.is_(None),
                    ephemeral_roles.c.next_attempt_at <= now,
                ),
            )
            .order_by(ephemeral_roles.c.created_at)
        )
        with self._transaction(write=False) as conn:
            rows = conn.execute(query).all()
        return [_due_now(_role(r), now) for r in rows]

    def unfinished_ephemeral_roles(self, resource: str | None = None) -> list[EphemeralRole]:
        """Roles not dropped yet (of *resource*, or of all), live grants' too, oldest first."""
        query = (
            select(*_COLUMNS)
            .select_from(_JOINED)
            .where(ephemeral_roles.c.dropped_at.is_(None))
            .order_by(ephemeral_roles.c.created_at)
        )
        if resource is not None:
            query = query.where(ephemeral_roles.c.resource_name == resource)
        with self._transaction(write=False) as conn:
            return [_role(r) for r in conn.execute(query).all()]

    def ephemeral_role_disabled(self, row_id: str, *, at: datetime, drop_after: datetime) -> None:
        """The role can no longer sign in; it is next looked at *drop_after*."""
        self._update_unfinished(
            row_id,
            disabled_at=at,
            drop_after=drop_after,
            next_attempt_at=drop_after,
            attempts=0,
            last_error=None,
        )

    def ephemeral_role_finished(self, row_id: str, *, outcome: RoleOutcome, at: datetime) -> None:
        """pam is done with the role: ``dropped``, ``gone`` or ``not_managed``."""
        if outcome not in _OUTCOMES:
            raise InvalidRequest(f"unknown outcome {outcome!r}")
        self._update_unfinished(row_id, dropped_at=at, outcome=outcome, next_attempt_at=None)

    def ephemeral_role_failed(self, row_id: str, *, error: str, retry_at: datetime) -> None:
        """A step failed with *error*: try again at *retry_at*."""
        with self._transaction(write=True) as conn:
            result = conn.execute(
                update(ephemeral_roles)
                .where(ephemeral_roles.c.id == row_id, ephemeral_roles.c.dropped_at.is_(None))
                .values(
                    attempts=ephemeral_roles.c.attempts + 1,
                    last_error=error.replace("\x00", "\ufffd")[:_MAX_ERROR],
                    next_attempt_at=retry_at,
                )
            )
            if result.rowcount == 0:
                raise NotFound(f"no unfinished grant role {row_id!r}")

    def _update_unfinished(self, row_id: str, **values: object) -> None:
        with self._transaction(write=True) as conn:
            result = conn.execute(
                update(ephemeral_roles)
                .where(and_(ephemeral_roles.c.id == row_id, ephemeral_roles.c.dropped_at.is_(None)))
                .values(**values)
            )
            if result.rowcount == 0:
                raise NotFound(f"no unfinished grant role {row_id!r}")


def _due_now(role: EphemeralRole, now: datetime) -> EphemeralRole:
    """A row whose session is unknown (removed from the store) counts as ended now."""
    if role.session_ended_at is not None:
        return role
    return dataclasses.replace(role, session_ended_at=now)
