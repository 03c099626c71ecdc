"""The README's pictures of the console, taken by the test run itself: the
sessions list, a session's timeline and the SQL terminal, in Debian's chromium
against a real daemon and PostgreSQL, written to ``docs/img/`` (committed, so
the README shows what the console looks like as of the last run).

Each picture is taken only once the page shows what it is a picture of (the
test fails otherwise), so a broken page never becomes a README picture."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Console, Pages
from harness import psql
from playwright.sync_api import Page, expect
from sessions_support import wait_recorded

PICTURES = Path(__file__).resolve().parents[3] / "docs" / "img"
VIEWPORT = {"width": 1280, "height": 720}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _picture(page: Page, name: str) -> None:
    path = PICTURES / name
    PICTURES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=False)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_readme_pictures_of_sessions_timeline_and_terminal(web: Pages, console: Console) -> None:
    access = console.gw.access(account="scram", duration="30m").wait_ready()
    statements = (
        "select count(*) from pg_stat_activity",
        "select current_user, now()::date as today",
        "create temporary table orders (id int primary key, amount numeric)",
        "insert into orders values (1, 19.90), (2, 5.00)",
        "update orders set amount = amount * 2 where id = 2",
        "select * from missing_table",
    )
    try:
        psql(access, *statements)
        session_id = next(
            s["id"]
            for s in console.gw.cli_json("sessions", "list")
            if s["id"].startswith(access.session_prefix)
        )
        wait_recorded(console, session_id, statements[-1])
    finally:
        access.stop()

    terminal = web.as_user("mia")
    terminal.set_viewport_size(VIEWPORT)
    terminal.goto(console.url("/terminal"))
    terminal.fill("form.open-grant input[name=resource]", "prod")
    terminal.fill("form.open-grant input[name=account]", "scram")
    terminal.fill("form.open-grant input[name=reason]", "INC-4711: check the replicas")
    terminal.click("form.open-grant button[type=submit]")
    terminal.wait_for_url(re.compile(r".*/ui/terminal/[0-9a-f]+$"))
    terminal.fill(
        "textarea[name=sql]",
        "select datname, pg_size_pretty(pg_database_size(datname)) as size,\n"
        "       datallowconn, datconnlimit\n  from pg_database order by 1",
    )
    terminal.click("#run")
    expect(terminal.locator("#result table.web-rows th")).to_have_text(
        ["datname", "size", "datallowconn", "datconnlimit"]
    )
    _picture(terminal, "web-terminal.png")

    page = web.as_user("ada")
    page.set_viewport_size(VIEWPORT)
    page.goto(console.url("/sessions"))
    row = page.locator(f"#session-{session_id}")
    expect(row).to_be_visible()
    expect(row.locator("[data-verified]")).to_have_text("verified")
    expect(page.locator("tbody tr")).to_have_count(2)  # and mia's live one from the browser
    _picture(page, "web-sessions.png")

    page.goto(console.url(f"/sessions/{session_id}"))
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text("update orders set amount")
    expect(timeline.locator("tr.error", has_text="missing_table")).to_contain_text("42P01")
    _picture(page, "web-timeline.png")

    terminal.click("form.web-close button")
    terminal.wait_for_url(console.url("/terminal"))
