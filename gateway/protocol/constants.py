"""Protocol constants, named as PostgreSQL names them.

Sources: PostgreSQL 15 docs, 55.7 "Message Formats" and 55.2.1 "Start-up";
``src/include/libpq/pqcomm.h`` for the special request codes.
"""

from __future__ import annotations

from enum import IntEnum

#: The 5-byte header of every message after startup: type byte + int32 length
#: (the length counts itself but not the type byte).
HEADER_SIZE = 5
#: Startup-phase packets have no type byte: int32 length + int32 code/version.
STARTUP_HEADER_SIZE = 8

#: ``PG_PROTOCOL(3, 0)``
PROTOCOL_3_0 = (3 << 16) | 0
#: ``PG_PROTOCOL(3, 2)``, PostgreSQL 18 (variable-length cancel keys).
PROTOCOL_3_2 = (3 << 16) | 2
#: ``PG_PROTOCOL(1234, 5678)``
CANCEL_REQUEST_CODE = (1234 << 16) | 5678
#: ``PG_PROTOCOL(1234, 5679)``
SSL_REQUEST_CODE = (1234 << 16) | 5679
#: ``PG_PROTOCOL(1234, 5680)``
GSSENC_REQUEST_CODE = (1234 << 16) | 5680

#: The server's own ``MAX_STARTUP_PACKET_LENGTH``: a startup packet longer than
#: this is a protocol violation, checked before its body is awaited.
MAX_STARTUP_PACKET_LENGTH = 10_000
#: Authentication exchanges are small; a longer message during authentication
#: is hostile or broken.
MAX_AUTH_MESSAGE_LENGTH = 64 * 1024
#: Default cap for an ordinary message during startup-phase handling.
DEFAULT_MAX_MESSAGE_LENGTH = 1 << 30


class FrontendType(IntEnum):
    """First byte of messages sent by the frontend (client)."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    #: PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse share 'p'.
    PASSWORD_MESSAGE = ord("p")
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BackendType(IntEnum):
    """First byte of messages sent by the backend (server)."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    COPY_BOTH_RESPONSE = ord("W")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


class AuthRequest(IntEnum):
    """The int32 code inside an Authentication ('R') message."""

    OK = 0
    KERBEROS_V5 = 2
    CLEARTEXT_PASSWORD = 3
    MD5_PASSWORD = 5
    GSS = 7
    GSS_CONTINUE = 8
    SSPI = 9
    SASL = 10
    SASL_CONTINUE = 11
    SASL_FINAL = 12


class TransactionStatus(IntEnum):
    """The status byte of ReadyForQuery."""

    IDLE = ord("I")
    IN_TRANSACTION = ord("T")
    FAILED = ord("E")


#: Single-byte answers to SSLRequest / GSSENCRequest.
SSL_ACCEPTED = b"S"
SSL_REFUSED = b"N"


class ErrorField(IntEnum):
    """Field codes in ErrorResponse / NoticeResponse (55.8)."""

    SEVERITY = ord("S")
    SEVERITY_NONLOCALIZED = ord("V")
    SQLSTATE = ord("C")
    MESSAGE = ord("M")
    DETAIL = ord("D")
    HINT = ord("H")
    POSITION = ord("P")
    WHERE = ord("W")
