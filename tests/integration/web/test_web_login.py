"""Signing in and out of the web console, its cookies, CSRF and headers, in
Debian's chromium and at the HTTP level, against a real daemon."""

from __future__ import annotations

import re

from conftest import PASSWORD, Console, Pages
from fastapi.routing import APIRoute
from playwright.sync_api import expect

from gateway.app.web.routes import ROUTERS
from gateway.app.web.security import (
    CONTENT_SECURITY_POLICY,
    CSRF_HEADER,
    SESSION_COOKIE,
    csrf_token,
)


def test_login_sets_a_strict_session_cookie_and_logout_ends_the_token(
    web: Pages, console: Console
) -> None:
    page = web.as_user("mia")
    expect(page.locator("header .whoami")).to_contain_text("mia")
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["__Host-pam_session"]
    assert (session["httpOnly"], session["secure"], session["sameSite"], session["path"]) == (
        True,
        True,
        "Strict",
        "/",
    )
    assert "__Host-pam_login" not in cookies  # the login form's nonce is spent
    # The cookie is a real API session token: the API accepts it as a bearer...
    token = session["value"]
    with console.http(token=token) as api:
        assert api.get("/v1/whoami").json()["name"] == "mia"
        page.click("header .whoami button")
        page.wait_for_url(console.url("/login"))
        # ...and signing out revokes it.
        assert api.get("/v1/whoami").status_code == 401


def test_wrong_password_is_refused_with_a_line_and_on_record(web: Pages, console: Console) -> None:
    page = web.new_page()
    page.goto(console.url("/login"))
    page.fill("input[name=user]", "mia")
    page.fill("input[name=password]", "not the password")
    page.click("form[action='/ui/login'] button[type=submit]")
    expect(page.locator(".problem")).to_contain_text("wrong user name or password")
    assert "not the password" not in page.content()
    assert "__Host-pam_session" not in {c["name"] for c in page.context.cookies()}
    refusals = console.gw.cli_json("audit", "refusals")
    assert any(r["reason"] == "bad_password" and r["who"] == "mia" for r in refusals)


def test_a_page_without_a_session_goes_to_the_login_form_and_back(
    web: Pages, console: Console
) -> None:
    page = web.new_page()
    page.goto(console.url("/?from=here"))
    page.wait_for_url(console.url("/login?next=%2Fui%2F%3Ffrom%3Dhere"))
    page.fill("input[name=user]", "aude")
    page.fill("input[name=password]", PASSWORD)
    page.click("form[action='/ui/login'] button[type=submit]")
    page.wait_for_url(console.url("/?from=here"))
    expect(page.locator("h1")).to_contain_text("aude")


def test_next_never_leaves_the_console(console: Console) -> None:
    with console.http() as client:
        form = client.get("/ui/login")
        nonce = form.cookies["__Host-pam_login"]
        client.cookies.set("__Host-pam_login", nonce)
        answer = client.post(
            "/ui/login",
            data={
                "user": "mia",
                "password": PASSWORD,
                "login_nonce": nonce,
                "next": "https://evil.example/ui/",
            },
        )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/"


def test_pages_carry_the_security_headers(console: Console) -> None:
    with console.http() as client:
        answer = client.get("/ui/login")
        static = client.get("/ui/static/vendor/htmx.min.js")
    assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert static.status_code == 200
    assert static.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_a_state_change_without_the_csrf_token_is_refused(console: Console) -> None:
    token = console.token_of("max")
    with console.http(cookies={"__Host-pam_session": token}) as client:
        refused = client.post("/ui/logout")
    assert refused.status_code == 403
    assert "CSRF" in refused.text
    with console.api_as("max") as api:
        assert api.get("/v1/whoami").status_code == 200  # the refused sign-out did nothing


def test_login_form_without_its_nonce_is_refused(console: Console) -> None:
    with console.http() as client:
        answer = client.post(
            "/ui/login", data={"user": "mia", "password": PASSWORD, "login_nonce": "x"}
        )
    assert answer.status_code == 403
    assert "__Host-pam_session" not in answer.headers.get("set-cookie", "")


def _state_changing_paths() -> list[str]:
    """Every route of the console that changes something, path parameters filled."""
    paths = []
    for router in ROUTERS:
        for route in router.routes:
            assert isinstance(route, APIRoute)
            if route.methods - {"GET", "HEAD"} and route.path not in ("/login", "/sso"):
                paths.append("/ui" + re.sub(r"\{[^}]+\}", "0123abcd", route.path))
    return paths


def test_every_state_change_needs_the_token_and_this_gateways_origin(console: Console) -> None:
    paths = _state_changing_paths()
    assert len(paths) >= 15  # the routes were found: the check below checks something
    token = console.token_of("ada")
    with console.http(cookies={SESSION_COOKIE: token}) as client:
        for path in paths:
            assert client.post(path).status_code == 403, path
            assert client.post(path, headers={CSRF_HEADER: "not-the-token"}).status_code == 403
            elsewhere = {CSRF_HEADER: csrf_token(token), "Origin": "https://evil.example"}
            assert client.post(path, headers=elsewhere).status_code == 403, path
        # With the token and no foreign origin the same request gets past the check
        # (to a 404 for the made-up id, or a 400 for a missing field).
        answer = client.post(paths[0], headers={CSRF_HEADER: csrf_token(token)})
        assert answer.status_code not in (401, 403), paths[0]
