"""The audit trail exported as it is written: a JSON-lines file and syslog collectors.

Role: the journal's reader (:class:`~gateway.audit.replay.JournalProcessor`, in
the audit writer process or on the daemon's store thread) hands every batch it
has just committed to :meth:`TrailExporter.publish`, with each record's ``seq``
in its session's trail. Each destination has a bounded queue and a thread of its
own that sends; the reader never waits for one, and the relay never sees any of
this.

What is exported is what the trail holds (the reader redacted it before the
store saw it): one JSON object per record, with ``session_id``, ``seq``,
``connection_id``, ``kind``, ``occurred_at`` (ISO 8601, UTC) and the event's
other fields. Never a stored password or a key: none is in the trail.

Destinations:

* :class:`JsonlFileSink`: one record per line, appended; past ``max_bytes`` the
  file becomes ``path.1`` (``path.1`` becomes ``path.2``...), ``keep`` of them.
  Several processes append to one file (each relay worker's audit writer and the
  daemon's): each write, with the size check and rotation before it, holds an
  exclusive ``flock`` on the file's directory, so they rotate it once, not once each.
* :class:`SyslogSink`: RFC 5424 messages, octet-counted (RFC 6587 3.4.1) over
  TCP, or over TLS (RFC 5425: the collector's certificate verified against a CA
  and its name). Structured data ``[pam@32473 ...]`` carries the ids; the MSG is
  the record's JSON (UTF-8 with a BOM, RFC 5424 6.4). 32473 is the Private
  Enterprise Number RFC 5612 reserves for documentation and examples.

Invariants:

* :meth:`TrailExporter.publish` never blocks: when a destination's queue is full
  (it has been slow or down for ``queue_size`` records) the new records are
  dropped, counted (:attr:`Channel.dropped`) and a warning logged once until the
  queue has emptied again; what is queued is sent in order, once, when the
  destination is back. The trail in the store stays complete: it is the record;
  the export is a copy.
* A record a destination failed to take is retried (with a growing pause) before
  any later one, so a destination sees each record at most once and in order
  (a collector that took part of a write and then failed may see its start twice).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from gateway.audit.records import AuditEvent, EventRow, micros_datetime
from gateway.audit.review import jsonl_line
from gateway.config import FileExport, GatewaySettings, SyslogExport

__all__ = [
    "Channel",
    "ExportSink",
    "JsonlFileSink",
    "SyslogSink",
    "TrailExporter",
    "build_exporter",
    "export_record",
    "syslog_message",
]

log = structlog.get_logger(__name__)

_FIELDS: Final = tuple(AuditEvent.__dataclass_fields__)
_OCCURRED_AT: Final = _FIELDS.index("occurred_at")
_PARAMETERS: Final = _FIELDS.index("parameters")
_PARAMETER_FIELDS: Final = ("index", "type_oid", "format", "value", "truncated")
#: RFC 5612: the enterprise number reserved for documentation.
SD_ID: Final = "pam@32473"
#: RFC 5424 6.2.1 severities
_INFO: Final = 6
_NOTICE: Final = 5
_BOM: Final = b"\xef\xbb\xbf"
#: records sent in one write
_BATCH: Final = 500
_RETRY_FIRST_SECONDS: Final = 0.2
_RETRY_MAX_SECONDS: Final = 5.0
_CONNECT_TIMEOUT_SECONDS: Final = 5.0


def export_record(row: EventRow, seq: int) -> dict[str, Any]:
    """A committed event *row*, number *seq* in its session's trail, as exported."""
    record: dict[str, Any] = dict(zip(_FIELDS, row, strict=True))
    record["seq"] = seq
    record["occurred_at"] = (
        micros_datetime(row[_OCCURRED_AT]).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )
    parameters = row[_PARAMETERS]
    if parameters is not None:
        record["parameters"] = [dict(zip(_PARAMETER_FIELDS, p, strict=True)) for p in parameters]
    return record


