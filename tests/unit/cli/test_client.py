"""Tests of the typed control API client: its types match the API, its calls hit the right routes.

The client is exercised over an in-memory httpx transport that records each
request, so these tests need no daemon.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from cli import access as api_access
from cli import client as api
from cli.client import ApiClient, ApiError
from gateway.app.api import models
from gateway.config import ClientConfig, GatewaySettings
from gateway.credentials.verify import VerifyResult

TOKEN = "t0ken-" + "x" * 32
CONFIG = ClientConfig(api_url="http://pam.test:7745", token=TOKEN)


class Recorder:
    """An httpx transport answering every request with one canned response."""

    def __init__(self, status: int = 200, body: Any = None, *, raw: bytes | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.status = status
        self.body = body
        self.raw = raw

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.raw is not None:
            return httpx.Response(self.status, content=self.raw)
        if self.status == 204:
            return httpx.Response(204)
        return httpx.Response(self.status, json=self.body)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder(body={"answer": 42})


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> ApiClient:
    return ApiClient(CONFIG, transport=httpx.MockTransport(handler))


@pytest.fixture
def client(recorder: Recorder) -> Iterator[ApiClient]:
    with client_for(recorder) as c:
        yield c


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content) if request.content else None


# --- the types mirror the API ---------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "model"),
    [
        (api.HealthJson, models.Health),
        (api.ResourceJson, models.ResourceOut),
        (api.AccountJson, models.AccountOut),
        (api.AccountAddJson, models.AccountAddOut),
        (api.GrantRoleJson, models.GrantRoleOut),
        (api.RotationJson, models.RotationOut),
        (api.SessionJson, models.SessionOut),
        (api.ConnectionJson, models.ConnectionOut),
        (api.SessionDetailJson, models.SessionDetail),
        (api.ParameterJson, models.ParameterOut),
        (api.AuditRecordJson, models.AuditRecordOut),
        (api.ProblemJson, models.ProblemOut),
        (api.AuditVerifyJson, models.AuditVerifyOut),
        (api.AuditPageJson, models.AuditPageOut),
        (api.TokenJson, models.TokenOut),
        (api.PrincipalJson, models.PrincipalOut),
        (api.WhoamiJson, models.WhoamiOut),
        (api.PolicyJson, models.PolicyOut),
        (api.ApprovalJson, models.ApprovalOut),
        (api.RequestJson, models.RequestOut),
        (api.TrailRecordJson, models.TrailRecordOut),
        (api.SsoConfigJson, models.SsoConfigOut),
        (api.SsoGroupJson, models.SsoGroupOut),
        (api.SsoStartJson, models.SsoStartOut),
        (api.SsoPollJson, models.SsoPollOut),
        (api.WebhookJson, models.WebhookOut),
        (api.WebhookCreatedJson, models.WebhookCreatedOut),
        (api.DeliveryJson, models.DeliveryOut),
        (api.CertificateJson, models.CertificateOut),
        (api.MfaEnrolmentJson, models.MfaEnrolmentOut),
        (api.MfaStatusJson, models.MfaStatusOut),
        (api.ProjectJson, models.ProjectOut),
    ],
    ids=lambda t: t.__name__,
)
def test_each_result_type_has_the_fields_of_the_api_model_in_order(
    typed: type, model: type[BaseModel]
) -> None:
    assert list(typed.__annotations__) == list(model.model_fields)


def test_the_verify_result_type_has_the_fields_of_the_service_result() -> None:
    fields = [f.name for f in dataclasses.fields(VerifyResult)]
    assert list(api.VerifyResultJson.__annotations__) == fields


# --- one method per call ----------------------------------------------------------------

SINCE = datetime(2024, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))

CALLS: list[tuple[str, Callable[[ApiClient], Any], str, str, dict[str, str], Any]] = [
    ("health", lambda c: c.health(), "GET", "/v1/health", {}, None),
    (
        "add_resource",
        lambda c: c.add_resource(
            "prod", host="db", port=5432, database="app", ssl_mode="require", ca_cert=None
        ),
        "POST",
        "/v1/resources",
        {},
        {
            "name": "prod",
            "host": "db",
            "port": 5432,
            "database": "app",
            "ssl_mode": "require",
            "ca_cert": None,
        },
    ),
    ("list_resources", lambda c: c.list_resources(), "GET", "/v1/resources", {}, None),
    ("get_resource", lambda c: c.get_resource("a/b"), "GET", "/v1/resources/a%2Fb", {}, None),
    (
        "remove_resource",
        lambda c: c.remove_resource("prod"),
        "DELETE",
        "/v1/resources/prod",
        {},
        None,
    ),
    (
        "verify_resource",
        lambda c: c.verify_resource("prod", "scram"),
        "POST",
        "/v1/resources/prod/verify",
        {"account": "scram"},
        None,
    ),
    (
        "verify_resource, every account",
        lambda c: c.verify_resource("prod"),
        "POST",
        "/v1/resources/prod/verify",
        {},
        None,
    ),
    (
        "add_account",
        lambda c: c.add_account("prod", "app", username="app_user", password="pw"),
        "POST",
        "/v1/resources/prod/accounts",
        {},
        {"name": "app", "username": "app_user", "password": "pw", "verify": True, "managed": False},
    ),
    (
        "add_account, managed and unchecked",
        lambda c: c.add_account(
            "prod", "app", username="app_user", password="pw", verify=False, managed=True
        ),
        "POST",
        "/v1/resources/prod/accounts",
        {},
        {"name": "app", "username": "app_user", "password": "pw", "verify": False, "managed": True},
    ),
    (
        "rotate_password",
        lambda c: c.rotate_password("prod", "app", "new"),
        "POST",
        "/v1/resources/prod/accounts/app/rotate",
        {},
        {"password": "new", "verify": True},
    ),
    (
        "rotate_password, unchecked",
        lambda c: c.rotate_password("prod", "app", "new", verify=False),
        "POST",
        "/v1/resources/prod/accounts/app/rotate",
        {},
        {"password": "new", "verify": False},
    ),
    (
        "rotate_now",
        lambda c: c.rotate_now("prod", "app"),
        "POST",
        "/v1/resources/prod/accounts/app/rotations",
        {},
        None,
    ),
    (
        "rotation_history",
        lambda c: c.rotation_history("prod", "app", limit=5),
        "GET",
        "/v1/resources/prod/accounts/app/rotations",
        {"limit": "5"},
        None,
    ),
    (
        "set_rotation_role",
        lambda c: c.set_rotation_role("prod", username="rotator", password="pw"),
        "PUT",
        "/v1/resources/prod/rotation",
        {},
        {"username": "rotator", "password": "pw", "verify": True, "reassign_to": None},
    ),
    (
        "add_ephemeral_account",
        lambda c: c.add_ephemeral_account(
            "prod", "eph", template_role="app_reader", cleanup_after_seconds=86400
        ),
        "POST",
        "/v1/resources/prod/ephemeral-accounts",
        {},
        {
            "name": "eph",
            "template_role": "app_reader",
            "cleanup_after_seconds": 86400,
            "verify": True,
        },
    ),
    ("grant_roles", lambda c: c.grant_roles("prod"), "GET", "/v1/resources/prod/roles", {}, None),
    (
        "clear_rotation_role",
        lambda c: c.clear_rotation_role("prod"),
        "DELETE",
        "/v1/resources/prod/rotation",
        {},
        None,
    ),
    ("list_accounts", lambda c: c.list_accounts(), "GET", "/v1/accounts", {}, None),
    (
        "list_accounts of a resource",
        lambda c: c.list_accounts("prod"),
        "GET",
        "/v1/accounts",
        {"resource": "prod"},
        None,
    ),
    (
        "remove_account",
        lambda c: c.remove_account("prod", "app"),
        "DELETE",
        "/v1/resources/prod/accounts/app",
        {},
        None,
    ),
    (
        "open_access",
        lambda c: c.open_access(
            resource="prod",
            account="app",
            duration_seconds=60,
            port=None,
            reason="INC-7",
            client_host="laptop",
        ),
        "POST",
        "/v1/access",
        {},
        {
            "resource": "prod",
            "account": "app",
            "duration_seconds": 60,
            "port": None,
            "reason": "INC-7",
            "client_host": "laptop",
        },
    ),
    ("heartbeat", lambda c: c.heartbeat("s1"), "POST", "/v1/access/s1/heartbeat", {}, None),
    (
        "add_webhook",
        lambda c: c.add_webhook("https://h/x", events=["access.opened"], project="ops"),
        "POST",
        "/v1/webhooks",
        {},
        {"url": "https://h/x", "events": ["access.opened"], "project": "ops"},
    ),
    ("list_webhooks", lambda c: c.list_webhooks(), "GET", "/v1/webhooks", {}, None),
    (
        "remove_webhook",
        lambda c: c.remove_webhook("ab/cd"),
        "DELETE",
        "/v1/webhooks/ab%2Fcd",
        {},
        None,
    ),
    (
        "test_webhook",
        lambda c: c.test_webhook("abcdef"),
        "POST",
        "/v1/webhooks/abcdef/test",
        {},
        None,
    ),
    (
        "webhook_deliveries",
        lambda c: c.webhook_deliveries("abcdef", limit=5),
        "GET",
        "/v1/webhooks/abcdef/deliveries",
        {"limit": "5"},
        None,
    ),
    ("end_access", lambda c: c.end_access("s1"), "POST", "/v1/access/s1/end", {}, {}),
    (
        "extend_access",
        lambda c: c.extend_access("s1", 1800),
        "POST",
        "/v1/access/s1/extend",
        {},
        {"by_seconds": 1800},
    ),
    (
        "access_certificate",
        lambda c: c.access_certificate("s1"),
        "GET",
        "/v1/access/s1/certificate",
        {},
        None,
    ),
    (
        "list_sessions",
        lambda c: c.list_sessions(active=True, limit=5, requester="ann", since=SINCE),
        "GET",
        "/v1/sessions",
        {"active": "true", "limit": "5", "requester": "ann", "since": "2024-06-01T10:00:00+00:00"},
        None,
    ),
    ("get_session", lambda c: c.get_session("3c57"), "GET", "/v1/sessions/3c57", {}, None),
    (
        "session_audit",
        lambda c: c.session_audit("s1", after_seq=7, limit=10, kind="statement"),
        "GET",
        "/v1/sessions/s1/audit",
        {"after_seq": "7", "limit": "10", "kind": "statement"},
        None,
    ),
    (
        "statement_page",
        lambda c: c.statement_page("s1", page=766, page_size=200),
        "GET",
        "/v1/sessions/s1/statements",
        {"page": "766", "page_size": "200"},
        None,
    ),
    (
        "statement_page by cursor",
        lambda c: c.statement_page("s1", cursor="c1.abc", page_size=50),
        "GET",
        "/v1/sessions/s1/statements",
        {"cursor": "c1.abc", "page_size": "50"},
        None,
    ),
    (
        "trail_page",
        lambda c: c.trail_page("a/b", page=2),
        "GET",
        "/v1/sessions/a%2Fb/trail",
        {"page": "2"},
        None,
    ),
    (
        "search_audit",
        lambda c: c.search_audit("select", until=SINCE, status="error", limit=3),
        "GET",
        "/v1/audit/search",
        {"q": "select", "until": "2024-06-01T10:00:00+00:00", "status": "error", "limit": "3"},
        None,
    ),
    (
        "verify_audit",
        lambda c: c.verify_audit("s1"),
        "POST",
        "/v1/audit/verify",
        {"session": "s1"},
        None,
    ),
    (
        "sso_start",
        lambda c: c.sso_start(device=True),
        "POST",
        "/v1/sso/start",
        {},
        {"device": True},
    ),
    ("sso_poll", lambda c: c.sso_poll("h1"), "POST", "/v1/sso/poll", {}, {"handle": "h1"}),
    ("sso_config", lambda c: c.sso_config(), "GET", "/v1/sso/config", {}, None),
    (
        "sso_configure",
        lambda c: c.sso_configure(
            issuer="https://idp",
            client_id="pam",
            client_secret="s3",
            groups_claim="groups",
            scopes="openid",
            redirect_base=None,
        ),
        "PUT",
        "/v1/sso/config",
        {},
        {
            "issuer": "https://idp",
            "client_id": "pam",
            "groups_claim": "groups",
            "scopes": "openid",
            "redirect_base": None,
            "client_secret": "s3",
        },
    ),
    ("sso_remove", lambda c: c.sso_remove(), "DELETE", "/v1/sso/config", {}, None),
    ("sso_groups", lambda c: c.sso_groups(), "GET", "/v1/sso/groups", {}, None),
    (
        "sso_map_group",
        lambda c: c.sso_map_group("idp-dba", "dba", None),
        "POST",
        "/v1/sso/groups",
        {},
        {"claim_value": "idp-dba", "group": "dba", "project": None},
    ),
    (
        "sso_unmap_group",
        lambda c: c.sso_unmap_group("a/b"),
        "DELETE",
        "/v1/sso/groups",
        {"claim_value": "a/b"},
        None,
    ),
    ("mfa_status", lambda c: c.mfa_status(), "GET", "/v1/mfa", {}, None),
    (
        "mfa_status of a user",
        lambda c: c.mfa_status("a/b"),
        "GET",
        "/v1/mfa",
        {"user": "a/b"},
        None,
    ),
    ("mfa_enroll", lambda c: c.mfa_enroll(), "POST", "/v1/mfa/enroll", {}, {}),
    (
        "mfa_enroll again",
        lambda c: c.mfa_enroll("123456"),
        "POST",
        "/v1/mfa/enroll",
        {},
        {"code": "123456"},
    ),
    ("mfa_confirm", lambda c: c.mfa_confirm("1"), "POST", "/v1/mfa/confirm", {}, {"code": "1"}),
    ("mfa_disable", lambda c: c.mfa_disable("2"), "POST", "/v1/mfa/disable", {}, {"code": "2"}),
    ("mfa_reset", lambda c: c.mfa_reset("a/b"), "POST", "/v1/mfa/reset/a%2Fb", {}, None),
    ("project", lambda c: c.project("ops"), "GET", "/v1/projects/ops", {}, None),
    (
        "set_project",
        lambda c: c.set_project("ops", approval_mfa=True),
        "PUT",
        "/v1/projects/ops",
        {},
        {"approval_mfa": True},
    ),
    (
        "login with a code",
        lambda c: c.login("ann", "pw", otp="123456"),
        "POST",
        "/v1/login",
        {},
        {"user": "ann", "password": "pw", "otp": "123456"},
    ),
]


@pytest.mark.parametrize(
    ("call", "method", "path", "params", "body"),
    [pytest.param(*row[1:], id=row[0]) for row in CALLS],
)
def test_each_method_sends_its_route_query_and_body_with_the_token(
    client: ApiClient,
    recorder: Recorder,
    call: Callable[[ApiClient], Any],
    method: str,
    path: str,
    params: dict[str, str],
    body: Any,
) -> None:
    answer = call(client)

    request = recorder.last
    assert (request.method, request.url.raw_path.split(b"?")[0].decode()) == (method, path)
    assert dict(request.url.params) == params
    assert body_of(request) == body
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    # The answer is the daemon's JSON as it came (removals answer 204 in the API).
    assert answer in ({"answer": 42}, None)


def test_results_are_the_json_as_the_daemon_sent_it() -> None:
    resource = {"name": "prod", "created_at": "2024-06-01T10:00:00.123000Z", "extra": 1}
    recorder = Recorder(body=[resource])
    with client_for(recorder) as c:
        assert c.list_resources() == [resource]


def test_an_answer_with_204_and_no_body_is_none() -> None:
    with client_for(Recorder(204)) as c:
        assert c.delete("/v1/resources/prod/accounts/app") is None


def test_naive_times_are_sent_as_utc_by_the_local_zone() -> None:
    recorder = Recorder(body=[])
    naive = datetime(2024, 6, 1, 12, 0)
    with client_for(recorder) as c:
        c.list_sessions(until=naive)
    assert recorder.last.url.params["until"] == naive.astimezone(UTC).isoformat()


# --- errors -------------------------------------------------------------------------------


def test_an_api_error_becomes_its_message_hint_and_status() -> None:
    body = {"error": {"type": "NotFound", "message": "resource 'x' not found", "hint": "add it"}}
    with client_for(Recorder(404, body)) as c, pytest.raises(ApiError) as raised:
        c.get_resource("x")
    assert (raised.value.message, raised.value.hint, raised.value.status) == (
        "resource 'x' not found",
        "add it",
        404,
    )


def test_an_api_errors_code_is_kept_for_the_cli_to_act_on() -> None:
    body = {
        "error": {
            "type": "MfaRequired",
            "message": "this access needs a second-factor code",
            "hint": None,
            "code": "mfa_required",
        }
    }
    with client_for(Recorder(401, body)) as c, pytest.raises(ApiError) as raised:
        c.open_access(resource="prod", account="app", duration_seconds=60, port=None)
    assert (raised.value.status, raised.value.code) == (401, "mfa_required")


def test_an_answer_without_json_is_one_error_naming_the_status() -> None:
    recorder = Recorder(502, raw=b"<html>bad gateway</html>")
    with client_for(recorder) as c, pytest.raises(ApiError) as raised:
        c.list_resources()
    assert raised.value.message == "the pam gateway answered HTTP 502 without JSON"
    assert raised.value.status == 502


def test_an_unreachable_daemon_names_the_url_and_the_next_step_but_not_the_token() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with client_for(refuse) as c, pytest.raises(ApiError) as raised:
        c.health()
    error = raised.value
    assert error.message == "cannot reach the pam gateway at http://pam.test:7745"
    assert error.hint == "is `pam gateway run` running?"
    assert error.status is None
    assert TOKEN not in f"{error.message} {error.hint}"


def test_a_timeout_is_one_error_naming_the_url() -> None:
    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with client_for(stall) as c, pytest.raises(ApiError) as raised:
        c.verify_audit()
    assert raised.value.message == "the pam gateway at http://pam.test:7745 did not answer in time"


# --- streamed exports -------------------------------------------------------------------


def test_an_export_streams_the_daemons_bytes_and_names_its_sessions() -> None:
    seen: list[httpx.Request] = []
    body = [b'{"seq":1}\n', b'{"seq":2}\n']

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"Pam-Export-Sessions": "2", "Content-Type": "application/x-ndjson"}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(b"".join(body)))

    with client_for(answer) as c:
        with c.export_session("3c/57", fmt="csv") as stream:
            assert b"".join(stream.chunks()) == b"".join(body)
        with c.export_window(fmt="jsonl", since=SINCE) as stream:
            assert stream.sessions == 2
    assert [(r.url.raw_path.split(b"?")[0].decode(), dict(r.url.params)) for r in seen] == [
        ("/v1/sessions/3c%2F57/export", {"format": "csv"}),
        ("/v1/audit/export", {"format": "jsonl", "since": "2024-06-01T10:00:00+00:00"}),
    ]
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in seen)


def test_an_export_refused_is_an_api_error_before_any_byte() -> None:
    body = {"error": {"type": "NotFound", "message": "session 'x' not found", "hint": None}}
    with (
        client_for(Recorder(404, body)) as c,
        pytest.raises(ApiError) as raised,
        c.export_session("x", fmt="jsonl"),
    ):
        pytest.fail("a refused export has no stream")
    assert (raised.value.message, raised.value.status) == ("session 'x' not found", 404)


class _CutShort(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b'{"seq":1}\n'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


def test_an_export_cut_short_is_an_api_error_while_reading() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_CutShort())

    received: list[bytes] = []
    with (
        client_for(answer) as c,
        pytest.raises(ApiError) as raised,
        c.export_window(fmt="jsonl") as stream,
    ):
        received.extend(stream.chunks())
    assert received == [b'{"seq":1}\n']
    assert raised.value.message == (
        "talking to the pam gateway failed: peer closed connection without sending complete body"
    )


# --- failover between the fleet's gateways --------------------------------------------

FLEET = CONFIG.model_copy(
    update={
        "api_url": "https://a.example:7745",
        "api_urls": ["https://b.example:7745", "https://c.example:7745"],
    }
)


def _fleet_client(down: set[str], seen: list[str]) -> ApiClient:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host in down:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"from": request.url.host})

    return ApiClient(FLEET, transport=httpx.MockTransport(answer))


def test_a_call_that_cannot_connect_goes_to_the_next_gateway_and_stays_there() -> None:
    seen: list[str] = []
    with _fleet_client({"a.example"}, seen) as c:
        assert c.heartbeat("s1") == {"from": "b.example"}
        assert c.heartbeat("s1") == {"from": "b.example"}
        assert c.endpoints.current == "https://b.example:7745"
    assert seen == ["a.example", "b.example", "b.example"]


def test_clients_sharing_endpoints_fail_over_together() -> None:
    seen: list[str] = []
    with _fleet_client({"a.example"}, seen) as first:
        first.health()
        with ApiClient(FLEET, endpoints=first.endpoints, transport=first._http._transport) as other:
            assert other.health() == {"from": "b.example"}
    assert seen == ["a.example", "b.example", "b.example"]


def test_no_gateway_reachable_is_one_error_naming_each() -> None:
    down = {"a.example", "b.example", "c.example"}
    with _fleet_client(down, []) as c, pytest.raises(ApiError) as raised:
        c.health()
    assert raised.value.message == (
        "cannot reach the pam gateway at https://a.example:7745"
        " (nor https://b.example:7745, https://c.example:7745)"
    )
    assert raised.value.status is None


def test_an_answer_with_an_error_status_is_not_failed_over() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(503, json={"error": {"type": "Unavailable", "message": "busy"}})

    with ApiClient(FLEET, transport=httpx.MockTransport(answer)) as c, pytest.raises(ApiError):
        c.health()
    assert seen == ["a.example"]


def test_a_gateway_that_connected_but_did_not_answer_is_not_failed_over() -> None:
    """The request may have reached it (a POST may have been applied): it is not
    sent again elsewhere, and the gateway in use stays."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        raise httpx.ReadTimeout("timed out", request=request)

    with ApiClient(FLEET, transport=httpx.MockTransport(answer)) as c:
        with pytest.raises(ApiError) as raised:
            c.heartbeat("s1")
        assert c.endpoints.current == "https://a.example:7745"
    assert (
        raised.value.message == "the pam gateway at https://a.example:7745 did not answer in time"
    )
    assert seen == ["a.example"]


def test_with_a_gateway_to_fail_over_to_connecting_gives_up_within_the_presence_lease() -> None:
    """A silent host (no refusal) is left for the next gateway before the
    fleet's presence lease lapses and its sessions end as its crash."""
    with ApiClient(FLEET) as fleet, ApiClient(CONFIG) as alone:
        assert fleet._http.timeout == httpx.Timeout(30.0, connect=api.FAILOVER_CONNECT_TIMEOUT)
        assert alone._http.timeout == httpx.Timeout(30.0)
    # A gateway dying just before renewing its lease leaves this long before
    # another one ends its sessions: the CLI's next heartbeat and a connect
    # attempt that gives up fit in it.
    defaults = GatewaySettings(api_token_sha256="0" * 64)
    window = defaults.presence_lease_seconds - defaults.presence_renew_seconds
    assert window > api_access.HEARTBEAT_SECONDS + api.FAILOVER_CONNECT_TIMEOUT
