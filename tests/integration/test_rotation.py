"""Credential rotation against a real PostgreSQL 15 and the real daemon.

Each test makes roles of its own (never the fixture's). The generated password
is read back the way someone holding the gateway host could (the master key
and the store), only to prove that it works upstream and appears nowhere else:
not in the server log (``log_statement = 'all'``), the daemon's log or the CLI's
output. Crash safety: the daemon is made to exit (``PAM_TEST_ROTATION_EXIT_AT``)
between each step, then the real daemon starts again and settles the rotation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import string
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import (
    Gateway,
    assert_one_error_line,
    unique,
    wait_for,
)

from gateway.app.daemon import (
    ROTATION_EXIT_ENV,
    ROTATION_EXIT_STATUS,
    ROTATION_PAUSE_ENV,
    ROTATION_RESUME_FILE,
)
from gateway.config import MASTER_KEY_FILE, load_settings, store_url
from gateway.credentials.secretbox import SecretBox, load_master_key
from gateway.store import Store
from gateway.testing.pgcluster import TempCluster
from gateway.testing.pgconf import sql_ident, sql_literal

RESOURCE = "prod"
#: the default alphabet and length of generated passwords
ALPHABET = frozenset(string.ascii_letters + string.digits)
LENGTH = 32


# --- helpers ------------------------------------------------------------------------------


def make_role(
    pg: TempCluster,
    prefix: str,
    *,
    login: bool = True,
    createrole: bool = False,
) -> tuple[str, str]:
    """A new role of this test's (name, password), allowed into the app database."""
    name, password = unique(prefix), "typed-" + os.urandom(9).hex()
    options = ("LOGIN" if login else "NOLOGIN") + (" CREATEROLE" if createrole else "")
    pg.admin_sql(
        f"CREATE ROLE {sql_ident(name)} {options} PASSWORD {sql_literal(password)};\n"
        f"GRANT CONNECT ON DATABASE {APP_DATABASE} TO {sql_ident(name)};",
        redact=[password],
    )
    return name, password


def signs_in(pg: TempCluster, role: str, password: str) -> bool:
    """Whether *role* signs in to PostgreSQL directly (not through pam) with *password*."""
    try:
        psycopg.connect(pg.dsn(role, password, APP_DATABASE), connect_timeout=30).close()
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc) or "not permitted" in str(exc), exc
        return False
    return True


def stored(gateway: Gateway, account: str) -> tuple[str, str | None]:
    """The account's stored and pending passwords, opened as someone with the
    gateway host's master key and store could."""
    box = SecretBox(load_master_key(gateway.home / MASTER_KEY_FILE))
    with Store.open(store_url(gateway.home, load_settings(gateway.home)), box) as store:
        return (
            store.reveal_password(RESOURCE, account),
            store.reveal_pending_password(RESOURCE, account),
        )


def add_account(gateway: Gateway, account: str, role: str, password: str, *flags: str) -> Any:
    return gateway.cli(
        "account",
        "add",
        RESOURCE,
        account,
        "--username",
        role,
        "--password-stdin",
        *flags,
        input=password + "\n",
        check=False,
    )


def account_row(gateway: Gateway, account: str) -> dict[str, Any]:
    [row] = [a for a in gateway.cli_json("account", "list") if a["name"] == account]
    return dict(row)


def history(gateway: Gateway, account: str) -> list[dict[str, Any]]:
    return list(gateway.cli_json("account", "rotations", RESOURCE, account))


def set_rotation_role(gateway: Gateway, role: str, password: str) -> None:
    gateway.cli(
        "resource",
        "set-rotation",
        RESOURCE,
        "--username",
        role,
        "--password-stdin",
        input=password + "\n",
    )


def assert_generated(password: str) -> None:
    assert len(password) == LENGTH and set(password) <= ALPHABET


def assert_nowhere(gateway: Gateway, *secrets: str) -> None:
    """None of *secrets* in anything a daemon or CLI of this test printed."""
    text = gateway.transcript.text() + gateway.log().encode()
    for secret in secrets:
        assert secret.encode() not in text


@pytest.fixture
def admin_name(gateway: Gateway) -> str:
    return str(gateway.cli_json("whoami")["name"])


# --- rotation -----------------------------------------------------------------------------


