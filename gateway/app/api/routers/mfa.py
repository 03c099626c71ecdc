"""Second factors (TOTP): enrol, confirm, turn off, reset, and see one's state.

A user enrols their own (``POST /v1/mfa/enroll`` answers the secret once, then
``POST /v1/mfa/confirm`` with its first code turns it on); replacing or turning
off an active one needs a current code of it. An admin of every project resets
another user's (``POST /v1/mfa/reset/{user}``) when the phone is lost, and may
read anyone's state (``GET /v1/mfa?user=NAME``). Codes travel only inward and
are never part of a response or an error.
"""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.api.deps import Caller, GlobalAdmin, Service
from gateway.app.api.models import MfaCodeIn, MfaEnrollIn, MfaEnrolmentOut, MfaStatusOut
from gateway.errors import Forbidden
from gateway.identity.mfa import MfaStatus

router = APIRouter(prefix="/v1/mfa")


def _out(user: str, status: MfaStatus) -> MfaStatusOut:
    return MfaStatusOut(
        user=user,
        enabled=status.enabled,
        enabled_at=status.enabled_at,
        pending=status.pending,
        reset_by=status.reset_by,
        reset_at=status.reset_at,
    )


@router.get("")
async def mfa_status(caller: Caller, service: Service, user: str | None = None) -> MfaStatusOut:
    if user is None or user == caller.name:
        return _out(caller.name, await service.mfa.status(caller.id))
    if not caller.is_admin():
        raise Forbidden(f"{caller.name} is not an administrator of every project")
    info, status = await service.mfa.status_of(user)
    return _out(info.name, status)


@router.post("/enroll", status_code=201)
async def enroll(
    caller: Caller, service: Service, body: MfaEnrollIn | None = None
) -> MfaEnrolmentOut:
    code = body.code.get_secret_value() if body and body.code else None
    enrolment = await service.mfa.enroll(caller, code)
    return MfaEnrolmentOut(
        secret=enrolment.secret,
        uri=enrolment.uri,
        issuer=enrolment.issuer,
        account=enrolment.account,
    )


@router.post("/confirm")
async def confirm(body: MfaCodeIn, caller: Caller, service: Service) -> MfaStatusOut:
    return _out(caller.name, await service.mfa.confirm(caller, body.code.get_secret_value()))


@router.post("/disable")
async def disable(
    caller: Caller, service: Service, body: MfaEnrollIn | None = None
) -> MfaStatusOut:
    code = body.code.get_secret_value() if body and body.code else None
    return _out(caller.name, await service.mfa.disable(caller, code))


@router.post("/reset/{user}")
async def reset(user: str, admin: GlobalAdmin, service: Service) -> MfaStatusOut:
    return _out(user, await service.mfa.reset(user, by=admin))
