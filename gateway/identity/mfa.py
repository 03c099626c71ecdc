"""The second factor (TOTP, RFC 6238) as pure rules: secrets, codes, and which code counts.

The authenticator apps' defaults: HMAC-SHA-1, 6 digits, a new code every 30 s
(RFC 6238, section 4; the ``otpauth://`` URI of Google Authenticator's key URI
format). The clock is passed in, so every rule is tested without waiting.

Invariants:
* A secret is :data:`SECRET_BYTES` (160 bits, RFC 4226 section 4's
  recommendation) from :mod:`secrets`. It is shown once, at enrolment; the store
  keeps it sealed (``gateway.store.mfa``).
* A code is accepted for the current time step or one step either side
  (:data:`VALID_WINDOW`: a phone's clock a little off, a code typed as it turned
  over). Every candidate is compared, with :func:`hmac.compare_digest`, whatever
  the earlier ones gave.
* A code whose time step is not after the last accepted step of the same
  principal is a replay, refused even though it is right: a code works once,
  and never an older one after a newer one.
* After :data:`MAX_FAILED_CODES` wrong codes within
  :data:`FAILURE_WINDOW_SECONDS`, every code is refused, right or wrong, before
  it is looked at, until the oldest of those failures leaves the window. An
  accepted code clears the count.
* :func:`check_code` answers a :class:`Verdict` holding the state to store;
  the store writes it in the transaction that read the old one, so two
  gateways sharing a store cannot both accept one code.
* Nothing here logs, and no error carries a secret or a code.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from gateway.errors import Forbidden, Unauthenticated

__all__ = [
    "DIGITS",
    "FAILURE_WINDOW_SECONDS",
    "ISSUER",
    "MAX_FAILED_CODES",
    "SECRET_BYTES",
    "TIME_STEP",
    "VALID_WINDOW",
    "CodeState",
    "MfaAction",
    "MfaNotEnrolled",
    "MfaRefused",
    "MfaRequired",
    "MfaStatus",
    "Outcome",
    "SecondFactorError",
    "Verdict",
    "check_code",
    "code_at",
    "needed",
    "new_secret",
    "provisioning_uri",
    "purpose_text",
    "refusal",
    "secret_text",
    "time_step",
]

#: 160 bits (RFC 4226, section 4: "the length of the shared secret MUST be at
#: least 128 bits ... RECOMMENDED 160 bits").
SECRET_BYTES: Final = 20
DIGITS: Final = 6
#: seconds per code (RFC 6238, section 5.2)
TIME_STEP: Final = 30
#: steps either side of now that are still accepted
VALID_WINDOW: Final = 1
#: wrong codes of one principal before a pause
MAX_FAILED_CODES: Final = 5
#: the window those failures are counted in, and the pause's length
FAILURE_WINDOW_SECONDS: Final = 300.0
#: the issuer an authenticator app shows
ISSUER: Final = "pam"


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    WRONG = "wrong"
    REPLAYED = "replayed"
    THROTTLED = "throttled"


class MfaAction(StrEnum):
    """What an accepted code does besides being used (the store applies it)."""

    #: nothing: a sign-in, a grant, an approval, a re-enrolment's proof
    VERIFY = "verify"
    #: the pending secret becomes the active one (first code after enrolment)
    CONFIRM = "confirm"
    #: the active secret is removed (`pam mfa disable`)
    DISABLE = "disable"


@dataclass(frozen=True)
class CodeState:
    """What the store keeps per principal besides the secret."""

    #: the time step of the last accepted code (None: none yet)
    last_step: int | None = None
    #: when recent wrong codes came (epoch seconds), oldest first
    failures: tuple[float, ...] = ()


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    #: the state to store in place of the old one
    state: CodeState
    #: the step an accepted code matched
    step: int | None = None
    #: seconds until a throttled principal may try again
    retry_after: float | None = None

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED


@dataclass(frozen=True)
class MfaStatus:
    """A principal's second factor as listed (never the secret)."""

    enabled: bool = False
    enabled_at: datetime | None = None
    #: an enrolment waits for its first code
    pending: bool = False
    #: who last reset it (an admin) and when
    reset_by: str | None = None
    reset_at: datetime | None = None


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def secret_text(secret: bytes) -> str:
    """The secret as an authenticator app takes it typed in: base32, no padding."""
    return base64.b32encode(secret).decode().rstrip("=")


