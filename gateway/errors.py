"""The gateway's error hierarchy.

One root, :class:`GatewayError`. Errors that a PostgreSQL client should see carry a
SQLSTATE, a message a person can act on and an optional hint; the listener turns
them into an ``ErrorResponse``. No error message ever contains a secret: callers
pass names (resource, account), never passwords.
"""

from __future__ import annotations

from gateway.protocol.sqlstate import SqlState


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    sqlstate: str = SqlState.INTERNAL_ERROR
    #: a machine-readable refinement of the error's type that clients act on
    #: (``mfa_required``: ask for a second-factor code and retry); the API sends
    #: it as the error's ``code`` when set
    code: str | None = None

    def __init__(self, message: str, *, hint: str | None = None, sqlstate: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if sqlstate is not None:
            self.sqlstate = sqlstate


class ConfigError(GatewayError):
    """The gateway was misused or misconfigured (our side, not a peer's)."""


class NotFound(GatewayError):
    """A named object (resource, account, session) does not exist."""


class AlreadyExists(GatewayError):
    """A named object already exists."""


class InvalidRequest(GatewayError):
    """A request to the control API was well-formed but not acceptable."""


class Unauthenticated(GatewayError):
    """The caller is not known: no token, a wrong, expired or revoked one, a bad password."""


class Forbidden(GatewayError):
    """The caller is known but may not do this (role, policy, disabled)."""


class StoreError(GatewayError):
    """The database behind the state store failed (unreachable, locked, broken)."""


class UpstreamError(GatewayError):
    """Reaching or authenticating to the upstream PostgreSQL server failed."""

    sqlstate = SqlState.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        hint: str | None = None,
        sqlstate: str | None = None,
        raw_error: bytes | None = None,
    ):
        super().__init__(message, hint=hint, sqlstate=sqlstate)
        #: one of: dns, refused, timeout, tls, auth, protocol, unsupported_auth, server
        self.kind = kind
        #: the server's own ErrorResponse, when it sent one, to relay unchanged
        self.raw_error = raw_error
