"""The client side of a connection's start, as a sans-IO state machine.

PostgreSQL 15 docs, 55.2.1 "Start-up", 55.2.7 "Canceling Requests in Progress"
and 55.2.10 "SSL Session Encryption"; the server's ``ProcessStartupPacket``
(src/backend/postmaster/postmaster.c) for which refusals are answered.

h11 style: the shell feeds what it reads to :meth:`ClientStartup.receive_data`
(``b""`` for end of file) and asks :meth:`ClientStartup.next_event` what to do;
every event names one action (answer ``N``, start TLS, forward a cancel, serve
the startup, refuse with an ErrorResponse, close without a word). All state
transitions are in this module; :class:`ClientStartupState` names them.

Invariants:

* Before a valid startup packet, the client gets exactly what PostgreSQL would
  send it. A length word that cannot start a startup packet (PostgreSQL's
  "invalid length of startup packet", e.g. a Terminate sent before startup),
  a malformed CancelRequest, or end of file get no reply at all: the shell
  closes and logs :attr:`CloseSilently.reason`. Cases the server answers with a
  FATAL (unsupported protocol, a malformed StartupMessage, bytes after an
  encryption request) get an ErrorResponse.
* A length is checked against the limit before its body is awaited.
* Nothing may follow an encryption request before its answer: such bytes would
  be read as if they had come over TLS (CVE-2021-23222's server side).
* Once in :attr:`ClientStartupState.ERROR` or :attr:`ClientStartupState.DONE`
  the machine takes no more input.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from gateway.protocol import messages
from gateway.protocol.constants import (
    CANCEL_REQUEST_CODE,
    MAX_STARTUP_PACKET_LENGTH,
    PROTOCOL_3_0,
    SSL_ACCEPTED,
    SSL_REFUSED,
    BackendType,
)
from gateway.protocol.errors import ProtocolError, ProtocolUsageError
from gateway.protocol.framing import MessageReader
from gateway.protocol.messages import BackendKey
from gateway.protocol.sqlstate import SqlState
from gateway.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_startup_packet,
)

_UINT32 = struct.Struct("!I")

#: First byte of a TLS handshake record: a client starting TLS directly
#: (``sslnegotiation=direct``, PostgreSQL 17+ clients).
TLS_HANDSHAKE_RECORD = 0x16
#: TLS alert record: level fatal (2), description handshake_failure (40).
TLS_ALERT_HANDSHAKE_FAILURE = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
#: The ALPN protocol a direct-TLS PostgreSQL client negotiates (55.2.10).
ALPN_POSTGRESQL = "postgresql"
#: Startup parameters whose names start with this are protocol options (55.2.1).
PROTOCOL_OPTION_PREFIX = "_pq_."
#: The newest protocol the gateway speaks to clients: 3.2 (PostgreSQL 18), whose
#: only change is a longer cancel key.
NEWEST_MINOR_VERSION = 2


class ClientStartupState(enum.Enum):
    """Where a client connection's start is."""

    #: reading a startup-phase packet (the first, or one after an encryption answer)
    AWAITING_PACKET = enum.auto()
    #: ``S`` is due (or a direct ClientHello was seen): no input until TLS is up
    AWAITING_TLS = enum.auto()
    #: a StartupMessage or a CancelRequest was delivered; nothing more to read
    DONE = enum.auto()
    #: refused or closed; nothing more to read
    ERROR = enum.auto()


class NeedData(enum.Enum):
    """Nothing to do until more bytes (or end of file) arrive."""

    NEED_DATA = enum.auto()


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class AnswerEncryption:
    """Send :attr:`data` (``N``: no encryption) and keep reading in the clear."""

    data: bytes = SSL_REFUSED


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Send :attr:`data` (``S``; empty for direct TLS), then start TLS as the
    server and call :meth:`ClientStartup.tls_started`. For direct TLS the
    ClientHello is still unread (the shell only peeked at its first byte)."""

    data: bytes = SSL_ACCEPTED

    @property
    def is_direct(self) -> bool:
        return not self.data


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """A CancelRequest: forward it if its key is known, then close with no reply."""

    request: CancelRequest


@dataclass(frozen=True, slots=True)
class StartupReceived:
    """The client's StartupMessage: the start is done."""

    message: StartupMessage


