"""The X-Pam-Signature header: a fixed vector, the documented recipe, and refusals."""

from __future__ import annotations

import hashlib
import hmac

from gateway.notify.signing import signature, signature_header, verify_signature

SECRET = "pamwh_test-secret"
BODY = b'{"id":"d1","event":"webhook.test"}'
T = 1_800_000_000


def test_the_signature_is_hmac_sha256_of_the_time_a_dot_and_the_raw_body() -> None:
    expected = hmac.new(SECRET.encode(), b"1800000000." + BODY, hashlib.sha256).hexdigest()
    assert signature(SECRET, T, BODY) == expected
    assert signature_header(SECRET, T, BODY) == f"t=1800000000,v1={expected}"


def test_the_documented_vector_holds() -> None:
    # docs/webhooks.md gives this example, for receivers in other languages.
    assert signature_header("pamwh_example", 1700000000, b'{"id":"d1"}') == (
        "t=1700000000,v1=3f7a1b4c01ea8a4e3f5f11268e020ac6f23555ec99e3ddedadc9be8985b56d40"
    )


def test_a_signed_body_verifies_within_the_tolerance() -> None:
    header = signature_header(SECRET, T, BODY)
    assert verify_signature(SECRET, header, BODY, now=T)
    assert verify_signature(SECRET, header, BODY, now=T + 299)
    assert verify_signature(SECRET, header, BODY, now=T - 299)


def test_another_body_secret_or_time_does_not_verify() -> None:
    header = signature_header(SECRET, T, BODY)
    assert not verify_signature(SECRET, header, BODY + b" ", now=T)
    assert not verify_signature("pamwh_other", header, BODY, now=T)
    assert not verify_signature(SECRET, header.replace(f"t={T}", f"t={T + 1}"), BODY, now=T)
    # A replay long after the signing time.
    assert not verify_signature(SECRET, header, BODY, now=T + 301)


def test_a_header_that_cannot_be_parsed_fails_without_raising() -> None:
    for header in ("", "garbage", "t=abc,v1=00", f"t={T}", "v1=00", f"t={T},v1=zz"):
        assert not verify_signature(SECRET, header, BODY, now=T)


def test_unknown_schemes_are_ignored_and_any_v1_may_match() -> None:
    good = signature(SECRET, T, BODY)
    assert verify_signature(SECRET, f"t={T},v0=abc,v1=deadbeef,v1={good}", BODY, now=T)
