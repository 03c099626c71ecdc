"""libpq's own programs through `pam db access`: psql, pgbench, pg_dump and pg_restore.

Every program is the real binary from Debian's ``postgresql-client-15`` (psql,
pg_dump, pg_restore) or ``postgresql-15`` (pgbench), talking to a real gateway
daemon in front of a real PostgreSQL 15. Each check asserts what came back --
rows, counts, checksums, file contents -- not only an exit code. Each test works
in tables or schemas of its own, named with a random suffix, because the cluster
is shared by the whole test session. Waits are bounded polls, never timing
assertions.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import AccessProcess, Gateway, unique, wait_for

from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    """These tests only open access sessions: one daemon serves the module."""
    return shared_gateway


#: Where Debian puts the PostgreSQL 15 programs when they are not on PATH.
PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
#: The Debian package that ships each program, for the failure message.
DEBIAN_PACKAGE: Mapping[str, str] = {
    "psql": "postgresql-client-15",
    "pg_dump": "postgresql-client-15",
    "pg_restore": "postgresql-client-15",
    "pgbench": "postgresql-15",
}
#: A bound on every program run, so a hang fails the test instead of stalling it.
PROGRAM_TIMEOUT = 120.0
#: How long the cancel test waits for psql to return after Ctrl+C; the query
#: itself would run for 60 s, so returning at all within this bound means it was
#: cancelled.
CANCEL_WAIT = 30.0


# --- helpers ------------------------------------------------------------------------


def program(name: str) -> str:
    """The path of a PostgreSQL program; a missing one fails the test, naming its package."""
    found = shutil.which(name)
    if found is not None:
        return found
    candidate = PG_BIN_DIR / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    pytest.fail(
        f"{name} is not on PATH nor in {PG_BIN_DIR}:"
        f" install the Debian package {DEBIAN_PACKAGE[name]}",
        pytrace=False,
    )


def client_env(**extra: str) -> dict[str, str]:
    """The environment without any PG* variable of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else client_env(),
        cwd=cwd,
        timeout=PROGRAM_TIMEOUT,
    )


