"""The Sessions pages at the HTTP level, against a real daemon: who may see,
export, verify and terminate which session, the filters and paging of the
list, the timeline, the live event stream, and CSRF on the state changes."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import threading
from typing import Any

import psycopg
import pytest
from conftest import Console
from harness import store_path, wait_for
from sessions_support import (
    connect,
    end_grant,
    held_grant,
    open_grant,
    session_of,
    wait_recorded,
)
from sqlalchemy import create_engine
from trail_support import edit_record

from gateway.app.web.routes.sessions import TIMELINE_PAGE


def _ids_on(page: str) -> list[str]:
    return re.findall(r'<tr id="session-([0-9a-f]{32})"', page)


def _statement_ran(console: Console, grant: dict[str, Any], *sql: str) -> None:
    with connect(grant) as conn:
        for statement in sql:
            with contextlib.suppress(psycopg.Error):  # some tests want an error on record
                conn.execute(statement)
    wait_recorded(console, grant["id"], sql[-1])


def test_members_list_their_own_sessions_and_reviewers_every_one(console: Console) -> None:
    mine = open_grant(console, "mia")
    theirs = open_grant(console, "max")
    with console.web_client("mia") as mia, console.web_client("aude") as aude:
        as_mia = mia.get("/ui/sessions")
        as_aude = aude.get("/ui/sessions")
    assert as_mia.status_code == as_aude.status_code == 200
    assert mine["id"] in _ids_on(as_mia.text)
    assert theirs["id"] not in _ids_on(as_mia.text)
    assert {mine["id"], theirs["id"]} <= set(_ids_on(as_aude.text))
    end_grant(console, mine["id"])
    end_grant(console, theirs["id"])


def test_another_members_session_is_not_found_on_every_route(console: Console) -> None:
    with held_grant(console, "mia") as grant:
        base = f"/ui/sessions/{grant['id']}"
        with console.web_client("max") as max_:
            for path in ("", "/export", "/export?format=csv", "/verified", "/stream"):
                assert max_.get(base + path).status_code == 404, path
            assert max_.post(base + "/verify").status_code == 404
            refused = max_.post(base + "/terminate", data={"reason": "no"})
            assert refused.status_code == 404
        with console.web_client("mia") as mia:
            assert mia.get(base).status_code == 200
        assert session_of(console, grant["id"])["ended_at"] is None


def test_the_list_filters_by_user_status_errors_and_end_reason(console: Console) -> None:
    with held_grant(console, "mia") as failing:
        _check_filters(console, failing)


def _check_filters(console: Console, failing: dict[str, Any]) -> None:
    _statement_ran(console, failing, "select 'fine'", "select * from no_such_table_here")
    clean = open_grant(console, "mia", account="md5")
    _statement_ran(console, clean, "select 'clean'")
    end_grant(console, clean["id"])

    def listed(**filters: str) -> set[str]:
        with console.web_client("aude") as aude:
            answer = aude.get("/ui/sessions", params={"size": "500", **filters})
        assert answer.status_code == 200, answer.text
        return set(_ids_on(answer.text))

    both = {failing["id"], clean["id"]}
    assert both <= listed(user="mia")
    assert not both & listed(user="max")
    assert listed(user="mia", errors="yes") & both == {failing["id"]}
    assert listed(user="mia", errors="no") & both == {clean["id"]}
    assert listed(user="mia", status="live") & both == {failing["id"]}
    assert listed(user="mia", status="ended", end_reason="client_ended") & both == {clean["id"]}
    assert listed(account="md5") & both == {clean["id"]}
    assert listed(resource="prod", project="default") >= both
    assert not listed(project="elsewhere") & both
    assert not listed(since="2999-01-01T00:00") & both
    # Empty fields (what a submitted form sends) are "not given".
    assert both <= listed(user="mia", status="", errors="", since="", end_reason="")
    with console.web_client("aude") as aude:
        assert aude.get("/ui/sessions", params={"errors": "maybe"}).status_code == 400
        assert aude.get("/ui/sessions", params={"end_reason": "bored"}).status_code == 400
        assert aude.get("/ui/sessions", params={"since": "yesterday"}).status_code == 400
        assert aude.get("/ui/sessions", params={"cursor": "s1.bogus"}).status_code == 400
    # Its row shows the counts.
    with console.web_client("aude") as aude:
        page = aude.get("/ui/sessions", params={"user": "mia", "errors": "yes"}).text
    row = page[page.index(f'id="session-{failing["id"]}"') :].split("</tr>")[0]
    assert re.findall(r'<td class="num">(\d+)</td>', row) == ["1", "2", "1"]


def test_the_list_pages_by_cursor_without_repeating_a_session(console: Console) -> None:
    for _ in range(3):
        end_grant(console, open_grant(console, "max")["id"])
    seen: list[str] = []
    with console.web_client("aude") as aude:
        answer = aude.get("/ui/sessions", params={"user": "max", "size": "2"})
        while True:
            assert answer.status_code == 200
            seen += _ids_on(answer.text)
            found = re.search(r'rel="next" href="([^"]+)"', answer.text)
            if found is None:
                break
            answer = aude.get(found.group(1).replace("&amp;", "&"))
        everything = _ids_on(aude.get("/ui/sessions", params={"user": "max"}).text)
    assert len(seen) >= 3
    assert seen == everything


def test_the_timeline_shows_statements_parameters_and_errors(console: Console) -> None:
    grant = open_grant(console, "mia")
    with connect(grant) as conn:
        conn.execute("select %s::text as greeting, '<b>web</b>' as markup", ("hello",))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from missing_for_timeline")
        conn.execute("select count(*) from pg_catalog.pg_class")
    wait_recorded(console, grant["id"], "select count(*) from pg_catalog.pg_class")
    with console.web_client("mia") as mia:
        page = mia.get(f"/ui/sessions/{grant['id']}").text
        hidden = mia.get(f"/ui/sessions/{grant['id']}", params={"hide_tools": "true"}).text
    sql = "select $1::text as greeting, &#39;&lt;b&gt;web&lt;/b&gt;&#39; as markup"
    assert sql in page  # escaped, never markup
    assert "<b>web</b>" not in page
    # The parameter, as the trail keeps it (by default its type, not its value).
    assert re.search(r'<div class="params"><code>\$1(::|=)', page)
    assert "42P01" in page and "missing_for_timeline" in page
    assert 'class="stmt error"' in page
    assert "extended" in page and "web-test" in page  # protocol; the connection's application
    assert "pg_catalog.pg_class" in page
    assert "pg_catalog.pg_class" not in hidden
    assert sql in hidden
    end_grant(console, grant["id"])


def test_a_long_timeline_pages_and_only_its_newest_page_is_live(console: Console) -> None:
    with held_grant(console, "mia") as grant:
        with connect(grant) as conn:
            for n in range(1, TIMELINE_PAGE + 6):
                conn.execute(f"select {n} as numbered")
        wait_recorded(console, grant["id"], f"select {TIMELINE_PAGE + 5} as numbered")
        path = f"/ui/sessions/{grant['id']}"
        with console.web_client("mia") as mia:
            newest = mia.get(path).text
            first = mia.get(path, params={"page": "1"}).text
            beyond = mia.get(path, params={"page": "99"}).text

    def numbers(page: str) -> list[int]:
        return [int(n) for n in re.findall(r"select (\d+) as numbered", page)]

    assert "Page 2 of 2" in newest and "Page 1 of 2" in first
    assert numbers(first) == list(range(1, TIMELINE_PAGE + 1))
    assert numbers(newest) == list(range(TIMELINE_PAGE + 1, TIMELINE_PAGE + 6))
    assert numbers(beyond) == numbers(newest)  # past the end: the newest page
    assert 'rel="next"' in first and 'rel="prev"' in newest
    assert "sse-connect" in newest and "sse-connect" not in first


def test_exports_stream_jsonl_and_csv_with_the_statements(console: Console) -> None:
    grant = open_grant(console, "mia")
    _statement_ran(console, grant, "select 'exported'")
    end_grant(console, grant["id"])
    with console.web_client("mia") as mia:
        lines = mia.get(f"/ui/sessions/{grant['id']}/export")
        table = mia.get(f"/ui/sessions/{grant['id']}/export", params={"format": "csv"})
        assert mia.get(f"/ui/sessions/{grant['id']}/export?format=xml").status_code == 400
        assert mia.get("/ui/sessions/export").status_code == 403  # the window: reviewers only
    assert lines.status_code == 200
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in lines.headers["content-disposition"]
    records = [json.loads(line) for line in lines.text.splitlines()]
    assert "select 'exported'" in [r["sql"] for r in records]
    assert table.headers["content-disposition"].endswith('.csv"')
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert "select 'exported'" in [r["sql"] for r in rows]
    with console.web_client("aude") as aude:
        window = aude.get("/ui/sessions/export", params={"format": "jsonl", "since": ""})
    assert window.status_code == 200
    assert "select 'exported'" in window.text


def test_search_finds_statements_for_reviewers_only(console: Console) -> None:
    grant = open_grant(console, "max")
    _statement_ran(console, grant, "select 'needle-in-the-trail'")
    end_grant(console, grant["id"])
    with console.web_client("aude") as aude:
        found = aude.get("/ui/sessions/search", params={"q": "NEEDLE-in"})
    assert found.status_code == 200
    assert "select &#39;needle-in-the-trail&#39;" in found.text
    assert grant["id"][:8] in found.text
    with console.web_client("max") as max_:
        assert max_.get("/ui/sessions/search", params={"q": "needle"}).status_code == 403


def test_verify_says_verified_then_names_the_edited_statement(console: Console) -> None:
    grant = open_grant(console, "mia")
    _statement_ran(console, grant, "select 'one'", "select 'two'")
    end_grant(console, grant["id"])
    path = f"/ui/sessions/{grant['id']}"
    with console.web_client("mia") as mia:
        assert 'data-verified="yes"' in mia.post(path + "/verify").text
        assert 'data-verified="yes"' in mia.get(path + "/verified").text
    with console.web_client("mia", csrf=False) as forged:
        assert forged.post(path + "/verify").status_code == 403
    seq = wait_recorded(console, grant["id"], "select 'two'")["seq"]
    store = create_engine(f"sqlite:///{store_path(console.gw)}")
    try:
        edit_record(store, grant["id"], seq, sql="select 'TWO'")
    finally:
        store.dispose()
    with console.web_client("mia") as mia:
        result = mia.post(path + "/verify").text
        badge = mia.get(path + "/verified").text
    assert 'data-verified="no"' in result and 'data-verified="no"' in badge
    assert f"seq {seq}: changed" in result
    assert "select &#39;TWO&#39;" in result


def test_only_an_admin_terminates_and_the_client_gets_the_reason(console: Console) -> None:
    with held_grant(console, "mia") as grant, connect(grant) as conn:
        path = f"/ui/sessions/{grant['id']}"
        conn.execute("select 1")
        with console.web_client("aude") as aude:
            assert "Terminate" not in aude.get(path).text
            refused = aude.post(path + "/terminate", data={"reason": "auditing"})
        with console.web_client("mia") as mia:
            assert "Terminate" not in mia.get(path).text
            own = mia.post(path + "/terminate", data={"reason": "mine"})
        with console.web_client("ada", csrf=False) as forged:
            no_token = forged.post(path + "/terminate", data={"reason": "forged"})
        assert (refused.status_code, own.status_code, no_token.status_code) == (403, 403, 403)
        assert "CSRF" in no_token.text
        assert conn.execute("select 'still here'").fetchone() == ("still here",)
        assert session_of(console, grant["id"])["ended_at"] is None
        with console.web_client("ada") as ada:
            assert "Terminate" in ada.get(path).text
            done = ada.post(
                path + "/terminate",
                data={"reason": "policy breach"},
                headers={"HX-Request": "true"},
            )
        assert done.status_code == 200, done.text
        assert "Terminated" in done.text
        with pytest.raises(psycopg.errors.AdminShutdown) as cut:
            conn.execute("select 'after'")
    assert "revoked by ada: policy breach" in str(cut.value)
    ended = session_of(console, grant["id"])
    assert ended["end_reason"] == "revoked"
    with console.web_client("ada") as ada:
        again = ada.post(path + "/terminate", data={"reason": "twice"})
    assert again.status_code == 400  # not live any more


def test_the_stream_sends_new_statements_then_the_end(console: Console) -> None:
    received: list[str] = []
    finished = threading.Event()
    with held_grant(console, "mia") as grant:
        conn = connect(grant)
        conn.execute("select 'before the stream'")
        before = wait_recorded(console, grant["id"], "select 'before the stream'")

        def listen() -> None:
            with (
                console.web_client("mia") as mia,
                mia.stream(
                    "GET",
                    f"/ui/sessions/{grant['id']}/stream",
                    params={"after_seq": str(before["seq"])},
                ) as stream,
            ):
                assert stream.headers["content-type"].startswith("text/event-stream")
                for line in stream.iter_lines():
                    received.append(line)
            finished.set()

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        conn.execute("select '<i>streamed</i>'")
        wait_for(lambda: any("streamed" in line for line in received))
        assert not finished.is_set()  # a live session's stream stays open
        conn.close()
    # Leaving the block ended the grant: the stream says so, then ends.
    assert finished.wait(30), "the stream did not end with the session"
    text = "\n".join(received)
    assert "event: statement" in text
    assert "&lt;i&gt;streamed&lt;/i&gt;" in text and "<i>" not in text
    assert "before the stream" not in text  # only what came after the page's last row
    assert "event: ended" in text
    assert text.index("streamed") < text.index("event: ended")
    reason = session_of(console, grant["id"])["end_reason"]
    assert f'<strong class="end-reason">{reason}</strong>' in text
