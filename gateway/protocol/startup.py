"""The client's first packets: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage.

PostgreSQL 15 docs, 55.2.1 "Start-up" and 55.7 (StartupMessage, SSLRequest,
GSSENCRequest, CancelRequest). These packets have no type byte: an int32 length
and then an int32 that is either a protocol version or a request code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gateway.protocol.constants import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
)
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import read_cstring

_UINT32 = struct.Struct("!I")
_MAJOR_3 = 3


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """A protocol-3 StartupMessage: requested version and the parameters."""

    version: int
    params: dict[str, str]

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def database(self) -> str | None:
        # The server defaults the database to the user name (55.7, StartupMessage).
        return self.params.get("database") or self.params.get("user")

    @property
    def is_replication(self) -> bool:
        """Whether the server would start a WAL sender for this connection.

        Mirrors the server's ``parse_bool`` (any case-insensitive prefix of
        "false" or "no", "of"/"off", "0" are false). Every other value is treated
        as replication: "database" and true values are, and the server rejects
        the rest, so erring towards replication is the safe side.
        """
        if "replication" not in self.params:
            return False
        return not _is_false(self.params["replication"])

    @property
    def minor_version(self) -> int:
        return self.version & 0xFFFF


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def _is_false(value: str) -> bool:
    """True for the values PostgreSQL's ``parse_bool`` reads as false."""
    lowered = value.lower()
    if not lowered:
        return False
    return (
        "false".startswith(lowered)
        or "no".startswith(lowered)
        or (len(lowered) >= 2 and "off".startswith(lowered))
        or lowered == "0"
    )


def parse_startup_packet(body: bytes) -> StartupPacket:
    """Decode the body (after the int32 length) of a startup-phase packet."""
    if len(body) < 4:
        raise ProtocolError("startup packet too short")
    (code,) = _UINT32.unpack_from(body)
    if code == SSL_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolError("SSLRequest has an invalid length")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolError("GSSENCRequest has an invalid length")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        # 3.0 keys are 4 bytes; protocol 3.2 allows up to 256.
        if not 12 <= len(body) <= 8 + 256:
            raise ProtocolError("CancelRequest has an invalid length")
        (pid,) = _UINT32.unpack_from(body, 4)
        return CancelRequest(pid, bytes(body[8:]))
    if code >> 16 != _MAJOR_3:
        raise ProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}:"
            f" this gateway supports protocol 3.0 and later 3.x"
        )
    return StartupMessage(code, _parse_params(body[4:]))


def _parse_params(data: bytes) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    while True:
        if pos >= len(data):
            raise ProtocolError("StartupMessage parameters are not terminated")
        if data[pos] == 0:
            if pos != len(data) - 1:
                raise ProtocolError("trailing bytes after StartupMessage parameters")
            return params
        name, pos = read_cstring(data, pos)
        if pos >= len(data):
            raise ProtocolError(f"StartupMessage parameter {name!r} has no value")
        value, pos = read_cstring(data, pos)
        params[name] = value


__all__ = [
    "PROTOCOL_3_0",
    "CancelRequest",
    "GSSENCRequest",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "parse_startup_packet",
]
