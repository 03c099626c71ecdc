"""Message framing: whole messages for the handshake, boundaries for the relay.

Two readers, for two jobs:

* :class:`MessageReader` assembles *whole* messages. It is used only while the
  gateway must understand every message (startup, authentication), so its
  messages are small and every length field is checked against a cap *before*
  the body is awaited.
* :class:`BoundaryTracker` follows message boundaries in a relayed stream from
  the 5-byte headers alone. It never copies a message body except the bodies
  of the message types a caller asked to tap, which are capped too. Forwarding
  stays byte-for-byte: the tracker only observes.

Invariants: buffers are a ``bytearray`` plus a read offset (never ``buf = buf[n:]``
in a loop); ``memoryview`` slices never outlive one call; every returned body is
``bytes``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from gateway.protocol.constants import HEADER_SIZE, STARTUP_HEADER_SIZE
from gateway.protocol.errors import ProtocolError, ProtocolUsageError

_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")
#: The length field counts itself (4 bytes) but not the type byte.
_LENGTH_SIZE = 4


@dataclass(frozen=True, slots=True)
class Message:
    """One whole typed message: its type byte (as an int) and its body."""

    type: int
    body: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(bytes((self.type,)), len(self.body) + _LENGTH_SIZE) + self.body


class MessageReader:
    """Buffers bytes and yields whole messages, refusing oversized ones early."""

    __slots__ = ("_buf", "_pos", "max_length")

    def __init__(self, max_length: int) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_length = max_length

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def peek_byte(self) -> int:
        """The next unread byte, without consuming it; -1 when nothing is buffered."""
        return self._buf[self._pos] if self.buffered else -1

    def next_startup_packet(self, max_length: int) -> bytes | None:
        """The body of an untyped startup-phase packet (int32 length first), or None.

        The returned body starts with the int32 protocol version or request code.
        """
        if self.buffered < _LENGTH_SIZE:
            return None
        (length,) = _INT32.unpack_from(self._buf, self._pos)
        if length < STARTUP_HEADER_SIZE or length > max_length:
            raise ProtocolError(
                f"invalid startup packet length {length}"
                f" (allowed {STARTUP_HEADER_SIZE}..{max_length})"
            )
        if self.buffered < length:
            return None
        start = self._pos + _LENGTH_SIZE
        body = bytes(self._buf[start : self._pos + length])
        self._pos += length
        return body

    def next_message(self) -> Message | None:
        """The next whole typed message, or None if more bytes are needed."""
        if self.buffered < HEADER_SIZE:
            return None
        type_byte, length = _HEADER.unpack_from(self._buf, self._pos)
        if length < _LENGTH_SIZE:
            raise ProtocolError(f"invalid message length {length} for message type {type_byte!r}")
        if length > self.max_length:
            raise ProtocolError(
                f"message of type {type_byte!r} is {length} bytes,"
                f" over the limit of {self.max_length}"
            )
        if self.buffered < length + 1:
            return None
        start = self._pos + HEADER_SIZE
        end = self._pos + 1 + length
        body = bytes(self._buf[start:end])
        self._pos = end
        return Message(type_byte[0], body)

    def take_remaining(self) -> bytes:
        """Everything buffered but not yet returned; empties the reader."""
        rest = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        return rest


class BoundaryTracker:
    """Follows message boundaries of a relayed stream from headers only.

    ``feed`` observes a chunk that the caller forwards unchanged. Messages whose
    type is in ``tap`` are returned whole (bodies up to ``tap_limit`` bytes; a
    longer body is returned truncated to that size with ``truncated=True``), in
    stream order. All other bodies are skipped by arithmetic, not copied.

    Messages whose type is in ``measure`` are only counted (``measured_messages``,
    ``measured_bytes`` of body); each tapped message carries the counters' values
    at its position in the stream, so a consumer can tell how many rows or COPY
    bytes passed between two tapped messages without a Python object per row.
    """

    __slots__ = (
        "_broken",
        "_header",
        "_remaining",
        "_tap_body",
        "_tap_full_length",
        "_tap_type",
        "max_length",
        "measure",
        "measured_bytes",
        "measured_messages",
        "messages",
        "prefix_tapped",
        "tap",
        "tap_limit",
        "valid_prefix",
    )

    def __init__(
        self,
        *,
        max_length: int,
        tap: frozenset[int] = frozenset(),
        tap_limit: int = 1 << 20,
        measure: frozenset[int] = frozenset(),
    ) -> None:
        self.max_length = max_length
        self.tap = tap
        self.tap_limit = tap_limit
        self.measure = measure
        self.measured_messages = 0
        self.measured_bytes = 0
        self._header = bytearray()
        #: body bytes still to come for the current message; 0 at a boundary
        self._remaining = 0
        self._tap_type = -1
        self._tap_body: bytearray | None = None
        self._tap_full_length = 0
        #: count of complete messages seen
        self.messages = 0
        #: after a framing error: whether the valid prefix ends at a boundary
        self._broken: bool | None = None
        #: after a framing error: the failed chunk's leading whole messages, in
        #: bytes, and their taps (see _stop)
        self.valid_prefix = 0
        self.prefix_tapped: list[TappedMessage] = []

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at a message boundary (after
        a framing error: when the chunk's ``valid_prefix`` does)."""
        if self._broken is not None:
            return self._broken
        return self._remaining == 0 and not self._header

    def feed(self, data: bytes | bytearray | memoryview) -> list[TappedMessage]:
        # One function on purpose (86 lines): it runs for every relayed chunk, and
        # its loops keep their state in locals; a helper call per message or per
        # chunk is what the relay's CPU budget cannot spare (docs/performance.md).
        tapped: list[TappedMessage] = []
        view = memoryview(data)
        # Whole tapped messages are sliced from the chunk itself when it is bytes
        # (what transports deliver): one copy, no view object per message.
        chunk: bytes | memoryview = data if type(data) is bytes else view
        pos = 0
        end = len(view)
        # The fast path (whole messages inside this chunk) runs once per message
        # of every relayed chunk: its state lives in locals, written back below.
        tap, measure = self.tap, self.measure
        tap_limit, max_length = self.tap_limit, self.max_length
        unpack_from = _HEADER.unpack_from
        if self._broken is not None:
            raise ProtocolUsageError("the stream's framing is broken: nothing more can be fed")
        #: where a header that this chunk holds whole begins (the error path needs it)
        header_at = -1
        try:
            while pos < end:
                if self._remaining:
                    take = min(self._remaining, end - pos)
                    if self._tap_body is not None:
                        room = tap_limit - len(self._tap_body)
                        if room > 0:
                            self._tap_body += view[pos : pos + min(room, take)]
                    self._remaining -= take
                    pos += take
                    if self._remaining == 0:
                        self._finish_message(tapped)
                    continue
                if self._header or end - pos < HEADER_SIZE:
                    need = HEADER_SIZE - len(self._header)
                    self._header += view[pos : pos + need]
                    pos += min(need, end - pos)
                    if len(self._header) < HEADER_SIZE:
                        break
                    type_byte, length = _HEADER.unpack(self._header)
                    self._header.clear()
                    self._start_message(type_byte[0], length, tapped)
                    continue
                messages = measured_messages = measured_bytes = 0
                try:
                    # Fast path: whole messages, as long as they last.
                    while end - pos >= HEADER_SIZE:
                        type_byte, length = unpack_from(chunk, pos)
                        body_end = pos + 1 + length
                        if length < _LENGTH_SIZE or length > max_length or body_end > end:
                            break
                        msg_type = type_byte[0]
                        if msg_type in measure:
                            measured_messages += 1
                            measured_bytes += length - _LENGTH_SIZE
                        elif msg_type in tap:
                            start = pos + HEADER_SIZE
                            if length - _LENGTH_SIZE <= tap_limit:
                                body, cut = chunk[start:body_end], False
                            else:
                                body, cut = chunk[start : start + tap_limit], True
                            tapped.append(
                                TappedMessage(
                                    msg_type,
                                    body if type(body) is bytes else bytes(body),
                                    cut,
                                    self.measured_messages + measured_messages,
                                    self.measured_bytes + measured_bytes,
                                )
                            )
                        messages += 1
                        pos = body_end
                finally:
                    self.messages += messages
                    self.measured_messages += measured_messages
                    self.measured_bytes += measured_bytes
                if end - pos >= HEADER_SIZE:
                    # A message that does not end in this chunk (or a bad length,
                    # which _start_message refuses).
                    type_byte, length = unpack_from(view, pos)
                    header_at = pos
                    pos += HEADER_SIZE
                    self._start_message(type_byte[0], length, tapped)
        except ProtocolError:
            self._stop(header_at, tapped)
            raise
        finally:
            view.release()
        return tapped

    def _stop(self, header_at: int, tapped: list[TappedMessage]) -> None:
        """After a framing error: keep what of the chunk was whole.

        A bad header whose bytes all came in this chunk starts at a boundary: the
        ``valid_prefix`` before it is whole messages (``prefix_tapped`` their taps)
        that the caller may still forward, after which the stream stands at a
        boundary. A bad header begun in an earlier chunk was partly forwarded
        already: no prefix, and never a boundary again.
        """
        self._tap_body = None
        self._header.clear()
        self._broken = header_at >= 0
        self.valid_prefix = max(header_at, 0)
        self.prefix_tapped = tapped if self._broken else []

    def _start_message(self, msg_type: int, length: int, tapped: list[TappedMessage]) -> None:
        if length < _LENGTH_SIZE or length > self.max_length:
            raise ProtocolError(
                f"message of type {bytes((msg_type,))!r} has invalid length {length}"
                f" (limit {self.max_length})"
            )
        self._remaining = length - _LENGTH_SIZE
        if msg_type in self.measure:
            self.measured_messages += 1
            self.measured_bytes += self._remaining
        elif msg_type in self.tap:
            self._tap_type = msg_type
            self._tap_body = bytearray()
            self._tap_full_length = self._remaining
        if self._remaining == 0:
            self._finish_message(tapped)

    def _finish_message(self, tapped: list[TappedMessage]) -> None:
        self.messages += 1
        if self._tap_body is not None:
            tapped.append(
                TappedMessage(
                    self._tap_type,
                    bytes(self._tap_body),
                    truncated=len(self._tap_body) < self._tap_full_length,
                    measured_messages=self.measured_messages,
                    measured_bytes=self.measured_bytes,
                )
            )
            self._tap_body = None
            self._tap_type = -1


class TappedMessage(NamedTuple):
    """A message observed by :class:`BoundaryTracker` for audit or policy.

    A named tuple rather than a frozen dataclass: one is built per tapped message
    on the relay's path, and a tuple is built in well under half the time.
    """

    type: int
    body: bytes
    truncated: bool = False
    #: the tracker's measure counters when this message ended
    measured_messages: int = 0
    measured_bytes: int = 0
