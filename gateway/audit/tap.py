"""The audit tap of one relayed connection: tapped messages into the journal.

Glue between the relay (which copies only the tapped message types) and the
:class:`~gateway.audit.writer.AuditWriter`'s journal. Per chunk with tapped
messages it builds one record and appends it with one write; the relay calls it
for a client chunk BEFORE forwarding the chunk, so a statement is on record
(in the kernel) before the server can run it. Pairing, decoding and redaction
happen later, off the event loop (:mod:`gateway.audit.replay`).

Invariant: a record that cannot be journaled ends the connection (the relay
gets a :class:`~gateway.net.relay.Termination` back and forwards nothing more),
and so does every later one once a record of the connection is missing: the
reader must never see a connection's records with a gap.
"""

from __future__ import annotations

from typing import Final, Literal

import structlog

from gateway.audit.journal import (
    KIND_CLIENT,
    KIND_END,
    KIND_SERVER,
    KIND_START,
    encode_chunk,
    encode_event,
)
from gateway.audit.pairing import CLIENT_MEASURE, CLIENT_TAP, SERVER_MEASURE, SERVER_TAP
from gateway.audit.records import DetailValue
from gateway.audit.writer import AuditWriter
from gateway.net.relay import Termination
from gateway.protocol.framing import TappedMessage
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

log = structlog.get_logger(__name__)

#: How a connection ends when what it relays cannot be journaled (disk full).
UNRECORDABLE: Final = Termination(
    ConnectionEndReason.AUDIT_UNAVAILABLE,
    SqlState.SYSTEM_ERROR,
    "terminating connection: pam cannot record this statement in its audit journal,"
    " so it did not forward it",
    hint="an administrator must check the disk of the gateway's state directory",
)


class ConnectionAudit:
    __slots__ = ("_broken", "_number", "_writer", "connection_id", "session_id")

    def __init__(self, writer: AuditWriter, session_id: str, connection_id: str) -> None:
        self._writer = writer
        self._number = writer.journal.next_connection()
        self.session_id = session_id
        self.connection_id = connection_id
        #: a record of this connection could not be journaled
        self._broken = False

    @property
    def client_tap(self) -> frozenset[int]:
        return CLIENT_TAP

    @property
    def client_measure(self) -> frozenset[int]:
        return CLIENT_MEASURE

    @property
    def server_tap(self) -> frozenset[int]:
        return SERVER_TAP

    @property
    def server_measure(self) -> frozenset[int]:
        return SERVER_MEASURE

    def on_client(self, tapped: list[TappedMessage], now_ns: int) -> Termination | None:
        return self._append(encode_chunk(KIND_CLIENT, self._number, now_ns, tapped))

    def on_server(self, tapped: list[TappedMessage], now_ns: int) -> Termination | None:
        return self._append(encode_chunk(KIND_SERVER, self._number, now_ns, tapped))

    def _append(self, record: bytes) -> Termination | None:
        if self._broken:
            return UNRECORDABLE
        try:
            self._writer.append(record)
        except OSError as exc:
            self._broken = True
            log.error(
                "audit_journal_write_failed",
                session_id=self.session_id,
                connection_id=self.connection_id,
                error=exc.strerror or str(exc),
            )
            return UNRECORDABLE
        return None

    @property
    def congested(self) -> bool:
        return self._writer.congested

    async def wait_for_room(self) -> None:
        await self._writer.wait_for_room()

    def connection_event(
        self,
        kind: Literal["connection_start", "connection_end"],
        detail: dict[str, DetailValue],
        *,
        now_ns: int,
    ) -> None:
        if kind == "connection_start":
            payload = {
                "session_id": self.session_id,
                "connection_id": self.connection_id,
                "detail": detail,
            }
            self._append(encode_event(KIND_START, self._number, now_ns, payload))
        elif not self._broken:
            # A connection with a record missing stays open in the reader's eyes
            # and is closed at the next start, as a crash's are.
            self._append(encode_event(KIND_END, self._number, now_ns, dict(detail)))
