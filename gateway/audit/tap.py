"""The audit tap of one relayed connection: tapped messages to the writer.

Glue between the relay (which copies only the tapped message types), the
sans-IO :class:`~gateway.audit.pairing.StatementTracker` and the batching
:class:`~gateway.audit.writer.AuditWriter`. Called inline by the relay after each
chunk is forwarded: the chunk is already on its way before any decoding.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Literal

import structlog

from gateway.audit.pairing import (
    CLIENT_MEASURE,
    CLIENT_TAP,
    SERVER_MEASURE,
    SERVER_TAP,
    StatementTracker,
)
from gateway.audit.records import AuditEvent, DetailValue, event_rows
from gateway.audit.writer import AuditWriter
from gateway.protocol.errors import ProtocolError
from gateway.protocol.framing import TappedMessage

log = structlog.get_logger(__name__)
#: What decoding a malformed tapped body can raise.
_UNDECODABLE = (ProtocolError, struct.error, ValueError, IndexError)


class ConnectionAudit:
    def __init__(self, tracker: StatementTracker, writer: AuditWriter) -> None:
        self._tracker = tracker
        self._writer = writer

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

    def on_client(self, tapped: list[TappedMessage], now_ns: int) -> None:
        tracker = self._tracker
        for message in tapped:
            try:
                tracker.client(message, now_ns)
            except _UNDECODABLE as exc:
                self._undecodable(message, exc)

    def on_server(self, tapped: list[TappedMessage], now_ns: int) -> None:
        tracker, submit = self._tracker, self._writer.submit
        for message in tapped:
            try:
                events = tracker.server(message, now_ns)
            except _UNDECODABLE as exc:
                self._undecodable(message, exc)
                continue
            if events:
                submit(events)

    def _undecodable(self, message: TappedMessage, exc: Exception) -> None:
        # The message was already forwarded; a peer's malformed message is the
        # server's to reject, and must not take the relay down with the audit.
        # Only the type is logged: the body may hold anything the client sent.
        log.warning(
            "audit_message_undecodable",
            session_id=self._tracker.session_id,
            connection_id=self._tracker.connection_id,
            message_type=chr(message.type),
            error=type(exc).__name__,
        )

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
        if kind == "connection_end":
            self._writer.submit(self._tracker.close(now_ns))
        self._writer.submit(
            event_rows(
                [
                    AuditEvent(
                        session_id=self._tracker.session_id,
                        connection_id=self._tracker.connection_id,
                        kind=kind,
                        occurred_at=datetime.fromtimestamp(now_ns / 1e9, UTC),
                        detail=detail,
                    )
                ]
            )
        )
