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

__all__ = [
    "TOKEN_PREFIX",
    "hash_password",
    "new_token",
    "password_needs_rehash",
    "token_digest",
    "verify_password",
]

TOKEN_PREFIX: Final = "pam_"
_hasher = PasswordHasher()
#: Verified against when a name is unknown, so both paths cost the same.
_DUMMY_HASH: Final = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Whether *password* matches; with no stored hash, a dummy verification and False."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