def _totp(secret: bytes) -> TOTP:
    # SHA-1 as an HMAC (RFC 6238's default, what every authenticator app
    # computes) is not SHA-1's collision weakness.
    return TOTP(secret, DIGITS, SHA1(), TIME_STEP)  # noqa: S303


def provisioning_uri(secret: bytes, account: str) -> str:
    """The ``otpauth://totp/...`` URI a QR code carries."""
    return _totp(secret).get_provisioning_uri(account, ISSUER)


def time_step(now: float) -> int:
    return int(now // TIME_STEP)


def code_at(secret: bytes, step: int) -> str:
    """The code of *step* (what an authenticator app shows during it)."""
    return _totp(secret).generate(step * TIME_STEP).decode()


def _normalised(code: str) -> bytes | None:
    """Digits only (apps show ``123 456``); None when it cannot be a code."""
    digits = "".join(code.split())
    if len(digits) != DIGITS or not digits.isascii() or not digits.isdigit():
        return None
    return digits.encode()


def _matching_step(secret: bytes, given: bytes, now: float, window: int) -> int | None:
    current = time_step(now)
    found = None
    for step in range(current - window, current + window + 1):
        # No early exit: the time taken does not say which step matched.
        if hmac.compare_digest(code_at(secret, step).encode(), given) and found is None:
            found = step
    return found


def check_code(
    secret: bytes,
    code: str,
    state: CodeState,
    *,
    now: float,
    window: int = VALID_WINDOW,
    limit: int = MAX_FAILED_CODES,
    period: float = FAILURE_WINDOW_SECONDS,
) -> Verdict:
    """Whether *code* counts now for the principal whose *secret* and *state*
    these are, and the state to store after this attempt."""
    recent = tuple(t for t in state.failures if t > now - period)
    if len(recent) >= limit:
        return Verdict(
            Outcome.THROTTLED,
            CodeState(state.last_step, recent),
            retry_after=recent[-limit] + period - now,
        )
    given = _normalised(code)
    step = None if given is None else _matching_step(secret, given, now, window)
    if step is None:
        # Only the newest `limit` matter for the pause.
        return Verdict(Outcome.WRONG, CodeState(state.last_step, (*recent, now)[-limit:]))
    if state.last_step is not None and step <= state.last_step:
        return Verdict(Outcome.REPLAYED, CodeState(state.last_step, recent))
    return Verdict(Outcome.ACCEPTED, CodeState(step, ()), step=step)


# --- what a refusal says ----------------------------------------------------------------


class SecondFactorError(Unauthenticated):
    """A second factor was needed and not given, or was refused (401: the
    caller has not proven enough yet); :attr:`code` says which."""


class MfaRequired(SecondFactorError):
    """No code was given where one is needed: the client asks for one and retries."""

    code = "mfa_required"


class MfaRefused(SecondFactorError):
    """A code was given and refused: wrong, already used, or too many wrong ones."""


class MfaNotEnrolled(Forbidden):
    """A second factor is needed from a principal that has none."""

    code = "mfa_not_enrolled"


_PURPOSES: Final = {
    "login": "signing in",
    "grant": "this access",
    "approval": "this approval",
    "enrolment": "changing the second factor",
    "disable": "turning the second factor off",
}

_CODE_HINT: Final = "give the current code from your authenticator app"


def purpose_text(purpose: str) -> str:
    """What a code is for, as a message says it (``grant``: "this access")."""
    return _PURPOSES.get(purpose, purpose)


def needed(purpose: str) -> MfaRequired:
    return MfaRequired(
        f"{purpose_text(purpose)} needs a second-factor code",
        hint=f"{_CODE_HINT} (--otp CODE)",
    )


def refusal(verdict: Verdict) -> MfaRefused:
    """The error for a code that did not count (never quoting the code)."""
    if verdict.outcome is Outcome.THROTTLED:
        wait = max(1, round(verdict.retry_after or 0))
        error = MfaRefused("too many wrong second-factor codes", hint=f"try again in {wait} s")
        error.code = "mfa_throttled"
    elif verdict.outcome is Outcome.REPLAYED:
        error = MfaRefused(
            "this second-factor code was already used",
            hint=f"wait for the next code (a new one every {TIME_STEP} s)",
        )
        error.code = "mfa_replayed"
    else:
        error = MfaRefused("wrong second-factor code", hint=_CODE_HINT)
        error.code = "mfa_invalid"
    return error
