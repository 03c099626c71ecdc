"""A database role per grant, with the real daemon, CLI and PostgreSQL 15.

Each test makes its own template role (what a person may do) and rotation role
(CREATEROLE), never touching the fixture's. A grant of an ephemeral account
signs in upstream as ``pam_<user>_<grant id>``, which the server shows in
``pg_stat_activity``; after the grant, what that role made is handed to the
configured owner and the role is gone. A daemon killed during a grant leaves a
role that the janitor removes once the daemon is back; many grants in a row
leave ``pg_authid`` as it was.
"""

from __future__ import annotations

import re
import signal

import psycopg
import pytest
from conftest import APP_DATABASE
from ephemeral_setup import (
    RESOURCE,
    add_ephemeral,
    make_rotator,
    make_template,
    prepared,
    role_exists,
    set_rotation,
)
from harness import Gateway, assert_one_error_line, unique, wait_for

from gateway.testing.pgcluster import TempCluster
from gateway.testing.pgconf import sql_ident, sql_literal

MARKER = "pam_managed"


# --- helpers ------------------------------------------------------------------------------


def authid_count(pg: TempCluster) -> int:
    return int(pg.admin_sql("SELECT count(*) FROM pg_authid"))


def admin_name(gateway: Gateway) -> str:
    return str(gateway.cli_json("whoami")["name"])


def expected_role(gateway: Gateway, session_prefix: str) -> str:
    user = re.sub(r"[^a-z0-9_]+", "_", admin_name(gateway).lower()).strip("_")
    return f"pam_{user}_{session_prefix}"


# --- tests ----------------------------------------------------------------------------------


def test_a_grant_signs_in_as_its_own_role_which_is_gone_after_it(
    gateway: Gateway, pg: TempCluster
) -> None:
    owner = unique("app_owner")
    pg.admin_sql(f"CREATE ROLE {sql_ident(owner)} NOLOGIN")
    template, _ = prepared(gateway, pg, owner=owner)
    table = unique("made_during_grant")
    log_from = pg.log_size()
    with pg.server_settings(log_statement="all", log_connections="on"):
        access = gateway.access(account="eph").wait_ready()
        role = access.user
        assert role == expected_role(gateway, access.session_prefix)
        # The role exists before the first connection, a member of the template
        # and of the marker, able to log in until shortly after the grant's end.
        members = pg.admin_sql(
            "SELECT string_agg(g.rolname, ',' ORDER BY g.rolname) FROM pg_auth_members m"
            " JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member"
            f" WHERE r.rolname = {sql_literal(role)}"
        )
        assert members.split(",") == sorted([template, MARKER])
        assert (
            pg.admin_sql(
                f"SELECT rolcanlogin, rolvaliduntil IS NOT NULL FROM pg_roles"
                f" WHERE rolname = {sql_literal(role)}"
            )
            == "t|t"
        )
        with psycopg.connect(access.dsn(application_name="through-pam"), autocommit=True) as conn:
            assert conn.execute("select current_user, session_user").fetchone() == (role, role)
            pid = conn.info.backend_pid
            # The server sees the person: pg_stat_activity, read as its superuser.
            seen = pg.admin_sql(
                f"SELECT usename, application_name FROM pg_stat_activity WHERE pid = {pid}"
            )
            assert seen == f"{role}|through-pam"
            conn.execute(f"CREATE TABLE {sql_ident(table)} (id int)")
            assert (
                pg.admin_sql(
                    f"SELECT tableowner FROM pg_tables WHERE tablename = {sql_literal(table)}",
                    APP_DATABASE,
                )
                == role
            )
        roles = gateway.cli_json("resource", "roles", RESOURCE)
        assert [(r["role"], r["session_ended_at"]) for r in roles] == [(role, None)]
        access.stop()
        wait_for(lambda: not role_exists(pg, role))
        server_log = pg.read_log(log_from)

    # What the grant's role made now belongs to the owner named by --reassign-to.
    assert (
        pg.admin_sql(
            f"SELECT tableowner FROM pg_tables WHERE tablename = {sql_literal(table)}", APP_DATABASE
        )
        == owner
    )
    assert gateway.cli_json("resource", "roles", RESOURCE) == []
    assert re.search(rf"reassign to\s+{owner}\n", gateway.cli("resource", "show", RESOURCE).stdout)
    # The server saw the role made with a SCRAM secret, and never a password.
    assert f"connection authorized: user={role} database={APP_DATABASE}" in server_log
    assert f'CREATE ROLE "{role}" LOGIN PASSWORD \'SCRAM-SHA-256$4096:' in server_log
    passwords = re.findall(r"PASSWORD '([^']*)'", server_log)
    assert passwords and all(p.startswith("SCRAM-SHA-256$4096:") for p in passwords)
    for step in ("NOLOGIN PASSWORD NULL", "REASSIGN OWNED BY", "DROP OWNED BY", "DROP ROLE"):
        assert step in server_log

    def role_events() -> list[str]:
        return [
            e["event"]
            for e in gateway.log_events()
            if str(e.get("event", "")).startswith("grant_role")
        ]

    wait_for(lambda: "grant_role_dropped" in role_events())
    assert role_events() == ["grant_role_created", "grant_role_disabled", "grant_role_dropped"]
    assert "PASSWORD" not in gateway.log()
    pg.admin_sql(f"DROP TABLE {sql_ident(table)}", APP_DATABASE)


