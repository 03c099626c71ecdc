"""Why a session or a connection ended: the one vocabulary, end to end.

The relay decides a connection's reason, the grant service a session's, the
store keeps both and the API and CLI show them; every layer uses these enums
(``StrEnum``: each member is its stored text), so a reason cannot be spelled two
ways. Stored rows and audit records hold the member's value.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "CONNECTION_END_REASONS",
    "CONNECTION_REASON_AT_SESSION_END",
    "SESSION_END_REASONS",
    "ConnectionEndReason",
    "SessionEndReason",
]


class SessionEndReason(StrEnum):
    """Why an access session ended."""

    #: its owner let go of it (Ctrl+C), or its CLI stopped calling in
    CLIENT_ENDED = "client_ended"
    EXPIRED = "expired"
    GATEWAY_SHUTDOWN = "gateway_shutdown"
    ERROR = "error"
    #: left open by a gateway that died; closed at the next start
    GATEWAY_CRASH = "gateway_crash"
    #: its principal was disabled or removed by an administrator
    REVOKED = "revoked"


class ConnectionEndReason(StrEnum):
    """Why one client connection inside a session ended."""

    CLIENT_CLOSED = "client_closed"
    SERVER_CLOSED = "server_closed"
    #: its session was ended by its owner (or its CLI went away)
    SESSION_ENDED = "session_ended"
    EXPIRED = "expired"
    GATEWAY_SHUTDOWN = "gateway_shutdown"
    #: cut because the audit trail could not be written (fail-closed mode)
    AUDIT_UNAVAILABLE = "audit_unavailable"
    ERROR = "error"
    GATEWAY_CRASH = "gateway_crash"
    #: no traffic either way, and no query running, for the policy's idle limit
    IDLE_TIMEOUT = "idle_timeout"
    #: cut because the gateway could not reach its store for longer than its grace
    #: (``store_unreachable_strict``): other gateways may have ended its session
    STORE_UNAVAILABLE = "store_unavailable"
    #: another gateway took its grant over (the CLI failed over to it); the
    #: client reconnects through that one
    GRANT_MOVED = "grant_moved"


SESSION_END_REASONS: Final[frozenset[str]] = frozenset(SessionEndReason)
CONNECTION_END_REASONS: Final[frozenset[str]] = frozenset(ConnectionEndReason)

#: The reason a connection still open when its session ends is closed with.
CONNECTION_REASON_AT_SESSION_END: Final[dict[SessionEndReason, ConnectionEndReason]] = {
    SessionEndReason.CLIENT_ENDED: ConnectionEndReason.SESSION_ENDED,
    SessionEndReason.EXPIRED: ConnectionEndReason.EXPIRED,
    SessionEndReason.GATEWAY_SHUTDOWN: ConnectionEndReason.GATEWAY_SHUTDOWN,
    SessionEndReason.ERROR: ConnectionEndReason.ERROR,
    SessionEndReason.GATEWAY_CRASH: ConnectionEndReason.GATEWAY_CRASH,
    SessionEndReason.REVOKED: ConnectionEndReason.SESSION_ENDED,
}
