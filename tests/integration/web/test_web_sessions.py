"""The Sessions pages in Debian's chromium against a real daemon: filtering the
list, a timeline showing what psql just ran, a live timeline growing without a
reload, terminating from the page, and the Verify button."""

from __future__ import annotations

import re
import subprocess

import psycopg
import pytest
from conftest import Console, Pages
from harness import psql
from playwright.sync_api import Dialog, expect
from sessions_support import connect, held_grant, wait_recorded


def test_filter_the_list_and_open_the_timeline_psql_just_wrote(
    web: Pages, console: Console
) -> None:
    access = console.gw.access(account="md5").wait_ready()
    session_id = None
    try:
        ran = psql(access, "select 'from psql' as hello", "select * from not_there_psql")
        assert "from psql" in ran.stdout
        session_id = next(
            s["id"]
            for s in console.gw.cli_json("sessions", "list")
            if s["id"].startswith(access.session_prefix)
        )
        wait_recorded(console, session_id, "select * from not_there_psql")
    finally:
        access.stop()
    page = web.as_user("ada")
    page.goto(console.url("/sessions"))
    page.select_option("select[name=errors]", "yes")
    page.fill("input[name=account]", "md5")
    page.click("#session-filters button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/sessions\?.*errors=yes.*"))
    row = page.locator(f"#session-{session_id}")
    expect(row).to_be_visible()
    expect(row.locator("[data-verified]")).to_have_text("verified")  # the lazy badge
    row.locator("a").first.click()
    page.wait_for_url(console.url(f"/sessions/{session_id}"))
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text("select 'from psql' as hello")
    failed = timeline.locator("tr.error", has_text="not_there_psql")
    expect(failed).to_contain_text("42P01")
    expect(failed).to_contain_text('relation "not_there_psql" does not exist')
    page.click("text=Verify")
    expect(page.locator("#verify-result")).to_have_text("verified")


def test_a_live_timeline_grows_and_an_admin_terminates_it(web: Pages, console: Console) -> None:
    with held_grant(console, "mia") as grant, connect(grant) as conn:
        conn.execute("select 'before the page'")
        wait_recorded(console, grant["id"], "select 'before the page'")
        page = web.as_user("ada")
        page.goto(console.url(f"/sessions/{grant['id']}"))
        timeline = page.locator("#timeline")
        expect(timeline).to_contain_text("select 'before the page'")
        conn.execute("select 'after the page opened'")
        expect(timeline).to_contain_text("select 'after the page opened'")  # no reload
        page.fill("#terminate input[name=reason]", "seen enough")
        asked: list[str] = []

        def confirm(dialog: Dialog) -> None:
            asked.append(dialog.message)
            dialog.accept()

        page.on("dialog", confirm)
        page.click("#terminate button[type=submit]")
        expect(page.locator("#terminate-result")).to_contain_text("Terminated")
        assert asked and "Terminate this session" in asked[0]
        with pytest.raises(psycopg.errors.AdminShutdown) as cut:
            conn.execute("select 'too late'")
        assert "revoked by ada: seen enough" in str(cut.value)
        # The stream's last event shows how it ended.
        expect(page.locator("#live-state .end-reason")).to_have_text("revoked")


def test_auditors_and_members_see_no_terminate_button(web: Pages, console: Console) -> None:
    with held_grant(console, "mia") as grant:
        for user in ("aude", "mia"):
            page = web.as_user(user)
            page.goto(console.url(f"/sessions/{grant['id']}"))
            expect(page.locator("h1")).to_contain_text(grant["id"][:12])
            expect(page.locator("#terminate")).to_have_count(0)


def test_a_member_cannot_open_another_members_session(web: Pages, console: Console) -> None:
    with held_grant(console, "mia") as grant:
        page = web.as_user("max")
        answer = page.goto(console.url(f"/sessions/{grant['id']}"))
        assert answer is not None and answer.status == 404
        expect(page.locator(".problem")).to_contain_text("not found")
        page.goto(console.url("/sessions"))
        expect(page.locator(f"#session-{grant['id']}")).to_have_count(0)


def test_terminate_from_the_page_ends_a_running_psql_with_the_reason(
    web: Pages, console: Console
) -> None:
    access = console.gw.access(account="scram").wait_ready()
    waiting = subprocess.Popen(
        ["psql", access.url, "-X", "-c", "select 'psql is waiting'", "-c", "select pg_sleep(120)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        session_id = next(
            s["id"]
            for s in console.gw.cli_json("sessions", "list")
            if s["id"].startswith(access.session_prefix)
        )
        wait_recorded(console, session_id, "select 'psql is waiting'")
        page = web.as_user("ada")
        page.goto(console.url(f"/sessions/{session_id}"))
        page.fill("#terminate input[name=reason]", "INC-7 containment")
        page.on("dialog", lambda dialog: dialog.accept())
        page.click("#terminate button[type=submit]")
        expect(page.locator("#terminate-result")).to_contain_text("Terminated")
        _, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
        access.stop()
    assert waiting.returncode != 0
    assert "FATAL" in err and "revoked by ada: INC-7 containment" in err, err
    assert console.gw.cli_json("sessions", "show", session_id)["session"]["end_reason"] == "revoked"