def psql(
    access: AccessProcess, *commands: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """psql on the access URL: each of ``commands`` as one ``-c``, or a script on stdin."""
    argv = [program("psql"), access.url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    for command in commands:
        argv += ["-c", command]
    if stdin is not None:
        argv += ["-f", "-"]
    return run(argv, stdin=stdin)


def query(
    access: AccessProcess, sql: str, params: Sequence[Any] | None = None
) -> list[tuple[Any, ...]]:
    """Rows of one statement (none for a command), run with psycopg through the gateway."""
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def md5_hex(text: str) -> str:
    """PostgreSQL's ``md5(text)``: a checksum to compare contents, not a security measure."""
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


# --- psql ---------------------------------------------------------------------------


def test_psql_runs_ddl_inserts_and_selects_and_prints_exact_rows(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    table = unique("psql_simple")
    result = psql(
        access,
        f"create table {table} (id int primary key, name text, score numeric(6,2))",
        f"insert into {table} values (1, 'ada', 9.5), (2, 'zoë ✓', null), (3, null, -1)",
        f"update {table} set score = score + 0.25 where id = 1",
        f"select id, coalesce(name, '<null>'), score from {table} order by id",
        f"select count(*), sum(score) from {table}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "CREATE TABLE",
        "INSERT 0 3",
        "UPDATE 1",
        "1|ada|9.75",
        "2|zoë ✓|",
        "3|<null>|-1.00",
        "3|8.75",
    ]
    assert result.stderr == ""


def test_a_psql_backslash_semicolon_batch_returns_every_result(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    result = psql(access, stdin="select 1 as one \\; select 'two' \\; select 3 + 0.5;\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1", "two", "3.5"]


def test_a_psql_backslash_semicolon_batch_is_one_implicit_transaction(gateway: Gateway) -> None:
    # `\;` makes psql send the statements as one Query message, which the server
    # runs as one implicit transaction (PostgreSQL 15 docs, 55.2.2.1): a failure
    # in the last statement undoes the first two. Had the batch been split into
    # separate messages, the two inserts would have stayed.
    access = gateway.access().wait_ready()
    table = unique("psql_batch")
    psql(access, f"create table {table} (n int)")
    batch = (
        f"insert into {table} values (1) \\; insert into {table} values (2) \\; select 1/0;\n"
        f"select count(*) from {table};\n"
    )
    result = run(
        [program("psql"), access.url, "-X", "-A", "-t", "-f", "-"],
        stdin=batch,
    )
    assert "division by zero" in result.stderr
    # Both inserts ran and reported their tags before the error rolled them back.
    assert result.stdout.splitlines() == ["INSERT 0 1", "INSERT 0 1", "0"]
    assert query(access, f"select count(*) from {table}") == [(0,)]


def test_psql_copy_from_a_local_csv_file_loads_every_row_unchanged(
    gateway: Gateway, tmp_path: Path
) -> None:
    access = gateway.access().wait_ready()
    table = unique("copy_in")
    rows = [
        (
            n,
            # quotes, commas, newlines and non-ASCII all need CSV quoting
            f'item {n}, "quoted"\nline two ✓' if n % 97 == 0 else f"item {n}",
            f"{n * 7 // 100}.{n * 7 % 100:02d}",
        )
        for n in range(1, 20_001)
    ]
    source = tmp_path / "in.csv"
    with source.open("w", newline="", encoding="utf-8") as out:
        csv.writer(out, lineterminator="\n").writerows(rows)
    expected_md5 = md5_hex(",".join(f"{n}|{label}|{amount}" for n, label, amount in rows))
    psql(access, f"create table {table} (id int primary key, label text, amount numeric(12,2))")

    result = psql(access, f"\\copy {table} from '{source}' with (format csv)")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"COPY {len(rows)}"
    (count, ids, digest), *_ = query(
        access,
        f"select count(*), sum(id), md5(string_agg(format('%s|%s|%s', id, label, amount),"
        f" ',' order by id)) from {table}",
    )
    assert count == len(rows)
    assert ids == sum(n for n, _, _ in rows)
    assert digest == expected_md5


def test_psql_copy_of_a_query_to_a_local_file_writes_exactly_the_servers_csv(
    gateway: Gateway, tmp_path: Path
) -> None:
    access = gateway.access().wait_ready()
    table = unique("copy_out")
    psql(
        access,
        f"create table {table} (id int primary key, label text, amount numeric(12,2))",
        f"insert into {table} select g, 'row ' || md5(g::text), g * 0.25"
        " from generate_series(1, 50000) g",
        f"insert into {table} values (50001, 'has,comma', 1), (50002, 'has \"quote\"', 2),"
        " (50003, null, 3), (50004, '', 4), (50005, e'two\\nlines', 5)",
    )
    target = tmp_path / "out.csv"

    result = psql(
        access,
        f"\\copy (select id, label, amount from {table} order by id)"
        f" to '{target}' with (format csv, header)",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "COPY 50005"
    expected = ["id,label,amount"]
    expected += [
        f"{g},row {md5_hex(str(g))},{g * 25 // 100}.{g * 25 % 100:02d}" for g in range(1, 50_001)
    ]
    expected += [
        '50001,"has,comma",1.00',
        '50002,"has ""quote""",2.00',
        "50003,,3.00",
        '50004,"",4.00',
        '50005,"two\nlines",5.00',
    ]
    assert target.read_bytes() == ("\n".join(expected) + "\n").encode()


def test_ctrl_c_in_psql_cancels_only_its_own_query_and_the_session_stays_usable(
    gateway: Gateway, pg: TempCluster
) -> None:
    access = gateway.access().wait_ready()
    lock_key = secrets.randbelow(1 << 31)
    # A bystander on the same access session, blocked on an advisory lock, is
    # busy when the cancel arrives: a cancel routed to the wrong backend would
    # end its query instead of (or as well as) psql's.
    holder = psycopg.connect(access.dsn(application_name="holder"), autocommit=True)
    holder.execute("select pg_advisory_lock(%s)", (lock_key,))
    bystander = psycopg.connect(access.dsn(application_name="bystander"), autocommit=True)
    bystander_pid = bystander.info.backend_pid
    outcome: list[object] = []

    def wait_for_lock() -> None:
        try:
            row = bystander.execute(
                "select 'bystander done' from (select pg_advisory_lock(%s)) lock", (lock_key,)
            ).fetchone()
            outcome.append(row)
        except psycopg.Error as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_lock, name="bystander", daemon=True)
    waiter.start()
    try:
        wait_for(
            lambda: (
                pg.admin_sql(
                    f"select wait_event_type from pg_stat_activity where pid = {bystander_pid}"
                )
                == "Lock"
            )
        )
        app = unique("psql_cancel")
        proc = subprocess.Popen(
            [program("psql"), access.url, "-X", "-A", "-t", "-c", "select pg_sleep(60)"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(PGAPPNAME=app),
        )
        try:
            psql_pid = wait_for(
                lambda: pg.admin_sql(
                    "select pid from pg_stat_activity"
                    f" where application_name = '{app}' and state = 'active'"
                    " and query like 'select pg_sleep(60)%'"
                )
            )
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=CANCEL_WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

        assert "canceling statement due to user request" in stderr
        assert stdout == ""
        assert proc.returncode != 0
        assert int(psql_pid) != bystander_pid
        # The bystander's query is still waiting, on the same backend.
        assert pg.admin_sql(
            f"select state, wait_event_type from pg_stat_activity where pid = {bystander_pid}"
        ) == ("active|Lock")
        after = psql(access, "select 'after cancel', current_user")
        assert after.returncode == 0, after.stderr
        assert after.stdout.splitlines() == ["after cancel|app_scram"]

        holder.execute("select pg_advisory_unlock(%s)", (lock_key,))
        waiter.join(CANCEL_WAIT)
        assert not waiter.is_alive(), "the bystander's query never finished"
        assert outcome == [("bystander done",)]
        assert bystander.execute("select pg_backend_pid()").fetchone() == (bystander_pid,)
    finally:
        holder.close()
        bystander.close()


# --- pgbench ------------------------------------------------------------------------


TRANSACTIONS_PROCESSED = re.compile(
    r"^number of transactions actually processed: (\d+)/(\d+)$", re.MULTILINE
)
FAILED_TRANSACTIONS = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


def pgbench(access: AccessProcess, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    """pgbench with the access URL as its dbname and its tables in ``schema``."""
    env = client_env(PGOPTIONS=f"-c search_path={schema}")
    return run([program("pgbench"), *args, access.url], env=env)


def processed(result: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    match = TRANSACTIONS_PROCESSED.search(result.stdout)
    assert match is not None, f"no transaction count in pgbench output: {result.stdout}"
    failed = FAILED_TRANSACTIONS.search(result.stdout)
    if failed is not None:
        assert failed.group(1) == "0", result.stdout
    return int(match.group(1)), int(match.group(2))


def init_pgbench(access: AccessProcess) -> str:
    """``pgbench -i -s 1`` through the gateway, into a schema of its own."""
    schema = unique("pgbench")
    query(access, f"create schema {schema}")
    result = pgbench(access, schema, "-i", "-s", "1")
    assert result.returncode == 0, result.stderr
    assert "done in" in result.stderr
    counts = query(
        access,
        f"select (select count(*) from {schema}.pgbench_accounts),"
        f" (select count(*) from {schema}.pgbench_tellers),"
        f" (select count(*) from {schema}.pgbench_branches),"
        f" (select count(*) from {schema}.pgbench_history),"
        f" (select sum(abalance) from {schema}.pgbench_accounts)",
    )
    assert counts == [(100_000, 10, 1, 0, 0)]
    return schema


def index_scans(pg: TempCluster, schema: str, table: str) -> int:
    return int(
        pg.admin_sql(
            "select coalesce(idx_scan, 0) from pg_stat_user_tables"
            f" where schemaname = '{schema}' and relname = '{table}'",
            database="appdb",
        )
    )


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only_completes_every_transaction_in_each_query_mode(
    gateway: Gateway, pg: TempCluster, mode: str
) -> None:
    access = gateway.access().wait_ready()
    schema = init_pgbench(access)
    scans_before = index_scans(pg, schema, "pgbench_accounts")

    result = pgbench(access, schema, "-n", "-S", "-M", mode, "-c", "4", "-j", "2", "-t", "200")

    assert result.returncode == 0, result.stderr
    assert f"query mode: {mode}" in result.stdout
    assert processed(result) == (800, 800)
    # Each of the 800 transactions looked one account up by its primary key, so
    # the server counted at least 800 scans of that index (not exactly 800: the
    # planner may probe the index too). Backends report their counters as they
    # exit, hence the bounded wait.
    wait_for(lambda: index_scans(pg, schema, "pgbench_accounts") >= scans_before + 800)


def test_pgbench_tpcb_writes_exactly_one_history_row_per_transaction(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    schema = init_pgbench(access)

    result = pgbench(access, schema, "-n", "-c", "2", "-t", "50")

    assert result.returncode == 0, result.stderr
    assert "TPC-B (sort of)" in result.stdout
    assert processed(result) == (100, 100)
    # The TPC-B invariant: every transaction added the same delta to one account,
    # teller and branch and logged it once in the history.
    (history, deltas, accounts, tellers, branches), *_ = query(
        access,
        f"select (select count(*) from {schema}.pgbench_history),"
        f" (select coalesce(sum(delta), 0) from {schema}.pgbench_history),"
        f" (select sum(abalance) from {schema}.pgbench_accounts),"
        f" (select sum(tbalance) from {schema}.pgbench_tellers),"
        f" (select sum(bbalance) from {schema}.pgbench_branches)",
    )
    assert history == 100
    assert deltas == accounts == tellers == branches


# --- pg_dump and pg_restore ---------------------------------------------------------


def create_dump_source(access: AccessProcess, schema: str) -> None:
    statements = f"""
        create schema {schema};
        create table {schema}.customers (
            id serial primary key,
            name text not null,
            email text unique,
            credit numeric(12, 2),
            profile jsonb,
            avatar bytea
        );
        create table {schema}.orders (
            id serial primary key,
            customer_id int not null references {schema}.customers (id) on delete cascade,
            placed_at timestamptz not null,
            total numeric(14, 4) check (total >= 0),
            note text,
            lines jsonb not null default '[]'
        );
        create index orders_by_customer on {schema}.orders (customer_id, placed_at desc);
        create view {schema}.customer_totals as
            select c.id, c.name, count(o.id) as orders, coalesce(sum(o.total), 0) as spent
            from {schema}.customers c left join {schema}.orders o on o.customer_id = c.id
            group by c.id, c.name;
        insert into {schema}.customers (name, email, credit, profile, avatar)
            select
                case when g % 50 = 0 then e'Zoë \\u2713 "quoted",\\ttab\\nline ' || g
                     else 'customer ' || g end,
                case when g % 7 = 0 then null else 'c' || g || '@example.com' end,
                case when g % 11 = 0 then null else round(g * 3.14159, 2) end,
                jsonb_build_object('n', g, 'tags', jsonb_build_array('a', g % 3), 'vip', g % 5 = 0),
                case when g % 13 = 0 then null
                     else decode(md5(g::text) || md5((g * 2)::text), 'hex') || '\\x00ff'::bytea end
            from generate_series(1, 500) g;
        insert into {schema}.orders (customer_id, placed_at, total, note, lines)
            select
                1 + (g * 37) % 500,
                timestamptz '2024-01-01 00:00:00+00' + g * interval '17 minutes 3.25 seconds',
                round(g * 1.0001, 4),
                case when g % 9 = 0 then null else 'note ' || repeat('x', g % 40) end,
                jsonb_build_array(jsonb_build_object('sku', 'S' || g, 'qty', g % 4 + 1))
            from generate_series(1, 3000) g;
        delete from {schema}.customers where id = 17;
    """
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute(statements)


TABLES = ("customers", "orders")


def table_digests(conn: psycopg.Connection[Any], schema: str) -> dict[str, tuple[Any, ...]]:
    digests = {}
    for table in (*TABLES, "customer_totals"):
        row = conn.execute(
            f"select count(*), md5(string_agg(t::text, ',' order by t.id)) from {schema}.{table} t"
        ).fetchone()
        assert row is not None
        digests[table] = tuple(row)
    for table in TABLES:
        row = conn.execute(f"select last_value, is_called from {schema}.{table}_id_seq").fetchone()
        assert row is not None
        digests[f"{table}_id_seq"] = tuple(row)
    return digests


def catalog_shape(conn: psycopg.Connection[Any], schema: str) -> dict[str, Any]:
    """Columns, constraints, indexes and the view of ``schema``, with its own name
    replaced by ``<schema>`` so two schemas can be compared."""

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return [
            tuple(
                value.replace(schema, "<schema>") if isinstance(value, str) else value
                for value in row
            )
            for row in conn.execute(sql, (schema,)).fetchall()
        ]

    return {
        "columns": rows(
            "select table_name, ordinal_position, column_name, data_type, is_nullable,"
            " column_default, numeric_precision, numeric_scale from information_schema.columns"
            " where table_schema = %s order by table_name, ordinal_position"
        ),
        "constraints": rows(
            "select cl.relname, co.conname, co.contype, pg_get_constraintdef(co.oid)"
            " from pg_constraint co join pg_class cl on cl.oid = co.conrelid"
            " where cl.relnamespace = %s::regnamespace order by cl.relname, co.conname"
        ),
        "indexes": rows(
            "select tablename, indexname, indexdef from pg_indexes"
            " where schemaname = %s order by indexname"
        ),
        "views": rows(
            "select viewname, definition from pg_views where schemaname = %s order by viewname"
        ),
    }


def test_pg_dump_then_pg_restore_through_the_gateway_reproduces_the_schema_and_data(
    gateway: Gateway, tmp_path: Path
) -> None:
    access = gateway.access().wait_ready()
    suffix = secrets.token_hex(4)
    schema = f"dumpsrc_{suffix}"
    original = f"dumpold_{suffix}"
    create_dump_source(access, schema)
    dump_file = tmp_path / "schema.dump"

    dumped = run([program("pg_dump"), "-Fc", "-n", schema, "-f", str(dump_file), "-d", access.url])
    assert dumped.returncode == 0, dumped.stderr
    assert dumped.stderr == ""
    listing = run([program("pg_restore"), "--list", str(dump_file)])
    assert listing.returncode == 0, listing.stderr
    for entry in (
        f"SCHEMA - {schema}",
        f"TABLE {schema} customers",
        f"TABLE {schema} orders",
        f"VIEW {schema} customer_totals",
        f"INDEX {schema} orders_by_customer",
        f"FK CONSTRAINT {schema} orders orders_customer_id_fkey",
        f"TABLE DATA {schema} customers",
        f"TABLE DATA {schema} orders",
    ):
        assert entry in listing.stdout, listing.stdout

    query(access, f"alter schema {schema} rename to {original}")
    restored = run([program("pg_restore"), "--exit-on-error", "-d", access.url, str(dump_file)])

    assert restored.returncode == 0, restored.stderr
    assert restored.stderr == ""
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        restored_digests = table_digests(conn, schema)
        original_digests = table_digests(conn, original)
        assert restored_digests == original_digests
        assert restored_digests["customers"][0] == 499
        assert restored_digests["orders"][0] == 3000 - 6  # cascade from customer 17
        restored_shape = catalog_shape(conn, schema)
        assert restored_shape == catalog_shape(conn, original)
        assert [name for _, name, _ in restored_shape["indexes"]] == [
            "customers_email_key",
            "customers_pkey",
            "orders_by_customer",
            "orders_pkey",
        ]
        assert [name for name, _ in restored_shape["views"]] == ["customer_totals"]
        assert "<schema>.orders" in restored_shape["views"][0][1]
        owner = conn.execute(
            "select pg_get_userbyid(nspowner) from pg_namespace where nspname = %s", (schema,)
        ).fetchone()
        assert owner == ("app_scram",)
