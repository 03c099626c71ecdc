"""The audit journal: what the relay saw, appended to a file before it is forwarded.

Role: the event loop's whole share of the audit. For each relayed chunk that
holds tapped messages the relay appends ONE record with ONE ``os.write`` to an
append-only segment file (``O_APPEND``, mode 0600) under the state directory;
the audit writer process (:mod:`gateway.audit.replay`) reads the segments back,
pairs statements with outcomes, redacts and appends the trail to the store. No
decoding, pairing or redaction happens on the loop.

Record format (all integers big-endian)::

    header  kind u8 | connection u32 | time_ns i64 | payload length u32   (17 bytes)
    payload START / END: JSON (UTF-8) of the connection's ids and detail
            CLIENT / SERVER: per tapped message
              type u8 | truncated u8 | measured_messages u64 | measured_bytes u64
              | body length u32 | body
            SECRETS: empty (the stored passwords changed: reload them)

``connection`` is a number per run of the daemon (0 for SECRETS). Segment files
are ``<run>-<segment>.journal`` (run: ``<time_ns, 20 digits>-<4 hex>``, so that
names sort by start); a new segment starts past :data:`SEGMENT_BYTES`.

Invariants:
* A client chunk's record is in the kernel (the page cache: it survives the
  daemon's ``kill -9``, not a power cut) before the chunk is forwarded, so a
  statement the server may run is never unrecorded.
* One record, one write: a reader sees a whole record or, after a crash or a
  short write, a torn tail it can recognise (:class:`SegmentReader` leaves it).
  After a failed or short write the journal truncates the segment back and
  starts a new one, so a torn record is only ever the last of its segment.
* The journal holds what clients sent before redaction (SQL, parameters): the
  directory is 0700, the files 0600, and a segment is deleted once the trail
  in the store covers it. Nothing the gateway itself holds secret (stored
  passwords, keys) is ever written here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

from gateway.protocol.framing import TappedMessage

__all__ = [
    "CHECKPOINT_SUFFIX",
    "HEADER",
    "JOURNAL_DIR",
    "KIND_CLIENT",
    "KIND_END",
    "KIND_SECRETS",
    "KIND_SERVER",
    "KIND_START",
    "SEGMENT_BYTES",
    "Journal",
    "Record",
    "SegmentReader",
    "checkpoint_path",
    "decode_messages",
    "encode_chunk",
    "encode_event",
    "list_runs",
    "new_run_id",
    "segment_path",
    "segments_of",
]

KIND_START: Final = 1
KIND_CLIENT: Final = 2
KIND_SERVER: Final = 3
KIND_END: Final = 4
KIND_SECRETS: Final = 5
_KINDS: Final = frozenset({KIND_START, KIND_CLIENT, KIND_SERVER, KIND_END, KIND_SECRETS})

HEADER: Final = struct.Struct("!BIqI")
_MESSAGE: Final = struct.Struct("!BBQQI")
#: A segment is closed and a new one begun past this size.
SEGMENT_BYTES: Final = 64 * 1024 * 1024
#: A record longer than this is not one the relay wrote (its chunks are at most
#: 256 KiB read, tapped bodies at most 64 KiB each): the tail is torn or foreign.
MAX_RECORD_BYTES: Final = 64 * 1024 * 1024
#: The journal's directory under the state home.
JOURNAL_DIR: Final = "audit-journal"
JOURNAL_DIR_MODE: Final = 0o700
JOURNAL_FILE_MODE: Final = 0o600
CHECKPOINT_SUFFIX: Final = ".checkpoint"
_SEGMENT_NAME: Final = re.compile(r"^(\d{20}-[0-9a-f]{4})-(\d{6})\.journal$")
_READ_SIZE: Final = 1024 * 1024


def new_run_id() -> str:
    """A run's id: sorts by start time, unique between two starts in one nanosecond."""
    return f"{time.time_ns():020d}-{secrets.token_hex(2)}"


def segment_path(directory: Path, run: str, segment: int) -> Path:
    return directory / f"{run}-{segment:06d}.journal"


def checkpoint_path(directory: Path, run: str) -> Path:
    return directory / f"{run}{CHECKPOINT_SUFFIX}"


def list_runs(directory: Path) -> list[str]:
    """The runs that have segments in *directory*, oldest first."""
    runs = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        found = _SEGMENT_NAME.match(name)
        if found:
            runs.add(found.group(1))
    return sorted(runs)


def segments_of(directory: Path, run: str) -> list[int]:
    """The segment numbers of *run* present in *directory*, in order."""
    out = []
    for name in os.listdir(directory):
        found = _SEGMENT_NAME.match(name)
        if found and found.group(1) == run:
            out.append(int(found.group(2)))
    return sorted(out)


# --- encoding (on the event loop) ---------------------------------------------------


def encode_chunk(kind: int, connection: int, now_ns: int, tapped: Sequence[TappedMessage]) -> bytes:
    """One CLIENT or SERVER record holding *tapped*: a pack per message and one join."""
    pack = _MESSAGE.pack
    parts = [b""]
    size = 0
    for mtype, body, truncated, measured_messages, measured_bytes in tapped:
        parts.append(pack(mtype, truncated, measured_messages, measured_bytes, len(body)))
        parts.append(body)
        size += _MESSAGE.size + len(body)
    parts[0] = HEADER.pack(kind, connection, now_ns, size)
    return b"".join(parts)