def _sd_escape(value: str) -> str:
    # RFC 5424 6.3.3: '"', '\' and ']' are escaped with a backslash in a PARAM-VALUE.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    # RFC 5424 6.2: header fields are PRINTUSASCII (33..126), NILVALUE when empty.
    cleaned = "".join(c for c in value if "!" <= c <= "~")[:limit]
    return cleaned or "-"


def syslog_message(
    record: dict[str, Any], *, facility: int, app_name: str, hostname: str, procid: str
) -> bytes:
    """*record* as one RFC 5424 SYSLOG-MSG (without the octet count)."""
    severity = _NOTICE if record.get("status") == "error" else _INFO
    sd_params = " ".join(
        f'{name}="{_sd_escape(str(record[name]))}"'
        for name in ("session_id", "seq", "connection_id")
        if record.get(name) is not None
    )
    header = (
        f"<{facility * 8 + severity}>1 {record['occurred_at']}"
        f" {_header_field(hostname, 255)} {_header_field(app_name, 48)}"
        f" {_header_field(procid, 128)} {_header_field(str(record['kind']), 32)}"
        f" [{SD_ID} {sd_params}] "
    )
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return header.encode("ascii") + _BOM + body.encode("utf-8", "backslashreplace")


class ExportSink(Protocol):
    """A destination: takes a list of records in order, or raises ``OSError``."""

    name: str

    def send(self, records: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class JsonlFileSink:
    def __init__(self, path: Path, *, max_bytes: int, keep: int) -> None:
        self.name = f"file:{path}"
        self._path = path
        self._max_bytes = max_bytes
        self._keep = keep

    def send(self, records: Sequence[dict[str, Any]]) -> None:
        data = "".join(map(jsonl_line, records)).encode("utf-8", "backslashreplace")
        with _locked(self._path.parent):
            try:
                size = self._path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > self._max_bytes:
                self._rotate()
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)

    def _rotate(self) -> None:
        for n in range(self._keep - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{n}")
            if older.exists():
                older.replace(self._path.with_name(f"{self._path.name}.{n + 1}"))
        self._path.replace(self._path.with_name(f"{self._path.name}.1"))

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on *directory* (the file in it is renamed, so it
    cannot hold the lock), for every process that writes there."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class SyslogSink:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        facility: int = 16,
        app_name: str = "pam",
        hostname: str | None = None,
    ) -> None:
        self.name = f"syslog{'+tls' if tls else ''}:{host}:{port}"
        self._address = (host, port)
        self._tls = tls
        self._facility = facility
        self._app_name = app_name
        self._hostname = hostname or socket.gethostname()
        self._procid = str(os.getpid())
        self._sock: socket.socket | None = None

    def send(self, records: Sequence[dict[str, Any]]) -> None:
        frames = []
        for record in records:
            message = syslog_message(
                record,
                facility=self._facility,
                app_name=self._app_name,
                hostname=self._hostname,
                procid=self._procid,
            )
            frames.append(b"%d %s" % (len(message), message))
        try:
            self._connected().sendall(b"".join(frames))
        except OSError:
            self.close()
            raise

    def _connected(self) -> socket.socket:
        if self._sock is not None and _is_closed_by_peer(self._sock):
            # A collector that went away is only noticed at a write after its FIN
            # (RFC 6587 has no acknowledgement): look before writing into the void.
            self.close()
        if self._sock is None:
            sock = socket.create_connection(self._address, timeout=_CONNECT_TIMEOUT_SECONDS)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=self._address[0])
                except OSError:
                    sock.close()
                    raise
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def _is_closed_by_peer(sock: socket.socket) -> bool:
    """The collector closed the connection (or broke it); without waiting."""
    # poll, not select: a process relaying many connections has descriptors past
    # select's FD_SETSIZE (1024), where select raises ValueError.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        # A collector sends nothing; TLS may have sent a session ticket, which
        # leaves no application data (SSLWantReadError): still open.
        return sock.recv(1) == b""
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


