"""Single sign-on end to end (issue 14 point 5): a real OpenID Connect provider,
the real daemon, real `pam login --sso` CLI processes, and the browser played
by an HTTP client.

The provider is oidc-provider-mock (authlib's authorization server behind a
login form, RS256 ID tokens, JWKS, dynamic client registration), run by the
fixture as its own process on loopback. The gateway is registered with it as a
confidential client (``--require-registration``: its client secret is checked
at the token endpoint) and nonces are required. What the provider does not
offer, the tests say so: it does not verify PKCE's code verifier (the
gateway's S256 is checked against RFC 7636's vector in the unit tests) and has
no device authorization endpoint (the gateway runs the device flow itself).

The "browser" (:class:`Browser`) follows what a person's browser would: the
authorization URL the CLI printed, the provider's form (a ``sub``; the claims,
``preferred_username`` and ``groups``, are the provider's user record, set
through its API first), the redirect to the gateway's callback over HTTPS
verified with the gateway's CA.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from conftest import APP_DATABASE
from harness import AccessProcess, Gateway, Transcript, _Drain, wait_for

from gateway.config import STORE_FILE
from gateway.testing.net import free_port
from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

PASSWORD = "pw-sso-Local-1"
URL_LINE = re.compile(r"^\s+(https?://\S+)$", re.MULTILINE)
DEVICE_LINE = re.compile(r"To sign in, open (\S+)\non any device and enter the code (\S+)")


@dataclass
class Idp:
    """The provider's process and what the gateway was registered as."""

    url: str
    proc: subprocess.Popen[bytes]
    log: _Drain
    client_id: str = ""
    client_secret: str = ""

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, trust_env=False)

    def set_user(self, sub: str, **claims: Any) -> None:
        with self.http() as client:
            assert client.put(f"/users/{sub}", json=claims).status_code == 204


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path_factory.mktemp("sso"))
    gateway.init()
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.close()


@pytest.fixture(scope="module")
def idp(gw: Gateway) -> Iterator[Idp]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-W",
            "ignore",
            "-m",
            "oidc_provider_mock",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--require-registration",
            "--require-nonce",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    # The provider's own log is kept apart: it may name the client it registered.
    provider = Idp(f"http://127.0.0.1:{port}", proc, _Drain(proc.stderr, Transcript()))

    def up() -> bool:
        try:
            with provider.http() as client:
                return client.get("/.well-known/openid-configuration").status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # ends the wait; asserted below

    try:
        wait_for(up, timeout=30)
        assert proc.poll() is None, provider.log.text()
        callback = json.loads(gw.config_path.read_text())["api_url"] + "/v1/sso/callback"
        with provider.http() as client:
            registered = client.post("/oauth2/clients", json={"redirect_uris": [callback]})
        assert registered.status_code == 201, registered.text
        provider.client_id = registered.json()["client_id"]
        provider.client_secret = registered.json()["client_secret"]
        yield provider
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def sso(gw: Gateway, idp: Idp, pg: TempCluster, pg_roles: dict[str, PgRole]) -> Gateway:
    """The gateway with single sign-on set up, a resource, and a policy for @dba."""
    gw.cli(
        "sso",
        "configure",
        "--issuer",
        idp.url,
        "--client-id",
        idp.client_id,
        "--client-secret-stdin",
        input=idp.client_secret + "\n",
    )
    gw.cli("sso", "map-group", "idp-dba", "@dba", "--project", "default")
    gw.cli("sso", "map-group", "idp-readers", "@readers")
    with gw.api() as api:
        api.add_resource(
            "prod",
            host=pg.host,
            port=pg.port,
            database=APP_DATABASE,
            ssl_mode="verify-full",
            ca_cert=pg.ca_cert_path.read_text(),
        )
        role = pg_roles["scram"]
        api.add_account("prod", "scram", username=role.name, password=role.password)
        api.add_policy(
            {
                "name": "dba-prod",
                "subjects": ["@dba"],
                "resource": "prod",
                "account": "*",
                "max_duration_seconds": 3600,
            }
        )
    return gw


