"""Turning the audit journal into the trail: pairing, redaction and batching off the loop.

Role: :class:`JournalProcessor` reads the segments the relay appended
(:mod:`gateway.audit.journal`), keeps one
:class:`~gateway.audit.pairing.StatementTracker` per open connection (built with
the gateway's redaction patterns, parameter mode and value cap, masking every
stored password, which it loads itself from the store), and appends the
resulting :data:`~gateway.audit.records.EventRow` tuples to the store in
batches (``batch_size`` rows, or whatever waited ``interval`` seconds, or at
once when flushed). It is synchronous: the audit writer process calls it in its
loop, and the in-process mode on the store thread.

Invariants:
* After each committed batch a checkpoint (``<run>.checkpoint``, 0600, written
  to a temporary name and renamed) records the position read and the open
  connections' tracker state, minus the redactor (it holds the stored
  passwords, which never go to a file) and the Parse cache. A restarted writer
  starts from it: nothing committed is lost; what was committed after the last
  checkpoint (a crash between the two) is appended again, each copy chained.
* A segment is deleted once the checkpoint lies in a later segment: the store
  holds everything it led to, and the checkpoint the state it left.
* Runs other than the current one belong to a daemon that died. :meth:`recover`
  replays each to its end (a torn last record is dropped: it was never
  forwarded), records every statement still without an outcome as
  ``incomplete`` with :data:`CRASH_ERROR`, ends each open connection with a
  ``connection_end`` of reason ``gateway_crash``, then deletes the run.
* The checkpoint is a pickle: only this writer writes it, in the 0700 journal
  directory of the state home (whoever can write there holds the master key).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from gateway.audit.export import TrailExporter
from gateway.audit.journal import (
    JOURNAL_FILE_MODE,
    KIND_CLIENT,
    KIND_END,
    KIND_SECRETS,
    KIND_SERVER,
    KIND_START,
    Record,
    SegmentReader,
    checkpoint_path,
    decode_messages,
    list_runs,
    segment_path,
    segments_of,
)
from gateway.audit.pairing import StatementTracker
from gateway.audit.ports import AuditStore
from gateway.audit.records import AuditEvent, EventRow, event_rows, micros_datetime
from gateway.audit.redaction import Redactor
from gateway.audit.stats import WriteStats
from gateway.protocol.errors import ProtocolError
from gateway.reasons import ConnectionEndReason

log = structlog.get_logger(__name__)

__all__ = ["CRASH_ERROR", "JournalProcessor", "TrackerSettings"]

#: Why a statement of a run whose daemon died has no outcome.
CRASH_ERROR: Final = (
    "the pam gateway stopped before the outcome of this statement arrived;"
    " it may have run on the server"
)
#: What decoding a malformed tapped body can raise (the server rejects such a message).
_UNDECODABLE = (ProtocolError, struct.error, ValueError, IndexError)
_FIELDS: Final = tuple(AuditEvent.__dataclass_fields__)
_STATUS: Final = _FIELDS.index("status")
_ERROR: Final = _FIELDS.index("error_message")
#: Tracker attributes not kept in a checkpoint: the redactor holds stored
#: passwords; the Parse cache is only a cache; no events wait between calls.
_NOT_CHECKPOINTED: Final = frozenset({"_redactor", "_parsed", "_events"})


@dataclass(frozen=True)
class TrackerSettings:
    """What a connection's tracker is built with (from the gateway's settings)."""

    redact_patterns: tuple[str, ...] = ()
    parameter_mode: Literal["values", "types", "none"] = "values"
    max_value_bytes: int = 256


@dataclass(eq=False)
class _Connection:
    tracker: StatementTracker
    session_id: str
    connection_id: str


@dataclass(eq=False)
class _Run:
    """One run's reading state: where it stands and its open connections."""

    run: str
    segment: int = 0
    offset: int = 0
    connections: dict[int, _Connection] = field(default_factory=dict)
    #: the latest time a record of the run carries: when its daemon was last seen
    last_ns: int = 0
    reader: SegmentReader | None = None


