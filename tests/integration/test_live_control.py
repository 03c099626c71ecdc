"""Live control of a grant (issue 14, point 6): expiry notices, extensions, idle limits.

One daemon for the module, with notices 8 and 4 seconds before expiry (the
defaults are 5 minutes and 1 minute), a real PostgreSQL, real `pam` processes
(`pam db access`, `pam grant extend`, `pam audit verify`) and psycopg. A member,
alice, signs in with a client config of her own and is allowed by policies:
``alice-short`` (scram, at most 1 minute) and ``alice-idle`` (md5, connections
idle for 3 seconds are cut). Waits are bounded polls, never timing assertions.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import AccessProcess, Gateway, _Drain, edit_store, wait_for

from gateway.testing.net import free_port
from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

PASSWORD = "pw-live-Secret-3"
NOTICE_LEADS = [8, 4]


@dataclass
class Live:
    gw: Gateway
    #: alice's own client config (a member of project default)
    alice_config: Path

    def alice_env(self) -> dict[str, str]:
        return {**self.gw.env, "PAM_CONFIG": str(self.alice_config)}

    def alice_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            capture_output=True,
            text=True,
            env=self.alice_env(),
            timeout=120,
        )
        self.gw.transcript.add(result.stdout + result.stderr)
        return result


@pytest.fixture(scope="module")
def live(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live")
    gw = Gateway(root)
    gw.cli("gateway", "init", "--api-port", str(free_port()))
    settings_path = gw.home / "gateway.json"
    settings = json.loads(settings_path.read_text())
    settings["expiry_notice_seconds"] = NOTICE_LEADS
    settings_path.write_text(json.dumps(settings))
    gw.start()
    try:
        with gw.api() as api:
            api.post(
                "/v1/resources",
                {
                    "name": "prod",
                    "host": pg.host,
                    "port": pg.port,
                    "database": APP_DATABASE,
                    "ssl_mode": "verify-full",
                    "ca_cert": pg.ca_cert_path.read_text(),
                },
            )
            for key in ("scram", "md5"):
                role = pg_roles[key]
                api.post(
                    "/v1/resources/prod/accounts",
                    {"name": key, "username": role.name, "password": role.password},
                )
            api.post(
                "/v1/users",
                {"name": "alice", "role": "member", "project": "default", "password": PASSWORD},
            )
            for policy in (
                {"name": "alice-short", "account": "scram", "max_duration_seconds": 60},
                {
                    "name": "alice-idle",
                    "account": "md5",
                    "max_duration_seconds": 3600,
                    "idle_timeout_seconds": 3,
                },
            ):
                api.post("/v1/policies", {"subjects": ["alice"], "resource": "prod", **policy})
            token = api.post("/v1/login", {"user": "alice", "password": PASSWORD})["token"]
        config = json.loads(gw.config_path.read_text())
        alice_config = root / "alice.json"
        alice_config.write_text(json.dumps({**config, "token": token, "user": "alice"}))
        alice_config.chmod(0o600)
        yield Live(gw, alice_config)
    finally:
        gw.close()


@dataclass
class JsonAccess:
    """A `pam db access --json` process and the events it printed."""

    process: AccessProcess

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.process.stdout.text().splitlines()]

    def wait_event(self, kind: str, count: int = 1, timeout: float = 60.0) -> dict[str, Any]:
        found = wait_for(
            lambda: [e for e in self.events() if e["event"] == kind][count - 1 :], timeout
        )
        event: dict[str, Any] = found[0]
        return event

    @property
    def granted(self) -> dict[str, Any]:
        return self.wait_event("granted")

    def dsn(self, **extra: str) -> str:
        granted = self.granted
        params = {
            "host": granted["listen_host"],
            "port": str(granted["listen_port"]),
            "user": "app_scram",
            "dbname": APP_DATABASE,
            "sslmode": "disable",
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in params.items())


def start_access(
    gw: Gateway,
    *args: str,
    env: dict[str, str] | None = None,
    account: str = "scram",
    duration: str = "1h",
) -> AccessProcess:
    command = [sys.executable, "-m", "cli", "db", "access", "--resource", "prod"]
    command += ["--account", account, "--duration", duration, *args]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or gw.env,
    )
    access = AccessProcess(
        proc, _Drain(proc.stdout, gw.transcript), _Drain(proc.stderr, gw.transcript)
    )
    gw.accesses.append(access)
    return access


def json_access(gw: Gateway, *args: str, **kwargs: Any) -> JsonAccess:
    return JsonAccess(start_access(gw, "--json", *args, **kwargs))


def when(iso: str) -> datetime:
    return datetime.fromisoformat(iso).astimezone(UTC)


def notice_text(granted: dict[str, Any], lead: int) -> str:
    return (
        f"access grant for prod/scram expires at {when(granted['expires_at']):%H:%M:%S} UTC"
        f" (in {lead} seconds); connections will be closed then"
    )


# --- notices before expiry ---------------------------------------------------------------


@pytest.mark.timeout(180)
def test_live_connections_hear_each_expiry_notice_then_the_cut(live: Live) -> None:
    access = json_access(live.gw, duration="20s")
    granted = access.granted
    heard: list[tuple[str | None, ...]] = []

    def hear(d: psycopg.errors.Diagnostic) -> None:  # valid only during the call
        heard.append((d.severity_nonlocalized, d.sqlstate, d.message_primary, d.message_hint))

    conn = psycopg.connect(access.dsn(), autocommit=True)
    conn.add_notice_handler(hear)
    try:
        # Each query lets psycopg read what the gateway sent while it was idle.
        wait_for(lambda: len(heard) >= 2 or not conn.execute("select 1").fetchone(), 60)
        with pytest.raises(psycopg.OperationalError) as cut:
            wait_for(lambda: not conn.execute("select 1").fetchone(), 60)
    finally:
        conn.close()
    hint = (
        f"extend it with `pam grant extend {granted['session_id'][:8]} --by 30m`"
        " (or press e in the running `pam db access`)"
    )
    assert heard == [
        ("WARNING", "01000", notice_text(granted, 8), hint),
        ("WARNING", "01000", notice_text(granted, 4), hint),
    ]
    assert cut.value.sqlstate == "57P01"
    assert access.process.wait(30) == 0
    events = access.events()
    assert [e["event"] for e in events] == ["granted", "expiring", "expiring", "ended"]
    assert [e["in_seconds"] for e in events[1:3]] == [8, 4]
    assert (events[3]["reason"], events[3]["expires_at"]) == ("expired", granted["expires_at"])
    assert access.process.stderr.text() == ""


# --- extending ---------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_an_extension_carries_a_running_query_and_new_connections_past_the_old_expiry(
    live: Live,
) -> None:
    access = json_access(live.gw, duration="30s")
    granted = access.granted
    old_expiry = when(granted["expires_at"])
    sleeper = psycopg.connect(access.dsn(application_name="sleeper"), autocommit=True)
    outcome: dict[str, Any] = {}
    seconds = (old_expiry - datetime.now(UTC)).total_seconds() + 3

    def sleep_across() -> None:
        try:
            outcome["row"] = sleeper.execute("select pg_sleep(%s), 'woke'", (seconds,)).fetchone()
        except psycopg.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=sleep_across, daemon=True)
    thread.start()
    try:
        result = live.gw.cli("grant", "extend", granted["session_id"][:8], "--by", "2m")
        thread.join(seconds + 60)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome
        assert outcome["row"] == ("", "woke")
        assert datetime.now(UTC) > old_expiry
        assert sleeper.execute("select 'still usable'").fetchone() == ("still usable",)
        with psycopg.connect(access.dsn(application_name="late")) as late:
            assert late.execute("select current_user").fetchone() == ("app_scram",)
    finally:
        sleeper.close()
    new_expiry = old_expiry + timedelta(minutes=2)
    assert result.stdout.startswith(f"Extended session {granted['session_id'][:8]}: it now expires")
    extended = access.wait_event("extended")
    assert (when(extended["expires_at"]), extended["previous_expires_at"]) == (
        new_expiry,
        granted["expires_at"],
    )
    assert access.process.stop() == 0
    events = access.events()
    assert [e["event"] for e in events] == ["granted", "extended", "ended"]
    assert (events[2]["reason"], when(events[2]["expires_at"])) == ("client_ended", new_expiry)
    # The moved expiry is sealed: the trail verifies, and a hand edit of it shows.
    session_id = granted["session_id"]
    assert live.gw.cli("audit", "verify", session_id).returncode == 0
    edit_store(
        live.gw,
        f"UPDATE sessions SET expires_at = '{old_expiry.isoformat(timespec='microseconds')}'"
        f" WHERE id = '{session_id}'",
    )
    tampered = live.gw.cli("audit", "verify", session_id, check=False)
    assert tampered.returncode == 1
    assert (
        f"the session record {session_id[:8]} was edited: expires_at no longer matches"
        " what was sealed"
    ) in tampered.stdout


@pytest.mark.timeout(240)
def test_a_tunnel_grant_extended_gets_a_new_certificate_for_connections_after_the_old_expiry(
    live: Live,
) -> None:
    access = json_access(live.gw, "--tunnel", duration="15s")
    granted = access.granted
    old_expiry = when(granted["expires_at"])
    live.gw.cli("grant", "extend", granted["session_id"], "--by", "1m")
    access.wait_event("extended")
    wait_for(lambda: datetime.now(UTC) > old_expiry + timedelta(seconds=1), 60)
    with psycopg.connect(access.dsn(application_name="after-old-expiry")) as conn:
        assert conn.execute("select current_user").fetchone() == ("app_scram",)
    assert access.process.stop() == 0
    assert access.process.stderr.text() == ""


def test_extending_beyond_the_policys_maximum_is_refused_with_its_message(live: Live) -> None:
    access = json_access(live.gw, env=live.alice_env(), duration="50s")
    session_id = access.granted["session_id"]

    refused = live.alice_cli("grant", "extend", session_id, "--by", "30s")

    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.strip() == (
        "error: the longest access policy 'alice-short' allows is 1m (hint: extended, the grant"
        " would last 1m20s from its start; extend by less)"
    )
    allowed = live.alice_cli("grant", "extend", session_id, "--by", "10s", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert when(json.loads(allowed.stdout)["expires_at"]) == when(
        access.granted["expires_at"]
    ) + timedelta(seconds=10)
    access.wait_event("extended")
    assert access.process.stop() == 0
    # An ended grant is not extended: one line, non-zero.
    again = live.alice_cli("grant", "extend", session_id, "--by", "5s")
    assert (again.returncode, again.stderr.strip()) == (
        1,
        f"error: access session {session_id[:8]} is not live (it ended: client_ended)",
    )


# --- the e key on a terminal -------------------------------------------------------------


@pytest.mark.timeout(180)
def test_pressing_e_extends_and_ctrl_c_still_ends_in_order_restoring_the_terminal(
    live: Live,
) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    before = termios.tcgetattr(slave)
    shown = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            shown.extend(data)

    # setsid -c: a session of its own whose controlling terminal is the pty,
    # as a shell gives a command it runs in the foreground.
    proc = subprocess.Popen(
        [
            *("setsid", "-c", sys.executable, "-m", "cli", "db", "access"),
            *("--resource", "prod", "--account", "scram", "--duration", "10m"),
            *("--extend-by", "5m"),
        ],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=live.gw.env,
    )
    errors = _Drain(proc.stderr, live.gw.transcript)
    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        wait_for(lambda: b"e: extend by 5m" in shown, 60)  # the status line is up
        text = shown.decode(errors="replace")
        session = text.split("session ", 1)[1][:8]
        before_expiry = when(live.gw.cli_json("sessions", "show", session)["session"]["expires_at"])
        os.write(master, b"e")
        wait_for(lambda: b"Access extended" in shown, 60)
        after = live.gw.cli_json("sessions", "show", session)["session"]
        assert when(after["expires_at"]) == before_expiry + timedelta(minutes=5)
        os.write(master, b"\x03")  # Ctrl+C, through the terminal's own SIGINT
        assert proc.wait(30) == 0
        wait_for(lambda: b"ended (client_ended)" in shown, 10)
        assert termios.tcgetattr(slave) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(slave)
        os.close(master)
        reader.join(5)
        errors.join(5)
    assert errors.text() == ""


# --- idle connections --------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_an_idle_connection_is_cut_naming_the_policy_but_a_long_query_is_not(
    live: Live, pg: TempCluster
) -> None:
    access = json_access(live.gw, env=live.alice_env(), account="md5")
    dsn = access.dsn(user="md5_app", application_name="idler")
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        # Longer than the 3-second limit, and silent all along: not idle.
        assert conn.execute("select pg_sleep(5), 'done'").fetchone() == ("", "done")
        session_id = access.granted["session_id"]

        def cut() -> bool:
            detail = live.gw.cli_json("sessions", "show", session_id)
            return any(c["end_reason"] == "idle_timeout" for c in detail["connections"])

        wait_for(cut, 60)
        with pytest.raises(psycopg.OperationalError) as idle:
            conn.execute("select 1")
    finally:
        conn.close()
    assert idle.value.sqlstate == "57P05"
    assert idle.value.diag.severity_nonlocalized == "FATAL"
    assert idle.value.diag.message_primary == (
        "terminating connection: idle for 3s (the limit of policy 'alice-idle')"
    )
    # The grant itself is still open: a new connection works.
    with psycopg.connect(dsn) as again:
        assert again.execute("select current_user").fetchone() == ("md5_app",)
    assert access.process.stop() == 0
