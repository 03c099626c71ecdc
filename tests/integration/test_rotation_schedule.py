"""Rotation schedules, leases and the rotation record's tamper evidence, with a real
PostgreSQL 15, real daemons, the CLI and a real webhook receiver.

Schedules run on short intervals (``rotation_min_interval_seconds`` lowered for
tests). The stored password is read back the way someone holding the gateway
host could (the master key and the store), only to prove that it works upstream
and the typed one no longer does. Two daemons share one store (a PostgreSQL
database of their own, as gateways sharing a store would): only the scheduler's
lease holder rotates, the lease moves when it stops, and a rotation one of them
has in flight is left alone by the other until the first is gone.
"""

from __future__ import annotations

import itertools
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import (
    Gateway,
    add_verified_resource,
    make_login_role,
    open_store,
    shared_store_pair,
    wait_for,
    write_settings,
)

from gateway.app.daemon import ROTATION_PAUSE_ENV, ROTATION_RESUME_FILE
from gateway.config import STORE_FILE, load_settings
from gateway.testing.pgcluster import TempCluster
from gateway.testing.pgconf import sql_ident
from gateway.testing.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

RESOURCE = "prod"
#: schedules down to a second, ticks of a fifth of one, retries from half a
#: second doubling, presence leases of five seconds, quick webhook retries
FAST: dict[str, Any] = {
    "rotation_min_interval_seconds": 1,
    "rotation_schedule_tick_seconds": 0.2,
    "rotation_lease_seconds": 5.0,
    "presence_renew_seconds": 1.0,
    "presence_lease_seconds": 5.0,
    "rotation_retry_first_delay_seconds": 0.5,
    "rotation_retry_factor": 2.0,
    "rotation_jitter_fraction": 0.05,
    "webhook_retry_first_delay_seconds": 0.2,
    "webhook_retry_factor": 2.0,
    "webhook_max_attempts": 4,
}


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def gateway(pg: TempCluster, tmp_path: Path) -> Iterator[Gateway]:
    """A daemon of its own with FAST settings and resource ``prod``."""
    gw = Gateway(tmp_path)
    gw.init()
    write_settings(gw, FAST)
    gw.start()
    try:
        add_verified_resource(gw, pg, RESOURCE, APP_DATABASE)
        yield gw
    finally:
        gw.close()


def signs_in(pg: TempCluster, role: str, password: str) -> bool:
    try:
        psycopg.connect(pg.dsn(role, password, APP_DATABASE), connect_timeout=30).close()
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc) or "not permitted" in str(exc), exc
        return False
    return True


def add_account(gw: Gateway, account: str, role: str, password: str) -> None:
    gw.cli(
        "account", "add", RESOURCE, account, "--username", role, "--password-stdin",
        input=password + "\n",
    )  # fmt: skip


def stored_password(gw: Gateway, account: str) -> str:
    with open_store(gw) as store:
        return store.reveal_password(RESOURCE, account)


def history(gw: Gateway, account: str) -> list[dict[str, Any]]:
    """The account's rotation record, oldest first."""
    return list(reversed(gw.cli_json("account", "rotations", RESOURCE, account, "--limit", "1000")))


def scheduled(gw: Gateway, account: str) -> list[dict[str, Any]]:
    return [r for r in history(gw, account) if r["started_by"] == "schedule"]


def account_row(gw: Gateway, account: str) -> dict[str, Any]:
    [row] = [a for a in gw.cli_json("account", "list") if a["name"] == account]
    return dict(row)


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def assert_one_at_a_time(records: list[dict[str, Any]], interval: float) -> None:
    """Each scheduled rotation started no sooner than one interval after the one
    before ended: never two at once, never one run twice for a due time."""
    for before, after in itertools.pairwise(records):
        assert moment(after["started_at"]) >= moment(before["ended_at"]) + timedelta(
            seconds=interval
        ), (before, after)


def gateway_id(gw: Gateway) -> str:
    return load_settings(gw.home).gateway_id


def logged(gw: Gateway, event: str, **fields: Any) -> bool:
    return any(
        e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        for e in gw.log_events()
    )


# --- a schedule -----------------------------------------------------------------------------