def test_adding_an_ephemeral_account_checks_what_its_grants_will_need(
    gateway: Gateway, pg: TempCluster
) -> None:
    template = make_template(pg)
    line = assert_one_error_line(add_ephemeral(gateway, "eph", template))
    assert "resource prod has no rotation role" in line and "set-rotation" in line
    line = assert_one_error_line(gateway.cli("account", "add", RESOURCE, "x", check=False), 2)
    assert "--username is required (or --ephemeral --template ROLE)" in line

    weak = make_rotator(pg, createrole=False)
    assert set_rotation(gateway, weak).returncode == 0
    line = assert_one_error_line(add_ephemeral(gateway, "eph", template))
    assert f"the rotation role '{weak[0]}' could not make a role in '{template}'" in line
    assert "CREATEROLE" in line

    assert set_rotation(gateway, make_rotator(pg)).returncode == 0
    line = assert_one_error_line(add_ephemeral(gateway, "eph", "no_such_template"))
    assert "the template role 'no_such_template' does not exist on prod" in line
    line = assert_one_error_line(add_ephemeral(gateway, "eph", template, "--username", "x"), code=2)
    assert "--ephemeral takes no --username" in line
    assert [a["name"] for a in gateway.cli_json("account", "list")].count("eph") == 0

    added = add_ephemeral(gateway, "eph", template, "--cleanup-after", "1d")
    assert added.returncode == 0, added.stderr
    assert f"a member of {template}, dropped 1d after the grant" in added.stdout
    [row] = [a for a in gateway.cli_json("account", "list") if a["name"] == "eph"]
    assert (row["template_role"], row["cleanup_after_seconds"]) == (template, 86400)
    assert "ephemeral" in gateway.cli("account", "list").stdout
    assert (
        f"eph (a role per grant, in {template})" in gateway.cli("resource", "show", RESOURCE).stdout
    )
    [verified] = gateway.cli_json("resource", "verify", RESOURCE, "--account", "eph")
    assert verified["ok"] is True
    refused = gateway.cli(
        "account", "rotate", RESOURCE, "eph", "--password-stdin", input="x\n", check=False
    )
    assert "is ephemeral" in assert_one_error_line(refused)
    # --reassign-to names a role the rotation role can give to, or is refused.
    nobody = unique("nobody")
    line = assert_one_error_line(set_rotation(gateway, make_rotator(pg), "--reassign-to", nobody))
    assert f"role '{nobody}' does not exist on prod" in line


def test_expiry_and_a_shutdown_end_a_grant_s_role_too(gateway: Gateway, pg: TempCluster) -> None:
    prepared(gateway, pg)
    expiring = gateway.access(account="eph", duration="3s").wait_ready()
    with gateway.api() as api:
        live = api.open_access(resource=RESOURCE, account="eph", duration_seconds=600, port=None)
        assert role_exists(pg, expiring.user) and role_exists(pg, live["username"])
        wait_for(lambda: not role_exists(pg, expiring.user))
        ended = [s for s in api.list_sessions() if s["username"] == expiring.user]
        assert [s["end_reason"] for s in ended] == ["expired"]
        assert role_exists(pg, live["username"])
    expiring.stop()
    # A shutdown ends the live grant and drops its role before the daemon exits.
    assert gateway.stop() == 0
    assert not role_exists(pg, live["username"])
    gateway.start()
    assert gateway.cli_json("resource", "roles", RESOURCE) == []


