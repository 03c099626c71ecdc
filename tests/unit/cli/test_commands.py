"""Tests of the ``pam`` command tree in-process: wiring, global options and error lines.

The commands run under click's test runner against an in-memory daemon (an
httpx transport answering canned JSON), passed in as the root group's client
factory; tests/integration/test_cli.py covers the same commands against a real
daemon.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from click.testing import CliRunner, Result

from cli.client import ApiClient
from cli.commands.resources import SSL_MODES
from cli.main import cli
from gateway.config import ClientConfig
from gateway.net.upstream import SslMode

CONFIG = ClientConfig(api_url="http://pam.test:7745", token="t0ken")

RESOURCE = {
    "id": "r1",
    "name": "prod",
    "host": "db.internal",
    "port": 5432,
    "database": "appdb",
    "ssl_mode": "verify-full",
    "ca_cert": None,
    "created_at": "2024-06-01T10:00:00Z",
}


def verify_result(ok: bool, **changes: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "ok": ok,
        "resource": "prod",
        "account": "scram",
        "address": "db.internal:5432",
        "ssl_mode": "verify-full",
        "latency_ms": 4.2 if ok else None,
        "server_version": "15.4" if ok else None,
        "tls_version": "TLSv1.3" if ok else None,
        "cipher": "TLS_AES_256_GCM_SHA384" if ok else None,
        "auth_method": "scram-sha-256" if ok else None,
        "error_kind": None,
        "error_sqlstate": None,
        "error": None,
        "hint": None,
    }
    return result | changes


Route = tuple[str, str]


def run(routes: dict[Route, tuple[int, Any]], *args: str) -> tuple[Result, list[httpx.Request]]:
    """``pam ARGS`` against a daemon answering ``routes`` (method, path) -> (status, JSON)."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, body = routes[(request.method, request.url.path)]
        return httpx.Response(status, json=body)

    def factory() -> ApiClient:
        return ApiClient(CONFIG, transport=httpx.MockTransport(answer))

    result = CliRunner().invoke(cli, list(args), obj=factory, prog_name="pam")
    return result, seen


def test_the_resource_ssl_modes_are_the_gateways_in_libpq_order() -> None:
    assert get_args(SslMode) == SSL_MODES


def test_json_output_is_the_daemons_answer_unchanged() -> None:
    result, _ = run({("GET", "/v1/resources"): (200, [RESOURCE])}, "resource", "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [RESOURCE]


def test_a_failed_verify_is_a_line_on_stderr_with_its_hint_and_exit_1() -> None:
    failed = verify_result(
        False,
        account="stale",
        error_kind="auth",
        error_sqlstate="28P01",
        error="password authentication failed",
        hint="rotate it",
    )
    routes = {("POST", "/v1/resources/prod/verify"): (200, [verify_result(True), failed])}

    result, seen = run(routes, "resource", "verify", "prod")

    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "ok  prod/scram at db.internal:5432: PostgreSQL 15.4, TLSv1.3 TLS_AES_256_GCM_SHA384,"
        " auth scram-sha-256, 4.2 ms"
    ]
    assert result.stderr.splitlines() == [
        "FAILED  prod/stale at db.internal:5432: [auth, 28P01] password authentication failed"
        " (hint: rotate it)"
    ]
    assert "account" not in seen[0].url.params


NOT_FOUND = (404, {"error": {"type": "NotFound", "message": "resource 'nope' not found"}})


def test_an_api_error_is_one_line_on_stderr_and_exit_1() -> None:
    result, _ = run({("GET", "/v1/resources/nope"): NOT_FOUND}, "resource", "show", "nope")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "error: resource 'nope' not found\n"


def test_debug_adds_the_traceback_before_the_error_line() -> None:
    routes = {("GET", "/v1/resources/nope"): NOT_FOUND}
    result, _ = run(routes, "--debug", "resource", "show", "nope")
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1] == "error: resource 'nope' not found"


