"""The admin CLI against a real daemon: resources, accounts, sessions, set-up and errors.

Every CLI call is a separate ``python -m cli`` process, as a user runs it. Every
failure must be one line on stderr with a non-zero exit and no traceback
(unless ``--debug`` asks for one).
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import Gateway, assert_one_error_line, wait_for

from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration


#: What a stale, wrong or revoked API token gets.
WRONG_TOKEN = (
    "error: the API token is unknown, expired or revoked (hint: sign in again with `pam login`)"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def add_second_resource(gateway: Gateway, pg: TempCluster, *extra: str) -> dict[str, Any]:
    created: dict[str, Any] = gateway.cli_json(
        "resource",
        "add",
        "second",
        "--host",
        pg.host,
        "--port",
        str(pg.port),
        "--database",
        APP_DATABASE,
        *extra,
    )
    return created


# --- resources ------------------------------------------------------------------------


def test_resources_can_be_added_listed_shown_and_removed(gateway: Gateway, pg: TempCluster) -> None:
    created = add_second_resource(gateway, pg, "--ssl-mode", "require")
    assert {k: created[k] for k in ("name", "host", "port", "database", "ssl_mode")} == {
        "name": "second",
        "host": pg.host,
        "port": pg.port,
        "database": APP_DATABASE,
        "ssl_mode": "require",
    }
    assert created["ca_cert"] is None

    listed = {r["name"]: r for r in gateway.cli_json("resource", "list")}
    assert sorted(listed) == ["prod", "second"]
    assert listed["prod"]["ssl_mode"] == "verify-full"
    assert listed["prod"]["ca_cert"] == pg.ca_cert_path.read_text()
    assert listed["second"] == created

    shown = gateway.cli_json("resource", "show", "prod")
    assert (shown["name"], shown["host"], shown["port"], shown["database"]) == (
        "prod",
        pg.host,
        pg.port,
        APP_DATABASE,
    )
    assert sorted((a["name"], a["username"]) for a in shown["accounts"]) == [
        ("md5", "md5_app"),
        ("plain", "plain_app"),
        ("scram", "app_scram"),
    ]
    table = gateway.cli("resource", "list").stdout
    assert re.search(rf"prod\s.*{pg.host}:{pg.port}\s.*appdb\s.*verify-full\s.*custom", table)
    assert re.search(r"second\s.*require\s.*system", table)

    removed = gateway.cli("resource", "remove", "second")
    assert removed.stdout.strip() == "Resource second removed."
    assert [r["name"] for r in gateway.cli_json("resource", "list")] == ["prod"]


def test_adding_a_resource_twice_is_refused(gateway: Gateway, pg: TempCluster) -> None:
    result = gateway.cli(
        "resource", "add", "prod", "--host", pg.host, "--database", APP_DATABASE, check=False
    )
    assert assert_one_error_line(result) == "error: resource 'prod' already exists"


def test_a_resource_name_with_spaces_or_capitals_is_refused(
    gateway: Gateway, pg: TempCluster
) -> None:
    result = gateway.cli(
        "resource", "add", "Bad Name", "--host", pg.host, "--database", APP_DATABASE, check=False
    )
    line = assert_one_error_line(result)
    assert line.startswith("error: invalid resource name 'Bad Name'")
    assert [r["name"] for r in gateway.cli_json("resource", "list")] == ["prod"]


def test_removing_or_showing_an_unknown_resource_is_one_error_line(gateway: Gateway) -> None:
    for command in ("remove", "show"):
        result = gateway.cli("resource", command, "nope", check=False)
        assert assert_one_error_line(result) == "error: resource 'nope' not found"


def test_a_resource_with_an_active_session_cannot_be_removed(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    result = gateway.cli("resource", "remove", "prod", check=False)
    line = assert_one_error_line(result)
    assert line.startswith("error: resource 'prod' has 1 active session(s)")
    access.stop()
    gateway.cli("resource", "remove", "prod")
    assert gateway.cli_json("resource", "list") == []


# --- accounts ---------------------------------------------------------------------------


def test_accounts_are_listed_without_their_passwords(
    gateway: Gateway, pg_roles: Mapping[str, PgRole]
) -> None:
    password = "a-new-Secret-for-listing"
    result = gateway.cli(
        "account",
        "add",
        "prod",
        "extra",
        "--username",
        "app_scram",
        "--password-stdin",
        "--no-verify",
        "--json",
        input=password + "\n",
    )
    created = json.loads(result.stdout)
    assert (created["resource_name"], created["name"], created["username"]) == (
        "prod",
        "extra",
        "app_scram",
    )

    listing = gateway.cli("account", "list", "--json").stdout
    accounts = json.loads(listing)
    assert sorted(a["name"] for a in accounts) == ["extra", "md5", "plain", "scram"]
    # The only password-ish field is when it was last set.
    assert {key for a in accounts for key in a if "password" in key} == {"password_updated_at"}
    for secret in [password, *(role.password for role in pg_roles.values())]:
        assert secret not in listing
        assert secret.encode() not in gateway.transcript.text()
    table = gateway.cli("account", "list", "--resource", "prod").stdout
    assert re.search(r"prod\s.*extra\s.*app_scram", table)

    gateway.cli("account", "remove", "prod", "extra")
    names = [a["name"] for a in gateway.cli_json("account", "list", "--resource", "prod")]
    assert names == ["md5", "plain", "scram"]


def test_adding_an_account_without_a_terminal_needs_password_stdin(gateway: Gateway) -> None:
    result = gateway.cli(
        "account", "add", "prod", "noprompt", "--username", "app_scram", input="", check=False
    )
    assert result.returncode == 2
    assert "no terminal to prompt for the password; use --password-stdin" in result.stderr
    assert "Traceback" not in result.stderr
    assert "noprompt" not in [a["name"] for a in gateway.cli_json("account", "list")]


def test_an_empty_password_on_stdin_is_a_usage_error(gateway: Gateway) -> None:
    args = ["account", "add", "prod", "empty", "--username", "app_scram", "--password-stdin"]
    result = gateway.cli(*args, input="\n", check=False)
    assert result.returncode == 2
    assert "the password is empty" in result.stderr


def test_removing_an_unknown_account_is_one_error_line(gateway: Gateway) -> None:
    result = gateway.cli("account", "remove", "prod", "nope", check=False)
    assert assert_one_error_line(result) == "error: account 'nope' not found on resource 'prod'"


# --- sessions ----------------------------------------------------------------------------


def test_sessions_list_shows_every_session_and_active_only_the_live_ones(
    gateway: Gateway,
) -> None:
    ended = gateway.access().wait_ready()
    assert ended.stop() == 0
    live = gateway.access(account="md5").wait_ready()

    everything = gateway.cli_json("sessions", "list")
    assert [s["id"][:8] for s in everything] == [live.session_prefix, ended.session_prefix]
    assert [s["end_reason"] for s in everything] == [None, "client_ended"]
    assert [(s["resource_name"], s["account_name"]) for s in everything] == [
        ("prod", "md5"),
        ("prod", "scram"),
    ]
    active = gateway.cli_json("sessions", "list", "--active")
    assert [s["id"][:8] for s in active] == [live.session_prefix]

    table = gateway.cli("sessions", "list").stdout
    assert live.session_prefix in table and ended.session_prefix in table
    assert re.search(rf"{live.session_prefix}\S*\s.*prod/md5\s.*active", table)
    assert re.search(rf"{ended.session_prefix}\S*\s.*prod/scram\s.*client_ended", table)
    active_table = gateway.cli("sessions", "list", "--active").stdout
    assert live.session_prefix in active_table
    assert ended.session_prefix not in active_table


def test_sessions_show_lists_each_connection_of_a_session(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(application_name="cli-show-test")) as conn:
        pid = conn.info.backend_pid
        conn.execute("select 1")
    with psycopg.connect(access.dsn(application_name="still-open")):
        detail = wait_for(lambda: _one_closed_one_live(gateway, access.session_prefix))
        table = gateway.cli("sessions", "show", access.session_prefix).stdout

    assert {"session", "connections", "live_connections"} <= detail.keys()
    assert detail["session"]["id"].startswith(access.session_prefix)
    assert detail["session"]["end_reason"] is None
    by_name = {c["application_name"]: c for c in detail["connections"]}
    assert sorted(by_name) == ["cli-show-test", "still-open"]
    first = by_name["cli-show-test"]
    assert (first["backend_pid"], first["end_reason"]) == (pid, "client_closed")
    assert first["client_addr"].startswith("127.0.0.1:")
    assert by_name["still-open"]["ended_at"] is None
    assert re.search(r"live connections\s+1", table)
    assert re.search(rf"cli-show-test\s.*{pid}\s.*client_closed", table)
    assert re.search(r"still-open\s.*live", table)


def _one_closed_one_live(gateway: Gateway, session: str) -> dict[str, Any] | None:
    detail: dict[str, Any] = gateway.cli_json("sessions", "show", session)
    ended = [c for c in detail["connections"] if c["ended_at"]]
    return detail if len(ended) == 1 and detail["live_connections"] == 1 else None


def test_showing_an_unknown_session_is_one_error_line(gateway: Gateway) -> None:
    result = gateway.cli("sessions", "show", "0123abcd", check=False)
    assert assert_one_error_line(result) == "error: session '0123abcd' not found"


# --- reaching the daemon -------------------------------------------------------------------


def test_the_cli_says_so_when_the_daemon_is_not_running(gateway: Gateway) -> None:
    api_url = json.loads(gateway.config_path.read_text())["api_url"]
    assert gateway.stop() == 0

    for args in (("resource", "list"), ("sessions", "list", "--json")):
        result = gateway.cli(*args, check=False)
        assert assert_one_error_line(result) == (
            f"error: cannot reach the pam gateway at {api_url}"
            " (hint: is `pam gateway run` running?)"
        )


def test_a_wrong_api_token_is_refused(gateway: Gateway) -> None:
    config = json.loads(gateway.config_path.read_text())
    config["token"] = "not-the-token"
    gateway.config_path.write_text(json.dumps(config))

    result = gateway.cli("resource", "list", check=False)
    assert assert_one_error_line(result) == WRONG_TOKEN


def test_a_missing_client_config_says_how_to_create_one(gateway: Gateway) -> None:
    gateway.config_path.unlink()
    result = gateway.cli("resource", "list", check=False)
    line = assert_one_error_line(result)
    assert line.startswith(f"error: no pam client configuration at {gateway.config_path}")
    assert "pam gateway init" in line


# --- set-up ----------------------------------------------------------------------------------


def test_gateway_init_twice_needs_force_and_force_replaces_the_token(gateway: Gateway) -> None:
    api_port = json.loads(gateway.config_path.read_text())["api_url"].rsplit(":", 1)[1]
    old_config = gateway.config_path.read_bytes()

    again = gateway.cli("gateway", "init", "--api-port", api_port, check=False)
    line = assert_one_error_line(again)
    assert line.startswith(f"error: {gateway.home} is already initialised")
    assert "--force" in line
    assert gateway.config_path.read_bytes() == old_config

    assert gateway.stop() == 0
    gateway.cli("gateway", "init", "--api-port", api_port, "--force")
    new_config = gateway.config_path.read_bytes()
    assert json.loads(new_config)["token"] != json.loads(old_config)["token"]
    gateway.start()
    # Keys and data survive; only the token is new.
    assert [r["name"] for r in gateway.cli_json("resource", "list")] == ["prod"]
    assert gateway.cli_json("resource", "verify", "prod", "--account", "scram")[0]["ok"] is True

    gateway.config_path.write_bytes(old_config)
    result = gateway.cli("resource", "list", check=False)
    assert assert_one_error_line(result) == WRONG_TOKEN


def test_secret_files_are_private_to_their_owner(gateway: Gateway) -> None:
    assert mode(gateway.home) == 0o700
    assert mode(gateway.home / "master.key") == 0o600
    assert mode(gateway.home / "gateway.json") == 0o600
    assert mode(gateway.config_path) == 0o600


def test_a_client_config_others_can_read_is_made_private_with_one_warning(
    gateway: Gateway,
) -> None:
    token = json.loads(gateway.config_path.read_text())["token"]
    gateway.config_path.chmod(0o644)

    result = gateway.cli("resource", "list", "--json")

    assert [r["name"] for r in json.loads(result.stdout)] == ["prod"]
    assert mode(gateway.config_path) == 0o600
    [line] = result.stderr.splitlines()
    assert line.startswith(f"warning: {gateway.config_path} was open to other users (mode 0644)")
    assert token not in result.stderr
    assert gateway.cli("resource", "list", "--json").stderr == ""


def test_a_state_store_left_open_to_others_is_made_private_when_the_daemon_starts(
    gateway: Gateway,
) -> None:
    # A pam.db from before files were created 0600 (or chmod-ed since): it holds
    # the audit trail's SQL and parameters, so the daemon repairs it and says so.
    store = gateway.home / "pam.db"
    assert gateway.stop() == 0
    store.chmod(0o644)

    gateway.start()

    assert mode(store) == 0o600
    [event] = [e for e in gateway.log_events() if e.get("event") == "state_file_made_private"]
    assert event["path"] == str(store)
    assert event["was_mode"] == "0644"
    assert [r["name"] for r in gateway.cli_json("resource", "list")] == ["prod"]


def test_debug_shows_a_traceback_and_the_default_never_does(gateway: Gateway) -> None:
    plain = gateway.cli("resource", "show", "nope", check=False)
    assert assert_one_error_line(plain) == "error: resource 'nope' not found"

    debug = gateway.cli("--debug", "resource", "show", "nope", check=False)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == "error: resource 'nope' not found"


def test_path_shaped_names_get_a_json_error_not_a_redirect(gateway: Gateway) -> None:
    for args in (("resource", "show", "a/b"), ("sessions", "show", "")):
        result = gateway.cli(*args, check=False)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "HTTP 307" not in lines[0] and "without JSON" not in lines[0]