class JournalProcessor:
    def __init__(
        self,
        directory: Path,
        run: str,
        store: AuditStore,
        settings: TrackerSettings,
        load_secrets: Callable[[], tuple[str, ...]],
        *,
        batch_size: int = 500,
        interval: float = 0.2,
        checkpoint_interval: float = 1.0,
        exporter: TrailExporter | None = None,
    ) -> None:
        self._directory = directory
        #: told of every committed batch (the SIEM export); never blocks
        self._exporter = exporter
        self._store = store
        self._settings = settings
        self._load_secrets = load_secrets
        self._batch_size = batch_size
        self._interval = interval
        self._checkpoint_interval = checkpoint_interval
        self._redactor = Redactor.build(settings.redact_patterns, load_secrets())
        self._rows: list[EventRow] = []
        self._first_row_at = 0.0
        self._checkpointed_at = 0.0
        self._current = self._load(run)
        #: (segment, offset) up to which the store holds everything
        self.committed = (self._current.segment, self._current.offset)
        self.written = 0
        #: what was written since :meth:`take_stats` was last called
        self.stats = WriteStats()

    # --- the current run -----------------------------------------------------------

    @property
    def position(self) -> tuple[int, int]:
        """How far the current run has been read: (segment, offset)."""
        return self._current.segment, self._current.offset

    def poll(self, *, flush: bool = False) -> tuple[int, int]:
        """Process what the current run has appended; returns the committed position.

        Full batches are committed as they fill; a partial one once it waited
        ``interval`` seconds, or at once with *flush*. Raises what the store
        raises (the rows stay queued: the next call tries again).
        """
        state = self._current
        if len(self._rows) >= self._batch_size:
            # A batch the store refused: no more is read until it goes in, so
            # the rows held here stay bounded while the store is down.
            self._commit(state)
        self._read(state, final=False)
        now = time.monotonic()
        if self._rows:
            if flush or now - self._first_row_at >= self._interval:
                self._commit(state, checkpoint=flush)
        elif self.committed != (state.segment, state.offset):
            self.committed = (state.segment, state.offset)
            if flush or now - self._checkpointed_at >= self._interval:
                self._checkpoint(state)
        return self.committed

    def take_stats(self) -> WriteStats | None:
        """What was written since the last call (None: no batch was)."""
        stats = self.stats
        if not stats:
            return None
        self.stats = WriteStats()
        return stats

    def finish(self) -> tuple[int, int]:
        """At an ordered shutdown: commit everything; with no connection left open
        the run's files go (one still open is recovered at the next start)."""
        committed = self.poll(flush=True)
        state = self._current
        self._checkpoint(state)
        if state.reader is not None:
            state.reader.close()
            state.reader = None
        if not state.connections:
            self._delete_run(state.run, upto=None)
        return committed

    # --- runs of a daemon that died ------------------------------------------------

    def recover(self) -> int:
        """Replay and close every run older than the current one; returns how many
        connections they left open (each now ended as ``gateway_crash``)."""
        closed = 0
        for run in list_runs(self._directory):
            # Every other run is a dead daemon's (one daemon per state directory),
            # whatever its name says: the wall clock may have stepped back.
            if run == self._current.run:
                continue
            state = self._load(run)
            try:
                self._read(state, final=True)
                when = state.last_ns
                for number in sorted(state.connections):
                    self._rows.extend(self._crash_rows(state.connections.pop(number), when))
                    closed += 1
                self._commit(state)
            except BaseException:
                # Read again from its checkpoint next time: keep no row twice.
                self._rows = []
                raise
            finally:
                if state.reader is not None:
                    state.reader.close()
            self._delete_run(run, upto=None)
            log.warning("audit_journal_recovered", run=run, connections_closed=closed)
        return closed

    def _crash_rows(self, conn: _Connection, now_ns: int) -> list[EventRow]:
        rows = []
        for row in conn.tracker.close(now_ns):
            if row[_STATUS] == "incomplete" and row[_ERROR] is None:
                row = (*row[:_ERROR], CRASH_ERROR, *row[_ERROR + 1 :])
            rows.append(row)
        end = {"end_reason": str(ConnectionEndReason.GATEWAY_CRASH)}
        rows.extend(self._event(conn, "connection_end", now_ns, end))
        return rows

    # --- reading --------------------------------------------------------------------

    def _read(self, state: _Run, *, final: bool) -> None:
        """Process every whole record of *state*'s run from where it stands,
        across segments; *final*: the run is over (its daemon died)."""
        while True:
            reader = state.reader
            if reader is None:
                path = segment_path(self._directory, state.run, state.segment)
                if not path.exists():
                    later = [
                        s for s in segments_of(self._directory, state.run) if s > state.segment
                    ]
                    if not later:
                        return
                    # A segment deleted after the checkpoint moved past it.
                    state.segment, state.offset = later[0], 0
                    continue
                reader = state.reader = SegmentReader(path, state.offset)
            for record in reader.records():
                self._process(state, record)
                state.offset = record.end
                if len(self._rows) >= self._batch_size:
                    self._commit(state)
            following = segment_path(self._directory, state.run, state.segment + 1)
            if not (final or following.exists()):
                return
            # The segment is complete: its daemon writes to a newer one, or died.
            # Read once more: a record may have landed between the read and the check.
            for record in reader.records():
                self._process(state, record)
                state.offset = record.end
            if reader.torn:
                log.warning(
                    "audit_journal_torn_record", segment=reader.path.name, bytes=reader.torn
                )
            reader.close()
            state.reader = None
            if not following.exists():
                return
            state.segment, state.offset = state.segment + 1, 0

    def _process(self, state: _Run, record: Record) -> None:
        kind, number, now_ns = record.kind, record.connection, record.time_ns
        if now_ns > state.last_ns:
            state.last_ns = now_ns
        if kind == KIND_SECRETS:
            self._redactor = Redactor.build(self._settings.redact_patterns, self._load_secrets())
            return
        if kind == KIND_START:
            payload = json.loads(record.payload)
            settings = self._settings
            tracker = StatementTracker(
                payload["session_id"],
                payload["connection_id"],
                redactor=self._redactor,
                parameter_mode=settings.parameter_mode,
                max_value_bytes=settings.max_value_bytes,
            )
            conn = _Connection(tracker, payload["session_id"], payload["connection_id"])
            state.connections[number] = conn
            self._add(self._event(conn, "connection_start", now_ns, payload["detail"]))
            return
        conn_or_none = state.connections.get(number)
        if conn_or_none is None:
            log.error("audit_journal_unknown_connection", run=state.run, connection=number)
            return
        conn = conn_or_none
        if kind == KIND_CLIENT:
            for message in decode_messages(record.payload):
                try:
                    conn.tracker.client(message, now_ns)
                except _UNDECODABLE as exc:
                    self._undecodable(conn, message.type, exc)
        elif kind == KIND_SERVER:
            for message in decode_messages(record.payload):
                try:
                    rows = conn.tracker.server(message, now_ns)
                except _UNDECODABLE as exc:
                    self._undecodable(conn, message.type, exc)
                    continue
                if rows:
                    self._add(rows)
        elif kind == KIND_END:
            del state.connections[number]
            self._add(conn.tracker.close(now_ns))
            self._add(self._event(conn, "connection_end", now_ns, json.loads(record.payload)))

    def _add(self, rows: Sequence[EventRow]) -> None:
        if rows:
            if not self._rows:
                self._first_row_at = time.monotonic()
            self._rows.extend(rows)

    @staticmethod
    def _event(
        conn: _Connection,
        kind: Literal["connection_start", "connection_end"],
        now_ns: int,
        detail: dict[str, Any],
    ) -> list[EventRow]:
        return event_rows(
            [
                AuditEvent(
                    session_id=conn.session_id,
                    connection_id=conn.connection_id,
                    kind=kind,
                    # Floored to the microsecond as the tracker floors a
                    # statement's time (a float division could round past it).
                    occurred_at=micros_datetime(now_ns // 1000),
                    detail=detail,
                )
            ]
        )

    @staticmethod
    def _undecodable(conn: _Connection, mtype: int, exc: Exception) -> None:
        # The message was forwarded; a malformed one is the server's to reject.
        # Only the type is logged: the body may hold anything the client sent.
        log.warning(
            "audit_message_undecodable",
            session_id=conn.session_id,
            connection_id=conn.connection_id,
            message_type=chr(mtype),
            error=type(exc).__name__,
        )

    # --- committing -------------------------------------------------------------------

    def _commit(self, state: _Run, *, checkpoint: bool = False) -> None:
        rows = self._rows
        if rows:
            started = time.monotonic()
            if self._exporter is None:
                written = self._store.append_audit_rows(rows, substitute_invalid=True)
            else:
                numbered: list[tuple[int, int]] = []
                written = self._store.append_audit_rows(
                    rows, substitute_invalid=True, numbered=numbered
                )
                self._exporter.publish(rows, numbered)
            self.stats.add_batch(rows, time.monotonic() - started)
            if written < len(rows):
                log.error("audit_events_unattributable", count=len(rows) - written)
            self.written += len(rows)
            self._rows = []
        if state is self._current:
            self.committed = (state.segment, state.offset)
            # Not after every batch: writing and renaming the file costs about as
            # much as pairing a few hundred statements. A writer that dies appends
            # again what it committed since (each copy chained), never less.
            recent = time.monotonic() - self._checkpointed_at < self._checkpoint_interval
            if recent and not checkpoint:
                return
        self._checkpoint(state)

    def _checkpoint(self, state: _Run) -> None:
        connections = {
            number: (
                conn.session_id,
                conn.connection_id,
                {k: v for k, v in vars(conn.tracker).items() if k not in _NOT_CHECKPOINTED},
            )
            for number, conn in state.connections.items()
        }
        data = pickle.dumps(
            {
                "segment": state.segment,
                "offset": state.offset,
                "last_ns": state.last_ns,
                "connections": connections,
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        path = checkpoint_path(self._directory, state.run)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, JOURNAL_FILE_MODE)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        self._checkpointed_at = time.monotonic()
        self._delete_run(state.run, upto=state.segment)

    def _load(self, run: str) -> _Run:
        """A run's state from its checkpoint, or from its start if it has none."""
        state = _Run(run)
        try:
            data = checkpoint_path(self._directory, run).read_bytes()
        except FileNotFoundError:
            return state
        saved = pickle.loads(data)  # noqa: S301 (our own file, 0600 in the 0700 journal directory)
        state.segment, state.offset, state.last_ns = (
            saved["segment"],
            saved["offset"],
            saved["last_ns"],
        )
        settings = self._settings
        for number, (session_id, connection_id, tracker_state) in saved["connections"].items():
            tracker = StatementTracker(
                session_id,
                connection_id,
                redactor=self._redactor,
                parameter_mode=settings.parameter_mode,
                max_value_bytes=settings.max_value_bytes,
            )
            vars(tracker).update(tracker_state)
            state.connections[number] = _Connection(tracker, session_id, connection_id)
        return state

    def _delete_run(self, run: str, *, upto: int | None) -> None:
        """Delete *run*'s segments before *upto* (None: all, and its checkpoint)."""
        for segment in segments_of(self._directory, run):
            if upto is None or segment < upto:
                segment_path(self._directory, run, segment).unlink(missing_ok=True)
        if upto is None:
            checkpoint_path(self._directory, run).unlink(missing_ok=True)
