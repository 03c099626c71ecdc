"""Typed HTTP client for the gateway's control API (httpx).

Role: one method per API call, each returning the API's JSON typed by a
``TypedDict`` (:mod:`cli.api_json`) that mirrors the API's own model
(``gateway/app/api/models.py``; ``tests/unit/cli/test_client.py`` keeps the two
in step). Commands call these methods; they do not build URLs or guess at keys.

Invariants:

* Results stay the daemon's JSON, not re-serialised models: ``--json`` prints
  exactly what the API answered, times stay ISO-8601 strings for the renderers.
* Every failure is :class:`ApiError` with one line a person can act on: an
  unreachable daemon, a wrong token, or the daemon's own JSON error
  ``{"error": {"type", "message", "hint"}}``.
* Names become single URL path segments (:func:`seg`): a name cannot reach
  another route. Passwords go only into request bodies, never into a URL or an
  error.
* An export is streamed, never held: :meth:`ApiClient.export_session` and
  :meth:`ApiClient.export_window` hand over the response's bytes as they arrive.
  A refusal comes before the first byte (as an :class:`ApiError`); a stream cut
  short is an :class:`ApiError` too, raised while reading it.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final, cast
from urllib.parse import quote

import httpx

from cli.api_json import AccessJson as AccessJson
from cli.api_json import AccountAddJson as AccountAddJson

# The result types (cli.api_json), re-exported: callers import them from here.
from cli.api_json import AccountJson as AccountJson
from cli.api_json import ApprovalJson as ApprovalJson
from cli.api_json import AuditPageJson as AuditPageJson
from cli.api_json import AuditRecordJson as AuditRecordJson
from cli.api_json import AuditVerifyJson as AuditVerifyJson
from cli.api_json import CertificateJson as CertificateJson
from cli.api_json import ConnectionJson as ConnectionJson
from cli.api_json import DeliveryJson as DeliveryJson
from cli.api_json import GrantRoleJson as GrantRoleJson
from cli.api_json import HealthJson as HealthJson
from cli.api_json import MfaEnrolmentJson as MfaEnrolmentJson
from cli.api_json import MfaStatusJson as MfaStatusJson
from cli.api_json import ParameterJson as ParameterJson
from cli.api_json import PolicyJson as PolicyJson
from cli.api_json import PrincipalJson as PrincipalJson
from cli.api_json import ProblemJson as ProblemJson
from cli.api_json import ProjectJson as ProjectJson
from cli.api_json import RequestJson as RequestJson
from cli.api_json import ResourceJson as ResourceJson
from cli.api_json import RotationJson as RotationJson
from cli.api_json import SessionDetailJson as SessionDetailJson
from cli.api_json import SessionJson as SessionJson
from cli.api_json import SsoConfigJson as SsoConfigJson
from cli.api_json import SsoGroupJson as SsoGroupJson
from cli.api_json import SsoPollJson as SsoPollJson
from cli.api_json import SsoStartJson as SsoStartJson
from cli.api_json import TokenJson as TokenJson
from cli.api_json import TrailRecordJson as TrailRecordJson
from cli.api_json import VerifyResultJson as VerifyResultJson
from cli.api_json import WebhookCreatedJson as WebhookCreatedJson
from cli.api_json import WebhookJson as WebhookJson
from cli.api_json import WhoamiJson as WhoamiJson
from gateway.audit.review import EXPORT_SESSIONS_HEADER
from gateway.config import Profile, active_profile
from gateway.errors import GatewayError

#: ``resource verify`` connects to every account upstream, each with its own timeout.
VERIFY_TIMEOUT: Final = 120.0
#: a rotation signs in upstream up to four times, each with its own timeout
ROTATION_TIMEOUT: Final = 120.0
#: ``audit verify`` recomputes every chain in the store.
AUDIT_VERIFY_TIMEOUT: Final = 600.0
#: With another gateway to fail over to, how long connecting to one may take:
#: well under the fleet's presence lease (15 s by default), so that a held
#: grant's heartbeat reaches another gateway (which takes the grant over) before
#: the sessions of a gateway whose host went silent are ended as its crash.
FAILOVER_CONNECT_TIMEOUT: Final = 5.0


def seg(value: str) -> str:
    """A name as one URL path segment: '/' and friends can't reach another route."""
    return quote(value, safe="") or "%20"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