@dataclass(frozen=True, slots=True)
class Refuse:
    """Send :attr:`data` (a FATAL ErrorResponse, or a TLS alert) and close."""

    sqlstate: str
    message: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CloseSilently:
    """Close without a reply, as PostgreSQL does; :attr:`reason` is for the log
    and, when :attr:`noteworthy`, the trail (a client that closes before sending
    a byte is not: PostgreSQL logs nothing for it either)."""

    reason: str
    noteworthy: bool = True


Event = AnswerEncryption | StartTLS | CancelRequested | StartupReceived | Refuse | CloseSilently


def _refusal(
    message: str, sqlstate: str = SqlState.PROTOCOL_VIOLATION, *, hint: str | None = None
) -> Refuse:
    return Refuse(sqlstate, message, messages.error_response("FATAL", sqlstate, message, hint=hint))


class ClientStartup:
    """One client connection's start: bytes in, one action at a time out."""

    def __init__(self, *, tls_available: bool, max_length: int = MAX_STARTUP_PACKET_LENGTH) -> None:
        self.tls_available = tls_available
        self.max_length = max_length
        self.state = ClientStartupState.AWAITING_PACKET
        #: whether TLS is up on the client's leg
        self.encrypted = False
        self._reader = MessageReader(max_length=max_length)
        self._eof = False
        self._packets = 0
        #: TLS was started on a ClientHello, not after an SSLRequest
        self._direct = False
        self._alpn_missing = False

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the client; ``b""`` means it closed its side."""
        if self.state is not ClientStartupState.AWAITING_PACKET:
            raise ProtocolUsageError(f"no input expected in state {self.state.name}")
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    def first_byte_peeked(self, byte: int) -> StartTLS | None:
        """The client's first byte, seen before it is read (``MSG_PEEK``).

        A TLS handshake record there is direct TLS: :class:`StartTLS` (with
        nothing to send) when TLS is on offer, so the shell starts TLS on the
        unread ClientHello. Otherwise None: read and feed as usual.
        """
        if self._packets or self._reader.buffered or self.encrypted:
            raise ProtocolUsageError("only the connection's first byte can be peeked")
        if byte != TLS_HANDSHAKE_RECORD or not self.tls_available:
            return None
        self.state = ClientStartupState.AWAITING_TLS
        self._direct = True
        return StartTLS(b"")

    def tls_started(self, *, alpn: str | None) -> None:
        """The shell finished the TLS handshake that :class:`StartTLS` asked for;
        ``alpn`` is the protocol the handshake selected, if any."""
        if self.state is not ClientStartupState.AWAITING_TLS:
            raise ProtocolUsageError("TLS was not asked for")
        self.encrypted = True
        self.state = ClientStartupState.AWAITING_PACKET
        # A direct TLS client must negotiate ALPN "postgresql" (55.2.10), so
        # that a TLS connection meant for another protocol is never served.
        self._alpn_missing = self._direct and alpn != ALPN_POSTGRESQL

    def timed_out(self) -> Refuse:
        """The startup deadline passed: the refusal the client gets."""
        self.state = ClientStartupState.ERROR
        return _refusal("timed out waiting for the startup packet")

    def take_remaining(self) -> bytes:
        """Bytes the client sent after its StartupMessage (pipelined messages)."""
        if self.state is not ClientStartupState.DONE:
            raise ProtocolUsageError("the startup is not done")
        return self._reader.take_remaining()

    def next_event(self) -> Event | NeedData:
        if self.state is not ClientStartupState.AWAITING_PACKET:
            raise ProtocolUsageError(f"no event in state {self.state.name}")
        event = self._next_event()
        if isinstance(event, Refuse | CloseSilently):
            self.state = ClientStartupState.ERROR
        elif isinstance(event, StartupReceived | CancelRequested):
            self.state = ClientStartupState.DONE
        elif isinstance(event, StartTLS):
            self.state = ClientStartupState.AWAITING_TLS
        return event

    def _next_event(self) -> Event | NeedData:
        reader = self._reader
        if self._alpn_missing:
            return _refusal(
                'direct TLS connection without the ALPN protocol "postgresql"',
                hint="use a client that negotiates ALPN, or sslnegotiation=postgres",
            )
        if not self.encrypted and not self._packets and reader.peek_byte() == TLS_HANDSHAKE_RECORD:
            # A ClientHello read rather than peeked: TLS is not on offer (or the
            # shell could not peek). An alert is the one answer a TLS client reads.
            return Refuse(
                SqlState.PROTOCOL_VIOLATION,
                "direct TLS is not available on this port",
                TLS_ALERT_HANDSHAKE_FAILURE,
            )
        try:
            body = reader.next_startup_packet(self.max_length)
        except ProtocolError as exc:
            # PostgreSQL logs "invalid length of startup packet" (COMMERROR) and
            # closes: the client reads nothing.
            return CloseSilently(exc.message)
        if body is None:
            if not self._eof:
                return NEED_DATA
            if reader.buffered:
                return CloseSilently("incomplete startup packet")
            return CloseSilently(
                "client closed the connection before its startup packet", noteworthy=False
            )
        self._packets += 1
        return self._on_packet(body)

    def _on_packet(self, body: bytes) -> Event:
        try:
            packet = parse_startup_packet(body)
        except ProtocolError as exc:
            if _UINT32.unpack_from(body)[0] == CANCEL_REQUEST_CODE:
                # The server answers nothing to a CancelRequest, well-formed or not.
                return CloseSilently(exc.message)
            return _refusal(exc.message)
        if isinstance(packet, SSLRequest | GSSENCRequest):
            if self._reader.buffered:
                # Nothing may follow an encryption request before our answer:
                # such bytes would be taken as if they came over TLS.
                return _refusal("unexpected data after an encryption request")
            if isinstance(packet, SSLRequest) and self.tls_available and not self.encrypted:
                return StartTLS()
            return AnswerEncryption()
        if isinstance(packet, CancelRequest):
            return CancelRequested(packet)
        return StartupReceived(packet)


def effective_minor_version(startup: StartupMessage) -> int:
    """The protocol minor version a connection runs at: 3.0 or 3.2 (3.1 was never
    released; anything newer is negotiated down)."""
    return NEWEST_MINOR_VERSION if startup.minor_version >= NEWEST_MINOR_VERSION else 0


def cancel_key_length(minor_version: int) -> int:
    """The length of the cancel key a client at this minor version gets."""
    # 4 bytes in 3.0; PostgreSQL 18 uses 32 bytes in 3.2 (any length up to 256).
    return 32 if minor_version >= NEWEST_MINOR_VERSION else 4


def negotiate_protocol_version(startup: StartupMessage) -> bytes:
    """NegotiateProtocolVersion for a newer minor version or unknown ``_pq_.``
    options, or nothing (PostgreSQL 15 docs, 55.2.1 and 55.7)."""
    unsupported = [name for name in startup.params if name.startswith(PROTOCOL_OPTION_PREFIX)]
    minor = effective_minor_version(startup)
    if minor == startup.minor_version and not unsupported:
        return b""
    newest = (PROTOCOL_3_0 | minor).to_bytes(4, "big")
    body = newest + len(unsupported).to_bytes(4, "big")
    body += b"".join(name.encode() + b"\x00" for name in unsupported)
    return messages.encode_message(BackendType.NEGOTIATE_PROTOCOL_VERSION, body)


def with_client_key(forward: list[bytes], client_key: BackendKey) -> bytes:
    """The server's startup messages with its BackendKeyData replaced by the
    client's own key (the upstream's never leaves the gateway)."""
    replaced = (
        messages.backend_key_data(client_key.pid, client_key.secret)
        if message[0] == BackendType.BACKEND_KEY_DATA
        else message
        for message in forward
    )
    return b"".join(replaced)
