"""The Python client matrix through `pam db access`: psycopg 3 and asyncpg.

Every test drives a real daemon and a real `pam db access` process (the
``gateway`` fixture) in front of a real PostgreSQL 15 (``pg``), with the real
client libraries, and asserts what the clients got back: rows, values, counts,
SQLSTATEs. The protocol features covered are the ones clients lean on and
proxies tend to get wrong: pipelining (and an error in the middle of a
pipeline), COPY in text and binary format, server-side cursors (psycopg's
DECLARE/FETCH, asyncpg's portal suspension), CancelRequest on the local port,
NotificationResponse while the client is idle, named prepared statements,
NoticeResponse, ParameterStatus mid-session, EmptyQueryResponse, 20 MB values,
and TLS on the local leg.

Tables get unique names: ``pg`` is shared by the whole test session.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_DATABASE
from harness import AccessProcess, Gateway, wait_for
from psycopg import pq, sql

from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    """These tests only open access sessions: one daemon serves the module."""
    return shared_gateway


#: Bound on every wait for the server or the gateway; none of them is a timing check.
WAIT_SECONDS = 30.0
ROWS = 10_000
LARGE_VALUE_BYTES = 20 * 1024 * 1024


# --- helpers ------------------------------------------------------------------------


@pytest.fixture
def table(pg: TempCluster) -> Iterator[str]:
    """A table name no other test uses; the table is dropped afterwards."""
    name = f"py_clients_{secrets.token_hex(6)}"
    yield name
    pg.admin_sql(f"drop table if exists {name}; drop sequence if exists {name}_seq;", APP_DATABASE)


@pytest.fixture
def access(gateway: Gateway) -> AccessProcess:
    return gateway.access().wait_ready()


def backend_activity(monitor: psycopg.Connection[Any], pid: int) -> tuple[str, str] | None:
    """(state, query) of a backend, read on an autocommit connection so that
    pg_stat_activity is not a snapshot frozen by an open transaction."""
    row = monitor.execute(
        "select state, query from pg_stat_activity where pid = %s", (pid,)
    ).fetchone()
    return (row[0], row[1]) if row else None


async def aconnect(access: AccessProcess, **kwargs: Any) -> asyncpg.Connection:
    kwargs.setdefault("ssl", False)
    return await asyncpg.connect(
        host="127.0.0.1",
        port=access.port,
        user=access.user,
        database=access.database,
        timeout=WAIT_SECONDS,
        **kwargs,
    )


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = WAIT_SECONDS) -> Any:
    """Await ``check`` until it returns something truthy: a bounded wait that
    keeps the event loop running (asyncpg sends its CancelRequest from it)."""
    async with asyncio.timeout(timeout):
        while not (value := await check()):
            await asyncio.sleep(0.05)
    return value


@pytest.fixture
async def aconn(access: AccessProcess) -> AsyncIterator[asyncpg.Connection]:
    conn = await aconnect(access)
    try:
        yield conn
    finally:
        await conn.close()


# --- psycopg 3: pipeline mode ----------------------------------------------------------


def test_a_psycopg_pipeline_of_parameterised_inserts_and_selects_returns_every_result(
    access: AccessProcess, table: str
) -> None:
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (id int primary key, v text not null)")
        with conn.pipeline():
            selects = []
            for i in range(300):
                conn.execute(f"insert into {table} (id, v) values (%s, %s)", (i, f"value {i}"))
                selects.append(
                    conn.execute(f"select id, v, %s::int * 3 from {table} where id = %s", (i, i))
                )
            returning = conn.cursor()
            returning.executemany(
                f"insert into {table} (id, v) values (%s, %s) returning id, upper(v)",
                [(1000 + i, f"many {i}") for i in range(100)],
                returning=True,
            )
        assert [cur.fetchall() for cur in selects] == [
            [(i, f"value {i}", i * 3)] for i in range(300)
        ]
        returned = []
        while True:
            returned.extend(returning.fetchall())
            if not returning.nextset():
                break
        assert returned == [(1000 + i, f"MANY {i}") for i in range(100)]
        total = conn.execute(f"select count(*), sum(id) from {table}").fetchone()
        assert total == (400, sum(range(300)) + sum(range(1000, 1100)))


@pytest.mark.parametrize(
    ("autocommit", "sync_after_second", "committed"),
    [
        pytest.param(True, False, [], id="autocommit-one-sync-rolls-back-all"),
        pytest.param(True, True, [1, 2], id="autocommit-synced-statements-stay"),
        pytest.param(False, True, [], id="transaction-rolls-back-all"),
    ],
)
def test_an_error_mid_pipeline_skips_the_rest_and_keeps_only_what_was_committed(
    access: AccessProcess,
    table: str,
    autocommit: bool,
    sync_after_second: bool,
    committed: list[int],
) -> None:
    with psycopg.connect(access.dsn(), autocommit=True) as setup:
        setup.execute(f"create sequence {table}_seq")
        setup.execute(f"create table {table} (n int primary key)")
    insert = f"insert into {table} (n) values (nextval('{table}_seq'))"
    with psycopg.connect(access.dsn(), autocommit=autocommit) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline() as pipeline:
            conn.execute(insert)
            conn.execute(insert)
            if sync_after_second:
                pipeline.sync()
            conn.execute("select 1 / %s", (0,))
            conn.execute(insert)
            conn.execute(insert)
            conn.execute(insert)
        if not autocommit:
            assert conn.info.transaction_status == pq.TransactionStatus.INERROR
            conn.rollback()
        rows = conn.execute(f"select n from {table} order by n").fetchall()
        assert [n for (n,) in rows] == committed
        # Sequences ignore rollback: exactly two nextval() calls ran, so the
        # three inserts after the failing statement were never executed.
        assert conn.execute(f"select last_value, is_called from {table}_seq").fetchone() == (
            2,
            True,
        )
        assert conn.execute("select 'usable', %s::int", (7,)).fetchone() == ("usable", 7)


def test_libpq_sees_pipeline_aborted_for_each_statement_after_an_error_until_sync(
    access: AccessProcess,
) -> None:
    # The raw libpq view of the same thing: all six statements and two Syncs
    # are queued before any result is read, so the server (through the
    # gateway) must itself skip statements 4-6 and resume after the Sync.
    pgconn = pq.PGconn.connect(access.dsn().encode())
    try:
        assert pgconn.status == pq.ConnStatus.OK, pgconn.get_error_message()
        pgconn.enter_pipeline_mode()
        for query in (b"select 1", b"select 2", b"select 1/0", b"select 4", b"select 5"):
            pgconn.send_query_params(query, None)
        pgconn.send_query_params(b"select 6", None)
        pgconn.pipeline_sync()
        pgconn.send_query_params(b"select $1::int * 2", [b"21"])
        pgconn.pipeline_sync()
        results: list[pq.PGresult] = []
        syncs = 0
        while syncs < 2:
            result = pgconn.get_result()
            if result is None:
                continue
            results.append(result)
            syncs += result.status == pq.ExecStatus.PIPELINE_SYNC
        statuses = [r.status for r in results]
        assert statuses == [
            pq.ExecStatus.TUPLES_OK,
            pq.ExecStatus.TUPLES_OK,
            pq.ExecStatus.FATAL_ERROR,
            pq.ExecStatus.PIPELINE_ABORTED,
            pq.ExecStatus.PIPELINE_ABORTED,
            pq.ExecStatus.PIPELINE_ABORTED,
            pq.ExecStatus.PIPELINE_SYNC,
            pq.ExecStatus.TUPLES_OK,
            pq.ExecStatus.PIPELINE_SYNC,
        ]
        assert [results[0].get_value(0, 0), results[1].get_value(0, 0)] == [b"1", b"2"]
        assert results[2].error_field(pq.DiagnosticField.SQLSTATE) == b"22012"
        assert results[7].get_value(0, 0) == b"42"
        pgconn.exit_pipeline_mode()
        assert pgconn.exec_(b"select 'usable'").get_value(0, 0) == b"usable"
    finally:
        pgconn.finish()


# --- psycopg 3: COPY ---------------------------------------------------------------


def _copy_rows() -> list[tuple[int, str | None]]:
    # Tabs, newlines, backslashes, quotes, non-ASCII and NULLs: everything the
    # text format has to escape, so a byte changed in transit shows.
    return [(i, None if i % 97 == 0 else f"row {i}\t\\ \n'ü'") for i in range(1, ROWS + 1)]


def test_psycopg_copy_from_stdin_and_to_stdout_in_text_format_round_trips_10000_rows(
    access: AccessProcess, table: str
) -> None:
    expected = _copy_rows()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (id int primary key, v text)")
        cur = conn.cursor()
        with cur.copy(f"copy {table} (id, v) from stdin") as copy:
            for row in expected:
                copy.write_row(row)
        assert cur.rowcount == ROWS
        stats = conn.execute(f"select count(*), sum(id), count(v) from {table}").fetchone()
        assert stats == (ROWS, ROWS * (ROWS + 1) // 2, ROWS - ROWS // 97)
        with cur.copy(f"copy (select id, v from {table} order by id) to stdout") as copy:
            copy.set_types(["int4", "text"])
            assert list(copy.rows()) == expected
        assert conn.execute("select 'usable'").fetchone() == ("usable",)


def test_psycopg_copy_in_binary_format_round_trips_10000_rows(
    access: AccessProcess, table: str
) -> None:
    expected = [(i, f"bin {i} ✓ \\ \t", i * 0.5) for i in range(1, ROWS + 1)]
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (id int primary key, v text, f float8)")
        cur = conn.cursor()
        with cur.copy(f"copy {table} (id, v, f) from stdin (format binary)") as copy:
            copy.set_types(["int4", "text", "float8"])
            for row in expected:
                copy.write_row(row)
        stats = conn.execute(f"select count(*), sum(id), sum(f) from {table}").fetchone()
        assert stats == (ROWS, ROWS * (ROWS + 1) // 2, sum(f for _, _, f in expected))
        query = f"copy (select id, v, f from {table} order by id) to stdout (format binary)"
        with cur.copy(query) as copy:
            copy.set_types(["int4", "text", "float8"])
            assert list(copy.rows()) == expected


# --- psycopg 3: server-side cursor, cancel, notifications ------------------------------


def test_a_psycopg_server_side_cursor_fetches_10000_rows_in_order_in_batches_of_100(
    access: AccessProcess,
) -> None:
    with psycopg.connect(access.dsn()) as conn:
        with conn.cursor(name="c") as cur:
            cur.itersize = 100
            cur.execute("select g, md5(g::text) from generate_series(1, %s) g order by g", (ROWS,))
            rows = iter(cur)
            first = next(rows)
            # The portal lives on the server while the client iterates.
            open_cursors = conn.execute("select name from pg_cursors").fetchall()
            rest = list(rows)
        assert open_cursors == [("c",)]
        fetched = [first, *rest]
        assert len(fetched) == ROWS
        assert fetched == [
            (g, hashlib.md5(str(g).encode(), usedforsecurity=False).hexdigest())
            for g in range(1, ROWS + 1)
        ]
        conn.commit()


def test_psycopg_cancel_safe_stops_pg_sleep_and_leaves_the_other_connection_untouched(
    access: AccessProcess, table: str
) -> None:
    with (
        psycopg.connect(access.dsn(application_name="sleeper"), autocommit=True) as sleeper,
        psycopg.connect(access.dsn(application_name="bystander")) as bystander,
        psycopg.connect(access.dsn(application_name="monitor"), autocommit=True) as monitor,
    ):
        monitor.execute(f"create table {table} (n int)")
        bystander.execute(f"insert into {table} values (1)")  # an open transaction
        bystander_pid = bystander.info.backend_pid
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
                lambda: backend_activity(monitor, pid) == ("active", "select pg_sleep(60)"),
                timeout=WAIT_SECONDS,
            )
            sleeper.cancel_safe()
        finally:
            thread.join(WAIT_SECONDS * 3)
        assert not thread.is_alive()
        assert len(failures) == 1
        assert isinstance(failures[0], psycopg.errors.QueryCanceled)
        assert failures[0].sqlstate == "57014"
        assert sleeper.execute("select 'still usable'").fetchone() == ("still usable",)
        assert sleeper.info.backend_pid == pid
        bystander.execute(f"insert into {table} values (2)")
        bystander.commit()
        assert bystander.info.backend_pid == bystander_pid
        assert monitor.execute(f"select n from {table} order by n").fetchall() == [(1,), (2,)]
    assert access.proc.poll() is None


def test_a_psycopg_listener_receives_a_notify_sent_while_it_is_idle(
    access: AccessProcess,
) -> None:
    channel = f"chan_{secrets.token_hex(4)}"
    payload = 'pay\'load ✓ with "quotes"'
    with (
        psycopg.connect(access.dsn(), autocommit=True) as listener,
        psycopg.connect(access.dsn(), autocommit=True) as notifier,
    ):
        listener.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
        notifier.execute(
            sql.SQL("notify {}, {}").format(sql.Identifier(channel), sql.Literal(payload))
        )
        received = list(listener.notifies(timeout=WAIT_SECONDS, stop_after=1))
        assert [(n.channel, n.payload, n.pid) for n in received] == [
            (channel, payload, notifier.info.backend_pid)
        ]
        assert listener.execute("select 'usable'").fetchone() == ("usable",)


# --- psycopg 3: prepared statements ----------------------------------------------------


def test_a_psycopg_prepared_statement_runs_many_times_with_different_parameters(
    access: AccessProcess,
) -> None:
    query = "select %s::int * 2, %s::text || '!'"
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        results = [conn.execute(query, (i, f"v{i}"), prepare=True).fetchone() for i in range(100)]
        assert results == [(i * 2, f"v{i}!") for i in range(100)]
        prepared = conn.execute(
            "select statement, generic_plans + custom_plans from pg_prepared_statements"
            " where not from_sql"
        ).fetchall()
        # One Parse, then 100 Bind/Execute of the same named statement.
        assert prepared == [("select $1::int * 2, $2::text || '!'", 100)]


def test_a_psycopg_prepared_statement_keeps_parameters_10_11_and_12_apart_from_1(
    access: AccessProcess,
) -> None:
    values = tuple(f"value-{name}" for name in "abcdefghijkl")
    query = "select " + ", ".join(["%s::text"] * len(values))
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute(query, values, prepare=True).fetchone() == values
        swapped = values[::-1]
        assert conn.execute(query, swapped, prepare=True).fetchone() == swapped
        statement, types = conn.execute(
            "select statement, parameter_types::text[] from pg_prepared_statements"
            " where not from_sql"
        ).fetchone()
        assert "$10::text, $11::text, $12::text" in statement
        assert types == ["text"] * 12


# --- psycopg 3: notices, parameter status, empty queries, large values ----------------


def test_a_notice_raised_in_a_do_block_reaches_the_psycopg_notice_handler(
    access: AccessProcess,
) -> None:
    notices: list[tuple[str | None, ...]] = []

    def keep(diag: psycopg.errors.Diagnostic) -> None:
        # A Diagnostic is only readable inside the handler: copy its fields.
        notices.append((diag.severity, diag.sqlstate, diag.message_primary, diag.message_hint))

    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(keep)
        conn.execute("do $$ begin raise notice 'hello %', 40 + 2; end $$")
        conn.execute("do $$ begin raise warning 'careful' using hint = 'mind the gap'; end $$")
        assert conn.execute("select 'after notices'").fetchone() == ("after notices",)
    assert notices == [
        ("NOTICE", "00000", "hello 42", None),
        ("WARNING", "01000", "careful", "mind the gap"),
    ]


def test_a_set_mid_session_updates_psycopg_parameter_status(access: AccessProcess) -> None:
    with psycopg.connect(access.dsn(application_name="before"), autocommit=True) as conn:
        assert conn.info.parameter_status("application_name") == "before"
        conn.execute("set application_name = 'after'")
        conn.execute("set timezone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("application_name") == "after"
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert str(conn.info.timezone) == "Asia/Tokyo"
        assert conn.execute("select current_setting('TimeZone')").fetchone() == ("Asia/Tokyo",)
        conn.execute("reset application_name")
        assert conn.info.parameter_status("application_name") == "before"


def test_an_empty_query_gets_an_empty_query_response_in_both_protocols(
    access: AccessProcess,
) -> None:
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        for query in ("", ";", "  ;  "):
            # psycopg uses the simple protocol for a query without parameters,
            # unless results are binary, which forces Parse/Bind/Execute.
            for binary in (False, True):
                cur = conn.execute(query, binary=binary)
                assert cur.pgresult is not None
                assert cur.pgresult.status == pq.ExecStatus.EMPTY_QUERY, (query, binary)
        assert conn.execute("select 'usable'").fetchone() == ("usable",)


def test_a_20_mb_value_from_the_server_arrives_intact(access: AccessProcess) -> None:
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        value, server_md5 = conn.execute(
            "select v, md5(v) from (select repeat('x', %s) as v) s", (LARGE_VALUE_BYTES,)
        ).fetchone()
        assert len(value) == LARGE_VALUE_BYTES
        assert hashlib.md5(value.encode(), usedforsecurity=False).hexdigest() == server_md5
        varied, varied_md5 = conn.execute(
            "select v, md5(v) from (select string_agg(md5(g::text), '' order by g) as v"
            " from generate_series(1, %s) g) s",
            (LARGE_VALUE_BYTES // 32,),
        ).fetchone()
        assert len(varied) == LARGE_VALUE_BYTES
        assert hashlib.md5(varied.encode(), usedforsecurity=False).hexdigest() == varied_md5


def test_a_20_mb_parameter_goes_to_the_server_and_back_intact(access: AccessProcess) -> None:
    value = secrets.token_hex(LARGE_VALUE_BYTES // 2)
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        echoed, length, server_md5 = conn.execute(
            "select v, length(v), md5(v) from (select %s::text as v) s", (value,)
        ).fetchone()
    assert length == LARGE_VALUE_BYTES
    assert server_md5 == hashlib.md5(value.encode(), usedforsecurity=False).hexdigest()
    assert echoed == value


# --- asyncpg ---------------------------------------------------------------------------


async def test_asyncpg_prepared_statements_run_many_times_with_arguments(
    aconn: asyncpg.Connection,
) -> None:
    stmt = await aconn.prepare("select $1::int * 2 as doubled, $2::text || '!' as shout")
    assert [t.name for t in stmt.get_parameters()] == ["int4", "text"]
    assert [a.name for a in stmt.get_attributes()] == ["doubled", "shout"]
    rows = [tuple(await stmt.fetchrow(i, f"v{i}")) for i in range(200)]
    assert rows == [(i * 2, f"v{i}!") for i in range(200)]
    series = await aconn.prepare("select g from generate_series($1::int, $2::int) g order by g")
    assert [r["g"] for r in await series.fetch(5, 9)] == [5, 6, 7, 8, 9]
    assert [r["g"] for r in await series.fetch(-2, 0)] == [-2, -1, 0]
    assert await series.fetch(3, 1) == []
    many = await aconn.fetchrow(
        "select " + ", ".join(f"${n}::text" for n in range(12, 0, -1)),
        *[f"p{n}" for n in range(1, 13)],
    )
    assert tuple(many) == tuple(f"p{n}" for n in range(12, 0, -1))


async def test_asyncpg_executemany_inserts_1000_rows(aconn: asyncpg.Connection, table: str) -> None:
    await aconn.execute(f"create table {table} (id int primary key, v text not null)")
    await aconn.executemany(
        f"insert into {table} (id, v) values ($1, $2)", [(i, f"r{i}") for i in range(1000)]
    )
    stats = await aconn.fetchrow(f"select count(*), sum(id), count(distinct v) from {table}")
    assert tuple(stats) == (1000, sum(range(1000)), 1000)
    assert await aconn.fetchval(f"select v from {table} where id = 999") == "r999"


async def test_asyncpg_copy_records_to_table_writes_10000_records(
    aconn: asyncpg.Connection, table: str
) -> None:
    await aconn.execute(f"create table {table} (id int primary key, v text, f float8)")
    records = [(i, f"rec {i}\t\n\\", i / 4) for i in range(1, ROWS + 1)]
    status = await aconn.copy_records_to_table(table, records=records, columns=["id", "v", "f"])
    assert status == f"COPY {ROWS}"
    stats = await aconn.fetchrow(f"select count(*), sum(id), sum(f) from {table}")
    assert tuple(stats) == (ROWS, ROWS * (ROWS + 1) // 2, sum(f for _, _, f in records))
    back = await aconn.fetch(f"select id, v, f from {table} order by id")
    assert [tuple(r) for r in back] == records


async def test_an_asyncpg_cursor_with_prefetch_50_yields_10000_rows_in_order(
    aconn: asyncpg.Connection,
) -> None:
    query = "select g, g::text || '!' as t from generate_series(1, $1::int) g order by g"
    async with aconn.transaction():
        rows = [(r["g"], r["t"]) async for r in aconn.cursor(query, ROWS, prefetch=50)]
        cursor = await aconn.cursor(query, ROWS)
        assert [tuple(r) for r in await cursor.fetch(3)] == [(1, "1!"), (2, "2!"), (3, "3!")]
        assert await cursor.forward(995) == 995
        assert tuple(await cursor.fetchrow()) == (999, "999!")
    assert rows == [(g, f"{g}!") for g in range(1, ROWS + 1)]


async def test_an_asyncpg_pool_of_10_answers_50_concurrent_queries_each_with_its_own_value(
    access: AccessProcess, aconn: asyncpg.Connection
) -> None:
    async with asyncpg.create_pool(
        host="127.0.0.1",
        port=access.port,
        user=access.user,
        database=access.database,
        ssl=False,
        min_size=10,
        max_size=10,
        server_settings={"application_name": "pool-of-10"},
    ) as pool:
        answers = await asyncio.gather(
            *(pool.fetchval("select $1::int from pg_sleep(0.05)", i) for i in range(50))
        )
        assert answers == list(range(50))
        held = [await pool.acquire() for _ in range(10)]
        try:
            assert len({conn.get_server_pid() for conn in held}) == 10
            assert (
                await aconn.fetchval(
                    "select count(*) from pg_stat_activity where application_name = 'pool-of-10'"
                )
                == 10
            )
        finally:
            for conn in held:
                await pool.release(conn)


async def _sleeping_backend_is_idle(monitor: asyncpg.Connection, pid: int) -> bool:
    state = await monitor.fetchval("select state from pg_stat_activity where pid = $1", pid)
    return state == "idle"


@pytest.mark.parametrize(
    ("how", "tls"),
    [
        pytest.param("timeout", False, id="timeout-argument"),
        pytest.param("command_timeout", False, id="command-timeout"),
        pytest.param("timeout", "require", id="timeout-argument-over-local-tls"),
    ],
)
async def test_an_asyncpg_timeout_cancels_pg_sleep_and_the_connection_stays_usable(
    access: AccessProcess, aconn: asyncpg.Connection, how: str, tls: bool | str
) -> None:
    options: dict[str, Any] = {"ssl": tls}
    if how == "command_timeout":
        options["command_timeout"] = 1
    conn = await aconnect(access, **options)
    try:
        pid = conn.get_server_pid()
        with pytest.raises(TimeoutError):
            if how == "timeout":
                await conn.fetchval("select pg_sleep(60)", timeout=1)
            else:
                await conn.fetchval("select pg_sleep(60)")
        # asyncpg swallows the server's 57014, so check on the server that the
        # sleep was cancelled rather than left to run for its 60 seconds.
        await eventually(lambda: _sleeping_backend_is_idle(aconn, pid))
        assert await conn.fetchval("select 'still usable'") == "still usable"
        assert conn.get_server_pid() == pid
    finally:
        await conn.close()
    assert await aconn.fetchval("select 'other connection fine'") == "other connection fine"


async def test_asyncpg_connects_without_tls_and_with_required_or_preferred_local_tls(
    access: AccessProcess,
) -> None:
    for tls in (False, "require", "prefer"):
        conn = await aconnect(access, ssl=tls)
        try:
            row = await conn.fetchrow("select current_user, current_database(), $1::int + 1", 41)
        finally:
            await conn.close()
        assert tuple(row) == ("app_scram", APP_DATABASE, 42), tls


async def test_asyncpg_verifies_the_gateways_local_certificate_for_127_0_0_1(
    gateway: Gateway, access: AccessProcess
) -> None:
    context = ssl.create_default_context(cafile=str(gateway.home / "local-tls.crt"))
    conn = await aconnect(access, ssl=context)
    try:
        assert await conn.fetchval("select 'verified'") == "verified"
    finally:
        await conn.close()
