"""Who may do what, over the control API of a real daemon (issue 13, points 2-4).

One daemon for the module, with three resources on the real PostgreSQL of the
``pg`` fixture (``prod-app`` and ``dev-app`` in project ``default``,
``prod-stats`` in ``analytics``) and principals of every role, each signed in
over ``POST /v1/login`` (the machine one through ``POST /v1/tokens``). Every
call goes over HTTP with that principal's own token. The matrix is a table:
who, the call, the expected status and a fragment of the answer.
"""

# The matrix is a table, one case a line: wide lines read better than wrapped ones.
# ruff: noqa: E501

from __future__ import annotations

import json
import signal
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from conftest import APP_DATABASE
from harness import AccessProcess, Gateway, _Drain

from gateway.config import STORE_FILE
from gateway.protocol.sqlstate import SqlState
from gateway.testing.net import free_port
from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

ADMIN = "root-admin"
PASSWORD = "pw-authz-Secret-1"
#: name -> (role, project, groups)
USERS: Mapping[str, tuple[str, str, list[str]]] = {
    "alice": ("member", "default", []),
    "bob": ("member", "default", ["dba"]),
    "carol": ("member", "analytics", []),
    "dave": ("auditor", "default", []),
    "erin": ("admin", "analytics", []),
    "frank": ("member", "default", []),  # disabled before the matrix runs
}
POLICIES = [
    {"name": "alice-exact", "subjects": ["alice"], "resource": "prod-app", "account": "scram",
     "max_duration_seconds": 3600},
    {"name": "dba-prod", "subjects": ["@dba"], "resource": "prod-*", "account": "*",
     "max_duration_seconds": 7200, "require_reason": True},
    {"name": "bot-any", "subjects": ["bot"], "resource": "*", "account": "md5",
     "max_duration_seconds": 1800},
    {"name": "carol-stats", "project": "analytics", "subjects": ["carol"], "resource": "*",
     "account": "*", "max_duration_seconds": 3600},
]  # fmt: skip


@dataclass
class Authz:
    gw: Gateway
    url: str
    tokens: dict[str, str]
    token_ids: dict[str, str]
    #: the gateway CA the local profile pins (the API is HTTPS)
    ca_pem: str

    def http(self, who: str | None) -> httpx.Client:
        token = self.tokens.get(who or "", who or "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=30,
            trust_env=False,
            verify=ssl.create_default_context(cadata=self.ca_pem),
        )

    def call(self, who: str | None, method: str, path: str, body: Any = None) -> httpx.Response:
        with self.http(who) as client:
            return client.request(method, path, json=body)

    def ok(self, who: str | None, method: str, path: str, body: Any = None) -> Any:
        response = self.call(who, method, path, body)
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def access(self, who: str, resource: str, account: str, **extra: Any) -> httpx.Response:
        body = {"resource": resource, "account": account, "duration_seconds": 600, **extra}
        return self.call(who, "POST", "/v1/access", body)

    def end(self, session_id: str) -> None:
        self.ok(ADMIN, "POST", f"/v1/access/{session_id}/end")


def _login(authz: Authz, name: str) -> dict[str, Any]:
    found: dict[str, Any] = authz.ok(
        None, "POST", "/v1/login", {"user": name, "password": PASSWORD}
    )
    return found


@pytest.fixture(scope="module")
def authz(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Authz]:
    gw = Gateway(tmp_path_factory.mktemp("authz"))
    gw.cli("gateway", "init", "--api-port", str(free_port()), "--admin", ADMIN)
    gw.start()
    try:
        with gw.api() as api:
            url, local, ca_pem = api.config.api_url, api.config.token, api.config.ca_cert
        assert url.startswith("https://") and ca_pem
        state = Authz(gw, url, {ADMIN: local}, {}, ca_pem)
        _provision(state, pg, pg_roles)
        yield state
    finally:
        gw.close()


