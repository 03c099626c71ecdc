"""Signing in to the console (issue 16 point 1), in Debian's chromium against
the real daemon: single sign-on with a real OpenID Connect provider
(oidc-provider-mock, run as in tests/integration/test_sso_oidc.py): the login
page's button, the provider's form, its return to ``/v1/sso/callback``, the
hand-off to ``/ui/sso/finish`` and the session cookie it sets, and a refusal;
and the login form asking an enrolled user's one-time code."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from conftest import PASSWORD, Console, Pages
from harness import wait_for
from playwright.sync_api import Page, Route, expect
from webclient import Authenticator

from gateway.testing.net import free_port

pytestmark = pytest.mark.integration

#: the stylesheet the provider's own pages link to; this machine has no way out
PROVIDER_CSS = "https://cdn.jsdelivr.net/**"


@dataclass
class Provider:
    url: str

    def set_user(self, sub: str, **claims: object) -> None:
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as client:
            assert client.put(f"/users/{sub}", json=claims).status_code == 204


@pytest.fixture(scope="module")
def provider(console: Console) -> Iterator[Provider]:
    """The provider on loopback, the gateway registered with it as a
    confidential client, and ``idp-dba`` mapped to ``@dba`` in ``default``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "oidc_provider_mock", "--host", "127.0.0.1",
         "--port", str(port), "--require-registration", "--require-nonce"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # its log may name the client it registered
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    found = Provider(f"http://127.0.0.1:{port}")

    def up() -> bool:
        try:
            with httpx.Client(base_url=found.url, timeout=5, trust_env=False) as client:
                return client.get("/.well-known/openid-configuration").status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    try:
        wait_for(up, timeout=30)
        assert proc.poll() is None, "the provider did not start"
        with httpx.Client(base_url=found.url, timeout=30, trust_env=False) as client:
            registered = client.post(
                "/oauth2/clients", json={"redirect_uris": [console.base + "/v1/sso/callback"]}
            )
        assert registered.status_code == 201, registered.text
        client_id, secret = registered.json()["client_id"], registered.json()["client_secret"]
        console.gw.cli(
            "sso", "configure", "--issuer", found.url, "--client-id", client_id,
            "--client-secret-stdin", input=secret + "\n",
        )  # fmt: skip
        console.gw.cli("sso", "map-group", "idp-dba", "@dba", "--project", "default")
        yield found
    finally:
        proc.terminate()
        proc.wait(10)


def _page_that_may_visit(web: Pages, provider: Provider) -> Page:
    """A fresh browser that may go to the provider too (still nowhere else)."""
    page = web.new_page()

    def no_css(route: Route) -> None:
        route.fulfill(status=200, content_type="text/css", body="")

    page.context.route(f"{provider.url}/**", lambda route: route.continue_())
    page.context.route(PROVIDER_CSS, no_css)
    return page


def _to_the_provider(page: Page, console: Console, provider: Provider) -> None:
    page.goto(console.url("/login"))
    page.click("text=Sign in with single sign-on")
    page.wait_for_url(f"{provider.url}/**")
    expect(page.locator("input[name=sub]")).to_be_visible()


def test_single_sign_on_in_the_browser_ends_signed_in_to_the_console(
    web: Pages, console: Console, provider: Provider
) -> None:
    provider.set_user("sub-web-nora", preferred_username="nora", groups=["idp-dba"])
    page = _page_that_may_visit(web, provider)
    _to_the_provider(page, console, provider)
    cookies = {c["name"]: c for c in page.context.cookies(console.base)}
    assert cookies["__Host-pam_sso"]["sameSite"] == "Lax"  # it must survive the provider's redirect
    page.fill("input[name=sub]", "sub-web-nora")
    page.click("button:text('Authorize')")
    page.wait_for_url(console.url("/"))
    expect(page.locator("h1")).to_have_text("Welcome, nora")
    expect(page.locator("header .whoami")).to_contain_text("nora")

    cookies = {c["name"]: c for c in page.context.cookies(console.base)}
    assert "__Host-pam_sso" not in cookies  # the poll handle is spent
    session = cookies["__Host-pam_session"]
    assert (session["httpOnly"], session["secure"], session["sameSite"]) == (True, True, "Strict")
    with console.http(token=session["value"]) as api:
        me = api.get("/v1/whoami").json()
    assert (me["name"], me["groups"], me["roles"]) == ("nora", ["dba"], {"default": "member"})


def _no_session(page: Page, console: Console) -> None:
    cookies = {c["name"] for c in page.context.cookies(console.base)}
    assert "__Host-pam_session" not in cookies and "__Host-pam_sso" not in cookies


def test_a_sign_in_refused_at_the_provider_ends_on_the_login_form_saying_why(
    web: Pages, console: Console, provider: Provider
) -> None:
    page = _page_that_may_visit(web, provider)
    _to_the_provider(page, console, provider)
    page.click("button:text('Deny')")
    # This provider leaves the state out of its error redirect (RFC 6749
    # wants it back), so the gateway cannot say which sign-in ended.
    page.wait_for_url(console.url("/sso/finish"))
    expect(page.locator(".login .problem")).to_contain_text("single sign-on did not finish")
    expect(page.locator(".login .problem")).to_contain_text("start again")
    expect(page.locator("form[action='/ui/login']")).to_be_visible()
    _no_session(page, console)

    # A refusal that names its sign-in, as the RFC has it: the provider's words.
    _to_the_provider(page, console, provider)
    state = parse_qs(urlsplit(page.url).query)["state"][0]
    page.goto(
        console.base
        + "/v1/sso/callback?"
        + urlencode({"error": "access_denied", "error_description": "no thanks", "state": state})
    )
    page.wait_for_url(console.url("/sso/finish"))
    expect(page.locator(".login .problem")).to_contain_text(
        "the identity provider refused the sign-in (access_denied: no thanks)"
    )
    _no_session(page, console)
    refusals = console.gw.cli_json("audit", "refusals")
    assert any(r["reason"] == "sso_refused" and "access_denied" in r["message"] for r in refusals)
    page.goto(console.url("/"))
    page.wait_for_url(console.url("/login?next=%2Fui%2F"))


def test_the_login_form_asks_an_enrolled_users_code(web: Pages, console: Console) -> None:
    console.add_user("kim", "member")
    with console.api_as("kim") as api:
        app = Authenticator.enrol(api)
    page = web.new_page()
    page.goto(console.url("/login"))
    page.fill("input[name=user]", "kim")
    page.fill("input[name=password]", PASSWORD)
    page.click("form[action='/ui/login'] button[type=submit]")
    expect(page.locator(".login .problem")).to_be_visible()
    expect(page.locator("input[name=code]")).to_have_attribute("required", "")
    assert PASSWORD not in page.content()

    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=code]", app.wrong())
    page.click("form[action='/ui/login'] button[type=submit]")
    expect(page.locator(".login .problem")).to_be_visible()
    assert "__Host-pam_session" not in {c["name"] for c in page.context.cookies(console.base)}

    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=code]", app.code())
    page.click("form[action='/ui/login'] button[type=submit]")
    page.wait_for_url(console.url("/"))
    expect(page.locator("h1")).to_have_text("Welcome, kim")
    reasons = {r["reason"] for r in console.gw.cli_json("audit", "refusals") if r["who"] == "kim"}
    assert "mfa_required" in reasons
