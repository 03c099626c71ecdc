"""The composed gateway: the store, its thread, and the pieces that use it.

A composition root: it alone (with the daemon and the audit writer process)
knows the concrete :class:`~gateway.store.Store`, and hands it to the grant
service, the credentials and the audit runtime as their ports. It wires the
fail-closed cut (audit runtime -> every grant's live connections) and the
gateway-wide refusal (admission <- audit runtime).

:class:`Gateway` is what the control API's routers receive: ``db``, ``store``,
``audit_writer`` and ``live_connection_count`` (review), grants (access),
``verify`` and ``refresh_secrets`` (resources).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from gateway.access.admission import Admission
from gateway.access.authorization import authorize_access
from gateway.access.connections import ConnectionRecords
from gateway.access.host import ListenerHost
from gateway.access.ports import SessionRecord
from gateway.access.service import GrantService
from gateway.audit.refusals import RefusalRecorder
from gateway.audit.runtime import AuditRuntime
from gateway.audit.sink import AuditSink
from gateway.audit.writer import AuditWriter
from gateway.config import GatewaySettings
from gateway.credentials.pki import GatewayPki
from gateway.credentials.targets import Credentials
from gateway.credentials.verify import VerifyResult, verify
from gateway.errors import NotFound
from gateway.identity.principals import Principal
from gateway.identity.second_factor import MfaService
from gateway.identity.service import IdentityService
from gateway.store import Store

T = TypeVar("T")


class StoreThread:
    """One worker thread for every store call: the event loop never blocks on
    disk, and SQLite writes are serialised."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pam-store")

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class Gateway:
    def __init__(
        self,
        store: Store,
        settings: GatewaySettings,
        *,
        client_tls_context: ssl.SSLContext | None = None,
        audit_sink: AuditSink | None = None,
        journal_dir: Path | None = None,
        pki: GatewayPki | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.db = StoreThread()
        self.credentials = Credentials(store, self.db)
        self.audit = AuditRuntime(
            store,
            self.db,
            settings,
            sink=audit_sink,
            journal_dir=journal_dir,
            stored_secrets=lambda: self.credentials.stored_secrets,
        )
        self.admission = Admission(checks=(self.audit.refusal,))
        #: every refused API call and grant connection, floods summarised
        self.refusals = RefusalRecorder(store, self.db, interval=settings.refusal_interval_seconds)
        self.records = ConnectionRecords(store, self.db)
        self.host = ListenerHost(
            settings,
            self.credentials,
            self.audit,
            self.admission,
            self.records,
            client_tls_context=client_tls_context,
            on_refusal=self.refusals.refused,
        )
        self.grants = GrantService(
            store, self.db, settings, self.host, self.records, self.audit, pki=pki
        )
        #: the tunnel endpoint's bound port, once the daemon serves it
        self.tunnel_port: int | None = None
        self.audit.cut_live = self.grants.terminate_live
        #: second factors: enrolment, the code checks (sign-in, grants,
        #: approvals) and project settings
        self.mfa = MfaService(store, self.db, gateway_id=settings.gateway_id)
        self.identity = IdentityService(
            store,
            self.db,
            session_ttl=timedelta(seconds=settings.login_ttl_seconds),
            on_disabled=self._principal_disabled,
            mfa=self.mfa,
        )

    async def _principal_disabled(self, principal_id: str, name: str) -> None:
        await self.grants.end_grants_of(principal_id, detail=f"user {name} was disabled")

    @property
    def audit_writer(self) -> AuditWriter | None:
        return self.audit.writer

    def live_connection_count(self, session_id: str) -> int:
        return self.grants.live_connection_count(session_id)

    async def start(self) -> int:
        """Close what a crash left open, start the watchdog and the audit writer;
        returns how many sessions a crash had left open."""
        closed = await self.grants.start()
        if self.settings.audit_enabled:
            await self.credentials.refresh()
            await self.audit.start()
        return closed

    async def shutdown(self) -> None:
        await self.grants.shutdown()
        # The interval's counts are written before the store thread stops.
        await self.refusals.close()
        self.db.shutdown()

    async def refresh_secrets(self) -> None:
        await self.credentials.refresh()
        self.audit.secrets_changed()

    async def verify(self, resource: str, account: str | None) -> list[VerifyResult]:
        return await verify(
            self.credentials,
            self.store,
            self.db,
            resource,
            account,
            connect_timeout=self.settings.upstream_connect_timeout_seconds,
        )

    async def open_access(
        self,
        principal: Principal,
        *,
        resource: str,
        account: str,
        duration_seconds: int,
        port: int | None = None,
        reason: str | None = None,
        api_client_addr: str | None = None,
        reported_host: str | None = None,
        owner_uid: int | None = None,
        socket_dir: str | None = None,
        csr: str | None = None,
        otp: str | None = None,
    ) -> SessionRecord:
        """Open a grant for *principal* if its role or a policy allows it, and
        with a current second-factor code (*otp*) where one is asked: the
        deciding policy has ``require_mfa``, or an admin (no policy) has
        enrolled one. Asked once, here: the grant's connections never are."""
        try:
            project: str | None = (await self.db(self.store.get_resource, resource)).project
        except NotFound:
            if principal.is_admin():
                raise
            project = None
        # An unknown resource (project None) is refused by authorize_access in
        # the same words as one no policy covers.
        policies = [] if project is None else await self.identity.policies(project)
        allowance = authorize_access(
            principal,
            project=project,
            policies=policies,
            resource=resource,
            account=account,
            duration_seconds=duration_seconds,
            reason=reason,
        )
        if allowance.policy is not None and allowance.policy.require_mfa:
            await self.mfa.check_second_factor(principal, otp, purpose="grant")
        elif allowance.policy is None and await self.mfa.is_enabled(principal.id):
            # An admin passes no policy, but not the second factor they set up.
            await self.mfa.check_second_factor(principal, otp, purpose="grant")
        return await self.grants.open_access(
            requester=principal.name,
            resource=resource,
            account=account,
            duration_seconds=duration_seconds,
            port=port,
            request={
                "principal_id": principal.id,
                "token_id": principal.token_id,
                "project": project,
                "policy_name": allowance.name,
                "reason": reason,
                "api_client_addr": api_client_addr,
                "reported_host": reported_host,
            },
            owner_uid=owner_uid,
            socket_dir=socket_dir,
            csr=csr,
        )

    def tunnel_offer(self, session_id: str) -> tuple[bytes, bytes, int] | None:
        """For a grant opened with a CSR: its certificate, the CA and the tunnel port."""
        cert = self.grants.certificate_of(session_id)
        pki = self.grants.pki
        if cert is None or pki is None or self.tunnel_port is None:
            return None
        return cert, pki.ca_pem, self.tunnel_port

    async def heartbeat(self, session_id: str) -> SessionRecord:
        return await self.grants.heartbeat(session_id)

    async def close_access(self, session_id: str, *, detail: str | None = None) -> SessionRecord:
        return await self.grants.close_access(session_id, detail=detail)
