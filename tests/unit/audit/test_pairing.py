"""Playbook tests for statement pairing: scripted client and server messages,
fed through the same BoundaryTrackers the relay uses, exact events out."""

from __future__ import annotations

import struct

import pytest

from gateway.audit.decoding import rows_from_tag
from gateway.audit.pairing import (
    CLIENT_MEASURE,
    CLIENT_TAP,
    SERVER_MEASURE,
    SERVER_TAP,
    StatementTracker,
)
from gateway.audit.records import AuditEvent, row_event
from gateway.audit.redaction import Redactor
from gateway.protocol.framing import BoundaryTracker
from gateway.protocol.messages import encode_message, error_response


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def query(sql: str) -> bytes:
    return encode_message(ord("Q"), cstr(sql))


def parse(sql: str, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    body = cstr(name) + cstr(sql) + struct.pack("!h", len(types))
    body += b"".join(struct.pack("!I", t) for t in types)
    return encode_message(ord("P"), body)


def bind(
    values: list[bytes | None], portal: str = "", statement: str = "", binary: bool = False
) -> bytes:
    body = cstr(portal) + cstr(statement)
    body += struct.pack("!hh", 1, 1 if binary else 0)
    body += struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    body += struct.pack("!h", 0)
    return encode_message(ord("B"), body)


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return encode_message(ord("E"), cstr(portal) + struct.pack("!i", max_rows))


def sync() -> bytes:
    return encode_message(ord("S"), b"")


def copy_data(data: bytes, frontend: bool = True) -> bytes:
    return encode_message(ord("d"), data)


def copy_done() -> bytes:
    return encode_message(ord("c"), b"")


def complete(tag: str) -> bytes:
    return encode_message(ord("C"), cstr(tag))


def ready(status: bytes = b"I") -> bytes:
    return encode_message(ord("Z"), status)


def data_row(value: bytes) -> bytes:
    return encode_message(ord("D"), struct.pack("!hi", 1, len(value)) + value)


PARSE_COMPLETE = encode_message(ord("1"), b"")
BIND_COMPLETE = encode_message(ord("2"), b"")
SUSPENDED = encode_message(ord("s"), b"")
EMPTY = encode_message(ord("I"), b"")
NOTICE = encode_message(ord("N"), b"SNOTICE\x00Mhello\x00\x00")
NOTIFICATION = encode_message(ord("A"), struct.pack("!I", 42) + cstr("chan") + cstr("payload"))
PARAMETER_STATUS = encode_message(ord("S"), cstr("TimeZone") + cstr("UTC"))


def error(code: str, message: str = "boom") -> bytes:
    return error_response("ERROR", code, message)


class Playbook:
    def __init__(self, **kwargs: object) -> None:
        self.client_tracker = BoundaryTracker(
            max_length=1 << 30, tap=CLIENT_TAP, measure=CLIENT_MEASURE
        )
        self.server_tracker = BoundaryTracker(
            max_length=1 << 30, tap=SERVER_TAP, measure=SERVER_MEASURE
        )
        self.tracker = StatementTracker(
            "s1", "c1", redactor=kwargs.pop("redactor", Redactor.build()), **kwargs
        )  # type: ignore[arg-type]
        self.events: list[AuditEvent] = []
        self.now = 1_000_000_000

    def client(self, *chunks: bytes) -> None:
        for message in self.client_tracker.feed(b"".join(chunks)):
            self.now += 1000
            self.tracker.client(message, self.now)

    def server(self, *chunks: bytes) -> None:
        for message in self.server_tracker.feed(b"".join(chunks)):
            self.now += 1000
            self.events += map(row_event, self.tracker.server(message, self.now))

    def close(self) -> list[AuditEvent]:
        self.events += map(row_event, self.tracker.close(self.now))
        return self.events


def summary(events: list[AuditEvent]) -> list[tuple[object, ...]]:
    return [(e.protocol, e.sql, e.status, e.command_tag, e.rows, e.sqlstate) for e in events]


def test_a_simple_query_is_recorded_with_its_tag_and_rows() -> None:
    book = Playbook()
    book.client(query("select * from t"))
    book.server(data_row(b"1"), data_row(b"2"), complete("SELECT 2"), ready())
    assert summary(book.events) == [("simple", "select * from t", "ok", "SELECT 2", 2, None)]
    assert book.events[0].duration_ms is not None and book.events[0].duration_ms > 0


def test_a_multi_statement_query_sums_rows_and_keeps_every_tag() -> None:
    book = Playbook()
    book.client(query("insert into t values (1); insert into t values (2), (3)"))
    book.server(complete("INSERT 0 1"), complete("INSERT 0 2"), ready())
    assert summary(book.events) == [
        (
            "simple",
            "insert into t values (1); insert into t values (2), (3)",
            "ok",
            "INSERT 0 1; INSERT 0 2",
            3,
            None,
        )
    ]


def test_asynchronous_messages_never_pair_with_a_statement() -> None:
    book = Playbook()
    book.client(query("select 1"))
    book.server(
        NOTICE,
        PARAMETER_STATUS,
        NOTIFICATION,
        data_row(b"1"),
        NOTICE,
        complete("SELECT 1"),
        NOTIFICATION,
        ready(),
    )
    book.server(NOTIFICATION, NOTICE)
    assert summary(book.events) == [("simple", "select 1", "ok", "SELECT 1", 1, None)]


def test_pipelined_extended_statements_each_get_their_own_record_and_parameters() -> None:
    book = Playbook()
    book.client(
        parse("insert into t values ($1, $2)", types=(23, 25)),
        bind([b"1", b"one"]),
        execute(),
        bind([b"2", None]),
        execute(),
        bind([b"3", b"three"]),
        execute(),
        sync(),
    )
    book.server(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        complete("INSERT 0 1"),
        BIND_COMPLETE,
        complete("INSERT 0 1"),
        BIND_COMPLETE,
        complete("INSERT 0 1"),
        ready(),
    )
    assert [e.status for e in book.events] == ["ok", "ok", "ok"]
    assert [
        [(p.index, p.type_oid, p.format, p.value) for p in e.parameters or ()] for e in book.events
    ] == [
        [(1, 23, "text", "1"), (2, 25, "text", "one")],
        [(1, 23, "text", "2"), (2, 25, "null", None)],
        [(1, 23, "text", "3"), (2, 25, "text", "three")],
    ]
    assert {e.sql for e in book.events} == {"insert into t values ($1, $2)"}


def test_parameter_ten_stays_parameter_ten() -> None:
    book = Playbook()
    sql = "select " + ", ".join(f"${i}" for i in range(1, 13))
    book.client(parse(sql), bind([f"v{i}".encode() for i in range(1, 13)]), execute(), sync())
    book.server(PARSE_COMPLETE, BIND_COMPLETE, data_row(b"x"), complete("SELECT 1"), ready())
    params = book.events[0].parameters or ()
    assert [(p.index, p.value) for p in params] == [(i, f"v{i}") for i in range(1, 13)]
    assert book.events[0].sql == sql  # never interpolated


def test_several_executes_of_the_unnamed_portal_are_all_recorded() -> None:
    book = Playbook()
    book.client(
        parse("select * from big"),
        bind([]),
        execute(max_rows=2),
        execute(max_rows=2),
        execute(max_rows=2),
        sync(),
    )
    book.server(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        data_row(b"1"),
        data_row(b"2"),
        SUSPENDED,
        data_row(b"3"),
        data_row(b"4"),
        SUSPENDED,
        data_row(b"5"),
        complete("SELECT 1"),
        ready(b"T"),
    )
    assert [(e.status, e.command_tag, e.rows) for e in book.events] == [
        ("ok", "(portal suspended)", 2),
        ("ok", "(portal suspended)", 2),
        ("ok", "SELECT 1", 1),
    ]


def test_a_prepared_statement_run_many_times_records_each_run_with_its_parameters() -> None:
    book = Playbook()
    book.client(parse("select $1::int", name="s1"), sync())
    book.server(PARSE_COMPLETE, ready())
    for i in range(5):
        book.client(bind([str(i).encode()], statement="s1"), execute(), sync())
        book.server(BIND_COMPLETE, data_row(b"x"), complete("SELECT 1"), ready())
    assert [
        (e.statement_name, e.parameters[0].value if e.parameters else None) for e in book.events
    ] == [("s1", str(i)) for i in range(5)]


def test_a_repeated_parse_is_recorded_alike_each_time_and_redaction_still_applies() -> None:
    # The tracker remembers decoded Parse messages by their bytes; a remembered
    # one must give exactly what decoding it afresh gives, masking included.
    book = Playbook(redactor=Redactor.build(secrets=["stored-secret"]))
    for i in range(3):
        book.client(
            parse("select $1::int, 'stored-secret'"),
            bind([str(i).encode()]),
            execute(),
            parse("alter role bob password $1", name="pw"),
            bind([b"hunter3"], statement="pw"),
            execute(),
            sync(),
        )
        book.server(
            PARSE_COMPLETE,
            BIND_COMPLETE,
            complete("SELECT 1"),
            PARSE_COMPLETE,
            BIND_COMPLETE,
            complete("ALTER ROLE"),
            ready(),
        )
    assert [
        (e.statement_name, e.sql, [p.value for p in e.parameters or ()], e.status)
        for e in book.events
    ] == [
        row
        for i in range(3)
        for row in (
            ("", "select $1::int, '***'", [str(i)], "ok"),
            ("pw", "alter role bob password $1", ["***"], "ok"),
        )
    ]


def test_an_error_in_a_pipeline_skips_the_rest_up_to_sync() -> None:
    book = Playbook()
    book.client(
        parse("insert into t values (1)"),
        bind([]),
        execute(),
        parse("select 1/0"),
        bind([]),
        execute(),
        parse("insert into t values (3)"),
        bind([]),
        execute(),
        sync(),
        parse("select 4"),
        bind([]),
        execute(),
        sync(),
    )
    book.server(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        complete("INSERT 0 1"),
        PARSE_COMPLETE,
        BIND_COMPLETE,
        error("22012", "division by zero"),
        ready(b"I"),
    )
    book.server(PARSE_COMPLETE, BIND_COMPLETE, data_row(b"4"), complete("SELECT 1"), ready())
    assert summary(book.events) == [
        ("extended", "insert into t values (1)", "ok", "INSERT 0 1", 1, None),
        ("extended", "select 1/0", "error", None, None, "22012"),
        ("extended", "insert into t values (3)", "skipped", None, None, None),
        ("extended", "select 4", "ok", "SELECT 1", 1, None),
    ]
    assert book.events[1].error_message == "division by zero"


def test_a_failed_parse_is_recorded_and_its_execute_skipped() -> None:
    book = Playbook()
    book.client(parse("selec 1"), bind([]), execute(), sync())
    book.server(error("42601", "syntax error"), ready())
    assert [(e.sql, e.status, e.sqlstate) for e in book.events] == [
        ("selec 1", "error", "42601"),
        ("selec 1", "skipped", None),
    ]


def test_a_cancelled_statement_is_recorded_as_cancelled() -> None:
    book = Playbook()
    book.client(query("select pg_sleep(60)"))
    book.server(error("57014", "canceling statement due to user request"), ready())
    assert summary(book.events) == [
        ("simple", "select pg_sleep(60)", "cancelled", None, None, "57014")
    ]


def test_copy_in_records_rows_and_bytes() -> None:
    book = Playbook()
    book.client(query("copy t from stdin"))
    book.server(encode_message(ord("G"), b"\x00\x00\x00"))
    book.client(copy_data(b"1\tone\n"), copy_data(b"2\ttwo\n"), copy_done())
    book.server(complete("COPY 2"), ready())
    event = book.events[0]
    assert (event.copy_direction, event.copy_bytes, event.rows, event.command_tag) == (
        "in",
        12,
        2,
        "COPY 2",
    )


def test_copy_out_records_rows_and_bytes() -> None:
    book = Playbook()
    book.client(query("copy t to stdout"))
    book.server(
        encode_message(ord("H"), b"\x00\x00\x00"),
        copy_data(b"1\tone\n"),
        copy_data(b"22\ttwo\n"),
        encode_message(ord("c"), b""),
        complete("COPY 2"),
        ready(),
    )
    event = book.events[0]
    assert (event.copy_direction, event.copy_bytes, event.rows) == ("out", 13, 2)


def test_an_empty_query_is_recorded() -> None:
    book = Playbook()
    book.client(query(""))
    book.server(EMPTY, ready())
    assert summary(book.events) == [("simple", "", "ok", "(empty query)", None, None)]


def test_statements_without_an_outcome_are_incomplete_when_the_connection_ends() -> None:
    book = Playbook()
    book.client(query("select pg_sleep(600)"))
    assert summary(book.close()) == [
        ("simple", "select pg_sleep(600)", "incomplete", None, None, None)
    ]


def test_binary_parameters_are_base64_and_long_values_truncated() -> None:
    book = Playbook(max_value_bytes=4)
    book.client(parse("select $1"), bind([b"\x00\x01\xff"], binary=True), execute(), sync())
    book.client(bind([b"abcdefgh"]), execute(), sync())
    book.server(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        complete("SELECT 1"),
        ready(),
        BIND_COMPLETE,
        complete("SELECT 1"),
        ready(),
    )
    first, second = (e.parameters[0] for e in book.events if e.parameters)
    assert (first.format, first.value, first.truncated) == ("binary", "AAH/", False)
    assert (second.format, second.value, second.truncated) == ("text", "abcd", True)


def test_parameter_modes_types_and_none() -> None:
    for mode, expected in (("types", [(1, 23, "text", None)]), ("none", None)):
        book = Playbook(parameter_mode=mode)
        book.client(parse("select $1", types=(23,)), bind([b"7"]), execute(), sync())
        book.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), ready())
        params = book.events[0].parameters
        got = None if params is None else [(p.index, p.type_oid, p.format, p.value) for p in params]
        assert got == expected


