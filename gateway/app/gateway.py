"""The composed gateway: the store, its thread, and the pieces that use it.

A composition root: it alone (with the daemon and the audit writer process)
knows the concrete :class:`~gateway.store.Store`, and hands it to the grant
service, the credentials and the audit runtime as their ports. It wires the
fail-closed cut (audit runtime -> every grant's live connections) and the
gateway-wide refusal (admission <- audit runtime), the same for a store out of
reach (admission <- presence; presence -> live connections in strict mode), and
publishes the access events to the webhook notifier (``notifier.publish``: a
grant opened, a session ended or revoked). It follows what other gateways on
the store change (``changes``, :mod:`gateway.app.changes`) and announces the
credential changes made through it (:meth:`Gateway.refresh_secrets`).

:class:`Gateway` is what the control API's routers receive: ``db``, ``store``,
``audit_writer`` and ``live_connection_count`` (review), grants and requests
(access), ``verify``, ``refresh_secrets``, ``rotations``, ``rotate`` and
``schedules`` and ``ephemeral`` (resources), ``webhooks``, ``mfa`` and ``sso``,
``metrics`` (``/metrics``) and ``readiness`` (``/readyz``).
It publishes ``rotation.succeeded``/``rotation.failed`` for every generated
rotation. A grant of an ephemeral account gets its own database role before its
door opens (``grants.prepare``), dropped after it ends (``ephemeral.ended``).
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Final

import structlog

from gateway.access.approvals import RequestService
from gateway.access.authorization import Allowance, authorize_access
from gateway.access.extension import authorize_extension, check_extension
from gateway.access.ports import SessionRecord
from gateway.access.presence import Presence
from gateway.access.requests import AccessRequest, ChangeKind, RequestState, StateChange
from gateway.access.service import GrantService
from gateway.app.changes import ChangeFollower
from gateway.app.metrics import GatewayMetrics, GatewayState
from gateway.app.readiness import Readiness
from gateway.app.relaying import Relaying
from gateway.audit.sink import AuditSink
from gateway.audit.writer import AuditWriter
from gateway.config import GatewaySettings
from gateway.credentials.ephemeral import EphemeralRoles, EphemeralSettings
from gateway.credentials.pki import GatewayPki
from gateway.credentials.rotation import RotationResult, Rotations
from gateway.credentials.schedule import RotationScheduler, SchedulePlan
from gateway.credentials.verify import VerifyResult, verify
from gateway.errors import InvalidRequest, NotFound
from gateway.identity.policy import Policy
from gateway.identity.principals import DEFAULT_PROJECT, Principal
from gateway.identity.second_factor import MfaService
from gateway.identity.service import IdentityService
from gateway.identity.sso import SsoService
from gateway.notify import Event, Notifier, RetryPolicy, Webhooks
from gateway.notify.events import request_data, rotation_data, session_data
from gateway.reasons import SessionEndReason
from gateway.store import Store
from gateway.store.changes import ChangeTopic

log = structlog.get_logger(__name__)


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
        relaying = Relaying.build(store, settings, sink=audit_sink, journal_dir=journal_dir)
        self.relaying = relaying
        self.db = relaying.db
        self.credentials = relaying.credentials
        self.audit = relaying.audit
        #: every refused API call and grant connection, floods summarised
        self.refusals = relaying.refusals
        self.records = relaying.records
        #: this gateway's presence lease, and the recovery of gone gateways' sessions
        self.presence = Presence(
            store,
            self.db,
            settings.gateway_id,
            renew_seconds=settings.presence_renew_seconds,
            lease_seconds=settings.presence_lease_seconds,
            # The roles of a gone gateway's grants are disabled now, not at the
            # janitor's next interval.
            on_closed=self._gone_gateways_sessions_ended,
            grace_seconds=settings.store_unreachable_grace_seconds,
            strict=settings.store_unreachable_strict,
        )
        #: the Prometheus metrics (``/metrics``), in a registry of this gateway's own
        self.metrics = GatewayMetrics(
            GatewayState(
                gateway_id=settings.gateway_id,
                live=lambda: self.grants.live_counts(),
                audit_backlog=self._audit_backlog,
                lease_age=self.presence.lease_age,
            )
        )
        #: the checks behind ``/readyz``
        self.readiness = Readiness(lambda: self.db(self.store.ping), self.presence, self.audit)
        self.host = relaying.host(
            settings,
            self.metrics,
            checks=(self.presence.refusal,),
            client_tls=client_tls_context,
        )
        self.grants = GrantService(
            store, self.db, settings, self.host, self.records, self.audit, pki=pki
        )
        #: the tunnel endpoint's bound port, once the daemon serves it
        self.tunnel_port: int | None = None
        self.audit.cut_live = self.grants.terminate_live
        self.presence.cut_live = self.grants.terminate_live
        self.requests = RequestService(
            store,
            self.db,
            pending_ttl=timedelta(seconds=settings.request_pending_ttl_seconds),
            open_within=timedelta(seconds=settings.request_open_within_seconds),
            sweep_interval=settings.request_sweep_seconds,
            on_change=self._request_changed,
        )
        #: webhooks: ``publish(project, event, data)`` from anywhere on the loop
        self.notifier = Notifier(
            store,
            self.db,
            gateway_id=settings.gateway_id,
            retry=RetryPolicy(
                first_delay=settings.webhook_retry_first_delay_seconds,
                factor=settings.webhook_retry_factor,
                max_attempts=settings.webhook_max_attempts,
                timeout=settings.webhook_timeout_seconds,
            ),
        )
        self.webhooks = Webhooks(store, self.db, self.notifier)
        self.grants.on_ended = self._session_ended
        self.grants.on_changed_elsewhere = self._session_changed_elsewhere
        #: applies what other gateways on the store change (LISTEN/NOTIFY, reconcile)
        self.changes = ChangeFollower(
            store,
            self.db,
            self.grants,
            gateway_id=settings.gateway_id,
            refresh_credentials=self._refresh_local_secrets,
            reconcile_seconds=settings.changes_reconcile_seconds,
            listen=settings.changes_listen,
        )
        #: second factors: enrolment, the code checks (sign-in, grants,
        #: approvals) and project settings
        self.mfa = MfaService(store, self.db, gateway_id=settings.gateway_id)
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
            gateway_id=settings.gateway_id,
            on_result=self._rotation_ended,
        )
        #: rotation schedules, run by the gateway holding the scheduler's lease
        self.schedules = RotationScheduler(
            store,
            self.db,
            gateway_id=settings.gateway_id,
            rotate=self.rotate,
            recover=self.rotations.recover,
            plan=SchedulePlan(
                jitter_fraction=settings.rotation_jitter_fraction,
                retry_first_delay=settings.rotation_retry_first_delay_seconds,
                retry_factor=settings.rotation_retry_factor,
            ),
            tick_seconds=settings.rotation_schedule_tick_seconds,
            lease_seconds=settings.rotation_lease_seconds,
            min_interval_seconds=settings.rotation_min_interval_seconds,
        )
        #: a database role per grant (ephemeral accounts): made as a grant opens,
        #: dropped by its janitor after the grant
        self.ephemeral = EphemeralRoles(
            store, self.db, self.credentials, _ephemeral_settings(settings)
        )
        self.grants.prepare = self.ephemeral.prepare
        self.identity = IdentityService(
            store,
            self.db,
            session_ttl=timedelta(seconds=settings.login_ttl_seconds),
            on_disabled=self._principal_disabled,
            mfa=self.mfa,
        )
        #: single sign-on with OpenID Connect (``/v1/sso``)
        self.sso = SsoService(store, self.db, self.identity)
        #: told after this gateway reloaded the stored credentials (the relay
        #: workers reload theirs)
        self.on_secrets_refreshed: Callable[[], None] | None = None
        #: awaited once when the daemon starts stopping, before anything else
        #: stops (the web console ends the grants it holds)
        self.stop_hooks: list[Callable[[], Awaitable[None]]] = []
        #: background work of this root's own (kept referenced until done)
        self._tasks: set[asyncio.Task[None]] = set()

    def _session_ended(self, session: SessionRecord) -> None:
        self.ephemeral.ended(session)
        self._publish_end(session)

    def _publish_end(self, session: SessionRecord) -> None:
        if session.project is None:
            return  # a session from before projects: no project's webhooks to tell
        revoked = session.end_reason == SessionEndReason.REVOKED
        event = Event.ACCESS_REVOKED if revoked else Event.ACCESS_ENDED
        self.notifier.publish(session.project, event, session_data(session))

    def _gone_gateways_sessions_ended(self, session_ids: list[str]) -> None:
        """Crash recovery ended *session_ids* (a gone gateway's): their grant
        roles are disabled now, not at the janitor's next interval, and their
        webhooks told (access.ended, reason gateway_crash)."""
        self.ephemeral.janitor.wake()
        self._tasks.add(task := asyncio.create_task(self._publish_ends(session_ids)))
        task.add_done_callback(self._tasks.discard)

    async def _publish_ends(self, session_ids: list[str]) -> None:
        for session_id in session_ids:
            try:
                self._publish_end(await self.db(self.store.get_session, session_id))
            except Exception as exc:  # one lost notice must not stop the others
                log.warning("crash_end_not_published", session_id=session_id, error=repr(exc))

    def _session_changed_elsewhere(self, session: SessionRecord) -> None:
        """Another gateway ended or extended a grant this one holds (and told
        the webhooks): its grant role follows."""
        if session.ended_at is not None:
            self.ephemeral.ended(session)
        else:
            self.ephemeral.expiry_moved(session)

    async def _principal_disabled(self, principal_id: str, name: str) -> None:
        await self.grants.end_grants_of(principal_id, detail=f"user {name} was disabled")

    @property
    def audit_writer(self) -> AuditWriter | None:
        return self.audit.writer

    def _audit_backlog(self) -> int | None:
        writer = self.audit.writer
        return None if writer is None else writer.backlog

    def live_connection_count(self, session_id: str) -> int:
        return self.grants.live_connection_count(session_id)

    async def start(self) -> int:
        """Close what a crash left open, start the watchdog and the audit writer;
        returns how many sessions a crash had left open."""
        # This gateway's own sessions a crash left end at its previous run's last
        # renewal: recovered before the presence lease is renewed.
        closed = await self.grants.start()
        await self.presence.start()
        await self.notifier.start()
        # This gateway's own sessions its previous run left: told now the notifier runs.
        await self._publish_ends(self.grants.recovered_at_start)
        self.requests.start()
        await self.relaying.start(self.settings, self.metrics)
        # This gateway's presence is announced (above), so that no other gateway
        # takes its rotations in flight for a gone gateway's; those a crash of it
        # left are settled in the background (until then a connection refused with
        # 28P01 tries the other password), and the schedules run.
        await self.schedules.start()
        self.rotations.start()
        # Grant roles a crash left (their sessions were just ended) go first.
        self.ephemeral.start()
        await self.changes.start()
        return closed

    async def stopping(self) -> None:
        """Run (once) what must stop before the control API and the grants do."""
        hooks, self.stop_hooks = self.stop_hooks, []
        for hook in hooks:
            try:
                await hook()
            except Exception as exc:  # the rest of the shutdown still runs
                log.error("stop_hook_failed", error=repr(exc))

    async def shutdown(self) -> None:
        await self.stopping()
        await self.requests.close()
        await self.schedules.close()
        await self.rotations.close()
        await self.changes.close()
        await self.grants.shutdown()
        # The roles of the grants the shutdown ended are dropped, within a bound.
        await self.ephemeral.close()
        # Last: once it is released, another gateway may end what is still open.
        await self.presence.close()
        # The sessions' end events go into the outbox before the store thread stops.
        await self.notifier.close()
        # The interval's counts are written before the store thread stops.
        await self.refusals.close()
        await self.sso.close()
        self.db.shutdown()

    async def refresh_secrets(self) -> None:
        """After a credential changed through this gateway: refresh here, and
        tell the other gateways on the store to refresh theirs."""
        await self._refresh_local_secrets()
        try:
            await self.db(
                self.store.announce_change, ChangeTopic.CREDENTIALS, self.settings.gateway_id
            )
        except Exception as exc:  # their reconcile catches up
            log.warning("credentials_change_not_announced", error=repr(exc))

    async def _refresh_local_secrets(self) -> None:
        await self.relaying.refresh_secrets()
        if self.on_secrets_refreshed is not None:
            self.on_secrets_refreshed()

    async def rotate(self, resource: str, account: str, *, started_by: str) -> RotationResult:
        """Rotate *account*'s password now to a generated one nobody sees, and
        record it (who or what: *started_by*). The call a scheduler makes; an
        upstream failure is a result with ``ok`` false, never an exception."""
        return await self.rotations.rotate(resource, account, started_by=started_by)

    async def _rotation_ended(self, result: RotationResult) -> None:
        """Count how a rotation ended, and tell the webhooks of the resource's project."""
        self.metrics.rotation_ended(ok=result.ok)
        try:
            project = (await self.db(self.store.get_resource, result.resource)).project
        except NotFound:
            return  # removed meanwhile: no project's webhooks to tell
        event = Event.ROTATION_SUCCEEDED if result.ok else Event.ROTATION_FAILED
        self.notifier.publish(project, event, rotation_data(result))

    async def verify(self, resource: str, account: str | None) -> list[VerifyResult]:
        return await verify(
            self.credentials,
            self.store,
            self.db,
            resource,
            account,
            connect_timeout=self.settings.upstream_connect_timeout_seconds,
            ephemeral=self.ephemeral.verify_account,
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
        otp: str | None = None,
    ) -> SessionRecord | AccessRequest:
        """Open a grant for *principal* if its role or a policy allows it.

        A policy asking for approval gets a pending :class:`AccessRequest` back
        instead (unless *break_glass*, which a policy must allow); its requester
        opens it once approved, with *request_id* (what was asked is the
        request's: resource, account, duration and reason given again must match).

        A current second-factor code (*otp*) is needed where the deciding policy
        has ``require_mfa``, or an admin (no policy) has enrolled one: once per
        grant, when it is asked for (with the request when it needs approval),
        never by its connections.
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
        if request is None:  # an approved request proved it when it was made
            await self._second_factor(principal, allowance, otp)
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
            idle_timeout_seconds=policy.idle_timeout_seconds if policy else None,
            idle_policy=policy.name if policy else allowance.name,
        )
        if request is not None:
            try:
                await self.requests.opened(principal, request, session.id)
            except Exception:
                # Decided otherwise meanwhile (cancelled, opened elsewhere): no grant.
                await self.grants.close_access(session.id, detail="its request changed")
                raise
        if project is not None:
            self.notifier.publish(project, Event.ACCESS_OPENED, session_data(session))
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
        # An unknown resource (project None) is refused by authorize_access in
        # the same words as one no policy covers.
        project, policies = await self._policies_for(principal, resource)
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

    async def extend_access(
        self, principal: Principal, session_id: str, *, by_seconds: int
    ) -> SessionRecord | AccessRequest:
        """Move a live grant's expiry later if *principal*'s role or policies
        allow its whole new duration (:mod:`gateway.access.extension`). Where
        the deciding policy asks for approval, an extension request is made
        instead (returned, to wait on); once approved the gateway applies it
        (:meth:`approve`). Every extension is recorded in the access trail, as
        a request of its own."""
        session = await self.grants.live_session(session_id)
        total = _total_seconds(session, by_seconds)
        project, policies = await self._policies_for(principal, session.resource_name)
        allowance = authorize_extension(
            principal, project=project, policies=policies, session=session, total_seconds=total
        )
        policy = allowance.policy
        project = project or session.project or DEFAULT_PROJECT
        if policy is not None and policy.approvals_required:
            return await self.requests.create(
                principal,
                project=project,
                resource=session.resource_name,
                account=session.account_name,
                duration_seconds=by_seconds,
                reason=session.reason,
                policy=policy,
                extends_session=session.id,
            )

        async def authorize(live: SessionRecord, total_seconds: int) -> None:
            # Again under the grant's lock: another extension may have landed.
            found_project, found = await self._policies_for(principal, live.resource_name)
            check_extension(
                authorize_extension(
                    principal,
                    project=found_project,
                    policies=found,
                    session=live,
                    total_seconds=total_seconds,
                )
            )

        extended = await self.grants.extend(
            session.id, by_seconds=by_seconds, by=principal.name, authorize=authorize
        )
        await self.requests.record_extension(
            principal,
            project=project,
            session_id=session.id,
            resource=session.resource_name,
            account=session.account_name,
            by_seconds=by_seconds,
            reason=session.reason,
            policy_name=allowance.name,
        )
        self._extended(extended, by_seconds=by_seconds, by=principal.name)
        return extended

    async def approve(
        self, principal: Principal, request_id: str, comment: str | None, otp: str | None = None
    ) -> AccessRequest:
        """An approval (with a current second-factor code where the request's
        project asks for one); the one that completes an extension request
        applies it."""
        seen = await self.requests.approvable(principal, request_id)
        if await self.mfa.approval_needs_mfa(seen.project):
            await self.mfa.check_second_factor(principal, otp, purpose="approval")
        request = await self.requests.approve(principal, seen.id, comment)
        if not (request.extends and request.state is RequestState.APPROVED):
            return request
        assert request.session_id is not None  # an extension names its grant
        try:
            extended = await self.grants.extend(
                request.session_id,
                by_seconds=request.duration_seconds,
                by=f"{request.requester} (approved by {principal.name})",
            )
        except InvalidRequest as exc:
            # The grant ended meanwhile, or the gateway's maximum: the approved
            # request stays approved and expires unused.
            log.info("approved_extension_not_applied", request_id=request.id, why=exc.message)
            return request
        self._extended(extended, by_seconds=request.duration_seconds, by=request.requester)
        return await self.requests.applied(request)

    def _extended(self, session: SessionRecord, *, by_seconds: int, by: str) -> None:
        self.ephemeral.expiry_moved(session)
        if session.project is not None:
            data = session_data(session) | {"by": by, "by_seconds": by_seconds}
            self.notifier.publish(session.project, Event.ACCESS_EXTENDED, data)

    async def _second_factor(
        self, principal: Principal, allowance: Allowance, otp: str | None
    ) -> None:
        if allowance.policy is not None and allowance.policy.require_mfa:
            await self.mfa.check_second_factor(principal, otp, purpose="grant")
        elif allowance.policy is None and await self.mfa.is_enabled(principal.id):
            # An admin passes no policy, but not the second factor they set up.
            await self.mfa.check_second_factor(principal, otp, purpose="grant")

    async def _policies_for(
        self, principal: Principal, resource: str
    ) -> tuple[str | None, list[Policy]]:
        """The resource's project (None when it does not exist, for a non-admin)
        and its policies."""
        try:
            project: str | None = (await self.db(self.store.get_resource, resource)).project
        except NotFound:
            if principal.is_admin():
                raise
            project = None
        policies = [] if project is None else await self.identity.policies(project)
        return project, policies

    def _request_changed(self, request: AccessRequest, change: StateChange) -> None:
        """Tell the webhooks of a request's change (after it was written)."""
        event = _REQUEST_EVENTS.get(change.kind)
        if change.kind is ChangeKind.APPROVED and request.state is not RequestState.APPROVED:
            event = None  # an approval short of the number needed: still pending
        if change.kind is ChangeKind.REQUESTED and request.break_glass:
            event = None  # told as access.break_glass, next
        if event is not None:
            data = request_data(request, state=change.state.value, actor=change.actor)
            self.notifier.publish(request.project, event, data)

    async def tunnel_offer(self, session_id: str) -> tuple[bytes, bytes, int] | None:
        """For a grant opened with a CSR: its certificate, the CA and this
        gateway's tunnel port (a grant another gateway held is taken over)."""
        cert = await self.grants.certificate_of(session_id)
        pki = self.grants.pki
        if cert is None or pki is None or self.tunnel_port is None:
            return None
        return cert, pki.ca_pem, self.tunnel_port

    async def heartbeat(self, session_id: str) -> SessionRecord:
        return await self.grants.heartbeat(session_id)

    async def close_access(self, session_id: str, *, detail: str | None = None) -> SessionRecord:
        return await self.grants.close_access(session_id, detail=detail)


def _ephemeral_settings(settings: GatewaySettings) -> EphemeralSettings:
    return EphemeralSettings(
        connect_timeout=settings.upstream_connect_timeout_seconds,
        password_length=settings.rotation_password_length,
        password_alphabet=settings.rotation_password_alphabet,
        marker_role=settings.ephemeral_marker_role,
        valid_until_margin_seconds=settings.ephemeral_valid_until_margin_seconds,
        janitor_interval_seconds=settings.ephemeral_janitor_interval_seconds,
        retry_first_delay_seconds=settings.ephemeral_retry_first_delay_seconds,
        retry_max_delay_seconds=settings.ephemeral_retry_max_delay_seconds,
        gateway_id=settings.gateway_id,
    )


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


#: The webhook event of each request change (``opened`` and ``revoked`` are
#: told by the grant, as access.opened and access.revoked).
_REQUEST_EVENTS: Final = {
    ChangeKind.REQUESTED: Event.REQUEST_CREATED,
    ChangeKind.APPROVED: Event.REQUEST_APPROVED,
    ChangeKind.DENIED: Event.REQUEST_DENIED,
    ChangeKind.EXPIRED: Event.REQUEST_EXPIRED,
    ChangeKind.CANCELLED: Event.REQUEST_CANCELLED,
    ChangeKind.BREAK_GLASS: Event.ACCESS_BREAK_GLASS,
}


def _total_seconds(session: SessionRecord, by_seconds: int) -> int:
    """How long *session* would last from its start, extended by *by_seconds*."""
    return math.ceil((session.expires_at - session.started_at).total_seconds()) + by_seconds
