"""What a refusal is: the one vocabulary every layer uses for a turned-away caller.

A refusal is an API call answered 401/403 or a connection to a grant's port
turned away before anything was relayed. The API and the listeners describe
each one as a :class:`Refusal`; :mod:`gateway.audit.refusals` records them
(summarising floods) and the store keeps them in the append-only ``refusals``
table. Kept outside the layered packages, like :mod:`gateway.reasons`, so the
network layer can name a refusal without importing the audit above it.

Invariants: a refusal's ``message`` is the gateway's own text (never a token,
password or anything the caller sent besides names); ``source`` is the peer's
address without its port, so that a flood from one host is one source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

__all__ = ["Refusal", "RefusalPlace", "RefusalReason", "address_host"]


class RefusalPlace(StrEnum):
    """Where a caller was turned away."""

    API = "api"
    LISTENER = "listener"
    #: the tunnel endpoint for CLIs on other hosts
    TUNNEL = "tunnel"


class RefusalReason(StrEnum):
    """Why, as a short code (stored as its value)."""

    # -- the control API (401 unless said otherwise) --
    NO_TOKEN = "no_token"
    #: a token the gateway never issued
    BAD_TOKEN = "bad_token"
    EXPIRED_TOKEN = "expired_token"
    REVOKED_TOKEN = "revoked_token"
    #: a token of a disabled (or removed) user
    DISABLED_USER = "disabled_user"
    #: the local token, from another host
    LOCAL_TOKEN_REMOTE = "local_token_remote"
    #: `pam login` with a wrong name or password
    BAD_PASSWORD = "bad_password"
    #: a single sign-on refused: an unknown or replayed state, a bad ID token, a
    #: provider's refusal, a taken name, a disabled user, a wrong device code
    SSO_REFUSED = "sso_refused"
    #: 403: a known caller whose role does not allow the call
    FORBIDDEN = "forbidden"
    #: 403: an access request that no policy allows (or one beyond its limits)
    NO_POLICY = "no_policy"
    #: a second factor needed and not given (or none enrolled where one is needed)
    MFA_REQUIRED = "mfa_required"
    #: a second-factor code refused: wrong, already used, or too many wrong ones
    BAD_MFA_CODE = "bad_mfa_code"
    # -- a grant's port --
    WRONG_USER = "wrong_user"
    WRONG_DATABASE = "wrong_database"
    REPLICATION = "replication"
    #: the grant has ended (expired, closed, revoked)
    GRANT_ENDED = "grant_ended"
    #: the gateway as a whole refuses connections (audit unavailable, shutdown)
    GATEWAY_REFUSING = "gateway_refusing"
    STARTUP_GARBAGE = "startup_garbage"
    STARTUP_TIMEOUT = "startup_timeout"
    TLS_FAILED = "tls_failed"
    #: a process of another OS user than the grant's owner (or of none found)
    NOT_OWNER = "not_owner"
    #: a CancelRequest from such a process (dropped, never forwarded)
    NOT_OWNER_CANCEL = "not_owner_cancel"
    UNKNOWN_CANCEL_KEY = "unknown_cancel_key"
    # -- the tunnel --
    #: the TLS handshake failed: no certificate, one the gateway CA did not sign, silence
    TUNNEL_HANDSHAKE = "tunnel_handshake"
    #: a CA-signed certificate that names no live grant, or not the one issued for it
    CERTIFICATE_REFUSED = "certificate_refused"
    # -- the recorder itself --
    #: refusals of more (source, reason) pairs in one interval than it tracks
    OVERFLOW = "overflow"


@dataclass(frozen=True, slots=True)
class Refusal:
    """One turned-away call or connection, as the place that refused it saw it."""

    place: RefusalPlace
    reason: RefusalReason
    message: str
    #: the peer's address without its port ("[local]" for a Unix socket)
    source: str
    #: the principal (or OS uid, ``uid:N``) when known
    who: str | None = None
    #: the grant's session, for a listener's refusal
    session_id: str | None = None
    #: the event name of its log line (kept from before refusals were recorded)
    event: str = "refused"
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def address_host(address: str) -> str:
    """``host`` of ``host:port`` / ``[v6]:port`` / ``v6:port`` as the listeners
    write them; anything without a port is returned as it is."""
    if address.startswith("["):
        end = address.find("]")
        return address[1:end] if end > 0 and address != "[local]" else address
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() else address
