"""The statement audit trail end to end: real clients through `pam db access`.

Each test drives a real daemon and real `pam` CLI processes in front of the
session's PostgreSQL 15, runs real clients (psql, psycopg 3, asyncpg) and reads
the trail back the way a reviewer does: `pam sessions show --all --json`,
`pam audit verify`, or the control API where that is simpler. Assertions are
exact: which statements, in which order, with which tags, rows, parameters and
outcomes. The hash-chain and fail-closed tests edit the daemon's SQLite store by
hand (dropping the append-only triggers first), as an attacker or a full disk
would.

Tables and roles get unique names: ``pg`` is shared by the whole test session.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_DATABASE
from harness import (
    Gateway,
    RawClient,
    audit_sink_pid,
    connect_error,
    edit_store,
    error_fields,
    psql,
    store_path,
    unique,
    wait_for,
)
from sqlalchemy import create_engine
from trail_support import delete_record, edit_record

from gateway.protocol.messages import encode_message
from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

#: Bound on every wait for the server or the gateway; none of them is a timing check.
WAIT_SECONDS = 30.0
SCRAM_PASSWORD = "s3cret-scram-Pw!"


# --- helpers ---------------------------------------------------------------------------


def statements(gateway: Gateway, session: str) -> list[dict[str, Any]]:
    """Every statement record of a session, as `pam sessions show --all --json` gives them."""
    records: list[dict[str, Any]] = gateway.cli_json("sessions", "show", session, "--all")[
        "statements"
    ]
    assert [r["kind"] for r in records] == ["statement"] * len(records)
    return records


def trail(gateway: Gateway, session: str) -> list[dict[str, Any]]:
    """Every record of a session (all kinds), through the control API."""
    with gateway.api() as client:
        records: list[dict[str, Any]] = client.get(f"/v1/sessions/{session}/audit", limit=10_000)
    return records


def outcome(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        record["protocol"],
        record["sql"],
        record["command_tag"],
        record["rows"],
        record["status"],
        record["sqlstate"],
        record["error_message"],
    )


def parameters(record: Mapping[str, Any]) -> list[tuple[int, str | None]]:
    return [(p["index"], p["value"]) for p in record["parameters"]]


@pytest.fixture
def configured_gateway(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    """Starts a daemon whose ``gateway.json`` has the given settings, with the same
    resource ``prod`` and accounts as the ``gateway`` fixture."""
    started: list[Gateway] = []

    def start(own_process_group: bool = False, **settings: Any) -> Gateway:
        gw = Gateway(tmp_path / f"gw{len(started)}")
        started.append(gw)
        gw.init()
        path = gw.home / "gateway.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
        gw.start(own_process_group=own_process_group)
        gw.cli(
            "resource",
            "add",
            "prod",
            "--host",
            pg.host,
            "--port",
            str(pg.port),
            "--database",
            APP_DATABASE,
            "--ssl-mode",
            "verify-full",
            "--ca-cert",
            str(pg.ca_cert_path),
        )
        for key, role in pg_roles.items():
            gw.cli(
                "account",
                "add",
                "prod",
                key,
                "--username",
                role.name,
                "--password-stdin",
                input=role.password + "\n",
            )
        return gw

    yield start
    for gw in started:
        gw.close()


# --- what is recorded --------------------------------------------------------------------


def test_psql_statements_are_recorded_in_order_with_tags_rows_and_the_error(
    gateway: Gateway,
) -> None:
    table = unique("audit_simple")
    access = gateway.access().wait_ready()
    result = psql(
        access,
        f"create table {table} (id int primary key, name text)",
        f"insert into {table} values (1, 'one'), (2, 'two'), (3, 'three')",
        f"select name from {table} order by id",
        f"select * from {table}_missing",
        "select 1/0",
    )
    assert result.stdout.splitlines() == ["CREATE TABLE", "INSERT 0 3", "one", "two", "three"]

    create = f"create table {table} (id int primary key, name text)"
    insert = f"insert into {table} values (1, 'one'), (2, 'two'), (3, 'three')"
    select = f"select name from {table} order by id"
    missing = f"select * from {table}_missing"
    records = statements(gateway, access.session_prefix)
    assert [outcome(r) for r in records] == [
        ("simple", create, "CREATE TABLE", None, "ok", None, None),
        ("simple", insert, "INSERT 0 3", 3, "ok", None, None),
        ("simple", select, "SELECT 3", 3, "ok", None, None),
        (
            "simple",
            missing,
            None,
            None,
            "error",
            "42P01",
            f'relation "{table}_missing" does not exist',
        ),
        ("simple", "select 1/0", None, None, "error", "22012", "division by zero"),
    ]
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert len({r["connection_id"] for r in records}) == 1
    assert all(r["duration_ms"] >= 0 and r["parameters"] is None for r in records)


def test_each_execution_of_a_prepared_statement_is_recorded_with_its_own_parameters(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    twelve = ", ".join(f"%s::text as c{n}" for n in range(1, 13))
    values = tuple(f"value-{n}" for n in range(1, 13))
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        for n in range(1, 6):
            row = conn.execute(
                "select %s::text || '-' || %s::text", (f"run{n}", f"p{n * 11}"), prepare=True
            ).fetchone()
            assert row == (f"run{n}-p{n * 11}",)
        assert conn.execute(f"select {twelve}", values).fetchone() == values

    records = statements(gateway, access.session_prefix)
    runs, wide = records[:5], records[5:]
    assert [(r["protocol"], r["sql"], r["command_tag"], r["rows"], r["status"]) for r in runs] == [
        ("extended", "select $1::text || '-' || $2::text", "SELECT 1", 1, "ok")
    ] * 5
    assert [parameters(r) for r in runs] == [
        [(1, f"run{n}"), (2, f"p{n * 11}")] for n in range(1, 6)
    ]
    # Prepared once, executed five times: one statement name for every run.
    assert len({r["statement_name"] for r in runs}) == 1 and runs[0]["statement_name"]

    [record] = wide
    assert record["sql"] == "select " + ", ".join(f"${n}::text as c{n}" for n in range(1, 13))
    assert parameters(record) == [(n, f"value-{n}") for n in range(1, 13)]
    # $10..$12 are parameters 10..12, not $1 followed by a digit; and nothing is
    # interpolated into the SQL text.
    assert parameters(record)[9:] == [(10, "value-10"), (11, "value-11"), (12, "value-12")]
    assert "value-" not in record["sql"]


def test_a_pipeline_with_an_error_in_the_middle_records_the_skipped_statements(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute("select %t::int as first", (1,))
            conn.execute("select %t::int as second", (2,))
            conn.execute("select 1 / %t::int as third", (0,))
            conn.execute("select %t::int as fourth", (4,))
            conn.execute("select %t::int as fifth", (5,))
            conn.execute("select %t::int as sixth", (6,))
        assert conn.execute("select 'after'").fetchone() == ("after",)

    records = statements(gateway, access.session_prefix)
    outcomes = [(r["sql"], r["status"], r["sqlstate"]) for r in records]
    assert outcomes[:3] == [
        ("select $1::int as first", "ok", None),
        ("select $1::int as second", "ok", None),
        ("select 1 / $1::int as third", "error", "22012"),
    ]
    assert outcomes[-1] == ("select 'after'", "ok", None)
    # psycopg stops sending once it has read the error, so how many of the last
    # three reached the server depends on timing; each one that did is skipped.
    skipped = outcomes[3:-1]
    expected_skipped = [
        ("select $1::int as fourth", "skipped", None),
        ("select $1::int as fifth", "skipped", None),
        ("select $1::int as sixth", "skipped", None),
    ]
    assert skipped == expected_skipped[: len(skipped)]
    assert [parameters(r) for r in records[:-1]] == [
        [(1, "1")],
        [(1, "2")],
        [(1, "0")],
        [(1, "4")],
        [(1, "5")],
        [(1, "6")],
    ][: len(records) - 1]
    assert records[2]["error_message"] == "division by zero"

    # The same pipeline in one write: every statement passes the gateway before
    # the error comes back, so all three after it must be recorded as skipped.
    with RawClient(access.port) as client:
        client.startup(access.user, access.database)
        client.send(
            b"".join(
                encode_message(ord("P"), f"\0{sql}\0".encode() + struct.pack("!h", 0))
                + encode_message(ord("B"), b"\0\0" + struct.pack("!hhI", 0, 1, 1) + value + b"\0\0")
                + encode_message(ord("E"), b"\0" + struct.pack("!i", 0))
                for sql, value in [
                    ("select $1::int as first", b"1"),
                    ("select $1::int as second", b"2"),
                    ("select 1 / $1::int as third", b"0"),
                    ("select $1::int as fourth", b"4"),
                    ("select $1::int as fifth", b"5"),
                    ("select $1::int as sixth", b"6"),
                ]
            )
            + encode_message(ord("S"), b"")
        )
        replies = client.read_until(b"Z")
        [error] = [m for m in replies if m.type == ord("E")]
        assert error_fields(error)["C"] == "22012"
    one_write = statements(gateway, access.session_prefix)[len(records) :]
    assert [(r["sql"], r["status"], r["sqlstate"]) for r in one_write] == [
        ("select $1::int as first", "ok", None),
        ("select $1::int as second", "ok", None),
        ("select 1 / $1::int as third", "error", "22012"),
        ("select $1::int as fourth", "skipped", None),
        ("select $1::int as fifth", "skipped", None),
        ("select $1::int as sixth", "skipped", None),
    ]
    assert [parameters(r) for r in one_write] == [[(1, value)] for value in "120456"]
    [connection] = {r["connection_id"] for r in one_write}
    assert connection != records[0]["connection_id"]


def test_copy_in_and_out_record_rows_and_the_exact_bytes_copied(gateway: Gateway) -> None:
    table = unique("audit_copy")
    sent = b"".join(f"{n}\tname number {n}\n".encode() for n in range(1, 1001))
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (id int, name text)")
        with conn.cursor() as cur:
            with cur.copy(f"copy {table} (id, name) from stdin") as copy:
                for start in range(0, len(sent), 4096):
                    copy.write(sent[start : start + 4096])
            received = bytearray()
            with cur.copy(f"copy {table} (id, name) to stdout") as copy:
                for chunk in copy:
                    received += chunk
    assert bytes(received) == sent

    copy_in, copy_out = statements(gateway, access.session_prefix)[1:]
    assert (copy_in["command_tag"], copy_in["rows"], copy_in["status"]) == ("COPY 1000", 1000, "ok")
    assert (copy_in["copy_direction"], copy_in["copy_bytes"]) == ("in", len(sent))
    assert (copy_out["command_tag"], copy_out["rows"], copy_out["status"]) == (
        "COPY 1000",
        1000,
        "ok",
    )
    assert (copy_out["copy_direction"], copy_out["copy_bytes"]) == ("out", len(received))


def test_a_cancelled_statement_is_recorded_as_cancelled(gateway: Gateway, pg: TempCluster) -> None:
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as sleeper:
        pid = sleeper.info.backend_pid
        failures: list[BaseException] = []

        def sleep() -> None:
            try:
                sleeper.execute("select pg_sleep(60)")
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=sleep, name="pg-sleep")
        thread.start()
        try:
            wait_for(
                lambda: (
                    pg.admin_sql(f"select state from pg_stat_activity where pid = {pid}")
                    == "active"
                ),
                timeout=WAIT_SECONDS,
            )
            sleeper.cancel_safe()
        finally:
            thread.join(WAIT_SECONDS * 3)
        assert [type(f) for f in failures] == [psycopg.errors.QueryCanceled]
        assert sleeper.execute("select 'still usable'").fetchone() == ("still usable",)

    records = statements(gateway, access.session_prefix)
    assert [(r["sql"], r["status"], r["sqlstate"]) for r in records] == [
        ("select pg_sleep(60)", "cancelled", "57014"),
        ("select 'still usable'", "ok", None),
    ]
    assert records[0]["error_message"] == "canceling statement due to user request"


# --- what is never recorded ----------------------------------------------------------------


def test_passwords_configured_patterns_and_stored_credentials_never_reach_the_store(
    configured_gateway: Callable[..., Gateway], pg: TempCluster
) -> None:
    gateway = configured_gateway(audit_redact_patterns=[r"card_no\s*=\s*'([0-9]+)'"])
    role = unique("audit_redact_role")
    pg.admin_sql(f"create role {role} nologin")
    role_secret = f"x-secret-{secrets.token_hex(4)}"
    card = "4111111111111111"
    access = gateway.access().wait_ready()
    result = psql(
        access,
        f"ALTER ROLE {role} PASSWORD '{role_secret}'",
        f"select count(*) from (values ('x')) as v (card_no) where card_no = '{card}'",
        f"select '{SCRAM_PASSWORD}' as leaked",
        f"select '{SCRAM_PASSWORD}'::int",
    )
    assert result.stdout.splitlines() == ["0", SCRAM_PASSWORD]
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        # The secret as a bound parameter too, in text and in binary format.
        assert conn.execute("select %t::text", (SCRAM_PASSWORD,)).fetchone() == (SCRAM_PASSWORD,)
        assert conn.execute("select %b::text", (SCRAM_PASSWORD,)).fetchone() == (SCRAM_PASSWORD,)
    access.stop()

    records = statements(gateway, access.session_prefix)
    assert [r["sql"] for r in records] == [
        f"ALTER ROLE {role} PASSWORD '***'",
        "select count(*) from (values ('x')) as v (card_no) where card_no = '***'",
        "select '***' as leaked",
        "select '***'::int",
        "select $1::text",
        "select $1::text",
    ]
    # Not the fixture's superuser: the ALTER is refused, and recorded as refused.
    assert records[0]["status"] == "error"
    assert (records[3]["sqlstate"], records[3]["error_message"]) == (
        "22P02",
        'invalid input syntax for type integer: "***"',
    )
    assert [(p["format"], p["value"]) for r in records[4:] for p in r["parameters"]] == [
        ("text", "***"),
        ("binary", "***"),
    ]

    raw = b"".join(p.read_bytes() for p in gateway.home.glob("pam.db*"))
    encoded = base64.b64encode(SCRAM_PASSWORD.encode()).decode()
    for secret in (role_secret, card, SCRAM_PASSWORD, encoded):
        assert secret.encode() not in raw
        assert secret.encode() not in gateway.transcript.text()


def test_types_only_mode_records_parameter_types_but_no_values(
    configured_gateway: Callable[..., Gateway],
) -> None:
    gateway = configured_gateway(audit_parameters="types")
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute("select %s::text, %s::int, %s::text", ("hidden-text", 42, None))
    [record] = statements(gateway, access.session_prefix)
    assert record["sql"] == "select $1::text, $2::int, $3::text"
    assert [(p["index"], p["format"], p["value"]) for p in record["parameters"]] == [
        (1, "text", None),
        (2, "binary", None),
        (3, "null", None),
    ]
    assert record["parameters"][1]["type_oid"] in (20, 21, 23)
    raw = b"".join(p.read_bytes() for p in gateway.home.glob("pam.db*"))
    assert b"hidden-text" not in raw


# --- integrity ----------------------------------------------------------------------------


def test_audit_verify_names_an_edited_and_a_removed_record(gateway: Gateway) -> None:
    tampered = gateway.access().wait_ready()
    psql(tampered, "select 'one'", "select 'two'", "select 'three'", "select 'four'")
    assert tampered.stop() == 0
    untouched = gateway.access(account="md5").wait_ready()
    psql(untouched, "select 'untouched'")
    assert untouched.stop() == 0

    intact = gateway.cli("audit", "verify", tampered.session_prefix)
    assert intact.stdout.strip() == "audit trail intact: 1 session checked"
    records = trail(gateway, tampered.session_prefix)
    seq = {r["sql"]: r["seq"] for r in records if r["kind"] == "statement"}
    two, four = seq["select 'two'"], seq["select 'four'"]
    session_id = records[0]["session_id"]

    store = create_engine(f"sqlite:///{store_path(gateway)}")
    edit_record(store, session_id, two, sql="select 'TWO'")
    edited = gateway.cli("audit", "verify", tampered.session_prefix, check=False)
    assert edited.returncode == 1
    assert edited.stdout.splitlines() == [
        f"session {session_id} seq {two}: changed:"
        f" seq {two} (statement \"select 'TWO'\") does not match its digest:"
        " it was edited"
    ]
    assert edited.stderr == "error: the audit trail is not intact: 1 problem in 1 session\n"

    delete_record(store, session_id, four)
    store.dispose()
    result = gateway.cli("audit", "verify", tampered.session_prefix, "--json", check=False)
    assert result.returncode == 1
    both = json.loads(result.stdout)
    assert both["ok"] is False
    assert [(p["seq"], p["problem"]) for p in both["problems"]] == [
        (two, "changed"),
        (four, "removed"),
    ]
    everything = gateway.cli("audit", "verify", check=False)
    assert everything.returncode == 1
    # Every session is checked; only the tampered one's two problems are named.
    assert [line.split(":")[:2] for line in everything.stdout.splitlines()] == [
        [f"session {session_id} seq {two}", " changed"],
        [f"session {session_id} seq {four}", " removed"],
    ]
    assert gateway.cli("audit", "verify", untouched.session_prefix).stdout.strip() == (
        "audit trail intact: 1 session checked"
    )


def test_fail_closed_ends_live_connections_and_refuses_new_ones_while_the_trail_is_unwritable(
    configured_gateway: Callable[..., Gateway],
) -> None:
    gateway = configured_gateway(audit_fail_closed=True)
    access = gateway.access().wait_ready()
    conn = psycopg.connect(access.dsn(), autocommit=True)
    assert conn.execute("select 'before-block'").fetchone() == ("before-block",)
    wait_for(
        lambda: any(
            r["sql"] == "select 'before-block'" for r in trail(gateway, access.session_prefix)
        )
    )

    edit_store(
        gateway,
        "create trigger audit_test_block before insert on audit_batches"
        " begin select raise(abort, 'blocked by the test'); end",
    )
    answered: list[str] = []
    failure: list[psycopg.OperationalError] = []

    def probe() -> bool:
        marker = f"select 'while-blocked-{len(answered)}'"
        try:
            conn.execute(marker)
        except psycopg.OperationalError as exc:
            failure.append(exc)
            return True
        answered.append(marker)
        return False

    wait_for(probe, timeout=WAIT_SECONDS)
    assert answered, "the first statement after the block must still run"
    assert failure[0].sqlstate == "57P01", repr(failure[0])
    assert "the audit trail cannot be written" in str(failure[0])
    conn.close()

    refused = connect_error(access.port, access.user, access.database)
    assert (refused.severity, refused.sqlstate) == ("FATAL", "57P03")
    assert refused.message == (
        "pam refuses new connections: the audit trail cannot be written (fail-closed mode)"
    )

    edit_store(gateway, "drop trigger audit_test_block")

    def reconnect() -> psycopg.Connection[Any] | None:
        try:
            return psycopg.connect(access.dsn(), autocommit=True)
        except psycopg.OperationalError:
            return None

    with wait_for(reconnect, timeout=WAIT_SECONDS) as again:
        assert again.execute("select 'after-recovery'").fetchone() == ("after-recovery",)
    access.stop()

    recorded = [r["sql"] for r in trail(gateway, access.session_prefix) if r["kind"] == "statement"]
    assert recorded[0] == "select 'before-block'"
    assert recorded[-1] == "select 'after-recovery'"
    # Nothing the client got an answer for is missing.
    assert [s for s in recorded if s in answered] == answered
    assert gateway.cli("audit", "verify", access.session_prefix).returncode == 0


def test_a_fail_closed_cut_also_stops_a_query_still_running_upstream(
    configured_gateway: Callable[..., Gateway], pg: TempCluster
) -> None:
    gateway = configured_gateway(audit_fail_closed=True)
    access = gateway.access().wait_ready()
    sleeper = psycopg.connect(access.dsn(application_name="sleeper"), autocommit=True)
    pid = sleeper.info.backend_pid
    errors: list[psycopg.Error] = []

    def sleep() -> None:
        try:
            sleeper.execute("select pg_sleep(600)")
        except psycopg.Error as exc:
            errors.append(exc)

    thread = threading.Thread(target=sleep, name="pg_sleep", daemon=True)
    thread.start()
    activity = f"select wait_event from pg_stat_activity where pid = {pid}"
    try:
        wait_for(lambda: pg.admin_sql(activity) == "PgSleep")
        edit_store(
            gateway,
            "create trigger audit_test_block before insert on audit_batches"
            " begin select raise(abort, 'blocked by the test'); end",
        )
        other = psycopg.connect(access.dsn(), autocommit=True)

        def cut() -> bool:
            try:
                other.execute("select 'while-blocked'")
            except psycopg.OperationalError:
                return True
            return False

        wait_for(cut, timeout=WAIT_SECONDS)
        thread.join(WAIT_SECONDS)
        assert errors and errors[0].sqlstate == "57P01", errors
        # The backend does not notice a vanished client while it sleeps: the cut
        # must cancel the query upstream, as an expiry does.
        wait_for(lambda: pg.admin_sql(activity) != "PgSleep", timeout=WAIT_SECONDS)
    finally:
        pg.admin_sql(f"select pg_terminate_backend({pid})")
        edit_store(gateway, "drop trigger if exists audit_test_block")


@pytest.mark.parametrize("writer_process", [True, False], ids=["writer-process", "store-thread"])
def test_a_connection_cut_in_fail_closed_mode_keeps_its_own_end_reason_and_time(
    configured_gateway: Callable[..., Gateway], writer_process: bool
) -> None:
    gateway = configured_gateway(audit_fail_closed=True, audit_writer_process=writer_process)
    access = gateway.access().wait_ready()
    conn = psycopg.connect(access.dsn(), autocommit=True)
    conn.execute("select 'before-block'")
    wait_for(
        lambda: any(
            r["sql"] == "select 'before-block'" for r in trail(gateway, access.session_prefix)
        )
    )
    # As a full disk would: neither the trail nor the connection's end can be written.
    edit_store(
        gateway,
        "create trigger audit_test_block before insert on audit_batches"
        " begin select raise(abort, 'blocked by the test'); end",
        "create trigger connections_test_block before update on connections"
        " begin select raise(abort, 'blocked by the test'); end",
    )

    def cut() -> bool:
        try:
            conn.execute("select 'while-blocked'")
        except psycopg.OperationalError:
            return True
        return False

    wait_for(cut, timeout=WAIT_SECONDS)
    conn.close()
    # The daemon logs the end in the same step as it takes the end's time.
    wait_for(lambda: any(e.get("event") == "connection_ended" for e in gateway.log_events()))
    before_recovery = datetime.now(UTC)
    edit_store(gateway, "drop trigger audit_test_block", "drop trigger connections_test_block")

    def connection() -> tuple[dict[str, Any], dict[str, Any]]:
        with gateway.api() as client:
            detail: dict[str, Any] = client.get(f"/v1/sessions/{access.session_prefix}")
        (record,) = detail["connections"]
        return detail["session"], record

    def end_recorded() -> tuple[dict[str, Any], dict[str, Any]] | None:
        found = connection()
        return found if found[1]["ended_at"] is not None else None

    # Recorded once the store is back, while the session goes on: not left open
    # for the session's end to close as session_ended.
    session, record = wait_for(end_recorded, timeout=WAIT_SECONDS)
    assert session["ended_at"] is None
    assert record["end_reason"] == "audit_unavailable"
    assert datetime.fromisoformat(record["ended_at"]) < before_recovery

    assert access.stop() == 0
    session, after = connection()
    assert session["end_reason"] == "client_ended"
    assert (after["end_reason"], after["ended_at"]) == ("audit_unavailable", record["ended_at"])


# --- completeness ----------------------------------------------------------------------------


@pytest.mark.parametrize("writer_process", [True, False], ids=["writer-process", "store-thread"])
def test_every_statement_of_several_clients_is_recorded_exactly_once(
    configured_gateway: Callable[..., Gateway], writer_process: bool
) -> None:
    gateway = configured_gateway(audit_writer_process=writer_process)
    table = unique("audit_count")
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (marker text primary key)")
    script = "".join(f"select 'm{n:03d}';\n" for n in range(0, 50))
    result = subprocess.run(
        ["psql", access.url, "-X", "-At", "-v", "ON_ERROR_STOP=1"],
        input=script,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        for n in range(50, 100):
            conn.execute(f"select 'm{n:03d}'")  # no parameters: simple protocol
        for n in range(100, 150):
            conn.execute("select %s::text", (f"m{n:03d}",))  # extended protocol

    async def executemany() -> None:
        aconn = await asyncpg.connect(
            host="127.0.0.1",
            port=access.port,
            user=access.user,
            database=access.database,
            ssl=False,
            timeout=WAIT_SECONDS,
        )
        try:
            await aconn.executemany(
                f"insert into {table} (marker) values ($1)",
                [(f"m{n:03d}",) for n in range(150, 200)],
            )
        finally:
            await aconn.close()

    asyncio.run(executemany())

    records = statements(gateway, access.session_prefix)
    assert records[0]["sql"] == f"create table {table} (marker text primary key)"
    counted = records[1:]
    markers = []
    for record in counted:
        # asyncpg sends text in binary format: UTF-8 bytes, recorded as base64.
        values = [
            base64.b64decode(p["value"]).decode() if p["format"] == "binary" else p["value"]
            for p in record["parameters"] or []
        ]
        markers += [v for v in values if v and v.startswith("m")]
        markers += [record["sql"][8:12]] if record["sql"].startswith("select 'm") else []
    assert len(counted) == 200
    assert sorted(markers) == [f"m{n:03d}" for n in range(200)]
    assert {r["status"] for r in counted} == {"ok"}
    assert [r["seq"] for r in records] == sorted({r["seq"] for r in records})


def test_any_accounts_stored_password_is_masked_not_only_the_sessions_own(
    gateway: Gateway, pg_roles: Mapping[str, PgRole]
) -> None:
    access = gateway.access(account="scram").wait_ready()
    other = pg_roles["md5"].password  # the stored password of another account
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute(f"select '{other}' as leaked")
        conn.execute("select %s::text", (other,))
    recorded = statements(gateway, access.session_prefix)
    assert [r["sql"] for r in recorded] == ["select '***' as leaked", "select $1::text"]
    assert parameters(recorded[1]) == [(1, "***")]
    assert other.encode() not in store_path(gateway).read_bytes()


# --- the audit writer process -------------------------------------------------------------


def _statement_sql(gateway: Gateway, session: str) -> list[str]:
    return [r["sql"] for r in trail(gateway, session) if r["kind"] == "statement"]


def test_the_audit_writer_process_is_restarted_when_it_dies_and_nothing_is_lost(
    configured_gateway: Callable[..., Gateway],
) -> None:
    gateway = configured_gateway()
    access = gateway.access().wait_ready()
    expected = ["select 'before'"] + [f"select 'after-{i}'" for i in range(20)]
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute(expected[0])
        wait_for(lambda: _statement_sql(gateway, access.session_prefix) == expected[:1])
        first = audit_sink_pid(gateway)
        os.kill(first, signal.SIGKILL)
        for sql in expected[1:]:
            assert conn.execute(sql).fetchone() is not None
    wait_for(lambda: _statement_sql(gateway, access.session_prefix)[-1:] == expected[-1:])
    assert _statement_sql(gateway, access.session_prefix) == expected
    assert audit_sink_pid(gateway) != first
    assert f'"pid": {first}, "status": -9, "event": "audit_sink_exited"' in gateway.log()
    access.stop()
    assert gateway.cli("audit", "verify", access.session_prefix).returncode == 0


def test_ctrl_c_to_the_daemons_process_group_still_writes_the_whole_trail(
    configured_gateway: Callable[..., Gateway],
) -> None:
    # A terminal's Ctrl+C (and systemd's stop) signals every process of the group,
    # the audit writer too; it must outlive the daemon's drain, not die first.
    gateway = configured_gateway(own_process_group=True)
    access = gateway.access().wait_ready()
    expected = [f"select {i}" for i in range(200)]
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        for sql in expected:
            conn.execute(sql)
    assert gateway.proc is not None
    os.killpg(gateway.proc.pid, signal.SIGINT)
    assert gateway.proc.wait(WAIT_SECONDS) == 0
    assert "audit_events_unwritten_at_shutdown" not in gateway.log()
    # Not merely restarted in time: the writer process never died.
    assert "audit_sink_exited" not in gateway.log()
    assert gateway.log().count('"event": "audit_sink_started"') == 1
    access.proc.wait(WAIT_SECONDS)
    gateway.start()
    assert _statement_sql(gateway, access.session_prefix) == expected