def test_a_schedule_rotates_the_password_on_its_own_until_turned_off(
    gateway: Gateway, pg: TempCluster
) -> None:
    role, typed = make_login_role(pg, "sched_self", APP_DATABASE)
    other_role, other_typed = make_login_role(pg, "sched_other", APP_DATABASE)
    add_account(gateway, "sched", role, typed)
    add_account(gateway, "other", other_role, other_typed)

    said = gateway.cli("account", "rotate", RESOURCE, "sched", "--every", "1s").stdout
    assert "Password of prod/sched rotated every 1s; next at" in said
    assert account_row(gateway, "sched")["rotation_interval_seconds"] == 1

    records = wait_for(
        lambda: len(scheduled(gateway, "sched")) >= 3 and scheduled(gateway, "sched"), timeout=120
    )
    assert {(r["outcome"], r["method"], r["via"], r["ok"]) for r in records} == {
        ("rotated", "generated", "self", True)
    }
    assert_one_at_a_time(records, 1)
    # The server's password changed: the stored one signs in, the typed one not.
    current = stored_password(gateway, "sched")
    assert signs_in(pg, role, current)
    assert not signs_in(pg, role, typed)
    row = account_row(gateway, "sched")
    assert row["last_rotation_outcome"] == "rotated" and row["next_rotation_at"] is not None
    assert row["rotation_failures"] == 0
    table = gateway.cli("account", "list").stdout
    assert "EVERY" in table and "NEXT ROTATION" in table and " 1s " in table

    stopped = gateway.cli("account", "rotate", RESOURCE, "sched", "--every", "off").stdout
    assert "Scheduled rotation of prod/sched stopped." in stopped
    row = account_row(gateway, "sched")
    assert (row["rotation_interval_seconds"], row["next_rotation_at"]) == (None, None)
    count = len(scheduled(gateway, "sched"))
    # The scheduler goes on (another account's schedule fires twice), this one not.
    gateway.cli("account", "rotate", RESOURCE, "other", "--every", "1s")
    wait_for(lambda: len(scheduled(gateway, "other")) >= 2, timeout=120)
    assert len(scheduled(gateway, "sched")) == count
    assert signs_in(pg, role, stored_password(gateway, "sched"))
    # Nobody saw a password: not the daemon's log, not the CLI's output.
    text = gateway.transcript.text() + gateway.log().encode()
    assert current.encode() not in text


def test_a_failing_schedule_retries_with_backoff_and_tells_the_webhooks(
    gateway: Gateway, pg: TempCluster
) -> None:
    role, typed = make_login_role(pg, "sched_fail", APP_DATABASE)
    add_account(gateway, "flaky", role, typed)
    receiver = WebhookReceiver().start()
    try:
        gateway.cli(
            "webhook", "add", receiver.url, "--event", "rotation.failed",
            "--event", "rotation.succeeded",
        )  # fmt: skip
        pg.admin_sql(f"ALTER ROLE {sql_ident(role)} NOLOGIN;")
        gateway.cli("account", "rotate", RESOURCE, "flaky", "--every", "8s")

        def failing_snapshot() -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
            before = scheduled(gateway, "flaky")
            row = account_row(gateway, "flaky")
            after = scheduled(gateway, "flaky")
            if before != after or len(after) < 3:
                return None  # an attempt ran meanwhile, or too few yet: look again
            return after, row

        records, row = wait_for(failing_snapshot, timeout=120)
        assert {r["outcome"] for r in records} == {"failed"}
        assert "could not sign in to change its password" in records[-1]["detail"]
        failures = len(records)
        assert row["rotation_failures"] == failures
        # The wait after the n-th failure in a row: 0.5 s doubled each time
        # (capped at the 8 s interval), put off by up to 5 % of itself.
        delay = min(0.5 * 2 ** (failures - 1), 8.0)
        waited = (moment(row["next_rotation_at"]) - moment(records[-1]["ended_at"])).total_seconds()
        assert delay <= waited <= delay * 1.05 + 1e-6, (failures, waited)

        def listed_as_stored() -> bool:
            # `account list` shows the count the store holds when it reads it;
            # a retry may land between the reads: look again then.
            before = len(scheduled(gateway, "flaky"))
            listed = gateway.cli("account", "list").stdout
            after = len(scheduled(gateway, "flaky"))
            return before == after and f"failed (retrying, {after} failed)" in listed

        assert wait_for(listed_as_stored, timeout=120)

        [hook] = receiver.wait_for("rotation.failed", count=1)[:1]
        body = hook.json()
        assert body["project"] == "default"
        data = body["data"]
        assert (data["resource"], data["account"], data["outcome"], data["started_by"]) == (
            RESOURCE,
            "flaky",
            "failed",
            "schedule",
        )
        assert "could not sign in" in data["detail"] and data["hint"]
        assert typed.encode() not in hook.body

        # Fixed: the next retry rotates, the count resets, and success is told.
        pg.admin_sql(f"ALTER ROLE {sql_ident(role)} LOGIN;")
        wait_for(lambda: scheduled(gateway, "flaky")[-1]["outcome"] == "rotated", timeout=120)
        [succeeded] = receiver.wait_for("rotation.succeeded", count=1)[:1]
        assert succeeded.json()["data"]["outcome"] == "rotated"
        assert account_row(gateway, "flaky")["rotation_failures"] == 0
        current = stored_password(gateway, "flaky")
        assert signs_in(pg, role, current) and not signs_in(pg, role, typed)
        for request in receiver.requests:
            assert current.encode() not in request.body and typed.encode() not in request.body
    finally:
        receiver.stop()