def test_a_role_a_killed_daemon_left_is_removed_by_the_janitor_after_restart(
    gateway: Gateway, pg: TempCluster
) -> None:
    _, rotator = prepared(gateway, pg)
    table = unique("left_by_crash")
    access = gateway.access(account="eph").wait_ready()
    role = access.user
    conn = psycopg.connect(access.dsn(), autocommit=True)
    conn.execute(f"CREATE TABLE {sql_ident(table)} (id int)")

    assert gateway.stop(signal.SIGKILL) == -signal.SIGKILL
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    access.stop(signal.SIGKILL)
    # Nobody dropped it: the role is still there, and could still log in.
    assert role_exists(pg, role)
    assert (
        pg.admin_sql(f"SELECT rolcanlogin FROM pg_roles WHERE rolname = {sql_literal(role)}") == "t"
    )

    gateway.start()
    wait_for(lambda: not role_exists(pg, role))
    assert (
        pg.admin_sql(
            f"SELECT tableowner FROM pg_tables WHERE tablename = {sql_literal(table)}", APP_DATABASE
        )
        == rotator
    )
    assert gateway.cli_json("resource", "roles", RESOURCE) == []
    pg.admin_sql(f"DROP TABLE {sql_ident(table)}", APP_DATABASE)


def test_a_grant_whose_role_cannot_be_made_is_refused_and_never_opens(
    gateway: Gateway, pg: TempCluster
) -> None:
    _, rotator = prepared(gateway, pg)
    pg.admin_sql(f"ALTER ROLE {sql_ident(rotator)} NOCREATEROLE")
    access = gateway.access(account="eph")
    assert access.wait(60) == 1
    [line] = access.stderr.text().splitlines()
    assert line.startswith("error: could not make this grant's role on prod: could not create")
    assert "permission denied to create role (42501)" in line
    [session] = gateway.cli_json("sessions", "list")[:1]
    assert (session["account_name"], session["end_reason"]) == ("eph", "error")
    assert "the grant could not be prepared" in session["end_detail"]
    assert session["listen_port"] is None
    # What was recorded before the CREATE ROLE is settled: there was no role.
    wait_for(lambda: gateway.cli_json("resource", "roles", RESOURCE) == [], timeout=60)
    assert not role_exists(pg, session["username"])
    wait_for(lambda: any(e.get("event") == "grant_role_gone" for e in gateway.log_events()))


def run_grants(gateway: Gateway, pg: TempCluster, count: int) -> None:
    """*count* grants in a row through the API, each opened and ended; every
    fifth connects. Then no role is left and pg_authid is as it was."""
    marker_before = role_exists(pg, MARKER)
    before = authid_count(pg)
    prepared(gateway, pg)
    before += 2  # the template and the rotation role this test made
    names: set[str] = set()
    with gateway.api() as api:
        for i in range(count):
            grant = api.open_access(
                resource=RESOURCE, account="eph", duration_seconds=600, port=None
            )
            names.add(grant["username"])
            if i % 5 == 0:
                dsn = (
                    f"host=127.0.0.1 port={grant['listen_port']} user={grant['username']}"
                    f" dbname={APP_DATABASE} sslmode=disable"
                )
                with psycopg.connect(dsn, autocommit=True) as conn:
                    assert conn.execute("select current_user").fetchone() == (grant["username"],)
            api.end_access(grant["id"])
        wait_for(lambda: api.grant_roles(RESOURCE) == [], timeout=120)
    assert len(names) == count
    left = pg.admin_sql(
        "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'pam\\_%' AND rolname <> 'pam_managed'"
        f" AND rolname = ANY (ARRAY[{', '.join(sql_literal(n) for n in sorted(names))}])"
    )
    assert left == "0"
    assert authid_count(pg) == before + (0 if marker_before else 1)


@pytest.mark.timeout(600)
def test_two_hundred_grants_in_a_row_leave_pg_authid_as_it_was(
    gateway: Gateway, pg: TempCluster
) -> None:
    run_grants(gateway, pg, 200)
