"""Access requests and approvals, break-glass (issue 14, points 1-2): several
signed-in users, each with a client config of its own, running the real CLI
against a real daemon and PostgreSQL.

alice asks; bob and carol are in ``@leads``, the approvers; mallory is a member
nobody named. Policy ``gated`` (prod/scram) needs one approval and a reason;
``two-key`` (prod/md5) needs two and allows break-glass.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import AccessProcess, Gateway, _Drain, wait_for

from gateway.testing.pgcluster import PgRole, TempCluster
from gateway.testing.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

PASSWORD = "pw-approvals-Secret-3"
REQUEST_LINE = re.compile(r"request ([0-9a-f]{8}) needs")


@dataclass
class Person:
    """A user signed in from a client config of its own."""

    gw: Gateway
    name: str
    config: Path

    @property
    def env(self) -> dict[str, str]:
        return {**self.gw.env, "PAM_CONFIG": str(self.config)}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            # Never the test's own terminal: a prompt must not wait for a person.
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        self.gw.transcript.add(result.stdout + result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: pam {' '.join(args)}: {result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def access(self, *args: str) -> AccessProcess:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "db", "access", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        started = AccessProcess(
            proc, _Drain(proc.stdout, self.gw.transcript), _Drain(proc.stderr, self.gw.transcript)
        )
        self.gw.accesses.append(started)
        return started


def refused(result: subprocess.CompletedProcess[str], fragment: str) -> str:
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], result.stderr
    return lines[0]


def request_id_of(access: AccessProcess) -> str:
    match = wait_for(lambda: REQUEST_LINE.search(access.stdout.text()))
    return str(match.group(1))


@dataclass
class Team:
    gw: Gateway
    people: dict[str, Person]
    #: a webhook of project default, subscribed to every event, delivers here
    hooks: WebhookReceiver

    def told(self, event: str, request_id: str) -> dict[str, Any]:
        """The ``data`` of the webhook delivery of *event* for the request."""

        def find() -> dict[str, Any] | None:
            for got in self.hooks.events(event):
                data: dict[str, Any] = got.json()["data"]
                if data.get("request_id", "").startswith(request_id):
                    return data
            return None

        found: dict[str, Any] = wait_for(find)
        return found

    def all_sent(self) -> None:
        """Wait until every delivery in the outbox has reached the receiver.

        Events are written to the outbox in the order they were published, so
        once one event is in it, every event published before it is too; after
        this, a check that some earlier event was *not* sent is not merely early.
        """
        (hook,) = self.gw.cli_json("webhook", "list")

        def settled() -> bool:
            rows = self.gw.cli_json("webhook", "deliveries", hook["id"], "--limit", "1000")
            return bool(rows) and all(d["state"] == "delivered" for d in rows)

        wait_for(settled)

    def gw_person(self, name: str) -> Person:
        """The gateway host's own signed-in admin, as a person."""
        return Person(self.gw, name, self.gw.config_path)

    def close(self) -> None:
        self.gw.close()
        self.hooks.stop()

    def __getitem__(self, name: str) -> Person:
        return self.people[name]


