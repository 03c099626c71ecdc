"""What the identity services hand back with a secret in it (a new TOTP secret
and its otpauth URI, a session token, an SSO poll handle) does not print it:
a ``repr`` in a log line or a traceback names the object, not the secret."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.identity.second_factor import Enrolment
from gateway.identity.service import IssuedToken
from gateway.identity.sso import StartedSignIn

SECRET = "SEKRITJBSWY3DPEHPK3PXP"


def test_an_enrolment_does_not_print_its_secret() -> None:
    enrolment = Enrolment(SECRET, f"otpauth://totp/pam:a?secret={SECRET}", "pam", "a@gw")
    assert SECRET not in repr(enrolment)
    assert "a@gw" in repr(enrolment)


def test_an_issued_token_does_not_print_the_token() -> None:
    issued = IssuedToken(SECRET, "tok-1", "alice", None)
    assert SECRET not in repr(issued)
    assert "tok-1" in repr(issued)


def test_a_started_sign_in_does_not_print_its_handle() -> None:
    started = StartedSignIn(SECRET, datetime.now(UTC), 1.0, authorization_url="https://idp/a")
    assert SECRET not in repr(started)
