"""Tests of gateway.identity.mfa: which TOTP code counts, with the clock passed in.

Codes are computed with cryptography's TOTP (the same primitive an
authenticator app implements) and checked against RFC 6238's published vectors,
so the rules are tested against the real algorithm, not against themselves.
"""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from gateway.identity.mfa import (
    FAILURE_WINDOW_SECONDS,
    MAX_FAILED_CODES,
    SECRET_BYTES,
    TIME_STEP,
    CodeState,
    MfaRefused,
    Outcome,
    check_code,
    code_at,
    new_secret,
    provisioning_uri,
    refusal,
    secret_text,
    time_step,
)

#: RFC 6238, appendix B: the SHA-1 seed
RFC_SECRET = b"12345678901234567890"
SECRET = bytes(range(20))
#: a moment in the middle of a step, so "one step either side" is unambiguous
NOW = 1_700_000_015.0


def app_code(secret: bytes, at: float) -> str:
    """What an authenticator app shows at time *at*."""
    return TOTP(secret, 6, SHA1(), 30).generate(at).decode()  # noqa: S303 (RFC 6238's HMAC)


@pytest.mark.parametrize(
    ("at", "expected"),
    [(59, "287082"), (1111111109, "081804"), (1234567890, "005924"), (2000000000, "279037")],
)
def test_codes_match_rfc_6238_vectors_truncated_to_six_digits(at: int, expected: str) -> None:
    assert code_at(RFC_SECRET, time_step(at)) == expected


def test_a_new_secret_is_160_random_bits_shown_as_base32() -> None:
    one, two = new_secret(), new_secret()
    assert len(one) == SECRET_BYTES == 20 and one != two
    text = secret_text(one)
    assert "=" not in text and base64.b32decode(text) == one


def test_the_provisioning_uri_names_issuer_account_and_the_app_defaults() -> None:
    uri = provisioning_uri(SECRET, "alice@gw1")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    assert parts.path == "/pam:alice%40gw1"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query == {
        "secret": secret_text(SECRET),
        "issuer": "pam",
        "algorithm": "SHA1",
        "digits": "6",
        "period": "30",
    }


def test_the_current_code_is_accepted_and_remembered_as_the_last_step() -> None:
    verdict = check_code(SECRET, app_code(SECRET, NOW), CodeState(), now=NOW)
    assert verdict.outcome is Outcome.ACCEPTED
    assert verdict.step == time_step(NOW)
    assert verdict.state == CodeState(time_step(NOW), ())


@pytest.mark.parametrize("offset", [-TIME_STEP, TIME_STEP])
def test_a_code_one_step_either_side_is_accepted(offset: int) -> None:
    verdict = check_code(SECRET, app_code(SECRET, NOW + offset), CodeState(), now=NOW)
    assert verdict.outcome is Outcome.ACCEPTED
    assert verdict.step == time_step(NOW + offset)


@pytest.mark.parametrize("offset", [-2 * TIME_STEP, 2 * TIME_STEP, 3600])
def test_a_code_two_steps_away_is_wrong(offset: int) -> None:
    verdict = check_code(SECRET, app_code(SECRET, NOW + offset), CodeState(), now=NOW)
    assert verdict.outcome is Outcome.WRONG
    assert verdict.state.failures == (NOW,)


def test_spaces_are_ignored_as_apps_show_them() -> None:
    code = app_code(SECRET, NOW)
    spaced = f" {code[:3]} {code[3:]} "
    assert check_code(SECRET, spaced, CodeState(), now=NOW).accepted


@pytest.mark.parametrize("code", ["", "12345", "1234567", "12a456", "١٢٣٤٥٦", "../../"])
def test_what_cannot_be_a_code_is_wrong_and_counted(code: str) -> None:
    verdict = check_code(SECRET, code, CodeState(), now=NOW)
    assert verdict.outcome is Outcome.WRONG
    assert verdict.state.failures == (NOW,)


def test_another_secrets_code_is_wrong() -> None:
    verdict = check_code(SECRET, app_code(RFC_SECRET, NOW), CodeState(), now=NOW)
    assert verdict.outcome is Outcome.WRONG


def test_the_same_code_again_is_a_replay() -> None:
    code = app_code(SECRET, NOW)
    first = check_code(SECRET, code, CodeState(), now=NOW)
    again = check_code(SECRET, code, first.state, now=NOW + 5)
    assert again.outcome is Outcome.REPLAYED
    # A replay is refused, not counted as a guess, and the state stays.
    assert again.state == first.state


def test_an_older_code_after_a_newer_one_is_a_replay_though_never_used() -> None:
    newer = check_code(SECRET, app_code(SECRET, NOW + TIME_STEP), CodeState(), now=NOW)
    older = check_code(SECRET, app_code(SECRET, NOW), newer.state, now=NOW)
    assert older.outcome is Outcome.REPLAYED


def test_the_next_steps_code_is_accepted_after_the_current_one() -> None:
    first = check_code(SECRET, app_code(SECRET, NOW), CodeState(), now=NOW)
    later = NOW + TIME_STEP
    second = check_code(SECRET, app_code(SECRET, later), first.state, now=later)
    assert second.accepted and second.step == time_step(NOW) + 1


def test_wrong_codes_pause_every_code_until_the_window_passes() -> None:
    state = CodeState()
    for n in range(MAX_FAILED_CODES):
        verdict = check_code(SECRET, "000000", state, now=NOW + n)
        assert verdict.outcome is Outcome.WRONG
        state = verdict.state
    # Now even the right code is refused, before it is looked at.
    later = NOW + 60
    paused = check_code(SECRET, app_code(SECRET, later), state, now=later)
    assert paused.outcome is Outcome.THROTTLED
    assert paused.retry_after == pytest.approx(FAILURE_WINDOW_SECONDS - 60)
    assert paused.state.last_step is None
    # When the oldest failure leaves the window, one more try is allowed.
    free = NOW + FAILURE_WINDOW_SECONDS + 1
    verdict = check_code(SECRET, app_code(SECRET, free), paused.state, now=free)
    assert verdict.accepted
    assert verdict.state.failures == ()


def test_failures_slide_only_the_recent_ones_count() -> None:
    old = CodeState(None, tuple(NOW - FAILURE_WINDOW_SECONDS - i for i in range(10)))
    verdict = check_code(SECRET, "000000", old, now=NOW)
    assert verdict.outcome is Outcome.WRONG
    assert verdict.state.failures == (NOW,)


def test_an_accepted_code_clears_the_failures() -> None:
    state = CodeState(None, (NOW - 3, NOW - 2))
    assert check_code(SECRET, app_code(SECRET, NOW), state, now=NOW).state.failures == ()


def test_refusals_say_why_without_the_code() -> None:
    code = app_code(SECRET, NOW)
    wrong = refusal(check_code(SECRET, "000001", CodeState(), now=NOW))
    replay = refusal(check_code(SECRET, code, CodeState(time_step(NOW)), now=NOW))
    paused = refusal(check_code(SECRET, code, CodeState(None, (NOW,) * 5), now=NOW + 1))
    assert [(e.code, e.message) for e in (wrong, replay, paused)] == [
        ("mfa_invalid", "wrong second-factor code"),
        ("mfa_replayed", "this second-factor code was already used"),
        ("mfa_throttled", "too many wrong second-factor codes"),
    ]
    assert paused.hint == "try again in 299 s"
    for error in (wrong, replay, paused):
        assert isinstance(error, MfaRefused)
        assert code not in f"{error.message} {error.hint}"