def _provision(state: Authz, pg: TempCluster, pg_roles: Mapping[str, PgRole]) -> None:
    for name, project in (("prod-app", "default"), ("dev-app", "default"),
                          ("prod-stats", "analytics")):  # fmt: skip
        state.ok(ADMIN, "POST", "/v1/resources", {
            "name": name, "host": pg.host, "port": pg.port, "database": APP_DATABASE,
            "ssl_mode": "verify-full", "ca_cert": pg.ca_cert_path.read_text(),
            "project": project,
        })  # fmt: skip
        for key in ("scram", "md5"):
            role = pg_roles[key]
            state.ok(ADMIN, "POST", f"/v1/resources/{name}/accounts",
                     {"name": key, "username": role.name, "password": role.password})  # fmt: skip
    for name, (role, project, groups) in USERS.items():
        state.ok(ADMIN, "POST", "/v1/users", {
            "name": name, "role": role, "project": project, "groups": groups,
            "password": PASSWORD,
        })  # fmt: skip
        issued = _login(state, name)
        state.tokens[name], state.token_ids[name] = issued["token"], issued["token_id"]
    bot = state.ok(ADMIN, "POST", "/v1/tokens",
                   {"name": "bot", "role": "member", "project": "default",
                    "ttl_seconds": 3600})  # fmt: skip
    state.tokens["bot"], state.token_ids["bot"] = bot["token"], bot["token_id"]
    for policy in POLICIES:
        state.ok(ADMIN, "POST", "/v1/policies", policy)
    # alice's other tokens: one expired (in the store), one signed out.
    expired = _login(state, "alice")
    state.tokens["alice-expired"] = expired["token"]
    with sqlite3.connect(state.gw.home / STORE_FILE) as db:
        db.execute(
            "UPDATE tokens SET expires_at = '2000-01-01T00:00:00.000000+00:00' WHERE id = ?",
            (expired["token_id"],),
        )
    state.tokens["alice-revoked"] = _login(state, "alice")["token"]
    state.ok("alice-revoked", "POST", "/v1/logout")
    state.ok(ADMIN, "POST", "/v1/users/frank/disable")


@dataclass(frozen=True)
class Case:
    id: str
    who: str | None
    method: str
    path: str
    body: dict[str, Any] | None
    status: int
    fragment: str


def access(who: str | None, resource: str, account: str, seconds: int = 600,
           reason: str | None = None) -> tuple[str | None, str, str, dict[str, Any]]:  # fmt: skip
    body: dict[str, Any] = {"resource": resource, "account": account,
                            "duration_seconds": seconds}  # fmt: skip
    if reason is not None:
        body["reason"] = reason
    return who, "POST", "/v1/access", body


NO_POLICY = "no policy allows {} to access account '{}' of resource '{}'"
DENIED = "the API token is unknown, expired or revoked"

