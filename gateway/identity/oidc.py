"""OpenID Connect, the relying party's rules: no I/O.

What the single sign-on service (:mod:`.sso`) needs to speak to an identity
provider, as pure functions over what it fetched: the provider's metadata
(OpenID Connect Discovery 1.0, section 3), the authorization request with
PKCE (RFC 7636, S256 only), the ID token's validation (OpenID Connect Core
1.0, section 3.1.3.7; signatures by PyJWT against the provider's JWKS), the
claims a sign-in reads, and device-flow user codes (RFC 8628, section 6.1).

Invariants:
* An ID token is accepted only when signed with an asymmetric algorithm the
  provider announces, by a key of its JWKS, with ``iss`` equal to the
  configured issuer, ``aud`` naming the client (and ``azp`` the client when
  there are several audiences), ``exp`` and ``iat`` within :data:`LEEWAY_SECONDS`,
  a ``sub``, and the attempt's ``nonce`` (compared in constant time).
  ``alg: none`` and HMAC algorithms (keyed by the client secret) are refused.
* The provider's endpoints are HTTPS; plain HTTP only on a loopback host (a
  provider on the gateway's own machine, as in the tests).
* A refusal says what failed, never the token, the code or a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

import jwt
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWKSetError,
    PyJWTError,
)

from gateway.errors import InvalidRequest, Unauthenticated

__all__ = [
    "ALLOWED_ALGORITHMS",
    "LEEWAY_SECONDS",
    "USER_CODE_ALPHABET",
    "IdentityClaims",
    "KeyNotFound",
    "ProviderMetadata",
    "SignInRefused",
    "authorization_url",
    "check_endpoint",
    "claimed_groups",
    "discovery_url",
    "format_user_code",
    "new_user_code",
    "normalise_user_code",
    "pkce_challenge",
    "pkce_verifier",
    "user_name",
    "validate_id_token",
]

#: Clock difference tolerated on ``exp`` and ``iat`` (seconds).
LEEWAY_SECONDS: Final = 60
#: Signature algorithms an ID token may use: asymmetric only.
ALLOWED_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: RFC 8628, section 6.1: consonants only (no vowels: no words), easy to type.
USER_CODE_ALPHABET: Final = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH: Final = 8
#: At most this many values of the groups claim are read (the rest are ignored).
MAX_GROUP_VALUES: Final = 256
MAX_CLAIM_VALUE_LENGTH: Final = 255
_NAME_LENGTH: Final = 63
_NOT_NAME = re.compile(r"[^a-z0-9_.-]+")
_DISCOVERY_PATH: Final = "/.well-known/openid-configuration"


class SignInRefused(Unauthenticated):
    """A single sign-on attempt that did not end in a session: why, and whom it
    named when that is known (for the refusal record)."""

    def __init__(self, message: str, *, hint: str | None = None, who: str | None = None):
        super().__init__(message, hint=hint)
        self.who = who


class KeyNotFound(SignInRefused):
    """The ID token names a key the JWKS in hand does not have (fetch it again)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str, what: str) -> str:
    """*url* if it may be an identity provider's endpoint: HTTPS, or HTTP on loopback."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidRequest(f"the {what} is not a URL") from None
    if not parts.hostname or parts.fragment or parts.username or parts.password:
        raise InvalidRequest(f"the {what} must be an https:// URL with a host and no fragment")
    if parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname)):
        return url
    raise InvalidRequest(
        f"the {what} must use https:// (plain http only on this machine's loopback)"
    )


def discovery_url(issuer: str) -> str:
    """Discovery section 4: the issuer with ``/.well-known/openid-configuration`` appended."""
    return issuer.rstrip("/") + _DISCOVERY_PATH


@dataclass(frozen=True)
class ProviderMetadata:
    """What the gateway uses of a provider's discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    #: client authentication at the token endpoint, as announced (default basic)
    token_auth_methods: tuple[str, ...]
    #: signature algorithms of ID tokens, as announced, kept to the allowed ones
    algorithms: tuple[str, ...]

    @classmethod
    def parse(cls, document: Any, *, issuer: str) -> ProviderMetadata:
        """Check a discovery document against the configured *issuer* (section 4.3:
        they must be identical) and keep what is used."""
        if not isinstance(document, dict):
            raise InvalidRequest("the provider's discovery document is not a JSON object")
        if document.get("issuer") != issuer:
            raise InvalidRequest(
                "the provider's discovery document names another issuer",
                hint="--issuer must be exactly the issuer the provider announces"
                f" ({_printable(document.get('issuer'))})",
            )
        endpoints = {}
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = document.get(key)
            if not isinstance(value, str):
                raise InvalidRequest(f"the provider's discovery document has no {key}")
            endpoints[key] = check_endpoint(value, f"provider's {key}")
        methods = document.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        announced = document.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = tuple(a for a in announced if a in ALLOWED_ALGORITHMS)
        if not algorithms:
            raise InvalidRequest(
                "the provider signs ID tokens with no algorithm the gateway accepts"
                f" (it accepts {', '.join(sorted(ALLOWED_ALGORITHMS))})"
            )
        return cls(
            issuer=issuer,
            authorization_endpoint=endpoints["authorization_endpoint"],
            token_endpoint=endpoints["token_endpoint"],
            jwks_uri=endpoints["jwks_uri"],
            token_auth_methods=tuple(str(m) for m in methods),
            algorithms=algorithms,
        )

    @property
    def client_auth(self) -> str:
        """``client_secret_basic`` unless the provider takes only ``client_secret_post``."""
        if "client_secret_basic" in self.token_auth_methods:
            return "client_secret_basic"
        if "client_secret_post" in self.token_auth_methods:
            return "client_secret_post"
        return "client_secret_basic"


