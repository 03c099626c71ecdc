"""The composed gateway: the store, its thread, and the pieces that use it.

A composition root: it alone (with the daemon and the audit writer process)
knows the concrete :class:`~gateway.store.Store`, and hands it to the grant
service, the credentials and the audit runtime as their ports. It wires the
fail-closed cut (audit runtime -> every grant's live connections) and the
gateway-wide refusal (admission <- audit runtime).

:class:`Gateway` is what the control API's routers receive: ``db``, ``store``,
``audit_writer`` and ``live_connection_count`` (review), grants (access),
``verify``, ``refresh_secrets``, ``rotations`` and ``rotate`` (resources).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from gateway.access.admission import Admission
from gateway.access.approvals import RequestService
from gateway.access.authorization import Allowance, authorize_access
from gateway.access.connections import ConnectionRecords
from gateway.access.host import ListenerHost
from gateway.access.ports import SessionRecord
from gateway.access.requests import AccessRequest, StateChange
from gateway.access.service import GrantService
from gateway.audit.refusals import RefusalRecorder
from gateway.audit.runtime import AuditRuntime
from gateway.audit.sink import AuditSink
from gateway.audit.writer import AuditWriter
from gateway.config import GatewaySettings
from gateway.credentials.pki import GatewayPki
from gateway.credentials.rotation import RotationResult, Rotations
from gateway.credentials.targets import Credentials
from gateway.credentials.verify import VerifyResult, verify
from gateway.errors import InvalidRequest, NotFound
from gateway.identity.principals import Principal
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
        rotation_step_hook: Callable[[str], Awaitable[None]] | None = None,
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
        self.requests = RequestService(
            store,
            self.db,
            pending_ttl=timedelta(seconds=settings.request_pending_ttl_seconds),
            open_within=timedelta(seconds=settings.request_open_within_seconds),
            sweep_interval=settings.request_sweep_seconds,
            on_change=self._request_changed,
        )
        #: credential rotation (and storing checked passwords); see :meth:`rotate`
        self.rotations = Rotations(
            store,
            self.db,
            connect_timeout=settings.upstream_connect_timeout_seconds,
            password_length=settings.rotation_password_length,
            password_alphabet=settings.rotation_password_alphabet,
            on_change=self.refresh_secrets,
            recovery_retry_seconds=settings.rotation_recovery_retry_seconds,
            step_hook=rotation_step_hook,
        )
        self.identity = IdentityService(
            store,
            self.db,
            session_ttl=timedelta(seconds=settings.login_ttl_seconds),
            on_disabled=self._principal_disabled,
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
        self.requests.start()
        if self.settings.audit_enabled:
            await self.credentials.refresh()
            await self.audit.start()
        # Rotations a crash left in flight are settled in the background; until
        # then a connection refused with 28P01 tries the other password.
        self.rotations.start()
        return closed

    async def shutdown(self) -> None:
        await self.requests.close()
        await self.rotations.close()
        await self.grants.shutdown()
        # The interval's counts are written before the store thread stops.
        await self.refusals.close()
        self.db.shutdown()

    async def refresh_secrets(self) -> None:
        await self.credentials.refresh()
        self.audit.secrets_changed()

    async def rotate(self, resource: str, account: str, *, started_by: str) -> RotationResult:
        """Rotate *account*'s password now to a generated one nobody sees, and
        record it (who or what: *started_by*). The call a scheduler makes; an
        upstream failure is a result with ``ok`` false, never an exception."""
        return await self.rotations.rotate(resource, account, started_by=started_by)

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
        resource: str | None,
        account: str | None,
        duration_seconds: int | None,
        port: int | None = None,
        reason: str | None = None,
        api_client_addr: str | None = None,
        reported_host: str | None = None,
        owner_uid: int | None = None,
        socket_dir: str | None = None,
        csr: str | None = None,
        request_id: str | None = None,
        break_glass: bool = False,
    ) -> SessionRecord | AccessRequest:
        """Open a grant for *principal* if its role or a policy allows it.

        A policy asking for approval gets a pending :class:`AccessRequest` back
        instead (unless *break_glass*, which a policy must allow); its requester
        opens it once approved, with *request_id* (what was asked is the
        request's: resource, account, duration and reason given again must match).
        """
        request = None
        if request_id is not None:
            request = await self.requests.openable(principal, request_id)
            _check_same_ask(request, resource, account, duration_seconds, reason)
            resource, account = request.resource, request.account
            duration_seconds, reason = request.duration_seconds, request.reason
        if resource is None or account is None or duration_seconds is None:
            raise InvalidRequest(
                "say which --resource and --account, for how long",
                hint="or open an approved request with --request ID",
            )
        project, allowance = await self._authorize(
            principal, resource, account, duration_seconds, reason, break_glass=break_glass
        )
        policy = allowance.policy
        if request is None and policy is not None and policy.approvals_required:
            assert project is not None  # a policy allowed it: the resource exists
            request = await self.requests.create(
                principal,
                project=project,
                resource=resource,
                account=account,
                duration_seconds=duration_seconds,
                reason=reason,
                policy=policy,
                break_glass=break_glass,
            )
            if not break_glass:
                return request  # its requester waits for approval
        elif break_glass:
            raise InvalidRequest(
                "break-glass is for access that needs approval, and this one needs none",
                hint="request it without --break-glass",
            )
        session = await self.grants.open_access(
            requester=principal.name,
            resource=resource,
            account=account,
            duration_seconds=duration_seconds,
            port=port,
            request={
                "principal_id": principal.id,
                "token_id": principal.token_id,
                "project": project,
                "policy_name": request.policy_name if request else allowance.name,
                "reason": reason,
                "api_client_addr": api_client_addr,
                "reported_host": reported_host,
                "request_id": request.id if request else None,
            },
            owner_uid=owner_uid,
            socket_dir=socket_dir,
            csr=csr,
        )
        if request is not None:
            try:
                await self.requests.opened(principal, request, session.id)
            except Exception:
                # Decided otherwise meanwhile (cancelled, opened elsewhere): no grant.
                await self.grants.close_access(session.id, detail="its request changed")
                raise
        return session

    async def _authorize(
        self,
        principal: Principal,
        resource: str,
        account: str,
        duration_seconds: int,
        reason: str | None,
        *,
        break_glass: bool,
    ) -> tuple[str | None, Allowance]:
        """The resource's project and what allows *principal* this access."""
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
            break_glass=break_glass,
        )
        return project, allowance

    async def revoke(self, session_id: str, *, by: Principal, reason: str | None) -> SessionRecord:
        """End a live grant now; the request it was opened from records it."""
        session = await self.grants.revoke(session_id, by=by.name, reason=reason)
        if session.request_id:
            await self.requests.revoked(session.request_id, by=by, reason=reason)
        return session

    def _request_changed(self, request: AccessRequest, change: StateChange) -> None:
        """Tell the outside world (webhooks) of a request's change."""

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


def _check_same_ask(
    request: AccessRequest,
    resource: str | None,
    account: str | None,
    duration_seconds: int | None,
    reason: str | None,
) -> None:
    """What was asked is fixed once requested: given again, it must match."""
    asked = {
        "resource": (resource, request.resource),
        "account": (account, request.account),
        "duration": (duration_seconds, request.duration_seconds),
        "reason": (reason, request.reason),
    }
    changed = [
        name for name, (given, fixed) in asked.items() if given is not None and given != fixed
    ]
    if changed:
        raise InvalidRequest(
            f"request {request.id[:8]} was for something else: its {', '.join(changed)}"
            " cannot change once requested",
            hint="open it as requested (`pam db access --request ID`), or request again",
        )