class ApiError(GatewayError):
    """The control API could not be reached or refused the request; ``code`` is
    the error's ``code`` when the daemon sent one (``mfa_required``)."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        status: int | None = None,
        code: str | None = None,
    ):
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code


class PendingApproval(Exception):
    """``pam db access`` asked for access a policy wants approved first: the
    gateway created this request, to wait on (HTTP 202)."""

    def __init__(self, request: RequestJson) -> None:
        super().__init__(request["id"])
        self.request = request


class ExportStream:
    """A streamed export: how many sessions it covers, then its bytes as they arrive."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.sessions = int(response.headers.get(EXPORT_SESSIONS_HEADER, "0"))

    def chunks(self) -> Iterator[bytes]:
        """The export's bytes, exactly as the daemon wrote them, a chunk at a time."""
        return self._response.iter_bytes()


class Endpoints:
    """The gateways a profile may reach, the one in use first: failover.

    A call that cannot connect to the one in use moves on to the next (the
    request never left, so any call may be retried); the one that answered is
    used from then on, by every client sharing this object (a held grant's
    heartbeats and its forwarder stay on one gateway). Thread-safe."""

    def __init__(self, urls: list[str]) -> None:
        self._urls = list(dict.fromkeys(u.rstrip("/") for u in urls))
        self._lock = threading.Lock()

    @classmethod
    def of(cls, profile: Profile) -> Endpoints:
        return cls([profile.api_url, *profile.api_urls])

    @property
    def current(self) -> str:
        with self._lock:
            return self._urls[0]

    def in_order(self) -> list[str]:
        """Every URL, the one in use first."""
        with self._lock:
            return list(self._urls)

    def failed(self, url: str) -> None:
        """*url* could not be reached: if it is the one in use, the next is."""
        with self._lock:
            if self._urls[0] == url and len(self._urls) > 1:
                self._urls.append(self._urls.pop(0))