@dataclass
class Laptop:
    """A client config of its own; `pam login` fills it."""

    gw: Gateway
    config: Path
    url: str
    ca_file: Path
    ca_pem: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: closed when the test ends: an idle TLS connection would hold up the
    #: daemon's shutdown (its TLS close waits for the peer)
    browsers: list[Browser] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**self.gw.env, "PAM_CONFIG": str(self.config), "PAM_NO_BROWSER": "1"}

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        self.gw.transcript.add(result.stdout)
        self.gw.transcript.add(result.stderr)
        return result

    def login_sso(self, *extra: str) -> SsoLogin:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "login",
                "--gateway",
                self.url,
                "--ca-cert",
                str(self.ca_file),
                "--sso",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        self.procs.append(proc)
        return SsoLogin(
            proc, _Drain(proc.stdout, self.gw.transcript), _Drain(proc.stderr, self.gw.transcript)
        )

    def browser(self) -> Browser:
        browser = Browser(self.ca_pem)
        self.browsers.append(browser)
        return browser

    def access(self) -> AccessProcess:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "db", "access", "--resource", "prod",
             "--account", "scram", "--duration", "10m"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )  # fmt: skip
        self.procs.append(proc)
        return AccessProcess(
            proc, _Drain(proc.stdout, self.gw.transcript), _Drain(proc.stderr, self.gw.transcript)
        )


@dataclass
class SsoLogin:
    """A running `pam login --sso`."""

    proc: subprocess.Popen[bytes]
    stdout: _Drain
    stderr: _Drain

    def authorization_url(self) -> str:
        found = wait_for(
            lambda: URL_LINE.search(self.stderr.text()) or self.proc.poll() is not None
        )
        assert not isinstance(found, bool), self.stderr.text()
        return found.group(1)

    def device(self) -> tuple[str, str]:
        found = wait_for(
            lambda: DEVICE_LINE.search(self.stderr.text()) or self.proc.poll() is not None
        )
        assert not isinstance(found, bool), self.stderr.text()
        return found.group(1), found.group(2)

    def finish(self) -> tuple[int, str, str]:
        code = self.proc.wait(60)
        self.stdout.join(5)
        self.stderr.join(5)
        return code, self.stdout.text(), self.stderr.text()


class Browser:
    """What a person's browser does, over HTTP: no redirect is followed blindly."""

    def __init__(self, gateway_ca: str) -> None:
        # The gateway's pages are verified with its own CA, as an engineer's
        # browser with the gateway CA installed would.
        self.http = httpx.Client(
            timeout=30, trust_env=False, verify=ssl.create_default_context(cadata=gateway_ca)
        )

    def sign_in_at_provider(self, authorization_url: str, sub: str) -> str:
        """The provider's form, then its redirect: the callback URL it sends to."""
        form = self.http.get(authorization_url)
        assert form.status_code == 200 and 'name="sub"' in form.text, form.text
        answer = self.http.post(authorization_url, data={"sub": sub})
        assert answer.status_code == 302, answer.text
        return answer.headers["location"]

    def deny_at_provider(self, authorization_url: str) -> str:
        answer = self.http.post(authorization_url, data={"action": "deny"})
        assert answer.status_code == 302, answer.text
        return answer.headers["location"]

    def get(self, url: str) -> httpx.Response:
        return self.http.get(url)

    def post_form(self, url: str, data: dict[str, str], **headers: str) -> httpx.Response:
        return self.http.post(url, data=data, headers=headers)


@pytest.fixture
def laptop(sso: Gateway, tmp_path: Path) -> Iterator[Laptop]:
    config = json.loads(sso.config_path.read_text())
    ca_file = tmp_path / "gateway-ca.pem"
    ca_file.write_text(config["ca_cert"])
    machine = Laptop(sso, tmp_path / "laptop.json", config["api_url"], ca_file, config["ca_cert"])
    yield machine
    for browser in machine.browsers:
        browser.http.close()
    for proc in machine.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def sign_in(laptop: Laptop, sub: str, *, device: bool = False) -> tuple[int, str, str]:
    login = laptop.login_sso(*(["--device"] if device else []))
    browser = laptop.browser()
    if device:
        page, code = login.device()
        form = browser.get(page)
        assert form.status_code == 200 and "user_code" in form.text
        sent = browser.post_form(page, {"user_code": code.lower()})
        assert sent.status_code == 303, sent.text
        url = sent.headers["location"]
    else:
        url = login.authorization_url()
    callback = browser.sign_in_at_provider(url, sub)
    page = browser.get(callback)
    assert page.status_code in (200, 400), page.text
    return login.finish()