def test_an_account_rotates_itself_and_nobody_sees_the_new_password(
    gateway: Gateway, pg: TempCluster, admin_name: str
) -> None:
    role, typed = make_role(pg, "rot_self")
    assert add_account(gateway, "selfrot", role, typed).returncode == 0

    result = gateway.cli("account", "rotate", RESOURCE, "selfrot", "--now")
    assert "rotated (by self)" in result.stdout

    new, pending = stored(gateway, "selfrot")
    assert pending is None
    assert_generated(new)
    assert signs_in(pg, role, new)
    assert not signs_in(pg, role, typed)
    row = account_row(gateway, "selfrot")
    assert (row["last_rotation_outcome"], row["rotation_pending"], row["managed"]) == (
        "rotated",
        False,
        False,
    )
    [last] = history(gateway, "selfrot")
    assert (last["outcome"], last["method"], last["via"], last["started_by"], last["ok"]) == (
        "rotated",
        "generated",
        "self",
        admin_name,
        True,
    )
    table = gateway.cli("account", "list").stdout
    assert "selfrot" in table and "rotated" in table
    # Through the gateway, with the password nobody typed.
    access = gateway.access(account="selfrot").wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (role,)
    access.stop()
    assert_nowhere(gateway, new)


def test_a_rotation_role_rotates_and_the_server_log_never_holds_a_password(
    gateway: Gateway, pg: TempCluster
) -> None:
    role, typed = make_role(pg, "rot_by_role")
    weak, weak_password = make_role(pg, "rotator_weak")
    rotator, rotator_password = make_role(pg, "rotator", createrole=True)
    assert add_account(gateway, "byrole", role, typed).returncode == 0
    log_from = pg.log_size()
    with pg.server_settings(
        log_statement="all", log_min_error_statement="info", log_connections="on"
    ):
        # A rotation role without CREATEROLE: refused by the server, nothing changes.
        set_rotation_role(gateway, weak, weak_password)
        failed = gateway.cli("account", "rotate", RESOURCE, "byrole", "--now", check=False)
        line = assert_one_error_line(failed)
        assert "rotation of prod/byrole failed: ALTER ROLE was refused" in line
        assert "CREATEROLE" in line  # the hint
        assert stored(gateway, "byrole") == (typed, None)
        assert signs_in(pg, role, typed)

        set_rotation_role(gateway, rotator, rotator_password)
        assert (
            "rotated (by rotator)"
            in gateway.cli("account", "rotate", RESOURCE, "byrole", "--now").stdout
        )
        new, _ = stored(gateway, "byrole")
        assert signs_in(pg, role, new) and not signs_in(pg, role, typed)
        # The role rotates it again, from the new password.
        gateway.cli("account", "rotate", RESOURCE, "byrole", "--now")
        newer, _ = stored(gateway, "byrole")
        assert newer != new and signs_in(pg, role, newer)
        server_log = pg.read_log(log_from)

    # The server logged every statement, the refused one with its error, and
    # saw only SCRAM secrets.
    alter = f'ALTER ROLE "{role}" PASSWORD \'SCRAM-SHA-256$4096:'
    assert server_log.count(f"statement: {alter}") == 3
    assert server_log.count(f"STATEMENT:  {alter}") == 1  # the refused one, with its error
    assert "permission denied" in server_log or "must have CREATEROLE" in server_log
    assert f"connection authorized: user={rotator}" in server_log
    for secret in (typed, new, newer, rotator_password, weak_password):
        assert secret not in server_log
    assert_nowhere(gateway, new, newer)
    outcomes = [(r["outcome"], r["via"]) for r in history(gateway, "byrole")]
    assert outcomes == [("rotated", "rotator"), ("rotated", "rotator"), ("failed", "rotator")]


def test_a_rotation_role_is_checked_before_it_is_stored_and_shown_by_name(
    gateway: Gateway, pg: TempCluster
) -> None:
    rotator, rotator_password = make_role(pg, "rotator", createrole=True)
    wrong = "wrong-" + os.urandom(6).hex()
    args = ["resource", "set-rotation", RESOURCE, "--username", rotator, "--password-stdin"]
    refused = gateway.cli(*args, input=wrong + "\n", check=False)
    line = assert_one_error_line(refused)
    assert f"prod refused the password of user '{rotator}' (28P01); nothing was stored" in line
    assert gateway.cli_json("resource", "show", RESOURCE)["rotation_username"] is None

    gateway.cli(*args, input=rotator_password + "\n")
    assert gateway.cli_json("resource", "show", RESOURCE)["rotation_username"] == rotator
    assert f"rotation role  {rotator}" in gateway.cli("resource", "show", RESOURCE).stdout
    gateway.cli("resource", "clear-rotation", RESOURCE)
    assert gateway.cli_json("resource", "show", RESOURCE)["rotation_username"] is None
    assert_nowhere(gateway, wrong, rotator_password)