def _printable(value: object) -> str:
    text = str(value)[:200]
    return "".join(c if c.isprintable() else "?" for c in text)


# --- PKCE (RFC 7636) ------------------------------------------------------------------


def pkce_verifier() -> str:
    """Section 4.1: 43 characters of the unreserved set (256 random bits)."""
    return secrets.token_urlsafe(32)


def pkce_challenge(verifier: str) -> str:
    """Section 4.2, ``S256``: BASE64URL(SHA256(ASCII(code_verifier))), unpadded."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(
    metadata: ProviderMetadata,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: str,
    state: str,
    nonce: str,
    verifier: str,
) -> str:
    """The authentication request (Core section 3.1.2.1) with PKCE."""
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": scopes,
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce_challenge(verifier),
            "code_challenge_method": "S256",
        }
    )
    separator = "&" if urlsplit(metadata.authorization_endpoint).query else "?"
    return f"{metadata.authorization_endpoint}{separator}{query}"


# --- the ID token ---------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityClaims:
    """What a validated ID token says about who signed in."""

    subject: str
    claims: dict[str, Any]


_REFUSALS: Final[tuple[tuple[type[PyJWTError], str], ...]] = (
    (ExpiredSignatureError, "the ID token has expired"),
    (ImmatureSignatureError, "the ID token is not valid yet (iat or nbf in the future)"),
    (InvalidIssuedAtError, "the ID token's iat is not a time"),
    (InvalidAudienceError, "the ID token is not for this gateway (audience)"),
    (InvalidIssuerError, "the ID token is from another issuer"),
    (InvalidSignatureError, "the ID token's signature does not verify"),
    (MissingRequiredClaimError, "the ID token lacks a required claim"),
)


def _refusal(exc: PyJWTError) -> SignInRefused:
    for kind, message in _REFUSALS:
        if isinstance(exc, kind):
            detail = f" ({exc.claim})" if isinstance(exc, MissingRequiredClaimError) else ""
            return SignInRefused(message + detail)
    return SignInRefused("the ID token is malformed")


def validate_id_token(
    id_token: str,
    jwks: Any,
    *,
    metadata: ProviderMetadata,
    client_id: str,
    nonce: str,
    leeway: int = LEEWAY_SECONDS,
) -> IdentityClaims:
    """The claims of *id_token* after every check of Core section 3.1.3.7 that
    applies to a confidential client on the code flow; raises
    :class:`SignInRefused` (:class:`KeyNotFound` for a key the *jwks* lacks)."""
    try:
        header = jwt.get_unverified_header(id_token)
    except PyJWTError:
        raise SignInRefused("the ID token is malformed") from None
    algorithm = header.get("alg")
    if algorithm not in metadata.algorithms:
        raise SignInRefused(
            f"the ID token is signed with {_printable(algorithm)}, which the gateway"
            " does not accept from this provider"
        )
    kid = header.get("kid")
    try:
        keys = jwt.PyJWKSet.from_dict(jwks).keys
    except (PyJWKSetError, PyJWKError):
        raise SignInRefused("the provider's JWKS has no usable key") from None
    candidates = [k for k in keys if kid is None or k.key_id == kid]
    if not candidates:
        raise KeyNotFound("the ID token is signed with a key the provider's JWKS does not list")
    claims: dict[str, Any] | None = None
    failure: PyJWTError | None = None
    for key in candidates:
        try:
            claims = jwt.decode(
                id_token,
                key=key.key,
                algorithms=[algorithm],
                audience=client_id,
                issuer=metadata.issuer,
                leeway=leeway,
                options={"require": ["iss", "sub", "aud", "exp", "iat"], "verify_iat": True},
            )
            break
        except InvalidSignatureError as exc:
            failure = exc  # another key of the set may be the one
        except PyJWTError as exc:
            raise _refusal(exc) from None
    if claims is None:
        raise _refusal(failure or InvalidSignatureError())
    audience = claims["aud"]
    if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != client_id:
        raise SignInRefused(
            "the ID token has several audiences and is not authorised for this gateway (azp)"
        )
    got = claims.get("nonce")
    if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
        raise SignInRefused("the ID token's nonce is not this sign-in's (a replayed token?)")
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject or len(subject) > MAX_CLAIM_VALUE_LENGTH:
        raise SignInRefused("the ID token's sub is empty or too long")
    return IdentityClaims(subject=subject, claims=claims)


def claimed_groups(claims: dict[str, Any], claim: str) -> tuple[str, ...]:
    """The values of the groups claim: a list of strings, or one string; anything
    else (absent, numbers, objects) is no group. Sorted, unique, bounded."""
    value = claims.get(claim)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    kept = {v for v in value[:MAX_GROUP_VALUES] if isinstance(v, str) and v}
    return tuple(sorted(v for v in kept if len(v) <= MAX_CLAIM_VALUE_LENGTH))


def user_name(claims: dict[str, Any]) -> str:
    """A pam user name for a new principal: ``preferred_username``, else ``email``;
    an address's local part only; lower case, accents dropped, runs of other
    characters as ``-``, at most 63 characters. Refused when nothing is left."""
    raw = claims.get("preferred_username") or claims.get("email")
    if not isinstance(raw, str) or not raw.strip():
        raise SignInRefused(
            "the ID token has neither preferred_username nor email to name the user",
            hint="ask for the profile or email scope (pam sso configure --scope)",
        )
    text = raw.strip()
    local = text.split("@", 1)[0] or text
    ascii_text = unicodedata.normalize("NFKD", local).encode("ascii", "ignore").decode()
    name = _NOT_NAME.sub("-", ascii_text.lower()).lstrip("-_.")[:_NAME_LENGTH].rstrip("-")
    if not name:
        raise SignInRefused(
            f"cannot make a pam user name of {_printable(raw)!r}",
            hint="the name must have letters or digits",
        )
    return name


# --- device flow user codes (RFC 8628, section 6.1) ----------------------------------


def new_user_code() -> str:
    """Eight letters of :data:`USER_CODE_ALPHABET` (about 34.6 bits)."""
    return "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))


def format_user_code(code: str) -> str:
    """``BCDF-GHJK``: as shown to the person."""
    return f"{code[:4]}-{code[4:]}"


def normalise_user_code(text: str) -> str:
    """What a person typed, as stored: upper case, dashes and spaces dropped."""
    return "".join(c for c in text.upper() if c.isalpha())[: USER_CODE_LENGTH * 2]