class Channel:
    """One destination's bounded queue and the thread that empties it."""

    def __init__(self, sink: ExportSink, queue_size: int) -> None:
        self.sink = sink
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._size = queue_size
        self._ready = threading.Condition()
        self._closing = False
        self._deadline = 0.0
        self._down = False
        self._drop_warned = False
        #: records dropped because the queue was full
        self.dropped = 0
        #: records the destination took
        self.sent = 0
        self._thread = threading.Thread(
            target=self._run, name=f"audit-export {sink.name}", daemon=True
        )
        self._thread.start()

    def offer(self, records: Sequence[dict[str, Any]]) -> None:
        with self._ready:
            room = max(self._size - len(self._queue), 0)
            self._queue.extend(records[:room])
            if len(records) > room:
                if not self._drop_warned:
                    self._drop_warned = True
                    log.warning(
                        "audit_export_dropped",
                        destination=self.sink.name,
                        count=len(records) - room,
                        queue=self._size,
                    )
                self.dropped += len(records) - room
            self._ready.notify()

    def close(self, timeout: float) -> None:
        """Send what is queued (for at most *timeout* seconds), then stop."""
        with self._ready:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._ready.notify()
        self._thread.join(timeout + 1.0)
        self.sink.close()

    def _pause(self, seconds: float) -> None:
        """Wait *seconds* before a retry: not less (every :meth:`offer` notifies,
        and a wait ended there would retry at each batch the journal reader
        commits), and not past the deadline of :meth:`close`."""
        resume = time.monotonic() + seconds
        with self._ready:
            while True:
                end = min(resume, self._deadline) if self._closing else resume
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._ready.wait(left)

    def _run(self) -> None:
        pause = _RETRY_FIRST_SECONDS
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if not self._queue or (self._closing and time.monotonic() > self._deadline):
                    if self._queue:
                        log.warning(
                            "audit_export_unsent_at_shutdown",
                            destination=self.sink.name,
                            count=len(self._queue),
                        )
                    return
                batch = [self._queue[i] for i in range(min(_BATCH, len(self._queue)))]
            try:
                self.sink.send(batch)
            except (OSError, ValueError) as exc:
                if not self._down:
                    log.warning(
                        "audit_export_unavailable", destination=self.sink.name, error=str(exc)
                    )
                    self._down = True
                self._pause(pause)
                pause = min(pause * 2, _RETRY_MAX_SECONDS)
                continue
            pause = _RETRY_FIRST_SECONDS
            with self._ready:
                for _ in batch:
                    self._queue.popleft()
                self.sent += len(batch)
                if not self._queue:
                    # Caught up: the next overflow is another one, and is logged
                    # (a destination that is slow, never down, included).
                    self._drop_warned = False
            if self._down:
                self._down = False
                log.warning(
                    "audit_export_recovered", destination=self.sink.name, dropped=self.dropped
                )


class TrailExporter:
    """Fans committed records out to every destination's :class:`Channel`."""

    def __init__(self, sinks: Sequence[ExportSink], *, queue_size: int = 10_000) -> None:
        self.channels = [Channel(sink, queue_size) for sink in sinks]

    def publish(self, rows: Sequence[EventRow], numbered: Sequence[tuple[int, int]]) -> None:
        """The store committed *rows*; *numbered*: ``(position, seq)`` of each written."""
        records = [export_record(rows[position], seq) for position, seq in numbered]
        if records:
            for channel in self.channels:
                channel.offer(records)

    def close(self, timeout: float = 5.0) -> None:
        for channel in self.channels:
            channel.close(timeout)


def _tls_context(config: SyslogExport) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=None if config.ca_file is None else str(config.ca_file)
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def build_exporter(settings: GatewaySettings) -> TrailExporter | None:
    """The exporter *settings* ask for (None: no export configured)."""
    sinks: list[ExportSink] = []
    if settings.audit_export_file is not None:
        file: FileExport = settings.audit_export_file
        sinks.append(JsonlFileSink(file.path, max_bytes=file.max_bytes, keep=file.keep))
    for syslog in settings.audit_export_syslog:
        sinks.append(
            SyslogSink(
                syslog.host,
                syslog.port,
                tls=_tls_context(syslog) if syslog.tls else None,
                facility=syslog.facility,
                app_name=syslog.app_name,
            )
        )
    if not sinks:
        return None
    return TrailExporter(sinks, queue_size=settings.audit_export_queue)
