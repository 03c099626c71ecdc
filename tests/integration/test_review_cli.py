"""The review commands against a real daemon: `pam sessions` and `pam audit`.

Real `pam db access` sessions, real psql and psycopg statements, and the review
CLI run as separate processes exactly as a reviewer runs them. Text output is
checked for what a person needs to see (the SQL, the error, the paging
footer); `--json`, JSONL and CSV output is checked exactly against the control
API.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import re
import secrets
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import Gateway, psql

from cli.client import ApiError

pytestmark = pytest.mark.integration

WAIT_SECONDS = 30.0
#: The CSV export's header, spelled out: it is an interface a SIEM relies on.
CSV_HEADER = (
    "session_id,seq,kind,occurred_at,recorded_at,connection_id,requester,resource_name,"
    "account_name,protocol,statement_name,portal_name,sql,parameters,command_tag,rows,status,"
    "sqlstate,error_message,duration_ms,copy_direction,copy_bytes,detail,prev_hash,hash"
)


#: One statement of the `pam sessions show` timeline: seq, local time, connection,
#: protocol, duration, status, outcome (18 columns) and the SQL on one line.
STATEMENT_LINE = re.compile(
    r"^\s*\d+ \d\d:\d\d:\d\d\.\d{3} (#\d+)\s+(\w+)\s+[\d.]+ ms (\w+)\s+(.{18}) (.*)$"
)


def api_trail(gateway: Gateway, session: str) -> list[dict[str, Any]]:
    with gateway.api() as client:
        records: list[dict[str, Any]] = client.get(f"/v1/sessions/{session}/audit", limit=10_000)
    return records


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"][:8] for item in items]


def test_sessions_list_filters_by_resource_account_user_time_and_state(
    gateway: Gateway,
) -> None:
    ended = gateway.access().wait_ready()
    assert ended.stop() == 0
    live = gateway.access(account="md5").wait_ready()
    me = getpass.getuser()
    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
    an_hour_ago = (datetime.now() - timedelta(hours=1)).isoformat(timespec="seconds")

    def listed(*args: str) -> list[str]:
        return ids(gateway.cli_json("sessions", "list", *args))

    both = [live.session_prefix, ended.session_prefix]
    assert listed() == both
    assert listed("--resource", "prod") == both
    assert listed("--resource", "staging") == []
    assert listed("--account", "md5") == [live.session_prefix]
    assert listed("--account", "scram", "--resource", "prod") == [ended.session_prefix]
    assert listed("--user", me) == both
    assert listed("--user", f"not-{me}") == []
    assert listed("--since", "1h") == both
    assert listed("--since", an_hour_ago) == both  # local time, no zone
    assert listed("--since", tomorrow) == []
    assert listed("--until", "1h") == []
    assert listed("--until", tomorrow, "--since", "30m") == both
    assert listed("--active") == [live.session_prefix]
    assert listed("--active", "--account", "scram") == []
    assert listed("--limit", "1") == [live.session_prefix]

    table = gateway.cli("sessions", "list", "--account", "scram", "--since", "2h").stdout
    assert ended.session_prefix in table and live.session_prefix not in table
    assert re.search(rf"{ended.session_prefix}\S*\s.*{me}\s.*prod/scram\s.*client_ended", table)

    bad = gateway.cli("sessions", "list", "--since", "last tuesday", check=False)
    assert bad.returncode == 2
    assert "Invalid value for '--since': 'last tuesday' is not a time" in bad.stderr


def test_sessions_show_prints_a_paged_timeline_with_errors_highlighted(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = f"review_show_{secrets.token_hex(5)}"
    access = gateway.access().wait_ready()
    psql(
        access,
        f"create table {table} (id int, note text)",
        f"insert into {table} values (1, 'first'), (2, 'second')",
        f"select note\n  from {table}\n  order by id",
        "select 1/0",
    )
    with psycopg.connect(access.dsn(application_name="review-app"), autocommit=True) as conn:
        conn.execute(f"select note from {table} where id = %t::int and note = %t", (2, "second"))
        conn.execute(f"select count(*) from {table}")
        conn.execute("select 'done'")
    assert access.stop() == 0
    prefix = access.session_prefix

    text = gateway.cli("sessions", "show", prefix).stdout
    lines = text.splitlines()
    assert re.search(r"^statements\s+7$", text, re.MULTILINE)
    assert re.search(r"#2\s.*review-app\s.*client_closed", text)
    timeline = [m.groups() for line in lines if (m := STATEMENT_LINE.match(line))]
    assert [
        (conn, protocol, status, outcome.strip(), sql)
        for conn, protocol, status, outcome, sql in timeline
    ] == [
        ("#1", "simple", "ok", "CREATE TABLE", f"create table {table} (id int, note text)"),
        (
            "#1",
            "simple",
            "ok",
            "INSERT 0 2",
            f"insert into {table} values (1, 'first'), (2, 'second')",
        ),
        ("#1", "simple", "ok", "SELECT 2", f"select note from {table} order by id"),
        ("#1", "simple", "error", "-", "select 1/0"),
        (
            "#2",
            "extended",
            "ok",
            "SELECT 1",
            f"select note from {table} where id = $1::int and note = $2",
        ),
        ("#2", "simple", "ok", "SELECT 1", f"select count(*) from {table}"),
        ("#2", "simple", "ok", "SELECT 1", "select 'done'"),
    ]
    error_at = next(i for i, line in enumerate(lines) if line.endswith("select 1/0"))
    assert lines[error_at + 1].strip() == "ERROR 22012: division by zero"
    assert "$1='2'  $2='second'" in text

    monkeypatch.setenv("FORCE_COLOR", "1")
    colored = gateway.cli("sessions", "show", prefix).stdout
    assert "\x1b[1;31merror     \x1b[0m" in colored
    assert re.search(r"\x1b\[1;31m\s+ERROR 22012: division by zero\x1b\[0m", colored)
    monkeypatch.delenv("FORCE_COLOR")

    full_id = gateway.cli_json("sessions", "show", prefix)["session"]["id"]
    first = gateway.cli("sessions", "show", prefix, "--page-size", "3").stdout
    assert first.splitlines()[-1] == (
        f"page 1 of 3 — next: pam sessions show {full_id[:12]} --page 2 --page-size 3"
    )
    assert "select 1/0" not in first and f"create table {table}" in first
    last = gateway.cli("sessions", "show", prefix, "--page-size", "3", "--page", "3").stdout
    assert last.splitlines()[-1] == "page 3 of 3"
    assert "select 'done'" in last and "create table" not in last

    page = gateway.cli_json("sessions", "show", prefix, "--page-size", "3", "--page", "2")
    assert sorted(page) == [
        "connections",
        "live_connections",
        "page",
        "page_size",
        "pages",
        "session",
        "statement_count",
        "statements",
    ]
    assert (page["page"], page["pages"], page["page_size"], page["statement_count"]) == (2, 3, 3, 7)
    assert page["session"]["id"] == full_id
    assert [r["sql"] for r in page["statements"]] == [
        "select 1/0",
        f"select note from {table} where id = $1::int and note = $2",
        f"select count(*) from {table}",
    ]
    everything = gateway.cli_json("sessions", "show", prefix, "--all")
    statements = [r for r in api_trail(gateway, prefix) if r["kind"] == "statement"]
    assert everything["statements"] == statements
    assert everything["page"] is None and len(statements) == 7

    past = gateway.cli("sessions", "show", prefix, "--page-size", "3", "--page", "4", check=False)
    assert one_error_line(past) == (
        "error: page 4 is past the last page: 7 statements make 3 pages of 3"
    )


def test_sessions_export_writes_every_record_as_jsonl_or_csv(
    gateway: Gateway, tmp_path: Path
) -> None:
    first = gateway.access().wait_ready()
    with psycopg.connect(first.dsn(), autocommit=True) as conn:
        conn.execute("select %t::int + 1, %t", (41, 'quoted "value", with comma'))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
    assert first.stop() == 0
    second = gateway.access(account="md5").wait_ready()
    psql(second, "select 'second session'")
    assert second.stop() == 0
    first_trail = api_trail(gateway, first.session_prefix)
    second_trail = api_trail(gateway, second.session_prefix)
    assert [r["kind"] for r in first_trail] == [
        "connection_start",
        "statement",
        "statement",
        "connection_end",
    ]

    jsonl = gateway.cli("sessions", "export", first.session_prefix, "--format", "jsonl").stdout
    assert [json.loads(line) for line in jsonl.splitlines()] == first_trail

    exported = gateway.cli("sessions", "export", first.session_prefix, "--format", "csv").stdout
    assert exported.splitlines()[0] == CSV_HEADER
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert len(rows) == len(first_trail)
    assert [(int(r["seq"]), r["kind"], r["sql"]) for r in rows] == [
        (r["seq"], r["kind"], r["sql"] or "") for r in first_trail
    ]
    parameters = json.loads(rows[1]["parameters"])
    assert parameters == first_trail[1]["parameters"]
    assert [p["value"] for p in parameters] == ["41", 'quoted "value", with comma']
    assert (rows[2]["status"], rows[2]["sqlstate"], rows[2]["error_message"]) == (
        "error",
        "22012",
        "division by zero",
    )
    assert rows[0]["parameters"] == "" and json.loads(rows[0]["detail"])["user"] == first.user

    target = tmp_path / "window.jsonl"
    summary = gateway.cli("sessions", "export", "--since", "1h", "--output", str(target)).stdout
    total = len(first_trail) + len(second_trail)
    assert summary.strip() == f"Exported {total} records of 2 sessions to {target}."
    window = [json.loads(line) for line in target.read_text().splitlines()]
    assert window == first_trail + second_trail  # oldest session first, each in seq order
    target_csv = tmp_path / "empty.csv"
    gateway.cli(
        "sessions", "export", "--until", "1h", "--format", "csv", "--output", str(target_csv)
    )
    assert target_csv.read_text() == CSV_HEADER + "\n"

    mixed = gateway.cli("sessions", "export", first.session_prefix, "--since", "1h", check=False)
    assert mixed.returncode == 2
    assert "--since/--until select sessions" in mixed.stderr


def test_the_export_is_the_daemons_stream_and_a_wrong_format_is_refused_before_it(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    psql(access, *[f"select {n}, 'a,\"b\"'" for n in range(12)])
    assert access.stop() == 0
    prefix = access.session_prefix

    with gateway.api() as client:
        with client.export_session(prefix, fmt="csv") as stream:
            assert stream.sessions == 1
            streamed = b"".join(stream.chunks())
        with (
            pytest.raises(ApiError, match="format: 'xml' is not one of jsonl, csv"),
            client.export_window(fmt="xml"),
        ):
            pytest.fail("a refused export has no stream")
    printed = subprocess.run(
        [sys.executable, "-m", "cli", "sessions", "export", prefix, "--format", "csv"],
        capture_output=True,
        env=gateway.env,
        timeout=120,
        check=True,
    ).stdout
    assert printed == streamed
    assert len(list(csv.reader(io.StringIO(streamed.decode())))) == 1 + 2 + 12


def test_audit_search_finds_statements_and_verify_reports_the_trail_intact(
    gateway: Gateway,
) -> None:
    table = f"review_search_{secrets.token_hex(5)}"
    access = gateway.access().wait_ready()
    psql(
        access,
        f"create table {table} (id int)",
        f"DROP TABLE {table}",
        f"select * from {table}",
    )
    assert access.stop() == 0
    other = gateway.access(account="md5").wait_ready()
    psql(other, "select 'drop table is only text here'")
    assert other.stop() == 0
    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()

    def found(*args: str) -> list[tuple[str, str]]:
        records = gateway.cli_json("audit", "search", *args)
        return [(r["session_id"][:8], r["sql"]) for r in records]

    assert found("drop table", "--since", "7d") == [
        (other.session_prefix, "select 'drop table is only text here'"),
        (access.session_prefix, f"DROP TABLE {table}"),
    ]
    assert found("DROP TABLE", "--since", "7d", "--account", "scram") == [
        (access.session_prefix, f"DROP TABLE {table}")
    ]
    assert found("drop table", "--session", other.session_prefix) == [
        (other.session_prefix, "select 'drop table is only text here'")
    ]
    assert found(table, "--status", "error") == [(access.session_prefix, f"select * from {table}")]
    assert found("drop table", "--since", tomorrow) == []
    assert found("drop table", "--until", "1h") == []
    assert found("drop table", "--user", "someone-else") == []
    assert found(table, "--resource", "prod", "--limit", "1") == [
        (access.session_prefix, f"select * from {table}")
    ]

    text = gateway.cli("audit", "search", "DROP TABLE", "--since", "7d").stdout
    me = getpass.getuser()
    row = rf"{access.session_prefix}\s.*\s{me}\s.*prod/scram\s.*ok\s.*DROP TABLE {table}"
    assert re.search(row, text)
    assert gateway.cli("audit", "search", "no such text").stdout.strip() == "No matching records."

    verified = gateway.cli("audit", "verify")
    assert verified.stdout == "audit trail intact: 2 sessions checked\n"
    one = gateway.cli_json("audit", "verify", access.session_prefix)
    assert one == {
        "ok": True,
        "session": access.session_prefix,
        "problems": [],
        "sessions_checked": 1,
    }
    unknown = gateway.cli("audit", "verify", "0123abcd", check=False)
    assert one_error_line(unknown) == "error: session '0123abcd' not found"


def test_review_output_escapes_control_characters_that_came_from_the_database(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    with psycopg.connect(
        access.dsn(), application_name="app\x1b[31m", autocommit=True, connect_timeout=20
    ) as conn:
        conn.execute("select '\x1b[2J' as cleared, '[bold]markup[/bold]' as shown")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute('select * from "\x1b]0;owned\x07"')
    assert access.stop() == 0
    prefix = access.session_prefix

    show = gateway.cli("sessions", "show", prefix).stdout
    search = gateway.cli("audit", "search", "cleared").stdout
    errors = gateway.cli("audit", "search", "owned", "--status", "error").stdout
    listing = gateway.cli("sessions", "list").stdout
    for output in (show, search, errors, listing):
        assert "\x1b" not in output and "\x07" not in output
    assert "select '\\x1b[2J' as cleared, '[bold]markup[/bold]' as shown" in show
    assert "app\\x1b[31m" in show
    assert 'relation "\\x1b]0;owned\\x07" does not exist' in show
    assert "'\\x1b[2J'" in search and '"\\x1b]0;owned\\x07"' in errors

    exported = [
        json.loads(line) for line in gateway.cli("sessions", "export", prefix).stdout.splitlines()
    ]
    assert "select '\x1b[2J' as cleared, '[bold]markup[/bold]' as shown" in [
        r["sql"] for r in exported
    ]


def test_review_tables_piped_at_80_columns_are_plain_lines_one_record_each(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    psql(access, "select 'a statement long enough to need more than eighty columns' as text")
    assert access.stop() == 0

    def piped(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            capture_output=True,
            text=True,
            env={**gateway.env, "COLUMNS": "80"},
            timeout=120,
            check=True,
        )
        return result.stdout

    listing = piped("sessions", "list").splitlines()
    assert listing[0].split() == [
        "SESSION",
        "REQUESTER",
        "RESOURCE/ACCOUNT",
        "STARTED",
        "ENDED",
        "DURATION",
        "STATE",
    ]
    assert len(listing) == 2 and listing[1].startswith(access.session_prefix)
    assert listing[1].rstrip().endswith("client_ended")
    search = piped("audit", "search", "eighty columns").splitlines()
    assert len(search) == 2
    assert search[1].endswith(
        "select 'a statement long enough to need more than eighty columns' as text"
    )
    show = piped("sessions", "show", access.session_prefix)
    connections = show.splitlines()[show.splitlines().index("Connections") + 2]
    assert connections.startswith("#1 ") and connections.rstrip().endswith("-")
    for output in (listing, search, show.splitlines()):
        assert not any(box in line for line in output for box in "│┃━─┏└")