# fmt: off
CASES = [
    # admins: every project (global), or their own project only
    Case("admin-any-project", *access(ADMIN, "prod-stats", "scram"), 201, '"policy_name":"role:admin"'),
    Case("admin-unknown-resource", *access(ADMIN, "nope", "scram"), 404, "resource 'nope'"),
    Case("project-admin-own", *access("erin", "prod-stats", "md5"), 201, '"policy_name":"role:admin"'),
    Case("project-admin-other", *access("erin", "prod-app", "scram"), 403, NO_POLICY.format("erin", "scram", "prod-app")),
    # auditors never open access
    Case("auditor-access", *access("dave", "prod-app", "scram"), 403, "auditors read sessions"),
    # a member, exact policy
    Case("exact-within", *access("alice", "prod-app", "scram", 3600), 201, '"policy_name":"alice-exact"'),
    Case("exact-beyond", *access("alice", "prod-app", "scram", 3601), 403, "the longest access policy 'alice-exact' allows is 1h"),
    Case("exact-other-account", *access("alice", "prod-app", "md5"), 403, NO_POLICY.format("alice", "md5", "prod-app")),
    Case("exact-other-resource", *access("alice", "dev-app", "scram"), 403, NO_POLICY.format("alice", "scram", "dev-app")),
    Case("member-other-project", *access("alice", "prod-stats", "scram"), 403, NO_POLICY.format("alice", "scram", "prod-stats")),
    Case("member-unknown-resource", *access("alice", "prod-zzz", "scram"), 403, NO_POLICY.format("alice", "scram", "prod-zzz")),
    # @group with prod-* and a required reason
    Case("glob-with-reason", *access("bob", "prod-app", "md5", 7200, "INC-1"), 201, '"reason":"INC-1"'),
    Case("glob-no-reason", *access("bob", "prod-app", "md5"), 403, "policy 'dba-prod' requires a reason"),
    Case("glob-blank-reason", *access("bob", "prod-app", "md5", 600, "  "), 403, "requires a reason"),
    Case("glob-beyond", *access("bob", "prod-app", "scram", 7201, "INC-1"), 403, "allows is 2h"),
    Case("glob-no-match", *access("bob", "dev-app", "scram", 600, "INC-1"), 403, NO_POLICY.format("bob", "scram", "dev-app")),
    Case("glob-other-project", *access("bob", "prod-stats", "scram", 600, "INC-1"), 403, NO_POLICY.format("bob", "scram", "prod-stats")),
    Case("group-not-member", *access("alice", "prod-app", "md5", 600, "INC-1"), 403, NO_POLICY.format("alice", "md5", "prod-app")),
    # a machine member with `*`
    Case("machine-star", *access("bot", "dev-app", "md5", 1800), 201, '"policy_name":"bot-any"'),
    Case("machine-star-beyond", *access("bot", "dev-app", "md5", 1801), 403, "'bot-any' allows is 30m"),
    Case("machine-other-account", *access("bot", "prod-app", "scram"), 403, NO_POLICY.format("bot", "scram", "prod-app")),
    Case("machine-other-project", *access("bot", "prod-stats", "md5"), 403, NO_POLICY.format("bot", "md5", "prod-stats")),
    # a member of analytics only
    Case("project-member-own", *access("carol", "prod-stats", "scram"), 201, '"project":"analytics"'),
    Case("project-member-beyond", *access("carol", "prod-stats", "scram", 7200), 403, "'carol-stats' allows is 1h"),
    Case("project-member-other", *access("carol", "prod-app", "scram"), 403, NO_POLICY.format("carol", "scram", "prod-app")),
    # tokens that do not count
    Case("disabled-user", *access("frank", "prod-app", "scram"), 401, DENIED),
    Case("disabled-user-login", None, "POST", "/v1/login", {"user": "frank", "password": PASSWORD}, 401, "wrong user name or password"),
    Case("wrong-password", None, "POST", "/v1/login", {"user": "alice", "password": "nope-nope"}, 401, "wrong user name or password"),
    Case("expired-token", *access("alice-expired", "prod-app", "scram"), 401, DENIED),
    Case("expired-token-whoami", "alice-expired", "GET", "/v1/whoami", None, 401, DENIED),
    Case("revoked-token", *access("alice-revoked", "prod-app", "scram"), 401, DENIED),
    Case("no-token", *access(None, "prod-app", "scram"), 401, "no API token"),
    Case("garbage-token", *access("pam_not-a-token", "prod-app", "scram"), 401, DENIED),
    # managing resources, users, policies
    Case("member-add-resource", "alice", "POST", "/v1/resources", {"name": "x1", "host": "h", "database": "d"}, 403, "not an administrator of project 'default'"),
    Case("auditor-add-resource", "dave", "POST", "/v1/resources", {"name": "x2", "host": "h", "database": "d"}, 403, "not an administrator"),
    Case("project-admin-add-elsewhere", "erin", "POST", "/v1/resources", {"name": "x3", "host": "h", "database": "d"}, 403, "project 'default'"),
    Case("project-admin-add-own", "erin", "POST", "/v1/resources", {"name": "x4", "host": "h", "database": "d", "project": "analytics"}, 201, '"project":"analytics"'),
    Case("member-add-account", "alice", "POST", "/v1/resources/prod-app/accounts", {"name": "a", "username": "u", "password": "p"}, 403, "not an administrator"),
    Case("member-unseen-resource", "carol", "GET", "/v1/resources/prod-app", None, 404, "resource 'prod-app' not found"),
    Case("member-list-users", "alice", "GET", "/v1/users", None, 403, "not an administrator of every project"),
    Case("project-admin-add-user", "erin", "POST", "/v1/users", {"name": "zed", "role": "member"}, 403, "not an administrator of every project"),
    Case("machine-token-create", "bot", "POST", "/v1/tokens", {"name": "bot2", "ttl_seconds": 60}, 403, "not an administrator"),
    Case("machine-admin-refused", ADMIN, "POST", "/v1/tokens", {"name": "bot3", "role": "admin", "ttl_seconds": 60}, 403, "cannot be an admin"),
    Case("auditor-add-policy", "dave", "POST", "/v1/policies", {"name": "p1", "subjects": ["dave"], "resource": "*", "account": "*", "max_duration_seconds": 60}, 403, "not an administrator"),
    Case("project-admin-policy-own", "erin", "POST", "/v1/policies", {"name": "p2", "project": "analytics", "subjects": ["carol"], "resource": "x", "account": "*", "max_duration_seconds": 60}, 201, '"name":"p2"'),
    Case("project-admin-policy-other", "erin", "POST", "/v1/policies", {"name": "p3", "subjects": ["erin"], "resource": "*", "account": "*", "max_duration_seconds": 60}, 403, "project 'default'"),
    Case("member-remove-policy", "alice", "DELETE", "/v1/policies/alice-exact", None, 404, "no policy named 'alice-exact'"),
    Case("auditor-remove-policy", "dave", "DELETE", "/v1/policies/alice-exact", None, 403, "not an administrator"),
    Case("project-auditor-search", "dave", "GET", "/v1/audit/search", None, 403, "may not read the whole trail"),
    Case("member-verify", "alice", "POST", "/v1/audit/verify", None, 403, "may not read the whole trail"),
    Case("admin-verify", ADMIN, "POST", "/v1/audit/verify", None, 200, '"ok":true'),
    # open routes, and none other
    Case("health-open", None, "GET", "/v1/health", None, 200, '"status":"ok"'),
    Case("openapi-anon", None, "GET", "/openapi.json", None, 404, "no such API endpoint"),
    Case("openapi-token", ADMIN, "GET", "/openapi.json", None, 404, "no such API endpoint"),
    Case("docs-anon", None, "GET", "/docs", None, 404, "no such API endpoint"),
    Case("docs-token", ADMIN, "GET", "/docs", None, 404, "no such API endpoint"),
    Case("redoc-token", ADMIN, "GET", "/redoc", None, 404, "no such API endpoint"),
    Case("whoami-anon", None, "GET", "/v1/whoami", None, 401, "no API token"),
    Case("sessions-anon", None, "GET", "/v1/sessions", None, 401, "no API token"),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_authorization_matrix(authz: Authz, case: Case) -> None:
    response = authz.call(case.who, case.method, case.path, case.body)
    text = response.text
    try:
        assert response.status_code == case.status, response.text
        assert case.fragment in text, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"type", "message", "hint"}
        for token in authz.tokens.values():
            assert token not in response.text
    finally:
        if case.path == "/v1/access" and response.status_code == 201:
            authz.end(response.json()["id"])


