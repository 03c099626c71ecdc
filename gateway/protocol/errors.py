"""Protocol errors, split h11-style by whose fault they are.

:class:`ProtocolError` means the *peer* sent something that violates the
protocol (SQLSTATE 08P01 when reported to a client). :class:`ProtocolUsageError`
means *we* called the sans-IO API out of order: a bug in the caller.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.protocol.sqlstate import SqlState


class ProtocolError(GatewayError):
    """The remote peer violated the protocol."""

    sqlstate = SqlState.PROTOCOL_VIOLATION


class ProtocolUsageError(GatewayError):
    """The local caller used the sans-IO API incorrectly."""