class ApiClient:
    """The control API, one method per call (see :mod:`gateway.app.api.routers`)."""

    def __init__(
        self,
        config: Profile | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        endpoints: Endpoints | None = None,
    ) -> None:
        self.config = config or active_profile()
        self.endpoints = endpoints or Endpoints.of(self.config)
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        elsewhere = len(self.endpoints.in_order()) > 1
        connect = min(timeout, FAILOVER_CONNECT_TIMEOUT) if elsewhere else timeout
        # No base URL: every call names its gateway (the one in use, :class:`Endpoints`).
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect),
            trust_env=False,
            transport=transport,
            # A gateway's own CA, when the profile pins one; else the system's.
            verify=(
                ssl.create_default_context(cadata=self.config.ca_cert)
                if self.config.ca_cert
                else True
            ),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- health ------------------------------------------------------------------------

    def health(self) -> HealthJson:
        return cast(HealthJson, self.get("/v1/health"))

    def fleet(self) -> list[str]:
        """The control API URLs of the fleet's gateways present now."""
        return cast(list[str], self.get("/v1/gateways"))

    # --- resources and accounts --------------------------------------------------------

    def add_resource(
        self,
        name: str,
        *,
        host: str,
        port: int,
        database: str,
        ssl_mode: str,
        ca_cert: str | None,
    ) -> ResourceJson:
        body = {
            "name": name,
            "host": host,
            "port": port,
            "database": database,
            "ssl_mode": ssl_mode,
            "ca_cert": ca_cert,
        }
        return cast(ResourceJson, self.post("/v1/resources", body))

    def list_resources(self) -> list[ResourceJson]:
        return cast(list[ResourceJson], self.get("/v1/resources"))

    def get_resource(self, name: str) -> ResourceJson:
        return cast(ResourceJson, self.get(f"/v1/resources/{seg(name)}"))

    def remove_resource(self, name: str) -> None:
        self.delete(f"/v1/resources/{seg(name)}")

    def verify_resource(self, name: str, account: str | None = None) -> list[VerifyResultJson]:
        results = self.request(
            "POST",
            f"/v1/resources/{seg(name)}/verify",
            params={"account": account},
            timeout=VERIFY_TIMEOUT,
        )
        return cast(list[VerifyResultJson], results)

    def set_rotation_role(
        self,
        resource: str,
        *,
        username: str,
        password: str,
        verify: bool = True,
        reassign_to: str | None = None,
    ) -> ResourceJson:
        body = {
            "username": username,
            "password": password,
            "verify": verify,
            "reassign_to": reassign_to,
        }
        path = f"/v1/resources/{seg(resource)}/rotation"
        return cast(ResourceJson, self.request("PUT", path, json=body, timeout=VERIFY_TIMEOUT))

    def clear_rotation_role(self, resource: str) -> ResourceJson:
        return cast(ResourceJson, self.delete(f"/v1/resources/{seg(resource)}/rotation"))

    def add_account(
        self,
        resource: str,
        name: str,
        *,
        username: str,
        password: str,
        verify: bool = True,
        managed: bool = False,
    ) -> AccountAddJson:
        body = {
            "name": name,
            "username": username,
            "password": password,
            "verify": verify,
            "managed": managed,
        }
        path = f"/v1/resources/{seg(resource)}/accounts"
        return cast(AccountAddJson, self.request("POST", path, json=body, timeout=ROTATION_TIMEOUT))

    def add_ephemeral_account(
        self,
        resource: str,
        name: str,
        *,
        template_role: str,
        cleanup_after_seconds: int | None = None,
        verify: bool = True,
    ) -> AccountJson:
        body = {
            "name": name,
            "template_role": template_role,
            "cleanup_after_seconds": cleanup_after_seconds,
            "verify": verify,
        }
        path = f"/v1/resources/{seg(resource)}/ephemeral-accounts"
        return cast(AccountJson, self.request("POST", path, json=body, timeout=VERIFY_TIMEOUT))

    def grant_roles(self, resource: str) -> list[GrantRoleJson]:
        return cast(list[GrantRoleJson], self.get(f"/v1/resources/{seg(resource)}/roles"))

    def rotate_password(
        self, resource: str, name: str, password: str, *, verify: bool = True
    ) -> AccountJson:
        path = f"/v1/resources/{seg(resource)}/accounts/{seg(name)}/rotate"
        body = {"password": password, "verify": verify}
        return cast(AccountJson, self.request("POST", path, json=body, timeout=VERIFY_TIMEOUT))

    def rotate_now(self, resource: str, name: str) -> RotationJson:
        path = f"/v1/resources/{seg(resource)}/accounts/{seg(name)}/rotations"
        return cast(RotationJson, self.request("POST", path, timeout=ROTATION_TIMEOUT))

    def set_rotation_schedule(
        self, resource: str, name: str, every_seconds: int | None
    ) -> AccountJson:
        path = f"/v1/resources/{seg(resource)}/accounts/{seg(name)}/schedule"
        return cast(AccountJson, self.request("PUT", path, json={"every_seconds": every_seconds}))

    def rotation_history(self, resource: str, name: str, *, limit: int = 20) -> list[RotationJson]:
        path = f"/v1/resources/{seg(resource)}/accounts/{seg(name)}/rotations"
        return cast(list[RotationJson], self.get(path, limit=limit))

    def list_accounts(self, resource: str | None = None) -> list[AccountJson]:
        return cast(list[AccountJson], self.get("/v1/accounts", resource=resource))

    def remove_account(self, resource: str, name: str) -> None:
        self.delete(f"/v1/resources/{seg(resource)}/accounts/{seg(name)}")

    # --- access ------------------------------------------------------------------------

    def open_access(
        self,
        *,
        resource: str | None,
        account: str | None,
        duration_seconds: int | None,
        port: int | None,
        reason: str | None = None,
        client_host: str | None = None,
        socket_dir: str | None = None,
        csr: str | None = None,
        request_id: str | None = None,
        break_glass: bool = False,
        otp: str | None = None,
    ) -> AccessJson:
        """A new grant; raises :class:`PendingApproval` when a policy wants it
        approved first. With *request_id* it opens that approved request."""
        body: dict[str, Any] = {
            "resource": resource,
            "account": account,
            "duration_seconds": duration_seconds,
            "port": None if csr else port,
            "reason": reason,
            "client_host": client_host,
        }
        if socket_dir is not None:
            body["socket_dir"] = socket_dir
        if csr is not None:
            body["csr"] = csr  # a tunnel grant: the gateway opens no port of its own
        if request_id is not None:
            body["request_id"] = request_id
        if break_glass:
            body["break_glass"] = True
        if otp is not None:
            body["otp"] = otp  # a second-factor code, where the policy asks for one
        return cast(AccessJson, self._post_unless_pending("/v1/access", body))

    # --- access requests ----------------------------------------------------------------

    def list_requests(
        self, *, mine: bool = False, pending: bool = False, limit: int | None = None
    ) -> list[RequestJson]:
        found = self.get("/v1/requests", mine=mine or None, pending=pending or None, limit=limit)
        return cast(list[RequestJson], found)

    def get_request(self, request_id: str) -> RequestJson:
        return cast(RequestJson, self.get(f"/v1/requests/{seg(request_id)}"))

    def request_trail(self, request_id: str) -> list[TrailRecordJson]:
        return cast(list[TrailRecordJson], self.get(f"/v1/requests/{seg(request_id)}/trail"))

    def approve_request(
        self, request_id: str, comment: str | None, otp: str | None = None
    ) -> RequestJson:
        """An approval; *otp*: a second-factor code, where the project asks for one."""
        path = f"/v1/requests/{seg(request_id)}/approve"
        body = {"comment": comment} | ({"otp": otp} if otp is not None else {})
        return cast(RequestJson, self.post(path, body))

    def deny_request(self, request_id: str, reason: str) -> RequestJson:
        path = f"/v1/requests/{seg(request_id)}/deny"
        return cast(RequestJson, self.post(path, {"reason": reason}))

    def cancel_request(self, request_id: str) -> RequestJson:
        return cast(RequestJson, self.post(f"/v1/requests/{seg(request_id)}/cancel"))

    def heartbeat(self, session_id: str) -> SessionJson:
        return cast(SessionJson, self.post(f"/v1/access/{seg(session_id)}/heartbeat"))

    def revoke_session(self, session_id: str, reason: str | None) -> SessionJson:
        body = {"reason": reason}
        return cast(SessionJson, self.post(f"/v1/access/{seg(session_id)}/revoke", body))

    def extend_access(self, session_id: str, by_seconds: int) -> SessionJson:
        """The grant with its new expiry; raises :class:`PendingApproval` when a
        policy wants the extension approved first (it is applied once approved)."""
        body = {"by_seconds": by_seconds}
        path = f"/v1/access/{seg(session_id)}/extend"
        return cast(SessionJson, self._post_unless_pending(path, body))

    def access_certificate(self, session_id: str) -> CertificateJson:
        return cast(CertificateJson, self.get(f"/v1/access/{seg(session_id)}/certificate"))

    def end_access(self, session_id: str) -> SessionJson:
        return cast(SessionJson, self.post(f"/v1/access/{seg(session_id)}/end", {}))

    # --- who: signing in, users, tokens, policies ----------------------------------------

    def login(self, user: str, password: str, *, otp: str | None = None) -> TokenJson:
        body = {"user": user, "password": password}
        if otp is not None:
            body["otp"] = otp
        return cast(TokenJson, self.post("/v1/login", body))

    def logout(self) -> None:
        self.post("/v1/logout")

    def whoami(self) -> WhoamiJson:
        return cast(WhoamiJson, self.get("/v1/whoami"))

    def add_user(
        self,
        name: str,
        *,
        role: str,
        project: str,
        groups: list[str],
        password: str | None,
    ) -> PrincipalJson:
        body = {"name": name, "role": role, "project": project, "groups": groups}
        if password is not None:
            body["password"] = password
        return cast(PrincipalJson, self.post("/v1/users", body))

    def list_users(self) -> list[PrincipalJson]:
        return cast(list[PrincipalJson], self.get("/v1/users"))

    def disable_user(self, name: str) -> PrincipalJson:
        return cast(PrincipalJson, self.post(f"/v1/users/{seg(name)}/disable"))

    def remove_user(self, name: str) -> None:
        self.delete(f"/v1/users/{seg(name)}")

    def create_token(self, name: str, *, role: str, project: str, ttl_seconds: int) -> TokenJson:
        body = {"name": name, "role": role, "project": project, "ttl_seconds": ttl_seconds}
        return cast(TokenJson, self.post("/v1/tokens", body))

    def add_policy(self, body: dict[str, Any]) -> PolicyJson:
        return cast(PolicyJson, self.post("/v1/policies", body))

    def list_policies(self) -> list[PolicyJson]:
        return cast(list[PolicyJson], self.get("/v1/policies"))

    def remove_policy(self, name: str) -> None:
        self.delete(f"/v1/policies/{seg(name)}")

    # --- single sign-on -----------------------------------------------------------------

    def sso_start(self, *, device: bool = False) -> SsoStartJson:
        return cast(SsoStartJson, self.post("/v1/sso/start", {"device": device}))

    def sso_poll(self, handle: str) -> SsoPollJson:
        return cast(SsoPollJson, self.post("/v1/sso/poll", {"handle": handle}))

    def sso_config(self) -> SsoConfigJson:
        return cast(SsoConfigJson, self.get("/v1/sso/config"))

    def sso_configure(
        self,
        *,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        groups_claim: str,
        scopes: str,
        redirect_base: str | None,
    ) -> SsoConfigJson:
        body = {
            "issuer": issuer,
            "client_id": client_id,
            "groups_claim": groups_claim,
            "scopes": scopes,
            "redirect_base": redirect_base,
        }
        if client_secret is not None:
            body["client_secret"] = client_secret
        return cast(SsoConfigJson, self.request("PUT", "/v1/sso/config", json=body))

    def sso_remove(self) -> None:
        self.delete("/v1/sso/config")

    def sso_groups(self) -> list[SsoGroupJson]:
        return cast(list[SsoGroupJson], self.get("/v1/sso/groups"))

    def sso_map_group(self, claim_value: str, group: str, project: str | None) -> SsoGroupJson:
        body = {"claim_value": claim_value, "group": group, "project": project}
        return cast(SsoGroupJson, self.post("/v1/sso/groups", body))

    def sso_unmap_group(self, claim_value: str) -> None:
        self.request("DELETE", "/v1/sso/groups", params={"claim_value": claim_value})

    # --- webhooks ----------------------------------------------------------------------

    def add_webhook(self, url: str, *, events: list[str], project: str) -> WebhookCreatedJson:
        body = {"url": url, "events": events, "project": project}
        return cast(WebhookCreatedJson, self.post("/v1/webhooks", body))

    def list_webhooks(self) -> list[WebhookJson]:
        return cast(list[WebhookJson], self.get("/v1/webhooks"))

    def remove_webhook(self, webhook_id: str) -> None:
        self.delete(f"/v1/webhooks/{seg(webhook_id)}")

    def test_webhook(self, webhook_id: str) -> DeliveryJson:
        return cast(DeliveryJson, self.post(f"/v1/webhooks/{seg(webhook_id)}/test"))

    def webhook_deliveries(
        self, webhook_id: str, *, limit: int | None = None
    ) -> list[DeliveryJson]:
        path = f"/v1/webhooks/{seg(webhook_id)}/deliveries"
        return cast(list[DeliveryJson], self.get(path, limit=limit))

    # --- second factors and project settings ------------------------------------------

    def mfa_status(self, user: str | None = None) -> MfaStatusJson:
        return cast(MfaStatusJson, self.get("/v1/mfa", user=user))

    def mfa_enroll(self, code: str | None = None) -> MfaEnrolmentJson:
        """A pending second factor; *code* is a current one of the active factor."""
        body = {} if code is None else {"code": code}
        return cast(MfaEnrolmentJson, self.post("/v1/mfa/enroll", body))

    def mfa_confirm(self, code: str) -> MfaStatusJson:
        return cast(MfaStatusJson, self.post("/v1/mfa/confirm", {"code": code}))

    def mfa_disable(self, code: str | None) -> MfaStatusJson:
        body = {} if code is None else {"code": code}
        return cast(MfaStatusJson, self.post("/v1/mfa/disable", body))

    def mfa_reset(self, user: str) -> MfaStatusJson:
        return cast(MfaStatusJson, self.post(f"/v1/mfa/reset/{seg(user)}"))

    def project(self, name: str) -> ProjectJson:
        return cast(ProjectJson, self.get(f"/v1/projects/{seg(name)}"))

    def set_project(self, name: str, *, approval_mfa: bool) -> ProjectJson:
        body = {"approval_mfa": approval_mfa}
        return cast(ProjectJson, self.request("PUT", f"/v1/projects/{seg(name)}", json=body))

    # --- review ------------------------------------------------------------------------

    def list_sessions(
        self,
        *,
        active: bool | None = None,
        limit: int | None = None,
        resource: str | None = None,
        account: str | None = None,
        requester: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[SessionJson]:
        sessions = self.get(
            "/v1/sessions",
            active=active,
            limit=limit,
            resource=resource,
            account=account,
            requester=requester,
            since=_iso(since),
            until=_iso(until),
        )
        return cast(list[SessionJson], sessions)

    def get_session(self, session_id: str) -> SessionDetailJson:
        """A session (by id or unique prefix), its connections and statement count."""
        return cast(SessionDetailJson, self.get(f"/v1/sessions/{seg(session_id)}"))

    def session_audit(
        self,
        session_id: str,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        kind: str | None = None,
    ) -> list[AuditRecordJson]:
        """One page of a session's records in seq order, after ``after_seq``."""
        path = f"/v1/sessions/{seg(session_id)}/audit"
        return cast(
            list[AuditRecordJson], self.get(path, after_seq=after_seq, limit=limit, kind=kind)
        )

    def statement_page(
        self,
        session_id: str,
        *,
        page: int | None = None,
        page_size: int | None = None,
        cursor: str | None = None,
    ) -> AuditPageJson:
        """Page *page* of a session's statements, or the page after *cursor*: one request."""
        path = f"/v1/sessions/{seg(session_id)}/statements"
        answer = self.get(path, page=page, page_size=page_size, cursor=cursor)
        return cast(AuditPageJson, answer)

    def trail_page(
        self,
        session_id: str,
        *,
        page: int | None = None,
        page_size: int | None = None,
        cursor: str | None = None,
    ) -> AuditPageJson:
        """Page *page* of every record of a session (its seq range), or the page after *cursor*."""
        path = f"/v1/sessions/{seg(session_id)}/trail"
        answer = self.get(path, page=page, page_size=page_size, cursor=cursor)
        return cast(AuditPageJson, answer)

    @contextmanager
    def export_session(self, session_id: str, *, fmt: str) -> Iterator[ExportStream]:
        """Every record of one session (id or prefix) as *fmt* (jsonl, csv), streamed."""
        with self.stream(f"/v1/sessions/{seg(session_id)}/export", format=fmt) as stream:
            yield stream

    @contextmanager
    def export_window(
        self, *, fmt: str, since: datetime | None = None, until: datetime | None = None
    ) -> Iterator[ExportStream]:
        """Every record of each session started in ``[since, until)``, oldest first, streamed."""
        params = {"format": fmt, "since": _iso(since), "until": _iso(until)}
        with self.stream("/v1/audit/export", **params) as stream:
            yield stream

    def search_audit(
        self,
        text: str | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        resource: str | None = None,
        account: str | None = None,
        requester: str | None = None,
        session: str | None = None,
        status: str | None = None,
        limit: int | None = None,
    ) -> list[AuditRecordJson]:
        records = self.get(
            "/v1/audit/search",
            q=text,
            since=_iso(since),
            until=_iso(until),
            resource=resource,
            account=account,
            requester=requester,
            session=session,
            status=status,
            limit=limit,
        )
        return cast(list[AuditRecordJson], records)

    def verify_audit(self, session: str | None = None) -> AuditVerifyJson:
        result = self.request(
            "POST", "/v1/audit/verify", params={"session": session}, timeout=AUDIT_VERIFY_TIMEOUT
        )
        return cast(AuditVerifyJson, result)

    # --- the transport (also used directly by cli/demo.py and the tests) ---------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One call; ``None`` params are left out; the JSON body, or None for 204.
        A gateway that cannot be connected to is failed over (:class:`Endpoints`)."""
        response = self._send(
            lambda base: self._http.request(
                method,
                base + path,
                json=json,
                params=_present(params or {}),
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        )
        if response.status_code == 204:
            return None
        return _answer(response)

    def _send(self, call: Callable[[str], httpx.Response]) -> httpx.Response:
        """``call(base URL)`` on the gateway in use, else on the next one that connects."""
        tried: list[str] = []
        for base in self.endpoints.in_order():
            try:
                return call(base)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                tried.append(base)
                self.endpoints.failed(base)
                last: httpx.HTTPError = exc
            except httpx.HTTPError as exc:
                raise self._failed(exc, [base]) from None
        raise self._failed(last, tried) from None

    def probe(self, path: str) -> httpx.Response:
        """A GET of a route outside the JSON API (``/metrics``, ``/readyz``),
        answered as it is, whatever its status."""
        return self._send(lambda base: self._http.get(base + path))

    @contextmanager
    def stream(self, path: str, **params: Any) -> Iterator[ExportStream]:
        """A GET whose answer is read as it arrives; a refusal is read whole and raised."""
        base = self.endpoints.current
        try:
            with self._http.stream("GET", base + path, params=_present(params)) as response:
                if response.is_error:
                    response.read()
                    _answer(response)
                yield ExportStream(response)
        except httpx.HTTPError as exc:
            # Also what the caller meets reading the chunks: a stream cut short.
            raise self._failed(exc, [base]) from None

    @staticmethod
    def _failed(exc: httpx.HTTPError, tried: list[str]) -> ApiError:
        where = tried[0] + (f" (nor {', '.join(tried[1:])})" if len(tried) > 1 else "")
        if isinstance(exc, httpx.ConnectError):
            return ApiError(
                f"cannot reach the pam gateway at {where}",
                hint="is `pam gateway run` running?",
            )
        if isinstance(exc, httpx.TimeoutException):
            return ApiError(f"the pam gateway at {where} did not answer in time")
        return ApiError(f"talking to the pam gateway failed: {exc}")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, json: Any = None, **params: Any) -> Any:
        return self.request("POST", path, json=json, params=params)

    def _post_unless_pending(self, path: str, json: Any) -> Any:
        """A POST that a policy may answer with a request to wait on (202,
        ``{"request": ...}``, the API's AccessPendingOut): raised as
        :class:`PendingApproval`."""
        answer = self.post(path, json)
        if isinstance(answer, dict) and set(answer) == {"request"}:
            raise PendingApproval(cast(RequestJson, answer["request"]))
        return answer

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _present(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _answer(response: httpx.Response) -> Any:
    """The JSON body of a read response, or its error as :class:`ApiError`."""
    try:
        body = response.json()
    except ValueError:
        raise ApiError(
            f"the pam gateway answered HTTP {response.status_code} without JSON",
            status=response.status_code,
        ) from None
    if response.is_error:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise ApiError(
            error.get("message") or f"HTTP {response.status_code}",
            hint=error.get("hint"),
            status=response.status_code,
            code=error.get("code"),
        )
    return body