def test_a_new_password_that_does_not_sign_in_is_rolled_back(
    gateway: Gateway, pg: TempCluster
) -> None:
    # NOLOGIN: the rotation role can change the password, but nobody can sign in with it.
    role, typed = make_role(pg, "rot_nologin", login=False)
    rotator, rotator_password = make_role(pg, "rotator", createrole=True)
    set_rotation_role(gateway, rotator, rotator_password)
    assert add_account(gateway, "nologin", role, typed, "--no-verify").returncode == 0

    failed = gateway.cli("account", "rotate", RESOURCE, "nologin", "--now", check=False)
    line = assert_one_error_line(failed)
    assert "rolled_back" in line and "not permitted to log in" in line
    assert "the previous password was set again" in line
    assert stored(gateway, "nologin") == (typed, None)
    row = account_row(gateway, "nologin")
    assert (row["last_rotation_outcome"], row["rotation_pending"]) == ("rolled_back", False)

    # The previous password's secret is back upstream: once the role may log
    # in, the stored password works.
    pg.admin_sql(f"ALTER ROLE {sql_ident(role)} LOGIN")
    assert signs_in(pg, role, typed)
    assert gateway.cli_json("resource", "verify", RESOURCE, "--account", "nologin")[0]["ok"]


def test_live_sessions_survive_a_rotation_and_new_ones_use_the_new_password(
    gateway: Gateway, pg: TempCluster
) -> None:
    role, typed = make_role(pg, "rot_live")
    assert add_account(gateway, "live", role, typed).returncode == 0
    access = gateway.access(account="live").wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as live:
        backend = live.info.backend_pid
        assert live.execute("select 1").fetchone() == (1,)
        gateway.cli("account", "rotate", RESOURCE, "live", "--now")
        gateway.cli("account", "rotate", RESOURCE, "live", "--now")
        assert live.execute("select pg_backend_pid(), current_user").fetchone() == (
            backend,
            role,
        )
        with psycopg.connect(access.dsn(), autocommit=True) as fresh:
            assert fresh.execute("select current_user").fetchone() == (role,)
    assert access.proc.poll() is None
    access.stop()
    assert not signs_in(pg, role, typed)