def test_an_interval_shorter_than_allowed_is_refused_in_one_line(gateway: Gateway) -> None:
    write_settings(gateway, {"rotation_min_interval_seconds": 60})
    gateway.stop()
    gateway.start()
    refused = gateway.cli("account", "rotate", RESOURCE, "nope", "--every", "30s", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "at least 1m, not 30s" in refused.stderr.strip().splitlines()[-1]
    both = gateway.cli(
        "account", "rotate", RESOURCE, "x", "--every", "1h", "--no-verify", check=False
    )
    assert both.returncode != 0 and "--every generate the password" in both.stderr


# --- tamper evidence -------------------------------------------------------------------------


def test_pam_audit_verify_names_a_rotation_record_edited_or_removed_by_hand(
    gateway: Gateway,
) -> None:
    gateway.cli(
        "account", "add", RESOURCE, "ro", "--username", "app_ro", "--password-stdin",
        "--no-verify", input="first-password\n",
    )  # fmt: skip
    for password in ("second-password", "third-password"):
        gateway.cli(
            "account", "rotate", RESOURCE, "ro", "--password-stdin", "--no-verify",
            input=password + "\n",
        )  # fmt: skip
    assert [r["record"] for r in history(gateway, "ro")] == [1, 2]
    assert gateway.cli("audit", "verify").returncode == 0

    database = sqlite3.connect(gateway.home / STORE_FILE)
    try:
        with database:  # someone with the file, past the append-only triggers
            database.execute("DROP TRIGGER rotations_no_update")
            database.execute("DROP TRIGGER rotations_no_delete")
            database.execute("UPDATE rotations SET started_by = 'nobody' WHERE seq = 2")
        edited = gateway.cli("audit", "verify", check=False)
        assert edited.returncode == 1
        assert "rotation record seq 2: changed: rotation record 2 of prod/ro was edited" in (
            edited.stdout
        )
        with database:
            database.execute("DELETE FROM rotations WHERE seq = 1")
        removed = gateway.cli("audit", "verify", check=False)
        assert removed.returncode == 1
        assert "rotation record 1 was removed" in removed.stdout
        assert "rotation record 2 of prod/ro was edited" in removed.stdout
    finally:
        database.close()


# --- two gateways, one store ----------------------------------------------------------------


@pytest.fixture
def pair(pg: TempCluster, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    first, second = shared_store_pair(pg, tmp_path, FAST)
    try:
        first.start()
        second.start()
        add_verified_resource(first, pg, RESOURCE, APP_DATABASE)
        yield first, second
    finally:
        first.close()
        second.close()


def test_two_gateways_on_one_store_take_turns_and_the_lease_moves_when_one_stops(
    pair: tuple[Gateway, Gateway], pg: TempCluster
) -> None:
    first, second = pair
    role, typed = make_login_role(pg, "sched_pair", APP_DATABASE)
    add_account(first, "shared", role, typed)
    second.cli("account", "rotate", RESOURCE, "shared", "--every", "1s")

    records = wait_for(
        lambda: len(scheduled(first, "shared")) >= 4 and scheduled(first, "shared"), timeout=120
    )
    ids = {gateway_id(first): first, gateway_id(second): second}
    holders = {r["gateway_id"] for r in records}
    assert len(holders) == 1 and holders <= set(ids), holders
    holder = ids[holders.pop()]
    other = second if holder is first else first
    assert logged(holder, "rotation_scheduler_lease_acquired")
    assert not logged(other, "rotation_scheduler_lease_acquired")
    assert_one_at_a_time(records, 1)

    holder.stop()  # gives the lease up
    wait_for(lambda: logged(other, "rotation_scheduler_lease_acquired"), timeout=60)
    wait_for(
        lambda: sum(r["gateway_id"] == gateway_id(other) for r in scheduled(other, "shared")) >= 2,
        timeout=120,
    )
    records = scheduled(other, "shared")
    assert {r["outcome"] for r in records} == {"rotated"}
    assert_one_at_a_time(records, 1)
    taken = [r["gateway_id"] for r in records]
    switch = taken.index(gateway_id(other))
    assert set(taken[switch:]) == {gateway_id(other)}
    assert set(taken[:switch]) == {gateway_id(holder)}
    # Rotated every second: read between two rotations (a rotation in flight has
    # changed the password upstream before it stores it), the stored one signs in.
    wait_for(lambda: signs_in(pg, role, stored_password(other, "shared")), timeout=60)
    assert not signs_in(pg, role, typed)


def test_a_rotation_in_flight_is_left_to_its_gateway_until_that_gateway_is_gone(
    pg: TempCluster, tmp_path: Path
) -> None:
    first, second = shared_store_pair(pg, tmp_path, FAST)
    role, typed = make_login_role(pg, "sched_flight", APP_DATABASE)
    rotating: subprocess.Popen[str] | None = None
    try:
        # The first pauses every rotation after storing its new password (before
        # the ALTER ROLE).
        first.start(extra_env={ROTATION_PAUSE_ENV: "pending_stored"})
        add_verified_resource(first, pg, RESOURCE, APP_DATABASE)
        add_account(first, "flight", role, typed)
        second.start()
        rotating = subprocess.Popen(
            [sys.executable, "-m", "cli", "account", "rotate", RESOURCE, "flight", "--now"],
            env=first.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: logged(first, "rotation_paused"))
        # The second starting again looks at it, and leaves it to the first.
        second.stop()
        second.start()
        wait_for(
            lambda: logged(second, "rotation_left_to_its_gateway", gateway_id=gateway_id(first))
        )
        with open_store(first) as store:
            [pending] = store.pending_rotations()
        assert pending.gateway_id == gateway_id(first)
        (first.home / ROTATION_RESUME_FILE).touch()
        _, err = rotating.communicate(timeout=120)
        assert rotating.returncode == 0, err
        assert signs_in(pg, role, stored_password(first, "flight"))
        assert not signs_in(pg, role, typed)

        # Paused again, then the first dies: once its presence lease runs out,
        # the second (now the lease holder) settles what it left.
        before = stored_password(first, "flight")
        rotating = subprocess.Popen(
            [sys.executable, "-m", "cli", "account", "rotate", RESOURCE, "flight", "--now"],
            env=first.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: sum(e.get("event") == "rotation_paused" for e in first.log_events()) >= 2)
        first.stop(signal.SIGKILL)
        rotating.communicate(timeout=120)
        wait_for(lambda: logged(second, "rotation_settled", outcome="rolled_back"), timeout=120)
        last = history(second, "flight")[-1]
        assert (last["outcome"], last["gateway_id"]) == ("rolled_back", gateway_id(first))
        assert stored_password(second, "flight") == before
        assert signs_in(pg, role, before)
    finally:
        if rotating is not None and rotating.poll() is None:
            rotating.kill()
            rotating.communicate()
        first.close()
        second.close()