def test_a_forged_requester_is_ignored_and_the_token_is_recorded(authz: Authz) -> None:
    response = authz.access(
        "bob", "prod-app", "md5", requester="mallory", reason="INC-7", principal_id="x"
    )
    assert response.status_code == 201, response.text
    session = response.json()
    authz.end(session["id"])
    me = authz.ok("bob", "GET", "/v1/whoami")
    assert session["requester"] == "bob"
    assert session["principal_id"] == me["id"]
    assert session["token_id"] == authz.token_ids["bob"] == me["token_id"]
    assert session["policy_name"] == "dba-prod"
    assert session["reason"] == "INC-7"
    assert session["project"] == "default"
    assert session["api_client_addr"] == "127.0.0.1"
    stored = authz.ok(ADMIN, "GET", f"/v1/sessions/{session['id']}")["session"]
    assert (stored["requester"], stored["token_id"]) == ("bob", authz.token_ids["bob"])


def test_user_env_does_not_name_the_requester(authz: Authz) -> None:
    env = {**authz.gw.env, "USER": "mallory", "LOGNAME": "mallory"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "db", "access", "--resource", "prod-app",
         "--account", "scram", "--duration", "10m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    running = AccessProcess(
        proc, _Drain(proc.stdout, authz.gw.transcript), _Drain(proc.stderr, authz.gw.transcript)
    )
    authz.gw.accesses.append(running)
    running.wait_ready()
    assert running.stop(signal.SIGINT) == 0
    admin = authz.ok(ADMIN, "GET", "/v1/whoami")
    sessions = authz.ok(ADMIN, "GET", "/v1/sessions", None)
    mine = [s for s in sessions if s["id"].startswith(running.session_prefix)]
    assert len(mine) == 1
    assert mine[0]["requester"] == ADMIN != "mallory"
    assert mine[0]["principal_id"] == admin["id"]
    assert "mallory" not in json.dumps(mine[0])


