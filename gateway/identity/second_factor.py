"""Second factors: enrolment, the checks that ask for a code, and project settings.

What the control API, the sign-in and the grant flow call; the rules are
:mod:`gateway.identity.mfa`, the state the store's (:class:`~.ports.MfaStore`).

Invariants:
* Only users enrol: a machine principal has no authenticator app.
* The secret is returned once, by :meth:`MfaService.enroll`; it becomes the
  active one only when its first code is confirmed. Enrolling again, or
  turning the factor off, needs a current code of the active secret; an admin
  of every project may reset another user's (recorded: who and when, and a
  log line).
* :meth:`MfaService.check_second_factor` is the one check every place that
  asks for a code calls (sign-in, grant, approval): not enrolled, no code,
  wrong, replayed and throttled are distinct errors with a ``code`` a client
  can act on.
* Codes and secrets are never logged; log lines name the principal and the
  purpose only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from gateway.errors import Forbidden, InvalidRequest
from gateway.identity.mfa import (
    ISSUER,
    CodeState,
    MfaAction,
    MfaNotEnrolled,
    MfaStatus,
    Verdict,
    check_code,
    needed,
    new_secret,
    provisioning_uri,
    purpose_text,
    refusal,
    secret_text,
)
from gateway.identity.ports import MfaStore, StoreThread
from gateway.identity.principals import ALL_PROJECTS, Principal, PrincipalInfo, PrincipalKind
from gateway.identity.projects import ProjectSettings

__all__ = ["Enrolment", "MfaService"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Enrolment:
    """A pending second factor, the one time its secret leaves the gateway."""

    #: base32, as an authenticator app takes it typed in (not in the repr)
    secret: str = field(repr=False)
    #: ``otpauth://totp/...``, what the QR code carries: the secret too
    uri: str = field(repr=False)
    issuer: str
    account: str


class MfaService:
    def __init__(
        self,
        store: MfaStore,
        db: StoreThread,
        *,
        gateway_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._db = db
        self._gateway_id = gateway_id
        self._clock = clock

    # --- state --------------------------------------------------------------------

    async def status(self, principal_id: str) -> MfaStatus:
        return await self._db(self._store.mfa_status, principal_id)

    async def status_of(self, name: str) -> tuple[PrincipalInfo, MfaStatus]:
        info = await self._db(self._store.get_principal, name)
        return info, await self.status(info.id)

    async def is_enabled(self, principal_id: str) -> bool:
        return (await self.status(principal_id)).enabled

    # --- enrolment ----------------------------------------------------------------

    async def enroll(self, principal: Principal, current_code: str | None = None) -> Enrolment:
        """A new pending secret for *principal*; with one active already, only
        after a current code of it."""
        if principal.kind is not PrincipalKind.USER:
            raise Forbidden(
                f"{principal.name} is a machine principal: only users enrol a second factor"
            )
        if await self.is_enabled(principal.id):
            await self.check_second_factor(principal, current_code, purpose="enrolment")
        secret = new_secret()
        await self._db(self._store.begin_mfa_enrolment, principal.id, secret)
        account = f"{principal.name}@{self._gateway_id}"
        log.info("mfa_enrolment_started", principal=principal.name)
        return Enrolment(secret_text(secret), provisioning_uri(secret, account), ISSUER, account)

    async def confirm(self, principal: Principal, code: str) -> MfaStatus:
        """Activate the pending secret with its first code."""
        verdict = await self._use(principal.id, code, MfaAction.CONFIRM)
        if verdict is None:
            raise InvalidRequest(
                "no enrolment is waiting for its first code", hint="start one with `pam mfa enroll`"
            )
        if not verdict.accepted:
            raise refusal(verdict)
        log.info("mfa_enrolled", principal=principal.name)
        return await self.status(principal.id)

    async def disable(self, principal: Principal, code: str | None) -> MfaStatus:
        """Turn the caller's own second factor off, with a current code."""
        if not await self.is_enabled(principal.id):
            raise InvalidRequest(f"{principal.name} has no second factor to turn off")
        if not code:
            raise needed("disable")
        verdict = await self._use(principal.id, code, MfaAction.DISABLE)
        if verdict is None:
            raise InvalidRequest(f"{principal.name} has no second factor to turn off")
        if not verdict.accepted:
            raise refusal(verdict)
        log.info("mfa_disabled", principal=principal.name)
        return await self.status(principal.id)

    async def reset(self, name: str, *, by: Principal) -> MfaStatus:
        """An admin of every project removes *name*'s second factor (a lost phone)."""
        if not by.is_admin(ALL_PROJECTS):
            raise Forbidden(f"{by.name} is not an administrator of every project")
        info = await self._db(self._store.get_principal, name)
        status = await self._db(self._store.reset_mfa, info.id, by=by.name)
        log.warning("mfa_reset", principal=name, by=by.name)
        return status

    # --- the check every place that asks for a code calls ---------------------------

    async def check_second_factor(
        self, principal: Principal, code: str | None, *, purpose: str
    ) -> None:
        """Pass if *code* is a current, unused code of *principal*'s active
        second factor; else raise :class:`~gateway.identity.mfa.MfaNotEnrolled`
        (403), :class:`~gateway.identity.mfa.MfaRequired` (401, no code given)
        or :class:`~gateway.identity.mfa.MfaRefused` (401: wrong, replayed,
        throttled). *purpose* (``login``, ``grant``, ``approval``, ...) names
        what the code is for in the message and the log."""
        if not await self.is_enabled(principal.id):
            raise _not_enrolled(principal, purpose)
        if not code:
            raise needed(purpose)
        verdict = await self._use(principal.id, code, MfaAction.VERIFY)
        if verdict is None:  # turned off meanwhile
            raise _not_enrolled(principal, purpose)
        if not verdict.accepted:
            log.info(
                "mfa_refused", principal=principal.name, purpose=purpose, outcome=verdict.outcome
            )
            raise refusal(verdict)

    async def _use(self, principal_id: str, code: str, action: MfaAction) -> Verdict | None:
        now = self._clock()

        def decide(secret: bytes, state: CodeState) -> Verdict:
            return check_code(secret, code, state, now=now)

        return await self._db(self._store.use_mfa_code, principal_id, decide, action=action)

    # --- project settings -----------------------------------------------------------

    async def approval_needs_mfa(self, project: str) -> bool:
        """Whether approving a request of *project* needs the approver's code."""
        return (await self.project_settings(project)).approval_mfa

    async def project_settings(self, project: str) -> ProjectSettings:
        return await self._db(self._store.project_settings, project)

    async def set_project_settings(
        self, project: str, *, approval_mfa: bool, by: str
    ) -> ProjectSettings:
        settings = ProjectSettings(project, approval_mfa=approval_mfa, updated_by=by)
        return await self._db(self._store.set_project_settings, settings)


def _not_enrolled(principal: Principal, purpose: str) -> MfaNotEnrolled:
    if principal.kind is not PrincipalKind.USER:
        return MfaNotEnrolled(
            f"{purpose_text(purpose)} needs a second factor, and {principal.name} is a"
            " machine principal",
            hint="a person with a second factor must do this",
        )
    return MfaNotEnrolled(
        f"{purpose_text(purpose)} needs a second factor, and {principal.name} has none",
        hint="enrol one with `pam mfa enroll`",
    )
