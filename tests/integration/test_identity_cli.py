"""`pam login/logout/whoami`, `pam user`, `pam token` and `pam policy` as a user
runs them: real CLI processes against a real daemon (issue 13, points 2-4).

A "laptop" is a client config of its own (``PAM_CONFIG``) that only `pam login`
fills; the daemon's own host uses the config `pam gateway init` wrote. Every
failure is one line on stderr with a non-zero exit, and no password or token
reaches a terminal it was not meant for.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Gateway

from gateway.testing.net import free_port

pytestmark = pytest.mark.integration

PASSWORD = "pw-cli-Secret-9"


@dataclass
class Laptop:
    """A client config of its own, pointed at the module's daemon."""

    gw: Gateway
    config: Path
    url: str
    #: the gateway's CA certificate (what `pam gateway ca-cert` prints), pinned
    ca_file: Path

    def cli(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            input=input,
            capture_output=True,
            text=True,
            env={**self.gw.env, "PAM_CONFIG": str(self.config), **(env or {})},
            timeout=120,
        )
        self.gw.transcript.add(result.stdout)
        self.gw.transcript.add(result.stderr)
        return result

    def login(self, user: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "login",
            "--gateway",
            self.url,
            "--ca-cert",
            str(self.ca_file),
            "--user",
            user,
            "--password-stdin",
            input=password + "\n",
        )

    def profile(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.config.read_text())
        return loaded


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path_factory.mktemp("idcli"))
    gateway.init()
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.close()


@pytest.fixture
def laptop(gw: Gateway, tmp_path: Path) -> Laptop:
    config = json.loads(gw.config_path.read_text())
    ca_file = tmp_path / "gateway-ca.pem"
    ca_file.write_text(config["ca_cert"])
    return Laptop(gw, tmp_path / "laptop.json", config["api_url"], ca_file)


def add_user(gw: Gateway, name: str, *extra: str) -> None:
    gw.cli("user", "add", name, "--password-stdin", *extra, input=PASSWORD + "\n")


def test_login_stores_a_private_profile_and_whoami_answers(gw: Gateway, laptop: Laptop) -> None:
    add_user(gw, "lena", "--role", "member", "--project", "default", "--group", "dba")
    result = ok(laptop.login("lena"))
    assert "as lena" in result.stdout
    assert stat.S_IMODE(os.stat(laptop.config).st_mode) == 0o600
    profile = laptop.profile()
    assert (profile["api_url"], profile["user"]) == (laptop.url, "lena")
    assert profile["token"].startswith("pam_")
    assert profile["token"] not in result.stdout + result.stderr
    me = json.loads(ok(laptop.cli("whoami", "--json")).stdout)
    assert (me["name"], me["kind"], me["roles"], me["groups"]) == (
        "lena",
        "user",
        {"default": "member"},
        ["dba"],
    )
    assert "lena (user): member of default; groups dba" in ok(laptop.cli("whoami")).stdout
    assert PASSWORD not in gw.transcript.text().decode(errors="replace")


def test_a_wrong_password_is_one_line_and_stores_nothing(gw: Gateway, laptop: Laptop) -> None:
    add_user(gw, "mona", "--role", "member")
    one_line_error(laptop.login("mona", "not-her-password"), "wrong user name or password")
    one_line_error(laptop.login("nobody-here"), "wrong user name or password")
    # The refusals name mona; a name no principal has (it may be a password typed
    # into the wrong field) is not recorded.
    refused = [r for r in gw.cli_json("audit", "refusals") if r["reason"] == "bad_password"]
    assert "mona" in {r["who"] for r in refused}
    assert not any("nobody-here" in json.dumps(r) for r in refused)
    assert not laptop.config.exists()


