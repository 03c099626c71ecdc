"""The listeners' host: what a grant's door needs, from the pieces that have it.

:class:`ListenerHost` implements ``gateway.net``'s ``ConnectionHost`` port
exactly as declared there, by delegation: timeouts and client TLS from the
settings, upstream targets and SCRAM caches from the credentials, the statement
tap from the audit runtime (masking every stored password, not only the
connection's own), refusals from admission (and refused connections to the refusal recorder),
the records from
:class:`~gateway.access.connections.ConnectionRecords`, and each connection's
counts to the daemon's metrics (``connection_metrics``), if it has any.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from gateway.access.admission import Admission
from gateway.access.connections import ConnectionRecords
from gateway.audit.runtime import AuditRuntime
from gateway.audit.tap import ConnectionAudit
from gateway.config import GatewaySettings
from gateway.credentials.targets import Credentials
from gateway.net.ports import ConnectionMetrics
from gateway.net.relay import Termination
from gateway.net.upstream import UpstreamTarget
from gateway.refusal import Refusal


@dataclass(eq=False)
class ListenerHost:
    settings: GatewaySettings
    credentials: Credentials
    audit: AuditRuntime
    admission: Admission
    records: ConnectionRecords
    #: TLS for local clients that ask for it (None: they are answered ``N``)
    client_tls_context: ssl.SSLContext | None = None
    #: where refused connections go (the refusal recorder); None drops them
    on_refusal: Callable[[Refusal], None] | None = None
    #: the daemon's metrics (None: not counted)
    connection_metrics: ConnectionMetrics | None = None

    @property
    def startup_timeout(self) -> float:
        return self.settings.client_startup_timeout_seconds

    @property
    def connect_timeout(self) -> float:
        return self.settings.upstream_connect_timeout_seconds

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        return self.client_tls_context

    @property
    def metrics(self) -> ConnectionMetrics | None:
        return self.connection_metrics

    async def upstream_target(
        self, resource: str, account: str, *, session_id: str | None = None
    ) -> UpstreamTarget:
        return await self.credentials.upstream_target(resource, account, session_id=session_id)

    async def retry_target(self, failed: UpstreamTarget) -> UpstreamTarget | None:
        return await self.credentials.retry_target(failed)

    def connection_audit(
        self, session_id: str, connection_id: str, secrets: tuple[str, ...]
    ) -> ConnectionAudit | None:
        # Every account's stored password is masked, not only this one's.
        return self.audit.connection_audit(
            session_id, connection_id, secrets + self.credentials.stored_secrets
        )

    def refusal(self) -> Termination | None:
        return self.admission.refusal()

    def refused(self, refusal: Refusal) -> None:
        if self.on_refusal is not None:
            self.on_refusal(refusal)

    def scram_cache(self, target: UpstreamTarget) -> dict[tuple[bytes, int], bytes]:
        return self.credentials.scram_cache(target)

    async def record_connection_start(
        self,
        session_id: str,
        client_addr: str,
        application_name: str | None,
        *,
        backend_pid: int | None,
        started_at: datetime,
    ) -> str:
        return await self.records.start(
            session_id,
            client_addr,
            application_name,
            backend_pid=backend_pid,
            started_at=started_at,
        )

    async def record_connection_end(
        self,
        connection_id: str,
        *,
        reason: str,
        bytes_from_client: int,
        bytes_from_server: int,
        error: tuple[str, str] | None,
    ) -> None:
        if self.connection_metrics is not None:
            self.connection_metrics.connection_ended(reason, bytes_from_client, bytes_from_server)
        await self.records.end(
            connection_id,
            reason=reason,
            bytes_from_client=bytes_from_client,
            bytes_from_server=bytes_from_server,
            error=error,
        )
