"""The console's admin pages (issue 16 point 6), in Debian's chromium and at
the HTTP level, against a real daemon: who may read and change what (as the
API says: members nothing, auditors read), verify with its latency, rotate
now, disable a user, remove a policy, no password on any page, CSRF."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping

import pytest
from conftest import Console, Pages
from playwright.sync_api import expect

from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

PAGES = ("/ui/admin/resources", "/ui/admin/resources/prod", "/ui/admin/users", "/ui/admin/policies")
CHANGES = (
    "/ui/admin/resources/prod/verify",
    "/ui/admin/resources/prod/accounts/scram/rotate",
    "/ui/admin/users/max/disable",
    "/ui/admin/policies/members/remove",
)


def test_a_member_gets_403_on_every_admin_page(console: Console, web: Pages) -> None:
    page = web.as_user("mia")
    expect(page.locator("header nav")).not_to_contain_text("Admin")  # no link to a 403
    answer = page.goto(console.url("/admin/resources"))
    assert answer is not None and answer.status == 403
    expect(page.locator(".problem")).to_contain_text("neither an admin nor an auditor")
    with console.web_client("mia", csrf=False) as mia:
        for path in PAGES:
            assert mia.get(path).status_code == 403, path
        for path in CHANGES:
            assert mia.post(path, data=console.form("mia")).status_code == 403, path
    with console.http() as anonymous:
        answer = anonymous.get("/ui/admin/resources")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login")


def _scram_rotation(console: Console) -> object:
    with console.admin_api() as api:
        accounts = api.get("/v1/accounts", params={"resource": "prod"}).json()
    return next(a["last_rotation_at"] for a in accounts if a["name"] == "scram")


def test_an_auditor_reads_what_the_api_shows_and_changes_nothing(console: Console) -> None:
    rotated_before = _scram_rotation(console)
    with console.web_client("aude", csrf=False) as aude:
        resources = aude.get("/ui/admin/resources")
        assert resources.status_code == 200 and 'data-resource="prod"' in resources.text
        assert "/verify" not in resources.text  # no verify button: the API refuses it
        account_page = aude.get("/ui/admin/resources/prod")
        assert account_page.status_code == 200 and 'data-account="scram"' in account_page.text
        assert "Rotate now" not in account_page.text
        policies = aude.get("/ui/admin/policies")
        assert policies.status_code == 200 and 'data-policy="members"' in policies.text
        assert "/remove" not in policies.text
        assert aude.get("/ui/admin/users").status_code == 403  # the API lists users to admins
        for path in CHANGES:
            assert aude.post(path, data=console.form("aude")).status_code == 403, path
    assert _scram_rotation(console) == rotated_before
    _nothing_changed(console)


def _nothing_changed(console: Console) -> None:
    with console.admin_api() as api:
        users = {u["name"]: u for u in api.get("/v1/users").json()}
        policies = {p["name"] for p in api.get("/v1/policies").json()}
    assert users["max"]["disabled_at"] is None
    assert "members" in policies


def test_admin_pages_never_show_a_password(
    console: Console, pg_roles: Mapping[str, PgRole]
) -> None:
    passwords = [role.password for role in pg_roles.values()]
    with console.web_client("ada", csrf=False) as ada:
        pages = [ada.get(path) for path in PAGES]
        pages.append(ada.post("/ui/admin/resources/prod/verify", data=console.form("ada")))
    for page in pages:
        assert page.status_code == 200, page.url
        for password in passwords:
            assert password not in page.text, page.url
    assert all(f'data-account="{key}"' in pages[1].text for key in pg_roles)


def test_verify_shows_each_account_ok_with_its_latency(console: Console, web: Pages) -> None:
    ada = web.as_user("ada")
    ada.goto(console.url("/admin/resources"))
    row = ada.locator("tr[data-resource=prod]")
    row.locator("button", has_text="Verify").click()
    result = row.locator("li[data-account=scram]")
    expect(result).to_have_attribute("data-ok", "true")
    expect(result.locator(".badge")).to_have_text("ok")
    expect(result.locator(".latency")).to_have_text(re.compile(r"^\d+\.\d ms$"))
    assert ada.url == console.url("/admin/resources")  # swapped in place by htmx


def test_verify_without_htmx_shows_the_resource_page_with_the_result(console: Console) -> None:
    with console.web_client("ada", csrf=False) as ada:
        answer = ada.post("/ui/admin/resources/prod/verify", data=console.form("ada"))
    assert answer.status_code == 200
    assert "<h1>Resource prod</h1>" in answer.text
    assert re.search(r'data-account="scram" data-ok="true"', answer.text)
    assert re.search(r'class="latency">\d+\.\d ms<', answer.text)


def test_rotate_now_rotates_and_the_row_shows_how_it_ended(
    console: Console, web: Pages, pg: TempCluster
) -> None:
    name = f"web_rot_{secrets.token_hex(3)}"
    first = secrets.token_urlsafe(18)
    pg.create_role(name, first)
    with console.admin_api() as api:
        added = api.post(
            "/v1/resources/prod/accounts",
            json={"name": name, "username": name, "password": first},
        )
        assert added.status_code == 201, added.text
    ada = web.as_user("ada")
    ada.goto(console.url("/admin/resources/prod"))
    row = ada.locator(f"tr[data-account={name}]")
    expect(row.locator(".outcome")).not_to_contain_text("rotated")
    row.locator("button", has_text="Rotate now").click()
    ada.wait_for_url(re.compile(rf"/ui/admin/resources/prod\?rotated={name}"))
    expect(ada.locator(f"tr[data-account={name}] .outcome")).to_contain_text("rotated")
    assert first not in ada.content()
    with console.admin_api() as api:
        history = api.get(f"/v1/resources/prod/accounts/{name}/rotations").json()
    assert [(h["outcome"], h["started_by"]) for h in history[:1]] == [("rotated", "ada")]


def test_ada_disables_a_user_from_the_users_page(console: Console, web: Pages) -> None:
    console.add_user("dora", "member")
    dora_token = console.token_of("dora")
    ada = web.as_user("ada")
    ada.goto(console.url("/admin/users"))
    row = ada.locator("tr[data-user=dora]")
    expect(row.locator(".state")).to_contain_text("active")
    expect(row.locator(".mfa")).to_have_text("off")
    expect(ada.locator("tr[data-user=ada] .tag")).to_contain_text("admin of every project")
    row.locator("summary").click()
    row.locator("button", has_text="Disable dora").click()
    ada.wait_for_url(console.url("/admin/users"))
    expect(ada.locator("tr[data-user=dora] .state")).to_contain_text("disabled")
    with console.http(token=dora_token) as dora:
        assert dora.get("/v1/whoami").status_code == 401


def test_policies_show_every_field_and_ada_removes_one(console: Console, web: Pages) -> None:
    console.gw.cli(
        "policy", "add", "web-gone", "--subject", "max", "--resource", "prod",
        "--account", "md5", "--max-duration", "30m", "--require-approval", "1",
        "--approver", "ada", "--require-reason",
    )  # fmt: skip
    ada = web.as_user("ada")
    ada.goto(console.url("/admin/policies"))
    row = ada.locator("tr[data-policy=web-gone]")
    for text in ("default", "max", "prod", "md5", "30m", "required", "ada"):
        expect(row).to_contain_text(text)
    row.locator("summary").click()
    row.locator("button", has_text="Remove policy web-gone").click()
    ada.wait_for_url(console.url("/admin/policies"))
    expect(ada.locator("tr[data-policy=web-gone]")).to_have_count(0)
    expect(ada.locator("tr[data-policy=members]")).to_have_count(1)
    with console.admin_api() as api:
        assert "web-gone" not in {p["name"] for p in api.get("/v1/policies").json()}


def test_an_admin_change_without_the_csrf_token_is_refused(console: Console) -> None:
    rotated_before = _scram_rotation(console)
    with console.web_client("ada", csrf=False) as ada:
        for path in CHANGES:
            refused = ada.post(path)
            assert refused.status_code == 403 and "CSRF" in refused.text, path
    assert _scram_rotation(console) == rotated_before
    _nothing_changed(console)
