"""Second factors: the sealed TOTP secrets and the state that makes a code count once.

Invariants:

* A secret reaches SQL only sealed by
  :class:`~gateway.credentials.secretbox.SecretBox` with associated data
  ``b"pam/mfa/" + principal_id`` (a blob copied to another user's row fails to
  open). Nothing returned from here carries it; :meth:`MfaStore.use_mfa_code`
  opens it only to hand it to the caller's pure decision
  (:func:`gateway.identity.mfa.check_code`) inside the transaction.
* A code is checked and its outcome stored (last accepted step, recent
  failures) in one write transaction on the row, locked (``FOR UPDATE`` on
  PostgreSQL; SQLite's write transaction is the whole file's), so two gateways
  sharing the store cannot both accept one code, nor both miss a failure.
* A pending secret does not replace the active one until its first code is
  confirmed; a first code is not checked against the old secret's last step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, select

from gateway.credentials.secretbox import SecretDecryptError
from gateway.identity.mfa import CodeState, MfaAction, MfaStatus, Verdict
from gateway.store.engine import StoreBase
from gateway.store.schema import mfa_factors

__all__ = ["MfaStore"]


def factor_aad(principal_id: str) -> bytes:
    return b"pam/mfa/" + principal_id.encode()


def _status(row: Any) -> MfaStatus:
    if row is None:
        return MfaStatus()
    return MfaStatus(
        enabled=row.secret_ciphertext is not None,
        enabled_at=row.enabled_at,
        pending=row.pending_ciphertext is not None,
        reset_by=row.reset_by,
        reset_at=row.reset_at,
    )


class MfaStore(StoreBase):
    """Users' second factors."""

    def _factor(self, conn: Connection, principal_id: str, *, lock: bool = False) -> Any:
        query = select(mfa_factors).where(mfa_factors.c.principal_id == principal_id)
        return conn.execute(query.with_for_update() if lock else query).first()

    def mfa_status(self, principal_id: str) -> MfaStatus:
        with self._transaction(write=False) as conn:
            return _status(self._factor(conn, principal_id))

    def begin_mfa_enrolment(self, principal_id: str, secret: bytes) -> None:
        sealed = self._box.encrypt(secret, aad=factor_aad(principal_id))
        now = self._now()
        with self._transaction(write=True) as conn:
            if self._factor(conn, principal_id, lock=True) is None:
                conn.execute(
                    mfa_factors.insert().values(
                        principal_id=principal_id, pending_ciphertext=sealed, updated_at=now
                    )
                )
            else:
                conn.execute(
                    mfa_factors.update()
                    .where(mfa_factors.c.principal_id == principal_id)
                    .values(pending_ciphertext=sealed, updated_at=now)
                )

    def use_mfa_code(
        self,
        principal_id: str,
        decide: Callable[[bytes, CodeState], Verdict],
        *,
        action: MfaAction,
    ) -> Verdict | None:
        now = self._now()
        with self._transaction(write=True) as conn:
            row = self._factor(conn, principal_id, lock=True)
            confirming = action is MfaAction.CONFIRM
            sealed = None
            if row is not None:
                sealed = row.pending_ciphertext if confirming else row.secret_ciphertext
            if sealed is None:
                return None
            failures = tuple(float(t) for t in json.loads(row.failures))
            # A first code belongs to a new secret: the old one's steps say nothing.
            state = CodeState(None if confirming else row.last_step, failures)
            verdict = decide(self._open(bytes(sealed), principal_id), state)
            values: dict[str, Any] = {
                "last_step": verdict.state.last_step if verdict.accepted else row.last_step,
                "failures": json.dumps(list(verdict.state.failures)),
                "updated_at": now,
            }
            if verdict.accepted and confirming:
                values |= {"secret_ciphertext": sealed, "pending_ciphertext": None}
                values |= {"enabled_at": now}
            elif verdict.accepted and action is MfaAction.DISABLE:
                values |= {"secret_ciphertext": None, "pending_ciphertext": None}
                values |= {"enabled_at": None}
            conn.execute(
                mfa_factors.update()
                .where(mfa_factors.c.principal_id == principal_id)
                .values(values)
            )
        return verdict

    def reset_mfa(self, principal_id: str, *, by: str) -> MfaStatus:
        """Remove *principal_id*'s second factor (active and pending), recording who."""
        now = self._now()
        values = {
            "secret_ciphertext": None,
            "pending_ciphertext": None,
            "enabled_at": None,
            "failures": "[]",
            "updated_at": now,
            "reset_by": by,
            "reset_at": now,
        }
        with self._transaction(write=True) as conn:
            if self._factor(conn, principal_id, lock=True) is None:
                conn.execute(mfa_factors.insert().values(principal_id=principal_id, **values))
            else:
                conn.execute(
                    mfa_factors.update()
                    .where(mfa_factors.c.principal_id == principal_id)
                    .values(values)
                )
            return _status(self._factor(conn, principal_id))

    def _open(self, sealed: bytes, principal_id: str) -> bytes:
        try:
            return self._box.decrypt(sealed, aad=factor_aad(principal_id))
        except SecretDecryptError as exc:
            raise SecretDecryptError(
                f"cannot decrypt a second-factor secret: {exc.message}",
                hint="check the gateway's master key, or reset the user's second factor"
                " (pam mfa reset USER)",
            ) from None