def test_an_unexpected_exception_is_one_line_too() -> None:
    routes: dict[Route, tuple[int, Any]] = {}  # the fake daemon raises KeyError
    result, _ = run(routes, "account", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: unexpected error: KeyError: ")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--home", "{root}", "gateway", "init"], "{root}"),
        (["--home", "{root}", "gateway", "init", "--home", "{own}"], "{own}"),
        (["gateway", "init", "--home", "{own}"], "{own}"),
    ],
    ids=["root", "own wins", "own"],
)
def test_gateway_commands_take_the_state_directory_from_home_here_or_at_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    from gateway.app import daemon

    homes: list[Path] = []

    def init(home: Path, **_: Any) -> daemon.InitResult:
        homes.append(home)
        return daemon.InitResult(
            home=home, client_config=tmp_path / "config.json", api_url=CONFIG.api_url
        )

    monkeypatch.setattr(daemon, "init_home", init)
    paths = {"root": str(tmp_path / "root"), "own": str(tmp_path / "own")}

    result = CliRunner().invoke(cli, [a.format(**paths) for a in args], prog_name="pam")

    assert result.exit_code == 0, result.output
    assert homes == [Path(expected.format(**paths))]


# --- text from outside is shown escaped --------------------------------------------------

ESC_TEXT = "evil\x1b[2J\x07[bold]x[/bold]"


def test_server_text_in_verify_lines_is_escaped_and_never_markup() -> None:
    # server_version and error text come from the database server itself.
    ok = verify_result(True, server_version=ESC_TEXT)
    failed = verify_result(
        False, account="x", error_kind="server", error_sqlstate="XX000", error=ESC_TEXT
    )
    routes = {("POST", "/v1/resources/prod/verify"): (200, [ok, failed])}

    result, _ = run(routes, "resource", "verify", "prod")

    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "PostgreSQL evil\\x1b[2J\\x07[bold]x[/bold]," in result.stdout
    assert "evil\\x1b[2J\\x07[bold]x[/bold]" in result.stderr


def test_an_error_line_escapes_what_the_daemon_sent() -> None:
    refused = (400, {"error": {"type": "InvalidRequest", "message": ESC_TEXT, "hint": "\x1b]0;t"}})
    result, _ = run({("GET", "/v1/resources/nope"): refused}, "resource", "show", "nope")
    assert result.exit_code == 1
    assert result.stderr == "error: evil\\x1b[2J\\x07[bold]x[/bold] (hint: \\x1b]0;t)\n"


@pytest.mark.parametrize("step", ["--activate", "--status"])
def test_retire_is_a_step_of_its_own(step: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["gateway", "rotate-master-key", "--home", str(tmp_path), step, "--retire", "1"],
        prog_name="pam",
    )
    assert result.exit_code == 2
    assert f"--retire is a step of its own: give it without {step}" in result.output


@pytest.mark.parametrize("fleet_status", [200, 404])
def test_login_keeps_the_fleet_and_a_gateway_that_cannot_list_it_costs_only_the_failover(
    fleet_status: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token is issued before the fleet is asked for: a gateway without
    ``/v1/gateways`` (an older one) still signs the user in, with a warning."""
    from cli.commands import identity

    def answer(request: httpx.Request) -> httpx.Response:
        route = (request.method, request.url.path)
        if route == ("POST", "/v1/login"):
            body = {"token": "s3ss10n", "user": "ann", "expires_at": None}
            return httpx.Response(200, json=body)
        if route == ("GET", "/v1/health"):
            return httpx.Response(200, json={"gateway_id": "gw-a"})
        if route == ("GET", "/v1/gateways") and fleet_status == 200:
            return httpx.Response(200, json=["http://pam.test:7745", "http://b.test:7745"])
        return httpx.Response(404, json={"error": {"type": "NotFound", "message": "not found"}})

    class Mocked(ApiClient):
        def __init__(self, config: Any = None, **kwargs: Any) -> None:
            super().__init__(config, transport=httpx.MockTransport(answer), **kwargs)

    monkeypatch.setattr(identity, "ApiClient", Mocked)
    config = tmp_path / "client.json"
    monkeypatch.setenv("PAM_CONFIG", str(config))
    result = CliRunner().invoke(
        cli,
        ["login", "--gateway", "http://pam.test:7745", "--user", "ann", "--password-stdin"],
        input="pw\n",
        prog_name="pam",
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(config.read_text())
    assert saved["token"] == "s3ss10n"
    if fleet_status == 200:
        assert saved["api_urls"] == ["http://b.test:7745"]
        assert "fails over to http://b.test:7745" in result.stdout
    else:
        assert saved["api_urls"] == []
        assert "this profile will not fail over" in result.stderr