def test_who_reads_which_session(authz: Authz) -> None:
    ids = {}
    for who, resource, account, reason in (
        ("alice", "prod-app", "scram", None),
        ("bob", "prod-app", "md5", "INC-9"),
        ("carol", "prod-stats", "scram", None),
    ):
        response = authz.access(who, resource, account, reason=reason)
        assert response.status_code == 201, response.text
        ids[who] = response.json()["id"]
        authz.end(ids[who])
    # A member reads its own session, and another's is "not found".
    assert authz.call("alice", "GET", f"/v1/sessions/{ids['alice']}").status_code == 200
    for path in ("", "/audit", "/trail", "/statements", "/export"):
        refused = authz.call("alice", "GET", f"/v1/sessions/{ids['bob']}{path}")
        assert refused.status_code == 404, (path, refused.text)
        assert f"session '{ids['bob']}' not found" in refused.text
    assert authz.call("alice", "POST", f"/v1/access/{ids['bob']}/heartbeat").status_code == 404
    assert authz.call("alice", "POST", f"/v1/access/{ids['bob']}/end").status_code == 404
    revoked = authz.call("alice", "POST", f"/v1/access/{ids['bob']}/revoke", {"reason": "x"})
    assert revoked.status_code == 404, revoked.text
    # An auditor reads every session of its project, none of another.
    for who in ("alice", "bob"):
        assert authz.call("dave", "GET", f"/v1/sessions/{ids[who]}").status_code == 200
    assert authz.call("dave", "GET", f"/v1/sessions/{ids['carol']}").status_code == 404
    assert authz.call("carol", "GET", f"/v1/sessions/{ids['alice']}").status_code == 404
    # Lists show what the caller may see, nothing more.
    listed = {who: {s["id"] for s in authz.ok(who, "GET", "/v1/sessions")} for who in
              ("alice", "bob", "carol", "dave", "erin", ADMIN)}  # fmt: skip
    assert ids["alice"] in listed["alice"] and not listed["alice"] & {ids["bob"], ids["carol"]}
    assert ids["bob"] in listed["bob"] and ids["alice"] not in listed["bob"]
    assert ids["carol"] in listed["carol"] and ids["alice"] not in listed["carol"]
    assert {ids["alice"], ids["bob"]} <= listed["dave"] and ids["carol"] not in listed["dave"]
    assert ids["carol"] in listed["erin"] and ids["alice"] not in listed["erin"]
    assert set(ids.values()) <= listed[ADMIN]


def test_listings_show_only_what_the_caller_may_see(authz: Authz) -> None:
    def names(who: str, path: str, key: str = "name") -> set[str]:
        return {item[key] for item in authz.ok(who, "GET", path)}

    assert {"prod-app", "dev-app"} <= names("dave", "/v1/resources")
    assert "prod-stats" not in names("dave", "/v1/resources")
    assert "prod-stats" in names("carol", "/v1/resources")
    assert not {"prod-app", "dev-app"} & names("carol", "/v1/resources")
    assert {a["resource_name"] for a in authz.ok("carol", "GET", "/v1/accounts")} == {"prod-stats"}
    assert names("alice", "/v1/policies") == set()
    assert "carol-stats" in names("erin", "/v1/policies")
    assert "alice-exact" not in names("erin", "/v1/policies")
    assert "alice-exact" in names("dave", "/v1/policies")
    assert {p["name"] for p in POLICIES} <= names(ADMIN, "/v1/policies")


def test_disabling_a_user_ends_its_live_grant_and_its_token(authz: Authz) -> None:
    response = authz.access("alice", "prod-app", "scram", duration_seconds=1800)
    assert response.status_code == 201, response.text
    session = response.json()
    dsn = (
        f"host=127.0.0.1 port={session['listen_port']} user={session['username']}"
        f" dbname={session['database']} sslmode=disable"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        authz.ok(ADMIN, "POST", "/v1/users/alice/disable")
        with pytest.raises(psycopg.errors.AdminShutdown) as cut:
            conn.execute("SELECT 1")
    assert cut.value.sqlstate == SqlState.ADMIN_SHUTDOWN
    assert "user alice was disabled" in str(cut.value)
    refused = authz.call("alice", "GET", "/v1/whoami")
    assert refused.status_code == 401
    assert DENIED in refused.text
    ended = authz.ok(ADMIN, "GET", f"/v1/sessions/{session['id']}")["session"]
    assert ended["end_reason"] == "revoked"
    assert "user alice was disabled" in ended["end_detail"]


def test_no_token_or_password_in_the_daemon_log(authz: Authz) -> None:
    log = authz.gw.log()
    assert PASSWORD not in log
    for token in authz.tokens.values():
        assert token not in log