def test_passwords_in_sql_and_parameters_are_masked() -> None:
    book = Playbook(redactor=Redactor.build(secrets=["stored-secret"]))
    book.client(query("ALTER ROLE bob PASSWORD 'hunter2'"))
    book.server(complete("ALTER ROLE"), ready())
    book.client(parse("alter role bob password $1"), bind([b"hunter3"]), execute(), sync())
    book.server(PARSE_COMPLETE, BIND_COMPLETE, complete("ALTER ROLE"), ready())
    book.client(query("select 'stored-secret'"))
    book.server(complete("SELECT 1"), ready())
    assert [e.sql for e in book.events] == [
        "ALTER ROLE bob PASSWORD '***'",
        "alter role bob password $1",
        "select '***'",
    ]
    assert book.events[1].parameters is not None and book.events[1].parameters[0].value == "***"


def test_password_literals_are_masked_in_any_case_and_beside_non_ascii_text() -> None:
    redactor = Redactor.build()
    assert redactor.sql("alter role bob PassWord 'x'") == "alter role bob PassWord '***'"
    assert (
        redactor.sql("-- Grüße\nALTER ROLE b PASSWORD 'é'")
        == "-- Grüße\nALTER ROLE b PASSWORD '***'"
    )
    # U+017F (long s) matches "s" case-insensitively: non-ASCII text always gets
    # the full expression, never the ASCII shortcut.
    assert redactor.sql("ALTER ROLE b PA\u017fSWORD 'x'") == "ALTER ROLE b PA\u017fSWORD '***'"
    assert Redactor.hides_parameters("alter role b pa\u017fsword $1")
    assert not Redactor.hides_parameters("select passwords_total from stats")