def encode_event(kind: int, connection: int, now_ns: int, payload: dict[str, Any] | None) -> bytes:
    """A START or END record (JSON payload; once per connection, not per chunk),
    or with *payload* None one without a payload (SECRETS)."""
    body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    return HEADER.pack(kind, connection, now_ns, len(body)) + body


def decode_messages(payload: bytes) -> list[TappedMessage]:
    """The tapped messages of a CLIENT or SERVER record's payload.

    Raises ``ValueError`` for a payload that is not a sequence of whole messages.
    """
    out = []
    pos, end = 0, len(payload)
    unpack = _MESSAGE.unpack_from
    while pos < end:
        if end - pos < _MESSAGE.size:
            raise ValueError("a journal record ends inside a message header")
        mtype, truncated, measured_messages, measured_bytes, length = unpack(payload, pos)
        pos += _MESSAGE.size
        if pos + length > end:
            raise ValueError("a journal record ends inside a message body")
        out.append(
            TappedMessage(
                mtype,
                payload[pos : pos + length],
                bool(truncated),
                measured_messages,
                measured_bytes,
            )
        )
        pos += length
    return out


# --- the daemon's side: appending ---------------------------------------------------


class Journal:
    """The current run's segments, appended to by the event loop.

    ``journaled`` counts every byte appended this run; ``bases`` maps a segment
    number to the run offset its first byte has, so a reader's (segment, offset)
    converts to the same count (backpressure compares the two).
    """

    def __init__(
        self, directory: Path, *, run: str | None = None, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=JOURNAL_DIR_MODE)
        os.chmod(directory, JOURNAL_DIR_MODE)
        self.directory = directory
        self.run = run or new_run_id()
        self.segment_bytes = segment_bytes
        self.segment = -1
        self.journaled = 0
        self.bases: dict[int, int] = {}
        self._fd = -1
        self._size = 0
        self._connections = 0
        self._rotate()

    def next_connection(self) -> int:
        self._connections += 1
        return self._connections

    @property
    def position(self) -> tuple[int, int]:
        """Where the next record goes: (segment, offset)."""
        return self.segment, self._size

    def processed(self, segment: int, offset: int) -> int:
        """A reader's position as a count of this run's bytes."""
        base = self.bases.get(segment)
        if base is None:  # a segment deleted already: everything before the oldest we know
            return self.journaled if segment > self.segment else 0
        return base + offset

    def append(self, record: bytes) -> None:
        """Append one record with one write; raises ``OSError`` when it is not all
        in the kernel (disk full, I/O error), after undoing what of it was written."""
        if self._fd < 0 or (self._size and self._size + len(record) > self.segment_bytes):
            self._rotate()
        try:
            written = os.write(self._fd, record)
        except OSError:
            self._abandon()
            raise
        if written != len(record):
            self._abandon()
            raise OSError(f"short write to the audit journal ({written} of {len(record)} bytes)")
        self._size += written
        self.journaled += written

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:
        self.close()
        segment = self.segment + 1
        fd = os.open(
            segment_path(self.directory, self.run, segment),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            JOURNAL_FILE_MODE,
        )
        self.segment, self._fd, self._size = segment, fd, 0
        self.bases[segment] = self.journaled

    def _abandon(self) -> None:
        """After a failed write: cut the segment back to its last whole record and
        make the next append start a new segment (the reader knows a torn tail
        only as the end of a segment)."""
        # If this fails too, the reader drops the torn tail: a successor follows.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)
        self.close()


# --- the writer's side: reading -----------------------------------------------------


class Record(NamedTuple):
    """One journal record as read back. A named tuple, not a frozen dataclass:
    one is built per record in the writer process, and a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``."""

    kind: int
    connection: int
    time_ns: int
    payload: bytes
    #: the segment offset just after this record
    end: int


class SegmentReader:
    """Reads one segment's records as they are appended; a partial record at the
    end stays unread until the rest arrives (or is reported torn by ``torn``)."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.lseek(self._fd, offset, os.SEEK_SET)
        self._buf = bytearray()
        #: the segment offset of self._buf[0]
        self._base = offset
        self._pos = 0

    @property
    def offset(self) -> int:
        """The offset just after the last whole record read."""
        return self._base + self._pos

    @property
    def torn(self) -> int:
        """Bytes of an incomplete record held at the end."""
        return len(self._buf) - self._pos

    def records(self) -> Iterator[Record]:
        """Every whole record appended since the last call, in order.

        Raises ``ValueError`` for a header no journal writes (a damaged file).
        """
        while True:
            # What is buffered first: a caller may have stopped midway last time
            # (a store failure while it handled a record).
            yield from self._parse()
            chunk = os.read(self._fd, _READ_SIZE)
            if not chunk:
                return
            if self._pos:
                del self._buf[: self._pos]
                self._base += self._pos
                self._pos = 0
            self._buf += chunk

    def _parse(self) -> Iterator[Record]:
        buf, size = self._buf, len(self._buf)
        while size - self._pos >= HEADER.size:
            kind, connection, time_ns, length = HEADER.unpack_from(buf, self._pos)
            if kind not in _KINDS or length > MAX_RECORD_BYTES:
                raise ValueError(f"{self.path.name}: no journal record at offset {self.offset}")
            start = self._pos + HEADER.size
            if start + length > size:
                return
            self._pos = start + length
            # One copy: a bytearray slice would copy once more before bytes() does.
            payload = bytes(memoryview(buf)[start : self._pos])
            yield Record(kind, connection, time_ns, payload, self.offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