def refusals(gw: Gateway) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = gw.cli_json("audit", "refusals")
    return [r for r in found if r["reason"] == "sso_refused"]


# --- the browser flow ---------------------------------------------------------------


def test_a_browser_sign_in_maps_groups_and_a_group_policy_opens_access(
    laptop: Laptop, idp: Idp
) -> None:
    idp.set_user("sub-lena-1", preferred_username="Lena", groups=["idp-dba", "elsewhere"])
    login = laptop.login_sso()
    url = login.authorization_url()
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["client_id"] == [idp.client_id] and "openid" in query["scope"][0].split()
    browser = laptop.browser()
    callback = browser.sign_in_at_provider(url, "sub-lena-1")
    assert callback.startswith(laptop.url + "/v1/sso/callback?")
    page = browser.get(callback)
    assert page.status_code == 200 and "signed in as <b>lena</b>" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    code, out, err = login.finish()
    assert code == 0, err
    assert "as lena" in out and "groups dba" in out

    me = json.loads(laptop.cli("whoami", "--json").stdout)
    assert (me["name"], me["groups"], me["roles"]) == ("lena", ["dba"], {"default": "member"})
    listed = {u["name"]: u for u in laptop.gw.cli_json("user", "list")}
    assert not listed["lena"]["has_password"]

    access = laptop.access().wait_ready()
    with psycopg.connect(access.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app_scram",)
    access.stop()

    # A second sign-in of the same subject is the same user: the name it was
    # created with stays, its mapped groups follow the provider's claim.
    idp.set_user("sub-lena-1", preferred_username="lena.renamed", groups=["idp-readers"])
    code, out, err = sign_in(laptop, "sub-lena-1")
    assert code == 0, err
    me = json.loads(laptop.cli("whoami", "--json").stdout)
    assert (me["name"], me["groups"], me["roles"]) == ("lena", ["readers"], {})


def test_an_unmapped_group_gives_no_group_and_no_access(laptop: Laptop, idp: Idp) -> None:
    idp.set_user("sub-olaf", preferred_username="olaf", groups=["not-mapped"])
    code, _out, err = sign_in(laptop, "sub-olaf")
    assert code == 0, err
    me = json.loads(laptop.cli("whoami", "--json").stdout)
    assert (me["name"], me["groups"], me["roles"]) == ("olaf", [], {})
    access = laptop.access()
    assert access.wait() != 0
    assert "no policy allows olaf" in access.stderr.text()


def test_a_local_user_of_the_same_name_is_not_taken_over(
    laptop: Laptop, idp: Idp, sso: Gateway
) -> None:
    sso.cli("user", "add", "maxime", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    idp.set_user("sub-impostor", preferred_username="maxime", groups=["idp-dba"])
    code, _out, err = sign_in(laptop, "sub-impostor")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: the pam user 'maxime' already exists")
    assert not laptop.config.exists()
    wait_for(lambda: any(r["who"] == "maxime" for r in refusals(sso)))
    # The local user is untouched and still signs in with its password.
    result = laptop.cli("login", "--gateway", laptop.url, "--ca-cert", str(laptop.ca_file),
                        "--user", "maxime", "--password-stdin", input=PASSWORD + "\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    me = json.loads(laptop.cli("whoami", "--json").stdout)
    assert (me["name"], me["groups"], me["roles"]) == ("maxime", [], {"*": "admin"})


def test_a_disabled_sso_user_is_refused(laptop: Laptop, idp: Idp, sso: Gateway) -> None:
    idp.set_user("sub-dora", preferred_username="dora", groups=[])
    assert sign_in(laptop, "sub-dora")[0] == 0
    sso.cli("user", "disable", "dora")
    code, _out, err = sign_in(laptop, "sub-dora")
    assert code == 1 and "user dora is disabled" in err


def test_a_replayed_callback_and_an_unknown_state_are_refused(
    laptop: Laptop, idp: Idp, sso: Gateway
) -> None:
    idp.set_user("sub-rita", preferred_username="rita", groups=[])
    login = laptop.login_sso()
    browser = laptop.browser()
    callback = browser.sign_in_at_provider(login.authorization_url(), "sub-rita")
    assert browser.get(callback).status_code == 200
    assert login.finish()[0] == 0
    before = len(refusals(sso))
    replayed = browser.get(callback)
    assert replayed.status_code == 400
    assert "unknown, expired or already completed" in replayed.text
    parts = urlsplit(callback)
    query = parse_qs(parts.query)
    forged = urlunsplit(parts._replace(query=urlencode({"code": query["code"][0], "state": "x"})))
    assert browser.get(forged).status_code == 400
    assert browser.get(laptop.url + "/v1/sso/callback").status_code == 400
    wait_for(lambda: len(refusals(sso)) > before)


def test_an_id_token_with_another_nonce_is_refused(laptop: Laptop, idp: Idp) -> None:
    """The provider puts the request's nonce in the ID token: a changed one in
    the URL (an authorization response injected from another request) fails."""
    idp.set_user("sub-nina", preferred_username="nina", groups=[])
    login = laptop.login_sso()
    url = login.authorization_url()
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["nonce"] = "not-the-gateways-nonce"
    tampered = urlunsplit(parts._replace(query=urlencode(query)))
    browser = laptop.browser()
    page = browser.get(browser.sign_in_at_provider(tampered, "sub-nina"))
    assert page.status_code == 400 and "nonce" in page.text
    code, _out, err = login.finish()
    assert code == 1 and "nonce" in err.strip().splitlines()[-1]
    assert not laptop.config.exists()  # never signed in: no profile


def test_a_denied_sign_in_at_the_provider_fails_the_cli(laptop: Laptop) -> None:
    login = laptop.login_sso()
    url = login.authorization_url()
    browser = laptop.browser()
    denied = browser.deny_at_provider(url)
    # This provider leaves the state out of its error redirect (RFC 6749,
    # section 4.1.2.1, wants it back): such an answer names no sign-in.
    assert "error=access_denied" in denied and "state=" not in denied
    assert browser.get(denied).status_code == 400
    # With the state, as the RFC has it, the person's refusal ends the CLI's wait.
    state = parse_qs(urlsplit(url).query)["state"][0]
    page = browser.get(denied + "&" + urlencode({"state": state}))
    assert page.status_code == 400 and "access_denied" in page.text
    code, _out, err = login.finish()
    assert code == 1 and "refused the sign-in (access_denied" in err


def test_a_wrong_client_secret_fails_at_the_code_exchange(
    laptop: Laptop, idp: Idp, sso: Gateway
) -> None:
    wrong = "not-the-" + idp.client_secret
    sso.cli("sso", "configure", "--issuer", idp.url, "--client-id", idp.client_id,
            "--client-secret-stdin", input=wrong + "\n")  # fmt: skip
    try:
        idp.set_user("sub-wes", preferred_username="wes", groups=[])
        code, _out, err = sign_in(laptop, "sub-wes")
        assert code == 1 and "refused the code exchange (invalid_client)" in err
        assert wrong not in sso.transcript.text().decode(errors="replace")
    finally:
        sso.cli("sso", "configure", "--issuer", idp.url, "--client-id", idp.client_id,
                "--client-secret-stdin", input=idp.client_secret + "\n")  # fmt: skip


# --- the device flow ----------------------------------------------------------------


def test_a_device_sign_in_goes_through_the_gateways_page(laptop: Laptop, idp: Idp) -> None:
    idp.set_user("sub-dev", preferred_username="devon", groups=["idp-dba"])
    code, out, err = sign_in(laptop, "sub-dev", device=True)
    assert code == 0, err
    assert "as devon" in out
    me = json.loads(laptop.cli("whoami", "--json").stdout)
    assert (me["name"], me["groups"]) == ("devon", ["dba"])


def test_a_device_code_is_refused_when_wrong_used_or_posted_from_another_site(
    laptop: Laptop, idp: Idp, sso: Gateway
) -> None:
    login = laptop.login_sso("--device")
    page, user_code = login.device()
    browser = laptop.browser()
    wrong = browser.post_form(page, {"user_code": "BCDF-GHJK"})
    assert wrong.status_code == 400 and "unknown, expired or already used" in wrong.text
    forged = browser.post_form(page, {"user_code": user_code}, origin="https://evil.example")
    assert forged.status_code == 403
    sent = browser.post_form(page, {"user_code": user_code}, origin=laptop.url)
    assert sent.status_code == 303
    again = browser.post_form(page, {"user_code": user_code})
    assert again.status_code == 400
    idp.set_user("sub-dev2", preferred_username="devi", groups=[])
    assert (
        browser.get(browser.sign_in_at_provider(sent.headers["location"], "sub-dev2")).status_code
        == 200
    )
    assert login.finish()[0] == 0
    wait_for(lambda: len(refusals(sso)) >= 2)


# --- the API and the client secret --------------------------------------------------


def test_polling_an_unknown_handle_is_404_and_start_needs_no_token(laptop: Laptop) -> None:
    with httpx.Client(base_url=laptop.url, verify=ssl.create_default_context(cadata=laptop.ca_pem),
                      trust_env=False) as client:  # fmt: skip
        assert client.post("/v1/sso/poll", json={"handle": "nope"}).status_code == 404
        started = client.post("/v1/sso/start", json={})
        assert started.status_code == 201
        handle = started.json()["handle"]
        assert client.post("/v1/sso/poll", json={"handle": handle}).json()["status"] == "pending"
        assert client.get("/v1/sso/config").status_code == 401
        assert client.get("/v1/sso/groups").status_code == 401


def test_the_client_secret_is_never_shown_logged_or_stored_in_clear(sso: Gateway, idp: Idp) -> None:
    shown = sso.cli("sso", "show").stdout
    assert idp.client_id in shown and "never shown" in shown
    as_json = sso.cli_json("sso", "show")
    assert "client_secret" not in as_json and as_json["issuer"] == idp.url
    groups = sso.cli_json("sso", "groups")
    assert {(g["claim_value"], g["group"], g["project"]) for g in groups} == {
        ("idp-dba", "dba", "default"),
        ("idp-readers", "readers", None),
    }
    # Every CLI's output and the daemon's log (the transcript), the store file.
    assert idp.client_secret not in sso.transcript.text().decode(errors="replace")
    assert idp.client_secret not in sso.log()
    store = (sso.home / STORE_FILE).read_bytes()
    assert idp.client_secret.encode() not in store
    with sqlite3.connect(sso.home / STORE_FILE) as db:
        (sealed,) = db.execute("SELECT client_secret_ciphertext FROM sso_providers").fetchone()
    assert idp.client_secret.encode() not in sealed


def test_configuring_a_provider_that_is_not_there_says_so(sso: Gateway, idp: Idp) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = sso.cli("sso", "configure", "--issuer", nowhere, "--client-id", "x",
                     "--client-secret-stdin", input="s\n", check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot fetch the identity provider's discovery document" in result.stderr
    plain = sso.cli("sso", "configure", "--issuer", "http://idp.example.com", "--client-id", "x",
                    "--client-secret-stdin", input="s\n", check=False)  # fmt: skip
    assert plain.returncode == 1 and "https://" in plain.stderr
    usage = sso.cli("login", "--gateway", "https://x", "--sso", "--user", "a", check=False)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    # The working configuration is still in place.
    assert sso.cli_json("sso", "show")["issuer"] == idp.url


def test_one_address_cannot_hold_more_than_fifty_sign_ins(
    idp: Idp, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On a gateway of its own: the module's shares its loopback address."""
    gateway = Gateway(tmp_path_factory.mktemp("sso-cap"))
    gateway.init()
    gateway.start()
    try:
        gateway.cli("sso", "configure", "--issuer", idp.url, "--client-id", idp.client_id,
                    "--client-secret-stdin", input=idp.client_secret + "\n")  # fmt: skip
        config = json.loads(gateway.config_path.read_text())
        verify = ssl.create_default_context(cadata=config["ca_cert"])
        with httpx.Client(base_url=config["api_url"], verify=verify, trust_env=False) as client:
            for _ in range(50):
                assert client.post("/v1/sso/start", json={}).status_code == 201
            refused = client.post("/v1/sso/start", json={"device": True})
            assert refused.status_code == 400
            assert "too many sign-ins in progress" in refused.json()["error"]["message"]
    finally:
        gateway.close()