def _team(root: Path, pg: TempCluster, pg_roles: Mapping[str, PgRole], **settings: Any) -> Team:
    gw = Gateway(root)
    gw.init()
    path = gw.home / "gateway.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    gw.start()
    hooks = WebhookReceiver().start()
    gw.cli("webhook", "add", hooks.url, "--event", "*")
    gw.cli(
        "resource", "add", "prod", "--host", pg.host, "--port", str(pg.port),
        "--database", APP_DATABASE, "--ssl-mode", "verify-full", "--ca-cert", str(pg.ca_cert_path),
    )  # fmt: skip
    for key in ("scram", "md5"):
        role = pg_roles[key]
        gw.cli(
            "account", "add", "prod", key, "--username", role.name, "--password-stdin",
            input=role.password + "\n",
        )  # fmt: skip
    gw.cli(
        "policy", "add", "gated", "--subject", "alice", "--resource", "prod", "--account",
        "scram", "--max-duration", "1h", "--require-reason", "--require-approval", "1",
        "--approver", "@leads",
    )  # fmt: skip
    gw.cli(
        "policy", "add", "two-key", "--subject", "alice", "--resource", "prod", "--account",
        "md5", "--max-duration", "1h", "--require-approval", "2", "--approver", "@leads",
        "--break-glass",
    )  # fmt: skip
    config = json.loads(gw.config_path.read_text())
    ca_file = root / "ca.pem"
    ca_file.write_text(config["ca_cert"])
    people = {}
    for name, groups in (("alice", []), ("bob", ["leads"]), ("carol", ["leads"]), ("mallory", [])):
        gw.cli(
            "user", "add", name, "--role", "member", "--project", "default",
            *(f"--group={g}" for g in groups), "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
        person = Person(gw, name, root / f"{name}.json")
        subprocess.run(
            [sys.executable, "-m", "cli", "login", "--gateway", config["api_url"], "--ca-cert",
             str(ca_file), "--user", name, "--password-stdin"],
            input=PASSWORD + "\n", env=person.env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        people[name] = person
    return Team(gw, people, hooks)


@pytest.fixture(scope="module")
def team(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Team]:
    made = _team(tmp_path_factory.mktemp("approvals"), pg, pg_roles)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def quick_team(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> Iterator[Callable[..., Team]]:
    """A daemon of its own with short request deadlines."""
    made: list[Team] = []

    def start(**settings: Any) -> Team:
        made.append(_team(tmp_path / f"gw{len(made)}", pg, pg_roles, **settings))
        return made[-1]

    yield start
    for one in made:
        one.close()


def trail_kinds(person: Person, request_id: str) -> list[tuple[str, str]]:
    shown = person.json("requests", "show", request_id)
    return [(t["kind"], t["actor"]) for t in shown["trail"]]


def test_an_approved_request_opens_and_its_clock_starts_then(team: Team) -> None:
    alice, bob, mallory = team["alice"], team["bob"], team["mallory"]
    access = alice.access("--resource", "prod", "--account", "scram", "--duration", "30m",
                          "--reason", "INC-1 check")  # fmt: skip
    rid = request_id_of(access)
    assert "from @leads" in access.stdout.text()
    # Neither someone nobody named (to whom it does not exist) nor the requester may approve.
    refused(mallory.cli("requests", "approve", rid, check=False), f"request '{rid}' not found")
    refused(
        alice.cli("requests", "approve", rid, check=False),
        f"alice asked for request {rid} and cannot approve it",
    )
    # mallory may not even see it; bob sees it among those he may decide.
    assert mallory.json("requests", "list") == []
    pending = bob.json("requests", "list", "--pending")
    assert [(r["id"][:8], r["can_decide"], r["state"]) for r in pending] == [(rid, True, "pending")]
    time.sleep(1.5)  # the grant's clock must not start at the request
    bob.cli("requests", "approve", rid, "--comment", "ok for INC-1")
    access.wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("app_scram",)
    request = alice.json("requests", "show", rid)["request"]
    assert request["state"] == "opened"
    assert [(a["by"], a["comment"]) for a in request["approvals"]] == [("bob", "ok for INC-1")]
    session = team.gw.cli_json("sessions", "show", request["session_id"])["session"]
    assert (session["request_id"], session["policy_name"], session["reason"]) == (
        request["id"],
        "gated",
        "INC-1 check",
    )
    started = _time(session["started_at"])
    assert _time(session["expires_at"]) - started == 1800
    assert started >= _time(request["approved_at"])
    assert trail_kinds(alice, rid) == [
        ("requested", "alice"),
        ("approved", "bob"),
        ("opened", "alice"),
    ]
    created = team.told("request.created", rid)
    assert (created["state"], created["requester"], created["approvers"]) == (
        "pending",
        "alice",
        ["@leads"],
    )
    approved = team.told("request.approved", rid)
    assert (approved["actor"], approved["state"]) == ("bob", "approved")
    assert [a["by"] for a in approved["approvals"]] == ["bob"]
    assert access.stop() == 0
    verify = team.gw.cli("audit", "verify")
    assert "intact" in verify.stdout


def test_a_denied_request_ends_the_wait_with_the_reason(team: Team) -> None:
    alice, carol = team["alice"], team["carol"]
    access = alice.access("--resource", "prod", "--account", "scram", "--reason", "INC-2")
    rid = request_id_of(access)
    refused(carol.cli("requests", "deny", rid, "--reason", " ", check=False), "needs a reason")
    carol.cli("requests", "deny", rid, "--reason", "not in the change window")
    assert access.wait() == 1
    assert access.stderr.text().strip() == (
        f"error: request {rid} was denied by carol: not in the change window"
    )
    assert trail_kinds(alice, rid)[-1] == ("denied", "carol")
    denied = team.told("request.denied", rid)
    assert (denied["decided_by"], denied["decision_note"]) == ("carol", "not in the change window")


def test_two_distinct_approvers_are_needed_and_what_was_asked_is_fixed(team: Team) -> None:
    alice, bob, carol = team["alice"], team["bob"], team["carol"]
    access = alice.access("--resource", "prod", "--account", "md5", "--duration", "10m")
    rid = request_id_of(access)
    bob.cli("requests", "approve", rid)
    refused(bob.cli("requests", "approve", rid, check=False), "bob has already approved")
    assert alice.json("requests", "show", rid)["request"]["state"] == "pending"
    # Ctrl+C while waiting cancels the request.
    access.proc.send_signal(signal.SIGINT)
    assert access.wait() == 1
    assert f"cancelled request {rid}" in access.stderr.text()
    assert team.told("request.cancelled", rid)["actor"] == "alice"
    # One approval of two is not told as approved (it would have been published
    # before the cancellation, so it would be sent by now).
    team.all_sent()
    assert not [e for e in team.hooks.events("request.approved") if rid in e.body.decode()]
    refused(
        carol.cli("requests", "approve", rid, check=False),
        f"cannot approve request {rid}: it is cancelled",
    )
    # Asked again through the API (no waiting CLI), approved by two, then opened.
    again = _ask(alice, "md5", 600)
    bob.cli("requests", "approve", again)
    carol.cli("requests", "approve", again)
    refused(
        alice.cli("db", "access", "--request", again, "--account", "scram", check=False),
        "its account cannot change once requested",
    )
    refused(
        alice.cli("db", "access", "--request", again, "--duration", "20m", check=False),
        "its duration cannot change",
    )
    opened = alice.access("--request", again).wait_ready()
    assert "for prod/md5" in opened.stdout.text()
    assert opened.stop() == 0
    # An opened request cannot be opened twice.
    refused(
        alice.cli("db", "access", "--request", again, check=False),
        f"cannot open request {again[:8]}: it is opened",
    )


def test_break_glass_opens_at_once_recorded_apart(team: Team) -> None:
    alice = team["alice"]
    refused(
        alice.cli("db", "access", "--resource", "prod", "--account", "md5", "--break-glass",
                  check=False),
        "break-glass access requires a reason",
    )  # fmt: skip
    refused(
        alice.cli("db", "access", "--resource", "prod", "--account", "scram", "--break-glass",
                  "--reason", "x", check=False),
        "no policy that allows this access allows break-glass",
    )  # fmt: skip
    access = alice.access("--resource", "prod", "--account", "md5", "--break-glass",
                          "--reason", "outage INC-9").wait_ready()  # fmt: skip
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    mine = alice.json("requests", "list", "--mine")
    glass = next(r for r in mine if r["break_glass"])
    assert (glass["state"], glass["reason"], glass["approvals"]) == ("opened", "outage INC-9", [])
    assert trail_kinds(alice, glass["id"]) == [
        ("requested", "alice"),
        ("break_glass", "alice"),
        ("opened", "alice"),
    ]
    told = team.told("access.break_glass", glass["id"])
    assert (told["reason"], told["break_glass"], told["policy"]) == (
        "outage INC-9",
        True,
        "two-key",
    )
    # A request.created would have been published before access.break_glass.
    team.all_sent()
    assert not [e for e in team.hooks.events("request.created") if glass["id"] in e.body.decode()]
    assert access.stop() == 0


def test_revoking_a_grant_records_it_on_its_request(team: Team) -> None:
    alice, bob = team["alice"], team["bob"]
    rid = _ask(alice, "scram", 600, reason="INC-4")
    bob.cli("requests", "approve", rid)
    access = alice.access("--request", rid).wait_ready()
    session_id = alice.json("requests", "show", rid)["request"]["session_id"]
    team.gw.cli("sessions", "revoke", session_id, "--reason", "done early")
    assert access.wait() == 0
    assert alice.json("requests", "show", rid)["request"]["state"] == "revoked"
    assert trail_kinds(alice, rid)[-1] == ("revoked", team.gw.cli_json("whoami")["name"])


def test_unanswered_and_unused_requests_expire(quick_team: Callable[..., Team]) -> None:
    team = quick_team(
        request_pending_ttl_seconds=3, request_open_within_seconds=3, request_sweep_seconds=0.2
    )
    alice, bob = team["alice"], team["bob"]
    waiting = alice.access("--resource", "prod", "--account", "scram", "--reason", "INC-5")
    rid = request_id_of(waiting)
    assert waiting.wait() == 1
    assert waiting.stderr.text().strip() == f"error: request {rid} expired: not decided in time"
    assert trail_kinds(alice, rid)[-1] == ("expired", "pam")
    assert team.told("request.expired", rid)["decision_note"] == "not decided in time"
    # Approved, then not opened in time.
    unused = _ask(alice, "scram", 600, reason="INC-6")
    bob.cli("requests", "approve", unused)
    wait_for(lambda: alice.json("requests", "show", unused)["request"]["state"] == "expired")
    refused(
        alice.cli("db", "access", "--request", unused, check=False),
        f"cannot open request {unused[:8]}: it is expired",
    )
    assert [k for k, _ in trail_kinds(alice, unused)] == ["requested", "approved", "expired"]
    assert "intact" in team.gw.cli("audit", "verify").stdout


def _ask(person: Person, account: str, seconds: int, reason: str | None = None) -> str:
    """A request made over the API (no CLI waiting on it); its id."""
    from cli.client import ApiClient, PendingApproval
    from gateway.config import ClientConfig

    profile = ClientConfig.model_validate_json(person.config.read_text()).current
    with ApiClient(profile) as client:
        try:
            client.open_access(
                resource="prod", account=account, duration_seconds=seconds, port=None,
                reason=reason,
            )  # fmt: skip
        except PendingApproval as pending:
            return pending.request["id"]
    raise AssertionError("the access was granted without approval")


def _time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_an_extension_under_an_approval_policy_waits_and_is_applied_once_approved(
    team: Team,
) -> None:
    alice, bob = team["alice"], team["bob"]
    rid = _ask(alice, "scram", 600, reason="INC-8")
    bob.cli("requests", "approve", rid)
    access = alice.access("--request", rid).wait_ready()
    session_id = alice.json("requests", "show", rid)["request"]["session_id"]
    before = team.gw.cli_json("sessions", "show", session_id)["session"]["expires_at"]
    # The policy asks for approval: the extension is a request, the grant unchanged.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "cli", "grant", "extend", session_id[:8], "--by", "10m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=alice.env,
    )  # fmt: skip
    ext = wait_for(
        lambda: next((r for r in alice.json("requests", "list", "--mine") if r["extends"]), None)
    )
    assert (ext["state"], ext["session_id"], ext["duration_seconds"]) == (
        "pending",
        session_id,
        600,
    )
    assert team.gw.cli_json("sessions", "show", session_id)["session"]["expires_at"] == before
    refused(
        alice.cli("db", "access", "--request", ext["id"], check=False),
        "extends a live grant: it opens nothing",
    )
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        bob.cli("requests", "approve", ext["id"])
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert "now expires" in out
        after = team.gw.cli_json("sessions", "show", session_id)["session"]["expires_at"]
        assert _time(after) - _time(before) == 600
        # The live connection was not touched.
        assert conn.execute("select 1").fetchone() == (1,)
    assert trail_kinds(alice, ext["id"]) == [
        ("requested", "alice"),
        ("approved", "bob"),
        ("opened", "alice"),
    ]
    told = team.told("request.approved", ext["id"])
    assert told["extends_session"] is True
    extended = wait_for(
        lambda: next(
            (
                e.json()["data"]
                for e in team.hooks.events("access.extended")
                if e.json()["data"]["session_id"] == session_id
            ),
            None,
        )
    )
    assert (extended["by_seconds"], extended["expires_at"][:19]) == (600, after[:19])
    assert access.stop() == 0
    assert "intact" in team.gw.cli("audit", "verify").stdout


def test_an_admin_extension_is_applied_at_once_and_recorded(team: Team) -> None:
    access = team.gw.access("--duration", "10m").wait_ready()
    sessions = team.gw.cli_json("sessions", "list", "--active")
    session_id = next(s["id"] for s in sessions if s["id"].startswith(access.session_prefix))
    out = team.gw.cli("grant", "extend", session_id, "--by", "5m").stdout
    assert "now expires" in out
    admin = team.gw.cli_json("whoami")["name"]
    mine = team.gw.cli_json("requests", "list", "--mine")
    (ext,) = [r for r in mine if r["session_id"] == session_id]
    assert (ext["state"], ext["extends"], ext["policy_name"], ext["duration_seconds"]) == (
        "opened",
        True,
        "role:admin",
        300,
    )
    assert [k for k, _ in trail_kinds(team.gw_person(admin), ext["id"])] == ["requested", "opened"]
    assert access.stop() == 0


def test_approving_in_a_project_that_says_so_needs_the_approvers_second_factor(
    team: Team,
) -> None:
    import base64

    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    alice, bob, carol, mallory = team["alice"], team["bob"], team["carol"], team["mallory"]
    secret = bob.json("mfa", "enroll")["secret"]
    totp = TOTP(base64.b32decode(secret + "=" * (-len(secret) % 8)), 6, SHA1(), 30)  # noqa: S303
    now = time.time()
    bob.cli("mfa", "confirm", totp.generate(now).decode())
    team.gw.cli("project", "set", "default", "--approval-mfa")
    try:
        rid = _ask(alice, "scram", 600, reason="INC-10")
        # Refusals that do not depend on the code come first.
        refused(mallory.cli("requests", "approve", rid, check=False), "not found")
        refused(
            alice.cli("requests", "approve", rid, check=False),
            f"alice asked for request {rid[:8]} and cannot approve it",
        )
        refused(carol.cli("requests", "approve", rid, check=False), "pam mfa enroll")
        refused(bob.cli("requests", "approve", rid, check=False), "second-factor")
        assert alice.json("requests", "show", rid)["request"]["state"] == "pending"
        bob.cli("requests", "approve", rid, "--otp", totp.generate(now + 30).decode())
        assert alice.json("requests", "show", rid)["request"]["state"] == "approved"
    finally:
        team.gw.cli("project", "set", "default", "--no-approval-mfa")
        team.gw.cli("mfa", "reset", "bob")
