"""Credential rotation's state: rotation roles, the rotation in flight, the record.

Implements :class:`gateway.credentials.ports.RotationStore`.

Invariants:

* Every password here is sealed before it reaches SQL, bound to its row and its
  purpose by the associated data: a rotation role's password to its resource
  (``pam/resource/<id>/rotation``), a pending password to its account
  (``pam/account/<id>/pending``), so neither opens as the other or as an
  account's current password. Only the ``reveal_*`` methods return one.
* An account has at most one rotation in flight (its ``pending_*`` columns);
  :meth:`RotationStore.begin_rotation` refuses a second. It ends through
  :meth:`RotationStore.finish_rotation` with the same rotation id, which in one
  transaction promotes the pending password (or drops it) and appends the
  record, or is replaced by a typed password (recorded too): a rotation's end
  and its record are never apart.
* The ``rotations`` record is append-only (triggers refuse UPDATE and DELETE),
  chained and sealed (:mod:`gateway.store.rotation_chain`: an edited or removed
  entry shows in ``pam audit verify``), and never holds a password: its detail
  is an upstream error message or a sentence of ours.
* A rotation in flight names the gateway that started it
  (``pending_gateway_id``), so that recovery leaves a live gateway's rotation
  alone (:mod:`gateway.credentials.rotation`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Final

from sqlalchemy import Connection, select, update

from gateway.audit.verify import ChainProblem
from gateway.credentials.records import (
    ROTATION_OUTCOMES,
    PendingRotation,
    RotationEntry,
    RotationMethod,
    RotationOutcome,
    RotationVia,
)
from gateway.credentials.schedule import presence_lease
from gateway.credentials.secretbox import SecretDecryptError
from gateway.errors import InvalidRequest
from gateway.store.engine import StoreBase
from gateway.store.leases import is_lease_held
from gateway.store.models import Account, Resource
from gateway.store.resources import account_aad, account_record, resource_record
from gateway.store.rotation_chain import append_rotation, rotation_problems
from gateway.store.rows import ACCOUNT_COLUMNS, ACCOUNTS_JOIN, account_row, resource_row
from gateway.store.schema import accounts, resources, rotations
from gateway.store.validation import check_password, required_text

if TYPE_CHECKING:
    from gateway.store.rows import AnyRow

__all__ = ["RotationStore"]

#: longest detail kept in a record (an upstream error message)
_MAX_DETAIL: Final = 2000
#: most records one read returns
MAX_ROTATIONS_PAGE: Final = 1000


#: an account's columns of a rotation in flight, emptied
_NO_PENDING: Final[dict[str, object]] = {
    "pending_ciphertext": None,
    "pending_rotation_id": None,
    "pending_started_at": None,
    "pending_started_by": None,
    "pending_via": None,
    "pending_gateway_id": None,
}


def pending_aad(account_id: str) -> bytes:
    return account_aad(account_id) + b"/pending"


def rotator_aad(resource_id: str) -> bytes:
    return b"pam/resource/" + resource_id.encode() + b"/rotation"


def _detail(value: str | None) -> str | None:
    if value is None:
        return None
    return value.replace("\x00", "\ufffd")[:_MAX_DETAIL]


def _entry(row: AnyRow) -> RotationEntry:
    return RotationEntry(
        rotation_id=row.rotation_id,
        resource=row.resource_name,
        account=row.account_name,
        username=row.username,
        method=row.method,
        via=row.via,
        started_by=row.started_by,
        started_at=row.started_at,
        ended_at=row.ended_at,
        outcome=row.outcome,
        detail=row.detail,
        gateway_id=row.gateway_id,
        seq=row.seq,
    )


def _pending_of(row: AnyRow) -> PendingRotation:
    return PendingRotation(
        rotation_id=row.pending_rotation_id,
        resource=row.resource_name,
        account=row.name,
        username=row.username,
        via=row.pending_via,
        started_by=row.pending_started_by,
        started_at=row.pending_started_at,
        gateway_id=row.pending_gateway_id,
    )


class RotationStore(StoreBase):
    """Rotation roles, pending passwords and the rotation record."""

    # --- the rotation role of a resource ---------------------------------------------

    def set_rotation_credential(self, resource: str, username: str, password: str) -> Resource:
        """Store the role that changes *resource*'s accounts' passwords."""
        required_text("username", username)
        check_password(password)
        with self._transaction(write=True) as conn:
            row = resource_row(conn, resource, lock="update")
            sealed = self._box.encrypt(password.encode(), aad=rotator_aad(row.id))
            conn.execute(
                update(resources)
                .where(resources.c.id == row.id)
                .values(rotation_username=username, rotation_ciphertext=sealed)
            )
            return resource_record(resource_row(conn, resource))

    def clear_rotation_credential(self, resource: str) -> Resource:
        """Forget *resource*'s rotation role: its accounts rotate themselves."""
        with self._transaction(write=True) as conn:
            row = resource_row(conn, resource, lock="update")
            conn.execute(
                update(resources)
                .where(resources.c.id == row.id)
                .values(rotation_username=None, rotation_ciphertext=None)
            )
            return resource_record(resource_row(conn, resource))

    def reveal_rotation_credential(self, resource: str) -> tuple[str, str] | None:
        """(user name, password) of *resource*'s rotation role, or None if it has none."""
        with self._transaction(write=False) as conn:
            row = resource_row(conn, resource)
        if row.rotation_username is None or row.rotation_ciphertext is None:
            return None
        try:
            opened = self._box.decrypt(bytes(row.rotation_ciphertext), aad=rotator_aad(row.id))
        except SecretDecryptError as exc:
            raise SecretDecryptError(
                f"cannot decrypt the rotation role's password of resource '{resource}':"
                f" {exc.message}",
                hint="set it again with `pam resource set-rotation`",
            ) from None
        return row.rotation_username, opened.decode()

    # --- a rotation in flight ----------------------------------------------------------

    def begin_rotation(
        self,
        resource: str,
        account: str,
        password: str,
        *,
        rotation_id: str,
        via: RotationVia,
        started_by: str,
        gateway_id: str | None = None,
    ) -> PendingRotation:
        """Store *password* as *account*'s pending one, before it is set upstream
        (by gateway *gateway_id*).

        Refused while another rotation of the account is in flight.
        """
        check_password(password)
        with self._transaction(write=True) as conn:
            row = self._locked_account(conn, resource, account)
            if row.pending_rotation_id is not None:
                raise InvalidRequest(
                    f"a rotation of {resource}/{account} is unfinished"
                    f" (started {row.pending_started_at:%Y-%m-%d %H:%M:%S} UTC"
                    f" by {row.pending_started_by})",
                    hint="the gateway completes or rolls it back; try again shortly",
                )
            started_at = self._now()
            sealed = self._box.encrypt(password.encode(), aad=pending_aad(row.id))
            conn.execute(
                update(accounts)
                .where(accounts.c.id == row.id)
                .values(
                    pending_ciphertext=sealed,
                    pending_rotation_id=rotation_id,
                    pending_started_at=started_at,
                    pending_started_by=started_by,
                    pending_via=via,
                    pending_gateway_id=gateway_id,
                )
            )
        return PendingRotation(
            rotation_id=rotation_id,
            resource=resource,
            account=account,
            username=row.username,
            via=via,
            started_by=started_by,
            started_at=started_at,
            gateway_id=gateway_id,
        )

    def reveal_pending_password(
        self, resource: str, account: str, rotation_id: str | None = None
    ) -> str | None:
        """The pending password of *account*'s rotation in flight (of rotation
        *rotation_id*, when given), or None."""
        with self._transaction(write=False) as conn:
            row = account_row(conn, resource, account)
            sealed = conn.execute(
                select(accounts.c.pending_ciphertext).where(accounts.c.id == row.id)
            ).scalar_one()
        if rotation_id is not None and row.pending_rotation_id != rotation_id:
            return None
        if sealed is None:
            return None
        try:
            return self._box.decrypt(bytes(sealed), aad=pending_aad(row.id)).decode()
        except SecretDecryptError as exc:
            raise SecretDecryptError(
                f"cannot decrypt the pending password of account '{account}' on resource"
                f" '{resource}': {exc.message}"
            ) from None

    def pending_rotations(self) -> list[PendingRotation]:
        """Every rotation in flight (after a crash: the ones to complete or roll back)."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                select(
                    *ACCOUNT_COLUMNS,
                    accounts.c.pending_started_at,
                    accounts.c.pending_started_by,
                    accounts.c.pending_via,
                    accounts.c.pending_gateway_id,
                )
                .select_from(ACCOUNTS_JOIN)
                .where(accounts.c.pending_rotation_id.is_not(None))
            ).all()
        return sorted((_pending_of(r) for r in rows), key=lambda p: p.started_at)

    def finish_rotation(
        self,
        resource: str,
        account: str,
        rotation_id: str,
        *,
        promote: bool,
        outcome: RotationOutcome,
        detail: str | None = None,
    ) -> RotationEntry:
        """End rotation *rotation_id*: the pending password becomes the stored one
        (*promote*) or is dropped, and its record is appended, in one transaction."""
        self._check_outcome(outcome)
        with self._transaction(write=True) as conn:
            row = self._locked_account(conn, resource, account)
            if row.pending_rotation_id != rotation_id:
                raise InvalidRequest(
                    f"rotation {rotation_id[:8]} of {resource}/{account} is not in flight"
                )
            pending = conn.execute(
                select(
                    accounts.c.pending_ciphertext,
                    accounts.c.pending_started_at,
                    accounts.c.pending_started_by,
                    accounts.c.pending_via,
                    accounts.c.pending_gateway_id,
                ).where(accounts.c.id == row.id)
            ).one()
            now = self._now()
            values: dict[str, object] = _NO_PENDING.copy()
            if promote:
                password = self._box.decrypt(
                    bytes(pending.pending_ciphertext), aad=pending_aad(row.id)
                )
                values["password_ciphertext"] = self._box.encrypt(password, aad=account_aad(row.id))
                values["password_updated_at"] = now
            conn.execute(update(accounts).where(accounts.c.id == row.id).values(values))
            entry = RotationEntry(
                rotation_id=rotation_id,
                resource=resource,
                account=account,
                username=row.username,
                method="generated",
                via=pending.pending_via,
                started_by=pending.pending_started_by,
                started_at=pending.pending_started_at,
                ended_at=now,
                outcome=outcome,
                detail=_detail(detail),
                gateway_id=pending.pending_gateway_id,
            )
            return append_rotation(self._chain, conn, row.id, entry)

    def record_rotation(
        self,
        resource: str,
        account: str,
        *,
        rotation_id: str,
        method: RotationMethod,
        via: RotationVia | None,
        started_by: str,
        started_at: datetime,
        outcome: RotationOutcome,
        detail: str | None = None,
        gateway_id: str | None = None,
    ) -> RotationEntry:
        """Append the record of a rotation that changed nothing stored (it failed
        before its new password was stored)."""
        self._check_outcome(outcome)
        with self._transaction(write=True) as conn:
            row = account_row(conn, resource, account)
            entry = RotationEntry(
                rotation_id=rotation_id,
                resource=resource,
                account=account,
                username=row.username,
                method=method,
                via=via,
                started_by=started_by,
                started_at=started_at,
                ended_at=self._now(),
                outcome=outcome,
                detail=_detail(detail),
                gateway_id=gateway_id,
            )
            return append_rotation(self._chain, conn, row.id, entry)

    def store_typed_password(
        self,
        resource: str,
        account: str,
        password: str,
        *,
        rotation_id: str,
        started_by: str,
        gateway_id: str | None = None,
    ) -> Account:
        """Replace *account*'s stored password with one an admin typed, and record it.

        Refused for a managed account (nobody may know its password). A rotation
        left in flight is ended (recorded ``failed``, its new password dropped):
        the caller holds the account's turn, so none of its own is running, and
        the typed password is the upstream's now; refused while the rotation in
        flight is another present gateway's (it is still running it).
        """
        check_password(password)
        with self._transaction(write=True) as conn:
            row = self._locked_account(conn, resource, account)
            if row.managed:
                raise InvalidRequest(
                    f"{resource}/{account} is managed: pam generates its password and"
                    " nobody may know it",
                    hint=f"rotate it with `pam account rotate {resource} {account} --now`",
                )
            now = self._now()
            starter = row.pending_gateway_id
            if (
                starter not in (None, gateway_id)
                and row.pending_rotation_id is not None
                and is_lease_held(conn, presence_lease(starter), starter, now)
            ):
                raise InvalidRequest(
                    f"a rotation of {resource}/{account} is under way on gateway {starter}",
                    hint="try again once it has ended (`pam account list`)",
                )
            if row.pending_rotation_id is not None:
                append_rotation(
                    self._chain,
                    conn,
                    row.id,
                    RotationEntry(
                        rotation_id=row.pending_rotation_id,
                        resource=resource,
                        account=account,
                        username=row.username,
                        method="generated",
                        via=row.pending_via,
                        started_by=row.pending_started_by,
                        started_at=row.pending_started_at,
                        ended_at=now,
                        outcome="failed",
                        detail=f"a password typed by {started_by} replaced it before it was"
                        " settled",
                        gateway_id=row.pending_gateway_id,
                    ),
                )
            sealed = self._box.encrypt(password.encode(), aad=account_aad(row.id))
            conn.execute(
                update(accounts)
                .where(accounts.c.id == row.id)
                .values(password_ciphertext=sealed, password_updated_at=now, **_NO_PENDING)
            )
            entry = RotationEntry(
                rotation_id=rotation_id,
                resource=resource,
                account=account,
                username=row.username,
                method="typed",
                via=None,
                started_by=started_by,
                started_at=now,
                ended_at=now,
                outcome="stored",
                gateway_id=gateway_id,
            )
            append_rotation(self._chain, conn, row.id, entry)
            return account_record(row, (now, "stored")).model_copy(
                update={"password_updated_at": now}
            )

    def rotations(
        self, resource: str | None = None, account: str | None = None, *, limit: int = 100
    ) -> list[RotationEntry]:
        """The rotation record, newest first: of one account, one resource, or all."""
        query = select(rotations).order_by(rotations.c.id.desc())
        with self._transaction(write=False) as conn:
            if resource is not None:
                resource_row(conn, resource)
                query = query.where(rotations.c.resource_name == resource)
            if account is not None:
                query = query.where(rotations.c.account_name == account)
            rows = conn.execute(query.limit(max(1, min(limit, MAX_ROTATIONS_PAGE)))).all()
        return [_entry(r) for r in rows]

    def verify_rotation_record(self) -> list[ChainProblem]:
        """Every edited, removed or cut-off entry of the rotation record
        (:func:`gateway.store.rotation_chain.rotation_problems`)."""
        with self._transaction(write=False, snapshot=True) as conn:
            return rotation_problems(self._chain, conn)

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _check_outcome(outcome: str) -> None:
        if outcome not in ROTATION_OUTCOMES:
            raise InvalidRequest(f"unknown rotation outcome {outcome!r}")

    @staticmethod
    def _locked_account(conn: Connection, resource: str, account: str) -> AnyRow:
        """The account's row (``ACCOUNT_COLUMNS`` and its rotation in flight), locked."""
        row = conn.execute(
            select(
                *ACCOUNT_COLUMNS,
                accounts.c.pending_started_at,
                accounts.c.pending_started_by,
                accounts.c.pending_via,
                accounts.c.pending_gateway_id,
            )
            .select_from(ACCOUNTS_JOIN)
            .where(resources.c.name == resource, accounts.c.name == account)
            .with_for_update(of=accounts)
        ).one_or_none()
        if row is None:
            account_row(conn, resource, account)  # raises NotFound naming what is missing
            raise AssertionError("unreachable")
        return row
