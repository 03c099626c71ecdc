"""The console's access-request pages (issue 16 point 3), in Debian's chromium
and at the HTTP level, against a real daemon: deciding another user's request
in a browser, denying with a reason, the approver's second factor where the
project asks for it, who sees and who may decide what, the history, CSRF."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Console, Pages
from playwright.sync_api import expect
from webclient import Authenticator

pytestmark = pytest.mark.integration

#: longer than policy ``members`` allows: only an approval policy covers it
LONG = 3 * 3600


@pytest.fixture(scope="module")
def approvals(console: Console) -> Console:
    """Policies asking for approval: mia's by ada, max's by otto."""
    console.gw.cli(
        "policy", "add", "needs-ada", "--subject", "mia", "--resource", "prod",
        "--account", "*", "--max-duration", "4h", "--require-approval", "1", "--approver", "ada",
    )  # fmt: skip
    console.add_user("otto", "admin")
    console.gw.cli(
        "policy", "add", "needs-otto", "--subject", "max", "--resource", "prod",
        "--account", "*", "--max-duration", "4h", "--require-approval", "1", "--approver", "otto",
    )  # fmt: skip
    return console


def ask(console: Console, user: str, reason: str) -> dict[str, Any]:
    """*user* asks for access that needs approval: the pending request."""
    with console.api_as(user) as api:
        answer = api.post(
            "/v1/access",
            json={
                "resource": "prod",
                "account": "scram",
                "duration_seconds": LONG,
                "reason": reason,
            },
        )
    assert answer.status_code == 202, answer.text
    request: dict[str, Any] = answer.json()["request"]
    assert request["state"] == "pending"
    return request


def shown(console: Console, user: str, request_id: str) -> dict[str, Any]:
    with console.api_as(user) as api:
        answer = api.get(f"/v1/requests/{request_id}")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def test_ada_approves_mias_request_in_her_browser(approvals: Console, web: Pages) -> None:
    request = ask(approvals, "mia", "INC-101 ada approves")
    rid = request["id"]
    mia = web.as_user("mia")
    mia.goto(approvals.url("/requests"))
    expect(mia.locator(f"#mine tr[data-request='{rid}']")).to_contain_text("pending")
    expect(mia.locator(f"#to-decide tr[data-request='{rid}']")).to_have_count(0)

    ada = web.as_user("ada")
    ada.goto(approvals.url("/requests"))
    row = ada.locator(f"#to-decide tr[data-request='{rid}']")
    for text in ("mia", "prod / scram", "INC-101 ada approves", "3h", "0 of 1"):
        expect(row).to_contain_text(text)
    row.locator("a").click()
    ada.wait_for_url(approvals.url(f"/requests/{rid}"))
    expect(ada.locator("input[name=code]")).to_have_count(0)  # the project asks no code
    ada.fill("#approve input[name=comment]", "looks right")
    ada.click("#approve button")
    ada.wait_for_url(approvals.url(f"/requests/{rid}?done=approved"))
    expect(ada.locator("#state")).to_have_text("approved")
    expect(ada.locator("tr[data-kind=approved]")).to_contain_text("looks right")

    after = shown(approvals, "mia", rid)
    assert after["state"] == "approved"
    assert [(a["by"], a["comment"]) for a in after["approvals"]] == [("ada", "looks right")]
    # No longer waiting for ada; mia sees hers approved.
    ada.goto(approvals.url("/requests"))
    expect(ada.locator(f"#to-decide tr[data-request='{rid}']")).to_have_count(0)
    mia.reload()
    expect(mia.locator(f"#mine tr[data-request='{rid}']")).to_contain_text("approved")


def test_ada_denies_with_a_reason_and_a_denial_without_one_is_refused(
    approvals: Console, web: Pages
) -> None:
    rid = ask(approvals, "mia", "INC-102 to deny")["id"]
    with approvals.web_client("ada", csrf=False) as ada_http:
        refused = ada_http.post(f"/ui/requests/{rid}/deny", data=approvals.form("ada", reason=" "))
    assert refused.status_code == 400
    assert "a denial needs a reason" in refused.text
    assert shown(approvals, "mia", rid)["state"] == "pending"

    ada = web.as_user("ada")
    ada.goto(approvals.url(f"/requests/{rid}"))
    ada.fill("#deny input[name=reason]", "not during the freeze")
    ada.click("#deny button")
    ada.wait_for_url(approvals.url(f"/requests/{rid}?done=denied"))
    expect(ada.locator("#state")).to_have_text("denied")
    after = shown(approvals, "mia", rid)
    assert (after["state"], after["decided_by"], after["decision_note"]) == (
        "denied",
        "ada",
        "not during the freeze",
    )
    ada.goto(approvals.url("/requests?tab=history"))
    expect(ada.locator(f"#history tr[data-request='{rid}']")).to_contain_text("denied")


def test_the_requester_cannot_approve_their_own_but_may_cancel_it(
    approvals: Console, web: Pages
) -> None:
    rid = ask(approvals, "mia", "INC-103 my own")["id"]
    mia = web.as_user("mia")
    mia.goto(approvals.url(f"/requests/{rid}"))
    expect(mia.locator("#state")).to_have_text("pending")
    expect(mia.locator("#approve")).to_have_count(0)
    expect(mia.locator("#deny")).to_have_count(0)
    with approvals.web_client("mia", csrf=False) as mia_http:
        refused = mia_http.post(f"/ui/requests/{rid}/approve", data=approvals.form("mia"))
    assert refused.status_code == 400
    assert f"mia asked for request {rid[:8]} and cannot approve it" in refused.text
    assert shown(approvals, "mia", rid)["state"] == "pending"

    mia.click("#cancel button")
    mia.wait_for_url(approvals.url(f"/requests/{rid}?done=cancelled"))
    expect(mia.locator("#state")).to_have_text("cancelled")
    assert shown(approvals, "ada", rid)["state"] == "cancelled"


@pytest.fixture
def approval_mfa(approvals: Console) -> Iterator[None]:
    approvals.gw.cli("project", "set", "default", "--approval-mfa")
    try:
        yield
    finally:
        approvals.gw.cli("project", "set", "default", "--no-approval-mfa")


def test_approval_asks_the_approvers_code_where_the_project_says_so(
    approvals: Console, web: Pages, approval_mfa: None
) -> None:
    otto = web.as_user("otto")  # signed in before enrolling: the session stays
    with approvals.api_as("otto") as api:
        app = Authenticator.enrol(api)
    rid = ask(approvals, "max", "INC-104 needs a code")["id"]

    otto.goto(approvals.url(f"/requests/{rid}"))
    expect(otto.locator("#approve input[name=code]")).to_be_visible()
    otto.fill("#approve input[name=code]", app.wrong())
    otto.click("#approve button")
    expect(otto.locator(".problem")).to_be_visible()
    expect(otto.locator("#state")).to_have_text("pending")
    assert shown(approvals, "max", rid)["state"] == "pending"

    # Without a code at all: refused the same way.
    with approvals.web_client("otto", csrf=False) as otto_http:
        refused = otto_http.post(f"/ui/requests/{rid}/approve", data=approvals.form("otto"))
    assert refused.status_code == 401
    assert shown(approvals, "max", rid)["state"] == "pending"

    otto.fill("#approve input[name=code]", app.code())
    otto.click("#approve button")
    otto.wait_for_url(approvals.url(f"/requests/{rid}?done=approved"))
    expect(otto.locator("#state")).to_have_text("approved")
    assert [a["by"] for a in shown(approvals, "max", rid)["approvals"]] == ["otto"]


def test_who_sees_a_request_is_who_the_api_shows_it_to(approvals: Console) -> None:
    rid = ask(approvals, "mia", "INC-105 visibility")["id"]
    page = f"/ui/requests/{rid}"
    for user, status in (("mia", 200), ("ada", 200), ("aude", 200), ("max", 404), ("otto", 200)):
        with approvals.web_client(user, csrf=False) as client:
            assert client.get(page).status_code == status, user
    # otto is an admin of every project (so sees it) but not among its approvers.
    with approvals.web_client("otto", csrf=False) as client:
        assert 'id="approve"' not in client.get(page).text
        refused = client.post(f"{page}/approve", data=approvals.form("otto"))
        assert refused.status_code == 400 and "otto is not an approver" in refused.text
    with approvals.web_client("max", csrf=False) as client:
        assert client.get("/ui/requests").status_code == 200
        assert rid not in client.get("/ui/requests").text
        assert client.post(f"{page}/cancel", data=approvals.form("max")).status_code == 404
    with approvals.http() as anonymous:
        answer = anonymous.get(page)
    assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login")
    assert shown(approvals, "mia", rid)["state"] == "pending"


def test_history_pages_through_decided_requests(approvals: Console) -> None:
    ids = [ask(approvals, "mia", f"INC-2{n:02} history")["id"] for n in range(27)]
    with approvals.api_as("mia") as api:
        for rid in ids:
            assert api.post(f"/v1/requests/{rid}/cancel").status_code == 200
    newest_first = ids[::-1]
    with approvals.web_client("ada", csrf=False) as client:
        first = client.get("/ui/requests?tab=history").text
        second = client.get("/ui/requests?tab=history&page=1").text
        assert client.get("/ui/requests?tab=history&page=-1").status_code == 400
    assert all(rid in first for rid in newest_first[:25])
    assert not any(rid in first for rid in newest_first[25:])
    assert 'rel="next"' in first and 'rel="prev"' not in first
    assert all(rid in second for rid in newest_first[25:])
    assert not any(rid in second for rid in newest_first[:25])
    assert 'rel="prev"' in second


def test_a_decision_without_the_csrf_token_is_refused(approvals: Console) -> None:
    rid = ask(approvals, "mia", "INC-106 csrf")["id"]
    with approvals.web_client("ada", csrf=False) as client:
        for verb in ("approve", "deny", "cancel"):
            refused = client.post(f"/ui/requests/{rid}/{verb}", data={"reason": "x"})
            assert refused.status_code == 403 and "CSRF" in refused.text, verb
    assert shown(approvals, "mia", rid)["state"] == "pending"
