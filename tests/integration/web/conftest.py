"""Fixtures for the web console's tests: Debian's chromium driven by Playwright
(never a downloaded browser), a gateway with users in each role, and browser
pages that may load nothing from anywhere but the gateway.

``console`` is one daemon per test module (``module_gateway``) with users
``ada`` (admin of every project), ``aude`` (auditor of every project), ``mia``
and ``max`` (members of ``default``, allowed ``prod`` by policy ``members``),
all with password :data:`PASSWORD`. ``web`` opens a signed-in page as one of
them (:meth:`Pages.as_user`); when the test ends it checks that no page of the
test asked for anything outside the gateway: every such request is aborted and
fails the test. ``browser`` is one Debian chromium per test module.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Gateway
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright

from gateway.app.web.security import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, csrf_token
from gateway.config import ClientConfig

CHROMIUM = Path("/usr/bin/chromium")
#: As root, without a sandbox; no background traffic (this machine has no way out).
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
PASSWORD = "correct horse battery staple 42"
USERS = {
    "ada": ("admin", "*"),
    "aude": ("auditor", "*"),
    "mia": ("member", "default"),
    "max": ("member", "default"),
}


@dataclass
class Console:
    """The gateway's HTTPS address, its CA pinned, and its users' tokens."""

    gw: Gateway
    base: str
    ca_pem: str
    _tokens: dict[str, str] = field(default_factory=dict)

    def url(self, path: str = "/") -> str:
        return f"{self.base}/ui{path}"

    def http(self, *, token: str | None = None, **options: Any) -> httpx.Client:
        """A client of the gateway's address (its CA pinned); with *token* as bearer."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.base,
            verify=ssl.create_default_context(cadata=self.ca_pem),
            headers=headers,
            **options,
        )

    def admin_api(self) -> httpx.Client:
        return self.http(
            token=ClientConfig.model_validate_json(self.gw.config_path.read_text()).token
        )

    def token_of(self, user: str) -> str:
        if user not in self._tokens:
            with self.http() as client:
                answer = client.post("/v1/login", json={"user": user, "password": PASSWORD})
            answer.raise_for_status()
            self._tokens[user] = answer.json()["token"]
        return self._tokens[user]

    def api_as(self, user: str) -> httpx.Client:
        """An API client signed in as *user* (from this process: a local caller)."""
        return self.http(token=self.token_of(user))

    def web_client(self, user: str, *, csrf: bool = True) -> httpx.Client:
        """A client of the console signed in as *user* (the cookie a sign-in sets),
        following no redirect; with *csrf*, state changes carry the session's CSRF
        token in the header htmx sends (without it, a test may put the token in the
        form itself, see :meth:`form`, or leave it out)."""
        token = self.token_of(user)
        client = self.http(cookies={SESSION_COOKIE: token}, timeout=60)
        if csrf:
            client.headers[CSRF_HEADER] = csrf_token(token)
        return client

    def form(self, user: str, **fields: str) -> dict[str, str]:
        """*fields* and the CSRF token of *user*'s session, as a console form posts them."""
        return {CSRF_FIELD: csrf_token(self.token_of(user)), **fields}

    def add_user(self, name: str, role: str, project: str = "default") -> None:
        with self.admin_api() as api:
            answer = api.post(
                "/v1/users",
                json={"name": name, "role": role, "project": project, "password": PASSWORD},
            )
            assert answer.status_code == 201, answer.text


@pytest.fixture(scope="module")
def console(module_gateway: Gateway) -> Console:
    config = ClientConfig.model_validate_json(module_gateway.config_path.read_text())
    assert config.ca_cert is not None
    found = Console(module_gateway, config.api_url.rstrip("/"), config.ca_cert)
    for name, (role, project) in USERS.items():
        found.add_user(name, role, project)
    module_gateway.cli(
        "policy", "add", "members", "--subject", "mia",
        "--subject", "max", "--resource", "prod", "--account", "*", "--max-duration", "2h",
    )  # fmt: skip
    return found


@pytest.fixture
def mia(console: Console) -> Iterator[httpx.Client]:
    """mia's console session over HTTP, with its CSRF header."""
    with console.web_client("mia") as client:
        yield client


# Module scope, not session: Playwright's sync API runs its event loop in this
# thread for as long as it is open, and every asyncio test that ran after it in
# the same process (later files, or a pytest-xdist worker's next file) failed
# with "Cannot run the event loop while another loop is running".
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield launched
        launched.close()


@dataclass
class Pages:
    """Browser contexts of one test, each its own cookie jar (a person)."""

    browser: Browser
    console: Console
    contexts: list[BrowserContext] = field(default_factory=list)
    #: every request a page made to somewhere other than the gateway
    outside: list[str] = field(default_factory=list)

    def new_page(self) -> Page:
        # The gateway's certificate is signed by its own CA, which this fresh
        # browser profile does not know; HTTPS itself is tested with the CLI.
        context = self.browser.new_context(base_url=self.console.base, ignore_https_errors=True)
        context.set_default_timeout(30_000)
        context.route("**/*", self._only_the_gateway)
        self.contexts.append(context)
        return context.new_page()

    def _only_the_gateway(self, route: Route) -> None:
        url = route.request.url
        if url.startswith((self.console.base + "/", "data:", "about:")):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def as_user(self, user: str, *, page: Page | None = None) -> Page:
        """A page signed in as *user* through the login form."""
        page = page or self.new_page()
        page.goto(self.console.url("/login"))
        page.fill("input[name=user]", user)
        page.fill("input[name=password]", PASSWORD)
        page.click("form[action='/ui/login'] button[type=submit]")
        page.wait_for_url(self.console.url("/"))
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def web(browser: Browser, console: Console) -> Iterator[Pages]:
    pages = Pages(browser, console)
    try:
        yield pages
    finally:
        pages.close()
    assert pages.outside == [], f"pages asked for things outside the gateway: {pages.outside}"


def form_of(page: Page, selector: str) -> dict[str, Any]:
    """The fields of the form at *selector* as the page has them (hidden ones too)."""
    return page.eval_on_selector(  # type: ignore[no-any-return]
        selector, "f => Object.fromEntries(new FormData(f).entries())"
    )