def test_a_connection_during_a_rotation_signs_in_with_whichever_password_is_set(
    gateway: Gateway, pg: TempCluster
) -> None:
    role, typed = make_role(pg, "rot_midway")
    assert add_account(gateway, "midway", role, typed).returncode == 0
    gateway.stop()
    gateway.start(extra_env={ROTATION_PAUSE_ENV: "altered"})
    access = gateway.access(account="midway").wait_ready()
    rotating = subprocess.Popen(
        [sys.executable, "-m", "cli", "account", "rotate", RESOURCE, "midway", "--now"],
        env=gateway.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Paused after the ALTER ROLE: upstream has the new password, the store
        # still the typed one as current.
        wait_for(lambda: any(e.get("event") == "rotation_paused" for e in gateway.log_events()))
        current, pending = stored(gateway, "midway")
        assert current == typed and pending is not None
        assert not signs_in(pg, role, typed) and signs_in(pg, role, pending)
        with psycopg.connect(access.dsn(), autocommit=True) as conn:
            assert conn.execute("select current_user").fetchone() == (role,)
    finally:
        (gateway.home / ROTATION_RESUME_FILE).touch()
        _, err = rotating.communicate(timeout=120)
    assert rotating.returncode == 0, err
    assert stored(gateway, "midway") == (pending, None)
    access.stop()


# --- checked before stored, managed ---------------------------------------------------------


def test_a_password_that_does_not_sign_in_is_refused_unless_no_verify(
    gateway: Gateway, pg: TempCluster
) -> None:
    role, typed = make_role(pg, "rot_checked")
    wrong = "wrong-" + os.urandom(6).hex()
    refused = add_account(gateway, "checked", role, wrong)
    line = assert_one_error_line(refused)
    assert f"prod refused the password of user '{role}' (28P01); nothing was stored" in line
    assert "--no-verify" in line
    assert "checked" not in [a["name"] for a in gateway.cli_json("account", "list")]

    assert add_account(gateway, "checked", role, wrong, "--no-verify").returncode == 0
    assert stored(gateway, "checked") == (wrong, None)

    def rotate(password: str, *flags: str) -> Any:
        return gateway.cli(
            "account",
            "rotate",
            RESOURCE,
            "checked",
            "--password-stdin",
            *flags,
            input=password + "\n",
            check=False,
        )

    other_wrong = "wrong-" + os.urandom(6).hex()
    line = assert_one_error_line(rotate(other_wrong))
    assert "(28P01); nothing was stored" in line
    assert stored(gateway, "checked") == (wrong, None)
    assert rotate(typed).returncode == 0
    assert stored(gateway, "checked") == (typed, None)
    assert rotate(other_wrong, "--no-verify").returncode == 0
    assert stored(gateway, "checked") == (other_wrong, None)
    assert_nowhere(gateway, wrong, other_wrong, typed)


def test_a_managed_account_s_typed_password_stops_working(
    gateway: Gateway, pg: TempCluster
) -> None:
    role, typed = make_role(pg, "rot_managed")
    added = add_account(gateway, "managed", role, typed, "--managed")
    assert added.returncode == 0, added.stderr
    assert "the password you typed no longer works" in added.stdout
    assert not signs_in(pg, role, typed)
    current, pending = stored(gateway, "managed")
    assert pending is None and signs_in(pg, role, current)
    assert_generated(current)
    row = account_row(gateway, "managed")
    assert (row["managed"], row["last_rotation_outcome"]) == (True, "rotated")
    # Nobody may make a managed account's password known again by typing one.
    refused = gateway.cli(
        "account",
        "rotate",
        RESOURCE,
        "managed",
        "--password-stdin",
        input=typed + "\n",
        check=False,
    )
    assert "is managed" in assert_one_error_line(refused)
    assert stored(gateway, "managed") == (current, None)
    assert_nowhere(gateway, current)


# --- crash safety ----------------------------------------------------------------------------


def crash_at(gateway: Gateway, step: str, account: str) -> None:
    """Run ``pam account rotate --now`` with a daemon that exits at *step* (in
    a process group of its own, so that its audit writer goes with it)."""
    gateway.stop()
    gateway.start(own_process_group=True, extra_env={ROTATION_EXIT_ENV: step})
    assert gateway.proc is not None
    cut = gateway.cli("account", "rotate", RESOURCE, account, "--now", check=False)
    assert cut.returncode != 0
    assert gateway.proc.wait(60) == ROTATION_EXIT_STATUS
    # What the daemon left behind (its audit writer) goes with it, as with -9.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(gateway.proc.pid, signal.SIGKILL)
    gateway.stop()


def settled(gateway: Gateway, account: str) -> dict[str, Any] | None:
    row = account_row(gateway, account)
    return None if row["rotation_pending"] else row


@pytest.mark.parametrize(
    ("step", "outcome"),
    [("pending_stored", "rolled_back"), ("altered", "rotated"), ("verified", "rotated")],
)
def test_a_daemon_killed_mid_rotation_settles_it_when_it_starts_again(
    gateway: Gateway, pg: TempCluster, step: str, outcome: str
) -> None:
    role, typed = make_role(pg, "rot_crash")
    assert add_account(gateway, "crash", role, typed).returncode == 0

    crash_at(gateway, step, "crash")
    current, pending = stored(gateway, "crash")
    assert current == typed and pending is not None  # the daemon died mid-rotation
    assert signs_in(pg, role, pending) is (step != "pending_stored")

    gateway.start(own_process_group=True)
    row = wait_for(lambda: settled(gateway, "crash"))
    assert row["last_rotation_outcome"] == outcome
    current, left = stored(gateway, "crash")
    assert left is None
    assert current == (typed if outcome == "rolled_back" else pending)
    assert signs_in(pg, role, current)
    assert gateway.cli_json("resource", "verify", RESOURCE, "--account", "crash")[0]["ok"]
    [last, *_] = history(gateway, "crash")
    assert last["detail"] and "interrupt" in last["detail"]
    # Rotating works again once settled.
    gateway.cli("account", "rotate", RESOURCE, "crash", "--now")
    assert signs_in(pg, role, stored(gateway, "crash")[0])


def test_a_daemon_killed_after_a_rollback_s_alter_role_settles_it_when_it_starts_again(
    gateway: Gateway, pg: TempCluster
) -> None:
    role, typed = make_role(pg, "rot_crash_back", login=False)
    rotator, rotator_password = make_role(pg, "rotator", createrole=True)
    set_rotation_role(gateway, rotator, rotator_password)
    assert add_account(gateway, "back", role, typed, "--no-verify").returncode == 0

    crash_at(gateway, "restored", "back")
    assert stored(gateway, "back")[1] is not None
    pg.admin_sql(f"ALTER ROLE {sql_ident(role)} LOGIN")

    gateway.start(own_process_group=True)
    row = wait_for(lambda: settled(gateway, "back"))
    assert row["last_rotation_outcome"] == "rolled_back"
    assert stored(gateway, "back") == (typed, None)
    assert signs_in(pg, role, typed)