def test_a_nul_in_a_text_parameter_is_recorded_as_a_replacement_character() -> None:
    # PostgreSQL text can't hold NUL, and the store refuses one: the whole batch
    # would be refused over and over. The server refuses the value too.
    book = Playbook()
    book.client(parse("select $1::text"), bind([b"a\x00b"]), execute(), sync())
    book.server(PARSE_COMPLETE, BIND_COMPLETE, error("22021", "invalid byte sequence"), ready())
    (event,) = book.events
    assert event.parameters is not None
    assert event.parameters[0].value == "a\ufffdb"


@pytest.mark.parametrize(
    ("nanoseconds", "milliseconds"),
    [(1_234_499, 1.234), (1_234_500, 1.235), (2_000_000, 2.0), (400, 0.0), (0, 0.0)],
)
def test_a_duration_is_milliseconds_to_the_nearest_microsecond(
    nanoseconds: int, milliseconds: float
) -> None:
    book = Playbook()
    book.client(query("select 1"))
    # The playbook's clock moves 1 µs for each of CommandComplete and ReadyForQuery.
    book.now += nanoseconds - 2000
    book.server(complete("SELECT 1"), ready())
    (event,) = book.events
    assert type(event.duration_ms) is float
    assert event.duration_ms == milliseconds


def test_what_the_store_would_refuse_never_leaves_the_tracker() -> None:
    # Each of these once made the store refuse a whole batch, again on every retry.
    book = Playbook()
    book.client(query("select 1"))
    book.now -= 10_000_000  # the wall clock steps back mid-statement
    book.server(complete("SELECT 99999999999999999999"), ready())
    book.client(query("select 2"))
    book.server(error_response("ERROR", "E1", "not a SQLSTATE"), ready())
    first, second = book.events
    assert (first.duration_ms, first.rows, first.command_tag) == (
        0.0,
        None,
        "SELECT 99999999999999999999",
    )
    assert (second.status, second.sqlstate, second.error_message) == (
        "error",
        None,
        "not a SQLSTATE",
    )
    assert rows_from_tag("SELECT ١٢") is None  # Arabic-Indic digits are digits to str


