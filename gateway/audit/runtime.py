"""The audit trail at run time: the writer, fail-closed mode and each connection's tap.

:class:`AuditRuntime` starts the :class:`~gateway.audit.writer.AuditWriter`
(appending in-process on the store thread, or through the
:class:`~gateway.audit.sink.AuditSink` process), keeps the fail-closed state and
builds the per-connection :class:`~gateway.audit.tap.ConnectionAudit`.

Invariants:
* With ``audit_fail_closed``, from the first failed write until one succeeds
  again, :meth:`AuditRuntime.refusal` refuses every new connection and every live
  one is cut (``cut_live``) with the end reason ``audit_unavailable``.
* Every stored password is masked in each connection's trail, not only the
  connection's own (the caller passes them in).
* :meth:`AuditRuntime.close` flushes what the relays have handed over before the
  sessions are sealed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.audit.pairing import StatementTracker
from gateway.audit.ports import AuditStore, StoreThread
from gateway.audit.records import EventRow
from gateway.audit.redaction import Redactor
from gateway.audit.sink import AuditSink
from gateway.audit.tap import ConnectionAudit
from gateway.audit.writer import AuditWriter
from gateway.config import GatewaySettings
from gateway.net.relay import Termination
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

#: How new connections are refused while the trail cannot be written.
REFUSAL = Termination(
    ConnectionEndReason.AUDIT_UNAVAILABLE,
    SqlState.CANNOT_CONNECT_NOW,
    "pam refuses new connections: the audit trail cannot be written (fail-closed mode)",
    hint="an administrator must restore the gateway's store; check the gateway log",
)
#: How live connections are cut when the trail cannot be written.
CUT = Termination(
    ConnectionEndReason.AUDIT_UNAVAILABLE,
    SqlState.ADMIN_SHUTDOWN,
    "terminating connection: the audit trail cannot be written and pam is in fail-closed mode",
    hint="reconnect once the gateway's store is back",
)


def _cut_nothing(_termination: Termination) -> None:
    pass


@dataclass(eq=False)
class AuditRuntime:
    store: AuditStore
    db: StoreThread
    settings: GatewaySettings
    #: the audit writer process (None: the trail is written on the store thread)
    sink: AuditSink | None = None
    #: ends every live connection (fail-closed mode); set by the composition root
    cut_live: Callable[[Termination], None] = _cut_nothing
    writer: AuditWriter | None = None
    #: set while the audit trail cannot be written and fail-closed is on
    _down: BaseException | None = None

    async def start(self) -> None:
        """Start the writer (and its process), if the audit is enabled."""
        if not self.settings.audit_enabled:
            return
        append = self._append
        if self.sink is not None:
            await self.sink.start()
            append = self.sink.append
        self.writer = AuditWriter(
            append, on_failure=self._on_failure, on_recovery=self._on_recovery
        )
        self.writer.start()

    def refusal(self) -> Termination | None:
        """Why new connections are refused for the audit's sake right now, if they are."""
        return None if self._down is None else REFUSAL

    def connection_audit(
        self, session_id: str, connection_id: str, secrets: tuple[str, ...]
    ) -> ConnectionAudit | None:
        """The statement tap of a new connection, masking *secrets* (None: audit off)."""
        settings = self.settings
        if not settings.audit_enabled or self.writer is None:
            return None
        tracker = StatementTracker(
            session_id,
            connection_id,
            redactor=Redactor.build(settings.audit_redact_patterns, secrets),
            parameter_mode=settings.audit_parameters,
            max_value_bytes=settings.audit_max_value_bytes,
        )
        return ConnectionAudit(tracker, self.writer)

    async def drain(self) -> None:
        """Wait (bounded) until what the relays handed over is written."""
        if self.writer is not None:
            await self.writer.drain()

    async def close(self) -> None:
        """Flush the trail, then stop the writer and its process."""
        if self.writer is not None:
            await self.writer.close()
        if self.sink is not None:
            await self.sink.close()

    async def _append(self, rows: list[EventRow]) -> int:
        return await self.db(self.store.append_audit_rows, rows, substitute_invalid=True)

    async def _on_failure(self, exc: BaseException | None) -> None:
        if not self.settings.audit_fail_closed:
            return
        self._down = exc or RuntimeError("audit failure")
        self.cut_live(CUT)

    async def _on_recovery(self, _exc: BaseException | None) -> None:
        self._down = None
