"""The ``X-Pam-Signature`` header: which webhook secret signed which body, and when.

``X-Pam-Signature: t=<unix seconds>,v1=<hex>`` where ``v1`` is
``HMAC-SHA256(secret, f"{t}.".encode() + raw_body)``, the secret taken as its
UTF-8 bytes (it is the URL-safe text ``pam webhook add`` showed). Binding the
time into the MAC lets a receiver refuse a replayed request
(:data:`DEFAULT_TOLERANCE_SECONDS`); the delivery id (``X-Pam-Delivery``) lets it
drop a retry of one it already handled.

Invariants:

* Every attempt is signed afresh with the time of that attempt.
* Checks compare with :func:`hmac.compare_digest`, never ``==``.
* A header that cannot be parsed is a failed check, never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = [
    "DEFAULT_TOLERANCE_SECONDS",
    "SCHEME",
    "SIGNATURE_HEADER",
    "signature",
    "signature_header",
    "verify_signature",
]

SIGNATURE_HEADER: Final = "X-Pam-Signature"
#: The one signature scheme today; a receiver ignores schemes it does not know.
SCHEME: Final = "v1"
#: How far a signature's time may be from the receiver's clock.
DEFAULT_TOLERANCE_SECONDS: Final = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}.".encode() + body`` under *secret*."""
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},{SCHEME}={signature(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """Whether *header* signs *body* under *secret* at a time within *tolerance* of *now*."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == SCHEME:
            candidates.append(value)
    if timestamp is None or abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
