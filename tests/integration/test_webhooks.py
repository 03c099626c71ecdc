"""Webhooks end to end (issue 14): the real daemon and CLI, `pam db access`, and a real
HTTP receiver the test starts. Access events arrive signed (checked with the recipe
in docs/webhooks.md, run as written), failures are retried by the backoff and stay
visible, a receiver that hangs or is down holds up no access, a pending delivery
survives a restart, the secret is shown once, and only a project's admins manage
its webhooks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import provision_gateway
from harness import AccessProcess, Gateway, _Drain, assert_one_error_line, psql, wait_for

from gateway.testing.pgcluster import PgRole, TempCluster
from gateway.testing.webhook_receiver import ReceivedRequest, WebhookReceiver

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
#: quick retries (0.2 s, 0.4 s, 0.8 s; four attempts) and a deadline far beyond
#: any wait in these tests, so a held request is still held while they look
FAST = {
    "webhook_retry_first_delay_seconds": 0.2,
    "webhook_retry_factor": 2.0,
    "webhook_max_attempts": 4,
    "webhook_timeout_seconds": 120.0,
}


def documented_verifier() -> Callable[[str, str, bytes], dict[str, Any]]:
    """``verify_pam_webhook`` exactly as docs/webhooks.md gives it."""
    match = re.search(r"```python\n(.*?def verify_pam_webhook.*?)```", DOCS.read_text(), re.S)
    assert match is not None, "docs/webhooks.md has no verify_pam_webhook snippet"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(DOCS), "exec"), namespace)  # noqa: S102 (our own docs)
    verifier: Callable[[str, str, bytes], dict[str, Any]] = namespace["verify_pam_webhook"]
    return verifier


@pytest.fixture(scope="module")
def module_hooked(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = provision_gateway(tmp_path_factory.mktemp("hooks"), pg, pg_roles, FAST)
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture
def gw(module_hooked: Gateway) -> Iterator[Gateway]:
    """The module's daemon; the test's webhooks and `pam db access` go when it ends."""
    started = len(module_hooked.accesses)
    yield module_hooked
    for access in module_hooked.accesses[started:]:
        if access.proc.poll() is None:
            access.stop()
    for hook in module_hooked.cli_json("webhook", "list"):
        module_hooked.cli("webhook", "remove", hook["id"])


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as started:
        yield started


def add_hook(gw: Gateway, url: str, *events: str) -> dict[str, Any]:
    args = [arg for event in events for arg in ("--event", event)]
    added: dict[str, Any] = gw.cli_json("webhook", "add", url, *args)
    return added


def deliveries(gw: Gateway, hook_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = gw.cli_json("webhook", "deliveries", hook_id)
    return found


def session_id_of(gw: Gateway, prefix: str) -> str:
    sessions = gw.cli_json("sessions", "list", "--active")
    return str(next(s["id"] for s in sessions if s["id"].startswith(prefix)))


def check_signed(request: ReceivedRequest, secret: str) -> dict[str, Any]:
    """The body, verified by the documented recipe; its headers agree with it."""
    body = documented_verifier()(secret, request.headers["x-pam-signature"], request.body)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("pam-gateway/")
    assert request.headers["x-pam-event"] == body["event"]
    assert request.headers["x-pam-delivery"] == body["id"]
    return body


def test_access_events_arrive_signed_and_the_secret_is_shown_once(
    gw: Gateway, receiver: WebhookReceiver
) -> None:
    added = gw.cli(
        "webhook", "add", receiver.url, "--event", "access.opened", "--event", "access.revoked"
    )
    secret = re.search(r"^secret: (pamwh_\S+)$", added.stdout, re.M)
    assert secret is not None, added.stdout
    assert "The secret will not be shown again" in added.stdout
    secret_text = secret.group(1)
    (hook,) = gw.cli_json("webhook", "list")
    assert (hook["project"], hook["url"], hook["events"]) == (
        "default",
        receiver.url,
        ["access.opened", "access.revoked"],
    )
    who = gw.cli_json("whoami")["name"]

    access = gw.access("--reason", "INC-9 check").wait_ready()
    session_id = session_id_of(gw, access.session_prefix)
    (opened,) = receiver.wait_for("access.opened")
    body = check_signed(opened, secret_text)
    assert {k: body[k] for k in ("event", "project")} == {
        "event": "access.opened",
        "project": "default",
    }
    assert body["gateway_id"] == json.loads((gw.home / "gateway.json").read_text())["gateway_id"]
    data = body["data"]
    assert {k: data[k] for k in ("session_id", "requester", "resource", "account", "reason")} == {
        "session_id": session_id,
        "requester": who,
        "resource": "prod",
        "account": "scram",
        "reason": "INC-9 check",
    }
    assert data["expires_at"].endswith("Z") and "ended_at" not in data

    gw.cli("sessions", "revoke", session_id, "--reason", "done here")
    (revoked,) = receiver.wait_for("access.revoked")
    data = check_signed(revoked, secret_text)["data"]
    assert (data["session_id"], data["end_reason"], data["end_detail"]) == (
        session_id,
        "revoked",
        f"revoked by {who}: done here",
    )
    access.wait()

    listed = wait_for(
        lambda: (
            (d := deliveries(gw, hook["id"][:8]))
            and all(x["state"] == "delivered" for x in d)
            and d
        )
    )
    assert sorted((d["event"], d["attempts"], d["last_status_code"]) for d in listed) == [
        ("access.opened", 1, 200),
        ("access.revoked", 1, 200),
    ]
    assert {d["id"] for d in listed} == {
        opened.headers["x-pam-delivery"],
        revoked.headers["x-pam-delivery"],
    }
    # The secret went to the terminal once; never to the log or a listing.
    listing = gw.cli("webhook", "list").stdout + json.dumps(gw.cli_json("webhook", "list"))
    assert hook["id"][:8] in listing
    assert secret_text not in listing
    assert secret_text not in gw.log()


def test_a_failing_receiver_is_retried_until_the_third_attempt_delivers(
    gw: Gateway, receiver: WebhookReceiver
) -> None:
    receiver.fail_next(2, status=500)
    hook = add_hook(gw, receiver.url, "access.opened")
    gw.access().wait_ready()
    attempts = receiver.wait_for("access.opened", count=3)
    assert [r.status for r in attempts] == [500, 500, 200]
    assert len({r.headers["x-pam-delivery"] for r in attempts}) == 1
    check_signed(attempts[-1], hook["secret"])

    (delivered,) = wait_for(
        lambda: [d for d in deliveries(gw, hook["id"]) if d["state"] == "delivered"]
    )
    assert (delivered["attempts"], delivered["last_status_code"], delivered["last_error"]) == (
        3,
        200,
        None,
    )
    table = gw.cli("webhook", "deliveries", hook["id"]).stdout
    row = next(line for line in table.splitlines() if delivered["id"][:8] in line)
    assert re.search(r"access\.opened .* delivered\s+3\s+HTTP 200", row), row

    tested = gw.cli("webhook", "test", hook["id"][:8])
    assert re.fullmatch(r"Delivered test delivery [0-9a-f]{8}: HTTP 200\n", tested.stdout)
    (test,) = receiver.wait_for("webhook.test")
    assert check_signed(test, hook["secret"])["data"]["webhook_id"] == hook["id"]


def test_a_receiver_that_holds_the_request_holds_up_no_access(
    gw: Gateway, receiver: WebhookReceiver
) -> None:
    receiver.hold_next()
    hook = add_hook(gw, receiver.url, "access.opened")
    access = gw.access().wait_ready()
    (held,) = receiver.wait_for("access.opened")
    # The receiver has not answered (and will not before this test releases it),
    # yet the grant is open and serves queries.
    result = psql(access, "select 'served while the webhook hangs'")
    assert result.stdout.strip() == "served while the webhook hangs", result.stderr
    (pending,) = deliveries(gw, hook["id"])
    assert (pending["state"], pending["attempts"]) == ("pending", 0)
    assert held.status is None
    receiver.release()
    (done,) = wait_for(lambda: [d for d in deliveries(gw, hook["id"]) if d["state"] == "delivered"])
    assert done["attempts"] == 1


def test_a_receiver_that_is_down_fails_visibly_and_access_goes_on(gw: Gateway) -> None:
    down = WebhookReceiver().start()
    down.stop()  # its port now refuses connections
    hook = add_hook(gw, down.url, "access.opened")
    access = gw.access().wait_ready()
    result = psql(access, "select 42")
    assert result.stdout.strip() == "42", result.stderr

    (failed,) = wait_for(lambda: [d for d in deliveries(gw, hook["id"]) if d["state"] == "failed"])
    assert (failed["attempts"], failed["last_status_code"], failed["next_attempt_at"]) == (
        4,
        None,
        None,
    )
    assert failed["last_error"].startswith("cannot connect")
    table = gw.cli("webhook", "deliveries", hook["id"]).stdout
    assert re.search(r"failed\s+4\s+cannot connect", table), table

    line = assert_one_error_line(gw.cli("webhook", "test", hook["id"], check=False))
    assert re.fullmatch(
        r"error: test delivery [0-9a-f]{8} failed: cannot connect: .*; next attempt at .*", line
    ), line


def test_a_pending_delivery_is_sent_after_a_restart(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> None:
    # A constant 1 s between attempts, and more attempts than this test lasts.
    slow = FAST | {
        "webhook_retry_first_delay_seconds": 1.0,
        "webhook_retry_factor": 1.0,
        "webhook_max_attempts": 100,
    }
    gw = provision_gateway(tmp_path, pg, pg_roles, slow)
    receiver = WebhookReceiver().start()
    receiver.stop()  # down, on a port it will come back to
    try:
        hook = add_hook(gw, receiver.url, "*")
        access = gw.access().wait_ready()
        session_id = session_id_of(gw, access.session_prefix)
        (tried,) = wait_for(lambda: [d for d in deliveries(gw, hook["id"]) if d["attempts"] >= 1])
        assert (tried["event"], tried["state"]) == ("access.opened", "pending")
        assert gw.stop() == 0
        access.stop()

        receiver.start()
        gw.start()
        opened = receiver.wait_for("access.opened")
        assert check_signed(opened[0], hook["secret"])["id"] == tried["id"]
        # The session the shutdown ended was notified too: written before the
        # store closed, sent by the next daemon.
        (ended,) = receiver.wait_for("access.ended")
        data = check_signed(ended, hook["secret"])["data"]
        assert (data["session_id"], data["end_reason"]) == (session_id, "gateway_shutdown")
        wait_for(lambda: all(d["state"] == "delivered" for d in deliveries(gw, hook["id"])))
    finally:
        receiver.stop()
        gw.close()


def as_principal(gw: Gateway, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = gw.env | {"PAM_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_disabling_a_user_revokes_its_grants_and_the_webhook_says_why(
    gw: Gateway, receiver: WebhookReceiver
) -> None:
    hook = add_hook(gw, receiver.url, "access.revoked")
    bot = gw.cli_json("token", "create", "hookrun", "--role", "member", "--project", "default")
    gw.cli(
        "policy",
        "add",
        "hookrun-prod",
        "--subject",
        "hookrun",
        "--resource",
        "prod",
        "--account",
        "scram",
        "--max-duration",
        "1h",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "db",
            "access",
            "--resource",
            "prod",
            "--account",
            "scram",
            "--duration",
            "10m",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=gw.env | {"PAM_TOKEN": bot["token"]},
    )
    access = AccessProcess(
        proc, _Drain(proc.stdout, gw.transcript), _Drain(proc.stderr, gw.transcript)
    )
    gw.accesses.append(access)
    access.wait_ready()
    gw.cli("user", "disable", "hookrun")
    (revoked,) = receiver.wait_for("access.revoked")
    data = check_signed(revoked, hook["secret"])["data"]
    assert (data["requester"], data["end_reason"], data["end_detail"]) == (
        "hookrun",
        "revoked",
        "user hookrun was disabled",
    )


def test_only_an_admin_of_the_project_manages_its_webhooks(
    gw: Gateway, receiver: WebhookReceiver
) -> None:
    hook = add_hook(gw, receiver.url, "access.opened")
    member = gw.cli_json("token", "create", "hookie", "--role", "member", "--project", "default")
    auditor = gw.cli_json("token", "create", "hookaud", "--role", "auditor", "--project", "default")
    refused = as_principal(gw, member["token"], "webhook", "add", receiver.url, "--event", "*")
    assert assert_one_error_line(refused) == (
        "error: hookie is not an administrator of project 'default'"
    )
    assert assert_one_error_line(as_principal(gw, member["token"], "webhook", "list")) == (
        "error: hookie is not an administrator of any project"
    )
    # A member is not told the webhook exists; an auditor is told it may not.
    for command in ("remove", "test", "deliveries"):
        line = assert_one_error_line(
            as_principal(gw, member["token"], "webhook", command, hook["id"])
        )
        assert line == f"error: webhook '{hook['id']}' not found", line
        line = assert_one_error_line(
            as_principal(gw, auditor["token"], "webhook", command, hook["id"])
        )
        assert line == "error: hookaud is not an administrator of project 'default'", line
    assert [h["id"] for h in gw.cli_json("webhook", "list")] == [hook["id"]]
    assert receiver.events("webhook.test") == []


def test_bad_input_is_one_line_naming_the_problem(gw: Gateway) -> None:
    def refused(*args: str) -> str:
        return assert_one_error_line(gw.cli("webhook", *args, check=False))

    assert refused("add", "ftp://example.com/x", "--event", "access.opened") == (
        "error: a webhook URL starts with https:// or http://"
        " (hint: for example https://hooks.example.com/pam)"
    )
    assert refused("add", "https://u:pw@example.com/x", "--event", "*").startswith(
        "error: a webhook URL carries no user name or password"
    )
    line = refused("add", "https://example.com/x", "--event", "access.open")
    assert line.startswith(
        "error: unknown webhook event 'access.open' (hint: events: request.created,"
    )
    assert refused("remove", "0123456789abcdef") == "error: webhook '0123456789abcdef' not found"
    assert refused("deliveries", "abc") == (
        "error: webhook id prefix 'abc' is too short: give at least 6 characters"
    )
    usage = assert_one_error_line(
        gw.cli("webhook", "add", "https://example.com/x", check=False), code=2
    )
    assert "--event" in usage
    assert gw.cli_json("webhook", "list") == []
