"""Password hashes and API tokens.

* Passwords are hashed with argon2id (argon2-cffi's defaults: RFC 9106's low
  memory profile); a login for an unknown name still runs one verification, so
  its timing does not tell which names exist.
* API tokens are 256 random bits with a recognisable prefix. The store keeps
  only their SHA-256: a token is high-entropy, so a slow hash buys nothing, and
  the lookup stays one indexed equality.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.errors import InvalidRequest

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "TOKEN_PREFIX",
    "hash_password",
    "new_token",
    "token_digest",
    "verify_password",
]

TOKEN_PREFIX: Final = "pam_"
_hasher = PasswordHasher()
#: Verified against when a name is unknown, so both paths cost the same.
_DUMMY_HASH: Final = _hasher.hash(secrets.token_urlsafe(16))


#: The shortest password a user may have (a sign-in is throttled, not unguessable).
MIN_PASSWORD_LENGTH: Final = 8


def hash_password(password: str) -> str:
    """The argon2id hash of a new password; refuses one shorter than the minimum."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidRequest(f"a password must be at least {MIN_PASSWORD_LENGTH} characters long")
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Whether *password* matches; with no stored hash, a dummy verification and False."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
