"""What relays connections in a process: the daemon's own, or a relay worker's.

Both composition roots (:class:`~gateway.app.gateway.Gateway` and
:class:`~gateway.app.relay_worker.RelayWorker`) relay through the same parts,
built, wired to their metrics, started and refreshed here the same way: the
store thread, the credentials (upstream targets, and the passwords the audit
masks), the audit runtime (this process's journal), the connection records and
the refusal recorder, and the :class:`~gateway.access.host.ListenerHost` the
grants' doors call back into.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.access.admission import Admission
from gateway.access.connections import ConnectionRecords
from gateway.access.host import ListenerHost
from gateway.app.runtime import StoreThread
from gateway.audit.refusals import RefusalRecorder
from gateway.audit.runtime import AuditRuntime
from gateway.audit.sink import AuditSink
from gateway.audit.stats import WriteStats
from gateway.config import GatewaySettings
from gateway.credentials.targets import Credentials
from gateway.net.ports import ConnectionMetrics
from gateway.net.relay import Termination
from gateway.refusal import Refusal
from gateway.store import Store

__all__ = ["RelayMetrics", "Relaying"]


class RelayMetrics(ConnectionMetrics, Protocol):
    """Where a process's relaying counts go (the daemon's registry, or a
    worker's messages to the daemon)."""

    def refused(self, refusal: Refusal) -> None: ...

    def audit_written(self, stats: WriteStats) -> None: ...


@dataclass(eq=False)
class Relaying:
    db: StoreThread
    credentials: Credentials
    audit: AuditRuntime
    records: ConnectionRecords
    refusals: RefusalRecorder

    @classmethod
    def build(
        cls,
        store: Store,
        settings: GatewaySettings,
        *,
        sink: AuditSink | None,
        journal_dir: Path | None,
    ) -> Relaying:
        db = StoreThread()
        credentials = Credentials(store, db)
        audit = AuditRuntime(
            store,
            db,
            settings,
            sink=sink,
            journal_dir=journal_dir,
            # Every account's stored password is masked, not only the connection's own.
            stored_secrets=lambda: credentials.stored_secrets,
        )
        records = ConnectionRecords(store, db)
        refusals = RefusalRecorder(store, db, interval=settings.refusal_interval_seconds)
        return cls(db, credentials, audit, records, refusals)

    def host(
        self,
        settings: GatewaySettings,
        metrics: RelayMetrics,
        *,
        checks: tuple[Callable[[], Termination | None], ...] = (),
        client_tls: ssl.SSLContext | None = None,
    ) -> ListenerHost:
        """The doors' host: new connections refused while the audit (or one of
        *checks*) says so; refusals recorded and counted in *metrics*."""
        self.refusals.observer = metrics.refused
        return ListenerHost(
            settings,
            self.credentials,
            self.audit,
            Admission(checks=(self.audit.refusal, *checks)),
            self.records,
            client_tls_context=client_tls,
            on_refusal=self.refusals.refused,
            connection_metrics=metrics,
        )

    async def start(self, settings: GatewaySettings, metrics: RelayMetrics) -> None:
        """Read the credentials and start the audit (when it is on)."""
        if settings.audit_enabled:
            await self.credentials.refresh()
            await self.audit.start()
            if self.audit.writer is not None:
                self.audit.writer.on_written = metrics.audit_written

    async def refresh_secrets(self) -> None:
        """The stored credentials changed: new targets, and new masks for the trail."""
        await self.credentials.refresh()
        self.audit.secrets_changed()
