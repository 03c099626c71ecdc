"""The console's SQL terminal: grants opened from the browser, statements run
through the gateway by the console's own PostgreSQL client, in Debian's
chromium and at the HTTP level, against a real daemon and PostgreSQL 15."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from conftest import Console, Pages
from harness import Gateway, wait_for
from playwright.sync_api import Page, expect
from webclient import Authenticator, open_grant, trail

from gateway.app.web.security import CSRF_HEADER, SESSION_COOKIE, csrf_token
from gateway.config import ClientConfig
from gateway.testing.pgcluster import TempCluster

CONSOLE_APP = "pam web console ({})"


def run(client: httpx.Client, session_id: str, sql: str, **fields: str) -> httpx.Response:
    return client.post(f"/ui/terminal/{session_id}/run", data={"sql": sql, **fields})


@pytest.fixture
def grant(mia: httpx.Client) -> Iterator[str]:
    session_id = open_grant(mia)
    yield session_id
    mia.post(f"/ui/terminal/{session_id}/close")


def browser_grant(web: Pages, console: Console, user: str = "mia") -> Page:
    """A signed-in page on the terminal of a grant it opened through the form."""
    page = web.as_user(user)
    page.goto(console.url("/terminal"))
    page.fill("form.open-grant input[name=resource]", "prod")
    page.fill("form.open-grant input[name=account]", "scram")
    page.fill("form.open-grant input[name=reason]", "a look from the browser")
    page.click("form.open-grant button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/terminal/[0-9a-f]+$"))
    return page


def run_in_page(page: Page, sql: str) -> None:
    page.fill("textarea[name=sql]", sql)
    page.click("#run")


# --- in the browser ------------------------------------------------------------------


def test_a_query_from_the_browser_shows_its_rows_as_a_table(web: Pages, console: Console) -> None:
    page = browser_grant(web, console)
    run_in_page(page, "select 1 as one, null::text as nothing, 'a<b' as text")
    table = page.locator("#result table.web-rows")
    expect(table.locator("th")).to_have_text(["one", "nothing", "text"])
    expect(table.locator("tbody td")).to_have_text(["1", "NULL", "a<b"])
    expect(table.locator("td.null")).to_have_count(1)
    expect(page.locator("#result .row-count")).to_have_text("1 row")
    session_id = page.url.rsplit("/", 1)[1]
    session = console.gw.cli_json("sessions", "show", session_id)["session"]
    assert session["requester"] == "mia"
    assert session["reason"] == "a look from the browser"
    page.click("form.web-close button")
    page.wait_for_url(console.url("/terminal"))
    ended = console.gw.cli_json("sessions", "show", session_id)["session"]
    assert ended["end_reason"] == "client_ended"


def test_an_error_in_the_browser_shows_its_sqlstate(web: Pages, console: Console) -> None:
    page = browser_grant(web, console)
    run_in_page(page, "select 1/0")
    error = page.locator("#result .web-sql-error")
    expect(error.locator(".sqlstate")).to_have_text("22012")
    expect(error).to_contain_text("division by zero")


def test_the_cancel_button_cancels_a_running_statement(
    web: Pages, console: Console, pg: TempCluster
) -> None:
    page = browser_grant(web, console)
    session_id = page.url.rsplit("/", 1)[1]
    run_in_page(page, "select pg_sleep(30)")
    # Cancel once the server runs it (a bounded wait, no timing assertion).
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as admin:
        wait_for(
            lambda: admin.execute(
                "select 1 from pg_stat_activity where application_name = %s"
                " and state = 'active' and query like 'select pg_sleep%%'",
                (CONSOLE_APP.format("mia"),),
            ).fetchone()
        )
    page.click("#cancel")
    error = page.locator("#result .web-sql-error")
    expect(error.locator(".sqlstate")).to_have_text("57014")
    expect(error).to_contain_text("canceling statement due to user request")
    # The server did cancel it: the trail has the statement ended by 57014.
    sleeps = wait_for(
        lambda: (
            [s for s in trail(console, session_id) if s["sql"] == "select pg_sleep(30)"]
            if any(
                s["sql"] == "select pg_sleep(30)" and s["sqlstate"]
                for s in trail(console, session_id)
            )
            else None
        )
    )
    assert sleeps[0]["sqlstate"] == "57014"
    # The connection is usable again.
    run_in_page(page, "select 'after'")
    expect(page.locator("#result table.web-rows td")).to_have_text(["after"])


# --- at the HTTP level ---------------------------------------------------------------


def test_a_write_in_the_default_read_only_mode_fails_with_25006(
    mia: httpx.Client, grant: str
) -> None:
    answer = run(mia, grant, "create table web_terminal_nope (id int)")
    assert answer.status_code == 200
    assert '<code class="sqlstate">25006</code>' in answer.text
    assert "read-only transaction" in answer.text
    # Unticked on the page's form: a read-write transaction, committed.
    made = run(mia, grant, "create table web_terminal_rw (id int)", from_form="1")
    assert "<code>CREATE TABLE</code>" in made.text
    inserted = run(mia, grant, "insert into web_terminal_rw values (1), (2)", from_form="1")
    assert "<code>INSERT 0 2</code>" in inserted.text
    counted = run(mia, grant, "select count(*) from web_terminal_rw")
    assert "<td>2</td>" in counted.text
    # Without from_form a request is read-only whatever else it says.
    refused = run(mia, grant, "drop table web_terminal_rw")
    assert "25006" in refused.text
    assert (
        "<code>DROP TABLE</code>"
        in run(mia, grant, "drop table web_terminal_rw", from_form="1").text
    )


def test_statements_are_in_the_sessions_trail_under_the_web_user(
    console: Console, mia: httpx.Client, grant: str
) -> None:
    run(mia, grant, "select 'in the trail' as marker")
    records = wait_for(
        lambda: [s for s in trail(console, grant) if "in the trail" in s["sql"]] or None
    )
    assert records[0]["status"] == "ok"
    detail = console.gw.cli_json("sessions", "show", grant)
    assert detail["session"]["requester"] == "mia"
    assert detail["session"]["reported_host"] == "web console"
    assert {c["application_name"] for c in detail["connections"]} == {CONSOLE_APP.format("mia")}


def test_results_are_capped_and_paged(mia: httpx.Client, grant: str) -> None:
    first = run(mia, grant, "select g from generate_series(1, 1200) as g")
    assert first.text.count("<tr><td>") == 500
    assert "rows 1 to 500; more follow" in first.text
    assert 'name="offset" value="500"' in first.text
    third = run(mia, grant, "select g from generate_series(1, 1200) as g", offset="1000")
    assert third.text.count("<tr><td>") == 200
    assert "<td>1001</td>" in third.text and "more follow" not in third.text


def test_a_member_without_a_policy_for_the_resource_is_refused(console: Console) -> None:
    console.add_user("nina", "member")
    with console.web_client("nina") as nina:
        answer = nina.post(
            "/ui/terminal/open",
            data={"resource": "prod", "account": "scram", "duration_minutes": "10"},
        )
    assert answer.status_code == 403
    assert "nina" not in [s["requester"] for s in console.gw.cli_json("sessions", "list")]


def test_an_auditor_may_not_open_a_grant(console: Console) -> None:
    with console.web_client("aude") as aude:
        answer = aude.post(
            "/ui/terminal/open",
            data={"resource": "prod", "account": "scram", "duration_minutes": "10"},
        )
    assert answer.status_code == 403


def test_another_users_browser_grant_is_not_found(
    console: Console, mia: httpx.Client, grant: str
) -> None:
    # The grant is there for its owner: the 404s below are about whose it is.
    assert mia.get(f"/ui/terminal/{grant}").status_code == 200
    assert mia.get(f"/ui/explorer/{grant}").status_code == 200
    with console.web_client("max") as other, console.web_client("ada") as admin:
        for client in (other, admin):
            assert client.get(f"/ui/terminal/{grant}").status_code == 404
            assert run(client, grant, "select 1").status_code == 404
            assert client.post(f"/ui/terminal/{grant}/cancel").status_code == 404
            assert client.post(f"/ui/terminal/{grant}/close").status_code == 404
            assert client.get(f"/ui/explorer/{grant}").status_code == 404
    session = console.gw.cli_json("sessions", "show", grant)["session"]
    assert session["ended_at"] is None


def test_a_post_without_the_csrf_token_is_refused(console: Console, grant: str) -> None:
    with console.web_client("mia", csrf=False) as client:
        assert run(client, grant, "select 1").status_code == 403
        assert client.post(f"/ui/terminal/{grant}/cancel").status_code == 403
        assert client.post(f"/ui/terminal/{grant}/close").status_code == 403
        assert (
            client.post(
                "/ui/terminal/open",
                data={"resource": "prod", "account": "scram", "duration_minutes": "10"},
            ).status_code
            == 403
        )


def test_the_pages_need_a_signed_in_user(console: Console, grant: str) -> None:
    with console.http() as anonymous:
        assert anonymous.get("/ui/terminal").status_code == 303
        assert anonymous.get(f"/ui/terminal/{grant}").status_code == 303
        assert anonymous.post(
            f"/ui/terminal/{grant}/run", data={"sql": "select 1"}
        ).status_code in (303,)


def test_the_terminal_pages_render_for_their_owner(mia: httpx.Client, grant: str) -> None:
    index = mia.get("/ui/terminal")
    assert index.status_code == 200 and grant[:8] in index.text
    page = mia.get(f"/ui/terminal/{grant}")
    assert page.status_code == 200 and "textarea" in page.text
    status = mia.get(f"/ui/terminal/{grant}/status")
    assert status.status_code == 200 and "live" in status.text
    idle = mia.post(f"/ui/terminal/{grant}/cancel")
    assert idle.status_code == 200 and "nothing was running" in idle.text


def test_a_revoked_grant_answers_the_next_statement_with_the_gateways_fatal(
    console: Console, mia: httpx.Client, grant: str
) -> None:
    assert "<td>1</td>" in run(mia, grant, "select 1").text
    console.gw.cli("sessions", "revoke", grant, "--reason", "enough")
    answer = run(mia, grant, "select 2")
    # The connection was cut while idle; the console's next one meets the door,
    # which answers with the grant's end in a FATAL of its own.
    shown = re.search(r'<code class="sqlstate">(\w{5})</code>', answer.text)
    assert shown and shown.group(1) in ("57P01", "28000")
    assert "revoked by root: enough" in answer.text
    wait_for(lambda: "ended" in mia.get(f"/ui/terminal/{grant}/status").text)


def test_a_grant_needing_approval_waits_and_opens_once_approved(
    web: Pages, console: Console
) -> None:
    console.add_user("paula", "member")
    console.gw.cli(
        "policy", "add", "web-gated", "--subject", "paula", "--resource", "prod",
        "--account", "scram", "--max-duration", "1h", "--require-approval", "1",
    )  # fmt: skip
    page = web.as_user("paula")
    page.goto(console.url("/terminal"))
    page.fill("form.open-grant input[name=resource]", "prod")
    page.fill("form.open-grant input[name=account]", "scram")
    page.fill("form.open-grant input[name=reason]", "INC-16")
    page.click("form.open-grant button[type=submit]")
    expect(page.locator("#pending")).to_contain_text("needs approval")
    with console.api_as("ada") as ada:
        pending = wait_for(
            lambda: [
                r
                for r in ada.get("/v1/requests", params={"pending": True}).json()
                if r["requester"] == "paula"
            ]
        )
        # Still waiting: polling does not open anything before the approval.
        expect(page.locator("#pending")).to_contain_text("pending")
        approved = ada.post(f"/v1/requests/{pending[0]['id']}/approve", json={"comment": "ok"})
        assert approved.status_code == 200, approved.text
    page.wait_for_url(re.compile(r".*/ui/terminal/[0-9a-f]+$"))
    run_in_page(page, "select current_user")
    expect(page.locator("#result table.web-rows td")).to_have_text(["app_scram"])
    session_id = page.url.rsplit("/", 1)[1]
    session = console.gw.cli_json("sessions", "show", session_id)["session"]
    assert (session["requester"], session["request_id"]) == ("paula", pending[0]["id"])
    poll = f"/ui/terminal/requests/{pending[0]['id']}/open"
    with console.web_client("paula") as paula, console.web_client("max") as other:
        spent = paula.post(poll)  # opened already: it opens nothing more
        assert spent.status_code == 400 and "opened" in spent.text
        assert other.post(poll).status_code == 404  # another member's request
        assert paula.post("/ui/terminal/requests/nope/open").status_code == 404


def test_the_daemon_stops_promptly_with_a_console_statement_running(
    gateway: Gateway, pg: TempCluster
) -> None:
    """A statement of the console's in flight does not hold up the daemon's stop:
    the console ends its grants first (the harness's stop is bounded, and the
    statement would sleep far longer)."""
    config = ClientConfig.model_validate_json(gateway.config_path.read_text())
    assert config.ca_cert is not None and config.token is not None
    own = Console(gateway, config.api_url.rstrip("/"), config.ca_cert)
    client = own.http(cookies={SESSION_COOKIE: config.token})
    client.headers[CSRF_HEADER] = csrf_token(config.token)
    session_id = open_grant(client)
    answers: list[httpx.Response | Exception] = []

    def sleep() -> None:
        try:
            answers.append(run(client, session_id, "select pg_sleep(600)"))
        except httpx.HTTPError as exc:
            answers.append(exc)

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as admin:
        wait_for(lambda: admin.execute(_SLEEPING).fetchone())
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
        sleeper.join(30)
        assert not sleeper.is_alive() and answers
        # Our idle TLS connection closed, so the API's stop does not wait for its
        # close_notify; then the daemon's exit, within the harness's bound.
        client.close()
        assert gateway.stop() == 0
        wait_for(lambda: admin.execute(_SLEEPING).fetchone() is None)


_SLEEPING = (
    "select 1 from pg_stat_activity where application_name like 'pam web console (%'"
    " and state = 'active' and query = 'select pg_sleep(600)'"
)


def test_a_policy_asking_for_a_second_factor_needs_the_forms_one_time_code(
    console: Console,
) -> None:
    console.add_user("otto", "member")
    console.gw.cli(
        "policy", "add", "web-mfa", "--subject", "otto", "--resource", "prod",
        "--account", "scram", "--max-duration", "1h", "--require-mfa",
    )  # fmt: skip
    with console.web_client("otto") as otto, console.api_as("otto") as api:
        app = Authenticator.enrol(api)
        fields = {"resource": "prod", "account": "scram", "duration_minutes": "10"}
        refused = otto.post("/ui/terminal/open", data=fields)
        assert refused.status_code == 401
        assert "code" in refused.text
        code = app.code()  # the next step's: inside the gateway's window, not the one used
        opened = otto.post("/ui/terminal/open", data={**fields, "code": code})
        assert opened.status_code == 303, opened.text
        assert code not in opened.text
        otto.post(opened.headers["location"] + "/close")