def test_configured_patterns_are_masked() -> None:
    redactor = Redactor.build(patterns=[r"ssn=(\d+)", r"secret_\w+"])
    assert redactor.sql("select 'ssn=123456', secret_token") == "select 'ssn=***', ***"


def test_dollar_quoted_and_escaped_password_literals_are_masked() -> None:
    redactor = Redactor.build()
    assert (
        redactor.sql("CREATE ROLE a PASSWORD $pw$x'y$pw$ LOGIN")
        == "CREATE ROLE a PASSWORD '***' LOGIN"
    )
    assert redactor.sql("create user a with password E'a\\'b' valid until 'x'") == (
        "create user a with password '***' valid until 'x'"
    )


def test_rows_from_tag() -> None:
    assert [
        rows_from_tag(t) for t in ("INSERT 0 5", "SELECT 3", "UPDATE 0", "CREATE TABLE", "COPY 7")
    ] == [5, 3, 0, None, 7]


def test_a_function_call_is_recorded_with_its_arguments() -> None:
    book = Playbook()
    body = struct.pack("!IhhhI", 177, 1, 0, 2, 2) + b"40" + struct.pack("!I", 1) + b"2"
    book.client(encode_message(ord("F"), body + struct.pack("!h", 0)))
    book.server(encode_message(ord("V"), struct.pack("!I", 2) + b"42"), ready())
    event = book.events[0]
    assert (event.protocol, event.sql, event.status, event.command_tag) == (
        "function_call",
        "-- FunctionCall oid 177",
        "ok",
        "FUNCTION CALL",
    )
    assert [(p.index, p.value) for p in event.parameters or ()] == [(1, "40"), (2, "2")]


def test_a_query_longer_than_the_tap_limit_is_recorded_truncated_not_dropped() -> None:
    book = Playbook()
    book.client_tracker.tap_limit = 32
    sql = "insert into t values " + ", ".join(f"({i})" for i in range(100))
    book.client(query(sql))
    book.server(complete("INSERT 0 100"), ready())
    (event,) = book.events
    assert event.sql == sql[:32] + " …[truncated]"
    assert (event.status, event.rows) == ("ok", 100)


def test_a_bind_longer_than_the_tap_limit_keeps_the_parameters_it_has() -> None:
    book = Playbook()
    book.client_tracker.tap_limit = 40
    book.client(parse("select $1, $2, $3"), bind([b"a", b"x" * 100, b"c"]), execute(), sync())
    book.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), ready())
    (event,) = book.events
    params = event.parameters or ()
    assert [(p.index, p.value, p.truncated) for p in params] == [
        (1, "a", False),
        (2, "x" * 23, True),
        (3, None, True),
    ]
