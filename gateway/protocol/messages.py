"""Encoders and decoders for the messages the gateway itself needs to read or write.

The relay forwards everything else as original bytes. Layouts follow
PostgreSQL 15 docs, 55.7 "Message Formats"; error and notice fields follow 55.8.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.protocol.constants import (
    CANCEL_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    AuthRequest,
    BackendType,
    ErrorField,
    FrontendType,
    TransactionStatus,
)
from gateway.protocol.errors import ProtocolError

_HEADER = struct.Struct("!cI")
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_TWO_INT32 = struct.Struct("!II")


def encode_message(msg_type: int, body: bytes) -> bytes:
    """Frame ``body`` as a typed message (type byte, int32 length, body)."""
    return _HEADER.pack(bytes((msg_type,)), len(body) + 4) + body


def _cstring(value: str) -> bytes:
    raw = value.encode()
    if b"\x00" in raw:
        raise ValueError("protocol strings cannot contain NUL")
    return raw + b"\x00"


def read_cstring(body: bytes, pos: int) -> tuple[str, int]:
    """Decode a NUL-terminated UTF-8 string at ``pos``; returns it and the next offset."""
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("string field is not NUL-terminated")
    try:
        return body[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError("string field is not valid UTF-8") from exc


# --- frontend messages the gateway sends upstream ---------------------------------


def ssl_request() -> bytes:
    return _TWO_INT32.pack(8, SSL_REQUEST_CODE)


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _UINT32.pack(version)
    for key, value in params.items():
        body += _cstring(key) + _cstring(value)
    body += b"\x00"
    return _UINT32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: bytes) -> bytes:
    body = _UINT32.pack(CANCEL_REQUEST_CODE) + _UINT32.pack(pid) + secret
    return _UINT32.pack(len(body) + 4) + body


def password_message(password: bytes) -> bytes:
    """PasswordMessage: cleartext or MD5 hash, NUL-terminated."""
    return encode_message(FrontendType.PASSWORD_MESSAGE, password + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    body = _cstring(mechanism) + _INT32.pack(len(data)) + data
    return encode_message(FrontendType.PASSWORD_MESSAGE, body)


def sasl_response(data: bytes) -> bytes:
    return encode_message(FrontendType.PASSWORD_MESSAGE, data)


def terminate() -> bytes:
    return encode_message(FrontendType.TERMINATE, b"")


def query(sql: str) -> bytes:
    """A simple-protocol Query (55.7 "Query"): the SQL text, NUL-terminated."""
    return encode_message(FrontendType.QUERY, _cstring(sql))


# --- backend messages the gateway sends to local clients ------------------------


def authentication_ok() -> bytes:
    return encode_message(BackendType.AUTHENTICATION, _UINT32.pack(AuthRequest.OK))


def ready_for_query(status: TransactionStatus = TransactionStatus.IDLE) -> bytes:
    return encode_message(BackendType.READY_FOR_QUERY, bytes((status,)))


def parameter_status(name: str, value: str) -> bytes:
    return encode_message(BackendType.PARAMETER_STATUS, _cstring(name) + _cstring(value))


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return encode_message(BackendType.BACKEND_KEY_DATA, _UINT32.pack(pid) + secret)


def _error_fields(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None,
    hint: str | None,
) -> bytes:
    fields: list[tuple[ErrorField, str]] = [
        (ErrorField.SEVERITY, severity),
        (ErrorField.SEVERITY_NONLOCALIZED, severity),
        (ErrorField.SQLSTATE, sqlstate),
        (ErrorField.MESSAGE, message),
    ]
    if detail:
        fields.append((ErrorField.DETAIL, detail))
    if hint:
        fields.append((ErrorField.HINT, hint))
    body = b"".join(bytes((code,)) + _cstring(value.replace("\x00", "")) for code, value in fields)
    return body + b"\x00"


def error_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse with severity, SQLSTATE, message and optional detail/hint."""
    body = _error_fields(severity, sqlstate, message, detail, hint)
    return encode_message(BackendType.ERROR_RESPONSE, body)


def notice_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """A NoticeResponse: the fields of an ErrorResponse, but nothing fails. A
    frontend must accept one at any time, even while nominally idle or between
    CopyData messages (55.2, "Asynchronous Operations", "COPY Operations")."""
    body = _error_fields(severity, sqlstate, message, detail, hint)
    return encode_message(BackendType.NOTICE_RESPONSE, body)


# --- decoders -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorFields:
    """The decoded fields of an ErrorResponse or NoticeResponse."""

    fields: Mapping[str, str]

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")


def parse_error_fields(body: bytes) -> ErrorFields:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        code = body[pos]
        if code == 0:
            return ErrorFields(fields)
        value, pos = read_cstring(body, pos + 1)
        fields[chr(code)] = value
    raise ProtocolError("error fields are not terminated")


@dataclass(frozen=True, slots=True)
class AuthenticationRequest:
    """A decoded Authentication ('R') message: its code and the rest of its body."""

    code: int
    data: bytes


def parse_authentication(body: bytes) -> AuthenticationRequest:
    if len(body) < 4:
        raise ProtocolError("Authentication message too short")
    (code,) = _UINT32.unpack_from(body)
    return AuthenticationRequest(code, body[4:])


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    mechanisms: list[str] = []
    pos = 0
    while pos < len(data) and data[pos] != 0:
        name, pos = read_cstring(data, pos)
        mechanisms.append(name)
    return mechanisms


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstring(body, 0)
    value, _ = read_cstring(body, pos)
    return name, value


@dataclass(frozen=True, slots=True)
class BackendKey:
    """BackendKeyData: the backend's pid and its cancel secret (4 bytes in 3.0,
    up to 256 bytes in protocol 3.2)."""

    pid: int
    secret: bytes

    def __repr__(self) -> str:  # the secret is a credential for cancelling queries
        return f"BackendKey(pid={self.pid}, secret=<{len(self.secret)} bytes>)"


def parse_backend_key_data(body: bytes) -> BackendKey:
    if len(body) < 8 or len(body) > 4 + 256:
        raise ProtocolError("BackendKeyData has an invalid length")
    (pid,) = _UINT32.unpack_from(body)
    return BackendKey(pid, bytes(body[4:]))


def parse_data_row(body: bytes) -> list[bytes | None]:
    """A DataRow's column values (None for SQL NULL), as the server sent them."""
    values: list[bytes | None] = []
    pos = _INT16.size
    try:
        (count,) = _INT16.unpack_from(body, 0)
        for _ in range(count):
            (length,) = _INT32.unpack_from(body, pos)
            pos += _INT32.size
            if length < 0:
                values.append(None)
                continue
            if pos + length > len(body):
                raise ProtocolError("DataRow column runs past the message")
            values.append(body[pos : pos + length])
            pos += length
    except struct.error as exc:
        raise ProtocolError("DataRow is truncated") from exc
    if pos != len(body):
        raise ProtocolError("DataRow has bytes after its last column")
    return values


def parse_ready_for_query(body: bytes) -> TransactionStatus:
    if len(body) != 1:
        raise ProtocolError("ReadyForQuery must carry one status byte")
    try:
        return TransactionStatus(body[0])
    except ValueError as exc:
        raise ProtocolError(f"unknown transaction status {body[:1]!r}") from exc