def test_logout_revokes_the_token(gw: Gateway, laptop: Laptop) -> None:
    add_user(gw, "nina", "--role", "auditor")
    ok(laptop.login("nina"))
    token = laptop.profile()["token"]
    ok(laptop.cli("logout"))
    assert not laptop.config.exists()
    copied = httpx.get(
        laptop.url + "/v1/whoami",
        headers={"Authorization": f"Bearer {token}"},
        trust_env=False,
        verify=ssl.create_default_context(cafile=laptop.ca_file),
    )
    assert copied.status_code == 401
    one_line_error(laptop.cli("whoami"), "no pam client configuration")


def test_a_second_gateway_keeps_the_first_ones_profile(gw: Gateway, tmp_path: Path) -> None:
    first = json.loads(gw.config_path.read_text())
    other_home = tmp_path / "second"
    env = {**gw.env, "PAM_HOME": str(other_home)}
    run = [sys.executable, "-m", "cli", "gateway", "init", "--admin", "second-admin"]
    second = subprocess.run(
        [*run, "--api-port", str(free_port())], env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr
    try:
        config = json.loads(gw.config_path.read_text())
        assert config["api_url"] != first["api_url"]
        kept = config["profiles"][first["api_url"]]
        assert (kept["token"], kept["gateway_id"]) == (first["token"], first["gateway_id"])
        # ... and a third gateway on the first one's address does not replace it.
        port = first["api_url"].rsplit(":", 1)[1]
        third = subprocess.run(
            [*run, "--api-port", port],
            env={**env, "PAM_HOME": str(tmp_path / "third")},
            capture_output=True,
            text=True,
        )
        one_line_error(third, "belongs to another gateway")
        again = json.loads(gw.config_path.read_text())
        assert again["profiles"][first["api_url"]]["token"] == first["token"]
    finally:
        # Put the module's daemon back as the current profile, as it was.
        gw.config_path.write_text(json.dumps(first))
        gw.config_path.chmod(0o600)


def test_token_create_prints_the_token_once_and_it_works_as_pam_token(
    gw: Gateway, laptop: Laptop
) -> None:
    created = gw.cli("token", "create", "ci-bot", "--role", "member", "--project", "default")
    token = created.stdout.strip()
    assert token.startswith("pam_") and "\n" not in token
    assert token not in created.stderr
    assert "shown once" in created.stderr
    env = {"PAM_TOKEN": token, "PAM_GATEWAY": laptop.url, "PAM_CA_CERT": str(laptop.ca_file)}
    me = json.loads(ok(laptop.cli("whoami", "--json", env=env)).stdout)
    assert (me["name"], me["kind"], me["roles"]) == ("ci-bot", "machine", {"default": "member"})
    assert not laptop.config.exists()  # nothing was written on the way
    listed = json.loads(gw.cli("user", "list", "--json").stdout)
    assert token not in json.dumps(listed)
    assert [u["kind"] for u in listed if u["name"] == "ci-bot"] == ["machine"]
    one_line_error(gw.cli("token", "create", "ci-bot", check=False), "already exists")


def test_user_add_list_disable_remove(gw: Gateway, laptop: Laptop) -> None:
    add_user(gw, "olga", "--role", "member", "--project", "analytics", "--group", "ops")
    listed = {u["name"]: u for u in gw.cli_json("user", "list")}
    assert listed["olga"]["roles"] == {"analytics": "member"}
    assert listed["olga"]["groups"] == ["ops"] and listed["olga"]["has_password"]
    assert "member@analytics" in gw.cli("user", "list").stdout
    ok(laptop.login("olga"))
    assert "Disabled olga" in gw.cli("user", "disable", "olga").stdout
    disabled = [u for u in gw.cli_json("user", "list") if u["name"] == "olga"]
    assert disabled[0]["disabled_at"] is not None
    one_line_error(laptop.cli("whoami"), "unknown, expired or revoked")
    one_line_error(laptop.login("olga"), "wrong user name or password")
    assert "Removed olga" in gw.cli("user", "remove", "olga").stdout
    assert "olga" not in {u["name"] for u in gw.cli_json("user", "list")}
    one_line_error(gw.cli("user", "remove", "olga", check=False), "no user named 'olga'")
    one_line_error(gw.cli("user", "disable", "olga", check=False), "no user named 'olga'")


def test_user_cli_errors_are_one_line(gw: Gateway, laptop: Laptop) -> None:
    add_user(gw, "pia", "--role", "member")
    one_line_error(
        gw.cli("user", "add", "pia", "--role", "member", "--no-password", check=False),
        "user 'pia' already exists",
    )
    one_line_error(
        gw.cli("user", "add", "quinn", "--role", "member", "--password-stdin", input="short\n",
               check=False),
        "at least 8 characters",
    )  # fmt: skip
    ok(laptop.login("pia"))
    one_line_error(laptop.cli("user", "list"), "not an administrator of every project")
    one_line_error(
        laptop.cli("user", "add", "rita", "--role", "admin", "--no-password"),
        "not an administrator",
    )
    one_line_error(laptop.cli("policy", "remove", "nothing"), "no policy named 'nothing'")
    # Usage errors (click's own) are one line too.
    one_line_error(gw.cli("user", "add", "rita", "--role", "owner", check=False), "'owner'")
    one_line_error(gw.cli("user", "add", "rita", check=False), "--role")
    one_line_error(laptop.cli("logout", "--gateway", "http://nowhere:1"), "no profile for")
    one_line_error(gw.cli("user", "frobnicate", check=False), "frobnicate")
    unreachable = f"http://127.0.0.1:{free_port()}"
    one_line_error(
        laptop.cli("login", "--gateway", unreachable, "--user", "pia", "--password-stdin",
                   input=PASSWORD + "\n"),
        unreachable,
    )  # fmt: skip


def test_policy_add_list_remove(gw: Gateway) -> None:
    gw.cli(
        "policy", "add", "dba-prod", "--subject", "sam", "--subject", "@dba",
        "--resource", "prod-*", "--account", "*", "--max-duration", "2h", "--require-reason",
        "--require-approval", "2", "--approver", "lee", "--approver", "@leads", "--break-glass",
        "--require-mfa", "--idle-timeout", "15m",
    )  # fmt: skip
    gw.cli(
        "policy", "add", "stats", "--project", "analytics", "--subject", "sam",
        "--resource", "stats", "--account", "ro", "--max-duration", "30m",
    )  # fmt: skip
    found = {p["name"]: p for p in gw.cli_json("policy", "list")}
    assert found["dba-prod"] == {
        "name": "dba-prod",
        "project": "default",
        "subjects": ["sam", "@dba"],
        "resource_glob": "prod-*",
        "account_glob": "*",
        "max_duration_seconds": 7200,
        "require_reason": True,
        "approvals_required": 2,
        "approvers": ["lee", "@leads"],
        "break_glass": True,
        "require_mfa": True,
        "idle_timeout_seconds": 900,
    }
    assert (found["stats"]["project"], found["stats"]["max_duration_seconds"]) == (
        "analytics",
        1800,
    )
    table = gw.cli("policy", "list").stdout
    assert "reason; 2 approval(s) by lee, @leads; break-glass allowed; MFA; idle 15m" in " ".join(
        table.split()
    )
    one_line_error(
        gw.cli("policy", "add", "dba-prod", "--subject", "x", "--resource", "*", "--account",
               "*", "--max-duration", "1h", check=False),
        "policy 'dba-prod' already exists",
    )  # fmt: skip
    one_line_error(
        gw.cli("policy", "add", "bad", "--subject", "x", "--resource", "*", "--account", "*",
               "--max-duration", "soon", check=False),
        "soon",
    )  # fmt: skip
    assert "Removed policy dba-prod" in gw.cli("policy", "remove", "dba-prod").stdout
    assert "dba-prod" not in {p["name"] for p in gw.cli_json("policy", "list")}
    one_line_error(gw.cli("policy", "remove", "dba-prod", check=False), "no policy named")
