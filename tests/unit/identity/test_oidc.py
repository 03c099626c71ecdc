"""The relying party's rules (gateway.identity.oidc): PKCE against RFC 7636's
vector, the provider's metadata checks, and the ID token's validation with
keys made here (the integration tests use a real provider; these provoke what
a well-behaved one never sends: another audience, a forged signature, HS256)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.errors import InvalidRequest
from gateway.identity.oidc import (
    USER_CODE_ALPHABET,
    KeyNotFound,
    ProviderMetadata,
    SignInRefused,
    authorization_url,
    check_endpoint,
    claimed_groups,
    discovery_url,
    format_user_code,
    new_user_code,
    normalise_user_code,
    pkce_challenge,
    pkce_verifier,
    user_name,
    validate_id_token,
)

ISSUER = "https://idp.example.com/realms/corp"
CLIENT = "pam-gateway"
NONCE = "n-0S6_WzA2Mj"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**public, "kid": kid, "use": "sig", "alg": "RS256"}


JWKS = {"keys": [jwk(KEY, "k1")]}
METADATA = ProviderMetadata.parse(
    {
        "issuer": ISSUER,
        "authorization_endpoint": ISSUER + "/auth",
        "token_endpoint": ISSUER + "/token",
        "jwks_uri": ISSUER + "/certs",
        "id_token_signing_alg_values_supported": ["RS256", "HS256", "none"],
    },
    issuer=ISSUER,
)


def token(key: Any = KEY, *, kid: str | None = "k1", alg: str = "RS256", **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "248289761001",
        "aud": CLIENT,
        "exp": now + 300,
        "iat": now,
        "nonce": NONCE,
        "preferred_username": "lena",
        "groups": ["dba", "ops"],
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def validate(id_token: str, jwks: Any = JWKS, nonce: str = NONCE) -> dict[str, Any]:
    return validate_id_token(
        id_token, jwks, metadata=METADATA, client_id=CLIENT, nonce=nonce
    ).claims


# --- PKCE -----------------------------------------------------------------------------


def test_the_s256_challenge_is_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_a_verifier_is_43_unreserved_characters_and_new_each_time() -> None:
    first, second = pkce_verifier(), pkce_verifier()
    assert len(first) == 43 and first != second
    assert set(first) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def test_the_authorization_request_carries_state_nonce_and_the_s256_challenge() -> None:
    url = authorization_url(
        METADATA,
        client_id=CLIENT,
        redirect_uri="https://pam.example.com/v1/sso/callback",
        scopes="openid profile",
        state="st",
        nonce="nn",
        verifier="dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
    )
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == ISSUER + "/auth"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query == {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": "https://pam.example.com/v1/sso/callback",
        "scope": "openid profile",
        "state": "st",
        "nonce": "nn",
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
    }


# --- the provider's metadata ------------------------------------------------------------


def test_discovery_is_under_the_issuer_and_its_issuer_must_be_identical() -> None:
    assert discovery_url(ISSUER + "/") == ISSUER + "/.well-known/openid-configuration"
    with pytest.raises(InvalidRequest, match="another issuer"):
        ProviderMetadata.parse({"issuer": ISSUER + "/"}, issuer=ISSUER)


def test_only_asymmetric_algorithms_are_kept() -> None:
    assert METADATA.algorithms == ("RS256",)
    with pytest.raises(InvalidRequest, match="no algorithm"):
        ProviderMetadata.parse(
            {
                "issuer": ISSUER,
                "authorization_endpoint": ISSUER + "/a",
                "token_endpoint": ISSUER + "/t",
                "jwks_uri": ISSUER + "/k",
                "id_token_signing_alg_values_supported": ["HS256"],
            },
            issuer=ISSUER,
        )


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://idp.example.com", True),
        ("http://127.0.0.1:9400", True),
        ("http://localhost:9400", True),
        ("http://[::1]:9400", True),
        ("http://idp.example.com", False),
        ("ftp://idp.example.com", False),
        ("https://user:pw@idp.example.com", False),
        ("https:///no-host", False),
    ],
)
def test_endpoints_are_https_or_loopback_http(url: str, ok: bool) -> None:
    if ok:
        assert check_endpoint(url, "issuer") == url
    else:
        with pytest.raises(InvalidRequest):
            check_endpoint(url, "issuer")


def test_an_endpoint_of_the_document_over_plain_http_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="token_endpoint"):
        ProviderMetadata.parse(
            {
                "issuer": ISSUER,
                "authorization_endpoint": ISSUER + "/a",
                "token_endpoint": "http://idp.example.com/t",
                "jwks_uri": ISSUER + "/k",
            },
            issuer=ISSUER,
        )


# --- the ID token -----------------------------------------------------------------------


def test_a_good_token_gives_its_claims() -> None:
    claims = validate(token())
    assert claims["sub"] == "248289761001"
    assert claimed_groups(claims, "groups") == ("dba", "ops")


@pytest.mark.parametrize(
    ("id_token", "message"),
    [
        (lambda: token(aud="another-client"), "not for this gateway"),
        (lambda: token(aud=["another-client", "third"]), "not for this gateway"),
        (lambda: token(aud=[CLIENT, "third"]), "several audiences"),
        (lambda: token(aud=[CLIENT, "third"], azp="third"), "several audiences"),
        (lambda: token(iss="https://evil.example.com"), "another issuer"),
        (lambda: token(exp=int(time.time()) - 3600), "expired"),
        (lambda: token(iat=int(time.time()) + 3600), "not valid yet"),
        (lambda: token(nonce="someone-elses"), "nonce"),
        (lambda: token(nonce=None), "nonce"),
        (lambda: token(sub=None), r"lacks a required claim \(sub\)"),
        (lambda: token(iat=None), r"lacks a required claim \(iat\)"),
        (lambda: token(OTHER_KEY), "signature does not verify"),
        (lambda: "not.a.token", "malformed"),
    ],
)
def test_a_bad_token_is_refused_saying_why(id_token: Callable[[], str], message: str) -> None:
    # Made when the test runs, not when it is collected: tokens expire.
    made = id_token()
    with pytest.raises(SignInRefused, match=message):
        validate(made)


def test_several_audiences_are_accepted_when_authorised_for_the_gateway() -> None:
    assert validate(token(aud=[CLIENT, "third"], azp=CLIENT))["azp"] == CLIENT


def test_the_clock_may_be_a_little_off() -> None:
    assert validate(token(exp=int(time.time()) - 30, iat=int(time.time()) - 400))


def test_hmac_and_none_are_refused_even_when_announced() -> None:
    # An HS256 token keyed by something public (here the public key's PEM) is
    # the classic confusion attack; the metadata kept RS256 only.
    forged = jwt.encode(
        {"iss": ISSUER, "sub": "x", "aud": CLIENT, "exp": 2**31, "iat": 0, "nonce": NONCE},
        JWKS["keys"][0]["n"],
        algorithm="HS256",
    )
    with pytest.raises(SignInRefused, match="HS256"):
        validate(forged)
    unsigned = jwt.encode({"sub": "x"}, None, algorithm="none")
    with pytest.raises(SignInRefused, match="none"):
        validate(unsigned)


def test_an_unknown_key_id_asks_for_the_key_set_again() -> None:
    with pytest.raises(KeyNotFound):
        validate(token(kid="k2"))
    rotated = {"keys": [jwk(OTHER_KEY, "k2"), jwk(KEY, "k1")]}
    assert validate(token(OTHER_KEY, kid="k2"), rotated)["sub"] == "248289761001"


def test_without_a_key_id_every_key_of_the_set_is_tried() -> None:
    both = {"keys": [jwk(OTHER_KEY, "k2"), jwk(KEY, "k1")]}
    assert validate(token(kid=None), both)["sub"] == "248289761001"


def test_a_key_set_with_no_usable_key_is_refused() -> None:
    with pytest.raises(SignInRefused, match="no usable key"):
        validate(token(), {"keys": []})


def test_an_ec_key_verifies_es256() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    metadata = ProviderMetadata.parse(
        {
            "issuer": ISSUER,
            "authorization_endpoint": ISSUER + "/a",
            "token_endpoint": ISSUER + "/t",
            "jwks_uri": ISSUER + "/k",
            "id_token_signing_alg_values_supported": ["ES256"],
        },
        issuer=ISSUER,
    )
    signed = token(key, kid="e1", alg="ES256")
    claims = validate_id_token(
        signed,
        {"keys": [{**public, "kid": "e1"}]},
        metadata=metadata,
        client_id=CLIENT,
        nonce=NONCE,
    )
    assert claims.subject == "248289761001"


# --- claims ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "groups"),
    [
        (["b", "a", "b", ""], ("a", "b")),
        ("solo", ("solo",)),
        (None, ()),
        (42, ()),
        ([1, {"x": 1}, "ok"], ("ok",)),
        (["x" * 256, "fine"], ("fine",)),
    ],
)
def test_the_groups_claim_is_strings_only(value: object, groups: tuple[str, ...]) -> None:
    assert claimed_groups({"groups": value}, "groups") == groups


@pytest.mark.parametrize(
    ("claims", "name"),
    [
        ({"preferred_username": "Lena", "email": "x@y"}, "lena"),
        ({"email": "Jean.Dupont@corp.example"}, "jean.dupont"),
        ({"preferred_username": "lena@corp.example"}, "lena"),
        ({"preferred_username": "Zoë Brontë"}, "zoe-bronte"),
        ({"preferred_username": "--ops--"}, "ops"),
        ({"preferred_username": "a" * 100}, "a" * 63),
    ],
)
def test_a_user_name_is_made_from_preferred_username_or_email(
    claims: dict[str, Any], name: str
) -> None:
    assert user_name(claims) == name


@pytest.mark.parametrize("claims", [{}, {"preferred_username": "   "}, {"email": "@@@"}])
def test_no_usable_name_is_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(SignInRefused):
        user_name(claims)


# --- user codes -------------------------------------------------------------------------


def test_user_codes_are_eight_consonants_shown_in_two_halves() -> None:
    code = new_user_code()
    assert len(code) == 8 and set(code) <= set(USER_CODE_ALPHABET)
    shown = format_user_code(code)
    assert shown[4] == "-" and normalise_user_code(shown.lower()) == code
    assert normalise_user_code(" bcdf - ghjk ") == "BCDFGHJK"
