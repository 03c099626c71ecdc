"""SQLSTATE codes the gateway itself reports (PostgreSQL 15 docs, Appendix A).

One enum, used everywhere a code is written: a ``StrEnum``, so a member is the
five-character code itself on the wire, in the store and in comparisons.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SqlState"]


class SqlState(StrEnum):
    """The codes pam reports; the names are PostgreSQL's (errcodes.txt)."""

    WARNING = "01000"
    CONNECTION_EXCEPTION = "08000"
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001"
    SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION = "08004"
    CONNECTION_FAILURE = "08006"
    PROTOCOL_VIOLATION = "08P01"
    FEATURE_NOT_SUPPORTED = "0A000"
    INVALID_AUTHORIZATION_SPECIFICATION = "28000"
    INVALID_PASSWORD = "28P01"
    INVALID_CATALOG_NAME = "3D000"
    TOO_MANY_CONNECTIONS = "53300"
    QUERY_CANCELED = "57014"
    ADMIN_SHUTDOWN = "57P01"
    CANNOT_CONNECT_NOW = "57P03"
    #: what PostgreSQL's own idle_session_timeout ends a session with
    IDLE_SESSION_TIMEOUT = "57P05"
    SYSTEM_ERROR = "58000"
    INTERNAL_ERROR = "XX000"
